//! The process-wide shutdown signal: SIGTERM or Ctrl-C cancels one root token that every task
//! watches; a second signal is left to the default handler's successor (the drain deadline).

use tokio_util::sync::CancellationToken;

/// Returns a token cancelled on SIGTERM or SIGINT. Call once, from `main`.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        cancel.cancel();
    });
    Ok(token)
}
