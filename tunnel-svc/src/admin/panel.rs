//! The ports panel: a page on the admin address (`GET /`), live from the
//! reconciler's tunnel events over server-sent events (`GET /api/events`),
//! with close, open and probe (`POST /api/close`, `/api/open`,
//! `/api/probe`) through the admin API's own handlers.
//!
//! Safe by default: every request must name a loopback host (or the admin
//! address itself) in `Host`, so a DNS-rebound name cannot reach it; a
//! request that changes something must come from the panel's own origin
//! (`Origin`), so another site cannot make the browser send it; and with
//! an admin token, the browser needs a cookie that only a one-time URL
//! from `tunnel-svc ui` (a signature of the token, good for a minute and
//! once) sets, or the token itself as `Bearer`.

use super::Admin;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use futures_util::{Stream, StreamExt};
use porthole::pb::v1::tunnel_admin_server::TunnelAdmin;
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;

/// The page: HTML, CSS and script in one file, in the binary.
const PAGE: &str = include_str!("page.html");

/// The cookie the one-time URL sets.
const COOKIE: &str = "porthole_panel";
/// What the cookie's value is derived for (see `Token::derived`).
const SESSION: &str = "panel-session";
/// What `tunnel-svc ui`'s one-time URL signs.
pub const LOGIN: &str = "/login";

/// How often the page gets every target and every tunnel's counters.
const STATS_EVERY: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Panel {
    admin: Admin,
    /// Where the admin API listens: its address is a Host the panel takes.
    listen: SocketAddr,
    /// tunnel-svc is stopping: event streams end (rather than hold the
    /// server's shutdown for its grace).
    stopping: tokio_util::sync::CancellationToken,
}

/// The panel's routes, for the admin server's router.
pub fn router(
    admin: Admin,
    listen: SocketAddr,
    stopping: tokio_util::sync::CancellationToken,
) -> axum::Router {
    let panel = Panel {
        admin,
        listen,
        stopping,
    };
    axum::Router::new()
        .route("/", get(page))
        .route(LOGIN, get(login))
        .route("/api/events", get(events))
        .route("/api/close", post(close))
        .route("/api/open", post(open))
        .route("/api/probe", post(probe))
        .layer(axum::middleware::from_fn_with_state(panel.clone(), guard))
        .with_state(panel)
}

/// The paths the panel answers itself (it checks its callers; see
/// [`guard`]), for the admin server's token policy.
pub fn is_panel(path: &str) -> bool {
    matches!(path, "/" | LOGIN) || path.starts_with("/api/")
}

/// The URL `tunnel-svc ui` prints: `/login` with a one-time signature.
pub fn login_url(admin: SocketAddr, token: Option<&porthole::auth::Token>) -> String {
    let host = match admin.ip() {
        ip if ip.is_unspecified() || ip.is_loopback() => "127.0.0.1".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let base = format!("http://{host}:{}", admin.port());
    match token {
        Some(t) => format!("{base}{LOGIN}?ticket={}", t.signed(LOGIN)),
        None => format!("{base}/"),
    }
}

/// Refuses requests whose `Host` is not this machine's loopback or the
/// admin address (DNS rebinding), state changes from another origin (CSRF),
/// and, with a token, callers with neither the cookie nor the token.
async fn guard(State(p): State<Panel>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    if !host_allowed(host, p.listen) {
        return refuse(
            StatusCode::FORBIDDEN,
            "this Host is not a loopback name or address (the panel answers only \
             http://localhost:PORT and the admin address)",
        );
    }
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD);
    if changes && !same_origin(headers, host) {
        return refuse(
            StatusCode::FORBIDDEN,
            "a request from another origin may not change tunnels",
        );
    }
    let login = req.uri().path() == LOGIN;
    if !login && !signed_in(&p, headers) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "not signed in: run `tunnel-svc ui` and open the URL it prints",
        );
    }
    next.run(req).await
}

fn refuse(status: StatusCode, why: &str) -> Response {
    let page = format!(
        "<!doctype html><meta charset=utf-8><title>porthole</title>\
         <p>{}</p>\n",
        why.replace('<', "&lt;")
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page,
    )
        .into_response()
}

