//! Coalescing (GRO in software): consecutive TCP segments, or UDP
//! datagrams, of one flow, as the core hands them over for the TUN device,
//! become one super-packet the kernel segments itself if it must.

use std::net::IpAddr;

use super::checksum;
use super::headers::{self, tcp_flags, Ip, TCP, UDP};
use super::virtio::{GsoType, VirtioNetHdr, NEEDS_CSUM, VIRTIO_NET_HDR_LEN};

/// The largest super-packet: what the IP length fields can express.
const MAX_PACKET: usize = 65_535;

/// The most datagrams in one UDP super-packet. The kernel refuses a
/// `GSO_UDP_L4` write of more than `UDP_MAX_SEGMENTS` (64, raised to 128
/// only in recent kernels).
const MAX_UDP_SEGMENTS: usize = 64;

/// The UDP header's length.
const UDP_HEADER: usize = 8;

/// IP protocol numbers of ICMP and ICMPv6, which never share a flow with
/// a TCP or UDP packet.
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// Collects the packets of one flush and turns them into frames for a TUN
/// device opened with `IFF_VNET_HDR`.
///
/// Drive it with [`Coalescer::push`] for every packet, in order, then
/// [`Coalescer::finish`] to write the frames out, then
/// [`Coalescer::clear`].
///
/// A TCP segment joins the frame of its flow only when it continues it
/// exactly: contiguous sequence number, same ACK, window, flags (PSH only
/// on the last), options and IP fields, a verified checksum, and a payload
/// no larger than the first segment's.
///
/// A UDP datagram joins (only when the device accepted UDP segmentation
/// offload, see [`Coalescer::new`]) when its IP fields match the first
/// datagram's (TOS, TTL, DF; IPv6 traffic class, flow label, hop limit),
/// its IPv4 id is the next one, its checksum is present and verified, and
/// its payload is the first's size; a shorter one joins and ends the
/// frame, as the kernel's segmentation can only make the last one shorter.
/// At most `MAX_UDP_SEGMENTS` (64) datagrams share a frame.
///
/// Anything else — other protocols, SYN/FIN/RST, out-of-order or corrupt
/// segments, IPv4 options, fragments, IPv6 extension headers — passes
/// through alone, and ends the flow's frame so the order within a flow is
/// kept.
#[derive(Debug)]
pub struct Coalescer {
    /// Whether UDP datagrams are joined: the device must have accepted
    /// `TUN_F_USO4 | TUN_F_USO6` or it rejects `GSO_UDP_L4` writes.
    udp: bool,
    frames: Vec<Frame>,
    spare: Vec<Vec<u8>>,
}

#[derive(Debug)]
struct Frame {
    /// Room for the virtio header, then the packet.
    buf: Vec<u8>,
    /// Set while segments may still join.
    open: Option<Open>,
    /// Set once a second segment joined.
    gso: Option<Gso>,
}

#[derive(Debug, Clone, Copy)]
struct Open {
    flow: Flow,
    segment: usize,
    /// TCP: the next sequence number; UDP: the next IPv4 id.
    next: u32,
    /// The segments in the frame.
    count: usize,
}

#[derive(Debug, Clone, Copy)]
struct Gso {
    ip: Ip,
    segment: usize,
    l4_end: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flow {
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    ports: [u8; 4],
}

/// A TCP segment's or UDP datagram's fields that decide whether it may
/// join a frame.
struct Segment {
    ip: Ip,
    flow: Flow,
    l4_end: usize,
    /// TCP: the sequence number; UDP: the IPv4 id (0 for IPv6).
    seq: u32,
    /// TCP flags; 0 for UDP.
    flags: u8,
    payload: usize,
}

impl Coalescer {
    /// A coalescer for a device that segments TCP, and UDP too if `udp`
    /// (the device accepted UDP segmentation offload).
    pub fn new(udp: bool) -> Self {
        Self {
            udp,
            frames: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Adds the next packet for the device.
    pub fn push(&mut self, packet: &[u8]) {
        let Some(segment) = parse(packet, self.udp) else {
            self.close_between(packet);
            self.push_alone(packet);
            return;
        };
        let open = self
            .frames
            .iter()
            .rposition(|f| f.open.is_some_and(|o| o.flow == segment.flow));
        if let Some(index) = open {
            if self.try_append(index, packet, &segment) {
                return;
            }
            self.frames[index].open = None;
        }
        if !starts_frame(packet, &segment) {
            self.push_alone(packet);
            return;
        }
        let mut frame = self.new_frame(packet);
        let closes = segment.flags & tcp_flags::PSH != 0;
        frame.open = (!closes).then_some(Open {
            flow: segment.flow,
            segment: segment.payload,
            next: segment.next(segment.payload),
            count: 1,
        });
        self.frames.push(frame);
    }

    /// Completes every frame's headers and yields the frames, in the order
    /// their first packets were pushed.
    pub fn finish(&mut self) -> impl Iterator<Item = &[u8]> + '_ {
        for frame in &mut self.frames {
            let header = match frame.gso {
                Some(gso) => complete(&mut frame.buf[VIRTIO_NET_HDR_LEN..], gso),
                None => VirtioNetHdr::PLAIN,
            };
            let mut bytes = [0u8; VIRTIO_NET_HDR_LEN];
            header.encode(&mut bytes);
            frame.buf[..VIRTIO_NET_HDR_LEN].copy_from_slice(&bytes);
        }
        self.frames.iter().map(|f| f.buf.as_slice())
    }

    /// Forgets the frames, keeping their buffers for the next flush.
    pub fn clear(&mut self) {
        self.spare.extend(self.frames.drain(..).map(|f| f.buf));
    }

    /// Whether no packet is waiting.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn push_alone(&mut self, packet: &[u8]) {
        let frame = self.new_frame(packet);
        self.frames.push(frame);
    }

