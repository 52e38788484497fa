//! The device's one loop: wait for the overlay interface, the UDP socket,
//! the control session, a command or the core's timer; feed the core;
//! drain its output.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{Command, Device, DeviceError, PacketIo, Platform, RecvBatch, SendBatch};

/// Frames read from the overlay interface per wakeup at most, so a busy device
/// cannot starve the socket, the control session or the timers.
const TUN_BATCH: usize = 64;
/// Bytes read from the overlay interface per wakeup at most: offloaded frames
/// carry up to 64 KiB each, and encrypting megabytes before the socket is
/// read again would hold up acknowledgements and pings coming the other way.
const TUN_BATCH_BYTES: usize = 256 * 1024;
/// How often a workload's identity token file is checked for a new token.
const TOKEN_CHECK: Duration = Duration::from_secs(1);
/// How often the host's addresses are listed, to notice the node moved.
const ENDPOINT_CHECK: Duration = Duration::from_secs(1);

impl<T: PacketIo, P: Platform> Device<T, P> {
    /// Runs the device, taking `commands`, until `shutdown` completes or
    /// reading the overlay interface fails; then leaves the overlay: no
    /// tunnels, no addresses.
    pub async fn run(
        mut self,
        commands: mpsc::Receiver<Command>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), DeviceError> {
        let result = self.serve(commands, shutdown).await;
        self.stop_control().await;
        result
    }

    async fn serve(
        &mut self,
        mut commands: mpsc::Receiver<Command>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), DeviceError> {
        tokio::pin!(shutdown);
        let mut tun_buf = vec![0u8; T::FRAME_LEN];
        let mut received = RecvBatch::new();
        let mut outgoing = SendBatch::default();
        let mut token_check = tokio::time::interval(TOKEN_CHECK);
        token_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut endpoint_check = tokio::time::interval(ENDPOINT_CHECK);
        endpoint_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let timeout = self.core.poll_timeout();
            tokio::select! {
                () = &mut shutdown => break,
                read = self.packets.recv(&mut tun_buf) => match read {
                    Ok(n) => self.drain_tun(&mut tun_buf, n)?,
                    Err(e) => return Err(DeviceError::Read(e)),
                },
                read = self.underlay.recv_batch(&mut received) => match read {
                    Ok(()) => {
                        let now = Instant::now();
                        for (from, datagram) in received.datagrams() {
                            self.core.handle_udp(from, datagram, now);
                        }
                    }
                    Err(e) => tracing::debug!("UDP receive failed: {e}"),
                },
                event = self.relays.recv() => self.on_relay_event(&event),
                Some(update) = self.control_updates.recv() => self.on_control(update).await,
                Some(command) = commands.recv() => self.on_command(command).await,
                () = sleep_until(timeout) => self.core.handle_timeout(Instant::now()),
                _ = token_check.tick() => self.check_renewal(),
                _ = endpoint_check.tick() => self.poll_local_endpoints(),
            }
            self.flush(&mut outgoing).await;
        }
        tracing::info!("shutting down");
        Ok(())
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Up(request, reply) => self.on_up(request, reply),
            Command::Login(request, reply) => self.on_login(request, reply),
            Command::Down(reply) => {
                let status = self.on_down().await;
                let _ = reply.send(status);
            }
            Command::WhoIs(addr, reply) => {
                let peers = self.core.peers();
                let _ = reply.send(super::whois::lookup(&peers, &self.capabilities, addr));
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Ping(request, reply) => self.on_ping(&request, reply),
            Command::Netcheck(reply) => {
                let _ = reply.send(self.netcheck());
            }
        }
    }

    /// Feeds the core the frame already read (`first` bytes of `buf`) and
    /// then every frame the device has queued, up to [`TUN_BATCH`] frames
    /// and [`TUN_BATCH_BYTES`], so the flush that follows sends them as one
    /// batch. Offloaded super-packets reach the core as packets of at most
    /// the MTU.
    fn drain_tun(&mut self, buf: &mut [u8], first: usize) -> Result<(), DeviceError> {
        let now = Instant::now();
        let core = &mut self.core;
        let mut len = first;
        let mut read = 0;
        for _ in 0..TUN_BATCH {
            read += len;
            self.packets.packets(&mut buf[..len], |packet| {
                core.handle_tun_packet(packet, now)
            });
            if read >= TUN_BATCH_BYTES {
                break;
            }
            len = match self.packets.try_recv(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(DeviceError::Read(e)),
            };
        }
        Ok(())
    }

    /// Acts on the core's events, then writes out everything it queued:
    /// relay datagrams to their sessions, UDP datagrams to one peer in GSO
    /// batches, then the packets for the TUN device (joined into
    /// super-packets where the device takes them). Buffers go back to the
    /// core for reuse.
    async fn flush(&mut self, batch: &mut SendBatch) {
        self.drain_events();
        let max_segments = self.underlay.max_segments();
        while let Some(transmit) = self.core.poll_transmit() {
            if !batch.fits(transmit.dst, transmit.payload.len(), max_segments) {
                self.send_batch(batch).await;
            }
            batch.push(transmit.dst, &transmit.payload);
            self.core.recycle(transmit.payload);
        }
        self.send_batch(batch).await;
        while let Some(packet) = self.core.poll_tun_packet() {
            if let Err(e) = self.packets.send(&packet).await {
                tracing::debug!("TUN write failed: {e}");
            }
            self.core.recycle(packet);
        }
        self.packets.flush().await;
    }

    async fn send_batch(&self, batch: &mut SendBatch) {
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.underlay.send_batch(batch).await {
            tracing::debug!("UDP send failed: {e}");
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}
