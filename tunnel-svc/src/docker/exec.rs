//! A monitor's gRPC API over its exec stream: the stream as a connection,
//! the monitor's log lines on stderr, and the slot the channel takes each
//! life's stream from.

use super::monitor::{exited, monitor_line};
use bollard::container::LogOutput;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The monitor's exec stream as the channel's connector finds it.
#[derive(Default)]
pub(super) enum Slot {
    #[default]
    Starting,
    /// A stream not yet connected.
    Ready(ExecIo),
    /// Why there is no monitor running.
    Failed(String),
}

/// The current monitor's exec stream, shared by the monitor loop and the
/// channel's connector.
#[derive(Default)]
pub(super) struct Current {
    pub(super) slot: Mutex<Slot>,
    /// Woken whenever `slot` leaves [`Slot::Starting`].
    pub(super) changed: tokio::sync::Notify,
}

impl Current {
    pub(super) fn set(&self, slot: Slot) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = slot;
        self.changed.notify_waiters();
    }

    /// The stream to connect over: waits while a monitor is starting.
    pub(super) async fn take(&self) -> std::io::Result<ExecIo> {
        loop {
            let changed = self.changed.notified();
            {
                let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
                match std::mem::take(&mut *slot) {
                    Slot::Ready(io) => return Ok(io),
                    Slot::Failed(why) => {
                        let e = std::io::Error::other(why.clone());
                        *slot = Slot::Failed(why);
                        return Err(e);
                    }
                    Slot::Starting => {}
                }
            }
            if tokio::time::timeout(MONITOR_START, changed).await.is_err() {
                return Err(std::io::Error::other("the monitor did not start in time"));
            }
        }
    }
}

/// How long a monitor on an exec stream may leave a keepalive unanswered
/// (a paused container's does) before tunnel-svc gives it up.
pub(super) const EXEC_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection waits for a monitor that is being started.
pub(super) const MONITOR_START: Duration = Duration::from_secs(30);

/// A gRPC channel to the container's monitor: each connection is the exec
/// stream of the monitor running now, so when a monitor is started again
/// the channel reconnects to it.
pub(super) fn exec_channel(current: Arc<Current>) -> porthole::auth::AuthChannel {
    let connector = tower::service_fn(move |_: http::Uri| {
        let current = current.clone();
        async move { current.take().await.map(hyper_util::rt::TokioIo::new) }
    });
    let endpoint = tonic::transport::Endpoint::from_static("http://monitor.docker-exec");
    // A monitor that dies ends its exec stream, which is noticed at once;
    // the keepalive is only for a stream that hangs. Given up on sooner,
    // a short `docker pause` would end the monitor (it exits when its
    // stdin closes) and reset every connection it carries.
    let channel = crate::backend::grpc::monitor_endpoint(endpoint)
        .keep_alive_timeout(EXEC_KEEPALIVE_TIMEOUT)
        .connect_with_connector_lazy(connector);
    porthole::auth::with_token(channel, None)
}

pub(super) type Output =
    Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// The monitor's stdin and stdout as one byte stream; its stderr goes to
/// the log, tagged with the container.
pub(super) struct ExecIo {
    pub(super) output: Output,
    pub(super) input: Pin<Box<dyn AsyncWrite + Send>>,
    /// Stdout bytes received but not read yet.
    pub(super) pending: Bytes,
    /// A stderr line not finished yet.
    pub(super) stderr: Vec<u8>,
    /// The last warning or error the monitor wrote: why it stopped, when
    /// it stops.
    pub(super) said: Said,
    /// Whose monitor, for its log lines.
    pub(super) container: String,
    /// Its info lines (a port event each): the reconciler's budget per
    /// target, and a count.
    pub(super) budget: porthole::telemetry::Budget,
    /// Fired when the stream ends.
    pub(super) ended: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The last warning or error a monitor wrote, shared with its loop.
pub(super) type Said = Arc<Mutex<Option<String>>>;

impl ExecIo {
    /// A monitor's exec stream in `container`, and what fires when it ends.
    pub(super) fn new(
        output: Output,
        input: Pin<Box<dyn AsyncWrite + Send>>,
        container: String,
    ) -> (ExecIo, tokio::sync::oneshot::Receiver<()>) {
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        let io = ExecIo {
            output,
            input,
            pending: Bytes::new(),
            stderr: Vec::new(),
            said: Said::default(),
            container,
            budget: porthole::telemetry::Budget::new(
                crate::reconcile::LOG_PER_SEC,
                crate::reconcile::LOG_BURST,
            ),
            ended: Some(ended_tx),
        };
        (io, ended)
    }

