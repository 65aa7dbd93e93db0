//! Listening sockets from `/proc/net/{tcp,tcp6,udp,udp6}`, for where netlink
//! `sock_diag` is refused.
//!
//! Each line is `sl: local rem st tx:rx tr:when retrnsmt uid timeout inode
//! ...`. Addresses are hex, one `%08X` per 32-bit word as it sits in memory
//! (so host byte order per word); ports are hex in host order.
//!
//! The tables do not say whether an IPv6 wildcard socket is IPv6-only. The
//! default comes from `net.ipv6.bindv6only`; on top of that, a TCP `::`
//! listener that shares its port with an IPv4 listener must be IPv6-only, or
//! the kernel would have refused one of the two binds.

use std::{
    collections::HashSet,
    fs::File,
    io::{self, Read},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use super::{Protocol, ScanError, Socket};

const TCP_LISTEN: u8 = 0x0A;
const TCP_CLOSE: u8 = 0x07;

struct Table {
    path: PathBuf,
    protocol: Protocol,
    v6: bool,
}

pub(super) struct Procfs {
    tables: [Table; 4],
    /// Reused across scans: the tables are read whole, then parsed.
    buf: String,
    /// `net.ipv6.bindv6only`, read once by the caller.
    bindv6only: bool,
}

impl Procfs {
    /// Reads the tables under `net_dir` (normally `/proc/net`).
    pub(super) fn new(net_dir: &Path, bindv6only: bool) -> Self {
        let table = |name: &str, protocol, v6| Table {
            path: net_dir.join(name),
            protocol,
            v6,
        };
        Procfs {
            tables: [
                table("tcp", Protocol::Tcp, false),
                table("tcp6", Protocol::Tcp, true),
                table("udp", Protocol::Udp, false),
                table("udp6", Protocol::Udp, true),
            ],
            buf: String::new(),
            bindv6only,
        }
    }

    pub(super) fn scan(&mut self, out: &mut Vec<Socket>) -> Result<(), ScanError> {
        let start = out.len();
        for table in &self.tables {
            self.buf.clear();
            let read = File::open(&table.path).and_then(|mut f| f.read_to_string(&mut self.buf));
            match read {
                Ok(_) => {}
                // No IPv6 (or no UDP) in this kernel: nothing listens there.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(ScanError::Procfs {
                        path: table.path.clone(),
                        source,
                    })
                }
            }
            parse_table(&self.buf, table.protocol, table.v6, self.bindv6only, out).map_err(
                |(line, reason)| ScanError::ProcfsMalformed {
                    path: table.path.clone(),
                    line,
                    reason,
                },
            )?;
        }
        infer_v6only(&mut out[start..]);
        Ok(())
    }
}

/// Appends the listening sockets of one table to `out`. A line that does not
/// have the kernel's layout fails the whole table with its 1-based line
/// number: the format has been fixed for decades, so a line we cannot read
/// means we misunderstand it, and guessing or skipping would report ports
/// closed that are open.
fn parse_table(
    text: &str,
    protocol: Protocol,
    v6: bool,
    bindv6only: bool,
    out: &mut Vec<Socket>,
) -> Result<(), (usize, &'static str)> {
    for (i, line) in text.lines().enumerate() {
        match parse_line(line, protocol, v6, bindv6only) {
            Ok(Some(socket)) => out.push(socket),
            Ok(None) => {}
            Err(reason) => return Err((i + 1, reason)),
        }
    }
    Ok(())
}

/// One table line: `Ok(None)` for the header, blank lines and sockets that
/// are not listening.
fn parse_line(
    line: &str,
    protocol: Protocol,
    v6: bool,
    bindv6only: bool,
) -> Result<Option<Socket>, &'static str> {
    let mut fields = line.split_ascii_whitespace();
    let Some(slot) = fields.next() else {
        return Ok(None);
    };
    if slot == "sl" {
        return Ok(None);
    }
    if !slot.ends_with(':') {
        return Err("first field is not a slot number");
    }
    let local = fields.next().ok_or("missing local_address")?;
    let remote = fields.next().ok_or("missing rem_address")?;
    let state = fields.next().ok_or("missing st")?;
    let state = u8::from_str_radix(state, 16).map_err(|_| "st is not hex")?;
    // tx_queue:rx_queue tr:tm->when retrnsmt uid timeout, then inode.
    let inode = fields.nth(5).ok_or("missing inode")?;
    let wanted_state = match protocol {
        Protocol::Tcp => TCP_LISTEN,
        Protocol::Udp => TCP_CLOSE,
    };
    if state != wanted_state {
        return Ok(None);
    }
    let (addr, port) = parse_endpoint(local, v6)?;
    if port == 0 {
        return Ok(None);
    }
    if protocol == Protocol::Udp && parse_endpoint(remote, v6)?.1 != 0 {
        return Ok(None);
    }
    let inode = inode.parse().map_err(|_| "inode is not a number")?;
    let dual_stack = matches!(addr, IpAddr::V6(a) if a.is_unspecified()) && !bindv6only;
    Ok(Some(Socket {
        protocol,
        addr,
        port,
        dual_stack,
        inode,
    }))
}

