//! The WireGuard UDP socket: one socket for IPv4 and IPv6 where the host
//! allows it, presenting IPv4 peers as plain IPv4 addresses either way.
//!
//! Datagrams move in batches: `recvmmsg` with UDP GRO on receive, and UDP
//! GSO on send (one `sendmsg` for a run of equal-sized datagrams to one
//! peer) where the kernel has it, one datagram per `sendmsg` where it does not.

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn6};
use quinn_udp::{RecvMeta, UdpSocketState};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The socket as the standard library owns it; [`Underlay`] registers it
/// with the runtime itself, to tell the runtime when a receive emptied it.
type UdpSocket = std::net::UdpSocket;

/// The node's underlay socket.
#[derive(Debug)]
pub struct Underlay {
    socket: AsyncFd<UdpSocket>,
    state: UdpSocketState,
    dual_stack: bool,
    /// Whether to use GSO where the kernel has it; off only to test the fallback.
    gso: bool,
}

/// Receive buffers for [`Underlay::recv_batch`], reused across calls.
pub struct RecvBatch {
    storage: Box<[u8]>,
    meta: [RecvMeta; RECV_SLOTS],
    filled: usize,
}

/// Datagrams to one destination gathered for one [`Underlay::send_batch`]:
/// equal-sized, but for a shorter last one, as UDP GSO requires.
#[derive(Debug, Default)]
pub struct SendBatch {
    contents: Vec<u8>,
    dst: Option<SocketAddr>,
    segment: usize,
    count: usize,
    /// A shorter datagram ended the run; nothing more may follow.
    closed: bool,
}

/// Datagrams (or GRO-coalesced runs of them) one `recvmmsg` may return.
const RECV_SLOTS: usize = 16;
/// A slot holds the largest UDP payload, so a GRO run or a lone datagram
/// of any size arrives whole.
const RECV_SLOT_LEN: usize = 65_535;
/// The most bytes one GSO send carries: the UDP length field's limit less
/// the IPv4 and UDP headers, rounded down.
const MAX_GSO_BYTES: usize = 65_000;
/// Socket buffers big enough for a burst at line rate, so the kernel does
/// not drop datagrams while the node is busy with the previous batch.
const SOCKET_BUFFER: usize = 4 << 20;

impl Underlay {
    /// Binds `[::]:port` accepting IPv4 too, or `0.0.0.0:port` when the host
    /// has no IPv6. Port 0 picks a free port.
    ///
    /// Detects UDP GSO and GRO (logged once) and enlarges the socket buffers.
    pub fn bind(port: u16) -> io::Result<Self> {
        let (socket, dual_stack) = match bind_dual_stack(port) {
            Ok(socket) => (socket, true),
            Err(e) => {
                tracing::debug!("no dual-stack UDP socket ({e}); using IPv4 only");
                let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
                socket.set_nonblocking(true)?;
                (socket, false)
            }
        };
        let state = UdpSocketState::new((&socket).into())?;
        allow_fragmentation(&socket, dual_stack);
        enlarge_buffers(&socket);
        // SAFETY: the standard library's socket owns its descriptor and
        // closes it only when dropped, with the `AsyncFd` that holds it.
        let socket = unsafe { AsyncFd::register(socket) }.map_err(io::Error::from)?;
        tracing::info!(
            gso_segments = state.max_gso_segments(),
            gro_segments = state.gro_segments(),
            "UDP offloads (1 means the kernel lacks it; datagrams then go one by one)"
        );
        Ok(Self {
            socket,
            state,
            dual_stack,
            gso: true,
        })
    }

