//! Path probing: the node's side of disco — answering pings, confirming
//! paths with pongs, probing candidates and heartbeating the path in use.

use std::time::Instant;

use rand::{Rng, RngCore};

use weft_proto::NodeId;

use super::disco::{self, Message, Tx};
use super::paths::{HEARTBEAT, PROBE_INTERVAL};
use super::{push, Dst, Event, Node, PathKind, Source, PING_TIMEOUT};

/// Outstanding pings the node tracks at most: a bound on memory whatever
/// the number of peers and candidates.
const MAX_PENDING: usize = 4096;

/// A disco ping awaiting its pong.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    peer: NodeId,
    dst: Dst,
    sent: Instant,
    /// The [`Node::ping`] id it answers, if any.
    user: Option<u64>,
}

impl Node {
    /// A disco datagram from the socket or a relay. Unknown keys are dropped
    /// before any cryptography, and the node opens at most
    /// [`super::DISCO_RATE_LIMIT`] per tick.
    pub(super) fn handle_disco(&mut self, source: Source<'_>, datagram: &[u8], now: Instant) {
        let key = match disco::sender(datagram) {
            Ok(key) => key,
            Err(error) => {
                self.stats.dropped_invalid_datagram += 1;
                tracing::trace!(?source, %error, "dropping disco datagram");
                return;
            }
        };
        if let Source::Relay { key: relayed, .. } = source {
            if relayed != key {
                self.stats.dropped_invalid_datagram += 1;
                tracing::trace!(?source, "dropping relayed disco that names another sender");
                return;
            }
        }
        let Some(&id) = self.by_key.get(&key) else {
            self.stats.dropped_unknown_peer += 1;
            tracing::trace!(?source, "dropping disco from a key not in the netmap");
            return;
        };
        if self.disco_budget == 0 {
            tracing::trace!(?source, "dropping disco: over the rate limit");
            return;
        }
        self.disco_budget -= 1;
        let message = match disco::open(&self.maker.static_private.to_bytes(), &key, datagram) {
            Ok(message) => message,
            Err(error) => {
                self.stats.dropped_invalid_datagram += 1;
                tracing::trace!(peer = %id, ?source, %error, "dropping disco datagram");
                return;
            }
        };
        match message {
            Message::Ping { tx } => self.on_ping(id, source, tx, now),
            Message::Pong { tx, observed } => {
                tracing::trace!(peer = %id, ?observed, "pong");
                self.on_pong(id, source, tx, now);
            }
        }
    }

    /// Pings `peer`'s direct candidates that are due (none more often than
    /// the paths allow).
    pub(super) fn probe_candidates(&mut self, peer: NodeId, now: Instant) {
        let Some(tunnel) = self.peers.get_mut(&peer) else {
            return;
        };
        for target in tunnel.paths.probe_targets(now) {
            self.send_ping(peer, Dst::Udp(target), None, now);
        }
    }

    /// Sends a disco ping to `peer` at `dst`, remembering it for its pong.
    pub(super) fn send_ping(&mut self, peer: NodeId, dst: Dst, user: Option<u64>, now: Instant) {
        if self.pending.len() >= MAX_PENDING {
            tracing::debug!(%peer, "too many pings outstanding; not sending another");
            return;
        }
        let tx: Tx = self.maker.rng.gen();
        self.pending.insert(
            tx,
            Pending {
                peer,
                dst: dst.clone(),
                sent: now,
                user,
            },
        );
        self.send_disco(peer, dst, &Message::Ping { tx });
    }

    /// Probes or heartbeats every peer whose time has come: while a peer is
    /// active, a trusted path gets a ping every [`HEARTBEAT`]; without one,
    /// every candidate and the relay get one every [`PROBE_INTERVAL`].
    pub(super) fn probe_due(&mut self, now: Instant) {
        let ids: Vec<NodeId> = self.peers.keys().copied().collect();
        for id in ids {
            let Some(tunnel) = self.peers.get_mut(&id) else {
                continue;
            };
            let paths = &mut tunnel.paths;
            paths.expire(now);
            if !paths.active(now) {
                paths.next_probe = None;
                continue;
            }
            if paths.next_probe.is_some_and(|at| at > now) {
                continue;
            }
            if let Some(endpoint) = paths.trusted(now) {
                paths.next_probe = Some(now + HEARTBEAT);
                self.send_ping(id, Dst::Udp(endpoint), None, now);
                continue;
            }
            paths.next_probe = Some(now + PROBE_INTERVAL);
            let relay = self
                .discovery
                .relay_for(
                    tunnel.peer.home_relay.as_deref(),
                    tunnel.paths.relay_from.as_deref(),
                )
                .map(str::to_owned);
            self.probe_candidates(id, now);
            if let Some(relay) = relay {
                self.send_ping(id, Dst::Relay(relay), None, now);
            }
        }
    }