    /// Ends the open frames a packet that cannot join may belong to (a
    /// fragment, a packet behind IPv6 extension headers, a malformed
    /// one), so no later packet of its flow overtakes it.
    fn close_between(&mut self, packet: &[u8]) {
        let Some((src, dst, protocol)) = addresses(packet) else {
            return;
        };
        let known = matches!(protocol, TCP | UDP | ICMP | ICMPV6);
        for frame in &mut self.frames {
            if frame.open.is_some_and(|o| {
                o.flow.src == src && o.flow.dst == dst && (!known || o.flow.protocol == protocol)
            }) {
                frame.open = None;
            }
        }
    }

    fn new_frame(&mut self, packet: &[u8]) -> Frame {
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.resize(VIRTIO_NET_HDR_LEN, 0);
        buf.extend_from_slice(packet);
        Frame {
            buf,
            open: None,
            gso: None,
        }
    }

    /// Appends `packet`'s payload to frame `index` if it continues it.
    fn try_append(&mut self, index: usize, packet: &[u8], segment: &Segment) -> bool {
        let frame = &mut self.frames[index];
        let Some(open) = frame.open else {
            return false;
        };
        let head = &frame.buf[VIRTIO_NET_HDR_LEN..];
        let udp = segment.flow.protocol == UDP;
        let fits = segment.seq == open.next
            && segment.payload > 0
            && segment.payload <= open.segment
            && head.len() + segment.payload <= MAX_PACKET
            && (!udp || open.count < MAX_UDP_SEGMENTS)
            && same_headers(head, packet, segment)
            && verifies(packet, segment);
        if !fits {
            return false;
        }
        frame.buf.extend_from_slice(&packet[segment.l4_end..]);
        let psh = segment.flags & tcp_flags::PSH != 0;
        if psh {
            let at = VIRTIO_NET_HDR_LEN + segment.ip.header_len + 13;
            frame.buf[at] |= tcp_flags::PSH;
        }
        frame.gso = Some(Gso {
            ip: segment.ip,
            segment: open.segment,
            l4_end: segment.l4_end,
        });
        frame.open = (!psh && segment.payload == open.segment).then_some(Open {
            next: segment.next(segment.payload),
            count: open.count + 1,
            ..open
        });
        true
    }
}

impl Segment {
    /// What the next segment's `seq` must be after this one's `payload`.
    fn next(&self, payload: usize) -> u32 {
        match (self.flow.protocol, self.ip.v6) {
            (TCP, _) => self.seq.wrapping_add(payload as u32),
            (_, false) => u32::from((self.seq as u16).wrapping_add(1)),
            // IPv6 has no id to continue.
            (_, true) => 0,
        }
    }
}

/// Reads the fields of `packet` that decide coalescing, if it is a TCP
/// segment, or with `udp` a UDP datagram, whose headers hold together.
fn parse(packet: &[u8], udp: bool) -> Option<Segment> {
    let ip = Ip::parse(packet).ok()?;
    if ip.declared_length(packet) != packet.len() {
        return None;
    }
    let l4 = ip.header_len;
    let (l4_end, seq, flags) = match ip.protocol {
        TCP => {
            let end = l4 + headers::tcp_header_len(packet, l4).ok()?;
            let tcp = &packet[l4..];
            (
                end,
                u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
                tcp[13],
            )
        }
        UDP if udp => {
            let header = packet.get(l4..l4 + UDP_HEADER)?;
            if usize::from(u16::from_be_bytes([header[4], header[5]])) != packet.len() - l4 {
                return None;
            }
            let id = if ip.v6 {
                0
            } else {
                u16::from_be_bytes([packet[4], packet[5]])
            };
            (l4 + UDP_HEADER, u32::from(id), 0)
        }
        _ => return None,
    };
    let l4_header = &packet[l4..];
    Some(Segment {
        ip,
        flow: Flow {
            src: ip.src,
            dst: ip.dst,
            protocol: ip.protocol,
            ports: [l4_header[0], l4_header[1], l4_header[2], l4_header[3]],
        },
        l4_end,
        seq,
        flags,
        payload: packet.len() - l4_end,
    })
}

/// The addresses and protocol (or first extension header) of an IP
/// packet, fragments included.
fn addresses(packet: &[u8]) -> Option<(IpAddr, IpAddr, u8)> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let h = packet.get(..20)?;
            let v4 = |at: usize| IpAddr::from([h[at], h[at + 1], h[at + 2], h[at + 3]]);
            Some((v4(12), v4(16), h[9]))
        }
        Some(6) => {
            let h = packet.get(..40)?;
            let v6 = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&h[at..at + 16]);
                IpAddr::from(octets)
            };
            Some((v6(8), v6(24), h[6]))
        }
        _ => None,
    }
}

