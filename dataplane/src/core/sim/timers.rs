//! WireGuard's timers on the virtual clock — rekeying, session expiry,
//! keepalives, handshake retransmission — and runs that replay from a seed.
//! None of these could run before the timers took the caller's `now`.

use super::*;
use crate::wireguard::{
    KEEPALIVE_TIMEOUT, REJECT_AFTER_TIME, REKEY_AFTER_TIME, REKEY_ATTEMPT_TIME, REKEY_TIMEOUT,
};

const INITIATION: u8 = 1;
const RESPONSE: u8 = 2;
const DATA: u8 = 4;

impl Sim {
    /// When `from` sent WireGuard messages of type `kind`, counted from `since`.
    fn sent_at(&self, from: usize, kind: u8, since: Instant) -> Vec<Duration> {
        self.sent
            .iter()
            .filter(|s| s.from == from && message_type(&s.payload) == kind && s.at >= since)
            .map(|s| s.at - since)
            .collect()
    }
}

#[test]
fn the_initiator_rekeys_after_rekey_after_time_while_traffic_flows() {
    let mut sim = Sim::established();
    let start = sim.now;
    for id in 2..132 {
        sim.round_trip(id);
        sim.advance(Duration::from_secs(1));
    }
    // The first handshake, then one more.
    let handshakes = sim.sent_at(A, INITIATION, start);
    assert_eq!(handshakes.len(), 2, "{handshakes:?}");
    assert_eq!(handshakes[0], Duration::ZERO);
    assert!(
        handshakes[1] >= REKEY_AFTER_TIME && handshakes[1] <= REKEY_AFTER_TIME + TICK,
        "{handshakes:?}"
    );
    // The responder does not rekey on its own, and answered both.
    assert!(sim.sent_at(B, INITIATION, start).is_empty());
    assert_eq!(sim.sent_at(B, RESPONSE, start).len(), 2);
}

#[test]
fn a_session_unused_past_reject_after_time_is_refused_both_ways() {
    let mut sim = Sim::established();
    sim.advance(REJECT_AFTER_TIME - Duration::from_secs(10));
    // Two packets from A that the network holds back.
    sim.cut = true;
    let before = sim.sent.len();
    let pings = [sim.ping(A, B, 2), sim.ping(A, B, 3)];
    for ping in &pings {
        sim.send(A, ping);
    }
    let data: Vec<Vec<u8>> = sim.sent[before..]
        .iter()
        .filter(|s| message_type(&s.payload) == DATA)
        .map(|s| s.payload.clone())
        .collect();
    assert_eq!(data.len(), 2);
    let from = sim.nodes[A].underlay;

    // Within REJECT_AFTER_TIME of its handshake, B takes the first.
    sim.nodes[B].node.handle_udp(from, &data[0], sim.now);
    sim.settle();
    assert_eq!(sim.take_tun(B), vec![pings[0].clone()]);

    // Past it, B's session is gone: the second is refused.
    sim.advance(Duration::from_secs(11));
    let refused = sim.stats(B).dropped_invalid_datagram;
    sim.nodes[B].node.handle_udp(from, &data[1], sim.now);
    sim.settle();
    assert!(sim.take_tun(B).is_empty());
    assert_eq!(sim.stats(B).dropped_invalid_datagram, refused + 1);
    assert_eq!(sim.nodes[B].node.peers()[0].last_handshake, None);

    // A does not send on its own expired session: once the network is
    // back, a packet goes after a fresh handshake.
    assert_eq!(sim.nodes[A].node.peers()[0].last_handshake, None);
    sim.cut = false;
    let before = sim.sent.len();
    let ping = sim.ping(A, B, 4);
    sim.send(A, &ping);
    sim.advance(REKEY_TIMEOUT + TICK);
    assert!(sim.take_tun(B).contains(&ping));
    assert_eq!(message_type(&sim.sent[before].payload), INITIATION);
}

#[test]
fn a_peer_that_only_receives_sends_a_keepalive_after_keepalive_timeout() {
    // B's handshake response is the last it sends.
    let mut sim = Sim::established();
    let start = sim.now;
    sim.advance(Duration::from_secs(1));
    let ping = sim.ping(A, B, 2);
    sim.send(A, &ping);
    assert_eq!(sim.take_tun(B), vec![ping]);
    sim.advance(KEEPALIVE_TIMEOUT * 2);

    let keepalives: Vec<(Duration, usize)> = sim
        .sent
        .iter()
        .filter(|s| s.from == B && message_type(&s.payload) == DATA && s.at >= start)
        .map(|s| (s.at - start, s.payload.len()))
        .collect();
    assert_eq!(keepalives.len(), 1, "{keepalives:?}");
    let (at, len) = keepalives[0];
    assert!(
        at >= KEEPALIVE_TIMEOUT && at <= KEEPALIVE_TIMEOUT + TICK,
        "{at:?}"
    );
    // Header and tag, no packet inside.
    assert_eq!(len, 32);
    // The keepalive told A the session works: no handshake to rescue it
    // (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT after its ping), only the first.
    assert_eq!(sim.sent_at(A, INITIATION, start), vec![Duration::ZERO]);
}

#[test]
fn a_lost_initiation_is_retried_every_rekey_timeout_until_rekey_attempt_time() {
    let mut sim = Sim::a_may_ping_b();
    sim.cut = true;
    let start = sim.now;
    let lost = sim.ping(A, B, 1);
    sim.send(A, &lost);
    sim.advance(REKEY_ATTEMPT_TIME + Duration::from_secs(30));

    let tries = sim.sent_at(A, INITIATION, start);
    assert_eq!(tries.first(), Some(&Duration::ZERO));
    for pair in tries.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= REKEY_TIMEOUT && gap <= REKEY_TIMEOUT + TICK,
            "{tries:?}"
        );
    }
    // Every 5 s for 90 s, then A gives up.
    assert_eq!(tries.len(), 18, "{tries:?}");
    assert!(tries.iter().all(|t| *t < REKEY_ATTEMPT_TIME), "{tries:?}");

    // The packet that waited was dropped with the attempt; a new one starts over.
    sim.cut = false;
    let ping = sim.ping(A, B, 2);
    sim.send(A, &ping);
    assert_eq!(sim.take_tun(B), vec![ping]);
}

/// A scripted run: A and B meet, then exchange a ping and its reply every
/// 5 s for 130 s (a rekey on the way). Returns every datagram sent,
/// WireGuard and disco, with its sender and destination.
fn trace(seed: u64) -> Vec<(usize, SocketAddr, Vec<u8>)> {
    let mut sim = Sim::seeded(seed);
    let rule = sim.allow(A, B, &[Protocol::Icmp], &[]);
    sim.set_netmap(A, &[B], vec![]);
    sim.set_netmap(B, &[A], vec![rule]);
    for id in 1..=26 {
        sim.round_trip(id);
        sim.advance(Duration::from_secs(5));
    }
    sim.wire
}

#[test]
fn the_same_seed_replays_the_same_datagrams_and_another_seed_does_not() {
    let first = trace(7);
    assert!(
        first
            .iter()
            .filter(|(_, _, p)| message_type(p) == INITIATION)
            .count()
            >= 2,
        "the script covers a rekey"
    );
    assert!(
        first.iter().any(|(_, _, p)| disco::is_disco(p)),
        "and disco"
    );
    assert_eq!(first, trace(7));
    assert_ne!(first, trace(8));
}
