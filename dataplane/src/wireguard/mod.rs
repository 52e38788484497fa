// Copyright (c) 2019 Cloudflare, Inc. All rights reserved.
// SPDX-License-Identifier: BSD-3-Clause

//! WireGuard's Noise handshake, transport data and timers, vendored from
//! boringtun 0.7.1 (`src/noise`, BSD-3-Clause, see `LICENSE` here) so that
//! they run on the caller's clock and randomness: every entry point that
//! reads the time takes `now`, and ephemeral keys, cookie secrets and the
//! timestamp's wall-clock anchor come from the caller. The cryptography is
//! boringtun's (a local constant-time comparison replaces ring's deprecated
//! one); its device loop, FFI, persistent keepalive, loss and RTT
//! estimates and own per-peer rate limiter are left out, since weft uses
//! none of them.

pub(crate) mod errors;
pub(crate) mod handshake;
pub(crate) mod rate_limiter;

mod session;
mod timers;

#[cfg(test)]
pub(crate) use timers::{
    KEEPALIVE_TIMEOUT, REJECT_AFTER_TIME, REKEY_AFTER_TIME, REKEY_ATTEMPT_TIME, REKEY_TIMEOUT,
};

use errors::WireGuardError;
use handshake::Handshake;
use rate_limiter::RateLimiter;
use timers::{TimerName, Timers};

use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IPV4_MIN_HEADER_SIZE: usize = 20;
const IPV4_LEN_OFF: usize = 2;
const IPV4_SRC_IP_OFF: usize = 12;
const IPV4_IP_SZ: usize = 4;

const IPV6_MIN_HEADER_SIZE: usize = 40;
const IPV6_LEN_OFF: usize = 4;
const IPV6_SRC_IP_OFF: usize = 8;
const IPV6_IP_SZ: usize = 16;

const MAX_QUEUE_DEPTH: usize = 256;
/// number of sessions in the ring, better keep a PoT
const N_SESSIONS: usize = 8;

#[derive(Debug)]
pub(crate) enum TunnResult<'a> {
    Done,
    Err(WireGuardError),
    WriteToNetwork(&'a mut [u8]),
    WriteToTunnelV4(&'a mut [u8], Ipv4Addr),
    WriteToTunnelV6(&'a mut [u8], Ipv6Addr),
}

impl<'a> From<WireGuardError> for TunnResult<'a> {
    fn from(err: WireGuardError) -> TunnResult<'a> {
        TunnResult::Err(err)
    }
}

/// Tunnel represents a point-to-point WireGuard connection
pub(crate) struct Tunn {
    /// The handshake currently in progress
    handshake: handshake::Handshake,
    /// The N_SESSIONS most recent sessions, index is session id modulo N_SESSIONS
    sessions: [Option<session::Session>; N_SESSIONS],
    /// Index of most recently used session
    current: usize,
    /// Queue to store blocked packets
    packet_queue: VecDeque<Vec<u8>>,
    /// Keeps tabs on the expiring timers
    timers: timers::Timers,
    tx_bytes: usize,
    rx_bytes: usize,
    rate_limiter: Arc<RateLimiter>,
    /// Ephemeral keys come from here, seeded by the caller.
    rng: StdRng,
}

type MessageType = u32;
const HANDSHAKE_INIT: MessageType = 1;
const HANDSHAKE_RESP: MessageType = 2;
const COOKIE_REPLY: MessageType = 3;
const DATA: MessageType = 4;

const HANDSHAKE_INIT_SZ: usize = 148;
const HANDSHAKE_RESP_SZ: usize = 92;
const COOKIE_REPLY_SZ: usize = 64;
const DATA_OVERHEAD_SZ: usize = 32;

#[derive(Debug)]
pub(crate) struct HandshakeInit<'a> {
    sender_idx: u32,
    unencrypted_ephemeral: &'a [u8; 32],
    encrypted_static: &'a [u8],
    encrypted_timestamp: &'a [u8],
}

#[derive(Debug)]
pub(crate) struct HandshakeResponse<'a> {
    sender_idx: u32,
    pub(crate) receiver_idx: u32,
    unencrypted_ephemeral: &'a [u8; 32],
    encrypted_nothing: &'a [u8],
}

