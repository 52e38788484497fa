//! Segmentation (TSO/USO in software): one super-packet from the TUN device
//! into packets of at most the MTU, each with correct lengths and checksums.

use super::checksum;
use super::headers::{self, tcp_flags, Ip, TCP, UDP};
use super::virtio::{GsoType, VirtioNetHdr, NEEDS_CSUM, VIRTIO_NET_HDR_LEN};
use super::OffloadError;

/// Cuts `frame` (a virtio header and the packet after it, as read from the
/// device) into IP packets of at most `mtu` bytes and hands each to `emit`,
/// in order. A plain packet whose checksum the kernel left to complete gets
/// it completed. `scratch` is reused between calls to build segments.
///
/// Everything is checked before the first packet is emitted: a malformed
/// frame yields an error and no packets.
pub fn split(
    frame: &mut [u8],
    mtu: usize,
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), OffloadError> {
    let header = VirtioNetHdr::decode(frame)?;
    let packet = &mut frame[VIRTIO_NET_HDR_LEN..];
    if header.gso_type == GsoType::None {
        if header.flags & NEEDS_CSUM != 0 {
            complete_checksum(packet, header.csum_start, header.csum_offset)?;
        }
        emit(packet);
        return Ok(());
    }
    let ip = Ip::parse(packet)?;
    let (protocol, v6) = match header.gso_type {
        GsoType::TcpV4 => (TCP, false),
        GsoType::TcpV6 => (TCP, true),
        _ => (UDP, ip.v6),
    };
    if ip.protocol != protocol || ip.v6 != v6 {
        return Err(OffloadError::Malformed("GSO type for this packet"));
    }
    // A frame cut short by the read would otherwise leave as segments with
    // fresh, valid checksums over the wrong bytes.
    if ip.declared_length(packet) != packet.len() {
        return Err(OffloadError::Malformed("IP length of a super-packet"));
    }
    let l4 = ip.header_len;
    let l4_end = if protocol == TCP {
        l4 + headers::tcp_header_len(packet, l4)?
    } else if l4 + 8 <= packet.len() {
        l4 + 8
    } else {
        return Err(OffloadError::Truncated("UDP header"));
    };
    let room = mtu
        .checked_sub(l4_end)
        .filter(|room| *room > 0)
        .ok_or(OffloadError::Malformed("headers longer than the MTU"))?;
    let segment = usize::from(header.gso_size).min(room);
    if segment == 0 {
        return Err(OffloadError::Malformed("zero GSO size"));
    }
    let (head, payload) = packet.split_at(l4_end);
    let count = payload.len().div_ceil(segment).max(1);
    for (index, start) in (0..count).map(|i| (i, i * segment)) {
        let end = (start + segment).min(payload.len());
        scratch.clear();
        scratch.extend_from_slice(head);
        scratch.extend_from_slice(&payload[start..end]);
        let position = Position {
            index,
            first: index == 0,
            last: index + 1 == count,
            offset: start,
        };
        fix_segment(scratch, &ip, l4, protocol, position);
        emit(scratch);
    }
    Ok(())
}

/// Where a segment sits in its super-packet.
#[derive(Debug, Clone, Copy)]
struct Position {
    index: usize,
    first: bool,
    last: bool,
    /// Payload bytes before this segment.
    offset: usize,
}

/// Rewrites the copied headers of one segment: lengths, IPv4 id and header
/// checksum, TCP sequence number and flags, transport checksum.
fn fix_segment(segment: &mut [u8], ip: &Ip, l4: usize, protocol: u8, at: Position) {
    let total = segment.len();
    ip.set_length(segment, total);
    if !ip.v6 {
        let id = u16::from_be_bytes([segment[4], segment[5]]).wrapping_add(at.index as u16);
        segment[4..6].copy_from_slice(&id.to_be_bytes());
        checksum::fix_ipv4_header(&mut segment[..l4]);
    }
    let l4_len = total - l4;
    let field = if protocol == TCP {
        let tcp = &mut segment[l4..];
        let seq =
            u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]).wrapping_add(at.offset as u32);
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        if !at.last {
            tcp[13] &= !(tcp_flags::FIN | tcp_flags::PSH);
        }
        if !at.first {
            tcp[13] &= !tcp_flags::CWR;
        }
        l4 + 16
    } else {
        segment[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
        l4 + 6
    };
    segment[field] = 0;
    segment[field + 1] = 0;
    let sum = checksum::sum(
        &segment[l4..],
        checksum::pseudo_header(ip.src, ip.dst, protocol, l4_len),
    );
    let value = match checksum::finish(sum) {
        0 => 0xffff,
        value => value,
    };
    segment[field..field + 2].copy_from_slice(&value.to_be_bytes());
}

