//! The daemon's one loop: wait for the TUN device, the UDP socket, the
//! control session, the API or the core's timer; feed the core; drain its
//! output.

use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::Daemon;
use crate::api::Command;
use crate::control::ControlUpdate;

/// Large enough for any datagram, so nothing is truncated.
const UDP_BUF: usize = 65_536;
/// Large enough for any packet the TUN device hands over at its MTU.
const TUN_BUF: usize = 65_536;
/// How often a workload's identity token file is checked for a new token.
const TOKEN_CHECK: Duration = Duration::from_secs(1);

impl Daemon {
    /// Runs until SIGTERM or SIGINT.
    pub(super) async fn run(
        &mut self,
        mut commands: mpsc::Receiver<Command>,
        mut updates: mpsc::Receiver<ControlUpdate>,
    ) -> anyhow::Result<()> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut tun_buf = vec![0u8; TUN_BUF];
        let mut udp_buf = vec![0u8; UDP_BUF];
        let mut token_check = tokio::time::interval(TOKEN_CHECK);
        token_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let timeout = self.core.poll_timeout();
            tokio::select! {
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                read = self.tun.recv(&mut tun_buf) => match read {
                    Ok(n) => self.core.handle_tun_packet(&tun_buf[..n], Instant::now()),
                    Err(e) => return Err(anyhow::anyhow!("reading the TUN device failed: {e}")),
                },
                read = self.underlay.recv_from(&mut udp_buf) => match read {
                    Ok((n, from)) => self.core.handle_udp(from, &udp_buf[..n], Instant::now()),
                    Err(e) => tracing::debug!("UDP receive failed: {e}"),
                },
                Some(update) = updates.recv() => self.on_control(update).await,
                Some(command) = commands.recv() => self.on_command(command).await,
                () = sleep_until(timeout) => self.core.handle_timeout(Instant::now()),
                _ = token_check.tick() => self.check_renewal(),
            }
            self.flush().await;
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
                let _ = reply.send(crate::api::whois_lookup(&peers, &self.capabilities, addr));
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
        }
    }

    /// Writes out everything the core queued.
    async fn flush(&mut self) {
        while let Some(transmit) = self.core.poll_transmit() {
            if let Err(e) = self.underlay.send_to(&transmit.payload, transmit.dst).await {
                tracing::debug!(dst = %transmit.dst, "UDP send failed: {e}");
            }
        }
        while let Some(packet) = self.core.poll_tun_packet() {
            if let Err(e) = self.tun.send(&packet).await {
                tracing::debug!("TUN write failed: {e}");
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}
