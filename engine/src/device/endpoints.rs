//! The underlay endpoints a node advertises: where peers can send its
//! WireGuard packets.

use std::net::{IpAddr, SocketAddr};

use super::Platform;

/// Every usable address of the host's interfaces with the WireGuard port,
/// skipping the overlay interface itself.
pub(crate) fn local_endpoints(host: &impl Platform, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    Ok(usable_endpoints(host.local_addresses()?, port))
}

/// The most endpoints a node advertises; the coordinator refuses more than
/// 32, and hosts with container bridges or IPv6 privacy addresses have many.
const MAX_ADVERTISED: usize = 16;

/// Keeps the addresses a peer elsewhere could reach, deduplicated in order,
/// at most [`MAX_ADVERTISED`] of them.
///
/// Loopback, unspecified, multicast and IPv6 link-local addresses are dropped:
/// the last need a scope that means nothing on another host. Overlay
/// addresses are dropped too, so a tunnel is never routed through itself.
pub(crate) fn usable_endpoints(
    addrs: impl IntoIterator<Item = IpAddr>,
    port: u16,
) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for ip in addrs {
        if !is_usable(ip) {
            continue;
        }
        let endpoint = SocketAddr::new(ip, port);
        if !out.contains(&endpoint) {
            out.push(endpoint);
        }
        if out.len() == MAX_ADVERTISED {
            break;
        }
    }
    out
}

fn is_usable(ip: IpAddr) -> bool {
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    match ip {
        IpAddr::V4(v4) => {
            let overlay = u32::from(v4) & 0xffc0_0000 == 0x6440_0000;
            !overlay && !v4.is_link_local() && !v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
            !link_local && v6.to_ipv4_mapped().is_none()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn a_host_with_many_addresses_advertises_a_bounded_number() {
        let many = (1..=200u8).map(|i| IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, i)));
        let endpoints = usable_endpoints(many, 51820);
        assert_eq!(endpoints.len(), MAX_ADVERTISED);
        assert_eq!(endpoints[0], "198.18.0.1:51820".parse().unwrap());
    }

    #[test]
    fn loopback_link_local_and_overlay_are_skipped() {
        let found = usable_endpoints(
            ips(&[
                "127.0.0.1",
                "::1",
                "192.0.2.10",
                "fe80::1",
                "100.64.0.7",
                "169.254.1.1",
                "2001:db8::5",
                "192.0.2.10",
                "0.0.0.0",
            ]),
            51820,
        );
        let want: Vec<SocketAddr> = vec![
            "192.0.2.10:51820".parse().unwrap(),
            "[2001:db8::5]:51820".parse().unwrap(),
        ];
        assert_eq!(found, want);
    }
}
