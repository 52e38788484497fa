//! Builders and checkers for the offload tests.

use std::net::IpAddr;

use proptest::prelude::*;

use super::checksum;
use super::headers::{tcp_flags, Ip, TCP, UDP};
use super::virtio::{GsoType, VirtioNetHdr, NEEDS_CSUM, VIRTIO_NET_HDR_LEN};

/// A super-packet to build.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) v6: bool,
    pub(crate) tcp: bool,
    pub(crate) seq: u32,
    pub(crate) ack: u32,
    pub(crate) flags: u8,
    pub(crate) options: Vec<u8>,
    pub(crate) ports: (u16, u16),
    pub(crate) ip_id: u16,
    pub(crate) gso_size: u16,
    pub(crate) payload: Vec<u8>,
}

impl Spec {
    pub(crate) fn strategy() -> impl Strategy<Value = Self> {
        (
            any::<bool>(),
            any::<bool>(),
            any::<u32>(),
            any::<u32>(),
            prop::sample::select(vec![
                tcp_flags::ACK,
                tcp_flags::ACK | tcp_flags::PSH,
                tcp_flags::ACK | tcp_flags::PSH | tcp_flags::FIN,
                tcp_flags::ACK | tcp_flags::CWR,
            ]),
            (0usize..4).prop_map(|words| vec![1u8; words * 4]),
            any::<(u16, u16)>(),
            any::<u16>(),
            8u16..1300,
            proptest::collection::vec(any::<u8>(), 0..6000),
        )
            .prop_map(
                |(v6, tcp, seq, ack, flags, options, ports, ip_id, gso_size, payload)| Self {
                    v6,
                    tcp,
                    seq,
                    ack,
                    flags,
                    options,
                    ports,
                    ip_id,
                    gso_size,
                    payload,
                },
            )
    }

    pub(crate) fn example() -> Self {
        Self {
            v6: false,
            tcp: true,
            seq: 1000,
            ack: 77,
            flags: tcp_flags::ACK | tcp_flags::PSH,
            options: Vec::new(),
            ports: (40000, 5201),
            ip_id: 7,
            gso_size: 1000,
            payload: (0..5000u32).map(|i| i as u8).collect(),
        }
    }

    fn ip_header_len(&self) -> usize {
        if self.v6 {
            40
        } else {
            20
        }
    }

    fn l4_header_len(&self) -> usize {
        if self.tcp {
            20 + self.options.len()
        } else {
            8
        }
    }
}

/// The packet `spec` describes, with a complete transport checksum.
pub(crate) fn packet(spec: &Spec) -> Vec<u8> {
    let mut packet = headerless(spec);
    let ip = Ip::parse(&packet).expect("built packets parse");
    let field = ip.header_len + if spec.tcp { 16 } else { 6 };
    let l4_len = packet.len() - ip.header_len;
    let sum = checksum::sum(
        &packet[ip.header_len..],
        checksum::pseudo_header(ip.src, ip.dst, ip.protocol, l4_len),
    );
    let value = match checksum::finish(sum) {
        0 => 0xffff,
        v => v,
    };
    packet[field..field + 2].copy_from_slice(&value.to_be_bytes());
    packet
}

/// `spec` as the kernel hands it over: a virtio header announcing GSO and
/// a partial checksum.
pub(crate) fn super_frame(spec: &Spec) -> Vec<u8> {
    let mut packet = headerless(spec);
    let ip = Ip::parse(&packet).expect("built packets parse");
    let offset = if spec.tcp { 16 } else { 6 };
    let field = ip.header_len + offset;
    let l4_len = packet.len() - ip.header_len;
    let pseudo = checksum::fold(checksum::pseudo_header(ip.src, ip.dst, ip.protocol, l4_len));
    packet[field..field + 2].copy_from_slice(&pseudo.to_be_bytes());
    let header = VirtioNetHdr {
        flags: NEEDS_CSUM,
        gso_type: match (spec.tcp, spec.v6) {
            (true, false) => GsoType::TcpV4,
            (true, true) => GsoType::TcpV6,
            (false, _) => GsoType::UdpL4,
        },
        ecn: false,
        hdr_len: (ip.header_len + spec.l4_header_len()) as u16,
        gso_size: spec.gso_size,
        csum_start: ip.header_len as u16,
        csum_offset: offset as u16,
    };
    let mut frame = vec![0u8; VIRTIO_NET_HDR_LEN];
    header.encode((&mut frame[..]).try_into().expect("header length"));
    frame.extend_from_slice(&packet);
    frame
}

/// A TCP packet with `len` payload bytes and `flags`.
pub(crate) fn tcp_packet(v6: bool, len: usize, flags: u8) -> Vec<u8> {
    packet(&Spec {
        v6,
        flags,
        payload: vec![0x5a; len],
        ..Spec::example()
    })
}

/// A UDP datagram with `len` payload bytes.
pub(crate) fn udp_packet(v6: bool, len: usize) -> Vec<u8> {
    packet(&Spec {
        v6,
        tcp: false,
        payload: vec![0xa5; len],
        ..Spec::example()
    })
}

/// What a checked segment carried.
pub(crate) struct Seen {
    pub(crate) seq: u32,
    pub(crate) payload: Vec<u8>,
}