/// `localhost`, `NAME.localhost`, a loopback address, or the admin
/// address, with or without a port.
fn host_allowed(host: &str, listen: SocketAddr) -> bool {
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    let name = match host.strip_prefix('[') {
        // `[::1]` or `[::1]:7071`.
        Some(rest) => match rest.split_once(']') {
            Some((ip, "")) => ip,
            Some((ip, port)) if port.strip_prefix(':').is_some_and(digits) => ip,
            _ => return false,
        },
        None => match host.split_once(':') {
            None => host,
            Some((name, port)) if digits(port) => name,
            // A bare IPv6 address is not a Host.
            Some(_) => return false,
        },
    };
    let lower = name.to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") {
        return true;
    }
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback() || (ip == listen.ip() && !ip.is_unspecified()),
        Err(_) => false,
    }
}

/// Whether a state-changing request comes from the panel itself: its
/// `Origin` is `http://HOST` (a browser always sends one on `fetch` POSTs;
/// a missing one is a client that is not a browser, and must hold the
/// cookie or token anyway).
fn same_origin(headers: &HeaderMap, host: &str) -> bool {
    match headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        None => headers
            .get("sec-fetch-site")
            .is_none_or(|s| s.as_bytes() != b"cross-site"),
        Some(origin) => origin == format!("http://{host}"),
    }
}

fn signed_in(p: &Panel, headers: &HeaderMap) -> bool {
    let Some(token) = p.admin.token() else {
        return true;
    };
    let bearer = headers.get(header::AUTHORIZATION);
    if bearer.is_some() && token.accepts(bearer) {
        return true;
    }
    cookie(headers, COOKIE).is_some_and(|v| token.is_derived(SESSION, v))
}

/// The value of cookie `name`, if the request has it.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            // The page's own script and styles only; nothing may frame it.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        PAGE,
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct Ticket {
    ticket: String,
}

/// The one-time URL: a signature of the token for [`LOGIN`], made within
/// the last minute and not used before, gets the session cookie.
async fn login(State(p): State<Panel>, Query(t): Query<Ticket>) -> Response {
    let Some(token) = p.admin.token() else {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    };
    if !token.verifies(LOGIN, &t.ticket) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "this link is used or too old: run `tunnel-svc ui` for a new one",
        );
    }
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        token.derived(SESSION)
    );
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_string()),
            (header::SET_COOKIE, cookie),
        ],
    )
        .into_response()
}

/// Server-sent events: `snapshot` (every target and tunnel) first, then
/// `tunnel` for each change as the reconciler publishes it, and `stats`
/// (targets, every tunnel) every [`STATS_EVERY`] for the counters.
async fn events(State(p): State<Panel>) -> Response {
    let subscription = match p.admin.reconciler().watch().await {
        Ok(s) => s,
        Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let snapshot = match everything(&p).await {
        Ok(v) => v,
        Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, &e),
    };
    let first = futures_util::stream::once(async move { event("snapshot", &snapshot) });
    let changes = subscription.filter_map(|item| async move {
        let e = item.ok()?;
        let t = super::tunnel(e.tunnel.clone());
        Some(event(
            "tunnel",
            &json!({"tunnel": crate::json::tunnel(&t), "removed": e.removed}),
        ))
    });
    let stats = stats(p.clone());
    let stopping = p.stopping.clone().cancelled_owned();
    let stream = first
        .chain(futures_util::stream::select(changes, stats))
        .take_until(stopping);
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn stats(p: Panel) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval_at(
        tokio::time::Instant::now() + STATS_EVERY,
        STATS_EVERY,
    ));
    ticks.filter_map(move |_| {
        let p = p.clone();
        async move { everything(&p).await.ok().map(|v| event("stats", &v)) }
    })
}

/// Every target and every tunnel, in protobuf's JSON mapping.
async fn everything(p: &Panel) -> Result<serde_json::Value, String> {
    let h = p.admin.reconciler();
    let targets = h.targets().await.map_err(|e| e.to_string())?;
    let tunnels = h.tunnels(None).await.map_err(|e| e.to_string())?;
    let targets: Vec<_> = targets
        .into_iter()
        .map(|t| crate::json::target(&super::target(t)))
        .collect();
    let tunnels: Vec<_> = tunnels
        .into_iter()
        .map(|t| crate::json::tunnel(&super::tunnel(t)))
        .collect();
    Ok(json!({"targets": targets, "tunnels": tunnels}))
}