    /// Passes the monitor's log lines (JSON) on at their own level, tagged
    /// with the container; remembers the last warning or error.
    pub(super) fn log_stderr(&mut self, bytes: &[u8]) {
        self.stderr.extend_from_slice(bytes);
        while let Some(n) = self.stderr.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.stderr.drain(..=n).collect();
            let line = String::from_utf8_lossy(&line);
            let (level, text) = monitor_line(line.trim_end());
            let text = porthole::text::printable(&text).into_owned();
            let container = self.container.as_str();
            match level {
                tracing::Level::ERROR => tracing::error!(target: "monitor", container, "{text}"),
                tracing::Level::WARN => tracing::warn!(target: "monitor", container, "{text}"),
                tracing::Level::INFO => match self.budget.take(std::time::Instant::now()) {
                    Some(0) => tracing::info!(target: "monitor", container, "{text}"),
                    Some(unlogged) => {
                        tracing::info!(target: "monitor", container, unlogged, "{text}")
                    }
                    None => tracing::debug!(target: "monitor", container, "{text}"),
                },
                _ => tracing::debug!(target: "monitor", container, "{text}"),
            }
            if level <= tracing::Level::WARN {
                *self.said.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
            }
        }
        if self.stderr.len() > 16 << 10 {
            self.stderr.clear();
        }
    }

    /// Reads the monitor's first line on stdout: `ready`, or `listening
    /// ADDR` (its port is returned). When the stream ends first, the error
    /// is what the monitor said on its way out.
    pub(super) async fn hello(&mut self) -> Result<Option<u16>, String> {
        let mut line = Vec::new();
        loop {
            if let Some(n) = self.pending.iter().position(|b| *b == b'\n') {
                line.extend_from_slice(&self.pending.split_to(n + 1)[..n]);
                break;
            }
            line.extend_from_slice(&std::mem::take(&mut self.pending));
            if line.len() > 512 {
                break;
            }
            match self.output.next().await {
                None | Some(Err(_)) => return Err(exited(&self.said)),
                Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                    self.pending = message
                }
                Some(Ok(LogOutput::StdErr { message })) => self.log_stderr(&message),
                Some(Ok(LogOutput::StdIn { .. })) => {}
            }
        }
        let line = String::from_utf8_lossy(&line);
        match line.trim() {
            "ready" => Ok(None),
            other => other
                .strip_prefix("listening ")
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .map(|a| Some(a.port()))
                .ok_or_else(|| {
                    format!(
                        "monitor-svc did not start: {}",
                        porthole::text::printable(other)
                    )
                }),
        }
    }

    pub(super) fn end(&mut self) {
        if let Some(tx) = self.ended.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for ExecIo {
    fn drop(&mut self) {
        self.end();
    }
}

impl AsyncRead for ExecIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            match self.output.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    tracing::debug!("the monitor's exec stream ended");
                    self.end();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "the monitor's exec stream failed");
                    self.end();
                    return Poll::Ready(Err(std::io::Error::other(e)));
                }
                Poll::Ready(Some(Ok(out))) => match out {
                    LogOutput::StdOut { message } | LogOutput::Console { message } => {
                        self.pending = message;
                    }
                    LogOutput::StdErr { message } => self.log_stderr(&message),
                    LogOutput::StdIn { .. } => {}
                },
            }
        }
    }
}

impl AsyncWrite for ExecIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.input.as_mut().poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.input.as_mut().poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.input.as_mut().poll_shutdown(cx)
    }
}
