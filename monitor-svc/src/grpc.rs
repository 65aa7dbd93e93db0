//! `porthole.v1.PortEvents` over gRPC.

use crate::log::Since;
use crate::monitor::Handle;
use futures_util::StreamExt;
use porthole::auth::Access;
use porthole::pb::v1::{
    self, port_events_server::PortEvents, watch_events_response::Kind, ListEventsRequest,
    ListEventsResponse, ListPortsRequest, ListPortsResponse, WatchEventsRequest,
    WatchEventsResponse,
};
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// What a caller without the token does not get: command lines (they can
/// hold secrets such as `--password=...`). The pid and name stay.
pub fn redact(port: &mut v1::Port) {
    if let Some(p) = &mut port.process {
        p.cmdline.clear();
        p.cmdline_truncated = false;
    }
}

fn redact_all<'a>(ports: impl IntoIterator<Item = &'a mut v1::Port>, access: Access) {
    if access == Access::Anonymous {
        ports.into_iter().for_each(redact);
    }
}

pub struct PortEventsService {
    monitor: Handle,
}

impl PortEventsService {
    pub fn new(monitor: Handle) -> Self {
        PortEventsService { monitor }
    }
}

/// Turns the request's `since` / `after_seq` into a query.
pub fn since_of(req: &ListEventsRequest) -> Result<Since, Status> {
    match (&req.since, req.after_seq) {
        (Some(_), seq) if seq != 0 => Err(Status::invalid_argument(
            "set either since or after_seq, not both",
        )),
        (Some(ts), _) => porthole::time::from_proto(ts)
            .map(Since::Time)
            .ok_or_else(|| {
                let why = if !(0..1_000_000_000).contains(&ts.nanos) {
                    "nanos must be 0..999999999"
                } else {
                    "seconds is outside the dates this monitor can represent"
                };
                Status::invalid_argument(format!(
                    "since is not a valid timestamp (seconds {}, nanos {}): {why}",
                    ts.seconds, ts.nanos
                ))
            }),
        (None, 0) => Ok(Since::Start),
        (None, seq) => Ok(Since::Seq(seq)),
    }
}

#[tonic::async_trait]
impl PortEvents for PortEventsService {
    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let access = Access::of(&request);
        let since = since_of(request.get_ref())?;
        let reply = self.monitor.events(since).await?;
        let mut events: Vec<v1::PortEvent> =
            reply.page.events.iter().map(|e| e.to_proto()).collect();
        redact_all(events.iter_mut().filter_map(|e| e.port.as_mut()), access);
        Ok(Response::new(ListEventsResponse {
            instance_id: self.monitor.instance_id.to_string(),
            events,
            first_seq: reply.first_seq,
            last_seq: reply.last_seq,
            truncated: reply.page.truncated,
        }))
    }

    type WatchEventsStream =
        Pin<Box<dyn futures_util::Stream<Item = Result<WatchEventsResponse, Status>> + Send>>;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let access = Access::of(&request);
        let WatchEventsRequest {
            instance_id,
            after_seq,
        } = request.into_inner();
        let subscription = self.monitor.watch(instance_id, after_seq).await?;
        // Items are shared between subscribers; each is copied only as this
        // stream sends it.
        let stream = subscription.map(move |item| {
            item.map(|shared| {
                let mut msg = Arc::unwrap_or_clone(shared);
                match &mut msg.kind {
                    Some(Kind::Snapshot(s)) => redact_all(&mut s.ports, access),
                    Some(Kind::Event(e)) => redact_all(e.port.as_mut(), access),
                    None => {}
                }
                msg
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_ports(
        &self,
        request: Request<ListPortsRequest>,
    ) -> Result<Response<ListPortsResponse>, Status> {
        let (seq, mut ports) = self.monitor.ports().await?;
        redact_all(&mut ports, Access::of(&request));
        Ok(Response::new(ListPortsResponse {
            instance_id: self.monitor.instance_id.to_string(),
            seq,
            ports,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_and_after_seq_are_exclusive() {
        let ts = prost_types::Timestamp {
            seconds: 10,
            nanos: 0,
        };
        let both = ListEventsRequest {
            since: Some(ts),
            after_seq: 3,
        };
        assert_eq!(
            since_of(&both).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let bad = ListEventsRequest {
            since: Some(prost_types::Timestamp {
                seconds: 10,
                nanos: -5,
            }),
            after_seq: 0,
        };
        let err = since_of(&bad).unwrap_err();
        assert!(err.message().contains("since"), "{err:?}");
        assert_eq!(
            since_of(&ListEventsRequest::default()).unwrap(),
            Since::Start
        );
        let seq = ListEventsRequest {
            since: None,
            after_seq: 7,
        };
        assert_eq!(since_of(&seq).unwrap(), Since::Seq(7));
    }
}
