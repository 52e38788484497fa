//! The IP and transport header fields segmentation and coalescing need.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::OffloadError;

/// IP protocol number of TCP.
pub(crate) const TCP: u8 = 6;
/// IP protocol number of UDP.
pub(crate) const UDP: u8 = 17;

/// Where an IP packet's transport header starts and what it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ip {
    pub(crate) v6: bool,
    /// The IP header's length, options included.
    pub(crate) header_len: usize,
    pub(crate) protocol: u8,
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
}

impl Ip {
    /// Parses the IP header of `packet`. IPv4 fragments and IPv6 extension
    /// headers are refused: neither is ever offloaded by the kernel.
    pub(crate) fn parse(packet: &[u8]) -> Result<Self, OffloadError> {
        match packet.first().map(|b| b >> 4) {
            Some(4) => {
                let header = packet
                    .get(..20)
                    .ok_or(OffloadError::Truncated("IPv4 header"))?;
                let header_len = usize::from(header[0] & 0x0f) * 4;
                if header_len < 20 || header_len > packet.len() {
                    return Err(OffloadError::Malformed("IPv4 header length"));
                }
                if u16::from_be_bytes([header[6], header[7]]) & 0x3fff != 0 {
                    return Err(OffloadError::Unsupported("IPv4 fragment"));
                }
                Ok(Self {
                    v6: false,
                    header_len,
                    protocol: header[9],
                    src: IpAddr::V4(Ipv4Addr::new(
                        header[12], header[13], header[14], header[15],
                    )),
                    dst: IpAddr::V4(Ipv4Addr::new(
                        header[16], header[17], header[18], header[19],
                    )),
                })
            }
            Some(6) => {
                let header = packet
                    .get(..40)
                    .ok_or(OffloadError::Truncated("IPv6 header"))?;
                let address = |at: usize| {
                    let mut octets = [0u8; 16];
                    octets.copy_from_slice(&header[at..at + 16]);
                    IpAddr::V6(Ipv6Addr::from(octets))
                };
                Ok(Self {
                    v6: true,
                    header_len: 40,
                    protocol: header[6],
                    src: address(8),
                    dst: address(24),
                })
            }
            Some(_) => Err(OffloadError::Malformed("IP version")),
            None => Err(OffloadError::Truncated("IP header")),
        }
    }

    /// The packet's length as its IP header states it.
    pub(crate) fn declared_length(&self, packet: &[u8]) -> usize {
        if self.v6 {
            40 + usize::from(u16::from_be_bytes([packet[4], packet[5]]))
        } else {
            usize::from(u16::from_be_bytes([packet[2], packet[3]]))
        }
    }

    /// Writes the packet's length (`total`, IP header included) into the
    /// IP header of `packet`.
    pub(crate) fn set_length(&self, packet: &mut [u8], total: usize) {
        if self.v6 {
            // Callers keep packets within 64 KiB.
            let payload = (total - 40) as u16;
            packet[4..6].copy_from_slice(&payload.to_be_bytes());
        } else {
            packet[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        }
    }
}

/// The length of the TCP header at `packet[at..]`, checked against the packet.
pub(crate) fn tcp_header_len(packet: &[u8], at: usize) -> Result<usize, OffloadError> {
    let offset = packet
        .get(at + 12)
        .ok_or(OffloadError::Truncated("TCP header"))?;
    let len = usize::from(offset >> 4) * 4;
    if len < 20 || at + len > packet.len() {
        return Err(OffloadError::Malformed("TCP data offset"));
    }
    Ok(len)
}

/// TCP flag bits (byte 13 of the header).
pub(crate) mod tcp_flags {
    pub(crate) const FIN: u8 = 0x01;
    pub(crate) const PSH: u8 = 0x08;
    pub(crate) const ACK: u8 = 0x10;
    pub(crate) const CWR: u8 = 0x80;
}
