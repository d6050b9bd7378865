//! What the `maestro` binary does besides parsing: the serve loop.

use std::process::ExitCode;

use crate::config::Config;

pub fn serve(config: Config) -> ExitCode {
    px_runtime::service::serve("maestro", |shutdown| async move {
        let https = match config.https_listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
            None => None,
        };
        let listeners = crate::Listeners {
            http: tokio::net::TcpListener::bind(config.http_listen).await?,
            https,
            status: tokio::net::TcpListener::bind(config.status_listen).await?,
        };
        crate::run(config, listeners, shutdown).await
    })
}
