//! How a tunnel reaches the container: a `Relay.Dial` stream (grpc), a
//! plain TCP connection to the container's address (direct), or an OpenSSH
//! ControlMaster forward (ssh). A backend only makes connections
//! ([`Backend::dial`]) and prepares or releases what a port needs; the host
//! side (tunnel.rs) accepts, copies and counts the same way for all three.

pub mod direct;
pub mod grpc;
pub mod ssh;

use crate::config::BackendKind;
use porthole::net::ResetOnDrop;
use tokio::net::UnixStream;

/// Why a connection to the container's port could not be made, in words
/// for the tunnel's `error`.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DialError {
    /// The monitor could not be reached, or did not answer in time.
    #[error("monitor unreachable: {0}")]
    MonitorUnreachable(String),
    /// The monitor wants the token the user gives tunnel-svc.
    #[error(
        "monitor refused: {0}; give tunnel-svc the monitor's token with --monitor-token-file \
         (monitor-svc logs where it keeps it)"
    )]
    NoToken(String),
    /// The monitor refused the dial, in its words.
    #[error("the monitor says: {0}")]
    Monitor(String),
    /// The container's address did not answer (direct).
    #[error("cannot reach {host}:{port}: {error}")]
    Unreachable {
        host: String,
        port: u16,
        error: String,
    },
    /// ssh's forward of the port did not come up.
    #[error("the ssh forward of port {port} did not come up: {error}")]
    NoForward { port: u16, error: String },
    /// The ssh master is not there to carry it.
    #[error(transparent)]
    Ssh(#[from] ssh::SshError),
    #[error("{NO_UDP}")]
    NoUdp,
}

/// Why an ssh tunnel of a UDP port is FAILED.
const NO_UDP: &str = "the ssh backend cannot carry UDP (OpenSSH forwards TCP only); use \
                      --backend grpc or direct for UDP ports";

/// A connection to a container port, made by a backend.
pub enum Upstream {
    /// A TCP connection to the port itself (direct). Reset if dropped
    /// before [`ResetOnDrop::finish`].
    Tcp(ResetOnDrop),
    /// ssh's local socket for the port's forward, with a check that tells
    /// a clean end from the master dying (both close the socket alike).
    Forward {
        stream: UnixStream,
        ended_cleanly: Box<dyn Fn() -> std::io::Result<()> + Send + Sync>,
    },
    /// A `Relay.Dial` stream the monitor has connected.
    Relay(grpc::RelayStream),
    /// A raw relay connection the monitor has connected (grpc), holding one
    /// of the target's raw slots while it lives.
    Raw(ResetOnDrop, tokio::sync::OwnedSemaphorePermit),
}

/// A UDP flow to a container port, made by a backend.
pub enum UdpUpstream {
    /// A `Relay.Dial` UDP stream: one `data` frame per datagram (grpc).
    Relay(grpc::RelayStream),
    /// A UDP socket connected to the container's address (direct).
    Socket(tokio::net::UdpSocket),
}

/// The backend a target's tunnels dial with, which can be swapped while
/// they run (a Docker container reached another way): connections made
/// after the swap use the new one, those in flight keep theirs.
pub struct BackendCell(std::sync::RwLock<std::sync::Arc<Backend>>);

impl BackendCell {
    pub fn new(backend: std::sync::Arc<Backend>) -> BackendCell {
        BackendCell(std::sync::RwLock::new(backend))
    }

    pub fn get(&self) -> std::sync::Arc<Backend> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, backend: std::sync::Arc<Backend>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = backend;
    }
}

pub enum Backend {
    Grpc(grpc::Grpc),
    Direct(direct::Direct),
    Ssh(ssh::Ssh),
}

impl Backend {
    pub fn kind(&self) -> BackendKind {
        match self {
            Backend::Grpc(_) => BackendKind::Grpc,
            Backend::Direct(_) => BackendKind::Direct,
            Backend::Ssh(_) => BackendKind::Ssh,
        }
    }

    /// Whether a port needs [`Backend::prepare`] before connections work
    /// (ssh adds a forward); otherwise a tunnel is active as it listens.
    pub fn needs_prepare(&self) -> bool {
        matches!(self, Backend::Ssh(_))
    }

    /// Makes `port` reachable. The reconciler calls prepare and
    /// [`Backend::release`] for one target in order, one at a time.
    pub async fn prepare(&self, port: u16) -> Result<(), ssh::SshError> {
        match self {
            Backend::Ssh(s) => s.open(port).await,
            _ => Ok(()),
        }
    }

    /// Undoes [`Backend::prepare`].
    pub async fn release(&self, port: u16) {
        if let Backend::Ssh(s) = self {
            s.close(port).await;
        }
    }

    /// Connects to the container's `port`.
    pub async fn dial(&self, port: u16) -> Result<Upstream, DialError> {
        match self {
            Backend::Grpc(g) => g.dial(port).await,
            Backend::Direct(d) => d.dial(port).await.map(Upstream::Tcp),
            Backend::Ssh(s) => s.dial(port).await,
        }
    }

    /// Starts a UDP flow to the container's `port`.
    pub async fn dial_udp(&self, port: u16) -> Result<UdpUpstream, DialError> {
        match self {
            Backend::Grpc(g) => g.dial_udp(port).await.map(UdpUpstream::Relay),
            Backend::Direct(d) => d.dial_udp(port).await.map(UdpUpstream::Socket),
            Backend::Ssh(_) => Err(DialError::NoUdp),
        }
    }

    /// Why this backend cannot carry UDP, if it cannot.
    pub fn no_udp(&self) -> Option<&'static str> {
        matches!(self, Backend::Ssh(_)).then_some(NO_UDP)
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
