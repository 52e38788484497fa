//! The Internet checksum (RFC 1071) over IP headers and TCP/UDP segments.

use std::net::IpAddr;

/// Adds `data` to a running one's-complement sum, as big-endian 16-bit
/// words; an odd trailing byte is padded with zero.
///
/// The words are summed in the machine's byte order, which the compiler
/// vectorises, and the folded result is swapped once: the one's-complement
/// sum does not depend on byte order except for that final swap (RFC 1071,
/// section 2(B)).
pub(crate) fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc = 0u64;
    let mut words = data.chunks_exact(4);
    for word in &mut words {
        acc += u64::from(u32::from_ne_bytes([word[0], word[1], word[2], word[3]]));
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for pair in &mut pairs {
        acc += u64::from(u16::from_ne_bytes([pair[0], pair[1]]));
    }
    if let [last] = pairs.remainder() {
        acc += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    initial + u64::from(u16::from_be_bytes(fold(acc).to_ne_bytes()))
}

/// Folds a running sum to 16 bits (not complemented).
pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // The loop leaves at most 16 bits.
    acc as u16
}

/// The running sum of the TCP/UDP pseudo-header.
pub(crate) fn pseudo_header(src: IpAddr, dst: IpAddr, protocol: u8, l4_len: usize) -> u64 {
    let addresses = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum(&d.octets(), sum(&s.octets(), 0)),
        (IpAddr::V6(s), IpAddr::V6(d)) => sum(&d.octets(), sum(&s.octets(), 0)),
        // Mixed families never come out of one IP header.
        _ => 0,
    };
    addresses + u64::from(protocol) + l4_len as u64
}

/// The checksum to store in a header: the complement of the folded sum.
pub(crate) fn finish(acc: u64) -> u16 {
    !fold(acc)
}

/// Recomputes an IPv4 header's checksum in place (`header` is exactly the
/// header, options included).
pub(crate) fn fix_ipv4_header(header: &mut [u8]) {
    header[10] = 0;
    header[11] = 0;
    let checksum = finish(sum(header, 0));
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
}

/// Whether data that embeds its own checksum sums to zero (all ones before
/// the complement), i.e. is intact.
pub(crate) fn verifies(acc: u64) -> bool {
    fold(acc) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_rfc_1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), 0xddf2);
        assert_eq!(
            fold(sum(&data[..7], 0)),
            fold(sum(&[0, 1, 0xf2, 3, 0xf4, 0xf5, 0xf6, 0], 0))
        );
    }

    /// The definition, word by word in network byte order.
    fn reference(data: &[u8]) -> u64 {
        data.chunks(2)
            .map(|pair| u64::from(pair[0]) << 8 | u64::from(pair.get(1).copied().unwrap_or(0)))
            .sum()
    }

    proptest::proptest! {
        #[test]
        fn sums_like_the_definition(data in proptest::collection::vec(proptest::num::u8::ANY, 0..3000), initial in 0u64..1 << 40) {
            proptest::prop_assert_eq!(fold(sum(&data, initial)), fold(reference(&data) + initial));
        }
    }

    #[test]
    fn a_fixed_ipv4_header_verifies() {
        let mut header = [
            0x45, 0, 0, 0x54, 0x12, 0x34, 0x40, 0, 64, 1, 0xff, 0xff, 100, 64, 0, 1, 100, 64, 0, 2,
        ];
        fix_ipv4_header(&mut header);
        assert!(verifies(sum(&header, 0)));
        header[8] = 63;
        assert!(!verifies(sum(&header, 0)));
    }
}