/// Whether `packet` may be the first segment of a super-packet: a plain
/// IPv4 header (no options) or IPv6, some payload, an intact checksum,
/// and for TCP only ACK (and PSH) set.
fn starts_frame(packet: &[u8], segment: &Segment) -> bool {
    let plain_ip = segment.ip.v6 || segment.ip.header_len == 20;
    let flags_ok =
        segment.flow.protocol == UDP || segment.flags & !tcp_flags::PSH == tcp_flags::ACK;
    plain_ip && flags_ok && segment.payload > 0 && verifies(packet, segment)
}

/// Whether `packet` has the same IP and transport header fields as the
/// frame's first packet `head`, PSH and the fields segmentation changes
/// aside.
fn same_headers(head: &[u8], packet: &[u8], segment: &Segment) -> bool {
    let l4 = segment.ip.header_len;
    let ip_same = if segment.ip.v6 {
        head[..4] == packet[..4] && head[6..8] == packet[6..8]
    } else {
        head[..2] == packet[..2] && head[6..10] == packet[6..10]
    };
    if segment.flow.protocol == UDP {
        return ip_same;
    }
    let Some(head_l4_end) = head
        .get(l4 + 12)
        .map(|offset| l4 + usize::from(offset >> 4) * 4)
    else {
        return false;
    };
    if head_l4_end != segment.l4_end {
        return false;
    }
    let (a, b) = (&head[l4..segment.l4_end], &packet[l4..segment.l4_end]);
    let ack_same = a[8..12] == b[8..12];
    let flags_same = a[12] == b[12] && (a[13] & !tcp_flags::PSH) == (b[13] & !tcp_flags::PSH);
    let window_same = a[14..16] == b[14..16];
    let options_same = a[20..] == b[20..];
    ip_same && ack_same && flags_same && window_same && options_same
}

/// Whether the transport checksum of `packet` is present and right: a
/// coalesced frame is handed to the kernel with the checksum to
/// recompute, so a corrupt segment must not slip into one, nor an IPv4
/// datagram sent without a checksum (zero) come out with one.
fn verifies(packet: &[u8], segment: &Segment) -> bool {
    let l4 = segment.ip.header_len;
    if segment.flow.protocol == UDP && packet[l4 + 6..l4 + 8] == [0, 0] {
        return false;
    }
    let pseudo = checksum::pseudo_header(
        segment.ip.src,
        segment.ip.dst,
        segment.flow.protocol,
        packet.len() - l4,
    );
    checksum::verifies(checksum::sum(&packet[l4..], pseudo))
}