    /// The socket, for [`Platform::protect`](super::Platform::protect).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.get_ref().as_fd()
    }

    /// The bound port.
    pub fn port(&self) -> std::io::Result<u16> {
        Ok(self.socket.get_ref().local_addr()?.port())
    }

    /// How many datagrams one send may carry: 1 without UDP GSO.
    pub fn max_segments(&self) -> usize {
        if self.gso {
            self.state.max_gso_segments()
        } else {
            1
        }
    }

    /// Waits for datagrams and receives as many as are queued, up to the
    /// batch's capacity; read them with [`RecvBatch::datagrams`]. A batch
    /// that did not fill up emptied the socket, and the runtime is told so:
    /// the next call waits at once instead of first trying a receive that
    /// finds nothing.
    pub async fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<()> {
        batch.filled = 0;
        let RecvBatch { storage, meta, .. } = batch;
        loop {
            let mut ready = self.socket.readable().await?;
            let received = ready.try_io(|socket| {
                let mut chunks = storage.chunks_mut(RECV_SLOT_LEN);
                let mut slices: [IoSliceMut<'_>; RECV_SLOTS] =
                    std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
                self.state.recv(socket.get_ref().into(), &mut slices, meta)
            });
            match received {
                Ok(Ok(filled)) => {
                    if filled < RECV_SLOTS {
                        ready.clear_ready();
                    }
                    batch.filled = filled;
                    return Ok(());
                }
                Ok(Err(e)) => return Err(e),
                // The socket was empty after all; readiness is cleared.
                Err(_) => {}
            }
        }
    }

    /// Sends the batch's datagrams and empties it: one GSO send, or one
    /// send per datagram when the kernel refuses segmentation (which also
    /// turns it off for later batches). The first error is returned after
    /// every datagram was tried.
    pub async fn send_batch(&self, batch: &mut SendBatch) -> io::Result<()> {
        let Some(dst) = batch.dst else {
            return Ok(());
        };
        let dst = self.wire_address(dst);
        let result = if batch.count > 1 && self.max_segments() > 1 {
            match self.send(dst, &batch.contents, Some(batch.segment)).await {
                Err(e) if self.max_segments() == 1 => {
                    tracing::info!("UDP GSO refused ({e}); sending datagrams one by one");
                    self.send_each(dst, batch).await
                }
                // A segment larger than the path MTU: the kernel fragments
                // lone datagrams but never GSO segments.
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                    tracing::trace!(%dst, "GSO segments exceed the path MTU; sending one by one");
                    self.send_each(dst, batch).await
                }
                other => other,
            }
        } else {
            self.send_each(dst, batch).await
        };
        batch.clear();
        result
    }

    async fn send_each(&self, dst: SocketAddr, batch: &SendBatch) -> io::Result<()> {
        let mut first_error = None;
        for datagram in batch.contents.chunks(batch.segment.max(1)) {
            if let Err(e) = self.send(dst, datagram, None).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn send(
        &self,
        destination: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let transmit = quinn_udp::Transmit {
            destination,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        self.socket
            .async_io(Interest::WRITABLE, |socket| {
                self.state.try_send(socket.into(), &transmit)
            })
            .await
    }

    /// IPv4 destinations as IPv4-mapped IPv6 on a dual-stack socket.
    fn wire_address(&self, dst: SocketAddr) -> SocketAddr {
        match dst {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            other => other,
        }
    }
}

impl RecvBatch {
    /// Buffers for a full batch. Pages are touched only as datagrams fill them.
    pub fn new() -> Self {
        Self {
            storage: vec![0; RECV_SLOTS * RECV_SLOT_LEN].into_boxed_slice(),
            meta: [RecvMeta::default(); RECV_SLOTS],
            filled: 0,
        }
    }

    /// The datagrams of the last receive with their senders (IPv4 senders
    /// as IPv4 addresses), GRO runs split back into datagrams.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.meta[..self.filled]
            .iter()
            .zip(self.storage.chunks(RECV_SLOT_LEN))
            .flat_map(|(meta, slot)| {
                let from = canonical(meta.addr);
                let stride = if meta.stride == 0 {
                    meta.len
                } else {
                    meta.stride
                };
                slot[..meta.len.min(slot.len())]
                    .chunks(stride.max(1))
                    .map(move |datagram| (from, datagram))
            })
    }
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("filled", &self.filled)
            .finish_non_exhaustive()
    }
}

impl SendBatch {
    /// Whether `len` more bytes to `dst` can join this batch in one GSO
    /// send of at most `max_segments` datagrams. An empty batch takes anything.
    pub fn fits(&self, dst: SocketAddr, len: usize, max_segments: usize) -> bool {
        let Some(current) = self.dst else {
            return true;
        };
        current == dst
            && !self.closed
            && len <= self.segment
            && self.count < max_segments
            && self.contents.len() + len <= MAX_GSO_BYTES
    }

    /// Appends a datagram; call [`SendBatch::fits`] first and send the
    /// batch when it says no.
    pub fn push(&mut self, dst: SocketAddr, datagram: &[u8]) {
        if self.dst.is_none() {
            self.dst = Some(dst);
            self.segment = datagram.len();
        }
        self.closed = datagram.len() < self.segment;
        self.contents.extend_from_slice(datagram);
        self.count += 1;
    }

    /// Whether nothing is waiting to be sent.
    pub fn is_empty(&self) -> bool {
        self.dst.is_none()
    }

    fn clear(&mut self) {
        self.contents.clear();
        self.dst = None;
        self.segment = 0;
        self.count = 0;
        self.closed = false;
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
    Ok(UdpSocket::from(fd))
}

/// Undoes the "no fragmentation" the offload setup chose: the node's
/// datagrams take the host's path-MTU handling, as any UDP socket's do.
fn allow_fragmentation(socket: &UdpSocket, dual_stack: bool) {
    set_int_option(
        socket,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_WANT,
    );
    if dual_stack {
        set_int_option(
            socket,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_WANT,
        );
        let _ = socket::setsockopt(&socket.as_fd(), sockopt::Ipv6DontFrag, &false);
    }
}

/// An integer socket option nix has no wrapper for; failure leaves the
/// option as it was, which only affects fragmentation.
fn set_int_option(socket: &UdpSocket, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the borrow of `socket`, and the
    // option value is a live `c_int` whose size is passed alongside.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(
            level,
            name,
            "cannot set socket option: {}",
            io::Error::last_os_error()
        );
    }
}