/// `0100007F:1F90` → 127.0.0.1, 8080 (on a little-endian host).
fn parse_endpoint(field: &str, v6: bool) -> Result<(IpAddr, u16), &'static str> {
    let (addr, port) = field.split_once(':').ok_or("address without ':'")?;
    let port = u16::from_str_radix(port, 16).map_err(|_| "port is not 4 hex digits")?;
    let addr = match (v6, addr.len()) {
        (false, 8) => IpAddr::V4(Ipv4Addr::from(hex_word(addr)?)),
        (true, 32) => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&hex_word(&addr[i * 8..i * 8 + 8])?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return Err("address has the wrong length for the table"),
    };
    Ok((addr, port))
}

/// Eight hex digits printed from a u32 in memory → the bytes as they were
/// in memory.
fn hex_word(hex: &str) -> Result<[u8; 4], &'static str> {
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("address is not hex");
    }
    let word = u32::from_str_radix(hex, 16).map_err(|_| "address is not hex")?;
    Ok(word.to_ne_bytes())
}

/// A dual-stack `::` TCP listener and an IPv4 listener cannot share a port
/// (the second bind fails with EADDRINUSE, SO_REUSEADDR or not), so where
/// both are seen the `::` one is IPv6-only. The exception, SO_REUSEPORT on
/// both sockets by the same user, is rare enough to ignore. UDP gets no such
/// inference: SO_REUSEADDR lets UDP sockets overlap freely.
fn infer_v6only(sockets: &mut [Socket]) {
    if !sockets
        .iter()
        .any(|s| s.dual_stack && s.protocol == Protocol::Tcp)
    {
        return;
    }
    let v4_ports: HashSet<u16> = sockets
        .iter()
        .filter(|s| s.protocol == Protocol::Tcp && s.addr.is_ipv4())
        .map(|s| s.port)
        .collect();
    for s in sockets {
        if s.dual_stack && s.protocol == Protocol::Tcp && v4_ports.contains(&s.port) {
            s.dual_stack = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real lines (little-endian host), trimmed of trailing columns where the
    // kernel pads them.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 31337 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 31338 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:C351 0100007F:1F90 06 00000000:00000000 03:00000F2A 00000000     0        0 0 3 0000000000000000
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0277 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:2382 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 100 0 0 10 0
   2: 000080FE00000000FF00FC00010000FE:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1 0000000000000000 100 0 0 10 0
   3: 0000000000000000FFFF00000100007F:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 444 1 0000000000000000 100 0 0 10 0
   4: 00000000000000000000000001000000:1F93 00000000000000000000000001000000:D431 01 00000000:00000000 00:00000000 00000000     0        0 555 1 0000000000000000 20 4 30 10 -1
";

    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  133: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 1001 2 0000000000000000 0
  250: 0100007F:B2C2 0100007F:0035 01 00000000:00000000 00:00000000 00000000  1000        0 1002 2 0000000000000000 0
  251: 00000000:E0A3 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 1003 2 0000000000000000 0
  253: 00000000:E0A4 0100007F:0035 07 00000000:00000000 00:00000000 00000000  1000        0 1005 2 0000000000000000 0
  252: 00000000:0000 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 1004 2 0000000000000000 0
";

    fn parse(text: &str, protocol: Protocol, v6: bool) -> Vec<(String, u16, bool, u64)> {
        let mut out = Vec::new();
        parse_table(text, protocol, v6, false, &mut out).unwrap();
        assert!(out.iter().all(|s| s.protocol == protocol));
        out.into_iter()
            .map(|s| (s.addr.to_string(), s.port, s.dual_stack, s.inode))
            .collect()
    }

    fn owned(v: &[(&str, u16, bool, u64)]) -> Vec<(String, u16, bool, u64)> {
        v.iter()
            .map(|&(a, p, d, i)| (a.to_string(), p, d, i))
            .collect()
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn tcp4_listen_only() {
        assert_eq!(
            parse(TCP, Protocol::Tcp, false),
            owned(&[
                ("127.0.0.1", 8080, false, 31337),
                ("0.0.0.0", 22, false, 12345)
            ]),
            "header, ESTABLISHED and TIME_WAIT lines are skipped"
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn tcp6_addresses() {
        assert_eq!(
            parse(TCP6, Protocol::Tcp, true),
            owned(&[
                ("::1", 631, false, 111),
                ("::", 9090, true, 222),
                ("fe80::fc:ff:fe00:1", 8081, false, 333),
                ("::ffff:127.0.0.1", 8082, false, 444),
            ])
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn bindv6only_makes_wildcards_v6_only() {
        let mut out = Vec::new();
        parse_table(TCP6, Protocol::Tcp, true, true, &mut out).unwrap();
        assert!(out.iter().all(|s| !s.dual_stack));
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn udp_bound_unconnected_only() {
        assert_eq!(
            parse(UDP, Protocol::Udp, false),
            owned(&[
                ("127.0.0.53", 53, false, 1001),
                ("0.0.0.0", 57507, false, 1003)
            ]),
            "connected (01), unbound (port 0) and closed-with-a-peer sockets \
             are skipped; a bound socket with no peer counts even on an \
             ephemeral port"
        );
    }

    #[test]
    fn malformed_lines_fail_the_table_with_their_line_number() {
        let cases = [
            ("   0: 0100007F:1F90", "missing rem_address"),
            (
                "   0: 0100007F:1F90 00000000:0000 0A 0:0 00:0 0 0 0",
                "missing inode",
            ),
            (
                "   0: 0100007F:1F90 00000000:0000 ZZ 0:0 00:0 0 0 0 1",
                "st is not hex",
            ),
            (
                "   0: 0100007Z:1F90 00000000:0000 0A 0:0 00:0 0 0 0 1",
                "address is not hex",
            ),
            (
                "   0: 00007F:1F90 00000000:0000 0A 0:0 00:0 0 0 0 1",
                "address has the wrong length for the table",
            ),
            (
                "   0: 0100007F1F90 00000000:0000 0A 0:0 00:0 0 0 0 1",
                "address without ':'",
            ),
            (
                "   0: 0100007F:1F90 00000000:0000 0A 0:0 00:0 0 0 0 x",
                "inode is not a number",
            ),
            ("garbage", "first field is not a slot number"),
        ];
        for (line, reason) in cases {
            let text = format!("{}\n{line}\n", TCP.lines().next().unwrap());
            let mut out = Vec::new();
            assert_eq!(
                parse_table(&text, Protocol::Tcp, false, false, &mut out),
                Err((2, reason)),
                "{line}"
            );
        }
        // An IPv4-length address in an IPv6 table is as wrong as garbage.
        let mut out = Vec::new();
        let v4_line = TCP.lines().nth(1).unwrap();
        assert!(parse_table(v4_line, Protocol::Tcp, true, false, &mut out).is_err());
    }

    #[test]
    fn v4_listener_on_the_same_port_means_v6_only() {
        let sock = |protocol, addr: &str, port, dual_stack| Socket {
            protocol,
            addr: addr.parse().unwrap(),
            port,
            dual_stack,
            inode: 0,
        };
        let mut sockets = vec![
            sock(Protocol::Tcp, "0.0.0.0", 22, false),
            sock(Protocol::Tcp, "::", 22, true),
            sock(Protocol::Tcp, "::", 8080, true),
            sock(Protocol::Udp, "0.0.0.0", 5353, false),
            sock(Protocol::Udp, "::", 5353, true),
        ];
        infer_v6only(&mut sockets);
        let dual: Vec<_> = sockets.iter().map(|s| s.dual_stack).collect();
        assert_eq!(dual, [false, false, true, false, true]);
    }

    #[test]
    fn missing_tables_are_skipped_and_others_read() {
        let dir = std::env::temp_dir().join(format!("monitor-svc-procfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        struct Cleanup<'a>(&'a Path);
        impl Drop for Cleanup<'_> {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(self.0);
            }
        }
        let _cleanup = Cleanup(&dir);
        // Only tcp; built from a socket so the test holds on any endianness.
        let word = u32::from_ne_bytes([127, 0, 0, 1]);
        let line = format!("   0: {word:08X}:1F90 00000000:0000 0A 0:0 00:0 0 0 0 77\n");
        std::fs::write(
            dir.join("tcp"),
            format!("{}\n{line}", TCP.lines().next().unwrap()),
        )
        .unwrap();
        let mut procfs = Procfs::new(&dir, false);
        let mut out = Vec::new();
        procfs.scan(&mut out).unwrap();
        assert_eq!(
            out,
            vec![Socket {
                protocol: Protocol::Tcp,
                addr: "127.0.0.1".parse().unwrap(),
                port: 8080,
                dual_stack: false,
                inode: 77,
            }]
        );

        std::fs::write(dir.join("udp"), "  sl local\n   0: nonsense\n").unwrap();
        let err = procfs.scan(&mut Vec::new()).unwrap_err();
        assert!(
            matches!(&err, ScanError::ProcfsMalformed { path, line: 2, .. } if path.ends_with("udp")),
            "{err:?}"
        );
        assert!(err.to_string().contains("udp, line 2"), "{err}");
    }
}
