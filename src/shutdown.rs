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

/// Runs `work` to its end; once `stop` is cancelled it gets `drain` more
/// to finish. `None`: it was still running when the drain ran out (the
/// caller then resets what it holds).
pub async fn drained<F: std::future::Future>(
    work: F,
    stop: &CancellationToken,
    drain: std::time::Duration,
) -> Option<F::Output> {
    tokio::pin!(work);
    tokio::select! {
        out = &mut work => Some(out),
        _ = stop.cancelled() => tokio::time::timeout(drain, &mut work).await.ok(),
    }
}
