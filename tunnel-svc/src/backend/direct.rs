//! direct backend: a plain TCP relay to the container's own address, for
//! servers bound beyond loopback.

use super::CarryError;
use crate::tunnel::Stats;
use std::net::IpAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// How long a connection waits for the far end to accept: a client is
/// never left hanging on an address that drops packets.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Direct {
    /// The container's address (the monitor URL's host), or an egress
    /// gate upstream's hostname.
    pub host: String,
}

impl Direct {
    pub async fn carry(&self, conn: TcpStream, port: u16, stats: &Stats) -> Result<(), CarryError> {
        let unreachable =
            |why: String| CarryError::Dial(format!("cannot reach {}:{port}: {why}", self.host));
        let upstream = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect((self.host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                )))
            }
        };
        stats.connected();
        let _ = upstream.set_nodelay(true);
        porthole::relay::copy(conn, upstream, &stats.bytes_in, &stats.bytes_out).await?;
        Ok(())
    }

    /// A server bound only to loopback inside the container cannot be
    /// reached from outside it.
    pub fn unreachable(&self, addresses: &[IpAddr]) -> Option<String> {
        (!addresses.is_empty() && addresses.iter().all(|a| a.is_loopback())).then(|| {
            "the server listens on loopback only; the direct backend reaches servers bound to \
             0.0.0.0, :: or the container's address (use --backend grpc or ssh)"
                .to_string()
        })
    }
}
