//! The legacy port key: `PROTO:ADDRESS:PORT`, written the way `ss -lntu`
//! writes a local address.

use std::net::IpAddr;

/// `tcp:0.0.0.0:8080`, `tcp:[::1]:9090`, `tcp:*:22` (an IPv6 wildcard socket
/// that also takes IPv4), `udp:127.0.0.1:5353`.
///
/// `dual_stack` only matters for the IPv6 wildcard address `::`.
pub fn format(protocol: &str, addr: IpAddr, port: u16, dual_stack: bool) -> String {
    match addr {
        IpAddr::V6(v6) if v6.is_unspecified() && dual_stack => format!("{protocol}:*:{port}"),
        IpAddr::V6(v6) => format!("{protocol}:[{v6}]:{port}"),
        IpAddr::V4(v4) => format!("{protocol}:{v4}:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::format;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn ipv4_is_written_plain() {
        assert_eq!(
            format("tcp", IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8080, false),
            "tcp:0.0.0.0:8080"
        );
        assert_eq!(
            format("udp", IpAddr::V4(Ipv4Addr::LOCALHOST), 5353, true),
            "udp:127.0.0.1:5353",
            "dual_stack means nothing for IPv4"
        );
    }

    #[test]
    fn ipv6_is_bracketed() {
        assert_eq!(
            format("tcp", IpAddr::V6(Ipv6Addr::UNSPECIFIED), 9090, false),
            "tcp:[::]:9090"
        );
        assert_eq!(
            format("tcp", IpAddr::V6(Ipv6Addr::LOCALHOST), 9090, false),
            "tcp:[::1]:9090"
        );
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(
            format("tcp", mapped, 80, false),
            "tcp:[::ffff:127.0.0.1]:80"
        );
    }

    #[test]
    fn dual_stack_wildcard_is_a_star() {
        assert_eq!(
            format("tcp", IpAddr::V6(Ipv6Addr::UNSPECIFIED), 22, true),
            "tcp:*:22"
        );
        assert_eq!(
            format("tcp", IpAddr::V6(Ipv6Addr::LOCALHOST), 22, true),
            "tcp:[::1]:22",
            "only the wildcard can be dual-stack"
        );
    }
}
