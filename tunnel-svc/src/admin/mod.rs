//! `porthole.v1.TunnelAdmin` over gRPC, plus `/healthz` and `/metrics` on
//! the same port.

pub mod panel;

use crate::model::{Origin, Proto, State as TunnelState, TargetView, TunnelView};
use crate::reconcile::{self, AdminError, Handle};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use porthole::pb::v1::{
    self as pb, tunnel_admin_server::TunnelAdmin, CloseTunnelRequest, CloseTunnelResponse,
    ListTargetsRequest, ListTargetsResponse, ListTunnelsRequest, ListTunnelsResponse,
    OpenTunnelRequest, OpenTunnelResponse, Protocol, TunnelUpdate, WatchTunnelsRequest,
};
use tonic::{Request, Response as GrpcResponse, Status};

/// Most tunnels in one ListTunnels answer.
const MAX_PAGE: usize = 1000;

/// A ListTunnels answer stops short of this many bytes (a message may be
/// 4 MiB).
const MAX_PAGE_BYTES: usize = 1 << 20;

/// Longest id or target name taken from a request; anything longer cannot
/// name a tunnel and is refused without being echoed whole.
const MAX_ID: usize = 512;

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Status {
        match e {
            AdminError::NotFound(_) => Status::not_found(e.to_string()),
            AdminError::Invalid(_) => Status::invalid_argument(e.to_string()),
            AdminError::Precondition(_) => Status::failed_precondition(e.to_string()),
            AdminError::Full(full) => full.into(),
            AdminError::Stopping => Status::unavailable(e.to_string()),
        }
    }
}

fn backend(kind: crate::config::BackendKind) -> pb::Backend {
    use crate::config::BackendKind;
    match kind {
        BackendKind::Grpc => pb::Backend::Grpc,
        BackendKind::Direct => pb::Backend::Direct,
        BackendKind::Ssh => pb::Backend::Ssh,
    }
}

/// A tunnel on the wire. `error` holds why it failed, else why its latest
/// connection did; a capped tunnel is PENDING with a note.
pub fn tunnel(t: TunnelView) -> pb::Tunnel {
    let url = url_of(&t);
    let (state, failed) = match t.state {
        TunnelState::Pending | TunnelState::Capped => (pb::TunnelState::Pending, None),
        TunnelState::Active => (pb::TunnelState::Active, None),
        TunnelState::Failed(why) => (pb::TunnelState::Failed, Some(why.to_string())),
        TunnelState::Closed => (pb::TunnelState::Closed, None),
        TunnelState::Published(_) => (pb::TunnelState::Published, None),
    };
    let origin = match t.origin {
        Origin::Auto => pb::Origin::Auto,
        Origin::Manual => pb::Origin::Manual,
        Origin::Egress => pb::Origin::Egress,
    };
    pb::Tunnel {
        id: t.id.to_string(),
        target: t.id.target,
        protocol: t.id.proto.to_pb() as i32,
        container_port: u32::from(t.id.port),
        host_port: u32::from(t.host_port),
        host_addresses: t.host_addresses.iter().map(|a| a.to_string()).collect(),
        state: state as i32,
        backend: backend(t.backend) as i32,
        origin: origin as i32,
        error: failed
            .or_else(|| t.failing.as_ref().map(|f| f.why.clone()))
            .unwrap_or_default(),
        consecutive_failures: t.failing.as_ref().map_or(0, |f| f.count),
        failing_since: t
            .failing
            .as_ref()
            .map(|f| porthole::time::to_proto(f.since)),
        opened_at: t.opened_at.map(porthole::time::to_proto),
        process: t.process,
        active_connections: t.counters.active,
        total_connections: t.counters.total,
        bytes_in: t.counters.bytes_in,
        bytes_out: t.counters.bytes_out,
        datagrams_in: t.counters.datagrams_in,
        datagrams_out: t.counters.datagrams_out,
        datagrams_dropped: t.counters.datagrams_dropped,
        note: t.note.unwrap_or_default(),
        label: t.label.unwrap_or_default(),
        settings_from: t.settings.from.map(|f| f.short()).unwrap_or_default(),
        url,
        usable_after_ms: t.usable_after.map_or(0, |d| d.as_millis().max(1) as u64),
    }
}

/// `SCHEME://HOST:PORT` of a tunnel whose settings give its scheme, with
/// `localhost` for the loopback addresses.
fn url_of(t: &TunnelView) -> String {
    t.settings.scheme.and_then(|s| t.url(s)).unwrap_or_default()
}

pub fn target(t: TargetView) -> pb::Target {
    pb::Target {
        name: t.name,
        url: t.url,
        backend: backend(t.backend) as i32,
        connected: t.connected,
        instance_id: t.instance_id,
        error: t.error.unwrap_or_default(),
        since: Some(porthole::time::to_proto(t.since)),
    }
}

/// Takes a port number from a request: 1..65535.
fn port(field: &str, n: u32) -> Result<u16, Status> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Status::invalid_argument(format!("{field} {n} is not in 1..65535")))
}

