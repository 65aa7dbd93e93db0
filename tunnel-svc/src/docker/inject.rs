//! Putting the monitor's file into a container: the engine's archive API,
//! and where the engine refuses it (a read-only root filesystem; engines
//! whose archive API differs from Docker's), the file streamed over an exec
//! stream into the first directory that takes and runs it.

use super::engine::{Container, Follower};
use super::monitor::engine_error;
use super::MONITOR_PATH;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::query_parameters::UploadToContainerOptions;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Where the streamed file may go, in this order: `/` (as the archive
/// puts it), then the places a read-only container usually has writable:
/// Podman mounts `/tmp`, `/run` and `/var/tmp` as tmpfs with `--read-only`;
/// Docker's `--tmpfs` mounts are `noexec` unless asked, but its `/dev` is a
/// tmpfs of the container's own that is not; `/dev/shm` last (`noexec` on
/// both).
const DIRS: &str = "/ /tmp /run /var/tmp /dev /dev/shm";

/// The shell script that takes the file on stdin (`$1` its name): written
/// into the first directory that takes it, moved on to the next while it
/// does not run there (a `noexec` mount), its path printed on stdout.
/// Nothing stays when it fails.
const SCRIPT: &str = r#"n=$1; dirs=$2; f=
for d in $dirs; do
  f=${d%/}/$n
  if (: > "$f") 2>/dev/null; then break; fi
  f=
done
if [ -z "$f" ]; then echo "no directory among $dirs is writable" >&2; exit 1; fi
if ! { cat > "$f" && chmod 755 "$f"; }; then rm -f "$f"; exit 1; fi
if "$f" --version >/dev/null 2>&1; then echo "$f"; exit 0; fi
for d in $dirs; do
  g=${d%/}/$n
  [ "$g" = "$f" ] && continue
  if cp "$f" "$g" 2>/dev/null && chmod 755 "$g" && "$g" --version >/dev/null 2>&1; then
    rm -f "$f"; echo "$g"; exit 0
  fi
  rm -f "$g"
done
rm -f "$f"
echo "no directory among $dirs is both writable and executable (give the container one, e.g. --tmpfs /tmp:exec)" >&2
exit 1
"#;

/// How long streaming the file in may take.
const STREAM_IN: Duration = Duration::from_secs(60);

/// What the script may say that is kept (its path, or why not).
const SAID_MAX: usize = 4096;

impl Follower {
    /// Puts the monitor's file into `c`; where it is. `refused`: why the
    /// engine refused the archive for `c` before, if it did, so that it is
    /// not sent again (set here when it refuses).
    pub(super) async fn copy_in(
        &self,
        c: &Container,
        refused: &mut Option<String>,
    ) -> Result<String, String> {
        if refused.is_none() {
            // Never replaces a directory of the container's with the file.
            let upload = UploadToContainerOptions {
                path: "/".into(),
                no_overwrite_dir_non_dir: Some("true".into()),
                ..Default::default()
            };
            let body = futures_util::stream::iter(chunks(&self.archive.tar));
            match self
                .docker
                .upload_to_container(&c.id, Some(upload), bollard::body_stream(body))
                .await
            {
                Ok(()) => return Ok(MONITOR_PATH.into()),
                Err(e) => *refused = Some(engine_error(&e)),
            }
        }
        let refused = refused.as_deref().unwrap_or_default();
        tracing::debug!(container = %c.name, error = %refused,
            "the engine refused the monitor's archive; streaming it in over exec");
        match tokio::time::timeout(STREAM_IN, self.stream_in(c)).await {
            Ok(Ok(path)) => {
                tracing::info!(container = %c.name, path = %path, archive = %refused,
                    "monitor-svc streamed in over exec (the engine refused the archive)");
                Ok(path)
            }
            Ok(Err(why)) => Err(format!("{refused}; streamed over exec: {why}")),
            Err(_) => Err(format!(
                "{refused}; streamed over exec: not done within {}s",
                STREAM_IN.as_secs()
            )),
        }
    }

    /// Runs [`SCRIPT`] in `c` (as root: `/` is root's) with the monitor's
    /// file on its stdin; the path it printed.
    async fn stream_in(&self, c: &Container) -> Result<String, String> {
        let name = MONITOR_PATH.trim_start_matches('/');
        let exec = self
            .docker
            .create_exec(
                &c.id,
                CreateExecOptions::<String> {
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(vec![
                        "sh".into(),
                        "-c".into(),
                        SCRIPT.into(),
                        "sh".into(),
                        name.into(),
                        DIRS.into(),
                    ]),
                    user: Some("0".to_string()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| engine_error(&e))?;
        let started = self
            .docker
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| engine_error(&e))?;
        let StartExecResults::Attached { output, mut input } = started else {
            return Err("the exec started detached".into());
        };
        // Written and read at once: a script that fails early stops reading.
        let write = async {
            for chunk in chunks(&self.archive.binary) {
                input.write_all(&chunk).await?;
            }
            // Half-closed: the script's `cat` sees the end.
            input.shutdown().await
        };
        let io = async { tokio::join!(write, said(output)) };
        tokio::pin!(io);
        // An exec whose command cannot start (no `sh`) ends at once, but
        // Docker keeps its stream open and stops reading it: watched too.
        let (written, (out, err)) = tokio::select! {
            done = &mut io => done,
            () = self.exec_ended(&exec.id) => {
                match tokio::time::timeout(Duration::from_secs(1), &mut io).await {
                    Ok(done) => done,
                    Err(_) => (Ok(()), (String::new(), String::new())),
                }
            }
        };
        let code = self
            .docker
            .inspect_exec(&exec.id)
            .await
            .map_err(|e| engine_error(&e))?
            .exit_code;
        match (code, written) {
            (Some(0), Ok(())) if out.starts_with('/') => Ok(out),
            (Some(0), Ok(())) => Err(format!("the script printed no path ({out:?})")),
            (Some(code @ (126 | 127)), _) if err.is_empty() => Err(format!(
                "the container has no `sh` to run it (exit status {code})"
            )),
            (code, written) => {
                let mut why = if err.is_empty() {
                    "the script failed".to_string()
                } else {
                    err
                };
                if let Some(code) = code.filter(|c| *c != 0) {
                    why.push_str(&format!(" (exit status {code})"));
                }
                if let Err(e) = written {
                    why.push_str(&format!(" (writing the file: {e})"));
                }
                Err(why)
            }
        }
    }

    /// Returns once the engine says exec `id` no longer runs.
    async fn exec_ended(&self, id: &str) {
        let mut every = tokio::time::interval(Duration::from_millis(250));
        loop {
            every.tick().await;
            if let Ok(i) = self.docker.inspect_exec(id).await {
                if i.running == Some(false) {
                    return;
                }
            }
        }
    }
}

/// What an exec stream said on stdout and stderr until it ended, trimmed,
/// each at most [`SAID_MAX`] bytes.
async fn said(
    mut output: impl Stream<Item = Result<LogOutput, bollard::errors::Error>> + Unpin,
) -> (String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(Ok(chunk)) = output.next().await {
        let (to, message) = match chunk {
            LogOutput::StdOut { message } | LogOutput::Console { message } => (&mut out, message),
            LogOutput::StdErr { message } => (&mut err, message),
            LogOutput::StdIn { .. } => continue,
        };
        let room = SAID_MAX.saturating_sub(to.len());
        to.extend_from_slice(&message[..message.len().min(room)]);
    }
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).trim().to_string();
    (text(out), text(err))
}

/// `bytes` as 64 KiB slices of the one shared copy. Given whole, the HTTP
/// client copies an upload into the connection's write buffer (a Unix
/// socket takes no vectored writes), and the pooled connection keeps that
/// 8 MiB buffer: 20 containers started at once held 170 MiB.
fn chunks(bytes: &Bytes) -> impl Iterator<Item = Bytes> + Send + 'static {
    const CHUNK: usize = 64 << 10;
    let bytes = bytes.clone();
    (0..bytes.len())
        .step_by(CHUNK)
        .map(move |at| bytes.slice(at..(at + CHUNK).min(bytes.len())))
}
