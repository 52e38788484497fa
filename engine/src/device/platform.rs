//! What the device asks of the operating system besides packet I/O: the
//! overlay interface's addresses and routes, the host's own addresses,
//! keeping the device's sockets out of the tunnel, and the attributes the
//! node reports.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::BorrowedFd;

use crate::posture::Attributes;

/// The operating system's side of the device: netlink and `getifaddrs` on
/// Linux, the VPN service's configuration on a phone.
pub trait Platform {
    /// Why the overlay interface could not be configured.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Gives the overlay interface the node's addresses (IPv4 /32, IPv6
    /// /128) and routes the overlay (100.64.0.0/10 and the /48 of the
    /// node's IPv6 address) into it. Does nothing when these addresses are
    /// already in place.
    fn assign(
        &mut self,
        ipv4: Ipv4Addr,
        ipv6: Ipv6Addr,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Removes every address and route [`Platform::assign`] added.
    fn unassign(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The addresses of the host's interfaces, except the overlay
    /// interface's: where peers may reach the node's underlay socket.
    fn local_addresses(&self) -> io::Result<Vec<IpAddr>>;

    /// Keeps `socket`'s datagrams out of the tunnel, called on the underlay
    /// socket once it is bound. A VPN that routes everything through the
    /// tunnel needs it (Android's `VpnService.protect`); where the overlay
    /// routes only its own ranges, as on Linux, it does nothing.
    fn protect(&self, socket: BorrowedFd<'_>) -> io::Result<()>;

    /// weft's own `node:*` posture attributes (OS, OS version, client
    /// version) for the host name the node asked for. An associated
    /// function, so the control client calls it as its
    /// [`SystemAttributes`](crate::posture::SystemAttributes) hook each time
    /// it reports.
    fn system_attributes(hostname: &str) -> Attributes;

    /// The host's name: the name a node asks for unless told another.
    fn host_name(&self) -> String;
}
