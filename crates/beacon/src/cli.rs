//! What the `beacon` binary does besides parsing: the serve loop.

use std::process::ExitCode;

use crate::config::Config;

pub fn serve(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("beacon: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = px_runtime::shutdown::on_signals()?;
        let listeners = crate::Listeners {
            http: tokio::net::TcpListener::bind(config.http_listen).await?,
            control: tokio::net::TcpListener::bind(config.control_listen).await?,
        };
        crate::run(config, listeners, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(crate::StartError::Config(e)) => {
            eprintln!("beacon: {e}");
            ExitCode::from(px_runtime::EX_CONFIG as u8)
        }
        Err(e) => {
            eprintln!("beacon: {e}");
            ExitCode::FAILURE
        }
    }
}
