//! The Linux host as the device engine sees it: the overlay addresses and
//! routes on the TUN device over netlink, the host's addresses from
//! `getifaddrs`, and the attributes the node reports.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::BorrowedFd;

use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::route::{RouteMessage, RouteScope};
use weft_engine::device::Platform;
use weft_engine::posture::Attributes;

use crate::tun_device::TunError;

/// The overlay's IPv4 range, routed into the device.
const OVERLAY_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 10);

/// The TUN device's configuration and the host around it.
#[derive(Debug)]
pub struct LinuxHost {
    /// The TUN device's name.
    name: String,
    index: u32,
    netlink: rtnetlink::Handle,
    applied: Vec<Applied>,
    addresses: Option<(Ipv4Addr, Ipv6Addr)>,
}

/// A piece of configuration we added, kept to remove exactly it later.
#[derive(Debug)]
enum Applied {
    Address(AddressMessage),
    Route(RouteMessage),
}

impl LinuxHost {
    /// Configures the TUN device `name`, which holds no addresses yet.
    pub fn new(name: &str) -> Result<Self, TunError> {
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
        Ok(Self {
            name: name.to_owned(),
            index,
            netlink,
            applied: Vec::new(),
            addresses: None,
        })
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

impl Platform for LinuxHost {
    type Error = TunError;

    /// IPv6 failures (e.g. IPv6 disabled on the host) are logged, not fatal:
    /// IPv4 overlay traffic still works.
    async fn assign(&mut self, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> Result<(), TunError> {
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

    async fn unassign(&mut self) -> Result<(), TunError> {
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

    fn local_addresses(&self) -> std::io::Result<Vec<IpAddr>> {
        let addresses = nix::ifaddrs::getifaddrs()?.filter_map(|ifaddr| {
            if ifaddr.interface_name == self.name {
                return None;
            }
            let address = ifaddr.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        });
        Ok(addresses.collect())
    }

    /// Nothing to do: the overlay routes only 100.64.0.0/10 and its IPv6
    /// /48, never the underlay's destinations.
    fn protect(&self, _socket: BorrowedFd<'_>) -> std::io::Result<()> {
        Ok(())
    }

    fn system_attributes(hostname: &str) -> Attributes {
        crate::posture::system_attributes(hostname)
    }

    fn host_name(&self) -> String {
        nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .unwrap_or_default()
    }
}

/// The overlay's IPv6 /48: the first 48 bits of the node's own address.
pub(crate) fn overlay_v6_prefix(own: Ipv6Addr) -> Ipv6Addr {
    let bits = u128::from(own) & !((1u128 << 80) - 1);
    Ipv6Addr::from(bits)
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

    #[tokio::test]
    async fn the_host_addresses_skip_the_overlay_interface() {
        let host = LinuxHost::new("lo").unwrap();
        let found = host.local_addresses().unwrap();
        assert!(found.iter().all(|ip| !ip.is_loopback()), "{found:?}");
    }
}
