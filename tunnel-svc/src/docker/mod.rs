//! `tunnel-svc --docker`: follows the Docker engine's containers and puts a
//! monitor in each one it selects. The monitor (a static `monitor-svc`) is
//! copied in through the Engine API and started with the exec API as
//! `monitor-svc --stdio`; its gRPC API — events and the Relay that carries
//! tunnel bytes — runs over that exec stream, so nothing needs a route to
//! the container's address and no token is needed (only tunnel-svc holds
//! the stream). A container is a target named after it; it appears when
//! the container starts and goes, with its host ports, when it stops.

//!
//! Its rooms: this module holds what needs no engine (options, the
//! monitor's archive); with the `docker` cargo feature (on by default),
//! `engine` follows containers, `inject` puts the monitor's file in one,
//! `monitor` runs that container's monitor through its lives and `exec`
//! carries its gRPC API over the exec stream.

#[cfg(feature = "docker")]
mod discover;
#[cfg(feature = "docker")]
mod engine;
#[cfg(feature = "docker")]
mod exec;
#[cfg(feature = "docker")]
mod inject;
#[cfg(feature = "docker")]
mod monitor;
#[cfg(feature = "docker")]
mod remote;

use crate::reconcile::Handle;
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where the monitor is put in a container: a file at the root, which the
/// monitor removes as it starts (`--remove-self`), so nothing of porthole
/// stays in the container's filesystem.
const MONITOR_PATH: &str = "/.porthole-monitor-svc";

/// Containers followed now: when fewer, what their monitors' streams held
/// is handed back to the system (see `trim_after_connections_end`).
pub static FOLLOWED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How long a container that died keeps its tunnels (new connections
/// waiting) in case it starts again: `docker restart` is a stop and a
/// start, and its events are a stopped container's until the start. A
/// container removed (`docker rm`) frees its host ports at once.
pub const RESTART_WINDOW: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct Options {
    /// `docker ps --filter` pairs: only matching containers are followed.
    pub filters: Vec<(String, String)>,
    /// The static monitor-svc to put in each container.
    pub monitor_binary: PathBuf,
    /// It, read and checked once, as the archive each container gets.
    pub archive: Archive,
    pub transport: Transport,
    /// Give the grpc backend the raw relay path where the container's
    /// address is reached (`--no-raw-relay` turns it off).
    pub raw_relay: bool,
    /// `--engine URL`: the engine to follow (else the one the user's CLI
    /// would use, see `discover`).
    pub engine: Option<String>,
    /// `--ssh-option`s, for an engine reached over ssh.
    pub ssh_options: Vec<String>,
}

/// The monitor as a tar archive (see [`monitor_archive`]), and its file
/// alone (a slice of the same bytes) for engines that refuse the archive.
#[derive(Clone)]
pub struct Archive {
    tar: Bytes,
    #[cfg_attr(not(feature = "docker"), allow(dead_code))]
    binary: Bytes,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Archive({} bytes)", self.tar.len())
    }
}

/// How tunnel bytes reach a container (`--docker-transport`). Events always
/// come over the monitor's exec stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// The container's address when the host reaches it, else the exec
    /// stream.
    Auto,
    /// Always the exec stream: works wherever the Engine API does.
    Exec,
    /// The container's address (the monitor listens there too, with a
    /// token of its own handed over the exec stream); when the host cannot
    /// reach it, the target says so and the exec stream carries the bytes.
    Ip,
}

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("{}: {why}; `cargo dist` builds a static one beside tunnel-svc in dist/ (or: RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu -p monitor-svc, then --monitor-binary PATH)", path.display())]
    Binary { path: PathBuf, why: String },
    #[error("cannot reach the container engine at {url} ({from}): {why}")]
    Engine {
        url: String,
        from: String,
        why: String,
    },
    #[error("{0}")]
    NoEngine(String),
    #[error("bad --docker-filter {0:?}: use KEY=VALUE with KEY one of label, name, id")]
    Filter(String),
    #[error("this tunnel-svc was built without Docker support (cargo feature \"docker\")")]
    NotBuilt,
}

/// Parses `--docker-filter KEY=VALUE`.
pub fn filter(s: &str) -> Result<(String, String), DockerError> {
    match s.split_once('=') {
        Some((k @ ("label" | "name" | "id"), v)) if !v.is_empty() => Ok((k.into(), v.into())),
        _ => Err(DockerError::Filter(s.into())),
    }
}

/// Why `bytes` cannot run in any x86_64 Linux container, if it cannot: not
/// an x86_64 ELF executable, or linked dynamically (it names an
/// interpreter, which a busybox or distroless image does not have).
pub fn not_static(bytes: &[u8]) -> Option<String> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Some("not a 64-bit little-endian ELF executable".into());
    }
    if u16_at(18) != Some(62) {
        return Some("not built for x86_64".into());
    }
    let phoff = bytes
        .get(32..40)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    let (Some(phoff), Some(size), Some(count)) = (phoff, u16_at(54), u16_at(56)) else {
        return Some("truncated ELF header".into());
    };
    for i in 0..usize::from(count) {
        let at = phoff + i * usize::from(size);
        let Some(kind) = bytes.get(at..at + 4) else {
            return Some("truncated program headers".into());
        };
        if u32::from_le_bytes(kind.try_into().expect("4 bytes")) == PT_INTERP {
            return Some("linked dynamically (it needs the host's libc and loader)".into());
        }
    }
    None
}

