//! Answers for packets too big for the tunnel, as a router on the path
//! would give them: ICMP "fragmentation needed" (RFC 792, RFC 1191) for
//! IPv4 with DF set and ICMPv6 "packet too big" (RFC 4443, RFC 8201) for
//! IPv6. The host's stack learns the tunnel's MTU from them (path MTU
//! discovery) and sends smaller packets from then on.
//!
//! IPv4 without DF may be fragmented on the way, so it is sent as is: the
//! WireGuard datagram carrying it exceeds the underlay's MTU and the
//! underlay fragments that outer UDP datagram, which arrives whole or not
//! at all. Fragmenting the inner packet instead would cost the same
//! bytes and a second copy of the IP header per piece.
//!
//! The answers come from the packet's destination (the peer's address):
//! Linux drops a packet arriving on the TUN device from one of its own
//! addresses as a martian, so an answer from the node's own overlay
//! address would never reach the socket that has to learn the MTU.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::offload::checksum;

/// What to do with a packet from the TUN device, given the tunnel's MTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// It is not longer than the tunnel's MTU: send it.
    Fits,
    /// IPv4 without DF, longer than the MTU: send it as is (the underlay
    /// fragments the outer datagram).
    Fragmentable,
    /// Drop it and answer with [`write_answer`].
    Answer,
    /// Drop it without an answer.
    Silent(Silence),
}

/// Why an oversized packet gets no answer (RFC 1122 3.2.2, RFC 4443 2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Silence {
    /// Its source is not one of this node's addresses: the answer would
    /// go somewhere the node cannot vouch for (or nowhere: a multicast,
    /// broadcast or unspecified source).
    ForeignSource,
    /// It is itself an ICMP error: errors about errors can loop.
    IcmpError,
    /// A non-first IPv4 fragment.
    Fragment,
    /// An IPv4 multicast or broadcast destination.
    GroupDestination,
    /// The IP header is cut short or inconsistent.
    Malformed,
}

/// The largest IPv4 datagram every host accepts; an answer stays within it.
const MAX_V4_ANSWER: usize = 576;
/// IPv6's minimum link MTU; an answer stays within it (RFC 4443 2.4 (c)).
const MIN_V6_MTU: usize = 1280;

/// Classifies `packet`, read from the TUN device, against a tunnel `mtu`.
/// `own` are this node's overlay addresses: only packets from them are
/// answered. Never panics, whatever the bytes.
pub(crate) fn classify(packet: &[u8], mtu: u16, own: &[IpAddr]) -> Verdict {
    match packet.first().map(|b| b >> 4) {
        Some(4) => classify_v4(packet, usize::from(mtu), own),
        Some(6) => classify_v6(packet, usize::from(mtu), own),
        _ => Verdict::Silent(Silence::Malformed),
    }
}

/// Writes into `out` the answer to `packet`, which [`classify`] said to
/// answer: ICMP type 3 code 4 with next-hop MTU `mtu` quoting the IP header
/// and 8 bytes, or ICMPv6 type 2 with MTU `max(mtu, 1280)` quoting as much
/// as fits in 1280 bytes. Returns `false`, leaving `out` unspecified, when
/// `packet` is too short to answer.
pub(crate) fn write_answer(packet: &[u8], mtu: u16, out: &mut Vec<u8>) -> bool {
    out.clear();
    match packet.first().map(|b| b >> 4) {
        Some(4) => write_v4(packet, mtu, out),
        Some(6) => write_v6(packet, mtu, out),
        _ => false,
    }
}