/// Asks for [`SOCKET_BUFFER`]-sized buffers: past the system limit when
/// root (the FORCE options), else as large as the limit allows.
fn enlarge_buffers(socket: &UdpSocket) {
    let fd = socket.as_fd();
    if socket::setsockopt(&fd, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if socket::setsockopt(&fd, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket::setsockopt(&fd, sockopt::SndBuf, &SOCKET_BUFFER);
    }
    tracing::debug!(
        receive = socket::getsockopt(&fd, sockopt::RcvBuf).ok(),
        send = socket::getsockopt(&fd, sockopt::SndBuf).ok(),
        "UDP socket buffers"
    );
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

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn ipv4_peers_round_trip_through_the_socket() {
        let underlay = Underlay::bind(0).unwrap();
        let port = underlay.port().unwrap();
        let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        peer.send_to(b"ping", ("127.0.0.1", port)).await.unwrap();
        let mut received = RecvBatch::new();
        underlay.recv_batch(&mut received).await.unwrap();
        let got: Vec<_> = received.datagrams().collect();
        assert_eq!(got, vec![(peer.local_addr().unwrap(), &b"ping"[..])]);
        let mut batch = SendBatch::default();
        batch.push(peer.local_addr().unwrap(), b"pong");
        underlay.send_batch(&mut batch).await.unwrap();
        assert!(batch.is_empty());
        let mut buf = [0u8; 16];
        let (n, _) = peer.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"pong");
    }

    /// A run of equal datagrams and a shorter last one arrives as separate
    /// datagrams, byte for byte, whether sent with GSO or one by one.
    async fn batch_arrives_intact(underlay: Underlay) {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let dst = peer.local_addr().unwrap();
        let sent: Vec<Vec<u8>> = (0u8..5)
            .map(|i| vec![i; if i == 4 { 300 } else { 1200 }])
            .collect();
        let mut batch = SendBatch::default();
        for datagram in &sent {
            assert!(batch.fits(dst, datagram.len(), 64));
            batch.push(dst, datagram);
        }
        underlay.send_batch(&mut batch).await.unwrap();
        let mut buf = [0u8; 2048];
        for expected in &sent {
            let n = peer.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &expected[..]);
        }
    }

    #[tokio::test]
    async fn batches_go_out_with_gso() {
        batch_arrives_intact(Underlay::bind(0).unwrap()).await;
    }

    #[tokio::test]
    async fn batches_go_out_one_by_one_without_gso() {
        let mut underlay = Underlay::bind(0).unwrap();
        underlay.gso = false;
        assert_eq!(underlay.max_segments(), 1);
        batch_arrives_intact(underlay).await;
    }

    #[tokio::test]
    async fn a_burst_is_received_in_batches_from_its_sender() {
        let underlay = Underlay::bind(0).unwrap();
        let port = underlay.port().unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0u8..40 {
            peer.send_to(&[i; 100], ("127.0.0.1", port)).unwrap();
        }
        let mut received = RecvBatch::new();
        let mut got = Vec::new();
        while got.len() < 40 {
            underlay.recv_batch(&mut received).await.unwrap();
            for (from, datagram) in received.datagrams() {
                assert_eq!(from, peer.local_addr().unwrap());
                got.push(datagram.to_vec());
            }
        }
        let expected: Vec<Vec<u8>> = (0u8..40).map(|i| vec![i; 100]).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn a_batch_takes_one_destination_and_equal_sizes_up_to_a_shorter_last() {
        let (a, b) = (addr("192.0.2.1:1"), addr("192.0.2.2:1"));
        let mut batch = SendBatch::default();
        assert!(batch.is_empty());
        assert!(batch.fits(a, 1000, 64));
        batch.push(a, &[0; 1000]);
        assert!(!batch.fits(b, 1000, 64), "another destination");
        assert!(!batch.fits(a, 1001, 64), "a longer datagram");
        assert!(!batch.fits(a, 1000, 1), "no GSO: one datagram per send");
        assert!(batch.fits(a, 1000, 64));
        batch.push(a, &[0; 600]);
        assert!(
            !batch.fits(a, 600, 64),
            "nothing follows a shorter datagram"
        );
        assert!(!batch.fits(a, 1000, 64));
    }

    #[test]
    fn a_batch_stays_within_one_udp_send() {
        let a = addr("192.0.2.1:1");
        let mut batch = SendBatch::default();
        let mut count = 0;
        while batch.fits(a, 1452, 1000) {
            batch.push(a, &[0; 1452]);
            count += 1;
        }
        assert_eq!(count, MAX_GSO_BYTES / 1452);
    }
}
