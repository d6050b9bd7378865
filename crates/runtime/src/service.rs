//! Running a service binary: the async runtime, the shutdown signal, and the exit code
//! (0, 78 for a bad configuration so systemd does not restart it in a loop, 1 otherwise).

use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

/// A service's start-up error, which knows whether the configuration is to blame.
pub trait StartFailure: std::fmt::Display {
    fn is_config(&self) -> bool;
}

/// Runs `start` on a new multi-threaded runtime with the process's shutdown token; returns
/// the exit code, after printing any failure as `<name>: <error>`.
pub fn serve<F, Fut, E>(name: &str, start: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: StartFailure + From<std::io::Error>,
{
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = crate::shutdown::on_signals()?;
        start(shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            if e.is_config() {
                ExitCode::from(crate::EX_CONFIG as u8)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
