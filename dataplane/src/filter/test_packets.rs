//! Builders of valid IPv4/IPv6 packets with ICMP, TCP and UDP, checksums
//! included, for tests.

use std::net::IpAddr;

/// TCP SYN flag.
pub(crate) const SYN: u8 = 0x02;
/// TCP ACK flag.
pub(crate) const ACK: u8 = 0x10;

/// An ICMP (v4) or ICMPv6 (v6) echo request or reply.
pub(crate) fn echo(src: IpAddr, dst: IpAddr, reply: bool, id: u16, seq: u16) -> Vec<u8> {
    let (protocol, kind) = match (src, reply) {
        (IpAddr::V4(_), false) => (1, 8),
        (IpAddr::V4(_), true) => (1, 0),
        (IpAddr::V6(_), false) => (58, 128),
        (IpAddr::V6(_), true) => (58, 129),
    };
    let mut message = vec![kind, 0, 0, 0];
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(&seq.to_be_bytes());
    message.extend_from_slice(b"weft ping payload");
    ip(src, dst, protocol, message, 2)
}

/// A UDP datagram.
pub(crate) fn udp(
    src: IpAddr,
    src_port: u16,
    dst: IpAddr,
    dst_port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut segment = Vec::with_capacity(8 + payload.len());
    segment.extend_from_slice(&src_port.to_be_bytes());
    segment.extend_from_slice(&dst_port.to_be_bytes());
    let len = u16::try_from(8 + payload.len()).unwrap();
    segment.extend_from_slice(&len.to_be_bytes());
    segment.extend_from_slice(&[0, 0]);
    segment.extend_from_slice(payload);
    ip(src, dst, 17, segment, 6)
}

/// A TCP segment with `flags`, sequence number 1 and no options.
pub(crate) fn tcp(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16, flags: u8) -> Vec<u8> {
    tcp_seq(src, src_port, dst, dst_port, flags, 1)
}

/// A TCP segment with `flags`, sequence number `seq` and no options.
pub(crate) fn tcp_seq(
    src: IpAddr,
    src_port: u16,
    dst: IpAddr,
    dst_port: u16,
    flags: u8,
    seq: u32,
) -> Vec<u8> {
    let mut segment = Vec::with_capacity(20);
    segment.extend_from_slice(&src_port.to_be_bytes());
    segment.extend_from_slice(&dst_port.to_be_bytes());
    segment.extend_from_slice(&seq.to_be_bytes());
    segment.extend_from_slice(&0u32.to_be_bytes());
    segment.extend_from_slice(&[5 << 4, flags]);
    segment.extend_from_slice(&64240u16.to_be_bytes());
    segment.extend_from_slice(&[0, 0, 0, 0]);
    ip(src, dst, 6, segment, 16)
}

/// A packet of a protocol weft does not parse (e.g. GRE), without transport checksum.
pub(crate) fn opaque(src: IpAddr, dst: IpAddr, protocol: u8) -> Vec<u8> {
    let mut packet = ip(src, dst, protocol, vec![0; 8], 0);
    let at = if src.is_ipv4() { 20 } else { 40 };
    packet[at..at + 2].copy_from_slice(&[0, 0]);
    packet
}

/// Turns an IPv4 packet into a non-first fragment (offset 1480 bytes).
pub(crate) fn non_first_fragment(mut packet: Vec<u8>) -> Vec<u8> {
    packet[6..8].copy_from_slice(&(1480u16 / 8).to_be_bytes());
    packet[10..12].copy_from_slice(&[0, 0]);
    let checksum = !fold(ones_sum(&packet[..20]));
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet
}

/// An IP packet of `protocol` around `payload`, computing the transport
/// checksum at `checksum_at` within the payload (ICMPv4 without pseudo-header).
fn ip(src: IpAddr, dst: IpAddr, protocol: u8, mut payload: Vec<u8>, checksum_at: usize) -> Vec<u8> {
    let len = u16::try_from(payload.len()).unwrap();
    let mut sum = if protocol == 1 {
        0
    } else {
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&octets(src));
        pseudo.extend_from_slice(&octets(dst));
        pseudo.extend_from_slice(&[0, protocol]);
        pseudo.extend_from_slice(&len.to_be_bytes());
        ones_sum(&pseudo)
    };
    sum = add(sum, ones_sum(&payload));
    let checksum = !fold(sum);
    payload[checksum_at..checksum_at + 2].copy_from_slice(&checksum.to_be_bytes());

    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = 20 + len;
            let mut packet = vec![0x45, 0];
            packet.extend_from_slice(&total.to_be_bytes());
            packet.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, protocol, 0, 0]);
            packet.extend_from_slice(&s.octets());
            packet.extend_from_slice(&d.octets());
            let checksum = !fold(ones_sum(&packet));
            packet[10..12].copy_from_slice(&checksum.to_be_bytes());
            packet.extend_from_slice(&payload);
            packet
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut packet = vec![0x60, 0, 0, 0];
            packet.extend_from_slice(&len.to_be_bytes());
            packet.extend_from_slice(&[protocol, 64]);
            packet.extend_from_slice(&s.octets());
            packet.extend_from_slice(&d.octets());
            packet.extend_from_slice(&payload);
            packet
        }
        _ => panic!("mixed address families"),
    }
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    }
}

fn ones_sum(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .fold(0, add)
}

fn add(a: u32, b: u32) -> u32 {
    let sum = a + b;
    (sum & 0xffff) + (sum >> 16)
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap()
}

/// Verifies the IPv4 header checksum of `packet` (test helper for the builders themselves).
pub(crate) fn ipv4_header_checksum_ok(packet: &[u8]) -> bool {
    fold(ones_sum(&packet[..20])) == 0xffff
}
