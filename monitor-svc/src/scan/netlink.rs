//! Listening sockets from netlink `NETLINK_SOCK_DIAG` (what `ss` uses).
//!
//! One `SOCK_DIAG_BY_FAMILY` dump per family × protocol, each filtered by
//! state in the kernel: TCP_LISTEN for TCP, TCP_CLOSE (bound or not, but not
//! connected) for UDP. The wire format is small and fixed, so it is parsed
//! here rather than through a packet crate: `nlmsghdr` (native endian),
//! `inet_diag_msg` (ports and addresses in network order, the rest native)
//! and its `rtattr`s, of which only `INET_DIAG_SKV6ONLY` matters.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use netlink_sys::{protocols::NETLINK_SOCK_DIAG, SocketAddr};

use super::{Protocol, ScanError, Socket};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x1;
/// NLM_F_ROOT | NLM_F_MATCH.
const NLM_F_DUMP: u16 = 0x300;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_LISTEN: u8 = 10;
/// What an unconnected UDP socket's `sk_state` says.
const TCP_CLOSE: u8 = 7;

/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 72;
/// Sent for every AF_INET6 socket whatever `idiag_ext` asks (there is no ext
/// bit for it): a u8, 1 when IPV6_V6ONLY is set.
const INET_DIAG_SKV6ONLY: u16 = 11;
/// Strips NLA_F_NESTED and NLA_F_NET_BYTEORDER from an attribute type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// recv(2) flag: return the datagram's real length even when it did not fit.
const MSG_TRUNC: i32 = 0x20;
/// The kernel sizes dump datagrams to the reader's buffer, capped at
/// SKB_WITH_OVERHEAD(32 KiB), so this always holds one whole datagram.
const RECV_BUF: usize = 32 * 1024;

/// One dump request: which sockets, and the name errors call it by.
struct Dump {
    name: &'static str,
    family: u8,
    protocol: Protocol,
    /// Bit mask of `sk_state` values the kernel should report.
    states: u32,
}

const DUMPS: [Dump; 4] = [
    Dump {
        name: "tcp4",
        family: AF_INET,
        protocol: Protocol::Tcp,
        states: 1 << TCP_LISTEN,
    },
    Dump {
        name: "tcp6",
        family: AF_INET6,
        protocol: Protocol::Tcp,
        states: 1 << TCP_LISTEN,
    },
    Dump {
        name: "udp4",
        family: AF_INET,
        protocol: Protocol::Udp,
        states: 1 << TCP_CLOSE,
    },
    Dump {
        name: "udp6",
        family: AF_INET6,
        protocol: Protocol::Udp,
        states: 1 << TCP_CLOSE,
    },
];

pub(super) struct Netlink {
    /// `None` after a failed scan: a dump abandoned half-read would leave the
    /// socket busy (EBUSY) and full of stale replies, so the next scan opens
    /// a fresh one.
    sock: Option<netlink_sys::Socket>,
    buf: Vec<u8>,
    seq: u32,
    /// For kernels too old to send INET_DIAG_SKV6ONLY.
    bindv6only: bool,
}

impl Netlink {
    pub(super) fn open(bindv6only: bool) -> Result<Self, ScanError> {
        Ok(Netlink {
            sock: Some(open_socket()?),
            buf: Vec::with_capacity(RECV_BUF),
            seq: 0,
            bindv6only,
        })
    }

    pub(super) fn scan(&mut self, out: &mut Vec<Socket>) -> Result<(), ScanError> {
        let sock = match self.sock.take() {
            Some(sock) => sock,
            None => open_socket()?,
        };
        for dump in &DUMPS {
            self.dump(&sock, dump, out)?;
        }
        self.sock = Some(sock);
        Ok(())
    }

