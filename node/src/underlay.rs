//! The WireGuard UDP socket: one socket for IPv4 and IPv6 where the host
//! allows it, presenting IPv4 peers as plain IPv4 addresses either way.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::OwnedFd;

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn6};
use tokio::net::UdpSocket;

/// The node's underlay socket.
#[derive(Debug)]
pub struct Underlay {
    socket: UdpSocket,
    dual_stack: bool,
}

impl Underlay {
    /// Binds `[::]:port` accepting IPv4 too, or `0.0.0.0:port` when the host
    /// has no IPv6. Port 0 picks a free port.
    pub fn bind(port: u16) -> std::io::Result<Self> {
        match bind_dual_stack(port) {
            Ok(socket) => Ok(Self {
                socket,
                dual_stack: true,
            }),
            Err(e) => {
                tracing::debug!("no dual-stack UDP socket ({e}); using IPv4 only");
                let std = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
                std.set_nonblocking(true)?;
                Ok(Self {
                    socket: UdpSocket::from_std(std)?,
                    dual_stack: false,
                })
            }
        }
    }

    /// The bound port.
    pub fn port(&self) -> std::io::Result<u16> {
        Ok(self.socket.local_addr()?.port())
    }

    /// Receives a datagram; IPv4 senders appear as IPv4 addresses.
    pub async fn recv_from(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        let (n, from) = self.socket.recv_from(buf).await?;
        Ok((n, canonical(from)))
    }

    /// Sends a datagram to an IPv4 or IPv6 address.
    pub async fn send_to(&self, payload: &[u8], dst: SocketAddr) -> std::io::Result<usize> {
        let dst = match dst {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            other => other,
        };
        self.socket.send_to(payload, dst).await
    }
}

fn bind_dual_stack(port: u16) -> std::io::Result<UdpSocket> {
    let fd: OwnedFd = socket::socket(
        AddressFamily::Inet6,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

/// IPv4-mapped IPv6 addresses back to IPv4, as the netmap names endpoints.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_become_ipv4() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:51820".parse().unwrap();
        assert_eq!(
            canonical(mapped),
            "192.0.2.1:51820".parse::<SocketAddr>().unwrap()
        );
        let v6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[tokio::test]
    async fn ipv4_peers_round_trip_through_the_socket() {
        let underlay = Underlay::bind(0).unwrap();
        let port = underlay.port().unwrap();
        let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        peer.send_to(b"ping", ("127.0.0.1", port)).await.unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = underlay.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(from, peer.local_addr().unwrap());
        underlay.send_to(b"pong", from).await.unwrap();
        let (n, _) = peer.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"pong");
    }
}
