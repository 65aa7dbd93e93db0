#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use monitor_svc::{scan::Source, Anonymous};
use porthole::telemetry::LogFormat;
use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// Watches this container's listening ports and serves them as events over
/// gRPC (porthole.v1.PortEvents) and GET /port-events, on one port.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address for gRPC and HTTP.
    #[arg(long, env = "PORTHOLE_LISTEN", default_value = "0.0.0.0:7070")]
    listen: SocketAddr,
    /// Serve the one process that started this one on stdin and stdout
    /// (gRPC over HTTP/2, no token: only that process holds the pipes)
    /// instead of listening; exit when stdin closes. What tunnel-svc
    /// --docker runs over a `docker exec` stream.
    #[arg(long, conflicts_with_all = ["listen", "token_file", "max_connections"])]
    stdio: bool,
    /// With --stdio: also listen on ADDR (for Relay and events from the
    /// network), requiring the token that the first line on stdin holds.
    /// Port 0 takes a free ephemeral port, so no port an app may want is
    /// taken. The first line on stdout says `listening ADDR` (without
    /// --stdio-listen: `ready`).
    #[arg(long, value_name = "ADDR", requires = "stdio")]
    stdio_listen: Option<SocketAddr>,
    /// Once started (and removed, with --remove-self), run as this user:
    /// NAME or UID, optionally :GROUP or :GID, as `docker run --user` takes
    /// it; names are looked up in this container's /etc/passwd and
    /// /etc/group. What tunnel-svc --docker passes for a container whose
    /// user is not root (it starts the monitor as root so that the monitor
    /// can remove itself from `/`). If the drop is refused (no CAP_SETUID),
    /// the monitor warns and goes on as it is.
    #[arg(long, value_name = "USER[:GROUP]")]
    user: Option<String>,
    /// Stop (SIGTERM) other processes running this same executable first: a
    /// monitor left by an earlier tunnel-svc. What tunnel-svc --docker runs.
    #[arg(long)]
    replace: bool,
    /// Delete this executable first thing, before anything can fail (it
    /// keeps running): a monitor copied into a container leaves nothing
    /// behind, even when it cannot start.
    #[arg(long)]
    remove_self: bool,
    /// How often to scan for listening sockets (e.g. 100ms, 2s).
    /// Default: 100ms with netlink, 1s with the /proc/net fallback.
    #[arg(long, env = "PORTHOLE_INTERVAL", value_parser = porthole::time::parse_duration)]
    interval: Option<Duration>,
    /// Events kept for ListEvents, resumes and /port-events.
    #[arg(long, env = "PORTHOLE_BUFFER_SIZE", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    buffer_size: u32,
    /// File holding the bearer token that Relay and full access need (mode
    /// 0600). Default: $XDG_RUNTIME_DIR/porthole/monitor.token, else
    /// /run/porthole/monitor.token as root, else
    /// ~/.local/state/porthole/monitor.token; made with a random token when
    /// it does not exist.
    #[arg(long, env = "PORTHOLE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// What callers without the token get: read-only (/port-events,
    /// PortEvents, health, reflection, /metrics; no command lines) or none
    /// (only /healthz). With --stdio, it applies to --stdio-listen's callers
    /// (the stdio peer has everything).
    #[arg(long, env = "PORTHOLE_ANONYMOUS", value_enum, default_value_t = Anonymous::ReadOnly)]
    anonymous: Anonymous,
    /// Client connections at once; more are closed as they arrive.
    #[arg(long, env = "PORTHOLE_MAX_CONNECTIONS", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// WatchEvents streams at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "PORTHOLE_MAX_SUBSCRIBERS", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_subscribers: u32,
    /// Where to read sockets from: auto (netlink, else /proc/net), netlink, procfs.
    #[arg(long, env = "PORTHOLE_SOURCE", value_enum, default_value_t = SourceArg::Auto)]
    source: SourceArg,
    /// Log level or tracing filter (error, warn, info, debug, trace).
    #[arg(long, env = "PORTHOLE_LOG", default_value = "info")]
    log_level: String,
    /// Log format: text or json.
    #[arg(long, env = "PORTHOLE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SourceArg {
    Auto,
    Netlink,
    Procfs,
}

fn main() -> anyhow::Result<()> {
    // Before the flags are even parsed: a copy put here by tunnel-svc must
    // not stay when this start fails.
    let removed = std::env::args_os()
        .any(|a| a == "--remove-self")
        .then(remove_self);
    let args = Args::parse();
    porthole::telemetry::init(&args.log_level, args.log_format).map_err(anyhow::Error::msg)?;
    if let Some(removed) = removed {
        removed?;
    }
    // While this is the only thread, so that every thread runs as the user.
    if let Some(user) = &args.user {
        match monitor_svc::user::switch_to(user) {
            Ok(id) => {
                tracing::info!(user = %user, uid = id.0, gid = id.1, "running as the container's user")
            }
            Err(e) => {
                tracing::warn!(user = %user, error = %e, "cannot run as the container's user; going on as this one")
            }
        }
    }
    // One thread: the monitor is a small sidecar (the detector has a
    // thread of its own), and relaying on one thread saves cross-thread
    // wake-ups.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(args))
}

