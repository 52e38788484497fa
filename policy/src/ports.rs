//! Port lists (`*`, `22`, `1000-2000`, `80,443`) and the `proto` field.

use weft_proto::{PortRange, Protocol};

/// Why a port list or protocol is invalid, and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortError {
    pub(crate) message: String,
    pub(crate) hint: String,
}

const PORT_FORMS: &str =
    "ports are *, N, N-M, or a comma list of those (e.g. 22,80,8000-8100), with N ≤ M ≤ 65535";

/// Parses a port list into sorted, merged ranges.
pub(crate) fn parse_ports(text: &str) -> Result<Vec<PortRange>, PortError> {
    let mut ranges = Vec::new();
    for item in text.split(',') {
        let range = if item == "*" {
            PortRange::ANY
        } else if let Some((first, last)) = item.split_once('-') {
            let range = PortRange {
                first: port(first, text)?,
                last: port(last, text)?,
            };
            if range.first > range.last {
                return Err(PortError {
                    message: format!(
                        "invalid port range \"{item}\": {} is greater than {}",
                        range.first, range.last
                    ),
                    hint: format!("write it low to high: {}-{}", range.last, range.first),
                });
            }
            range
        } else {
            let port = port(item, text)?;
            PortRange {
                first: port,
                last: port,
            }
        };
        ranges.push(range);
    }
    Ok(normalize(ranges))
}

/// Parses a single port, as `tests` destinations use.
pub(crate) fn parse_single_port(text: &str) -> Result<u16, PortError> {
    port(text, text).map_err(|_| PortError {
        message: format!("invalid test port \"{text}\""),
        hint: "a test destination names one port, e.g. \"tag:db:5432\"".to_owned(),
    })
}

fn port(text: &str, whole: &str) -> Result<u16, PortError> {
    let valid_digits =
        !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    match text.parse::<u16>() {
        Ok(port) if valid_digits => Ok(port),
        _ => Err(PortError {
            message: format!("invalid ports \"{whole}\""),
            hint: PORT_FORMS.to_owned(),
        }),
    }
}

/// Sorts ranges and merges overlapping or adjacent ones.
pub(crate) fn normalize(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort();
    let mut merged: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(range.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(range.last);
            }
            _ => merged.push(range),
        }
    }
    merged
}

/// Protocol names accepted in `proto`, besides IANA numbers.
const NAMED: &[(&str, u8)] = &[
    ("icmp", 1),
    ("igmp", 2),
    ("tcp", 6),
    ("egp", 8),
    ("igp", 9),
    ("udp", 17),
    ("gre", 47),
    ("esp", 50),
    ("ah", 51),
    ("ipv6-icmp", 58),
    ("sctp", 132),
];

/// Parses a `proto` value: a protocol name or an IANA number 0–255.
pub(crate) fn parse_proto(text: &str) -> Result<Protocol, PortError> {
    let lower = text.to_ascii_lowercase();
    if let Some((_, number)) = NAMED.iter().find(|(name, _)| *name == lower) {
        return Ok(Protocol::from_number(*number));
    }
    match text.parse::<u8>() {
        Ok(number) if !text.starts_with('+') => Ok(Protocol::from_number(number)),
        _ => Err(PortError {
            message: format!("invalid proto \"{text}\""),
            hint: "use tcp, udp, icmp (or another IANA protocol name), or an IANA protocol number 0-255".to_owned(),
        }),
    }
}

/// Whether `protocol` checks destination ports in weft's filter (only TCP and UDP do).
pub(crate) fn has_ports(protocol: Protocol) -> bool {
    matches!(protocol, Protocol::Tcp | Protocol::Udp)
}

/// The name of a protocol for messages.
pub(crate) fn proto_name(protocol: Protocol) -> String {
    match protocol {
        Protocol::Tcp => "tcp".into(),
        Protocol::Udp => "udp".into(),
        Protocol::Icmp => "icmp".into(),
        Protocol::Other(n) => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn r(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn port_forms() {
        assert_eq!(parse_ports("*"), Ok(vec![PortRange::ANY]));
        assert_eq!(parse_ports("22"), Ok(vec![r(22, 22)]));
        assert_eq!(parse_ports("1000-2000"), Ok(vec![r(1000, 2000)]));
        assert_eq!(parse_ports("443,80"), Ok(vec![r(80, 80), r(443, 443)]));
        assert_eq!(parse_ports("80,81,82-90,85"), Ok(vec![r(80, 90)]));
        assert_eq!(parse_ports("0,65535"), Ok(vec![r(0, 0), r(65535, 65535)]));
        assert_eq!(parse_ports("22,*"), Ok(vec![PortRange::ANY]));
    }

    #[test]
    fn invalid_ports() {
        for bad in [
            "",
            "65536",
            "-1",
            "80,",
            "a",
            "1-",
            "1-2-3",
            "+80",
            " 80",
            "99999999999",
        ] {
            let err = parse_ports(bad).unwrap_err();
            assert_eq!(err.message, format!("invalid ports \"{bad}\""), "{bad}");
        }
        let err = parse_ports("2000-1000").unwrap_err();
        assert!(err.message.contains("2000 is greater than 1000"));
        assert_eq!(err.hint, "write it low to high: 1000-2000");
        assert_eq!(parse_single_port("5432"), Ok(5432));
        assert!(parse_single_port("*").is_err());
        assert!(parse_single_port("80,443").is_err());
    }

    #[test]
    fn protocols() {
        assert_eq!(parse_proto("tcp"), Ok(Protocol::Tcp));
        assert_eq!(parse_proto("UDP"), Ok(Protocol::Udp));
        assert_eq!(parse_proto("icmp"), Ok(Protocol::Icmp));
        assert_eq!(parse_proto("ipv6-icmp"), Ok(Protocol::Icmp));
        assert_eq!(parse_proto("6"), Ok(Protocol::Tcp));
        assert_eq!(parse_proto("132"), Ok(Protocol::Other(132)));
        assert_eq!(parse_proto("sctp"), Ok(Protocol::Other(132)));
        for bad in ["", "256", "-1", "+6", "tcpp"] {
            assert_eq!(
                parse_proto(bad).unwrap_err().message,
                format!("invalid proto \"{bad}\"")
            );
        }
    }

    proptest! {
        #[test]
        fn parsed_ports_cover_exactly_the_listed_ports(
            items in prop::collection::vec((any::<u16>(), 0u16..300), 1..6),
            probe in any::<u16>(),
        ) {
            let text: Vec<String> = items
                .iter()
                .map(|(first, len)| format!("{first}-{}", first.saturating_add(*len)))
                .collect();
            let ranges = parse_ports(&text.join(",")).unwrap();
            let expected = items.iter().any(|(first, len)| (*first..=first.saturating_add(*len)).contains(&probe));
            prop_assert_eq!(ranges.iter().any(|r| r.contains(probe)), expected);
            for pair in ranges.windows(2) {
                prop_assert!(u32::from(pair[0].last) + 1 < u32::from(pair[1].first));
            }
        }

        #[test]
        fn arbitrary_port_text_never_panics(text in "[0-9*,\\- a-z]{0,20}") {
            let _ = parse_ports(&text);
            let _ = parse_proto(&text);
        }
    }
}
