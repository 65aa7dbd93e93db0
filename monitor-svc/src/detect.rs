//! Turns raw socket scans into `Port`s: keys, and the owning process of each
//! socket, looked up once per socket and remembered while it lives.

use crate::process::{self, ProcessInfo};
use crate::scan::{Protocol, ScanError, Scanner, Socket, Source};
use porthole::pb::v1;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::RangeInclusive;

pub struct Detector {
    scanner: Scanner,
    /// Owner per socket inode; `None` when /proc does not show it.
    owners: HashMap<u64, Option<ProcessInfo>>,
    /// The previous scan, sorted, to tell cheaply whether anything changed.
    last: Option<Vec<Socket>>,
    /// Where the kernel puts sockets that do not choose a port.
    ephemeral: RangeInclusive<u16>,
}

/// UDP ports clients bind on purpose: DHCP and DHCPv6 clients.
const UDP_CLIENT_PORTS: [u16; 2] = [68, 546];

/// Whether a socket looks like a server's (see `Port.server`).
pub fn is_server(protocol: Protocol, port: u16, ephemeral: &RangeInclusive<u16>) -> bool {
    match protocol {
        Protocol::Tcp => true,
        Protocol::Udp => !ephemeral.contains(&port) && !UDP_CLIENT_PORTS.contains(&port),
    }
}

impl Detector {
    pub fn new(scanner: Scanner) -> Detector {
        Detector {
            scanner,
            owners: HashMap::new(),
            last: None,
            ephemeral: porthole::net::ephemeral_range(),
        }
    }

    /// Like [`Detector::poll`], but `None` when the sockets are exactly those
    /// of the previous call: an idle container costs one dump and a compare.
    pub fn poll_changed(&mut self) -> Result<Option<BTreeMap<String, v1::Port>>, ScanError> {
        let mut sockets = self.scanner.scan()?;
        sockets.sort_unstable_by_key(|s| (s.protocol, s.addr, s.port, s.dual_stack, s.inode));
        if self.last.as_ref() == Some(&sockets) {
            return Ok(None);
        }
        let ports = self.ports(&sockets);
        self.last = Some(sockets);
        Ok(Some(ports))
    }

    pub fn source(&self) -> Source {
        self.scanner.source()
    }

    /// Every listening port, keyed by its legacy key. Sockets sharing a key
    /// (SO_REUSEPORT) are one port.
    pub fn poll(&mut self) -> Result<BTreeMap<String, v1::Port>, ScanError> {
        let sockets = self.scanner.scan()?;
        Ok(self.ports(&sockets))
    }

    fn ports(&mut self, sockets: &[Socket]) -> BTreeMap<String, v1::Port> {
        let live: HashSet<u64> = sockets
            .iter()
            .map(|s| s.inode)
            .filter(|i| *i != 0)
            .collect();
        self.owners.retain(|inode, _| live.contains(inode));
        let unknown: HashSet<u64> = live
            .iter()
            .filter(|i| !self.owners.contains_key(i))
            .copied()
            .collect();
        if !unknown.is_empty() {
            let mut found = process::owners(&unknown);
            for inode in unknown {
                self.owners.insert(inode, found.remove(&inode));
            }
        }
        let mut ports = BTreeMap::new();
        for socket in sockets {
            let process = self.owners.get(&socket.inode).cloned().flatten();
            let mut port = to_port(socket, process);
            port.server = is_server(socket.protocol, socket.port, &self.ephemeral);
            ports.entry(port.key.clone()).or_insert(port);
        }
        ports
    }
}

pub fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

fn to_port(s: &Socket, process: Option<ProcessInfo>) -> v1::Port {
    let protocol = match s.protocol {
        Protocol::Tcp => v1::Protocol::Tcp,
        Protocol::Udp => v1::Protocol::Udp,
    };
    v1::Port {
        protocol: protocol as i32,
        address: s.addr.to_string(),
        port: u32::from(s.port),
        key: porthole::key::format(protocol_name(s.protocol), s.addr, s.port, s.dual_stack),
        dual_stack: s.dual_stack,
        server: s.protocol == Protocol::Tcp,
        process: process.map(|p| v1::Process {
            pid: p.pid,
            name: p.name,
            cmdline: p.cmdline,
            cmdline_truncated: p.truncated,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_servers_are_told_from_clients() {
        let eph = 32768..=60999;
        assert!(is_server(Protocol::Tcp, 40000, &eph), "TCP listeners serve");
        assert!(is_server(Protocol::Udp, 53, &eph));
        assert!(is_server(Protocol::Udp, 5353, &eph));
        assert!(!is_server(Protocol::Udp, 40000, &eph), "a resolver's port");
        assert!(!is_server(Protocol::Udp, 68, &eph), "a DHCP client");
        assert!(!is_server(Protocol::Udp, 546, &eph));
        assert!(is_server(Protocol::Udp, 61000, &eph));
    }
}
