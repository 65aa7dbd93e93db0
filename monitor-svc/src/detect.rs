//! Turns raw socket scans into `Port`s: keys, and the owning process of each
//! socket, looked up once per socket and remembered while it lives.

use crate::process::{self, ProcessInfo};
use crate::scan::{Protocol, ScanError, Scanner, Socket, Source};
use porthole::pb::v1;
use std::collections::{BTreeMap, HashMap, HashSet};

pub struct Detector {
    scanner: Scanner,
    /// Owner per socket inode; `None` when /proc does not show it.
    owners: HashMap<u64, Option<ProcessInfo>>,
}

impl Detector {
    pub fn new(scanner: Scanner) -> Detector {
        Detector {
            scanner,
            owners: HashMap::new(),
        }
    }

    pub fn source(&self) -> Source {
        self.scanner.source()
    }

    /// Every listening port, keyed by its legacy key. Sockets sharing a key
    /// (SO_REUSEPORT) are one port.
    pub fn poll(&mut self) -> Result<BTreeMap<String, v1::Port>, ScanError> {
        let sockets = self.scanner.scan()?;
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
            let port = to_port(&socket, process);
            ports.entry(port.key.clone()).or_insert(port);
        }
        Ok(ports)
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
        process: process.map(|p| v1::Process {
            pid: p.pid,
            name: p.name,
            cmdline: p.cmdline,
        }),
    }
}