fn event(name: &str, data: &serde_json::Value) -> Result<Event, std::convert::Infallible> {
    Ok(Event::default().event(name).data(data.to_string()))
}

#[derive(serde::Deserialize)]
struct CloseBody {
    id: String,
}

async fn close(State(p): State<Panel>, Json(b): Json<CloseBody>) -> Response {
    let req = tonic::Request::new(porthole::pb::v1::CloseTunnelRequest { id: b.id });
    answer(
        p.admin
            .close_tunnel(req)
            .await
            .map(|r| r.into_inner().tunnel),
    )
}

/// Whether a connection through tunnel `id` reaches its server now (the
/// ProbeTunnel call `wait` makes): what "tell me when ready" asks once the
/// tunnel is active, since an active tunnel of a port nothing listens on
/// yet (a dev container's `forwardPorts`) is not ready.
async fn probe(State(p): State<Panel>, Json(b): Json<CloseBody>) -> Response {
    let req = tonic::Request::new(porthole::pb::v1::ProbeTunnelRequest { id: b.id });
    match p.admin.probe_tunnel(req).await {
        Ok(r) => {
            let r = r.into_inner();
            Json(json!({"reachable": r.reachable, "error": r.error})).into_response()
        }
        Err(s) => answer(Err(s)),
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct OpenBody {
    #[serde(default)]
    target: String,
    port: u32,
    #[serde(default)]
    host_port: u32,
    #[serde(default)]
    protocol: String,
}

async fn open(State(p): State<Panel>, Json(b): Json<OpenBody>) -> Response {
    use porthole::pb::v1::Protocol;
    let protocol = match b.protocol.as_str() {
        "" | "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => {
            let e = tonic::Status::invalid_argument(format!("protocol {other:?}: tcp or udp"));
            return answer(Err(e));
        }
    };
    let req = tonic::Request::new(porthole::pb::v1::OpenTunnelRequest {
        target: b.target,
        container_port: b.port,
        host_port: b.host_port,
        protocol: protocol as i32,
    });
    answer(
        p.admin
            .open_tunnel(req)
            .await
            .map(|r| r.into_inner().tunnel),
    )
}

/// The tunnel, or the admin API's refusal with its reason.
fn answer(result: Result<Option<porthole::pb::v1::Tunnel>, tonic::Status>) -> Response {
    match result {
        Ok(t) => Json(json!({
            "tunnel": t.as_ref().map_or(serde_json::Value::Null, crate::json::tunnel)
        }))
        .into_response(),
        Err(s) => {
            let status = match s.code() {
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            (status, Json(json!({"error": s.message()}))).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_and_the_admin_address() {
        let at: SocketAddr = "127.0.0.1:7071".parse().unwrap();
        for ok in [
            "localhost",
            "localhost:7071",
            "LOCALHOST:7071",
            "web.localhost:7071",
            "127.0.0.1:7071",
            "127.1.2.3",
            "[::1]:7071",
            "[::1]",
        ] {
            assert!(host_allowed(ok, at), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:7071",
            "localhost.evil.example",
            "198.18.0.1:7071",
            "",
            "[::1",
            "0.0.0.0:7071",
        ] {
            assert!(!host_allowed(bad, at), "{bad}");
        }
        let lan: SocketAddr = "198.18.0.1:7071".parse().unwrap();
        assert!(
            host_allowed("198.18.0.1:7071", lan),
            "the admin address itself"
        );
        let any: SocketAddr = "0.0.0.0:7071".parse().unwrap();
        assert!(!host_allowed("0.0.0.0:7071", any));
    }

    #[test]
    fn state_changes_only_from_the_panels_origin() {
        let with = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(
                    header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let host = "127.0.0.1:7071";
        assert!(same_origin(
            &with(&[("origin", "http://127.0.0.1:7071")]),
            host
        ));
        assert!(!same_origin(
            &with(&[("origin", "http://evil.example")]),
            host
        ));
        assert!(!same_origin(&with(&[("origin", "null")]), host));
        assert!(same_origin(&with(&[]), host), "not a browser");
        assert!(!same_origin(
            &with(&[("sec-fetch-site", "cross-site")]),
            host
        ));
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; porthole_panel=abc; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
