//! The STUN Binding messages weft uses (RFC 5389): a node sends a Binding
//! request from its WireGuard socket and learns the address and port the
//! relay saw it from — its reflexive endpoint behind NAT.
//!
//! Only what that needs: requests are checked (header, magic cookie,
//! length) and answered with a success response carrying
//! `XOR-MAPPED-ADDRESS`; anything else is ignored. The codec only: the
//! relay's responder and the node's endpoint discovery drive it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const HEADER: usize = 20;
const MAGIC_COOKIE: u32 = 0x2112_A442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// A STUN transaction id.
pub type TransactionId = [u8; 12];

/// The success response to `request` received from `from`, or `None` when
/// `request` is not a well-formed Binding request.
pub fn respond(request: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    let header = request.first_chunk::<HEADER>()?;
    let kind = u16::from_be_bytes([header[0], header[1]]);
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let cookie = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if kind != BINDING_REQUEST || cookie != MAGIC_COOKIE || len % 4 != 0 {
        return None;
    }
    if request.len() != HEADER + len {
        return None;
    }
    let mut transaction = [0u8; 12];
    transaction.copy_from_slice(&header[8..HEADER]);
    Some(success(&transaction, from))
}

/// A Binding request with `transaction`, as a node sends it.
pub fn request(transaction: &TransactionId) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER);
    out.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(transaction);
    out
}

/// The reflexive address in a success response to `transaction`, or `None`
/// when `response` is anything else.
pub fn parse_response(response: &[u8], transaction: &TransactionId) -> Option<SocketAddr> {
    let header = response.first_chunk::<HEADER>()?;
    let kind = u16::from_be_bytes([header[0], header[1]]);
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if kind != BINDING_SUCCESS
        || header[4..8] != MAGIC_COOKIE.to_be_bytes()
        || header[8..HEADER] != transaction[..]
        || response.len() != HEADER + len
    {
        return None;
    }
    let mut attributes = &response[HEADER..];
    while let Some(head) = attributes.first_chunk::<4>() {
        let kind = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let value = attributes.get(4..4 + len)?;
        if kind == XOR_MAPPED_ADDRESS {
            return xor_address(value, transaction);
        }
        let padded = (len + 3) & !3;
        attributes = attributes.get(4 + padded..)?;
    }
    None
}

fn success(transaction: &TransactionId, from: SocketAddr) -> Vec<u8> {
    let mut value = vec![0u8];
    let port = from.port() ^ (MAGIC_COOKIE >> 16) as u16;
    match from.ip() {
        IpAddr::V4(ip) => {
            value.push(0x01);
            value.extend_from_slice(&port.to_be_bytes());
            value.extend_from_slice(&(u32::from(ip) ^ MAGIC_COOKIE).to_be_bytes());
        }
        IpAddr::V6(ip) => {
            value.push(0x02);
            value.extend_from_slice(&port.to_be_bytes());
            let mask = v6_mask(transaction);
            let octets = ip.octets();
            value.extend(octets.iter().zip(mask).map(|(a, m)| a ^ m));
        }
    }
    let mut out = Vec::with_capacity(HEADER + 4 + value.len());
    out.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    out.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(transaction);
    out.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(&value);
    out
}

fn xor_address(value: &[u8], transaction: &TransactionId) -> Option<SocketAddr> {
    let [_, family, p0, p1, address @ ..] = value else {
        return None;
    };
    let port = u16::from_be_bytes([*p0, *p1]) ^ (MAGIC_COOKIE >> 16) as u16;
    let ip = match (family, address.len()) {
        (0x01, 4) => {
            let raw = u32::from_be_bytes([address[0], address[1], address[2], address[3]]);
            IpAddr::V4(Ipv4Addr::from(raw ^ MAGIC_COOKIE))
        }
        (0x02, 16) => {
            let mut octets = [0u8; 16];
            for ((out, a), m) in octets.iter_mut().zip(address).zip(v6_mask(transaction)) {
                *out = a ^ m;
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn v6_mask(transaction: &TransactionId) -> [u8; 16] {
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    mask[4..].copy_from_slice(transaction);
    mask
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_rfc_5769_ipv4_response_decodes() {
        // RFC 5769 section 2.2, with only XOR-MAPPED-ADDRESS kept.
        let transaction = [
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
        ];
        let from: SocketAddr = "192.0.2.1:32853".parse().unwrap();
        let response = success(&transaction, from);
        assert_eq!(
            &response[HEADER..],
            &[0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43]
        );
        assert_eq!(parse_response(&response, &transaction), Some(from));
    }

    #[test]
    fn requests_are_answered_with_the_sender_address() {
        let transaction = [7u8; 12];
        for from in ["198.51.100.7:51820", "[fd00::1]:41641"] {
            let from: SocketAddr = from.parse().unwrap();
            let response = respond(&request(&transaction), from).unwrap();
            assert_eq!(parse_response(&response, &transaction), Some(from));
            assert_eq!(parse_response(&response, &[8u8; 12]), None);
        }
    }

    #[test]
    fn non_requests_are_ignored() {
        let from: SocketAddr = "198.51.100.7:1".parse().unwrap();
        let mut wrong_cookie = request(&[1; 12]);
        wrong_cookie[4] ^= 1;
        assert!(respond(&wrong_cookie, from).is_none());
        let mut a_response = request(&[1; 12]);
        a_response[1] = 0x01;
        a_response[0] = 0x01;
        assert!(respond(&a_response, from).is_none());
        assert!(respond(&request(&[1; 12])[..19], from).is_none());
        // A WireGuard handshake initiation is not STUN.
        assert!(respond(&[1u8; 148], from).is_none());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), transaction in any::<[u8; 12]>()) {
            let from: SocketAddr = "203.0.113.5:3478".parse().unwrap();
            let _ = respond(&bytes, from);
            let _ = parse_response(&bytes, &transaction);
        }

        #[test]
        fn any_address_round_trips(ip in any::<u128>(), v4 in any::<u32>(), port in any::<u16>(), transaction in any::<[u8; 12]>()) {
            for from in [
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(v4)), port),
            ] {
                let response = respond(&request(&transaction), from).unwrap();
                prop_assert_eq!(parse_response(&response, &transaction), Some(from));
            }
        }
    }
}
