#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use monitor_svc::scan::Source;
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
    /// How often to scan for listening sockets (e.g. 100ms, 2s).
    /// Default: 100ms with netlink, 1s with the /proc/net fallback.
    #[arg(long, env = "PORTHOLE_INTERVAL", value_parser = porthole::time::parse_duration)]
    interval: Option<Duration>,
    /// Events kept for ListEvents, resumes and /port-events.
    #[arg(long, env = "PORTHOLE_BUFFER_SIZE", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    buffer_size: u32,
    /// File holding a bearer token that every gRPC and HTTP request must carry.
    #[arg(long, env = "PORTHOLE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Where to read sockets from: auto (netlink, else /proc/net), netlink, procfs.
    #[arg(long, env = "PORTHOLE_SOURCE", value_enum, default_value_t = SourceArg::Auto)]
    source: SourceArg,
    /// Log level or tracing filter (error, warn, info, debug, trace).
    #[arg(long, env = "PORTHOLE_LOG", default_value = "info")]
    log_level: String,
    /// Log format: text or json.
    #[arg(long, env = "PORTHOLE_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SourceArg {
    Auto,
    Netlink,
    Procfs,
}

// One thread: the monitor is a small sidecar (the detector has a thread of
// its own), and relaying on one thread saves cross-thread wake-ups.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    porthole::telemetry::init(&args.log_level, args.log_format).map_err(anyhow::Error::msg)?;
    let token = args
        .token_file
        .as_deref()
        .map(porthole::auth::Token::from_file)
        .transpose()?;
    let shutdown = porthole::shutdown::on_signal()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let opts = monitor_svc::Options {
        interval: args.interval,
        buffer_size: args.buffer_size as usize,
        source: match args.source {
            SourceArg::Auto => None,
            SourceArg::Netlink => Some(Source::Netlink),
            SourceArg::Procfs => Some(Source::Procfs),
        },
        token,
    };
    monitor_svc::run(listener, opts, shutdown).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn flags_are_consistent() {
        use clap::CommandFactory;
        super::Args::command().debug_assert();
    }
}
