//! What the `maestro` binary does besides parsing: the serve loop.

use std::process::ExitCode;

use crate::config::Config;

pub fn serve(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("maestro: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = px_runtime::shutdown::on_signals()?;
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
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(crate::StartError::Config(e)) => {
            eprintln!("maestro: {e}");
            ExitCode::from(px_runtime::EX_CONFIG as u8)
        }
        Err(e) => {
            eprintln!("maestro: {e}");
            ExitCode::FAILURE
        }
    }
}