/// Completes a checksum the kernel left partial: the field holds the
/// pseudo-header sum, the bytes from `start` to the end are still to add.
fn complete_checksum(packet: &mut [u8], start: u16, offset: u16) -> Result<(), OffloadError> {
    let start = usize::from(start);
    let field = start + usize::from(offset);
    if field + 2 > packet.len() {
        return Err(OffloadError::Malformed("checksum offset past the packet"));
    }
    let value = match checksum::finish(checksum::sum(&packet[start..], 0)) {
        0 => 0xffff,
        value => value,
    };
    packet[field..field + 2].copy_from_slice(&value.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::testing::{check_segment, super_frame, tcp_packet, udp_packet, Spec};
    use proptest::prelude::*;

    fn segments(frame: &mut [u8], mtu: usize) -> Result<Vec<Vec<u8>>, OffloadError> {
        let mut out = Vec::new();
        split(frame, mtu, &mut Vec::new(), |p| out.push(p.to_vec()))?;
        Ok(out)
    }

    proptest! {
        #[test]
        fn segments_are_valid_and_carry_the_whole_payload(spec in Spec::strategy()) {
            let mut frame = super_frame(&spec);
            let out = segments(&mut frame, 1420).unwrap();
            let mut payload = Vec::new();
            let mut next_seq = spec.seq;
            for (i, segment) in out.iter().enumerate() {
                prop_assert!(segment.len() <= 1420);
                let seen = check_segment(segment, &spec, i == 0, i + 1 == out.len());
                if spec.tcp {
                    prop_assert_eq!(seen.seq, next_seq);
                }
                next_seq = next_seq.wrapping_add(seen.payload.len() as u32);
                if i + 1 < out.len() {
                    prop_assert_eq!(seen.payload.len(), usize::from(spec.gso_size));
                }
                payload.extend_from_slice(&seen.payload);
            }
            prop_assert_eq!(payload, spec.payload.clone());
        }

        #[test]
        fn garbage_frames_never_panic(mut frame in proptest::collection::vec(any::<u8>(), 0..3000), mtu in 0usize..2000) {
            let _ = segments(&mut frame, mtu);
        }

        #[test]
        fn corrupted_super_frames_never_panic(
            spec in Spec::strategy(),
            at in any::<prop::sample::Index>(),
            byte: u8,
            cut in any::<prop::sample::Index>(),
        ) {
            let mut frame = super_frame(&spec);
            let at = at.index(frame.len());
            frame[at] = byte;
            let cut = cut.index(frame.len() + 1);
            let _ = segments(&mut frame[..cut], 1420);
        }
    }

    #[test]
    fn a_plain_packet_needing_its_checksum_gets_it() {
        for packet in [tcp_packet(false, 1000, 0x18), udp_packet(true, 300)] {
            let ip = Ip::parse(&packet).unwrap();
            let field = if ip.protocol == TCP { 16 } else { 6 };
            let mut partial = packet.clone();
            let l4_len = partial.len() - ip.header_len;
            let pseudo =
                checksum::fold(checksum::pseudo_header(ip.src, ip.dst, ip.protocol, l4_len));
            let at = ip.header_len + field;
            partial[at..at + 2].copy_from_slice(&pseudo.to_be_bytes());
            let header = VirtioNetHdr {
                flags: NEEDS_CSUM,
                csum_start: ip.header_len as u16,
                csum_offset: field as u16,
                ..VirtioNetHdr::PLAIN
            };
            let mut frame = vec![0u8; VIRTIO_NET_HDR_LEN];
            header.encode((&mut frame[..VIRTIO_NET_HDR_LEN]).try_into().unwrap());
            frame.extend_from_slice(&partial);
            let out = segments(&mut frame, 1420).unwrap();
            assert_eq!(out, vec![packet]);
        }
    }

    #[test]
    fn a_checksum_offset_past_the_end_is_refused() {
        let packet = udp_packet(false, 10);
        let header = VirtioNetHdr {
            flags: NEEDS_CSUM,
            csum_start: 20,
            csum_offset: packet.len() as u16,
            ..VirtioNetHdr::PLAIN
        };
        let mut frame = vec![0u8; VIRTIO_NET_HDR_LEN];
        header.encode((&mut frame[..VIRTIO_NET_HDR_LEN]).try_into().unwrap());
        frame.extend_from_slice(&packet);
        assert!(matches!(
            segments(&mut frame, 1420),
            Err(OffloadError::Malformed(_))
        ));
    }

    #[test]
    fn a_truncated_super_packet_is_refused() {
        let mut frame = super_frame(&Spec::example());
        let cut = frame.len() - 1;
        assert!(matches!(
            segments(&mut frame[..cut], 1420),
            Err(OffloadError::Malformed(_))
        ));
    }

    #[test]
    fn a_gso_type_that_contradicts_the_packet_is_refused() {
        let spec = Spec {
            v6: false,
            ..Spec::example()
        };
        let mut frame = super_frame(&spec);
        frame[1] = 4; // TCPV6 on an IPv4 packet
        assert!(matches!(
            segments(&mut frame, 1420),
            Err(OffloadError::Malformed(_))
        ));
    }
}
