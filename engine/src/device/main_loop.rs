//! The device's one loop: wait for the overlay interface, the UDP socket,
//! the control session, a command or the core's timer; feed the core;
//! drain its output.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use super::{Command, Device, DeviceError, PacketIo, Platform, RecvBatch, SendBatch};
use crate::flows::convert::{self, Anchor, Ends};
use crate::flows::SEAL_INTERVAL;

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
        // The flows the overlay's end closed go to the spool for the next run.
        self.drain_flow_reports();
        self.flows.seal();
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
        let mut flow_seal = tokio::time::interval(SEAL_INTERVAL);
        flow_seal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                _ = flow_seal.tick() => self.flows.seal(),
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
            Command::Metrics(reply) => {
                let _ = reply.send(self.metrics());
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
        self.drain_flow_reports();
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

    /// Turns the core's flow reports into records for the coordinator,
    /// with the data plane's drops since the last time.
    pub(super) fn drain_flow_reports(&mut self) {
        let dropped = self.core.flow_log_stats().dropped;
        let new_drops = dropped.saturating_sub(self.flow_drops_seen);
        self.flow_drops_seen = dropped;
        let Some(first) = self.core.poll_flow_report() else {
            if new_drops > 0 {
                self.flows.push([], new_drops);
            }
            return;
        };
        let mut reports = vec![first];
        reports.extend(std::iter::from_fn(|| self.core.poll_flow_report()));
        let anchor = Anchor::new(Instant::now(), SystemTime::now());
        let ends = Ends {
            me: self.self_node.as_ref(),
            core: &self.core,
        };
        let records: Vec<_> = reports
            .iter()
            .map(|report| convert::record(report, &ends, &anchor))
            .collect();
        tracing::trace!(records = records.len(), "flow records");
        self.flows.push(records, new_drops);
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

#[cfg(test)]
mod tests {
    use std::io;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::os::fd::BorrowedFd;
    use std::sync::{Arc, Mutex};

    use tokio::sync::{oneshot, watch};

    use super::*;
    use crate::device::{CommandError, LoginRequest, RunState, Underlay};
    use crate::posture::Attributes;
    use crate::state::StateDir;

    /// An overlay interface the host never writes to.
    struct Silent;

    impl PacketIo for Silent {
        const FRAME_LEN: usize = 1500;

        async fn recv(&self, _buf: &mut [u8]) -> io::Result<usize> {
            std::future::pending().await
        }

        fn try_recv(&self, _buf: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }

        fn packets(&mut self, frame: &mut [u8], mut emit: impl FnMut(&[u8])) {
            emit(frame);
        }

        async fn send(&mut self, _packet: &[u8]) -> io::Result<()> {
            Ok(())
        }

        async fn flush(&mut self) {}

        fn malformed_frames(&self) -> u64 {
            0
        }
    }

    /// A platform that records what the device asked of it.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl Recorder {
        fn record(&self, call: impl Into<String>) {
            self.0.lock().unwrap().push(call.into());
        }
    }

    impl Platform for Recorder {
        type Error = io::Error;

        async fn assign(&mut self, ipv4: Ipv4Addr, _ipv6: Ipv6Addr) -> io::Result<()> {
            self.record(format!("assign {ipv4}"));
            Ok(())
        }

        async fn unassign(&mut self) -> io::Result<()> {
            self.record("unassign");
            Ok(())
        }

        fn local_addresses(&self) -> io::Result<Vec<IpAddr>> {
            Ok(vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))])
        }

        fn protect(&self, _socket: BorrowedFd<'_>) -> io::Result<()> {
            self.record("protect");
            Ok(())
        }

        fn system_attributes(hostname: &str) -> Attributes {
            Attributes::from([("node:hostname".to_owned(), hostname.to_owned())])
        }

        fn host_name(&self) -> String {
            "test-host".into()
        }
    }

    /// The seams a shell relies on: the underlay socket is protected once
    /// bound, commands are answered, and the shutdown the shell passes in
    /// stops the loop and withdraws the overlay. Spawned on a
    /// multi-threaded runtime, so a shell may run the device on any thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_device_answers_commands_until_its_shell_shuts_it_down() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(&tmp.path().join("state")).unwrap();
        let platform = Recorder::default();
        let (_posture, posture) = watch::channel(Attributes::new());
        let underlay = Underlay::bind(0).unwrap();
        let device = Device::new(state, Silent, platform.clone(), underlay, posture).unwrap();
        let (commands, requests) = mpsc::channel(4);
        let (stop, stopped) = oneshot::channel::<()>();
        let running = tokio::spawn(device.run(requests, async {
            let _ = stopped.await;
        }));

        let (reply, answer) = oneshot::channel();
        commands.send(Command::Status(reply)).await.unwrap();
        let status = answer.await.unwrap();
        assert_eq!(status.state, RunState::Stopped);
        assert!(status.self_node.is_none() && status.peers.is_empty());

        let (reply, answer) = oneshot::channel();
        let login = Command::Login(LoginRequest::default(), reply);
        commands.send(login).await.unwrap();
        let refused = answer.await.unwrap().unwrap_err();
        assert!(matches!(refused, CommandError::Invalid(_)), "{refused:?}");
        assert!(refused.to_string().contains("weft up"), "{refused}");

        stop.send(()).unwrap();
        running.await.unwrap().unwrap();
        assert_eq!(*platform.0.lock().unwrap(), ["protect", "unassign"]);
    }
}
