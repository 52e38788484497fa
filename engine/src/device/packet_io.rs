//! How the device reads and writes the overlay's IP packets: a TUN device
//! on Linux, a VPN service's file descriptor on a phone.

use std::future::Future;
use std::io;

/// The overlay interface's packet I/O, as the device loop drives it.
///
/// A read returns a *frame*: one IP packet, or where the interface offloads
/// segmentation a super-packet that [`PacketIo::packets`] splits. The loop
/// is generic over this trait, so every packet goes through direct calls
/// into the caller's buffers: nothing is boxed or copied on the way.
pub trait PacketIo {
    /// The buffer size [`PacketIo::recv`] and [`PacketIo::try_recv`] need
    /// for the largest frame.
    const FRAME_LEN: usize;

    /// Waits for a frame and reads it into `buf`; returns its length.
    fn recv(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;

    /// Reads one more frame if one is queued, without waiting:
    /// `WouldBlock` once the interface is empty. Draining the interface
    /// this way after [`PacketIo::recv`] lets one wakeup carry a batch.
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize>;

    /// Hands `emit` the IP packets, of at most the overlay's MTU, of a
    /// frame read into `frame`. A malformed frame is dropped and counted
    /// in [`PacketIo::malformed_frames`].
    fn packets(&mut self, frame: &mut [u8], emit: impl FnMut(&[u8]));

    /// Hands one IP packet to the host; it may wait for
    /// [`PacketIo::flush`], which can join packets of a flow into one write.
    fn send(&mut self, packet: &[u8]) -> impl Future<Output = io::Result<()>> + Send;

    /// Writes what [`PacketIo::send`] queued. A failed write is logged and
    /// the others still go.
    fn flush(&mut self) -> impl Future<Output = ()> + Send;

    /// Frames dropped as malformed so far.
    fn malformed_frames(&self) -> u64;
}
