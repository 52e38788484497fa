//! Coalescing (GRO in software): consecutive TCP segments of one flow, as
//! the core hands them over for the TUN device, become one super-packet
//! the kernel segments itself if it must.

use std::net::IpAddr;

use super::checksum;
use super::headers::{self, tcp_flags, Ip, TCP};
use super::virtio::{GsoType, VirtioNetHdr, NEEDS_CSUM, VIRTIO_NET_HDR_LEN};

/// The largest super-packet: what the IP length fields can express.
const MAX_PACKET: usize = 65_535;

/// Collects the packets of one flush and turns them into frames for a TUN
/// device opened with `IFF_VNET_HDR`.
///
/// Drive it with [`Coalescer::push`] for every packet, in order, then
/// [`Coalescer::finish`] to write the frames out, then
/// [`Coalescer::clear`]. A packet joins the frame of its flow only when it
/// continues it exactly: contiguous sequence number, same ACK, window,
/// flags (PSH only on the last), options and IP fields, a verified
/// checksum, and a payload no larger than the first segment's. Anything
/// else — other protocols, SYN/FIN/RST, out-of-order or corrupt segments —
/// passes through alone, and ends the flow's frame so the order within a
/// flow is kept.
#[derive(Debug, Default)]
pub struct Coalescer {
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
    next_seq: u32,
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
    ports: [u8; 4],
}

/// A TCP segment's fields that decide whether it may join a frame.
struct Segment {
    ip: Ip,
    flow: Flow,
    l4_end: usize,
    seq: u32,
    flags: u8,
    payload: usize,
}

impl Coalescer {
    /// Adds the next packet for the device.
    pub fn push(&mut self, packet: &[u8]) {
        let Some(segment) = parse_tcp(packet) else {
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
            next_seq: segment.seq.wrapping_add(segment.payload as u32),
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
        let fits = segment.seq == open.next_seq
            && segment.payload > 0
            && segment.payload <= open.segment
            && head.len() + segment.payload <= MAX_PACKET
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
            next_seq: open.next_seq.wrapping_add(segment.payload as u32),
            ..open
        });
        true
    }
}

/// Reads the TCP fields of `packet`, if it is a TCP packet whose headers
/// hold together.
fn parse_tcp(packet: &[u8]) -> Option<Segment> {
    let ip = Ip::parse(packet).ok()?;
    if ip.protocol != TCP {
        return None;
    }
    if ip.declared_length(packet) != packet.len() {
        return None;
    }
    let l4 = ip.header_len;
    let l4_end = l4 + headers::tcp_header_len(packet, l4).ok()?;
    let tcp = &packet[l4..];
    Some(Segment {
        ip,
        flow: Flow {
            src: ip.src,
            dst: ip.dst,
            ports: [tcp[0], tcp[1], tcp[2], tcp[3]],
        },
        l4_end,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        flags: tcp[13],
        payload: packet.len() - l4_end,
    })
}

/// Whether `packet` may be the first segment of a super-packet: a plain
/// IPv4 header (no options) or IPv6, only ACK (and PSH) set, some payload,
/// an intact checksum.
fn starts_frame(packet: &[u8], segment: &Segment) -> bool {
    let plain_ip = segment.ip.v6 || segment.ip.header_len == 20;
    let flags_ok = segment.flags & !tcp_flags::PSH == tcp_flags::ACK;
    plain_ip && flags_ok && segment.payload > 0 && verifies(packet, segment)
}

/// Whether `packet` has the same IP and TCP header fields as the frame's
/// first packet `head`, PSH and the fields segmentation changes aside.
fn same_headers(head: &[u8], packet: &[u8], segment: &Segment) -> bool {
    let l4 = segment.ip.header_len;
    let Some(head_l4_end) = head
        .get(l4 + 12)
        .map(|offset| l4 + usize::from(offset >> 4) * 4)
    else {
        return false;
    };
    if head_l4_end != segment.l4_end {
        return false;
    }
    let ip_same = if segment.ip.v6 {
        head[..4] == packet[..4] && head[6..8] == packet[6..8]
    } else {
        head[..2] == packet[..2] && head[6..10] == packet[6..10]
    };
    let (a, b) = (&head[l4..segment.l4_end], &packet[l4..segment.l4_end]);
    let ack_same = a[8..12] == b[8..12];
    let flags_same = a[12] == b[12] && (a[13] & !tcp_flags::PSH) == (b[13] & !tcp_flags::PSH);
    let window_same = a[14..16] == b[14..16];
    let options_same = a[20..] == b[20..];
    ip_same && ack_same && flags_same && window_same && options_same
}

/// Whether the TCP checksum of `packet` is right: a coalesced frame is
/// handed to the kernel with the checksum to recompute, so a corrupt
/// segment must not slip into one.
fn verifies(packet: &[u8], segment: &Segment) -> bool {
    let l4 = segment.ip.header_len;
    let pseudo = checksum::pseudo_header(segment.ip.src, segment.ip.dst, TCP, packet.len() - l4);
    checksum::verifies(checksum::sum(&packet[l4..], pseudo))
}

/// Fixes the lengths of a coalesced packet, leaves its TCP checksum partial
/// (the pseudo-header sum, for the kernel to complete) and returns the
/// virtio header that announces it.
fn complete(packet: &mut [u8], gso: Gso) -> VirtioNetHdr {
    let total = packet.len();
    gso.ip.set_length(packet, total);
    let l4 = gso.ip.header_len;
    if !gso.ip.v6 {
        checksum::fix_ipv4_header(&mut packet[..l4]);
    }
    let pseudo = checksum::fold(checksum::pseudo_header(
        gso.ip.src,
        gso.ip.dst,
        TCP,
        total - l4,
    ));
    packet[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    VirtioNetHdr {
        flags: NEEDS_CSUM,
        gso_type: if gso.ip.v6 {
            GsoType::TcpV6
        } else {
            GsoType::TcpV4
        },
        ecn: false,
        hdr_len: gso.l4_end as u16,
        gso_size: gso.segment as u16,
        csum_start: l4 as u16,
        csum_offset: 16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::split;
    use crate::offload::testing::{packet, super_frame, tcp_packet, udp_packet, Spec};
    use proptest::prelude::*;

    fn segments_of(spec: &Spec) -> Vec<Vec<u8>> {
        let mut frame = super_frame(spec);
        let mut out = Vec::new();
        split(&mut frame, 1420, &mut Vec::new(), |p| out.push(p.to_vec())).unwrap();
        out
    }

    fn coalesce(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut coalescer = Coalescer::default();
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
        let segment = parse_tcp(packet).unwrap();
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
                let seg = parse_tcp(s).unwrap();
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
    fn other_protocols_pass_alone_with_a_plain_header() {
        let frames = coalesce(&[udp_packet(false, 100), tcp_packet(true, 0, tcp_flags::ACK)]);
        assert_eq!(frames.len(), 2);
        assert!(frames
            .iter()
            .all(|f| f[..VIRTIO_NET_HDR_LEN] == [0; VIRTIO_NET_HDR_LEN]));
    }
}
