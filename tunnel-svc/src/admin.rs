//! `porthole.v1.TunnelAdmin` over gRPC, plus `/healthz` and `/metrics` on
//! the same port.

use crate::reconcile::Command;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use porthole::pb::v1::{
    tunnel_admin_server::TunnelAdmin, CloseTunnelRequest, CloseTunnelResponse, ListTargetsRequest,
    ListTargetsResponse, ListTunnelsRequest, ListTunnelsResponse, OpenTunnelRequest,
    OpenTunnelResponse, Protocol, Tunnel, TunnelState, TunnelUpdate, WatchTunnelsRequest,
};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response as GrpcResponse, Status};

/// Longest id or target name taken from a request; anything longer cannot
/// name a tunnel and is refused without being echoed whole.
const MAX_ID: usize = 512;

#[derive(Clone)]
pub struct Admin {
    commands: mpsc::Sender<Command>,
}

impl Admin {
    pub fn new(commands: mpsc::Sender<Command>) -> Admin {
        Admin { commands }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Status> {
        let (reply, rx) = oneshot::channel();
        let stopping = || Status::unavailable("tunnel-svc is shutting down");
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())
    }

    pub async fn list(&self, target: Option<String>) -> Result<Vec<Tunnel>, Status> {
        self.ask(|reply| Command::List { target, reply }).await
    }

    pub async fn targets(&self) -> Result<Vec<crate::reconcile::TargetView>, Status> {
        self.ask(|reply| Command::Targets { reply }).await
    }
}

#[tonic::async_trait]
impl TunnelAdmin for Admin {
    async fn list_tunnels(
        &self,
        req: Request<ListTunnelsRequest>,
    ) -> Result<GrpcResponse<ListTunnelsResponse>, Status> {
        let target = Some(req.into_inner().target).filter(|t| !t.is_empty());
        let tunnels = self.list(target).await?;
        Ok(GrpcResponse::new(ListTunnelsResponse { tunnels }))
    }

    async fn close_tunnel(
        &self,
        req: Request<CloseTunnelRequest>,
    ) -> Result<GrpcResponse<CloseTunnelResponse>, Status> {
        let id = req.into_inner().id;
        if id.len() > MAX_ID {
            return Err(Status::invalid_argument(format!(
                "id {:?} is too long to be a tunnel id",
                porthole::text::clip(&id, 64)
            )));
        }
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "id is required, e.g. default:tcp:8080",
            ));
        }
        let tunnel = self.ask(|reply| Command::Close { id, reply }).await??;
        Ok(GrpcResponse::new(CloseTunnelResponse {
            tunnel: Some(tunnel),
        }))
    }

    async fn open_tunnel(
        &self,
        req: Request<OpenTunnelRequest>,
    ) -> Result<GrpcResponse<OpenTunnelResponse>, Status> {
        let OpenTunnelRequest {
            target,
            container_port,
            host_port,
            protocol,
        } = req.into_inner();
        if target.len() > MAX_ID {
            return Err(Status::invalid_argument(format!(
                "target {:?} is too long to be a target name",
                porthole::text::clip(&target, 64)
            )));
        }
        if !matches!(
            Protocol::try_from(protocol),
            Ok(Protocol::Tcp | Protocol::Unspecified)
        ) {
            return Err(Status::invalid_argument("only TCP ports can be forwarded"));
        }
        let tunnel = self
            .ask(|reply| Command::Open {
                target,
                container_port,
                host_port,
                reply,
            })
            .await??;
        Ok(GrpcResponse::new(OpenTunnelResponse {
            tunnel: Some(tunnel),
        }))
    }

    async fn list_targets(
        &self,
        _: Request<ListTargetsRequest>,
    ) -> Result<GrpcResponse<ListTargetsResponse>, Status> {
        let targets = self.targets().await?.iter().map(|t| t.to_proto()).collect();
        Ok(GrpcResponse::new(ListTargetsResponse { targets }))
    }

    type WatchTunnelsStream =
        std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<TunnelUpdate, Status>> + Send>>;

    async fn watch_tunnels(
        &self,
        _: Request<WatchTunnelsRequest>,
    ) -> Result<GrpcResponse<Self::WatchTunnelsStream>, Status> {
        use futures_util::StreamExt;
        let subscription = self.ask(|reply| Command::Watch { reply }).await??;
        let stream = subscription.map(|item| item.map(std::sync::Arc::unwrap_or_clone));
        Ok(GrpcResponse::new(Box::pin(stream)))
    }
}

/// `(labels, value)` rows as [`porthole::prometheus::family`] takes them.
fn samples(rows: &[(String, String)]) -> Vec<(&str, String)> {
    rows.iter().map(|(l, v)| (l.as_str(), v.clone())).collect()
}

/// Serves the TunnelAdmin API, `/healthz` and `/metrics` on `listener`
/// until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    commands: mpsc::Sender<Command>,
    token: Option<porthole::auth::Token>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), porthole::server::ServeError> {
    use porthole::pb::v1::tunnel_admin_server::{TunnelAdminServer, SERVICE_NAME};
    let admin = Admin::new(commands);
    let app = porthole::server::App {
        grpc: tonic::service::Routes::new(TunnelAdminServer::new(admin.clone())),
        grpc_names: vec![SERVICE_NAME],
        http: http_router(admin),
        policy: porthole::auth::Policy {
            token,
            public: |path| path == "/healthz",
        },
        limits: porthole::server::Limits::default(),
        stats: Default::default(),
    };
    porthole::server::serve(listener, app, shutdown).await
}

fn http_router(admin: Admin) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(admin)
}

async fn metrics(State(admin): State<Admin>) -> Response {
    let tunnels = match admin.list(None).await {
        Ok(t) => t,
        Err(e) => {
            return (StatusCode::SERVICE_UNAVAILABLE, e.message().to_string()).into_response()
        }
    };
    let mut out = String::new();
    let mut counts = std::collections::BTreeMap::new();
    for t in &tunnels {
        let state = TunnelState::try_from(t.state)
            .unwrap_or_default()
            .as_str_name();
        *counts.entry((t.target.as_str(), state)).or_insert(0u64) += 1;
    }
    let by_state: Vec<(String, String)> = counts
        .into_iter()
        .map(|((target, state), n)| {
            (
                format!("{{target=\"{target}\",state=\"{state}\"}}"),
                n.to_string(),
            )
        })
        .collect();
    porthole::prometheus::family(
        &mut out,
        "porthole_tunnels",
        "gauge",
        "Tunnels by target and state.",
        &samples(&by_state),
    );
    type Counter = (&'static str, &'static str, &'static str, fn(&Tunnel) -> u64);
    let per_tunnel: [Counter; 4] = [
        (
            "porthole_tunnel_active_connections",
            "gauge",
            "Connections open now.",
            |t| t.active_connections,
        ),
        (
            "porthole_tunnel_connections_total",
            "counter",
            "Connections accepted.",
            |t| t.total_connections,
        ),
        (
            "porthole_tunnel_bytes_in_total",
            "counter",
            "Bytes from host clients to the container.",
            |t| t.bytes_in,
        ),
        (
            "porthole_tunnel_bytes_out_total",
            "counter",
            "Bytes from the container to host clients.",
            |t| t.bytes_out,
        ),
    ];
    for (name, kind, help, get) in per_tunnel {
        let rows: Vec<(String, String)> = tunnels
            .iter()
            .map(|t| (format!("{{id=\"{}\"}}", t.id), get(t).to_string()))
            .collect();
        porthole::prometheus::family(&mut out, name, kind, help, &samples(&rows));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
