//! How a tunnel reaches the container: a `Relay.Dial` stream (grpc), a
//! plain TCP connection to the container's address (direct), or an OpenSSH
//! ControlMaster forward (ssh). The host listeners in front are the same for
//! all three, so states, counters and port remapping behave alike.

pub mod direct;
pub mod grpc;
pub mod ssh;

use crate::tunnel::Stats;
use porthole::net::ResetOnDrop;
use porthole::pb::v1;

#[derive(Debug, thiserror::Error)]
pub enum CarryError {
    /// The far end could not be reached: the tunnel's `error` says so.
    #[error("{0}")]
    Dial(String),
    /// A connection that was carried ended badly (a reset, a peer gone).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("relay: {0}")]
    Relay(#[from] porthole::relay::PumpError),
}

pub enum Backend {
    Grpc(grpc::Grpc),
    Direct(direct::Direct),
    Ssh(ssh::Ssh),
}

impl Backend {
    pub fn kind(&self) -> v1::Backend {
        match self {
            Backend::Grpc(_) => v1::Backend::Grpc,
            Backend::Direct(_) => v1::Backend::Direct,
            Backend::Ssh(_) => v1::Backend::Ssh,
        }
    }

    /// Makes `port` reachable (ssh adds its forward). Idempotent.
    pub async fn open(&self, port: u16) -> Result<(), String> {
        match self {
            Backend::Ssh(s) => s.open(port).await,
            _ => Ok(()),
        }
    }

    /// Undoes [`Backend::open`].
    pub async fn close(&self, port: u16) {
        if let Backend::Ssh(s) = self {
            s.close(port).await;
        }
    }

    /// Carries one accepted host connection to the container's `port`. The
    /// connection ends with a FIN only when the far side ended cleanly; on
    /// any failure it is reset (it drops unfinished).
    pub async fn carry(
        &self,
        conn: ResetOnDrop,
        port: u16,
        stats: &Stats,
    ) -> Result<(), CarryError> {
        match self {
            Backend::Grpc(g) => g.carry(conn, port, stats).await,
            Backend::Direct(d) => d.carry(conn, port, stats).await,
            Backend::Ssh(s) => s.carry(conn, port, stats).await,
        }
    }

    /// Why the backend cannot reach a port that listens only on these
    /// addresses, if it cannot.
    pub fn unreachable(&self, addresses: &[std::net::IpAddr]) -> Option<String> {
        match self {
            Backend::Direct(d) => d.unreachable(addresses),
            _ => None,
        }
    }

    /// Stops background work (the ssh master) and waits for it.
    pub async fn shutdown(&self) {
        if let Backend::Ssh(s) = self {
            s.shutdown().await;
        }
    }
}
