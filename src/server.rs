//! One listening port that serves gRPC (with health and reflection, v1 and
//! v1alpha) and plain HTTP/1.1, with an optional bearer token in front of
//! everything.

use crate::{auth, pb};
use axum::{body::Body, extract::Request, response::Response};
use http::StatusCode;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::ServingStatus;

/// HTTP/2 flow-control windows. The 64 KiB default caps a relayed
/// connection far below what loopback carries; these bound per-stream and
/// per-connection buffering instead.
pub const STREAM_WINDOW: u32 = 2 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

const HEALTH: &str = "grpc.health.v1.Health";

/// What a service puts on its port.
pub struct App {
    /// The service's own gRPC services.
    pub grpc: Routes,
    /// Fully qualified names of those services, reported SERVING by health.
    pub grpc_names: Vec<&'static str>,
    /// Plain HTTP routes (`/healthz`, `/metrics`, ...).
    pub http: axum::Router,
    pub token: Option<auth::Token>,
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then stops
/// accepting, lets in-flight calls finish and returns. Streaming handlers
/// must watch `shutdown` themselves and end their streams.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    for name in &app.grpc_names {
        health
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    // List only what this port serves (the descriptor set holds every
    // porthole service); symbols of the others still resolve.
    let reflection = || {
        app.grpc_names.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name(HEALTH),
            |b, name| b.with_service_name(*name),
        )
    };
    let routes = app
        .grpc
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);

    let mut router = routes
        .into_axum_router()
        .merge(app.http)
        .fallback(not_found);
    if let Some(token) = app.token {
        router = router.layer(axum::middleware::from_fn(move |req, next| {
            auth::require(token.clone(), req, next)
        }));
    }

    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .accept_http1(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .add_routes(Routes::from(router))
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.cancelled().await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
        })
        .await?;
    Ok(())
}

/// Unknown paths: `UNIMPLEMENTED` for gRPC callers, `404` for HTTP ones.
async fn not_found(req: Request) -> Response {
    if auth::is_grpc(&req) {
        let msg = format!("no such method {}", req.uri().path());
        let (parts, ()) = tonic::Status::unimplemented(msg)
            .into_http::<()>()
            .into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .body(Body::from(format!("no such path {}\n", req.uri().path())))
        .expect("static response")
}