/// Fixes the lengths of a coalesced packet, leaves its transport checksum
/// partial (the pseudo-header sum over the whole super-packet, for the
/// kernel to adjust per segment and complete) and returns the virtio
/// header that announces it.
fn complete(packet: &mut [u8], gso: Gso) -> VirtioNetHdr {
    let total = packet.len();
    gso.ip.set_length(packet, total);
    let l4 = gso.ip.header_len;
    if !gso.ip.v6 {
        checksum::fix_ipv4_header(&mut packet[..l4]);
    }
    let l4_len = total - l4;
    let (gso_type, field) = match (gso.ip.protocol, gso.ip.v6) {
        (UDP, _) => {
            // Within MAX_PACKET, so the length fits.
            packet[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            (GsoType::UdpL4, 6)
        }
        (_, false) => (GsoType::TcpV4, 16),
        (_, true) => (GsoType::TcpV6, 16),
    };
    let pseudo = checksum::fold(checksum::pseudo_header(
        gso.ip.src,
        gso.ip.dst,
        gso.ip.protocol,
        l4_len,
    ));
    packet[l4 + field..l4 + field + 2].copy_from_slice(&pseudo.to_be_bytes());
    VirtioNetHdr {
        flags: NEEDS_CSUM,
        gso_type,
        ecn: false,
        hdr_len: gso.l4_end as u16,
        gso_size: gso.segment as u16,
        csum_start: l4 as u16,
        csum_offset: field as u16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::split;
    use crate::offload::testing::{
        datagram, packet, super_frame, tcp_packet, udp_packet, Datagram, Spec,
    };
    use proptest::prelude::*;

    fn segments_of(spec: &Spec) -> Vec<Vec<u8>> {
        let mut frame = super_frame(spec);
        let mut out = Vec::new();
        split(&mut frame, 1420, &mut Vec::new(), |p| out.push(p.to_vec())).unwrap();
        out
    }

    fn coalesce(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut coalescer = Coalescer::new(true);
        for p in packets {
            coalescer.push(p);
        }
        let frames = coalescer.finish().map(<[u8]>::to_vec).collect();
        coalescer.clear();
        frames
    }

    /// The payload bytes of a frame's packet, per flow (source port).
    fn payload(frame: &[u8]) -> (u16, Vec<u8>) {
        let packet = &frame[VIRTIO_NET_HDR_LEN..];
        let segment = parse(packet, true).unwrap();
        let port = u16::from_be_bytes([segment.flow.ports[0], segment.flow.ports[1]]);
        (port, packet[segment.l4_end..].to_vec())
    }

    fn tcp_spec() -> impl Strategy<Value = Spec> {
        Spec::strategy().prop_map(|spec| Spec {
            tcp: true,
            flags: tcp_flags::ACK | (spec.flags & tcp_flags::PSH),
            ..spec
        })
    }

    proptest! {
        #[test]
        fn coalescing_split_segments_restores_the_super_packet(spec in tcp_spec()) {
            prop_assume!(!spec.payload.is_empty());
            let segments = segments_of(&spec);
            let frames = coalesce(&segments);
            prop_assert_eq!(frames.len(), 1);
            let (_, data) = payload(&frames[0]);
            prop_assert_eq!(&data, &spec.payload);
            // Splitting the coalesced frame again yields the same segments.
            let mut frame = frames[0].clone();
            let mut again = Vec::new();
            split(&mut frame, 1420, &mut Vec::new(), |p| again.push(p.to_vec())).unwrap();
            prop_assert_eq!(again, segments);
        }

        #[test]
        fn interleaved_flows_stay_apart_and_in_order(
            a in tcp_spec(),
            b in tcp_spec(),
            picks in proptest::collection::vec(any::<bool>(), 0..64),
        ) {
            let b = Spec { ports: (a.ports.0.wrapping_add(1), a.ports.1), ..b };
            let (sa, sb) = (segments_of(&a), segments_of(&b));
            let (mut ia, mut ib) = (sa.iter(), sb.iter());
            let mut input = Vec::new();
            for pick in picks.into_iter().chain(std::iter::repeat_n(true, sa.len()))
                .chain(std::iter::repeat_n(false, sb.len()))
            {
                if let Some(p) = if pick { ia.next() } else { ib.next() } {
                    input.push(p.clone());
                }
            }
            let frames = coalesce(&input);
            let mut seen = std::collections::BTreeMap::<u16, Vec<u8>>::new();
            for frame in &frames {
                let (port, data) = payload(frame);
                seen.entry(port).or_default().extend_from_slice(&data);
            }
            prop_assert_eq!(seen.get(&a.ports.0).cloned().unwrap_or_default(), a.payload.clone());
            prop_assert_eq!(seen.get(&b.ports.0).cloned().unwrap_or_default(), b.payload.clone());
        }

        #[test]
        fn out_of_order_segments_are_never_joined(spec in tcp_spec(), at in any::<prop::sample::Index>()) {
            let mut segments = segments_of(&spec);
            prop_assume!(segments.len() >= 3);
            let i = at.index(segments.len() - 1);
            segments.swap(i, i + 1);
            let frames = coalesce(&segments);
            // The frames hold the segments' payloads in the order given.
            let given: Vec<u8> = segments.iter().flat_map(|s| {
                let seg = parse(s, true).unwrap();
                s[seg.l4_end..].to_vec()
            }).collect();
            let out: Vec<u8> = frames.iter().flat_map(|f| payload(f).1).collect();
            prop_assert_eq!(out, given);
            prop_assert!(frames.len() >= 2);
        }

        #[test]
        fn garbage_passes_through_unchanged(packets in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..200), 0..20)
        ) {
            let frames = coalesce(&packets);
            prop_assert_eq!(frames.len(), packets.len());
            for (frame, packet) in frames.iter().zip(&packets) {
                prop_assert_eq!(&frame[..VIRTIO_NET_HDR_LEN], &[0u8; VIRTIO_NET_HDR_LEN][..]);
                prop_assert_eq!(&frame[VIRTIO_NET_HDR_LEN..], &packet[..]);
            }
        }
    }

    fn two(first: &Spec, second: &Spec) -> usize {
        coalesce(&[packet(first), packet(second)]).len()
    }

    fn next(first: &Spec) -> Spec {
        Spec {
            seq: first.seq.wrapping_add(first.payload.len() as u32),
            ..first.clone()
        }
    }

    #[test]
    fn contiguous_segments_join() {
        let first = Spec {
            flags: tcp_flags::ACK,
            payload: vec![1; 1000],
            ..Spec::example()
        };
        assert_eq!(two(&first, &next(&first)), 1);
        let v6 = Spec { v6: true, ..first };
        assert_eq!(two(&v6, &next(&v6)), 1);
    }

    #[test]
    fn differing_fields_keep_segments_apart() {
        let first = Spec {
            flags: tcp_flags::ACK,
            payload: vec![1; 1000],
            ..Spec::example()
        };
        let cases = [
            Spec {
                ack: first.ack + 1,
                ..next(&first)
            },
            Spec {
                flags: tcp_flags::ACK | tcp_flags::FIN,
                ..next(&first)
            },
            Spec {
                flags: tcp_flags::ACK | tcp_flags::CWR,
                ..next(&first)
            },
            Spec {
                options: vec![1; 4],
                ..next(&first)
            },
            Spec {
                ports: (1, 2),
                ..next(&first)
            },
            Spec {
                seq: first.seq,
                ..next(&first)
            },
            Spec {
                payload: vec![1; 1001],
                ..next(&first)
            },
        ];
        for case in cases {
            assert_eq!(two(&first, &case), 2, "{case:?}");
        }
        // After a short or PSH segment nothing more joins.
        let short = Spec {
            payload: vec![1; 10],
            ..next(&first)
        };
        assert_eq!(
            coalesce(&[packet(&first), packet(&short), packet(&next(&short))]).len(),
            2
        );
        let psh = Spec {
            flags: tcp_flags::ACK | tcp_flags::PSH,
            ..next(&first)
        };
        assert_eq!(
            coalesce(&[packet(&first), packet(&psh), packet(&next(&psh))]).len(),
            2
        );
    }

    #[test]
    fn corrupt_segments_are_not_joined() {
        let first = Spec {
            flags: tcp_flags::ACK,
            payload: vec![1; 1000],
            ..Spec::example()
        };
        let mut bad = packet(&next(&first));
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let frames = coalesce(&[packet(&first), bad.clone()]);
        assert_eq!(frames.len(), 2);
        assert_eq!(&frames[1][VIRTIO_NET_HDR_LEN..], &bad[..]);
    }

    #[test]
    fn lone_packets_pass_with_a_plain_header() {
        let frames = coalesce(&[udp_packet(false, 100), tcp_packet(true, 0, tcp_flags::ACK)]);
        assert_eq!(frames.len(), 2);
        assert!(frames
            .iter()
            .all(|f| f[..VIRTIO_NET_HDR_LEN] == [0; VIRTIO_NET_HDR_LEN]));
    }

    /// The `n`th datagram after `first`, with the next IPv4 id.
    fn nth(first: &Datagram, n: u16) -> Datagram {
        Datagram {
            id: first.id.wrapping_add(n),
            ..first.clone()
        }
    }

    fn resplit(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for frame in frames {
            let mut frame = frame.clone();
            split(&mut frame, 1500, &mut Vec::new(), |p| out.push(p.to_vec())).unwrap();
        }
        out
    }

    #[test]
    fn a_udp_run_becomes_one_uso_frame() {
        for v6 in [false, true] {
            let first = Datagram::example(v6, 1000);
            let mut input: Vec<Vec<u8>> = (0..10).map(|n| datagram(&nth(&first, n))).collect();
            input.push(datagram(&Datagram {
                payload: vec![9; 300],
                ..nth(&first, 10)
            }));
            let frames = coalesce(&input);
            assert_eq!(frames.len(), 1);
            let header = VirtioNetHdr::decode(&frames[0]).unwrap();
            let l4 = if v6 { 40 } else { 20 };
            assert_eq!(
                header,
                VirtioNetHdr {
                    flags: NEEDS_CSUM,
                    gso_type: GsoType::UdpL4,
                    ecn: false,
                    hdr_len: l4 + 8,
                    gso_size: 1000,
                    csum_start: l4,
                    csum_offset: 6,
                }
            );
            let packet = &frames[0][VIRTIO_NET_HDR_LEN..];
            let l4 = usize::from(l4);
            let ip = Ip::parse(packet).unwrap();
            assert_eq!(ip.declared_length(packet), packet.len());
            assert_eq!(packet.len(), l4 + 8 + 10 * 1000 + 300);
            let udp_len = u16::from_be_bytes([packet[l4 + 4], packet[l4 + 5]]);
            assert_eq!(usize::from(udp_len), packet.len() - l4);
            let pseudo = checksum::fold(checksum::pseudo_header(
                ip.src,
                ip.dst,
                UDP,
                packet.len() - l4,
            ));
            assert_eq!(packet[l4 + 6..l4 + 8], pseudo.to_be_bytes());
            if !v6 {
                assert!(checksum::verifies(checksum::sum(&packet[..20], 0)));
            }
            assert_eq!(resplit(&frames), input);
        }
    }

    #[test]
    fn udp_datagrams_that_differ_stay_apart() {
        for v6 in [false, true] {
            let first = Datagram::example(v6, 1000);
            let next = nth(&first, 1);
            let mut cases = vec![
                Datagram {
                    ports: (1, 2),
                    ..next.clone()
                },
                Datagram {
                    class: 0x10,
                    ..next.clone()
                },
                Datagram {
                    ttl: 63,
                    ..next.clone()
                },
                Datagram {
                    payload: vec![1; 1001],
                    ..next.clone()
                },
                Datagram {
                    payload: Vec::new(),
                    ..next.clone()
                },
            ];
            if v6 {
                cases.push(Datagram {
                    flow_label: 5,
                    ..next.clone()
                });
            } else {
                cases.push(nth(&first, 2));
                cases.push(nth(&first, 0));
            }
            for case in cases {
                let frames = coalesce(&[datagram(&first), datagram(&case)]);
                assert_eq!(frames.len(), 2, "{case:?}");
            }
            let mut bad = datagram(&next);
            let last = bad.len() - 1;
            bad[last] ^= 1;
            let mut unsummed = datagram(&next);
            let l4 = if v6 { 40 } else { 20 };
            unsummed[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
            // Zero means "no checksum" (IPv4) or is invalid (IPv6) even
            // where the bytes happen to sum as if it were right.
            let mut zero_sums = datagram(&next);
            zero_sums[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
            let ip = Ip::parse(&zero_sums).unwrap();
            let pseudo = checksum::pseudo_header(ip.src, ip.dst, UDP, zero_sums.len() - l4);
            let off = checksum::fold(checksum::sum(&zero_sums[l4..], pseudo));
            let end = zero_sums.len();
            let word = u16::from_be_bytes([zero_sums[end - 2], zero_sums[end - 1]]);
            let fixed = checksum::fold(u64::from(word) + u64::from(0xffff - off));
            zero_sums[end - 2..].copy_from_slice(&fixed.to_be_bytes());
            assert!(checksum::verifies(checksum::sum(&zero_sums[l4..], pseudo)));
            for odd in [bad, unsummed, zero_sums] {
                let frames = coalesce(&[datagram(&first), odd.clone()]);
                assert_eq!(frames.len(), 2);
                assert_eq!(&frames[1][VIRTIO_NET_HDR_LEN..], &odd[..]);
                // A datagram that cannot join cannot start a frame either.
                assert_eq!(coalesce(&[odd, datagram(&next)]).len(), 2);
            }
        }
        // Nor does one whose DF bit differs.
        let first = Datagram::example(false, 1000);
        let mut no_df = datagram(&nth(&first, 1));
        no_df[6] = 0;
        checksum::fix_ipv4_header(&mut no_df[..20]);
        assert_eq!(coalesce(&[datagram(&first), no_df]).len(), 2);
    }

    #[test]
    fn a_short_datagram_ends_the_frame() {
        let first = Datagram::example(false, 1000);
        let short = Datagram {
            payload: vec![3; 500],
            ..nth(&first, 1)
        };
        let input = [
            datagram(&first),
            datagram(&short),
            datagram(&nth(&first, 2)),
        ];
        let frames = coalesce(&input);
        assert_eq!(frames.len(), 2);
        assert_eq!(resplit(&frames), input);
    }

    #[test]
    fn a_udp_frame_holds_at_most_64_datagrams_and_64_kib() {
        let small = Datagram::example(false, 100);
        let input: Vec<Vec<u8>> = (0..130).map(|n| datagram(&nth(&small, n))).collect();
        let frames = coalesce(&input);
        let sizes: Vec<u16> = frames
            .iter()
            .map(|f| {
                let p = &f[VIRTIO_NET_HDR_LEN..];
                (u16::from_be_bytes([p[24], p[25]]) - 8) / 100
            })
            .collect();
        assert_eq!(sizes, [64, 64, 2]);
        assert_eq!(resplit(&frames), input);

        let large = Datagram::example(true, 1400);
        let input: Vec<Vec<u8>> = (0..60).map(|n| datagram(&nth(&large, n))).collect();
        let frames = coalesce(&input);
        assert_eq!(frames.len(), 2);
        assert!(frames
            .iter()
            .all(|f| f.len() - VIRTIO_NET_HDR_LEN <= MAX_PACKET));
        assert_eq!(resplit(&frames), input);
    }

    #[test]
    fn without_uso_udp_passes_alone_and_tcp_still_joins() {
        let first = Datagram::example(false, 1000);
        let mut input: Vec<Vec<u8>> = (0..5).map(|n| datagram(&nth(&first, n))).collect();
        let tcp = Spec {
            flags: tcp_flags::ACK,
            payload: vec![1; 1000],
            ..Spec::example()
        };
        input.push(packet(&tcp));
        input.push(packet(&next(&tcp)));
        let mut coalescer = Coalescer::new(false);
        for p in &input {
            coalescer.push(p);
        }
        let frames: Vec<Vec<u8>> = coalescer.finish().map(<[u8]>::to_vec).collect();
        assert_eq!(frames.len(), 6);
        for (frame, packet) in frames.iter().zip(&input[..5]) {
            assert_eq!(&frame[..VIRTIO_NET_HDR_LEN], &[0u8; VIRTIO_NET_HDR_LEN][..]);
            assert_eq!(&frame[VIRTIO_NET_HDR_LEN..], &packet[..]);
        }
        assert_eq!(
            VirtioNetHdr::decode(&frames[5]).unwrap().gso_type,
            GsoType::TcpV4
        );
    }

    #[test]
    fn a_fragment_between_the_same_hosts_ends_the_frame() {
        let first = Datagram::example(false, 1000);
        let mut fragment = datagram(&nth(&first, 1));
        fragment[6] = 0x20; // more fragments
        checksum::fix_ipv4_header(&mut fragment[..20]);
        let input = [
            datagram(&first),
            fragment,
            datagram(&nth(&first, 2)),
            datagram(&nth(&first, 3)),
        ];
        let frames = coalesce(&input);
        assert_eq!(frames.len(), 3);
        assert_eq!(resplit(&frames), input);
    }

    /// What may be wrong with one datagram of a run.
    #[derive(Debug, Clone, Copy)]
    enum Fault {
        None,
        BadChecksum,
        NoChecksum,
        Ttl,
        IdJump,
        Fragment,
    }

    /// A UDP flow: family, first IPv4 id, and each datagram's payload
    /// length and fault.
    type UdpRun = (bool, u16, Vec<(usize, Fault)>);

    fn udp_run() -> impl Strategy<Value = UdpRun> {
        let len = prop_oneof![
            6 => prop::sample::select(vec![1000usize, 1372, 64]),
            1 => 0usize..1373,
        ];
        let fault = prop_oneof![
            20 => Just(Fault::None),
            1 => Just(Fault::BadChecksum),
            1 => Just(Fault::NoChecksum),
            1 => Just(Fault::Ttl),
            1 => Just(Fault::IdJump),
            1 => Just(Fault::Fragment),
        ];
        (
            any::<bool>(),
            any::<u16>(),
            proptest::collection::vec((len, fault), 0..150),
        )
    }

    fn udp_packets((v6, first_id, datagrams): &UdpRun, port: u16) -> Vec<Vec<u8>> {
        let mut id = *first_id;
        let l4 = if *v6 { 40 } else { 20 };
        datagrams
            .iter()
            .map(|&(len, fault)| {
                if matches!(fault, Fault::IdJump) {
                    id = id.wrapping_add(100);
                }
                let mut d = Datagram {
                    ports: (port, 53),
                    id,
                    ..Datagram::example(*v6, len)
                };
                id = id.wrapping_add(1);
                if matches!(fault, Fault::Ttl) {
                    d.ttl = 1;
                }
                let mut p = datagram(&d);
                match fault {
                    Fault::BadChecksum => {
                        p[l4 + 7] ^= 0x10;
                    }
                    Fault::NoChecksum => p[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]),
                    Fault::Fragment if !v6 => {
                        p[6] = 0x20;
                        checksum::fix_ipv4_header(&mut p[..20]);
                    }
                    _ => {}
                }
                p
            })
            .collect()
    }

    /// The flow a packet belongs to: protocol, family, source port.
    fn flow_key(packet: &[u8]) -> (u8, bool, u16) {
        let v6 = packet[0] >> 4 == 6;
        let (l4, protocol) = if v6 { (40, packet[6]) } else { (20, packet[9]) };
        (
            protocol,
            v6,
            u16::from_be_bytes([packet[l4], packet[l4 + 1]]),
        )
    }

    fn by_flow<'a>(
        packets: impl IntoIterator<Item = &'a Vec<u8>>,
    ) -> std::collections::BTreeMap<(u8, bool, u16), Vec<Vec<u8>>> {
        let mut flows = std::collections::BTreeMap::<_, Vec<Vec<u8>>>::new();
        for p in packets {
            flows.entry(flow_key(p)).or_default().push(p.clone());
        }
        flows
    }

    proptest! {
        #[test]
        fn coalescing_then_splitting_restores_every_flow(
            udp in proptest::collection::vec(udp_run(), 1..4),
            tcp in proptest::collection::vec(tcp_spec(), 0..3),
            picks in proptest::collection::vec(any::<prop::sample::Index>(), 0..400),
        ) {
            let mut flows: Vec<Vec<Vec<u8>>> = udp
                .iter()
                .enumerate()
                .map(|(i, run)| udp_packets(run, 1000 + i as u16))
                .collect();
            flows.extend(tcp.iter().enumerate().map(|(i, spec)| {
                segments_of(&Spec { ports: (2000 + i as u16, 80), ..spec.clone() })
            }));
            let mut cursors = vec![0usize; flows.len()];
            let mut input = Vec::new();
            for pick in &picks {
                let f = pick.index(flows.len());
                if let Some(p) = flows[f].get(cursors[f]) {
                    input.push(p.clone());
                    cursors[f] += 1;
                }
            }
            for (flow, cursor) in flows.iter().zip(&cursors) {
                input.extend_from_slice(&flow[*cursor..]);
            }
            prop_assert_eq!(input.len(), flows.iter().map(Vec::len).sum::<usize>());
            let frames = coalesce(&input);
            prop_assert!(frames.len() <= input.len());
            for frame in &frames {
                prop_assert!(frame.len() - VIRTIO_NET_HDR_LEN <= MAX_PACKET);
                let header = VirtioNetHdr::decode(frame).unwrap();
                if header.gso_type == GsoType::UdpL4 {
                    let payload = frame.len() - VIRTIO_NET_HDR_LEN - usize::from(header.hdr_len);
                    prop_assert!(payload.div_ceil(usize::from(header.gso_size)) <= MAX_UDP_SEGMENTS);
                }
            }
            prop_assert_eq!(by_flow(&resplit(&frames)), by_flow(&input));
        }

        #[test]
        fn clean_udp_runs_coalesce_fully(v6: bool, id: u16, len in 1usize..1373, count in 1usize..300) {
            let first = Datagram { id, ..Datagram::example(v6, len) };
            let input: Vec<Vec<u8>> = (0..count).map(|n| datagram(&nth(&first, n as u16))).collect();
            let frames = coalesce(&input);
            let per_frame = MAX_UDP_SEGMENTS.min((MAX_PACKET - if v6 { 48 } else { 28 }) / len);
            prop_assert_eq!(frames.len(), count.div_ceil(per_frame));
            prop_assert_eq!(resplit(&frames), input);
        }
    }
}
