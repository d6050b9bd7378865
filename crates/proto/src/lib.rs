//! Platform.X shared vocabulary: names, the `app.toml` manifest schema, what an app is from its
//! root files (`detect`, `procfile`), the HTTP API types and the framed messages of the TCP
//! control links. Nothing here does I/O.

pub mod acme;
pub mod api;
pub mod beacon;
pub mod beacon_state;
pub mod build;
pub mod codec;
pub mod detect;
pub mod hsts;
pub mod lease;
pub mod link;
pub mod manifest;
pub mod names;
pub mod process;
pub mod procfile;
pub mod rate;
pub mod run;
pub mod runtime;
pub mod size;

/// Version of this software, reported in handshakes and `--version`.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
