//! The overlay network interface: a TUN device, and the addresses and routes
//! that send overlay traffic into it, configured over netlink.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::route::{RouteMessage, RouteScope};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use weft_dataplane::offload::{self, VIRTIO_NET_HDR_LEN};

/// The TUN device's MTU: the data plane's, 1500 less WireGuard's 80 bytes
/// of worst-case (IPv6) overhead.
pub const MTU: u16 = weft_dataplane::core::DEFAULT_MTU;

/// A buffer for one frame read from the device: a virtio header and a
/// super-packet of up to 64 KiB.
pub const FRAME_BUF: usize = VIRTIO_NET_HDR_LEN + 65_536;

/// The environment variable that turns TUN offloads off (`off`, `0`,
/// `false`, `no`), for hosts whose kernel misbehaves and for tests of the
/// plain path.
pub const OFFLOAD_ENV: &str = "WEFT_TUN_OFFLOAD";

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
    device: AsyncFd<tun::Device>,
    /// Set when the device carries virtio headers and super-packets.
    offload: Option<Offload>,
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
            .field("offloads", &self.offload.is_some())
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

/// The state the offloaded data path keeps between reads and writes.
#[derive(Debug)]
struct Offload {
    scratch: Vec<u8>,
    coalescer: offload::Coalescer,
    malformed: u64,
}

impl Offload {
    fn new(accepted: Accepted) -> Self {
        Self {
            scratch: Vec::new(),
            coalescer: offload::Coalescer::new(accepted == Accepted::TcpAndUdp),
            malformed: 0,
        }
    }
}

/// Which segmentation offloads the kernel accepted for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accepted {
    /// TCP only: UDP datagrams are written one by one.
    Tcp,
    /// TCP and UDP (USO, Linux 6.2 and later).
    TcpAndUdp,
}

/// A piece of configuration we added, kept to remove exactly it later.
#[derive(Debug)]
enum Applied {
    Address(AddressMessage),
    Route(RouteMessage),
}

