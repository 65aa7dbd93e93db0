//! The last lines an ssh process wrote on stderr: why it exited, in its
//! own words.

use super::TAIL_LINES;
use std::collections::VecDeque;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// The last lines the master wrote to stderr; each line is also logged.
pub(super) struct Tail {
    pub(super) lines: Arc<std::sync::Mutex<VecDeque<String>>>,
    pub(super) reader: Option<JoinHandle<()>>,
}

impl Tail {
    pub(super) fn capture(child: &mut Child) -> Tail {
        let lines = Arc::new(std::sync::Mutex::new(VecDeque::new()));
        let reader = child.stderr.take().map(|stderr| {
            let lines = lines.clone();
            tokio::spawn(
                async move {
                    let mut reader = BufReader::new(stderr).lines();
                    while let Ok(Some(line)) = reader.next_line().await {
                        let line = line.trim().to_string();
                        if line.is_empty() {
                            continue;
                        }
                        tracing::debug!(stderr = %line, "ssh master");
                        let mut l = lines.lock().expect("not poisoned");
                        if l.len() == TAIL_LINES {
                            l.pop_front();
                        }
                        l.push_back(line);
                    }
                }
                .in_current_span(),
            )
        });
        Tail { lines, reader }
    }

    /// Why the master ended: its exit status and last words.
    pub(super) async fn explain(&mut self, status: std::io::Result<ExitStatus>) -> String {
        if let Some(mut reader) = self.reader.take() {
            // Its stderr closes as it exits, unless a child of its
            // (a ProxyCommand) holds it open.
            if tokio::time::timeout(Duration::from_secs(1), &mut reader)
                .await
                .is_err()
            {
                reader.abort();
            }
        }
        let status = match status {
            Ok(s) => format!("the ssh master ended with {s}"),
            Err(e) => format!("cannot wait for the ssh master: {e}"),
        };
        let lines = self.lines.lock().expect("not poisoned");
        if lines.is_empty() {
            status
        } else {
            let said: Vec<&str> = lines.iter().map(String::as_str).collect();
            format!("{} ({status})", said.join("; "))
        }
    }
}