/// A token bucket: `burst` answers at once, then one per `interval`.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    tokens: u32,
    burst: u32,
    interval: Duration,
    /// When the bucket was last topped up by whole tokens.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(burst: u32, interval: Duration, now: Instant) -> Self {
        Self {
            tokens: burst,
            burst,
            interval: interval.max(Duration::from_nanos(1)),
            last: now,
        }
    }

    /// Takes a token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        let earned = elapsed.as_nanos() / self.interval.as_nanos();
        let missing = self.burst - self.tokens;
        match u32::try_from(earned) {
            Ok(earned) if earned < missing => {
                self.tokens += earned;
                self.last += self.interval * earned;
            }
            _ => {
                self.tokens = self.burst;
                self.last = now;
            }
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const ICMP_HEADER: usize = 8;
/// The IPv4 flag "don't fragment".
const DF: u16 = 0x4000;
/// Enough for any sane IPv6 extension header chain.
const MAX_EXTENSION_HEADERS: usize = 8;

fn classify_v4(packet: &[u8], mtu: usize, own: &[IpAddr]) -> Verdict {
    if packet.len() <= mtu {
        return Verdict::Fits;
    }
    let Some(header) = packet.get(..IPV4_HEADER) else {
        return Verdict::Silent(Silence::Malformed);
    };
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header_len < IPV4_HEADER || header_len > packet.len() {
        return Verdict::Silent(Silence::Malformed);
    }
    let flags = u16::from_be_bytes([header[6], header[7]]);
    if flags & DF == 0 {
        return Verdict::Fragmentable;
    }
    if flags & 0x1fff != 0 {
        return Verdict::Silent(Silence::Fragment);
    }
    let src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    if !own.contains(&IpAddr::V4(src)) {
        return Verdict::Silent(Silence::ForeignSource);
    }
    if dst.is_multicast() || dst.is_broadcast() {
        return Verdict::Silent(Silence::GroupDestination);
    }
    if header[9] == ICMP {
        // Destination unreachable, source quench, redirect, time exceeded,
        // parameter problem; a message too short to tell is not answered.
        match packet.get(header_len) {
            Some(3 | 4 | 5 | 11 | 12) | None => return Verdict::Silent(Silence::IcmpError),
            Some(_) => {}
        }
    }
    Verdict::Answer
}

fn classify_v6(packet: &[u8], mtu: usize, own: &[IpAddr]) -> Verdict {
    // IPv6 links carry 1280 bytes at least: the underlay fragments the
    // outer datagram of anything up to that.
    if packet.len() <= mtu.max(MIN_V6_MTU) {
        return Verdict::Fits;
    }
    let Some(header) = packet.get(..IPV6_HEADER) else {
        return Verdict::Silent(Silence::Malformed);
    };
    let mut src = [0u8; 16];
    src.copy_from_slice(&header[8..24]);
    if !own.contains(&IpAddr::V6(Ipv6Addr::from(src))) {
        return Verdict::Silent(Silence::ForeignSource);
    }
    match upper_layer_v6(packet) {
        // Error messages are types 0 to 127.
        Some((ICMPV6, Some(kind))) if kind < 128 => Verdict::Silent(Silence::IcmpError),
        // An ICMPv6 message too short to tell.
        Some((ICMPV6, None)) => Verdict::Silent(Silence::IcmpError),
        Some(_) => Verdict::Answer,
        None => Verdict::Silent(Silence::Malformed),
    }
}

/// The upper-layer protocol of an IPv6 packet after its extension headers,
/// and the byte after them (an ICMPv6 message's type). A non-first
/// fragment's protocol is the fragment header's next header, with no byte:
/// what follows is data. `None` for a chain cut short or too long.
fn upper_layer_v6(packet: &[u8]) -> Option<(u8, Option<u8>)> {
    let mut next = *packet.get(6)?;
    let mut at = IPV6_HEADER;
    for _ in 0..MAX_EXTENSION_HEADERS {
        let len = match next {
            // Hop-by-hop, routing, destination options.
            0 | 43 | 60 => (usize::from(*packet.get(at + 1)?) + 1) * 8,
            44 => {
                let offset = u16::from_be_bytes([*packet.get(at + 2)?, *packet.get(at + 3)?]) >> 3;
                if offset != 0 {
                    return Some((*packet.get(at)?, None));
                }
                8
            }
            // Authentication header.
            51 => (usize::from(*packet.get(at + 1)?) + 2) * 4,
            protocol => return Some((protocol, packet.get(at).copied())),
        };
        next = *packet.get(at)?;
        at += len;
    }
    None
}

fn write_v4(packet: &[u8], mtu: u16, out: &mut Vec<u8>) -> bool {
    let Some(header) = packet.get(..IPV4_HEADER) else {
        return false;
    };
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header_len < IPV4_HEADER {
        return false;
    }
    // The header and 8 bytes: at most 60 + 8, well within 576 in all.
    let quote_len = packet
        .len()
        .min(header_len + 8)
        .min(MAX_V4_ANSWER - IPV4_HEADER - ICMP_HEADER);
    let quote = &packet[..quote_len];
    let total = IPV4_HEADER + ICMP_HEADER + quote.len();
    let Ok(total_field) = u16::try_from(total) else {
        return false;
    };
    out.extend_from_slice(&[0x45, 0xc0]);
    out.extend_from_slice(&total_field.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 64, ICMP, 0, 0]);
    // From the packet's destination, back to its source.
    out.extend_from_slice(&header[16..20]);
    out.extend_from_slice(&header[12..16]);
    checksum::fix_ipv4_header(&mut out[..IPV4_HEADER]);
    out.extend_from_slice(&[3, 4, 0, 0, 0, 0]);
    out.extend_from_slice(&mtu.to_be_bytes());
    out.extend_from_slice(quote);
    let sum = checksum::finish(checksum::sum(&out[IPV4_HEADER..], 0));
    out[IPV4_HEADER + 2..IPV4_HEADER + 4].copy_from_slice(&sum.to_be_bytes());
    true
}