#[derive(Debug)]
pub(crate) struct PacketCookieReply<'a> {
    pub(crate) receiver_idx: u32,
    nonce: &'a [u8],
    encrypted_cookie: &'a [u8],
}

#[derive(Debug)]
pub(crate) struct PacketData<'a> {
    pub(crate) receiver_idx: u32,
    counter: u64,
    encrypted_encapsulated_packet: &'a [u8],
}

/// Describes a packet from network
#[derive(Debug)]
pub(crate) enum Packet<'a> {
    HandshakeInit(HandshakeInit<'a>),
    HandshakeResponse(HandshakeResponse<'a>),
    PacketCookieReply(PacketCookieReply<'a>),
    PacketData(PacketData<'a>),
}

impl Tunn {
    #[inline(always)]
    pub(crate) fn parse_incoming_packet(src: &[u8]) -> Result<Packet<'_>, WireGuardError> {
        let Some((&packet_type, rest)) = src.split_first_chunk::<4>() else {
            return Err(WireGuardError::InvalidPacket);
        };
        // Checks the type, as well as the reserved zero fields
        let packet_type = u32::from_le_bytes(packet_type);
        let u32_at = |at: usize| {
            rest.get(at..at + 4)
                .and_then(|b| b.first_chunk::<4>())
                .map(|b| u32::from_le_bytes(*b))
        };
        let key_at = |at: usize| rest.get(at..).and_then(|b| b.first_chunk::<32>());

        let packet = match (packet_type, src.len()) {
            (HANDSHAKE_INIT, HANDSHAKE_INIT_SZ) => (|| {
                Some(Packet::HandshakeInit(HandshakeInit {
                    sender_idx: u32_at(0)?,
                    unencrypted_ephemeral: key_at(4)?,
                    encrypted_static: &src[40..88],
                    encrypted_timestamp: &src[88..116],
                }))
            })(),
            (HANDSHAKE_RESP, HANDSHAKE_RESP_SZ) => (|| {
                Some(Packet::HandshakeResponse(HandshakeResponse {
                    sender_idx: u32_at(0)?,
                    receiver_idx: u32_at(4)?,
                    unencrypted_ephemeral: key_at(8)?,
                    encrypted_nothing: &src[44..60],
                }))
            })(),
            (COOKIE_REPLY, COOKIE_REPLY_SZ) => (|| {
                Some(Packet::PacketCookieReply(PacketCookieReply {
                    receiver_idx: u32_at(0)?,
                    nonce: &src[8..32],
                    encrypted_cookie: &src[32..64],
                }))
            })(),
            (DATA, DATA_OVERHEAD_SZ..=usize::MAX) => (|| {
                let counter = rest.get(4..12)?.first_chunk::<8>()?;
                Some(Packet::PacketData(PacketData {
                    receiver_idx: u32_at(0)?,
                    counter: u64::from_le_bytes(*counter),
                    encrypted_encapsulated_packet: &src[16..],
                }))
            })(),
            _ => None,
        };
        packet.ok_or(WireGuardError::InvalidPacket)
    }

    /// A tunnel between this node's key and the peer's, created at `now`.
    /// `index` is the 24-bit session index prefix; `unix_now` is the wall
    /// clock at `now`, the base of the handshake timestamps the peer checks
    /// for replays (it must grow across restarts); `rng_seed` seeds the
    /// ephemeral keys.
    pub(crate) fn new_at(
        static_private: x25519_dalek::StaticSecret,
        peer_static_public: x25519_dalek::PublicKey,
        index: u32,
        rate_limiter: Arc<RateLimiter>,
        now: Instant,
        unix_now: Duration,
        rng_seed: u64,
    ) -> Self {
        let static_public = x25519_dalek::PublicKey::from(&static_private);

        Tunn {
            handshake: Handshake::new(
                static_private,
                static_public,
                peer_static_public,
                index << 8,
                None,
                now,
                unix_now,
            ),
            sessions: Default::default(),
            current: Default::default(),
            tx_bytes: Default::default(),
            rx_bytes: Default::default(),

            packet_queue: VecDeque::new(),
            timers: Timers::new(now),

            rate_limiter,
            rng: StdRng::seed_from_u64(rng_seed),
        }
    }

    /// Encapsulate a single packet from the tunnel interface.
    /// Returns TunnResult.
    ///
    /// # Panics
    /// Panics if dst buffer is too small.
    /// Size of dst should be at least src.len() + 32, and no less than 148 bytes.
    pub(crate) fn encapsulate_at<'a>(
        &mut self,
        src: &[u8],
        dst: &'a mut [u8],
        now: Instant,
    ) -> TunnResult<'a> {
        self.timers.advance(now);
        self.encapsulate(src, dst, now)
    }

    fn encapsulate<'a>(&mut self, src: &[u8], dst: &'a mut [u8], now: Instant) -> TunnResult<'a> {
        let current = self.current;
        if let Some(session) = &mut self.sessions[current % N_SESSIONS] {
            // Send the packet using an established session
            let packet = match session.format_packet_data(src, dst) {
                Ok(packet) => packet,
                Err(error) => return TunnResult::Err(error),
            };
            self.timer_tick(TimerName::TimeLastPacketSent);
            // Exclude Keepalive packets from timer update.
            if !src.is_empty() {
                self.timer_tick(TimerName::TimeLastDataPacketSent);
            }
            self.tx_bytes += src.len();
            return TunnResult::WriteToNetwork(packet);
        }

        // If there is no session, queue the packet for future retry
        self.queue_packet(src);
        // Initiate a new handshake if none is in progress
        self.format_handshake_initiation(dst, false, now)
    }

    /// Receives a UDP datagram from the network and parses it.
    /// Returns TunnResult.
    ///
    /// If the result is of type TunnResult::WriteToNetwork, should repeat the call with empty datagram,
    /// until TunnResult::Done is returned. If batch processing packets, it is OK to defer until last
    /// packet is processed.
    pub(crate) fn decapsulate_at<'a>(
        &mut self,
        src_addr: Option<IpAddr>,
        datagram: &[u8],
        dst: &'a mut [u8],
        now: Instant,
    ) -> TunnResult<'a> {
        self.timers.advance(now);
        if datagram.is_empty() {
            // Indicates a repeated call
            return self.send_queued_packet(dst, now);
        }

        let mut cookie = [0u8; COOKIE_REPLY_SZ];
        let packet = match self
            .rate_limiter
            .verify_packet_at(src_addr, datagram, &mut cookie, now)
        {
            Ok(packet) => packet,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                dst[..cookie.len()].copy_from_slice(cookie);
                return TunnResult::WriteToNetwork(&mut dst[..cookie.len()]);
            }
            Err(TunnResult::Err(e)) => return TunnResult::Err(e),
            Err(_) => return TunnResult::Err(WireGuardError::InvalidPacket),
        };

        self.handle_verified_packet(packet, dst)
    }

    fn handle_verified_packet<'a>(&mut self, packet: Packet, dst: &'a mut [u8]) -> TunnResult<'a> {
        match packet {
            Packet::HandshakeInit(p) => self.handle_handshake_init(p, dst),
            Packet::HandshakeResponse(p) => self.handle_handshake_response(p, dst),
            Packet::PacketCookieReply(p) => self.handle_cookie_reply(p),
            Packet::PacketData(p) => self.handle_data(p, dst),
        }
        .unwrap_or_else(TunnResult::from)
    }

    fn handle_handshake_init<'a>(
        &mut self,
        p: HandshakeInit,
        dst: &'a mut [u8],
    ) -> Result<TunnResult<'a>, WireGuardError> {
        tracing::debug!(
            message = "Received handshake_initiation",
            remote_idx = p.sender_idx
        );

        let (packet, session) =
            self.handshake
                .receive_handshake_initialization(p, dst, &mut self.rng)?;

        // Store new session in ring buffer
        let index = session.local_index();
        self.sessions[index % N_SESSIONS] = Some(session);

        self.timer_tick(TimerName::TimeLastPacketReceived);
        self.timer_tick(TimerName::TimeLastPacketSent);
        self.timer_tick_session_established(false, index); // New session established, we are not the initiator

        tracing::debug!(message = "Sending handshake_response", local_idx = index);

        Ok(TunnResult::WriteToNetwork(packet))
    }

    fn handle_handshake_response<'a>(
        &mut self,
        p: HandshakeResponse,
        dst: &'a mut [u8],
    ) -> Result<TunnResult<'a>, WireGuardError> {
        tracing::debug!(
            message = "Received handshake_response",
            local_idx = p.receiver_idx,
            remote_idx = p.sender_idx
        );

        let mut session = self.handshake.receive_handshake_response(p)?;

        let keepalive_packet = session.format_packet_data(&[], dst)?;
        // Store new session in ring buffer
        let l_idx = session.local_index();
        let index = l_idx % N_SESSIONS;
        self.sessions[index] = Some(session);

        self.timer_tick(TimerName::TimeLastPacketReceived);
        self.timer_tick_session_established(true, index); // New session established, we are the initiator
        self.set_current_session(l_idx);

        tracing::debug!("Sending keepalive");

        Ok(TunnResult::WriteToNetwork(keepalive_packet)) // Send a keepalive as a response
    }

    fn handle_cookie_reply<'a>(
        &mut self,
        p: PacketCookieReply,
    ) -> Result<TunnResult<'a>, WireGuardError> {
        tracing::debug!(
            message = "Received cookie_reply",
            local_idx = p.receiver_idx
        );

        self.handshake.receive_cookie_reply(p)?;
        self.timer_tick(TimerName::TimeLastPacketReceived);
        self.timer_tick(TimerName::TimeCookieReceived);

        tracing::debug!("Did set cookie");

        Ok(TunnResult::Done)
    }

    /// Update the index of the currently used session, if needed
    fn set_current_session(&mut self, new_idx: usize) {
        let cur_idx = self.current;
        if cur_idx == new_idx {
            // There is nothing to do, already using this session, this is the common case
            return;
        }
        if self.sessions[cur_idx % N_SESSIONS].is_none()
            || self.timers.session_timers[new_idx % N_SESSIONS]
                >= self.timers.session_timers[cur_idx % N_SESSIONS]
        {
            self.current = new_idx;
            tracing::debug!(message = "New session", session = new_idx);
        }
    }

    /// Decrypts a data packet, and stores the decapsulated packet in dst.
    fn handle_data<'a>(
        &mut self,
        packet: PacketData,
        dst: &'a mut [u8],
    ) -> Result<TunnResult<'a>, WireGuardError> {
        let r_idx = packet.receiver_idx as usize;
        let idx = r_idx % N_SESSIONS;

        // Get the (probably) right session
        let decapsulated_packet = {
            let session = self.sessions[idx].as_mut();
            let session = session.ok_or_else(|| {
                tracing::trace!(message = "No current session available", remote_idx = r_idx);
                WireGuardError::NoCurrentSession
            })?;
            session.receive_packet_data(packet, dst)?
        };

        self.set_current_session(r_idx);

        self.timer_tick(TimerName::TimeLastPacketReceived);

        Ok(self.validate_decapsulated_packet(decapsulated_packet))
    }

    /// Formats a new handshake initiation message and store it in dst. If force_resend is true will send
    /// a new handshake, even if a handshake is already in progress (for example when a handshake times out)
    pub(crate) fn format_handshake_initiation_at<'a>(
        &mut self,
        dst: &'a mut [u8],
        force_resend: bool,
        now: Instant,
    ) -> TunnResult<'a> {
        self.timers.advance(now);
        self.format_handshake_initiation(dst, force_resend, now)
    }

    fn format_handshake_initiation<'a>(
        &mut self,
        dst: &'a mut [u8],
        force_resend: bool,
        now: Instant,
    ) -> TunnResult<'a> {
        if self.handshake.is_in_progress() && !force_resend {
            return TunnResult::Done;
        }

        if self.handshake.is_expired() {
            self.timers.clear();
        }

        let starting_new_handshake = !self.handshake.is_in_progress();

        match self
            .handshake
            .format_handshake_initiation(dst, now, &mut self.rng)
        {
            Ok(packet) => {
                tracing::debug!("Sending handshake_initiation");

                if starting_new_handshake {
                    self.timer_tick(TimerName::TimeLastHandshakeStarted);
                }
                self.timer_tick(TimerName::TimeLastPacketSent);
                TunnResult::WriteToNetwork(packet)
            }
            Err(e) => TunnResult::Err(e),
        }
    }

    /// Check if an IP packet is v4 or v6, truncate to the length indicated by the length field
    /// Returns the truncated packet and the source IP as TunnResult
    fn validate_decapsulated_packet<'a>(&mut self, packet: &'a mut [u8]) -> TunnResult<'a> {
        let be_u16 = |at: usize| {
            packet
                .get(at..)
                .and_then(|b| b.first_chunk::<2>())
                .map(|b| usize::from(u16::from_be_bytes(*b)))
        };
        let (computed_len, src_ip_address) = match packet.first().map(|b| b >> 4) {
            None => return TunnResult::Done, // This is keepalive, and not an error
            Some(4) if packet.len() >= IPV4_MIN_HEADER_SIZE => {
                let src = packet
                    .get(IPV4_SRC_IP_OFF..)
                    .and_then(|b| b.first_chunk::<IPV4_IP_SZ>());
                match (be_u16(IPV4_LEN_OFF), src) {
                    (Some(len), Some(src)) => (len, IpAddr::from(*src)),
                    _ => return TunnResult::Err(WireGuardError::InvalidPacket),
                }
            }
            Some(6) if packet.len() >= IPV6_MIN_HEADER_SIZE => {
                let src = packet
                    .get(IPV6_SRC_IP_OFF..)
                    .and_then(|b| b.first_chunk::<IPV6_IP_SZ>());
                match (be_u16(IPV6_LEN_OFF), src) {
                    (Some(len), Some(src)) => (len + IPV6_MIN_HEADER_SIZE, IpAddr::from(*src)),
                    _ => return TunnResult::Err(WireGuardError::InvalidPacket),
                }
            }
            _ => return TunnResult::Err(WireGuardError::InvalidPacket),
        };

        if computed_len > packet.len() {
            return TunnResult::Err(WireGuardError::InvalidPacket);
        }

        self.timer_tick(TimerName::TimeLastDataPacketReceived);
        self.rx_bytes += computed_len;

        match src_ip_address {
            IpAddr::V4(addr) => TunnResult::WriteToTunnelV4(&mut packet[..computed_len], addr),
            IpAddr::V6(addr) => TunnResult::WriteToTunnelV6(&mut packet[..computed_len], addr),
        }
    }

    /// Get a packet from the queue, and try to encapsulate it
    fn send_queued_packet<'a>(&mut self, dst: &'a mut [u8], now: Instant) -> TunnResult<'a> {
        if let Some(packet) = self.dequeue_packet() {
            match self.encapsulate(&packet, dst, now) {
                TunnResult::Err(_) => {
                    // On error, return packet to the queue
                    self.requeue_packet(packet);
                }
                r => return r,
            }
        }
        TunnResult::Done
    }

    /// Push packet to the back of the queue
    fn queue_packet(&mut self, packet: &[u8]) {
        if self.packet_queue.len() < MAX_QUEUE_DEPTH {
            // Drop if too many are already in queue
            self.packet_queue.push_back(packet.to_vec());
        }
    }

    /// Push packet to the front of the queue
    fn requeue_packet(&mut self, packet: Vec<u8>) {
        if self.packet_queue.len() < MAX_QUEUE_DEPTH {
            // Drop if too many are already in queue
            self.packet_queue.push_front(packet);
        }
    }

    fn dequeue_packet(&mut self) -> Option<Vec<u8>> {
        self.packet_queue.pop_front()
    }

    /// Whether there is a session to send on.
    pub(crate) fn has_session(&self) -> bool {
        self.sessions[self.current % N_SESSIONS].is_some()
    }

    /// Time since the current session's handshake, data bytes sent and
    /// data bytes received.
    pub(crate) fn stats_at(&self, now: Instant) -> (Option<Duration>, usize, usize) {
        (
            self.time_since_last_handshake_at(now),
            self.tx_bytes,
            self.rx_bytes,
        )
    }
}
