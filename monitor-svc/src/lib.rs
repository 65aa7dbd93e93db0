//! monitor-svc: runs inside a container, notices every port that starts or
//! stops listening, and serves those events over gRPC (`PortEvents`,
//! `Relay`) and the legacy `GET /port-events` JSON endpoint, all on one port.
#![deny(unsafe_code)]

pub mod detect;
pub mod grpc;
pub mod http;
pub mod log;
pub mod metrics;
pub mod monitor;
pub mod process;
pub mod relay;
pub mod scan;
pub mod user;

use porthole::pb::v1::port_events_server::{PortEventsServer, SERVICE_NAME as PORT_EVENTS};
use porthole::pb::v1::relay_server::{RelayServer, SERVICE_NAME as RELAY};
use porthole::server::Listen;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What callers without the token get.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Anonymous {
    /// The read-only legacy surface: `/port-events`, `PortEvents`, health,
    /// reflection and `/metrics`, without command lines.
    #[default]
    ReadOnly,
    /// Nothing but `/healthz`.
    None,
}

impl Anonymous {
    fn public(self) -> fn(&str) -> bool {
        match self {
            Anonymous::ReadOnly => read_only_path,
            Anonymous::None => |path| path == "/healthz",
        }
    }
}

/// The paths served without the token by default. Never `Relay`.
fn read_only_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/metrics" | "/port-events")
        || [
            "/porthole.v1.PortEvents/",
            "/grpc.health.v1.Health/",
            "/grpc.reflection.v1.ServerReflection/",
            "/grpc.reflection.v1alpha.ServerReflection/",
        ]
        .iter()
        .any(|prefix| path.starts_with(prefix))
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Scan period; `None`: 100 ms with netlink, 1 s with the far costlier
    /// /proc/net fallback.
    pub interval: Option<Duration>,
    pub buffer_size: usize,
    /// `None`: netlink, falling back to /proc/net.
    pub source: Option<scan::Source>,
    /// Required for `Relay` and for everything else callers without it
    /// cannot have; `None` only when serving the one peer on stdio.
    pub token: Option<porthole::auth::Token>,
    pub anonymous: Anonymous,
    pub limits: porthole::server::Limits,
    /// WatchEvents streams at once.
    pub max_subscribers: usize,
}

/// Runs the monitor on `listen` until `shutdown` is cancelled (or, on
/// stdio, until its peer goes).
pub async fn run(listen: Listen, opts: Options, shutdown: CancellationToken) -> anyhow::Result<()> {
    let scanner = match opts.source {
        None => scan::Scanner::auto(),
        Some(src) => scan::Scanner::with_source(src)?,
    };
    let interval = opts.interval.unwrap_or(match scanner.source() {
        scan::Source::Netlink => Duration::from_millis(100),
        scan::Source::Procfs => Duration::from_secs(1),
    });
    let config = monitor::Config {
        interval,
        buffer_size: opts.buffer_size,
        max_subscribers: opts.max_subscribers,
    };
    let (handle, task) = monitor::spawn(detect::Detector::new(scanner), config, shutdown.clone())?;
    let addr = match &listen {
        Listen::Tcp(l) => l.local_addr()?.to_string(),
        Listen::Stdio => "stdio".to_string(),
        Listen::StdioAndTcp(l) => format!("stdio and {}", l.local_addr()?),
    };
    tracing::info!(
        %addr,
        instance_id = %handle.instance_id,
        interval = ?interval,
        buffer = opts.buffer_size,
        anonymous = ?opts.anonymous,
        "monitor-svc listening"
    );
    let stats = Arc::new(porthole::server::ServerStats::default());
    let http_stats = stats.clone();
    let raw_token = opts.token.clone();
    let app = porthole::server::App {
        grpc: tonic::service::Routes::new(PortEventsServer::new(grpc::PortEventsService::new(
            handle.clone(),
        )))
        .add_service(RelayServer::new(relay::RelayService::new(
            handle.clone(),
            shutdown.clone(),
        ))),
        grpc_names: vec![PORT_EVENTS, RELAY],
        http: http::router(handle.clone(), http_stats),
        policy: porthole::auth::Policy {
            token: opts.token.clone(),
            public: opts.anonymous.public(),
        },
        limits: opts.limits,
        stats: stats.clone(),
        raw: Some({
            let (handle, token, shutdown) = (handle.clone(), raw_token, shutdown.clone());
            let relays = Arc::new(tokio::sync::Semaphore::new(relay::MAX_RAW_RELAYS));
            Arc::new(move |stream, slot| {
                let relay = relay::raw(
                    handle.clone(),
                    token.clone(),
                    relays.clone(),
                    shutdown.clone(),
                    (stream, slot),
                );
                Box::pin(relay)
            })
        }),
    };
    tokio::spawn(trim_after_clients_leave(
        stats.clone(),
        handle.metrics.clone(),
        shutdown.clone(),
    ));
    let served = porthole::server::serve(listen, app, shutdown.clone()).await;
    shutdown.cancel();
    task.await?;
    served?;
    Ok(())
}

/// How often the monitor looks whether clients left.
const TRIM_CHECK: Duration = Duration::from_secs(2);

/// Hands memory back to the kernel once clients have gone (fewer
/// connections or subscribers than at the last look), so a burst of
/// clients does not leave the monitor at its peak RSS.
async fn trim_after_clients_leave(
    server: Arc<porthole::server::ServerStats>,
    metrics: Arc<metrics::Metrics>,
    shutdown: CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let count = || {
        (
            server.connections.load(Relaxed) + metrics.relays_active.load(Relaxed),
            metrics.subscribers.load(Relaxed),
        )
    };
    let mut last = count();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TRIM_CHECK) => {}
        }
        let now = count();
        if now.0 < last.0 || now.1 < last.1 {
            porthole::memory::release_free_memory();
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_is_never_anonymous() {
        for policy in [Anonymous::ReadOnly, Anonymous::None] {
            let public = policy.public();
            assert!(public("/healthz"));
            assert!(!public("/porthole.v1.Relay/Dial"), "{policy:?}");
            assert!(!public("/porthole.v1.Relayx/Dial"), "{policy:?}");
        }
        let read_only = Anonymous::ReadOnly.public();
        assert!(read_only("/port-events"));
        assert!(read_only("/porthole.v1.PortEvents/WatchEvents"));
        assert!(read_only(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!read_only("/port-events/../porthole.v1.Relay/Dial"));
        let none = Anonymous::None.public();
        assert!(!none("/port-events") && !none("/metrics"));
        assert!(!none("/porthole.v1.PortEvents/ListPorts"));
    }
}
