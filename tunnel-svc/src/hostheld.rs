//! Host ports that host processes held lately, which automatic tunnels
//! leave alone.
//!
//! When a host service stops for a moment (restarts, is upgraded), its
//! port is free; a container that opened the same port would otherwise get
//! it within a second and catch what the service's clients send next. So
//! tunnel-svc looks at the host's listening sockets (`/proc/net`) every few
//! seconds, and a port a process other than its own tunnels held within
//! [`QUIET`] is not given to an automatic tunnel: the tunnel moves to
//! another port and says why, or (an exact port) waits. OpenTunnel, an
//! admin's explicit choice, may still take it.

use crate::model::Proto;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How long a port stays kept for the host process that held it.
pub const QUIET: Duration = Duration::from_secs(300);

/// When each host port was last seen held by a process other than this
/// tunnel-svc's tunnels.
#[derive(Debug)]
pub struct HostHeld {
    seen: HashMap<(Proto, u16), Instant>,
    /// This machine's ephemeral port range, read once.
    ephemeral: std::ops::RangeInclusive<u16>,
    /// When the latest scan ran.
    last: Option<Instant>,
}

/// When a host process held a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// In the latest look at the host's sockets.
    Now,
    /// Not any more; this long ago (less than [`QUIET`]).
    Ago(Duration),
}

impl Default for HostHeld {
    fn default() -> HostHeld {
        HostHeld {
            seen: HashMap::new(),
            ephemeral: porthole::net::ephemeral_range(),
            last: None,
        }
    }
}

impl HostHeld {
    /// Looks at the host's sockets now. `ours`: the ports this tunnel-svc's
    /// tunnels listen on; `bind`: the addresses they listen on (a socket
    /// elsewhere does not conflict).
    pub fn scan(&mut self, ours: &HashSet<(Proto, u16)>, bind: &[IpAddr], now: Instant) {
        for (proto, file) in [
            (Proto::Tcp, "/proc/net/tcp"),
            (Proto::Tcp, "/proc/net/tcp6"),
            (Proto::Udp, "/proc/net/udp"),
            (Proto::Udp, "/proc/net/udp6"),
        ] {
            let Ok(text) = std::fs::read_to_string(file) else {
                continue;
            };
            for (addr, port) in listening(proto, &text) {
                let conflicts = bind
                    .iter()
                    .any(|b| *b == addr || b.is_unspecified() || addr.is_unspecified());
                // A client's unconnected UDP socket sits in the ephemeral
                // range; that is not a service.
                let client = proto == Proto::Udp && self.ephemeral.contains(&port);
                if conflicts && !client && !ours.contains(&(proto, port)) {
                    self.seen.insert((proto, port), now);
                }
            }
        }
        self.seen.retain(|_, at| now.duration_since(*at) < QUIET);
        self.last = Some(now);
    }

    /// Whether a host process holds `port`, or held it within [`QUIET`].
    pub fn recently(&self, proto: Proto, port: u16, now: Instant) -> Option<Held> {
        let at = *self.seen.get(&(proto, port))?;
        if Some(at) == self.last {
            return Some(Held::Now);
        }
        Some(now.duration_since(at))
            .filter(|ago| *ago < QUIET)
            .map(Held::Ago)
    }
}

/// The listening sockets in a `/proc/net/{tcp,tcp6,udp,udp6}` table: TCP in
/// LISTEN, UDP unconnected.
fn listening(proto: Proto, table: &str) -> Vec<(IpAddr, u16)> {
    let wanted = match proto {
        Proto::Tcp => "0A",
        Proto::Udp => "07",
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != wanted {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            Some((hex_addr(addr)?, u16::from_str_radix(port, 16).ok()?))
        })
        .collect()
}

/// An address as `/proc/net` writes it: 32-bit words in host byte order.
fn hex_addr(hex: &str) -> Option<IpAddr> {
    let words = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<Vec<u32>>>()?;
    let mut bytes = Vec::with_capacity(16);
    for w in &words {
        bytes.extend_from_slice(&w.to_ne_bytes());
    }
    match words.len() {
        1 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        4 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_listening_sockets_from_proc_net() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:1F91 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1
";
        assert_eq!(
            listening(Proto::Tcp, tcp),
            [
                ("127.0.0.1".parse().unwrap(), 8080),
                ("0.0.0.0".parse().unwrap(), 22)
            ]
        );
        let tcp6 =
            "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:1538 00000000000000000000000000000000:0000 0A 0
";
        assert_eq!(
            listening(Proto::Tcp, tcp6),
            [("::1".parse().unwrap(), 5432)]
        );
        assert!(listening(Proto::Udp, tcp).is_empty());
    }

    #[test]
    fn this_machines_listeners_are_seen_and_ours_are_not() {
        let bind = ["127.0.0.1".parse().unwrap()];
        // Below the ephemeral range (no other test's socket takes its port
        // once it is closed), and one no process holds on any address that
        // conflicts (a `[::]` listener lets 127.0.0.1 bind, yet holds it).
        let mut before = HostHeld::default();
        let start = Instant::now();
        before.scan(&HashSet::new(), &bind, start);
        let (port, held) = (20_000..30_000)
            .filter(|p| before.recently(Proto::Tcp, *p, start).is_none())
            .find_map(|p| Some((p, std::net::TcpListener::bind(("127.0.0.1", p)).ok()?)))
            .expect("a free port below the ephemeral range");
        let ours = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let our_port = ours.local_addr().unwrap().port();
        // Elsewhere on loopback: no conflict with tunnels on 127.0.0.1.
        let aside = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
        let aside_port = aside.local_addr().unwrap().port();
        let mut h = HostHeld::default();
        let now = Instant::now();
        h.scan(&HashSet::from([(Proto::Tcp, our_port)]), &bind, now);
        assert_eq!(h.recently(Proto::Tcp, port, now), Some(Held::Now));
        assert_eq!(h.recently(Proto::Tcp, our_port, now), None);
        assert_eq!(h.recently(Proto::Tcp, aside_port, now), None);
        assert_eq!(h.recently(Proto::Udp, port, now), None);
        // Closed: kept for QUIET after it was last seen, then forgotten.
        drop(held);
        let later = now + Duration::from_secs(60);
        h.scan(&HashSet::new(), &bind, later);
        assert_eq!(
            h.recently(Proto::Tcp, port, later),
            Some(Held::Ago(Duration::from_secs(60)))
        );
        let gone = now + QUIET;
        h.scan(&HashSet::new(), &bind, gone);
        assert_eq!(h.recently(Proto::Tcp, port, gone), None);
    }
}
