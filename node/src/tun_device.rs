//! The overlay network interface: a TUN device, and the addresses and routes
//! that send overlay traffic into it, configured over netlink.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::route::{RouteMessage, RouteScope};

/// The TUN device's MTU: 1500 less WireGuard's 80 bytes of worst-case (IPv6) overhead.
pub const MTU: u16 = 1420;

/// The overlay's IPv4 range, routed into the device.
const OVERLAY_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 10);

/// Why the device could not be created or configured.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// The process may not create network devices.
    #[error("cannot create TUN device {name}: permission denied; weftd must run as root (it needs CAP_NET_ADMIN)")]
    PermissionDenied {
        /// The device name.
        name: String,
    },
    /// The device could not be created for another reason.
    #[error("cannot create TUN device {name}: {reason} (is /dev/net/tun present? is the name valid and unused? pass --tun to choose another)")]
    Create {
        /// The device name.
        name: String,
        /// The operating system's reason.
        reason: String,
    },
    /// A netlink request failed.
    #[error("cannot {action} on {name}: {reason}")]
    Netlink {
        /// What was being configured.
        action: String,
        /// The device name.
        name: String,
        /// The kernel's reason.
        reason: String,
    },
}

/// An up TUN device and the overlay configuration applied to it.
pub struct TunDevice {
    device: tun::AsyncDevice,
    name: String,
    index: u32,
    netlink: rtnetlink::Handle,
    applied: Vec<Applied>,
    addresses: Option<(Ipv4Addr, Ipv6Addr)>,
}

impl std::fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunDevice")
            .field("name", &self.name)
            .field("index", &self.index)
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

/// A piece of configuration we added, kept to remove exactly it later.
#[derive(Debug)]
enum Applied {
    Address(AddressMessage),
    Route(RouteMessage),
}

