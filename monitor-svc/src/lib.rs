//! monitor-svc: runs inside a container, notices every port that starts or
//! stops listening, and serves those events over gRPC (`PortEvents`,
//! `Relay`) and the legacy `GET /port-events` JSON endpoint, all on one port.
#![forbid(unsafe_code)]

pub mod detect;
pub mod grpc;
pub mod http;
pub mod log;
pub mod metrics;
pub mod monitor;
pub mod process;
pub mod relay;
pub mod scan;

use porthole::pb::v1::port_events_server::{PortEventsServer, SERVICE_NAME as PORT_EVENTS};
use porthole::pb::v1::relay_server::{RelayServer, SERVICE_NAME as RELAY};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct Options {
    /// Scan period; `None`: 100 ms with netlink, 1 s with the far costlier
    /// /proc/net fallback.
    pub interval: Option<Duration>,
    pub buffer_size: usize,
    /// `None`: netlink, falling back to /proc/net.
    pub source: Option<scan::Source>,
    pub token: Option<porthole::auth::Token>,
}

/// Runs the monitor on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    opts: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
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
    };
    let (handle, task) = monitor::spawn(detect::Detector::new(scanner), config, shutdown.clone())?;
    tracing::info!(
        addr = %listener.local_addr()?,
        instance_id = %handle.instance_id,
        interval = ?interval,
        buffer = opts.buffer_size,
        "monitor-svc listening"
    );
    let app = porthole::server::App {
        grpc: tonic::service::Routes::new(PortEventsServer::new(grpc::PortEventsService::new(
            handle.clone(),
        )))
        .add_service(RelayServer::new(relay::RelayService::new(
            handle.clone(),
            shutdown.clone(),
        ))),
        grpc_names: vec![PORT_EVENTS, RELAY],
        http: http::router(handle),
        token: opts.token,
    };
    let served = porthole::server::serve(listener, app, shutdown.clone()).await;
    shutdown.cancel();
    task.await?;
    served?;
    Ok(())
}
