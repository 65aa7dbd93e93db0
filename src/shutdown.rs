//! SIGTERM / SIGINT as a cancellation token every task can watch.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn on_signal() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        // Cancel first: nothing, not even a log write to a closed pipe,
        // may stand between a signal and the shutdown.
        cancel.cancel();
        tracing::info!(signal = name, "shutting down");
    });
    Ok(token)
}