    /// Forgets pings that went unanswered, and reports `weft ping` probes
    /// whose time is up.
    pub(super) fn expire_pings(&mut self, now: Instant) {
        self.pending
            .retain(|_, p| now.saturating_duration_since(p.sent) < PING_TIMEOUT);
        while let Some(entry) = self.user_pings.first_entry() {
            let (peer, deadline) = *entry.get();
            if deadline > now {
                break;
            }
            let id = *entry.key();
            entry.remove();
            // Ids increase with time, so the first entry is the oldest.
            self.events.push_back(Event::PingTimeout { id, peer });
        }
    }

    /// A ping: answer it the way it came. From the socket, its source is a
    /// candidate, pinged back unless it is the trusted path already; through
    /// a relay, the peer has no direct path it trusts, so probe its
    /// candidates at once — both sides sending at the same moment is what
    /// opens both NATs — and doubt the path trusted here (the peer may have
    /// moved).
    fn on_ping(&mut self, id: NodeId, source: Source<'_>, tx: Tx, now: Instant) {
        let Some(tunnel) = self.peers.get_mut(&id) else {
            return;
        };
        let paths = &mut tunnel.paths;
        if !paths.fresh_ping(tx) {
            tracing::trace!(peer = %id, ?source, "ignoring a replayed ping");
            return;
        }
        match source {
            Source::Udp(from) => {
                paths.learn(from, now);
                let ping_back = paths.trusted(now) != Some(from) && paths.may_ping(from, now);
                let pong = Message::Pong {
                    tx,
                    observed: Some(from),
                };
                self.send_disco(id, Dst::Udp(from), &pong);
                if ping_back {
                    self.send_ping(id, Dst::Udp(from), None, now);
                }
            }
            Source::Relay { relay, .. } => {
                if paths.relay_from.as_deref() != Some(relay) {
                    paths.relay_from = Some(relay.to_owned());
                }
                let doubted = paths.doubt(now);
                let pong = Message::Pong { tx, observed: None };
                self.send_disco(id, source.reply(), &pong);
                if let Some(endpoint) = doubted {
                    self.send_ping(id, Dst::Udp(endpoint), None, now);
                }
                self.probe_candidates(id, now);
            }
        }
    }

    /// A pong counts only for a ping this node sent to that peer, arriving
    /// the way the ping went; it is used once.
    fn on_pong(&mut self, id: NodeId, source: Source<'_>, tx: Tx, now: Instant) {
        let Some(pending) = self.pending.get(&tx) else {
            tracing::trace!(peer = %id, ?source, "ignoring a pong for no ping of ours");
            return;
        };
        let same_way = match (&pending.dst, source) {
            (Dst::Udp(to), Source::Udp(from)) => *to == from,
            (Dst::Relay(to), Source::Relay { relay, .. }) => to == relay,
            _ => false,
        };
        if pending.peer != id || !same_way {
            tracing::trace!(peer = %id, ?source, "ignoring a pong from elsewhere than its ping went");
            return;
        }
        let Some(pending) = self.pending.remove(&tx) else {
            return;
        };
        let rtt = now.saturating_duration_since(pending.sent);
        if let Dst::Udp(from) = pending.dst {
            if let Some(tunnel) = self.peers.get_mut(&id) {
                let before = tunnel.paths.trusted(now);
                tunnel.paths.confirm(from, rtt, now);
                let after = tunnel.paths.trusted(now);
                if before != after {
                    tracing::debug!(peer = %id, endpoint = ?after, ?rtt, "direct path confirmed");
                }
                // A handshake that went to a guess that did not answer goes
                // again on the path that did.
                if before.is_none() && !tunnel.has_session() {
                    self.handshake_on_new_path(id, now);
                }
            }
        } else if self.peers.get(&id).is_some_and(|p| !p.has_session()) {
            // The relay path works (the peer may have joined the relay after
            // the handshake went out): no need to wait for WireGuard's retry.
            self.handshake_on_new_path(id, now);
        }
        let Some(user) = pending.user else {
            return;
        };
        if self.user_pings.remove(&user).is_none() {
            return;
        }
        let (path, relay, endpoint) = match pending.dst {
            Dst::Udp(endpoint) => (PathKind::Direct, None, Some(endpoint)),
            Dst::Relay(relay) => (PathKind::Relay, Some(relay), None),
        };
        self.events.push_back(Event::Pong {
            id: user,
            peer: id,
            path,
            relay,
            endpoint,
            rtt,
        });
    }

    /// Seals `message` for `peer` and queues it for `dst`.
    fn send_disco(&mut self, peer: NodeId, dst: Dst, message: &Message) {
        let Some(tunnel) = self.peers.get(&peer) else {
            return;
        };
        let to = tunnel.key();
        let from = self.public_key();
        let seed = self.maker.rng.next_u64();
        match disco::seal(
            &self.maker.static_private.to_bytes(),
            &from,
            &to,
            message,
            seed,
        ) {
            Ok(datagram) => push(
                &mut self.transmits,
                &mut self.relay_transmits,
                dst,
                to,
                datagram,
            ),
            Err(error) => tracing::debug!(%peer, %error, "cannot send disco"),
        }
    }
}
