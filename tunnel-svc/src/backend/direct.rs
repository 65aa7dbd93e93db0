//! direct backend: a plain TCP relay to the container's own address, for
//! servers bound beyond loopback.

use super::DialError;
use porthole::net::ResetOnDrop;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// How long a connection waits for the far end to accept: a client is
/// never left hanging on an address that drops packets.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Direct {
    /// The container's address (the monitor URL's host), or an egress
    /// gate upstream's hostname.
    pub host: String,
}

impl Direct {
    /// Connects to `port` at the container's address, within
    /// [`CONNECT_TIMEOUT`].
    pub async fn dial(&self, port: u16) -> Result<ResetOnDrop, DialError> {
        porthole::net::connect((self.host.as_str(), port), CONNECT_TIMEOUT)
            .await
            .map(ResetOnDrop::new)
            .map_err(|e| DialError::Unreachable {
                host: self.host.clone(),
                port,
                error: e.to_string(),
            })
    }

    /// A UDP socket connected to `port` at the container's address.
    pub async fn dial_udp(&self, port: u16) -> Result<tokio::net::UdpSocket, DialError> {
        let fail = |e: std::io::Error| DialError::Unreachable {
            host: self.host.clone(),
            port,
            error: e.to_string(),
        };
        let addr = tokio::net::lookup_host((self.host.as_str(), port))
            .await
            .map_err(fail)?
            .next()
            .ok_or_else(|| fail(std::io::ErrorKind::NotFound.into()))?;
        let socket = crate::sockets::bind_udp(SocketAddr::new(
            if addr.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            },
            0,
        ))
        .map_err(fail)?;
        socket.connect(addr).await.map_err(fail)?;
        Ok(socket)
    }

    /// Why a server whose listeners accept connections only on `addresses`
    /// cannot be reached at the container's address, if it cannot: bound to
    /// loopback only, or to the other IP family only (an IPv6-only `::`
    /// when the container is reached over IPv4).
    pub fn unreachable(&self, addresses: &[IpAddr]) -> Option<String> {
        if addresses.is_empty() {
            return None; // Nothing known: let connections try.
        }
        let reachable = match self.host.parse::<IpAddr>() {
            Ok(host) => addresses
                .iter()
                .any(|a| *a == host || (a.is_unspecified() && a.is_ipv4() == host.is_ipv4())),
            // A name: only loopback is known to be out of reach.
            Err(_) => !addresses.iter().all(|a| a.is_loopback()),
        };
        if reachable {
            return None;
        }
        let shown: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
        Some(if addresses.iter().all(|a| a.is_loopback()) {
            "the server listens on loopback only; the direct backend reaches servers bound to \
             0.0.0.0, :: or the container's address (use --backend grpc or ssh)"
                .to_string()
        } else {
            format!(
                "the server listens on {} only, which {} is not; the direct backend reaches \
                 servers bound to the container's address or its family's wildcard (use \
                 --backend grpc or ssh)",
                shown.join(", "),
                self.host
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Direct;
    use std::net::IpAddr;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn which_listeners_the_container_address_reaches() {
        let d = Direct {
            host: "198.18.0.2".into(),
        };
        assert_eq!(d.unreachable(&ips(&["0.0.0.0"])), None);
        assert_eq!(d.unreachable(&ips(&["198.18.0.2"])), None);
        assert_eq!(d.unreachable(&ips(&["127.0.0.1", "0.0.0.0"])), None);
        assert_eq!(d.unreachable(&[]), None, "nothing known yet");
        let lo = d.unreachable(&ips(&["127.0.0.1", "::1"])).unwrap();
        assert!(lo.contains("loopback only"), "{lo}");
        let v6only = d.unreachable(&ips(&["::"])).unwrap();
        assert!(v6only.contains(":: only"), "{v6only}");
        let other = d.unreachable(&ips(&["198.18.0.9"])).unwrap();
        assert!(other.contains("198.18.0.9"), "{other}");
        // A dual-stack :: is handed over as both wildcards.
        assert_eq!(d.unreachable(&ips(&["::", "0.0.0.0"])), None);
        let v6 = Direct {
            host: "fd00::2".into(),
        };
        assert_eq!(v6.unreachable(&ips(&["::"])), None);
        assert!(v6.unreachable(&ips(&["0.0.0.0"])).is_some());
        let named = Direct {
            host: "devbox".into(),
        };
        assert_eq!(named.unreachable(&ips(&["10.1.2.3"])), None);
        assert!(named.unreachable(&ips(&["127.0.0.1"])).is_some());
    }
}