    /// Sends one dump request and reads its replies up to NLMSG_DONE.
    fn dump(
        &mut self,
        sock: &netlink_sys::Socket,
        dump: &Dump,
        out: &mut Vec<Socket>,
    ) -> Result<(), ScanError> {
        self.seq = self.seq.wrapping_add(1);
        let request = request(dump, self.seq);
        retry_eintr(|| sock.send(&request, 0)).map_err(|source| ScanError::Netlink {
            dump: dump.name,
            op: "sending the request",
            source,
        })?;
        loop {
            self.buf.clear();
            let len = retry_eintr(|| sock.recv(&mut self.buf, MSG_TRUNC)).map_err(|source| {
                ScanError::Netlink {
                    dump: dump.name,
                    op: "receiving the reply",
                    source,
                }
            })?;
            if len > self.buf.len() {
                return Err(malformed(dump, "datagram larger than the receive buffer"));
            }
            match parse_datagram(&self.buf[..len], self.seq, dump, self.bindv6only, out) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(err) if no_ipv6(dump, &err) => return Ok(()),
                Err(err) => return Err(err),
            }
        }
    }
}

fn open_socket() -> Result<netlink_sys::Socket, ScanError> {
    let sock = netlink_sys::Socket::new(NETLINK_SOCK_DIAG)
        .map_err(|source| ScanError::NetlinkOpen { source })?;
    // Port 0 is the kernel; connecting also binds our end.
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(|source| ScanError::NetlinkOpen { source })?;
    Ok(sock)
}

fn retry_eintr(mut op: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn malformed(dump: &Dump, reason: &'static str) -> ScanError {
    ScanError::NetlinkMalformed {
        dump: dump.name,
        reason,
    }
}

/// `nlmsghdr` + `inet_diag_req_v2` asking for every socket of `dump` (a zero
/// `inet_diag_sockid` matches all), with no extensions.
fn request(dump: &Dump, seq: u32) -> [u8; NLMSG_HDRLEN + REQ_LEN] {
    let protocol = match dump.protocol {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
    };
    let mut req = [0u8; NLMSG_HDRLEN + REQ_LEN];
    req[0..4].copy_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: let the kernel fill in ours.
    req[16] = dump.family;
    req[17] = protocol;
    // idiag_ext 0 and pad 0.
    req[20..24].copy_from_slice(&dump.states.to_ne_bytes());
    req
}

/// Parses one datagram of replies to request `seq`, appending listening
/// sockets to `out`. Returns true once the dump is complete (NLMSG_DONE).
/// Messages for other sequence numbers are skipped.
fn parse_datagram(
    mut data: &[u8],
    seq: u32,
    dump: &Dump,
    bindv6only: bool,
    out: &mut Vec<Socket>,
) -> Result<bool, ScanError> {
    while !data.is_empty() {
        if data.len() < NLMSG_HDRLEN {
            return Err(malformed(dump, "truncated nlmsghdr"));
        }
        let len = ne_u32(&data[0..4]) as usize;
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let msg_seq = ne_u32(&data[8..12]);
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(malformed(dump, "nlmsg_len out of bounds"));
        }
        let payload = &data[NLMSG_HDRLEN..len];
        data = &data[align4(len).min(data.len())..];
        if msg_seq != seq {
            continue;
        }
        match kind {
            SOCK_DIAG_BY_FAMILY => {
                if let Some(socket) = parse_inet_diag(payload, dump, bindv6only)? {
                    out.push(socket);
                }
            }
            NLMSG_DONE => {
                // A dump that failed part-way says so here as -errno.
                if payload.len() >= 4 {
                    let errno =
                        i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    if errno < 0 {
                        return Err(kernel_error(dump, errno));
                    }
                }
                return Ok(true);
            }
            NLMSG_ERROR => {
                if payload.len() < 4 {
                    return Err(malformed(dump, "truncated nlmsgerr"));
                }
                let errno = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                // 0 is an acknowledgement, which a dump does not ask for.
                if errno != 0 {
                    return Err(kernel_error(dump, errno));
                }
            }
            NLMSG_OVERRUN => return Err(malformed(dump, "NLMSG_OVERRUN")),
            NLMSG_NOOP => {}
            _ => {}
        }
    }
    Ok(false)
}

/// ENOENT is sock_diag's "no handler for this family/protocol". The IPv4
/// dump of the same protocol has just worked, so its module is there: the
/// kernel was built without IPv6, and there are no IPv6 sockets to list.
fn no_ipv6(dump: &Dump, err: &ScanError) -> bool {
    const ENOENT: i32 = 2;
    dump.family == AF_INET6
        && matches!(err, ScanError::Netlink { source, .. } if source.raw_os_error() == Some(ENOENT))
}

