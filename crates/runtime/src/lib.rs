//! What every Platform.X service shares at run time: layered config, tracing, the shutdown
//! signal and critical tasks, systemd integration, secret files, durable file writes, tokens,
//! TLS configs, retry backoff and error chains. Only this crate reads process-wide state
//! (signals, environment), so services stay testable through their `run` functions.

pub mod backoff;
pub mod caps;
pub mod config;
pub mod errors;
pub mod fs;
pub mod host;
pub mod http_server;
pub mod sandbox;
pub mod secrets;
pub mod service;
pub mod shutdown;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod tokens;

/// Exit code for a bad configuration (sysexits.h `EX_CONFIG`); systemd units use it in
/// `RestartPreventExitStatus=` so a broken config is not restarted in a loop.
pub const EX_CONFIG: i32 = 78;
