//! Just enough IPv4 and IPv6 header parsing to route and filter a packet.
//!
//! Parsing never panics and never allocates: every length is checked before
//! it is used, and anything that does not add up is a [`ParseError`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use weft_proto::Protocol;

/// The addresses, protocol and transport details of one IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// The transport protocol. ICMP in IPv4 and ICMPv6 in IPv6 are both
    /// [`Protocol::Icmp`]; the other ICMP number in the wrong family is
    /// [`Protocol::Other`], so no rule for ICMP admits it.
    pub protocol: Protocol,
    /// What the transport header says.
    pub transport: Transport,
    /// A TCP segment with SYN and without ACK: the first packet of a new
    /// connection, the only TCP packet that may open a flow on its way out.
    pub tcp_syn: bool,
    /// The sequence number of that SYN, the connection's initial sequence
    /// number: both ends see it, so it tells apart connections that reuse
    /// a 5-tuple. 0 for every other packet.
    pub tcp_isn: u32,
}

/// The part of the transport header the filter looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP or UDP ports.
    Ports {
        /// Source port.
        src: u16,
        /// Destination port.
        dst: u16,
    },
    /// An ICMP or ICMPv6 echo request or reply.
    Echo {
        /// `true` for a reply, `false` for a request.
        reply: bool,
        /// The echo identifier, which plays the part of a port.
        id: u16,
    },
    /// Any other ICMP message (errors, neighbour discovery, …).
    IcmpOther,
    /// A non-first fragment: its transport header travelled in the first
    /// fragment, so it has no ports.
    Fragment,
    /// A protocol whose header weft does not read.
    Opaque,
}

/// Why a packet could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Zero-length input.
    #[error("empty packet")]
    Empty,
    /// The version nibble is neither 4 nor 6.
    #[error("not an IP packet: version {0}, expected 4 or 6")]
    Version(u8),
    /// A header, or the length a header announces, runs past the end of the data.
    #[error("truncated packet: a header or its stated length runs past the end of the data")]
    Truncated,
    /// The IPv4 header length field is below the 20-byte minimum.
    #[error("invalid IPv4 header length")]
    HeaderLength,
    /// More IPv6 extension headers than weft is willing to walk.
    #[error("too many IPv6 extension headers")]
    ExtensionHeaders,
}

/// Parses the IP header and the start of the transport header of `packet`.
///
/// Bytes after the length the IP header announces are ignored (link padding).
pub fn parse(packet: &[u8]) -> Result<Headers, ParseError> {
    let first = *packet.first().ok_or(ParseError::Empty)?;
    match first >> 4 {
        4 => parse_v4(packet),
        6 => parse_v6(packet),
        version => Err(ParseError::Version(version)),
    }
}

const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
/// Enough for any sane chain; more is a resource-exhaustion attempt.
const MAX_EXTENSION_HEADERS: usize = 8;

fn parse_v4(packet: &[u8]) -> Result<Headers, ParseError> {
    let header: &[u8; IPV4_MIN_HEADER] = array(packet, 0)?;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header_len < IPV4_MIN_HEADER {
        return Err(ParseError::HeaderLength);
    }
    let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if total_len < header_len || total_len > packet.len() {
        return Err(ParseError::Truncated);
    }
    let src = IpAddr::V4(Ipv4Addr::new(
        header[12], header[13], header[14], header[15],
    ));
    let dst = IpAddr::V4(Ipv4Addr::new(
        header[16], header[17], header[18], header[19],
    ));
    let number = header[9];
    let protocol = match number {
        1 => Protocol::Icmp,
        58 => Protocol::Other(58),
        n => Protocol::from_number(n),
    };
    let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    let (transport, tcp_isn) = if fragment_offset != 0 {
        (Transport::Fragment, None)
    } else {
        let payload = packet
            .get(header_len..total_len)
            .ok_or(ParseError::Truncated)?;
        (transport(protocol, payload, 8, 0)?, syn(protocol, payload))
    };
    Ok(Headers {
        src,
        dst,
        protocol,
        transport,
        tcp_syn: tcp_isn.is_some(),
        tcp_isn: tcp_isn.unwrap_or(0),
    })
}