impl TunDevice {
    /// Creates the device, up, with MTU [`MTU`] and no addresses yet.
    ///
    /// Asks for TUN offloads (`IFF_VNET_HDR` and `TUNSETOFFLOAD`) so one
    /// read or write carries up to 64 KiB of a TCP flow; if the kernel
    /// refuses, or [`OFFLOAD_ENV`] is `off`, the device carries one packet
    /// per read and write.
    pub async fn create(name: &str) -> Result<Self, TunError> {
        let (device, accepted) = if offload_wanted(std::env::var(OFFLOAD_ENV).ok().as_deref()) {
            create_with_offloads(name)?
        } else {
            tracing::info!("TUN offloads off ({OFFLOAD_ENV}); using one packet per read");
            (open(name, false)?, None)
        };
        let offload = accepted.map(Offload::new);
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
        tracing::info!(
            device = name,
            mtu = MTU,
            offloads = match accepted {
                Some(Accepted::TcpAndUdp) => "tcp+udp",
                Some(Accepted::Tcp) => "tcp",
                None => "off",
            },
            "created TUN device"
        );
        Ok(Self {
            device,
            offload,
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

    /// Whether the device carries offloaded super-packets behind a
    /// virtio header; [`TunDevice::packets`] and [`TunDevice::send`] hide
    /// the difference.
    pub fn offloads(&self) -> bool {
        self.offload.is_some()
    }

    /// Reads one frame written to the device by the host: an IP packet,
    /// or with offloads a virtio header and a packet of up to 64 KiB
    /// (`buf` needs [`FRAME_BUF`] bytes). [`TunDevice::packets`] turns it
    /// into IP packets.
    pub async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.device
            .async_io(Interest::READABLE, |device| device.recv(buf))
            .await
    }

    /// Reads one more frame if the host has written one, without
    /// waiting: `WouldBlock` once the device is empty. Draining the device
    /// this way after [`TunDevice::recv`] lets one wakeup carry a batch.
    /// A `WouldBlock` also tells the runtime the device is empty, so the
    /// next [`TunDevice::recv`] waits for the kernel instead of trying a
    /// read that would fail again.
    pub fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.device
            .try_io(Interest::READABLE, |device| device.recv(buf))
    }

    /// Hands `emit` the IP packets, of at most [`MTU`] bytes, of a frame
    /// [`TunDevice::recv`] read: the frame itself, or with offloads its
    /// segments, checksums completed. A malformed frame is dropped and
    /// counted.
    pub fn packets(&mut self, frame: &mut [u8], mut emit: impl FnMut(&[u8])) {
        let Some(offload) = &mut self.offload else {
            emit(frame);
            return;
        };
        if let Err(e) = offload::split(frame, usize::from(MTU), &mut offload.scratch, emit) {
            offload.malformed += 1;
            tracing::debug!(
                dropped = offload.malformed,
                "dropped a frame from the TUN device: {e}"
            );
        }
    }

    /// Hands one IP packet to the host. With offloads the packet waits
    /// for [`TunDevice::flush`], which joins consecutive TCP segments (and
    /// UDP datagrams, if the kernel accepted USO) of a flow into one write.
    pub async fn send(&mut self, packet: &[u8]) -> std::io::Result<()> {
        match &mut self.offload {
            Some(offload) => offload.coalescer.push(packet),
            None => {
                self.write(packet).await?;
            }
        }
        Ok(())
    }

    /// Writes the packets [`TunDevice::send`] queued. A failed write is
    /// logged and the others still go.
    pub async fn flush(&mut self) {
        let Some(offload) = &mut self.offload else {
            return;
        };
        if offload.coalescer.is_empty() {
            return;
        }
        for frame in offload.coalescer.finish() {
            if let Err(e) = Self::write_to(&self.device, frame).await {
                tracing::debug!("TUN write failed: {e}");
            }
        }
        offload.coalescer.clear();
    }

    async fn write(&self, frame: &[u8]) -> std::io::Result<usize> {
        Self::write_to(&self.device, frame).await
    }

    async fn write_to(device: &AsyncFd<tun::Device>, frame: &[u8]) -> std::io::Result<usize> {
        device
            .async_io(Interest::WRITABLE, |device| device.send(frame))
            .await
    }

    /// Frames from the TUN device dropped as malformed.
    pub fn malformed_frames(&self) -> u64 {
        self.offload.as_ref().map_or(0, |o| o.malformed)
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

/// Whether the value of [`OFFLOAD_ENV`] leaves offloads on.
fn offload_wanted(value: Option<&str>) -> bool {
    !matches!(
        value.map(|v| v.trim().to_ascii_lowercase()).as_deref(),
        Some("off" | "0" | "false" | "no")
    )
}

/// Opens the device with a virtio header and enables the offloads; if the
/// kernel refuses either, reopens it without.
fn create_with_offloads(name: &str) -> Result<(AsyncFd<tun::Device>, Option<Accepted>), TunError> {
    let refused = match open(name, true) {
        Ok(device) => match enable_offloads(&device) {
            Ok(accepted) => return Ok((device, Some(accepted))),
            Err(e) => format!("TUNSETOFFLOAD: {e}"),
        },
        Err(e) => format!("IFF_VNET_HDR: {e}"),
    };
    tracing::info!("TUN offloads unavailable: {refused}; using one packet per read");
    Ok((open(name, false)?, None))
}

/// Creates the device, up, with MTU [`MTU`], with or without a virtio header.
///
/// The device is non-blocking and registered with the runtime here rather
/// than through the `tun` crate's async wrapper, which offers no read that
/// returns at once: batching reads after a wakeup needs one.
fn open(name: &str, vnet_hdr: bool) -> Result<AsyncFd<tun::Device>, TunError> {
    let mut config = tun::Configuration::default();
    config.tun_name(name).mtu(MTU).up();
    config.platform_config(|p| {
        p.vnet_hdr(vnet_hdr);
    });
    let device = tun::create(&config).map_err(|e| create_error(name, e))?;
    let registered = device.set_nonblock().and_then(|()| {
        // SAFETY: `tun::Device` owns its descriptor, closes it only when
        // dropped, and returns that same descriptor from every `as_raw_fd`.
        unsafe { AsyncFd::register(device) }.map_err(std::io::Error::from)
    });
    registered.map_err(|e| TunError::Create {
        name: name.to_owned(),
        reason: format!("cannot register the device with the runtime: {e}"),
    })
}

/// Lets the kernel hand over TCP super-packets with partial checksums, and
/// UDP ones where the kernel knows how (Linux 6.2 and later), and says
/// which it accepted: only then does it take UDP super-packets written to
/// the device as well.
fn enable_offloads(device: &AsyncFd<tun::Device>) -> std::io::Result<Accepted> {
    let tcp = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    let fd = device.as_raw_fd();
    let set = |flags: libc::c_uint| {
        // SAFETY: TUNSETOFFLOAD takes its flags by value and reads no memory;
        // `fd` is the open TUN device `device` owns.
        let result = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        if result < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    match set(tcp | libc::TUN_F_USO4 | libc::TUN_F_USO6) {
        Ok(()) => Ok(Accepted::TcpAndUdp),
        Err(_) => set(tcp).map(|()| Accepted::Tcp),
    }
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
    fn only_an_explicit_off_disables_offloads() {
        for off in ["off", "OFF", "0", "false", " no "] {
            assert!(!offload_wanted(Some(off)), "{off}");
        }
        for on in [None, Some("on"), Some("1"), Some("")] {
            assert!(offload_wanted(on), "{on:?}");
        }
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
