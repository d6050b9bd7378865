//! What the `beacon` binary does besides parsing: the serve loop.

use std::process::ExitCode;

use crate::config::Config;

pub fn serve(config: Config) -> ExitCode {
    px_runtime::service::serve("beacon", |shutdown| async move {
        let listeners = crate::Listeners {
            http: tokio::net::TcpListener::bind(config.http_listen).await?,
            control: tokio::net::TcpListener::bind(config.control_listen).await?,
        };
        crate::run(config, listeners, shutdown).await
    })
}