#[derive(Clone)]
pub struct Admin {
    reconciler: Handle,
    token: Option<porthole::auth::Token>,
}

impl Admin {
    pub fn new(reconciler: Handle, token: Option<porthole::auth::Token>) -> Admin {
        Admin { reconciler, token }
    }

    /// The admin token, if the API needs one.
    pub fn token(&self) -> Option<&porthole::auth::Token> {
        self.token.as_ref()
    }

    pub fn reconciler(&self) -> &Handle {
        &self.reconciler
    }
}

/// What is served without the token: health, the schema (grpcurl's
/// `list` and `describe`) and `Prove`; nothing about tunnels. The panel's
/// paths check their callers themselves (a browser holds a cookie, not the
/// token).
fn public(path: &str) -> bool {
    panel::is_panel(path)
        || path == "/healthz"
        || path == "/porthole.v1.TunnelAdmin/Prove"
        || [
            "/grpc.health.v1.Health/",
            "/grpc.reflection.v1.ServerReflection/",
            "/grpc.reflection.v1alpha.ServerReflection/",
        ]
        .iter()
        .any(|prefix| path.starts_with(prefix))
}

#[tonic::async_trait]
impl TunnelAdmin for Admin {
    async fn list_tunnels(
        &self,
        req: Request<ListTunnelsRequest>,
    ) -> Result<GrpcResponse<ListTunnelsResponse>, Status> {
        use prost::Message;
        let req = req.into_inner();
        let after: Option<crate::model::TunnelId> = match req.page_token.as_str() {
            "" => None,
            token => Some(token.parse().map_err(|_| {
                Status::invalid_argument(format!(
                    "page_token {:?} is not a next_page_token",
                    porthole::text::clip(token, 64)
                ))
            })?),
        };
        let size = match req.page_size {
            0 => MAX_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let target = Some(req.target).filter(|t| !t.is_empty());
        let views = self.reconciler.tunnels(target).await?;
        let mut tunnels = Vec::new();
        let (mut bytes, mut next_page_token) = (0, String::new());
        for view in views
            .into_iter()
            .filter(|v| after.as_ref().is_none_or(|a| v.id > *a))
        {
            let t = tunnel(view);
            let len = t.encoded_len() + 8;
            if tunnels.len() == size || (!tunnels.is_empty() && bytes + len > MAX_PAGE_BYTES) {
                next_page_token = tunnels
                    .last()
                    .map(|t: &pb::Tunnel| t.id.clone())
                    .unwrap_or_default();
                break;
            }
            bytes += len;
            tunnels.push(t);
        }
        Ok(GrpcResponse::new(ListTunnelsResponse {
            tunnels,
            next_page_token,
        }))
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
        let closed = self.reconciler.close(reconcile::parse_id(&id)?).await?;
        Ok(GrpcResponse::new(CloseTunnelResponse {
            tunnel: Some(tunnel(closed)),
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
        let proto = match Protocol::try_from(protocol) {
            Ok(Protocol::Tcp | Protocol::Unspecified) => Proto::Tcp,
            Ok(Protocol::Udp) => Proto::Udp,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "protocol {protocol} is neither TCP nor UDP"
                )))
            }
        };
        let container_port = port("container_port", container_port)?;
        let host_port = match host_port {
            0 => None,
            h => Some(port("host_port", h)?),
        };
        let opened = self
            .reconciler
            .open(target, (proto, container_port), host_port)
            .await?;
        Ok(GrpcResponse::new(OpenTunnelResponse {
            tunnel: Some(tunnel(opened)),
        }))
    }

    async fn list_targets(
        &self,
        _: Request<ListTargetsRequest>,
    ) -> Result<GrpcResponse<ListTargetsResponse>, Status> {
        let targets = self.reconciler.targets().await?;
        let targets = targets.into_iter().map(target).collect();
        Ok(GrpcResponse::new(ListTargetsResponse { targets }))
    }

    async fn probe_tunnel(
        &self,
        req: Request<pb::ProbeTunnelRequest>,
    ) -> Result<GrpcResponse<pb::ProbeTunnelResponse>, Status> {
        let id = req.into_inner().id;
        if id.is_empty() || id.len() > MAX_ID {
            return Err(Status::invalid_argument(
                "id is required (at most 512 bytes), e.g. default:tcp:8080",
            ));
        }
        let (view, reached) = self.reconciler.probe(reconcile::parse_id(&id)?).await?;
        Ok(GrpcResponse::new(pb::ProbeTunnelResponse {
            tunnel: Some(tunnel(view)),
            reachable: reached.is_ok(),
            error: reached.err().unwrap_or_default(),
        }))
    }