fn parse_v6(packet: &[u8]) -> Result<Headers, ParseError> {
    let header: &[u8; IPV6_HEADER] = array(packet, 0)?;
    let payload_len = usize::from(u16::from_be_bytes([header[4], header[5]]));
    let end = IPV6_HEADER + payload_len;
    let mut rest = packet.get(IPV6_HEADER..end).ok_or(ParseError::Truncated)?;
    let src = IpAddr::V6(Ipv6Addr::from(*array::<16>(header, 8)?));
    let dst = IpAddr::V6(Ipv6Addr::from(*array::<16>(header, 24)?));

    let mut next = header[6];
    let mut first_fragment = true;
    let mut walked = 0;
    loop {
        let header_len = match next {
            // Hop-by-hop, routing, destination options: length in 8-byte units, minus one.
            0 | 43 | 60 => (usize::from(byte(rest, 1)?) + 1) * 8,
            // Fragment header: fixed 8 bytes.
            44 => {
                let offset = u16::from_be_bytes(*array(rest, 2)?) >> 3;
                first_fragment = offset == 0;
                8
            }
            // Authentication header: length in 4-byte units, minus two.
            51 => (usize::from(byte(rest, 1)?) + 2) * 4,
            _ => break,
        };
        walked += 1;
        if walked > MAX_EXTENSION_HEADERS {
            return Err(ParseError::ExtensionHeaders);
        }
        next = byte(rest, 0)?;
        rest = rest.get(header_len..).ok_or(ParseError::Truncated)?;
        if !first_fragment {
            // What follows is fragment data, not headers.
            break;
        }
    }

    let protocol = match next {
        58 => Protocol::Icmp,
        1 => Protocol::Other(1),
        n => Protocol::from_number(n),
    };
    let (transport, tcp_isn) = if first_fragment {
        (transport(protocol, rest, 128, 129)?, syn(protocol, rest))
    } else {
        (Transport::Fragment, None)
    };
    Ok(Headers {
        src,
        dst,
        protocol,
        transport,
        tcp_syn: tcp_isn.is_some(),
        tcp_isn: tcp_isn.unwrap_or(0),
    })
}

fn transport(
    protocol: Protocol,
    payload: &[u8],
    echo_request: u8,
    echo_reply: u8,
) -> Result<Transport, ParseError> {
    match protocol {
        Protocol::Tcp | Protocol::Udp => {
            let min_len = if protocol == Protocol::Tcp { 20 } else { 8 };
            if payload.len() < min_len {
                return Err(ParseError::Truncated);
            }
            Ok(Transport::Ports {
                src: u16::from_be_bytes(*array(payload, 0)?),
                dst: u16::from_be_bytes(*array(payload, 2)?),
            })
        }
        Protocol::Icmp => {
            let header: &[u8; 8] = array(payload, 0)?;
            let id = u16::from_be_bytes([header[4], header[5]]);
            Ok(match header[0] {
                t if t == echo_request => Transport::Echo { reply: false, id },
                t if t == echo_reply => Transport::Echo { reply: true, id },
                _ => Transport::IcmpOther,
            })
        }
        Protocol::Other(_) => Ok(Transport::Opaque),
    }
}

/// The sequence number of `payload` when it is a TCP segment with SYN set
/// and ACK clear.
fn syn(protocol: Protocol, payload: &[u8]) -> Option<u32> {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    if protocol != Protocol::Tcp
        || payload
            .get(13)
            .is_none_or(|flags| flags & (SYN | ACK) != SYN)
    {
        return None;
    }
    array(payload, 4).ok().map(|seq| u32::from_be_bytes(*seq))
}

fn byte(data: &[u8], at: usize) -> Result<u8, ParseError> {
    data.get(at).copied().ok_or(ParseError::Truncated)
}

