//! The `virtio_net_hdr` the kernel puts before every packet on a TUN device
//! opened with `IFF_VNET_HDR`: how a super-packet is to be segmented and
//! which checksum is left to complete.

use super::OffloadError;

/// The header's length: the legacy `virtio_net_hdr` without `num_buffers`,
/// the TUN device's default (`TUNSETVNETHDRSZ` not changed).
pub const VIRTIO_NET_HDR_LEN: usize = 10;

/// `flags`: the checksum at `csum_start + csum_offset` holds only the
/// pseudo-header sum; the rest of the segment is still to be summed.
pub const NEEDS_CSUM: u8 = 1;

/// What kind of segmentation a packet needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoType {
    /// A plain packet.
    None,
    /// A TCP over IPv4 super-packet.
    TcpV4,
    /// A TCP over IPv6 super-packet.
    TcpV6,
    /// A UDP super-packet to cut into datagrams (`VIRTIO_NET_HDR_GSO_UDP_L4`).
    UdpL4,
}

/// A decoded `virtio_net_hdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// [`NEEDS_CSUM`] and others.
    pub flags: u8,
    /// The segmentation to apply.
    pub gso_type: GsoType,
    /// Whether the ECN bit of `gso_type` was set (TCP with CWR on the first segment).
    pub ecn: bool,
    /// The length of the IP and transport headers.
    pub hdr_len: u16,
    /// The payload bytes per segment.
    pub gso_size: u16,
    /// Where the checksummed part starts (the transport header).
    pub csum_start: u16,
    /// Where the checksum field sits, from `csum_start`.
    pub csum_offset: u16,
}

const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_UDP: u8 = 3;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

impl VirtioNetHdr {
    /// The header of a plain packet with nothing left to do.
    pub const PLAIN: Self = Self {
        flags: 0,
        gso_type: GsoType::None,
        ecn: false,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Reads the header at the start of `frame`.
    pub fn decode(frame: &[u8]) -> Result<Self, OffloadError> {
        let Some(bytes) = frame.get(..VIRTIO_NET_HDR_LEN) else {
            return Err(OffloadError::Truncated("virtio header"));
        };
        let word = |at: usize| u16::from_ne_bytes([bytes[at], bytes[at + 1]]);
        let raw_type = bytes[1];
        let gso_type = match raw_type & !GSO_ECN {
            GSO_NONE => GsoType::None,
            GSO_TCPV4 => GsoType::TcpV4,
            GSO_TCPV6 => GsoType::TcpV6,
            GSO_UDP_L4 => GsoType::UdpL4,
            GSO_UDP => return Err(OffloadError::Unsupported("UDP fragmentation offload")),
            _ => return Err(OffloadError::Unsupported("unknown GSO type")),
        };
        Ok(Self {
            flags: bytes[0],
            gso_type,
            ecn: raw_type & GSO_ECN != 0,
            hdr_len: word(2),
            gso_size: word(4),
            csum_start: word(6),
            csum_offset: word(8),
        })
    }

    /// Writes the header into the first [`VIRTIO_NET_HDR_LEN`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8; VIRTIO_NET_HDR_LEN]) {
        let raw_type = match self.gso_type {
            GsoType::None => GSO_NONE,
            GsoType::TcpV4 => GSO_TCPV4,
            GsoType::TcpV6 => GSO_TCPV6,
            GsoType::UdpL4 => GSO_UDP_L4,
        } | if self.ecn { GSO_ECN } else { 0 };
        out[0] = self.flags;
        out[1] = raw_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(
            flags: u8,
            kind in 0usize..4,
            ecn: bool,
            hdr_len: u16,
            gso_size: u16,
            csum_start: u16,
            csum_offset: u16,
        ) {
            let gso_type = [GsoType::None, GsoType::TcpV4, GsoType::TcpV6, GsoType::UdpL4][kind];
            let header = VirtioNetHdr { flags, gso_type, ecn, hdr_len, gso_size, csum_start, csum_offset };
            let mut bytes = [0u8; VIRTIO_NET_HDR_LEN];
            header.encode(&mut bytes);
            prop_assert_eq!(VirtioNetHdr::decode(&bytes).unwrap(), header);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = VirtioNetHdr::decode(&bytes);
        }
    }

    #[test]
    fn short_and_unsupported_headers_are_refused() {
        assert!(matches!(
            VirtioNetHdr::decode(&[0; 9]),
            Err(OffloadError::Truncated(_))
        ));
        let mut ufo = [0u8; VIRTIO_NET_HDR_LEN];
        ufo[1] = GSO_UDP;
        assert!(matches!(
            VirtioNetHdr::decode(&ufo),
            Err(OffloadError::Unsupported(_))
        ));
        ufo[1] = 9;
        assert!(matches!(
            VirtioNetHdr::decode(&ufo),
            Err(OffloadError::Unsupported(_))
        ));
    }
}
