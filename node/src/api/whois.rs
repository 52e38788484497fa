//! `GET /v1/whois?addr=IP[:PORT]`: the query the device's
//! [`WhoIs`](super::WhoIs) answers.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::ApiError;

/// The query string of `GET /v1/whois`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WhoIsQuery {
    /// `IP`, `IP:PORT` or `[IPv6]:PORT`.
    pub addr: String,
}

/// Parses `IP`, `IP:PORT` or `[IPv6]:PORT`; the port is accepted and ignored
/// (an overlay address belongs to one node whatever the port).
pub fn parse_address(text: &str) -> Result<IpAddr, ApiError> {
    let text = text.trim();
    text.parse::<IpAddr>()
        .or_else(|_| text.parse::<SocketAddr>().map(|s| s.ip()))
        .map_err(|_| {
            ApiError::BadRequest(format!(
                "`{text}` is not an IP address; pass an overlay address as IP, IP:PORT or [IPv6]:PORT"
            ))
        })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn addresses_parse_with_or_without_a_port() {
        let v4 = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 7));
        assert_eq!(parse_address("100.64.0.7").unwrap(), v4);
        assert_eq!(parse_address("100.64.0.7:443").unwrap(), v4);
        assert_eq!(
            parse_address("[fd7a::7]:443").unwrap(),
            "fd7a::7".parse::<IpAddr>().unwrap()
        );
        let err = parse_address("laptop").unwrap_err();
        assert!(err.to_string().contains("IP:PORT"), "{err}");
    }
}