fn array<const N: usize>(data: &[u8], at: usize) -> Result<&[u8; N], ParseError> {
    data.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .ok_or(ParseError::Truncated)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;
    use crate::filter::test_packets::{self, ACK, SYN};

    const A4: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1));
    const B4: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2));
    const A6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd7a, 0, 0, 0, 0, 0, 0, 1));
    const B6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd7a, 0, 0, 0, 0, 0, 0, 2));

    #[test]
    fn parses_tcp_udp_and_echo_in_both_families() {
        for (a, b) in [(A4, B4), (A6, B6)] {
            let tcp = parse(&test_packets::tcp(a, 40000, b, 22, SYN)).unwrap();
            assert_eq!((tcp.src, tcp.dst, tcp.protocol), (a, b, Protocol::Tcp));
            assert_eq!(
                tcp.transport,
                Transport::Ports {
                    src: 40000,
                    dst: 22
                }
            );

            let udp = parse(&test_packets::udp(b, 53, a, 5353, b"dns")).unwrap();
            assert_eq!((udp.src, udp.dst, udp.protocol), (b, a, Protocol::Udp));
            assert_eq!(udp.transport, Transport::Ports { src: 53, dst: 5353 });

            let request = parse(&test_packets::echo(a, b, false, 7, 1)).unwrap();
            assert_eq!(request.protocol, Protocol::Icmp);
            assert_eq!(
                request.transport,
                Transport::Echo {
                    reply: false,
                    id: 7
                }
            );
            let reply = parse(&test_packets::echo(b, a, true, 7, 1)).unwrap();
            assert_eq!(reply.transport, Transport::Echo { reply: true, id: 7 });

            let gre = parse(&test_packets::opaque(a, b, 47)).unwrap();
            assert_eq!(
                (gre.protocol, gre.transport),
                (Protocol::Other(47), Transport::Opaque)
            );
        }
    }

    #[test]
    fn only_an_opening_syn_carries_its_initial_sequence_number() {
        for (a, b) in [(A4, B4), (A6, B6)] {
            let syn = parse(&test_packets::tcp_seq(a, 1, b, 2, SYN, 0xdead_beef)).unwrap();
            assert!(syn.tcp_syn);
            assert_eq!(syn.tcp_isn, 0xdead_beef);
            let syn_ack = parse(&test_packets::tcp_seq(b, 2, a, 1, SYN | ACK, 7)).unwrap();
            assert_eq!((syn_ack.tcp_syn, syn_ack.tcp_isn), (false, 0));
            let data = parse(&test_packets::tcp_seq(a, 1, b, 2, ACK, 9)).unwrap();
            assert_eq!((data.tcp_syn, data.tcp_isn), (false, 0));
        }
    }

    #[test]
    fn the_test_builders_write_valid_ipv4_checksums() {
        assert!(test_packets::ipv4_header_checksum_ok(&test_packets::tcp(
            A4,
            1,
            B4,
            2,
            SYN | ACK
        )));
        assert!(test_packets::ipv4_header_checksum_ok(
            &test_packets::non_first_fragment(test_packets::udp(A4, 1, B4, 2, b"x"))
        ));
    }

    #[test]
    fn icmp_numbers_of_the_wrong_family_are_other_protocols() {
        let mut v4 = test_packets::echo(A4, B4, false, 1, 1);
        v4[9] = 58;
        assert_eq!(parse(&v4).unwrap().protocol, Protocol::Other(58));
        let mut v6 = test_packets::echo(A6, B6, false, 1, 1);
        v6[6] = 1;
        assert_eq!(parse(&v6).unwrap().protocol, Protocol::Other(1));
    }

    #[test]
    fn every_truncation_is_an_error() {
        for packet in [
            test_packets::tcp(A4, 1, B4, 2, SYN),
            test_packets::udp(A6, 1, B6, 2, b""),
            test_packets::echo(A4, B4, false, 1, 1),
            test_packets::echo(A6, B6, true, 1, 1),
        ] {
            for len in 0..packet.len() {
                assert!(
                    parse(&packet[..len]).is_err(),
                    "prefix of {len} bytes parsed"
                );
            }
        }
    }

    #[test]
    fn a_transport_header_shorter_than_its_minimum_is_truncated() {
        // An IPv4 packet announcing TCP but carrying only 8 bytes of it.
        let mut packet = test_packets::udp(A4, 1, B4, 2, b"");
        packet[9] = 6;
        assert_eq!(parse(&packet), Err(ParseError::Truncated));
    }

    #[test]
    fn bad_versions_and_header_lengths_are_rejected() {
        assert_eq!(parse(&[]), Err(ParseError::Empty));
        let mut packet = test_packets::udp(A4, 1, B4, 2, b"x");
        packet[0] = 0x55;
        assert_eq!(parse(&packet), Err(ParseError::Version(5)));
        packet[0] = 0x44;
        assert_eq!(parse(&packet), Err(ParseError::HeaderLength));
    }

    #[test]
    fn link_padding_after_the_stated_length_is_ignored() {
        let mut packet = test_packets::udp(A4, 1, B4, 2, b"x");
        packet.extend_from_slice(&[0; 10]);
        assert_eq!(
            parse(&packet).unwrap().transport,
            Transport::Ports { src: 1, dst: 2 }
        );
    }

    #[test]
    fn non_first_ipv4_fragments_have_no_ports() {
        let packet = test_packets::non_first_fragment(test_packets::udp(A4, 1, B4, 2, b"x"));
        let headers = parse(&packet).unwrap();
        assert_eq!(
            (headers.protocol, headers.transport),
            (Protocol::Udp, Transport::Fragment)
        );
    }

    /// An IPv6 UDP packet with `extensions` (next-header, bytes) chained before the UDP header.
    fn v6_with_extensions(extensions: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let plain = test_packets::udp(A6, 1000, B6, 53, b"q");
        let mut chain = Vec::new();
        let mut first_next = 17;
        for (kind, body) in extensions.iter().rev() {
            let mut header = body.clone();
            header[0] = first_next;
            first_next = *kind;
            chain.splice(0..0, header);
        }
        let mut packet = plain[..40].to_vec();
        packet[6] = first_next;
        let payload_len = u16::try_from(chain.len() + plain.len() - 40).unwrap();
        packet[4..6].copy_from_slice(&payload_len.to_be_bytes());
        packet.extend_from_slice(&chain);
        packet.extend_from_slice(&plain[40..]);
        packet
    }

    #[test]
    fn ipv6_extension_headers_are_skipped() {
        let hop_by_hop = (0, vec![0, 0, 1, 4, 0, 0, 0, 0]);
        let destination = (60, vec![0, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let first_fragment = (44, vec![0, 0, 0, 1, 0, 0, 0, 9]);
        let packet = v6_with_extensions(&[hop_by_hop, destination, first_fragment]);
        let headers = parse(&packet).unwrap();
        assert_eq!(headers.protocol, Protocol::Udp);
        assert_eq!(headers.transport, Transport::Ports { src: 1000, dst: 53 });
    }

    #[test]
    fn non_first_ipv6_fragments_have_no_ports() {
        let later_fragment = (44, vec![0, 0, 0x05, 0xc8, 0, 0, 0, 9]);
        let headers = parse(&v6_with_extensions(&[later_fragment])).unwrap();
        assert_eq!(
            (headers.protocol, headers.transport),
            (Protocol::Udp, Transport::Fragment)
        );
    }

    #[test]
    fn long_extension_chains_are_refused() {
        let chain: Vec<(u8, Vec<u8>)> = (0..=MAX_EXTENSION_HEADERS)
            .map(|_| (60, vec![0; 8]))
            .collect();
        assert_eq!(
            parse(&v6_with_extensions(&chain)),
            Err(ParseError::ExtensionHeaders)
        );
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn random_bytes_after_a_plausible_header_never_panic(
            version in prop_oneof![Just(0x45u8), Just(0x46), Just(0x60)],
            next in any::<u8>(),
            rest in proptest::collection::vec(any::<u8>(), 0..120),
        ) {
            let mut bytes = vec![version];
            bytes.extend_from_slice(&rest);
            if bytes.len() > 9 { bytes[if version == 0x60 { 6 } else { 9 }] = next; }
            let _ = parse(&bytes);
        }

        #[test]
        fn parsed_udp_ports_round_trip(src in any::<u16>(), dst in any::<u16>(), v6 in any::<bool>()) {
            let (a, b) = if v6 { (A6, B6) } else { (A4, B4) };
            let headers = parse(&test_packets::udp(a, src, b, dst, b"")).unwrap();
            prop_assert_eq!(headers.transport, Transport::Ports { src, dst });
        }
    }
}