/// A tar archive holding one executable file `name` with `data`.
fn tar_one(name: &str, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut header = tar::Header::new_ustar();
    header.set_path(name)?;
    header.set_size(data.len() as u64);
    header.set_mode(0o755);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut archive = tar::Builder::new(Vec::with_capacity(data.len() + 2048));
    archive.append(&header, data)?;
    archive.into_inner()
}

/// Reads and checks the monitor binary; the archive to upload.
pub fn monitor_archive(path: &Path) -> Result<Archive, DockerError> {
    let binary = std::fs::read(path).map_err(|e| DockerError::Binary {
        path: path.into(),
        why: format!("cannot read it ({e})"),
    })?;
    if let Some(why) = not_static(&binary) {
        return Err(DockerError::Binary {
            path: path.into(),
            why: format!("cannot run in a container: {why}"),
        });
    }
    let name = MONITOR_PATH.trim_start_matches('/');
    let archive = tar_one(name, &binary).map_err(|e| DockerError::Binary {
        path: path.into(),
        why: format!("cannot archive it ({e})"),
    })?;
    Ok(Archive::new(Bytes::from(archive), binary.len()))
}

impl Archive {
    /// `tar` from [`tar_one`], whose file of `len` bytes follows the one
    /// 512-byte header.
    fn new(tar: Bytes, len: usize) -> Archive {
        let binary = tar.slice(512..512 + len);
        Archive { tar, binary }
    }
}

/// The monitor for `--docker`: `--monitor-binary`, else `monitor-svc`
/// beside this executable.
pub fn default_monitor_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("monitor-svc"))
        .unwrap_or_else(|| PathBuf::from("monitor-svc"))
}

/// Connects to the engine and follows it until `shutdown` (see
/// [`engine::follow`]); fails at once when no engine answers. An engine
/// reached over ssh keeps its master's sockets in `runtime` (this
/// tunnel-svc's private directory, removed when it stops).
#[cfg(feature = "docker")]
pub async fn start(
    opts: Options,
    runtime: &Path,
    reconciler: Handle,
    shutdown: CancellationToken,
) -> Result<(), DockerError> {
    let endpoint = discover::find_here(opts.engine.as_deref())
        .map_err(|e| DockerError::NoEngine(e.to_string()))?;
    let (docker, engine) = engine::connect(&endpoint, &opts.ssh_options, runtime).await?;
    let mut opts = opts;
    if engine.remote && opts.transport == Transport::Auto {
        // The remote machine's container addresses are not this host's
        // to reach.
        opts.transport = Transport::Exec;
    }
    tracing::info!(filters = ?opts.filters, monitor = %opts.monitor_binary.display(), "following containers");
    tokio::spawn(engine::follow(docker, engine, opts, reconciler, shutdown));
    Ok(())
}

/// This tunnel-svc was built without the `docker` feature.
#[cfg(not(feature = "docker"))]
pub async fn start(
    _opts: Options,
    _runtime: &Path,
    _reconciler: Handle,
    _shutdown: CancellationToken,
) -> Result<(), DockerError> {
    Err(DockerError::NotBuilt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "docker")]
    #[test]
    fn monitor_log_lines_keep_their_level_and_words() {
        use super::monitor::monitor_line;
        let line = r#"{"timestamp":"2026-12-02T01:48:26Z","level":"WARN","message":"cannot run as the container's user","user":"1000","error":"setgroups: Operation not permitted"}"#;
        let (level, text) = monitor_line(line);
        assert_eq!(level, tracing::Level::WARN);
        assert_eq!(
            text,
            "cannot run as the container's user user=1000 error=setgroups: Operation not permitted"
        );
        assert_eq!(
            monitor_line("Error: cannot listen on 0.0.0.0:0"),
            (
                tracing::Level::WARN,
                "Error: cannot listen on 0.0.0.0:0".into()
            )
        );
        assert_eq!(
            monitor_line(r#"{"level":"DEBUG","message":"x","n":3}"#).1,
            "x n=3"
        );
    }

    #[test]
    fn filters_take_label_name_and_id() {
        assert_eq!(
            filter("label=dev=1").unwrap(),
            ("label".into(), "dev=1".into())
        );
        assert_eq!(filter("name=web").unwrap(), ("name".into(), "web".into()));
        for bad in ["", "name", "name=", "status=running", "=x"] {
            assert!(filter(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_dynamic_executable_is_refused() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let why = not_static(&me).expect("test binaries link glibc dynamically");
        assert!(why.contains("dynamically"), "{why}");
        assert!(not_static(b"#!/bin/sh\n").unwrap().contains("ELF"));
        assert!(not_static(b"\x7fELF\x02\x01").is_some());
    }

    #[test]
    fn the_archive_is_one_executable_file() {
        let tar = tar_one(".porthole-monitor-svc", b"hello").unwrap();
        let whole = Archive::new(Bytes::from(tar.clone()), 5);
        assert_eq!(&whole.binary[..], b"hello", "the file alone");
        let mut archive = tar::Archive::new(&tar[..]);
        let mut entries = archive.entries().unwrap();
        let mut entry = entries.next().unwrap().unwrap();
        assert_eq!(
            entry.path().unwrap().to_str(),
            Some(".porthole-monitor-svc")
        );
        assert_eq!(entry.header().mode().unwrap(), 0o755);
        assert_eq!(entry.header().entry_type(), tar::EntryType::Regular);
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        assert_eq!(data, b"hello");
        drop(entry);
        assert!(entries.next().is_none(), "one file only");
    }
}
