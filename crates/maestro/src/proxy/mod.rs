//! The reverse proxy.