fn kernel_error(dump: &Dump, errno: i32) -> ScanError {
    ScanError::Netlink {
        dump: dump.name,
        op: "the kernel answered with an error",
        source: io::Error::from_raw_os_error(errno.saturating_neg()),
    }
}

/// One `inet_diag_msg` (+ attributes): the socket, if it is listening.
fn parse_inet_diag(msg: &[u8], dump: &Dump, bindv6only: bool) -> Result<Option<Socket>, ScanError> {
    if msg.len() < MSG_LEN {
        return Err(malformed(dump, "inet_diag_msg shorter than 72 bytes"));
    }
    let family = msg[0];
    let state = msg[1];
    // inet_diag_sockid starts at 4: sport, dport (network order), src[16],
    // dst[16], if, cookie[2].
    let port = u16::from_be_bytes([msg[4], msg[5]]);
    let dst_port = u16::from_be_bytes([msg[6], msg[7]]);
    let inode = ne_u32(&msg[68..72]);
    let listening = port != 0
        && match dump.protocol {
            Protocol::Tcp => state == TCP_LISTEN,
            Protocol::Udp => state == TCP_CLOSE && dst_port == 0,
        };
    if !listening {
        return Ok(None);
    }
    let (addr, dual_stack) = match family {
        AF_INET => {
            let octets: [u8; 4] = msg[8..12].try_into().expect("4 bytes");
            (IpAddr::V4(Ipv4Addr::from(octets)), false)
        }
        AF_INET6 => {
            let octets: [u8; 16] = msg[8..24].try_into().expect("16 bytes");
            let addr = Ipv6Addr::from(octets);
            let dual_stack =
                addr.is_unspecified() && !v6only_attr(&msg[MSG_LEN..], dump)?.unwrap_or(bindv6only);
            (IpAddr::V6(addr), dual_stack)
        }
        _ => return Err(malformed(dump, "unknown idiag_family")),
    };
    Ok(Some(Socket {
        protocol: dump.protocol,
        addr,
        port,
        dual_stack,
        inode: u64::from(inode),
    }))
}

/// The INET_DIAG_SKV6ONLY attribute among `attrs`, if the kernel sent it.
fn v6only_attr(mut attrs: &[u8], dump: &Dump) -> Result<Option<bool>, ScanError> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > attrs.len() {
            return Err(malformed(dump, "rtattr length out of bounds"));
        }
        if kind == INET_DIAG_SKV6ONLY && len > 4 {
            return Ok(Some(attrs[4] != 0));
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    Ok(None)
}