/// Deletes this executable (it keeps running).
fn remove_self() -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this executable")?;
    std::fs::remove_file(&exe).with_context(|| format!("removing {}", exe.display()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.replace {
        let exe = std::env::current_exe().context("finding this executable")?;
        for pid in same_executable(&exe) {
            tracing::info!(pid, "stopping an earlier monitor");
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
    }
    let fds = porthole::net::raise_fd_limit();
    tracing::debug!(limit = ?fds, "file-descriptor limit");
    let shutdown = porthole::shutdown::on_signal()?;
    let (listen, token) = if let Some(addr) = args.stdio_listen {
        let token = token_from_stdin().await?;
        let listener = porthole::net::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let bound = listener.local_addr().context("the listening address")?;
        hello(&format!("listening {bound}"))?;
        (porthole::server::Listen::StdioAndTcp(listener), Some(token))
    } else if args.stdio {
        hello("ready")?;
        (porthole::server::Listen::Stdio, None)
    } else {
        let token = token(&args)?;
        let listener = porthole::net::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        (porthole::server::Listen::Tcp(listener), Some(token))
    };
    let opts = monitor_svc::Options {
        interval: args.interval,
        buffer_size: args.buffer_size as usize,
        source: match args.source {
            SourceArg::Auto => None,
            SourceArg::Netlink => Some(Source::Netlink),
            SourceArg::Procfs => Some(Source::Procfs),
        },
        token,
        anonymous: args.anonymous,
        limits: porthole::server::Limits {
            max_connections: args.max_connections as usize,
            ..Default::default()
        },
        max_subscribers: args.max_subscribers as usize,
    };
    let stdio = args.stdio;
    let result = monitor_svc::run(listen, opts, shutdown).await;
    if stdio {
        // Reading stdin blocks a thread the runtime would wait for at exit
        // while the pipe stays open (a caller that never closes it): leave
        // without waiting.
        if let Err(e) = &result {
            eprintln!("Error: {e:#}");
        }
        std::process::exit(i32::from(result.is_err()));
    }
    result
}

/// With --stdio, the first line on stdout, before any HTTP/2 byte: the
/// caller learns that the monitor started (and where it listens) or, when
/// the stream ends first, reads why not on stderr.
fn hello(line: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout();
    out.write_all(format!("{line}\n").as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// The token a listening monitor requires: from --token-file, or made in
/// the default place.
fn token(args: &Args) -> anyhow::Result<porthole::auth::Token> {
    Ok(match &args.token_file {
        Some(path) => {
            let token = porthole::auth::Token::from_file(path)?;
            tracing::info!(token_file = %path.display(), "using the bearer token in the token file");
            token
        }
        None => {
            let path = default_token_path()?;
            let (token, created) = porthole::auth::Token::load_or_create(&path)
                .with_context(|| "pass --token-file to keep the token elsewhere")?;
            tracing::info!(
                token_file = %path.display(),
                created,
                "bearer token for Relay and full access is in the token file"
            );
            token
        }
    })
}

/// Pids of other processes running `exe` (also when the file has since
/// been replaced or removed).
fn same_executable(exe: &std::path::Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let deleted = format!("{} (deleted)", exe.display());
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|link| link == exe || link.as_os_str() == deleted.as_str())
        })
        .collect()
}

/// The first line on stdin, as the token (--stdio-listen). Read a byte at
/// a time, so nothing after it is taken from the stream that follows.
async fn token_from_stdin() -> anyhow::Result<porthole::auth::Token> {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut line = Vec::with_capacity(80);
    loop {
        let byte = stdin.read_u8().await.context("no token on stdin")?;
        if byte == b'\n' {
            break;
        }
        anyhow::ensure!(line.len() < 1024, "the token line on stdin is too long");
        line.push(byte);
    }
    let secret = String::from_utf8(line).context("the token on stdin is not text")?;
    Ok(porthole::auth::Token::new(secret.trim())?)
}

/// Where the token lives when --token-file is not given.
fn default_token_path() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("porthole/monitor.token"));
    }
    if rustix::process::geteuid().is_root() {
        return Ok(PathBuf::from("/run/porthole/monitor.token"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither XDG_RUNTIME_DIR nor HOME is set: pass --token-file")?;
    Ok(PathBuf::from(home).join(".local/state/porthole/monitor.token"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn flags_are_consistent() {
        use clap::CommandFactory;
        super::Args::command().debug_assert();
    }
}