fn write_v6(packet: &[u8], mtu: u16, out: &mut Vec<u8>) -> bool {
    let Some(header) = packet.get(..IPV6_HEADER) else {
        return false;
    };
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&header[24..40]);
    dst.copy_from_slice(&header[8..24]);
    let quote = &packet[..packet.len().min(MIN_V6_MTU - IPV6_HEADER - ICMP_HEADER)];
    let icmp_len = ICMP_HEADER + quote.len();
    let Ok(payload_field) = u16::try_from(icmp_len) else {
        return false;
    };
    let reported = u32::from(mtu).max(MIN_V6_MTU as u32);
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&payload_field.to_be_bytes());
    out.extend_from_slice(&[ICMPV6, 64]);
    out.extend_from_slice(&src);
    out.extend_from_slice(&dst);
    out.extend_from_slice(&[2, 0, 0, 0]);
    out.extend_from_slice(&reported.to_be_bytes());
    out.extend_from_slice(quote);
    let pseudo = checksum::pseudo_header(
        IpAddr::V6(Ipv6Addr::from(src)),
        IpAddr::V6(Ipv6Addr::from(dst)),
        ICMPV6,
        icmp_len,
    );
    let sum = checksum::finish(checksum::sum(&out[IPV6_HEADER..], pseudo));
    out[IPV6_HEADER + 2..IPV6_HEADER + 4].copy_from_slice(&sum.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::filter::test_packets;

    const MTU: u16 = 1420;
    const A4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
    const B4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
    const A6: Ipv6Addr = Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 1);
    const B6: Ipv6Addr = Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 2);
    const OWN: [IpAddr; 2] = [IpAddr::V4(A4), IpAddr::V6(A6)];

    /// A UDP packet of `len` bytes in all from `src` to `dst` (DF set for IPv4).
    fn udp(src: IpAddr, dst: IpAddr, len: usize) -> Vec<u8> {
        let header = if src.is_ipv4() { 28 } else { 48 };
        test_packets::udp(src, 5000, dst, 6000, &vec![0xab; len - header])
    }

    fn clear_df(mut packet: Vec<u8>) -> Vec<u8> {
        packet[6] &= !0x40;
        checksum::fix_ipv4_header(&mut packet[..20]);
        packet
    }

    /// Checks that `answer` is a well-formed answer to `packet` and returns
    /// the MTU it reports.
    fn check_answer(packet: &[u8], answer: &[u8]) -> u32 {
        if packet[0] >> 4 == 4 {
            assert!(answer.len() <= MAX_V4_ANSWER);
            assert_eq!(answer[0], 0x45);
            assert_eq!(
                usize::from(u16::from_be_bytes([answer[2], answer[3]])),
                answer.len()
            );
            assert!(checksum::verifies(checksum::sum(&answer[..20], 0)));
            assert_eq!(answer[9], ICMP);
            assert_eq!(&answer[12..16], &packet[16..20], "from the destination");
            assert_eq!(&answer[16..20], &packet[12..16], "to the source");
            let icmp = &answer[20..];
            assert_eq!((icmp[0], icmp[1]), (3, 4));
            assert!(checksum::verifies(checksum::sum(icmp, 0)));
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            let quoted = &icmp[8..];
            assert_eq!(quoted, &packet[..packet.len().min(header_len + 8)]);
            u32::from(u16::from_be_bytes([icmp[6], icmp[7]]))
        } else {
            assert!(answer.len() <= MIN_V6_MTU);
            assert_eq!(answer[0] >> 4, 6);
            assert_eq!(
                usize::from(u16::from_be_bytes([answer[4], answer[5]])) + 40,
                answer.len()
            );
            assert_eq!(answer[6], ICMPV6);
            assert_eq!(&answer[8..24], &packet[24..40], "from the destination");
            assert_eq!(&answer[24..40], &packet[8..24], "to the source");
            let icmp = &answer[40..];
            let src = IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&answer[8..24]).unwrap(),
            ));
            let dst = IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&answer[24..40]).unwrap(),
            ));
            let pseudo = checksum::pseudo_header(src, dst, ICMPV6, icmp.len());
            assert!(checksum::verifies(checksum::sum(icmp, pseudo)));
            assert_eq!((icmp[0], icmp[1]), (2, 0));
            assert_eq!(&icmp[8..], &packet[..icmp.len() - 8]);
            assert_eq!(
                answer.len(),
                packet.len().min(MIN_V6_MTU),
                "quotes as much as fits"
            );
            u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]])
        }
    }

    #[test]
    fn an_oversized_df_packet_gets_fragmentation_needed_with_the_mtu() {
        let packet = udp(A4.into(), B4.into(), 1500);
        assert_eq!(classify(&packet, MTU, &OWN), Verdict::Answer);
        let mut out = Vec::new();
        assert!(write_answer(&packet, MTU, &mut out));
        assert_eq!(check_answer(&packet, &out), 1420);
        assert_eq!(out.len(), 20 + 8 + 20 + 8);
    }

    #[test]
    fn a_packet_of_exactly_the_mtu_fits() {
        assert_eq!(
            classify(&udp(A4.into(), B4.into(), 1420), MTU, &OWN),
            Verdict::Fits
        );
        assert_eq!(
            classify(&udp(A6.into(), B6.into(), 1420), MTU, &OWN),
            Verdict::Fits
        );
        assert_eq!(
            classify(&udp(A4.into(), B4.into(), 1421), MTU, &OWN),
            Verdict::Answer
        );
        assert_eq!(
            classify(&udp(A6.into(), B6.into(), 1421), MTU, &OWN),
            Verdict::Answer
        );
    }

    #[test]
    fn ipv4_without_df_is_sent_for_the_underlay_to_fragment() {
        let packet = clear_df(udp(A4.into(), B4.into(), 1500));
        assert_eq!(classify(&packet, MTU, &OWN), Verdict::Fragmentable);
    }

    #[test]
    fn oversized_ipv6_gets_packet_too_big_quoting_up_to_1280_bytes() {
        let packet = udp(A6.into(), B6.into(), 1500);
        assert_eq!(classify(&packet, MTU, &OWN), Verdict::Answer);
        let mut out = Vec::new();
        assert!(write_answer(&packet, MTU, &mut out));
        assert_eq!(check_answer(&packet, &out), 1420);
        assert_eq!(out.len(), 1280);
    }

    #[test]
    fn ipv6_never_reports_less_than_1280_nor_answers_up_to_it() {
        let small_mtu = 1200;
        assert_eq!(
            classify(&udp(A6.into(), B6.into(), 1280), small_mtu, &OWN),
            Verdict::Fits
        );
        let packet = udp(A6.into(), B6.into(), 1300);
        assert_eq!(classify(&packet, small_mtu, &OWN), Verdict::Answer);
        let mut out = Vec::new();
        assert!(write_answer(&packet, small_mtu, &mut out));
        assert_eq!(check_answer(&packet, &out), 1280);
    }

    #[test]
    fn packets_from_other_sources_are_not_answered() {
        for src in [
            IpAddr::V4(B4),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V4(Ipv4Addr::new(224, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::BROADCAST),
        ] {
            let packet = udp(src, A4.into(), 1500);
            assert_eq!(
                classify(&packet, MTU, &OWN),
                Verdict::Silent(Silence::ForeignSource),
                "{src}"
            );
        }
        for src in [IpAddr::V6(B6), IpAddr::V6(Ipv6Addr::UNSPECIFIED)] {
            let packet = udp(src, B6.into(), 1500);
            assert_eq!(
                classify(&packet, MTU, &OWN),
                Verdict::Silent(Silence::ForeignSource)
            );
        }
        // Nothing is answered before the node knows its own addresses.
        assert_eq!(
            classify(&udp(A4.into(), B4.into(), 1500), MTU, &[]),
            Verdict::Silent(Silence::ForeignSource)
        );
    }

    #[test]
    fn group_destinations_and_later_fragments_are_not_answered() {
        let packet = udp(A4.into(), Ipv4Addr::new(239, 1, 2, 3).into(), 1500);
        assert_eq!(
            classify(&packet, MTU, &OWN),
            Verdict::Silent(Silence::GroupDestination)
        );
        let mut fragment = udp(A4.into(), B4.into(), 1500);
        fragment[6..8].copy_from_slice(&(0x4000u16 | 185).to_be_bytes());
        assert_eq!(
            classify(&fragment, MTU, &OWN),
            Verdict::Silent(Silence::Fragment)
        );
    }

    /// An ICMP (v4) or ICMPv6 (v6) message of `kind` padded to `len` bytes.
    fn icmp(src: IpAddr, dst: IpAddr, kind: u8, len: usize) -> Vec<u8> {
        let mut packet = test_packets::echo(src, dst, false, 1, 1);
        let at = if src.is_ipv4() { 20 } else { 40 };
        packet[at] = kind;
        packet.resize(len, 0);
        let length = if src.is_ipv4() { len } else { len - 40 };
        let field = if src.is_ipv4() { 2 } else { 4 };
        packet[field..field + 2].copy_from_slice(&u16::try_from(length).unwrap().to_be_bytes());
        packet
    }

    #[test]
    fn icmp_errors_are_never_answered_but_echoes_are() {
        for kind in [3, 4, 5, 11, 12] {
            let packet = icmp(A4.into(), B4.into(), kind, 1500);
            assert_eq!(
                classify(&packet, MTU, &OWN),
                Verdict::Silent(Silence::IcmpError)
            );
        }
        assert_eq!(
            classify(&icmp(A4.into(), B4.into(), 8, 1500), MTU, &OWN),
            Verdict::Answer
        );
        for kind in [1, 2, 3, 4] {
            let packet = icmp(A6.into(), B6.into(), kind, 1500);
            assert_eq!(
                classify(&packet, MTU, &OWN),
                Verdict::Silent(Silence::IcmpError)
            );
        }
        assert_eq!(
            classify(&icmp(A6.into(), B6.into(), 128, 1500), MTU, &OWN),
            Verdict::Answer
        );
    }

    #[test]
    fn an_icmpv6_error_behind_extension_headers_is_recognised() {
        let mut packet = icmp(A6.into(), B6.into(), 1, 1500);
        // Insert an empty destination-options header before the ICMPv6 message.
        let options = [ICMPV6, 0, 1, 4, 0, 0, 0, 0];
        packet.splice(40..40, options);
        packet[6] = 60;
        assert_eq!(
            classify(&packet, MTU, &OWN),
            Verdict::Silent(Silence::IcmpError)
        );
        // A chain longer than any sane one is malformed.
        let mut endless = udp(A6.into(), B6.into(), 1500);
        endless[6] = 0;
        for header in 0..=MAX_EXTENSION_HEADERS {
            endless[40 + header * 8..42 + header * 8].copy_from_slice(&[0, 0]);
        }
        assert_eq!(
            classify(&endless, MTU, &OWN),
            Verdict::Silent(Silence::Malformed)
        );
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let start = crate::test_clock();
        let mut bucket = TokenBucket::new(20, Duration::from_millis(10), start);
        assert_eq!((0..30).filter(|_| bucket.take(start)).count(), 20);
        assert!(!bucket.take(start + Duration::from_millis(9)));
        assert!(bucket.take(start + Duration::from_millis(10)));
        assert!(!bucket.take(start + Duration::from_millis(15)));
        // One second brings 100 tokens, capped at the burst.
        let later = start + Duration::from_secs(1);
        assert_eq!((0..30).filter(|_| bucket.take(later)).count(), 20);
        // Over a second of steady demand, about the rate gets through.
        let mut sent = 0;
        for ms in 1..=1000 {
            if bucket.take(later + Duration::from_millis(ms)) {
                sent += 1;
            }
        }
        assert_eq!(sent, 100);
    }

    fn oversized() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<bool>(),
            1421usize..9000,
            proptest::collection::vec(any::<u8>(), 0..64),
            0u8..=10,
            prop::sample::select(vec![17u8, 1, 58, 0, 43, 44, 60]),
        )
            .prop_map(|(v6, len, head, options, next)| {
                let (src, dst): (IpAddr, IpAddr) = if v6 {
                    (A6.into(), B6.into())
                } else {
                    (A4.into(), B4.into())
                };
                let mut packet = udp(src, dst, len);
                if !v6 {
                    // IPv4 options: widen the header length, keep the rest.
                    packet[0] = 0x40 | (5 + options);
                    packet[9] = next;
                } else {
                    packet[6] = next;
                }
                let at = if v6 { 40 } else { 20 };
                let end = (at + head.len()).min(packet.len());
                packet[at..end].copy_from_slice(&head[..end - at]);
                packet
            })
    }

    proptest! {
        #[test]
        fn every_answer_is_valid_and_small(packet in oversized(), mtu in 576u16..1500) {
            if classify(&packet, mtu, &OWN) == Verdict::Answer {
                let mut out = Vec::new();
                prop_assert!(write_answer(&packet, mtu, &mut out));
                let reported = check_answer(&packet, &out);
                let expected = if packet[0] >> 4 == 6 { u32::from(mtu).max(1280) } else { u32::from(mtu) };
                prop_assert_eq!(reported, expected);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(packet in proptest::collection::vec(any::<u8>(), 0..3000), mtu: u16) {
            let _ = classify(&packet, mtu, &OWN);
            let mut out = Vec::new();
            if write_answer(&packet, mtu, &mut out) {
                prop_assert!(out.len() <= MIN_V6_MTU);
            }
        }
    }
}