    async fn prove(
        &self,
        req: Request<pb::ProveRequest>,
    ) -> Result<GrpcResponse<pb::ProveResponse>, Status> {
        let nonce = req.into_inner().nonce;
        if !(16..=64).contains(&nonce.len()) {
            return Err(Status::invalid_argument(format!(
                "nonce is {} bytes; send 16 to 64 random bytes",
                nonce.len()
            )));
        }
        let Some(token) = &self.token else {
            return Err(Status::failed_precondition(
                "this tunnel-svc has no admin token: its admin API is open to every local user",
            ));
        };
        Ok(GrpcResponse::new(pb::ProveResponse {
            proof: token.proof(&nonce).to_vec(),
        }))
    }

    type WatchTunnelsStream =
        std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<TunnelUpdate, Status>> + Send>>;

    async fn watch_tunnels(
        &self,
        _: Request<WatchTunnelsRequest>,
    ) -> Result<GrpcResponse<Self::WatchTunnelsStream>, Status> {
        use futures_util::StreamExt;
        let subscription = self.reconciler.watch().await?;
        let stream = subscription.map(|item| {
            item.map(|event| {
                let event = std::sync::Arc::unwrap_or_clone(event);
                TunnelUpdate {
                    tunnel: Some(tunnel(event.tunnel)),
                    removed: event.removed,
                }
            })
        });
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
    reconciler: Handle,
    token: Option<porthole::auth::Token>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), porthole::server::ServeError> {
    use porthole::pb::v1::tunnel_admin_server::{TunnelAdminServer, SERVICE_NAME};
    let admin = Admin::new(reconciler, token.clone());
    let listen = listener
        .local_addr()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let app = porthole::server::App {
        grpc: tonic::service::Routes::new(TunnelAdminServer::new(admin.clone())),
        grpc_names: vec![SERVICE_NAME],
        http: http_router(admin.clone()).merge(panel::router(admin, listen, shutdown.clone())),
        policy: porthole::auth::Policy { token, public },
        limits: porthole::server::Limits::default(),
        stats: Default::default(),
        raw: None,
    };
    porthole::server::serve(porthole::server::Listen::Tcp(listener), app, shutdown).await
}

fn http_router(admin: Admin) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(admin)
}

/// Name, kind, help and value of a metric family with a row per item.
type Family<T> = (&'static str, &'static str, &'static str, fn(&T) -> u64);

/// `families`, each with a row per item of `items` labelled by `label`.
fn render<T>(out: &mut String, items: &[T], label: impl Fn(&T) -> String, families: &[Family<T>]) {
    for (name, kind, help, get) in families {
        let rows: Vec<(String, String)> = items
            .iter()
            .map(|t| (label(t), get(t).to_string()))
            .collect();
        porthole::prometheus::family(out, name, kind, help, &samples(&rows));
    }
}

/// Each tunnel's counters, one family each.
const PER_TUNNEL: [Family<pb::Tunnel>; 8] = [
    (
        "porthole_tunnel_active_connections",
        "gauge",
        "Connections (UDP: flows) open now.",
        |t| t.active_connections,
    ),
    (
        "porthole_tunnel_connections_total",
        "counter",
        "Connections (UDP: flows) accepted.",
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
    (
        "porthole_tunnel_datagrams_in_total",
        "counter",
        "UDP datagrams from host clients to the container.",
        |t| t.datagrams_in,
    ),
    (
        "porthole_tunnel_datagrams_out_total",
        "counter",
        "UDP datagrams from the container to host clients.",
        |t| t.datagrams_out,
    ),
    (
        "porthole_tunnel_datagrams_dropped_total",
        "counter",
        "UDP datagrams from host clients no flow could take.",
        |t| t.datagrams_dropped,
    ),
    (
        "porthole_tunnel_consecutive_failures",
        "gauge",
        "Connections (UDP: flows) failed in a row; 0 while the tunnel is healthy.",
        |t| t.consecutive_failures,
    ),
];

/// Each target's counters.
const PER_TARGET: [Family<TargetView>; 2] = [
    (
        "porthole_target_ports",
        "gauge",
        "Ports open in the container now, forwarded or not.",
        |t| t.ports as u64,
    ),
    (
        "porthole_target_tunnel_changes_total",
        "counter",
        "Tunnels opened and removed (a container opening and closing ports fast shows here, not line by line in the log).",
        |t| t.changes,
    ),
];

async fn metrics(State(admin): State<Admin>) -> Response {
    let tunnels = match admin.reconciler.tunnels(None).await {
        Ok(t) => t.into_iter().map(tunnel).collect::<Vec<_>>(),
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    };
    let mut out = String::new();
    let mut counts = std::collections::BTreeMap::new();
    for t in &tunnels {
        let state = pb::TunnelState::try_from(t.state)
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
    render(
        &mut out,
        &tunnels,
        |t| format!("{{id=\"{}\"}}", t.id),
        &PER_TUNNEL,
    );
    let targets = admin.reconciler.targets().await.unwrap_or_default();
    render(
        &mut out,
        &targets,
        |t| format!("{{target=\"{}\"}}", t.name),
        &PER_TARGET,
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
