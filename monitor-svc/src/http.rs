//! Plain HTTP on the gRPC port: the legacy `GET /port-events` JSON shim,
//! `/healthz` and `/metrics`.

use crate::log::{Event, Since};
use crate::monitor::Handle;
use axum::extract::{Extension, Query, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use porthole::auth::Access;
use porthole::pb::v1::EventType;
use porthole::server::ServerStats;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// Bytes of `/port-events` bodies held at once, across all clients: a
/// client that never reads its response keeps the body alive, so without a
/// bound a few hundred of them hold the monitor's memory hostage. Past it,
/// requests get `503` with `Retry-After`.
pub const RESPONSE_BUDGET: usize = 8 << 20;

/// Chunks a body is sent in, so the budget is released as soon as the body
/// is done with (sent, or its connection gone).
const BODY_CHUNK: usize = 64 << 10;

#[derive(Clone)]
struct Shared {
    monitor: Handle,
    server: Arc<ServerStats>,
    /// Bytes of response bodies alive now.
    in_flight: Arc<AtomicUsize>,
}

pub fn router(monitor: Handle, server: Arc<ServerStats>) -> Router {
    Router::new()
        .route("/port-events", any(port_events))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(Shared {
            monitor,
            server,
            in_flight: Arc::default(),
        })
}

/// Holds `size` bytes of the budget until dropped.
struct Reserved {
    size: usize,
    in_flight: Arc<AtomicUsize>,
}

impl Reserved {
    fn take(in_flight: &Arc<AtomicUsize>, size: usize) -> Option<Reserved> {
        let mut now = in_flight.load(Relaxed);
        loop {
            // One body larger than the whole budget still goes out alone.
            if now != 0 && now + size > RESPONSE_BUDGET {
                return None;
            }
            match in_flight.compare_exchange_weak(now, now + size, Relaxed, Relaxed) {
                Ok(_) => {
                    return Some(Reserved {
                        size,
                        in_flight: in_flight.clone(),
                    })
                }
                Err(actual) => now = actual,
            }
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(self.size, Relaxed);
    }
}

/// `body` as a stream of chunks that keeps `reserved` until it is done.
fn budgeted(body: Vec<u8>, reserved: Reserved) -> axum::body::Body {
    let body = axum::body::Bytes::from(body);
    let chunks =
        futures_util::stream::unfold((body, Some(reserved)), |(mut rest, reserved)| async move {
            if rest.is_empty() {
                return None; // `reserved` drops here: the body is done.
            }
            let chunk = rest.split_to(rest.len().min(BODY_CHUNK));
            Some((Ok::<_, std::convert::Infallible>(chunk), (rest, reserved)))
        });
    axum::body::Body::from_stream(chunks)
}

/// One element of the legacy JSON array. `seq` and `process` are additions
/// old clients ignore.
#[derive(Serialize)]
struct JsonEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    port: &'a str,
    timestamp: String,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    process: Option<JsonProcess<'a>>,
}

#[derive(Serialize)]
struct JsonProcess<'a> {
    pid: u32,
    name: &'a str,
    /// Only for callers with the token.
    #[serde(skip_serializing_if = "Option::is_none")]
    cmdline: Option<&'a [String]>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    cmdline_truncated: bool,
}

fn json_event(e: &Event, access: Access) -> JsonEvent<'_> {
    let full = access == Access::Full;
    JsonEvent {
        kind: match e.kind {
            EventType::Closed => "closed",
            _ => "opened",
        },
        port: &e.port.key,
        timestamp: porthole::time::rfc3339(e.at),
        seq: e.seq,
        process: e.port.process.as_ref().map(|p| JsonProcess {
            pid: p.pid,
            name: &p.name,
            cmdline: full.then_some(p.cmdline.as_slice()),
            cmdline_truncated: full && p.cmdline_truncated,
        }),
    }
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Parses `since`. A `+` offset sent unencoded arrives as a space; take it
/// back rather than fail an old client.
fn parse_since(raw: &str) -> Result<Since, String> {
    porthole::time::parse_rfc3339(raw)
        .or_else(|e| porthole::time::parse_rfc3339(&raw.replace(' ', "+")).map_err(|_| e))
        .map(Since::Time)
        .map_err(|e| {
            let raw = porthole::text::clip(raw, 64);
            format!("bad since {raw:?}: {e}; want RFC 3339, e.g. 2026-11-22T10:00:00Z or 2026-11-22T10:00:00.5+01:00\n")
        })
}

async fn port_events(
    method: Method,
    State(Shared {
        monitor, in_flight, ..
    }): State<Shared>,
    Extension(access): Extension<Access>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if method != Method::GET {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} not allowed; use GET\n"),
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return resp;
    }
    let Ok(Query(params)) = query else {
        return text(StatusCode::BAD_REQUEST, "malformed query string\n".into());
    };
    let since = match params.get("since").map(|s| parse_since(s)) {
        None => Since::Start,
        Some(Ok(since)) => since,
        Some(Err(msg)) => return text(StatusCode::BAD_REQUEST, msg),
    };
    let reply = match monitor.events(since).await {
        Ok(reply) => reply,
        Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    };
    let events: Vec<JsonEvent> = reply
        .page
        .events
        .iter()
        .map(|e| json_event(e, access))
        .collect();
    let body = serde_json::to_vec(&events).expect("plain data serializes");
    drop(events);
    let Some(reserved) = Reserved::take(&in_flight, body.len()) else {
        let mut resp = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many /port-events responses are still being sent; retry shortly\n".into(),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return resp;
    };
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        budgeted(body, reserved),
    )
        .into_response();
    if reply.page.truncated {
        // Old clients ignore it; new ones know to resync from ListPorts.
        resp.headers_mut()
            .insert("x-porthole-truncated", HeaderValue::from_static("true"));
    }
    resp
}

async fn metrics(
    State(Shared {
        monitor, server, ..
    }): State<Shared>,
) -> Response {
    let mut body = monitor.metrics.render(monitor.source);
    server.render("porthole_monitor", &mut body);
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_rfc3339_forms_and_names_itself_when_wrong() {
        assert!(matches!(
            parse_since("2026-11-22T10:00:00Z"),
            Ok(Since::Time(_))
        ));
        assert!(matches!(
            parse_since("2026-11-22T10:00:00.123+01:00"),
            Ok(Since::Time(_))
        ));
        let space = parse_since("2026-11-22T11:00:00 01:00").unwrap();
        assert_eq!(space, parse_since("2026-11-22T10:00:00Z").unwrap());
        let err = parse_since("yesterday").unwrap_err();
        assert!(err.contains("since"), "{err}");
    }
}
