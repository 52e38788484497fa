//! Packets longer than the tunnel's MTU, end to end through the simulation.

use super::*;
use crate::offload::{self, GsoType, VirtioNetHdr, NEEDS_CSUM, VIRTIO_NET_HDR_LEN};

const MTU: usize = crate::core::DEFAULT_MTU as usize;

/// `packet` padded with zeros to `len` bytes, its IP length fields and
/// IPv4 header checksum updated.
fn sized(mut packet: Vec<u8>, len: usize) -> Vec<u8> {
    packet.resize(len, 0);
    if packet[0] >> 4 == 4 {
        packet[2..4].copy_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        offload::checksum::fix_ipv4_header(&mut packet[..20]);
    } else {
        packet[4..6].copy_from_slice(&u16::try_from(len - 40).unwrap().to_be_bytes());
    }
    packet
}

fn without_df(mut packet: Vec<u8>) -> Vec<u8> {
    packet[6] &= !0x40;
    offload::checksum::fix_ipv4_header(&mut packet[..20]);
    packet
}

impl Sim {
    fn big_ping(&self, from: usize, to: usize, v6: bool, len: usize) -> Vec<u8> {
        let (src, dst) = if v6 {
            (self.nodes[from].v6, self.nodes[to].v6)
        } else {
            (self.nodes[from].v4, self.nodes[to].v4)
        };
        sized(test_packets::echo(src, dst, false, 7, 1), len)
    }
}

#[test]
fn an_oversized_df_packet_is_answered_with_the_mtu_and_not_sent() {
    let mut sim = Sim::established();
    let before = sim.sent.len();
    let big = sim.big_ping(A, B, false, 1500);
    sim.send(A, &big);
    assert_eq!(sim.sent.len(), before, "nothing went to the network");
    assert!(sim.take_tun(B).is_empty());
    let answers = sim.take_tun(A);
    let [answer] = answers.as_slice() else {
        panic!("one answer expected: {answers:?}");
    };
    // ICMP from B's address to A's: fragmentation needed, MTU 1420.
    assert_eq!(answer[9], 1);
    assert_eq!(&answer[12..16], &big[16..20]);
    assert_eq!(&answer[16..20], &big[12..16]);
    assert_eq!((answer[20], answer[21]), (3, 4));
    assert_eq!(u16::from_be_bytes([answer[26], answer[27]]), 1420);
    assert_eq!(&answer[28..], &big[..28]);
    let stats = sim.stats(A);
    assert_eq!((stats.too_big_sent, stats.too_big_suppressed), (1, 0));
}

#[test]
fn oversized_ipv6_is_answered_with_packet_too_big() {
    let mut sim = Sim::established();
    let big = sim.big_ping(A, B, true, 1500);
    sim.send(A, &big);
    assert!(sim.take_tun(B).is_empty());
    let answers = sim.take_tun(A);
    let [answer] = answers.as_slice() else {
        panic!("one answer expected: {answers:?}");
    };
    assert_eq!((answer[6], answer[40]), (58, 2));
    assert_eq!(&answer[24..40], &big[8..24], "to A");
    assert_eq!(
        u32::from_be_bytes([answer[44], answer[45], answer[46], answer[47]]),
        1420
    );
    assert_eq!(answer.len(), 1280);
}

#[test]
fn packets_of_the_mtu_and_fragmentable_ones_go_through() {
    let mut sim = Sim::established();
    for v6 in [false, true] {
        let full = sim.big_ping(A, B, v6, MTU);
        sim.send(A, &full);
        assert_eq!(sim.take_tun(B), vec![full]);
    }
    let fragmentable = without_df(sim.big_ping(A, B, false, 1500));
    sim.send(A, &fragmentable);
    assert_eq!(sim.take_tun(B), vec![fragmentable]);
    assert!(sim.take_tun(A).is_empty());
    let stats = sim.stats(A);
    assert_eq!((stats.too_big_sent, stats.too_big_suppressed), (0, 0));
}

#[test]
fn answers_are_rate_limited() {
    let mut sim = Sim::established();
    let big = sim.big_ping(A, B, false, 1500);
    for _ in 0..30 {
        sim.send(A, &big);
    }
    assert_eq!(sim.take_tun(A).len(), 20);
    let stats = sim.stats(A);
    assert_eq!((stats.too_big_sent, stats.too_big_suppressed), (20, 10));
    // The bucket refills at 100 a second.
    sim.advance(Duration::from_millis(100));
    for _ in 0..30 {
        sim.send(A, &big);
    }
    assert_eq!(sim.take_tun(A).len(), 10);
}

#[test]
fn packets_from_another_source_are_not_answered() {
    let mut sim = Sim::established();
    // A forwards a packet whose source is not its own overlay address.
    sim.nodes[A].v4 = IpAddr::V4(Ipv4Addr::new(100, 64, 9, 9));
    let foreign = sim.big_ping(A, B, false, 1500);
    sim.send(A, &foreign);
    assert!(sim.take_tun(A).is_empty());
    assert_eq!(sim.stats(A).too_big_suppressed, 1);
}

#[test]
fn a_smaller_configured_mtu_is_the_one_reported() {
    let mut sim = Sim::established();
    let key = sim.nodes[A].key.clone();
    sim.nodes[A].node = sim.fresh_node(key).with_mtu(1280);
    sim.set_netmap(A, &[B], vec![]);
    let packet = sim.big_ping(A, B, false, 1300);
    sim.send(A, &packet);
    let answers = sim.take_tun(A);
    assert_eq!(answers.len(), 1);
    assert_eq!(u16::from_be_bytes([answers[0][26], answers[0][27]]), 1280);
}

#[test]
fn segments_of_a_split_super_packet_are_never_too_big() {
    let mut sim = Sim::established();
    let mut packet = test_packets::tcp(sim.nodes[A].v4, 40000, sim.nodes[B].v4, 22, ACK);
    packet.extend(std::iter::repeat_n(0x5a, 10_000));
    let len = packet.len();
    let packet = sized(packet, len);
    let header = VirtioNetHdr {
        flags: NEEDS_CSUM,
        gso_type: GsoType::TcpV4,
        ecn: false,
        hdr_len: 40,
        // The kernel's segment size for a 1500-byte MTU: larger than weft's.
        gso_size: 1460,
        csum_start: 20,
        csum_offset: 16,
    };
    let mut frame = vec![0; VIRTIO_NET_HDR_LEN];
    header.encode((&mut frame[..]).try_into().unwrap());
    frame.extend_from_slice(&packet);
    let mut segments = Vec::new();
    offload::split(&mut frame, MTU, &mut Vec::new(), |s| {
        segments.push(s.to_vec())
    })
    .unwrap();
    assert!(segments.iter().any(|s| s.len() == MTU), "a full segment");
    let before = sim.sent.len();
    for segment in &segments {
        sim.send(A, segment);
    }
    assert_eq!(
        sim.sent.len() - before,
        segments.len(),
        "every segment sent"
    );
    assert!(sim.take_tun(A).is_empty());
    let stats = sim.stats(A);
    assert_eq!((stats.too_big_sent, stats.too_big_suppressed), (0, 0));
}