/// Asserts `segment` is a valid packet of the flow `spec` describes and
/// returns its sequence number and payload.
pub(crate) fn check_segment(segment: &[u8], spec: &Spec, first: bool, last: bool) -> Seen {
    let ip = Ip::parse(segment).expect("segment parses");
    assert_eq!(ip.v6, spec.v6);
    assert_eq!(ip.protocol, if spec.tcp { TCP } else { UDP });
    if ip.v6 {
        assert_eq!(
            usize::from(u16::from_be_bytes([segment[4], segment[5]])),
            segment.len() - 40
        );
    } else {
        assert_eq!(
            usize::from(u16::from_be_bytes([segment[2], segment[3]])),
            segment.len()
        );
        assert!(
            checksum::verifies(checksum::sum(&segment[..20], 0)),
            "IPv4 header checksum"
        );
    }
    let l4 = ip.header_len;
    let l4_len = segment.len() - l4;
    assert!(
        checksum::verifies(checksum::sum(
            &segment[l4..],
            checksum::pseudo_header(ip.src, ip.dst, ip.protocol, l4_len)
        )),
        "transport checksum"
    );
    let ports = (
        u16::from_be_bytes([segment[l4], segment[l4 + 1]]),
        u16::from_be_bytes([segment[l4 + 2], segment[l4 + 3]]),
    );
    assert_eq!(ports, spec.ports);
    if spec.tcp {
        let tcp = &segment[l4..];
        let mut flags = spec.flags;
        if !last {
            flags &= !(tcp_flags::FIN | tcp_flags::PSH);
        }
        if !first {
            flags &= !tcp_flags::CWR;
        }
        assert_eq!(tcp[13], flags, "TCP flags");
        assert_eq!(
            u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
            spec.ack
        );
        assert_eq!(&tcp[20..20 + spec.options.len()], &spec.options[..]);
        Seen {
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            payload: tcp[20 + spec.options.len()..].to_vec(),
        }
    } else {
        let udp = &segment[l4..];
        assert_eq!(usize::from(u16::from_be_bytes([udp[4], udp[5]])), l4_len);
        Seen {
            seq: 0,
            payload: udp[8..].to_vec(),
        }
    }
}

/// The packet of `spec` before its transport checksum is filled in.
fn headerless(spec: &Spec) -> Vec<u8> {
    let (src, dst): (IpAddr, IpAddr) = if spec.v6 {
        (
            "fd7a:115c:a1e0::1".parse().expect("address"),
            "fd7a:115c:a1e0::2".parse().expect("address"),
        )
    } else {
        (
            "100.64.0.1".parse().expect("address"),
            "100.64.0.2".parse().expect("address"),
        )
    };
    let total = spec.ip_header_len() + spec.l4_header_len() + spec.payload.len();
    let mut packet = Vec::with_capacity(total);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            packet.extend_from_slice(&[0x45, 0]);
            packet.extend_from_slice(&(total as u16).to_be_bytes());
            packet.extend_from_slice(&spec.ip_id.to_be_bytes());
            packet.extend_from_slice(&[0x40, 0, 64, if spec.tcp { TCP } else { UDP }, 0, 0]);
            packet.extend_from_slice(&s.octets());
            packet.extend_from_slice(&d.octets());
            checksum::fix_ipv4_header(&mut packet[..20]);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            packet.extend_from_slice(&[0x60, 0, 0, 0]);
            packet.extend_from_slice(&((total - 40) as u16).to_be_bytes());
            packet.extend_from_slice(&[if spec.tcp { TCP } else { UDP }, 64]);
            packet.extend_from_slice(&s.octets());
            packet.extend_from_slice(&d.octets());
        }
        _ => unreachable!("one family"),
    }
    packet.extend_from_slice(&spec.ports.0.to_be_bytes());
    packet.extend_from_slice(&spec.ports.1.to_be_bytes());
    if spec.tcp {
        packet.extend_from_slice(&spec.seq.to_be_bytes());
        packet.extend_from_slice(&spec.ack.to_be_bytes());
        let data_offset = ((20 + spec.options.len()) / 4) as u8;
        packet.extend_from_slice(&[data_offset << 4, spec.flags, 0xff, 0xff, 0, 0, 0, 0]);
        packet.extend_from_slice(&spec.options);
    } else {
        let len = (8 + spec.payload.len()) as u16;
        packet.extend_from_slice(&len.to_be_bytes());
        packet.extend_from_slice(&[0, 0]);
    }
    packet.extend_from_slice(&spec.payload);
    packet
}

/// A UDP datagram to build, with the IP fields coalescing compares.
#[derive(Debug, Clone)]
pub(crate) struct Datagram {
    pub(crate) v6: bool,
    pub(crate) ports: (u16, u16),
    /// The IPv4 id (unused for IPv6).
    pub(crate) id: u16,
    /// TOS, or the IPv6 traffic class.
    pub(crate) class: u8,
    /// TTL, or the IPv6 hop limit.
    pub(crate) ttl: u8,
    /// The IPv6 flow label (20 bits).
    pub(crate) flow_label: u32,
    pub(crate) payload: Vec<u8>,
}

impl Datagram {
    pub(crate) fn example(v6: bool, len: usize) -> Self {
        Self {
            v6,
            ports: (40000, 5201),
            id: 7,
            class: 0,
            ttl: 64,
            flow_label: 0,
            payload: (0..len).map(|i| i as u8).collect(),
        }
    }
}

/// The datagram `d` describes, with a complete checksum.
pub(crate) fn datagram(d: &Datagram) -> Vec<u8> {
    let mut packet = packet(&Spec {
        v6: d.v6,
        tcp: false,
        ports: d.ports,
        ip_id: d.id,
        payload: d.payload.clone(),
        ..Spec::example()
    });
    // None of these fields is in the UDP checksum's pseudo-header.
    if d.v6 {
        let word = (6u32 << 28) | (u32::from(d.class) << 20) | (d.flow_label & 0xf_ffff);
        packet[..4].copy_from_slice(&word.to_be_bytes());
        packet[7] = d.ttl;
    } else {
        packet[1] = d.class;
        packet[8] = d.ttl;
        checksum::fix_ipv4_header(&mut packet[..20]);
    }
    packet
}