impl TunDevice {
    /// Creates the device, up, with MTU [`MTU`] and no addresses yet.
    pub async fn create(name: &str) -> Result<Self, TunError> {
        let mut config = tun::Configuration::default();
        config.tun_name(name).mtu(MTU).up();
        let device = tun::create_as_async(&config).map_err(|e| create_error(name, e))?;
        let index = nix::net::if_::if_nametoindex(name).map_err(|e| TunError::Create {
            name: name.to_owned(),
            reason: format!("the device vanished after creation: {e}"),
        })?;
        let (connection, netlink, _) =
            rtnetlink::new_connection().map_err(|e| TunError::Netlink {
                action: "open a netlink socket".into(),
                name: name.to_owned(),
                reason: e.to_string(),
            })?;
        tokio::spawn(connection);
        tracing::info!(device = name, mtu = MTU, "created TUN device");
        Ok(Self {
            device,
            name: name.to_owned(),
            index,
            netlink,
            applied: Vec::new(),
            addresses: None,
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one IP packet written to the device by the host.
    pub async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.device.recv(buf).await
    }

    /// Reads one more IP packet if the host has written one, without
    /// waiting: `WouldBlock` once the device is empty. Draining the device
    /// this way after [`TunDevice::recv`] lets one wakeup carry a batch.
    pub fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        // The device's own non-blocking read, under the async wrapper.
        let device: &tun::Device = &self.device;
        device.recv(buf)
    }

    /// Hands one IP packet to the host.
    pub async fn send(&self, packet: &[u8]) -> std::io::Result<usize> {
        self.device.send(packet).await
    }

    /// Gives the device the node's addresses (IPv4 /32, IPv6 /128) and routes
    /// the overlay (100.64.0.0/10 and the /48 of the node's IPv6) into it.
    /// Does nothing when these addresses are already applied.
    ///
    /// IPv6 failures (e.g. IPv6 disabled on the host) are logged, not fatal:
    /// IPv4 overlay traffic still works.
    pub async fn assign(&mut self, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> Result<(), TunError> {
        if self.addresses == Some((ipv4, ipv6)) {
            return Ok(());
        }
        self.unassign().await?;
        self.add_address(IpAddr::V4(ipv4), 32).await?;
        self.add_v4_route(ipv4).await?;
        self.addresses = Some((ipv4, ipv6));
        let v6 = async {
            self.add_address(IpAddr::V6(ipv6), 128).await?;
            self.add_v6_route(ipv6).await
        };
        if let Err(e) = v6.await {
            tracing::warn!("IPv6 overlay unavailable: {e}");
        }
        tracing::info!(device = %self.name, %ipv4, %ipv6, "assigned overlay addresses");
        Ok(())
    }

    /// Removes every address and route [`TunDevice::assign`] added.
    pub async fn unassign(&mut self) -> Result<(), TunError> {
        let mut first_error = None;
        while let Some(applied) = self.applied.pop() {
            let result = match applied {
                Applied::Route(route) => self.netlink.route().del(route).execute().await,
                Applied::Address(address) => self.netlink.address().del(address).execute().await,
            };
            if let Err(e) = result {
                first_error.get_or_insert(self.netlink_error("remove overlay configuration", e));
            }
        }
        self.addresses = None;
        first_error.map_or(Ok(()), Err)
    }

    async fn add_address(&mut self, ip: IpAddr, prefix: u8) -> Result<(), TunError> {
        let mut request = self.netlink.address().add(self.index, ip, prefix).replace();
        let message = request.message_mut().clone();
        request
            .execute()
            .await
            .map_err(|e| self.netlink_error(&format!("add address {ip}/{prefix}"), e))?;
        self.applied.push(Applied::Address(message));
        Ok(())
    }

    async fn add_v4_route(&mut self, source: Ipv4Addr) -> Result<(), TunError> {
        let (net, prefix) = OVERLAY_V4;
        let mut request = self
            .netlink
            .route()
            .add()
            .v4()
            .destination_prefix(net, prefix)
            .output_interface(self.index)
            .pref_source(source)
            .scope(RouteScope::Link)
            .replace();
        let message = request.message_mut().clone();
        request
            .execute()
            .await
            .map_err(|e| self.netlink_error(&format!("add route {net}/{prefix}"), e))?;
        self.applied.push(Applied::Route(message));
        Ok(())
    }

    async fn add_v6_route(&mut self, own: Ipv6Addr) -> Result<(), TunError> {
        let net = overlay_v6_prefix(own);
        let mut request = self
            .netlink
            .route()
            .add()
            .v6()
            .destination_prefix(net, 48)
            .output_interface(self.index)
            .replace();
        let message = request.message_mut().clone();
        request
            .execute()
            .await
            .map_err(|e| self.netlink_error(&format!("add route {net}/48"), e))?;
        self.applied.push(Applied::Route(message));
        Ok(())
    }

    fn netlink_error(&self, action: &str, error: rtnetlink::Error) -> TunError {
        TunError::Netlink {
            action: action.to_owned(),
            name: self.name.clone(),
            reason: error.to_string(),
        }
    }
}

/// The overlay's IPv6 /48: the first 48 bits of the node's own address.
pub(crate) fn overlay_v6_prefix(own: Ipv6Addr) -> Ipv6Addr {
    let bits = u128::from(own) & !((1u128 << 80) - 1);
    Ipv6Addr::from(bits)
}

fn create_error(name: &str, error: tun::Error) -> TunError {
    let denied = match &error {
        tun::Error::Io(io) => io.kind() == std::io::ErrorKind::PermissionDenied,
        _ => false,
    };
    if denied {
        TunError::PermissionDenied {
            name: name.to_owned(),
        }
    } else {
        TunError::Create {
            name: name.to_owned(),
            reason: error.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_v6_route_is_the_slash_48_of_the_own_address() {
        let own: Ipv6Addr = "fd7a:115c:a1e0:1:2:3:4:5".parse().unwrap();
        assert_eq!(
            overlay_v6_prefix(own),
            "fd7a:115c:a1e0::".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn permission_errors_say_to_run_as_root() {
        let err = create_error(
            "weft0",
            tun::Error::Io(std::io::Error::from_raw_os_error(libc::EPERM)),
        );
        assert!(err.to_string().contains("must run as root"), "{err}");
        let err = create_error("weft0", tun::Error::NameTooLong);
        assert!(matches!(err, TunError::Create { .. }));
    }
}
