//! `porthole.v1.PortEvents` over gRPC.

use crate::log::Since;
use crate::monitor::{Handle, WatchItem};
use porthole::pb::v1::{
    port_events_server::PortEvents, ListEventsRequest, ListEventsResponse, ListPortsRequest,
    ListPortsResponse, WatchEventsRequest,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

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
                Status::invalid_argument(format!(
                "since is not a valid timestamp (seconds {}, nanos {}): nanos must be 0..999999999",
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
        let since = since_of(request.get_ref())?;
        let reply = self.monitor.events(since).await?;
        Ok(Response::new(ListEventsResponse {
            instance_id: self.monitor.instance_id.to_string(),
            events: reply.page.events.iter().map(|e| e.to_proto()).collect(),
            first_seq: reply.first_seq,
            last_seq: reply.last_seq,
            truncated: reply.page.truncated,
        }))
    }

    type WatchEventsStream = ReceiverStream<WatchItem>;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let WatchEventsRequest {
            instance_id,
            after_seq,
        } = request.into_inner();
        let rx = self.monitor.watch(instance_id, after_seq).await?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_ports(
        &self,
        _: Request<ListPortsRequest>,
    ) -> Result<Response<ListPortsResponse>, Status> {
        let (seq, ports) = self.monitor.ports().await?;
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