fn ne_u32(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP4: &Dump = &DUMPS[0];
    const TCP6: &Dump = &DUMPS[1];
    const UDP4: &Dump = &DUMPS[2];
    const UDP6: &Dump = &DUMPS[3];

    /// Builds a reply datagram the way the kernel lays it out.
    #[derive(Default)]
    struct Fixture(Vec<u8>);

    impl Fixture {
        fn message(mut self, kind: u16, seq: u32, payload: &[u8]) -> Self {
            let len = NLMSG_HDRLEN + payload.len();
            self.0.extend_from_slice(&(len as u32).to_ne_bytes());
            self.0.extend_from_slice(&kind.to_ne_bytes());
            self.0.extend_from_slice(&0x2u16.to_ne_bytes()); // NLM_F_MULTI
            self.0.extend_from_slice(&seq.to_ne_bytes());
            self.0.extend_from_slice(&4242u32.to_ne_bytes());
            self.0.extend_from_slice(payload);
            self.0.resize(align4(self.0.len()), 0);
            self
        }

        fn done(self, seq: u32) -> Self {
            self.message(NLMSG_DONE, seq, &0i32.to_ne_bytes())
        }
    }

    struct Diag {
        family: u8,
        state: u8,
        src: IpAddr,
        sport: u16,
        dport: u16,
        inode: u32,
        v6only: Option<u8>,
    }

    impl Diag {
        fn new(src: &str, sport: u16, state: u8) -> Self {
            let src: IpAddr = src.parse().unwrap();
            Diag {
                family: if src.is_ipv4() { AF_INET } else { AF_INET6 },
                state,
                src,
                sport,
                dport: 0,
                inode: 4711,
                v6only: src.is_ipv6().then_some(0),
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let mut m = vec![0u8; MSG_LEN];
            m[0] = self.family;
            m[1] = self.state;
            m[4..6].copy_from_slice(&self.sport.to_be_bytes());
            m[6..8].copy_from_slice(&self.dport.to_be_bytes());
            match self.src {
                IpAddr::V4(a) => m[8..12].copy_from_slice(&a.octets()),
                IpAddr::V6(a) => m[8..24].copy_from_slice(&a.octets()),
            }
            m[56..60].copy_from_slice(&3u32.to_ne_bytes()); // rqueue: noise
            m[64..68].copy_from_slice(&1000u32.to_ne_bytes()); // uid: noise
            m[68..72].copy_from_slice(&self.inode.to_ne_bytes());
            // Attributes the kernel sends unasked, in its order:
            // INET_DIAG_SHUTDOWN (8) u8, then SKV6ONLY, then CGROUP_ID (21) u64.
            push_attr(&mut m, 8, &[0]);
            if let Some(v) = self.v6only {
                push_attr(&mut m, INET_DIAG_SKV6ONLY, &[v]);
            }
            push_attr(&mut m, 21, &7u64.to_ne_bytes());
            m
        }
    }

    fn push_attr(m: &mut Vec<u8>, kind: u16, value: &[u8]) {
        m.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(value);
        m.resize(align4(m.len()), 0);
    }

    fn parse(data: &[u8], seq: u32, dump: &Dump) -> Result<(bool, Vec<Socket>), ScanError> {
        let mut out = Vec::new();
        let done = parse_datagram(data, seq, dump, false, &mut out)?;
        Ok((done, out))
    }

    #[test]
    fn request_layout() {
        let req = request(TCP6, 7);
        assert_eq!(req.len(), 72);
        assert_eq!(ne_u32(&req[0..4]), 72, "nlmsg_len");
        assert_eq!(
            u16::from_ne_bytes([req[4], req[5]]),
            20,
            "SOCK_DIAG_BY_FAMILY"
        );
        assert_eq!(u16::from_ne_bytes([req[6], req[7]]), 0x301, "REQUEST|DUMP");
        assert_eq!(ne_u32(&req[8..12]), 7, "seq");
        assert_eq!(
            &req[16..20],
            &[10, 6, 0, 0],
            "AF_INET6, IPPROTO_TCP, no ext"
        );
        assert_eq!(ne_u32(&req[20..24]), 1 << 10, "TCP_LISTEN only");
        assert!(req[24..].iter().all(|&b| b == 0), "zero sockid matches all");
        let req = request(UDP4, 8);
        assert_eq!(&req[16..18], &[2, 17]);
        assert_eq!(ne_u32(&req[20..24]), 1 << 7, "TCP_CLOSE only");
    }

    #[test]
    fn multipart_tcp4_then_done() {
        let first = Fixture::default()
            .message(
                SOCK_DIAG_BY_FAMILY,
                5,
                &Diag::new("127.0.0.1", 8080, TCP_LISTEN).bytes(),
            )
            .message(SOCK_DIAG_BY_FAMILY, 5, &{
                let mut d = Diag::new("0.0.0.0", 22, TCP_LISTEN);
                d.inode = 99;
                d.bytes()
            });
        let (done, socks) = parse(&first.0, 5, TCP4).unwrap();
        assert!(!done, "no NLMSG_DONE yet: read another datagram");
        assert_eq!(
            socks,
            vec![
                Socket {
                    protocol: Protocol::Tcp,
                    addr: "127.0.0.1".parse().unwrap(),
                    port: 8080,
                    dual_stack: false,
                    inode: 4711,
                },
                Socket {
                    protocol: Protocol::Tcp,
                    addr: "0.0.0.0".parse().unwrap(),
                    port: 22,
                    dual_stack: false,
                    inode: 99,
                },
            ]
        );
        let (done, socks) = parse(&Fixture::default().done(5).0, 5, TCP4).unwrap();
        assert!(done);
        assert!(socks.is_empty());
    }

    #[test]
    fn v6_wildcard_dual_stack_from_attribute() {
        let mut v6only = Diag::new("::", 9090, TCP_LISTEN);
        v6only.v6only = Some(1);
        let dual = Diag::new("::", 9091, TCP_LISTEN);
        let loopback = Diag::new("::1", 9092, TCP_LISTEN);
        let mapped = Diag::new("::ffff:127.0.0.1", 9093, TCP_LISTEN);
        let data = Fixture::default()
            .message(SOCK_DIAG_BY_FAMILY, 1, &v6only.bytes())
            .message(SOCK_DIAG_BY_FAMILY, 1, &dual.bytes())
            .message(SOCK_DIAG_BY_FAMILY, 1, &loopback.bytes())
            .message(SOCK_DIAG_BY_FAMILY, 1, &mapped.bytes())
            .done(1);
        let (done, socks) = parse(&data.0, 1, TCP6).unwrap();
        assert!(done);
        let got: Vec<_> = socks
            .iter()
            .map(|s| (s.addr.to_string(), s.port, s.dual_stack))
            .collect();
        assert_eq!(
            got,
            vec![
                ("::".to_string(), 9090, false),
                ("::".to_string(), 9091, true),
                ("::1".to_string(), 9092, false),
                ("::ffff:127.0.0.1".to_string(), 9093, false),
            ],
            "IPv4-mapped stays IPv6; only :: can be dual-stack"
        );
    }

    #[test]
    fn missing_v6only_attribute_falls_back_to_sysctl() {
        let mut d = Diag::new("::", 53, TCP_CLOSE);
        d.v6only = None;
        let data = Fixture::default().message(SOCK_DIAG_BY_FAMILY, 1, &d.bytes());
        for bindv6only in [false, true] {
            let mut out = Vec::new();
            parse_datagram(&data.0, 1, UDP6, bindv6only, &mut out).unwrap();
            assert_eq!(out[0].dual_stack, !bindv6only);
        }
    }

    #[test]
    fn udp_keeps_bound_unconnected_only() {
        let bound = Diag::new("0.0.0.0", 5353, TCP_CLOSE);
        let mut connected = Diag::new("10.0.0.1", 40000, 1); // TCP_ESTABLISHED
        connected.dport = 53;
        let mut unbound = Diag::new("0.0.0.0", 0, TCP_CLOSE);
        unbound.inode = 1;
        let mut closed_with_peer = Diag::new("0.0.0.0", 40001, TCP_CLOSE);
        closed_with_peer.dport = 53;
        let data = Fixture::default()
            .message(SOCK_DIAG_BY_FAMILY, 3, &bound.bytes())
            .message(SOCK_DIAG_BY_FAMILY, 3, &connected.bytes())
            .message(SOCK_DIAG_BY_FAMILY, 3, &unbound.bytes())
            .message(SOCK_DIAG_BY_FAMILY, 3, &closed_with_peer.bytes())
            .done(3);
        let (done, socks) = parse(&data.0, 3, UDP4).unwrap();
        assert!(done);
        assert_eq!(socks.len(), 1, "{socks:?}");
        assert_eq!(socks[0].protocol, Protocol::Udp);
        assert_eq!(socks[0].port, 5353);
    }

    #[test]
    fn tcp_non_listen_states_are_dropped() {
        let data = Fixture::default()
            .message(
                SOCK_DIAG_BY_FAMILY,
                1,
                &Diag::new("127.0.0.1", 80, 1).bytes(),
            )
            .message(
                SOCK_DIAG_BY_FAMILY,
                1,
                &Diag::new("127.0.0.1", 81, TCP_CLOSE).bytes(),
            )
            .done(1);
        assert!(parse(&data.0, 1, TCP4).unwrap().1.is_empty());
    }

    #[test]
    fn other_sequence_numbers_are_skipped() {
        let data = Fixture::default()
            .message(
                SOCK_DIAG_BY_FAMILY,
                1,
                &Diag::new("127.0.0.1", 80, TCP_LISTEN).bytes(),
            )
            .done(1)
            .message(
                SOCK_DIAG_BY_FAMILY,
                2,
                &Diag::new("127.0.0.1", 81, TCP_LISTEN).bytes(),
            );
        let (done, socks) = parse(&data.0, 2, TCP4).unwrap();
        assert!(!done, "the stale NLMSG_DONE was not ours");
        assert_eq!(socks.len(), 1);
        assert_eq!(socks[0].port, 81);
    }

    #[test]
    fn kernel_errors_are_reported() {
        // NLMSG_ERROR: -errno, then the request's header.
        let mut payload = (-1i32).to_ne_bytes().to_vec();
        payload.extend_from_slice(&request(UDP6, 9)[..NLMSG_HDRLEN]);
        let data = Fixture::default().message(NLMSG_ERROR, 9, &payload);
        let err = parse(&data.0, 9, UDP6).unwrap_err();
        match &err {
            ScanError::Netlink { dump, source, .. } => {
                assert_eq!(*dump, "udp6");
                assert_eq!(source.raw_os_error(), Some(1), "EPERM");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("udp6"), "{err}");

        let data = Fixture::default().message(NLMSG_DONE, 9, &(-16i32).to_ne_bytes());
        let err = parse(&data.0, 9, UDP6).unwrap_err();
        assert!(
            matches!(&err, ScanError::Netlink { source, .. } if source.raw_os_error() == Some(16)),
            "{err:?}"
        );

        // An acknowledgement is not an error.
        payload[..4].copy_from_slice(&0i32.to_ne_bytes());
        let data = Fixture::default().message(NLMSG_ERROR, 9, &payload).done(9);
        assert!(parse(&data.0, 9, UDP6).unwrap().0);
    }

    #[test]
    fn enoent_means_no_ipv6_only_for_ipv6_dumps() {
        let data = Fixture::default().message(NLMSG_ERROR, 1, &(-2i32).to_ne_bytes());
        let v6 = parse(&data.0, 1, UDP6).unwrap_err();
        assert!(no_ipv6(UDP6, &v6));
        let v4 = parse(&data.0, 1, UDP4).unwrap_err();
        assert!(
            !no_ipv6(UDP4, &v4),
            "no UDP diag module: fail, then fall back"
        );
        let data = Fixture::default().message(NLMSG_ERROR, 1, &(-1i32).to_ne_bytes());
        assert!(!no_ipv6(TCP6, &parse(&data.0, 1, TCP6).unwrap_err()));
    }

    #[test]
    fn malformed_replies_are_errors() {
        let good = Fixture::default()
            .message(
                SOCK_DIAG_BY_FAMILY,
                1,
                &Diag::new("::", 80, TCP_LISTEN).bytes(),
            )
            .0;
        // Cut anywhere inside the message.
        for cut in [1, NLMSG_HDRLEN - 1, NLMSG_HDRLEN + 10, good.len() - 4] {
            assert!(
                matches!(
                    parse(&good[..cut], 1, TCP6),
                    Err(ScanError::NetlinkMalformed { .. })
                ),
                "cut at {cut}"
            );
        }
        // Short inet_diag_msg whose header length agrees.
        let short = Fixture::default()
            .message(SOCK_DIAG_BY_FAMILY, 1, &[0u8; 40])
            .0;
        assert!(matches!(
            parse(&short, 1, TCP6),
            Err(ScanError::NetlinkMalformed { .. })
        ));
        // Attribute claiming more than there is.
        let mut bad_attr = Diag::new("::", 80, TCP_LISTEN).bytes();
        bad_attr[MSG_LEN..MSG_LEN + 2].copy_from_slice(&200u16.to_ne_bytes());
        let data = Fixture::default()
            .message(SOCK_DIAG_BY_FAMILY, 1, &bad_attr)
            .0;
        assert!(matches!(
            parse(&data, 1, TCP6),
            Err(ScanError::NetlinkMalformed { .. })
        ));
        // Unknown family.
        let mut d = Diag::new("127.0.0.1", 80, TCP_LISTEN);
        d.family = 1;
        let data = Fixture::default()
            .message(SOCK_DIAG_BY_FAMILY, 1, &d.bytes())
            .0;
        assert!(matches!(
            parse(&data, 1, TCP4),
            Err(ScanError::NetlinkMalformed { .. })
        ));
    }
}
