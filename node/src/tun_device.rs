//! The overlay network interface's packets: a TUN device, with the
//! kernel's segmentation offloads where it has them. Its addresses and
//! routes are [`crate::host`]'s.

use std::os::fd::AsRawFd;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use weft_dataplane::offload::{self, VIRTIO_NET_HDR_LEN};
use weft_engine::device::PacketIo;

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

/// An up TUN device.
pub struct TunDevice {
    device: AsyncFd<tun::Device>,
    /// Set when the device carries virtio headers and super-packets.
    offload: Option<Offload>,
    name: String,
}

impl std::fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunDevice")
            .field("name", &self.name)
            .field("offloads", &self.offload.is_some())
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
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the device carries offloaded super-packets behind a
    /// virtio header; [`PacketIo::packets`] and [`PacketIo::send`] hide
    /// the difference.
    pub fn offloads(&self) -> bool {
        self.offload.is_some()
    }

    async fn write_to(device: &AsyncFd<tun::Device>, frame: &[u8]) -> std::io::Result<usize> {
        device
            .async_io(Interest::WRITABLE, |device| device.send(frame))
            .await
    }
}

impl PacketIo for TunDevice {
    /// A virtio header and a super-packet of up to 64 KiB.
    const FRAME_LEN: usize = FRAME_BUF;

    /// Reads one frame written to the device by the host: an IP packet,
    /// or with offloads a virtio header and a packet of up to 64 KiB
    /// (`buf` needs [`FRAME_BUF`] bytes). [`PacketIo::packets`] turns it
    /// into IP packets.
    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.device
            .async_io(Interest::READABLE, |device| device.recv(buf))
            .await
    }

    /// Reads one more frame if the host has written one, without
    /// waiting: `WouldBlock` once the device is empty. Draining the device
    /// this way after [`PacketIo::recv`] lets one wakeup carry a batch.
    /// A `WouldBlock` also tells the runtime the device is empty, so the
    /// next [`PacketIo::recv`] waits for the kernel instead of trying a
    /// read that would fail again.
    fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.device
            .try_io(Interest::READABLE, |device| device.recv(buf))
    }

    /// Hands `emit` the IP packets, of at most [`MTU`] bytes, of a frame
    /// [`PacketIo::recv`] read: the frame itself, or with offloads its
    /// segments, checksums completed. A malformed frame is dropped and
    /// counted.
    fn packets(&mut self, frame: &mut [u8], mut emit: impl FnMut(&[u8])) {
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
    /// for [`PacketIo::flush`], which joins consecutive TCP segments (and
    /// UDP datagrams, if the kernel accepted USO) of a flow into one write.
    async fn send(&mut self, packet: &[u8]) -> std::io::Result<()> {
        match &mut self.offload {
            Some(offload) => offload.coalescer.push(packet),
            None => {
                Self::write_to(&self.device, packet).await?;
            }
        }
        Ok(())
    }

    /// Writes the packets [`PacketIo::send`] queued. A failed write is
    /// logged and the others still go.
    async fn flush(&mut self) {
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

    /// Frames from the TUN device dropped as malformed.
    fn malformed_frames(&self) -> u64 {
        self.offload.as_ref().map_or(0, |o| o.malformed)
    }
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
