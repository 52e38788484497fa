//! The direct paths to one peer: its candidate endpoints, which of them
//! answered, and the one WireGuard uses.
//!
//! A path is *trusted* for [`TRUST`] after a disco pong from it or an
//! authenticated WireGuard packet from it; without a trusted path the node
//! sends through a relay (or, with no relay, to its best guess) and probes.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::disco::Tx;

/// How long a direct path stays trusted after the last proof that it works.
pub(crate) const TRUST: Duration = Duration::from_secs(5);
/// How often every candidate is probed while no direct path is trusted.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How often the trusted path is pinged while the peer is active.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(2);
/// A peer without traffic for this long is idle and not probed.
pub(crate) const ACTIVE: Duration = Duration::from_secs(60);
/// How long a doubted path stays trusted without a fresh proof.
const DOUBT: Duration = Duration::from_secs(1);
/// The least time between two pings to one candidate, whatever asks for them,
/// so pings answered with pings cannot become a storm.
const MIN_PING_GAP: Duration = Duration::from_millis(250);
/// Candidates learned from traffic (not advertised) that are kept at most.
const MAX_LEARNED: usize = 8;
/// A learned candidate that has not proven itself for this long is dropped.
const LEARNED_EXPIRY: Duration = Duration::from_secs(60);
/// Ping transactions remembered to refuse replays.
const SEEN_PINGS: usize = 64;

/// The direct-path state of one peer.
#[derive(Debug, Clone, Default)]
pub(crate) struct Paths {
    /// Where direct WireGuard goes: the trusted path, or the best guess
    /// (first advertised endpoint, or where the peer last spoke from).
    pub(crate) endpoint: Option<SocketAddr>,
    /// Until when `endpoint` is known to work.
    pub(crate) trusted_until: Option<Instant>,
    /// Round-trip time of `endpoint`, when a pong measured it.
    rtt: Option<Duration>,
    /// The peer signalled it has no direct path to this node: `endpoint`
    /// has to prove itself again, and any other confirmed path replaces it.
    doubted: bool,
    /// The last packet to or from the peer.
    pub(crate) last_active: Option<Instant>,
    /// When to probe or heartbeat next; `None` while idle.
    pub(crate) next_probe: Option<Instant>,
    /// The relay the peer last reached this node through.
    pub(crate) relay_from: Option<String>,
    candidates: BTreeMap<SocketAddr, Candidate>,
    seen_pings: VecDeque<Tx>,
}

#[derive(Debug, Clone, Default)]
struct Candidate {
    advertised: bool,
    /// When the candidate was last seen in traffic (learned ones expire).
    learned: Option<Instant>,
    last_ping: Option<Instant>,
    rtt: Option<Duration>,
    trusted_until: Option<Instant>,
}

impl Paths {
    /// Paths to a peer advertising `advertised`: the first is the best guess.
    pub(crate) fn new(advertised: &[SocketAddr]) -> Self {
        let mut paths = Self::default();
        for address in advertised {
            paths.candidates.entry(*address).or_default().advertised = true;
        }
        paths.endpoint = advertised.first().copied();
        paths
    }

    /// The peer advertises `advertised` now. An untrusted endpoint falls back
    /// to the first of them; a trusted one stays.
    pub(crate) fn set_advertised(&mut self, advertised: &[SocketAddr], now: Instant) {
        for candidate in self.candidates.values_mut() {
            candidate.advertised = false;
        }
        for address in advertised {
            self.candidates.entry(*address).or_default().advertised = true;
        }
        self.candidates
            .retain(|_, c| c.advertised || c.learned.is_some());
        if self.trusted(now).is_none() {
            self.endpoint = advertised.first().copied().or(self.endpoint);
        }
    }

    /// The direct endpoint, while it is trusted.
    #[inline]
    pub(crate) fn trusted(&self, now: Instant) -> Option<SocketAddr> {
        match self.trusted_until {
            Some(until) if now < until => self.endpoint,
            _ => None,
        }
    }

    /// Records traffic with the peer. Returns whether probing has to start
    /// (the peer was idle).
    #[inline]
    pub(crate) fn touch(&mut self, now: Instant) -> bool {
        self.last_active = Some(now);
        if self.next_probe.is_none() {
            self.next_probe = Some(now);
            return true;
        }
        false
    }

    /// Whether there was traffic with the peer within [`ACTIVE`].
    pub(crate) fn active(&self, now: Instant) -> bool {
        self.last_active
            .is_some_and(|at| now.saturating_duration_since(at) < ACTIVE)
    }

    /// An authenticated WireGuard packet came from `from`: that is where the
    /// peer is, and the path works (WireGuard roaming).
    #[inline]
    pub(crate) fn heard_from(&mut self, from: SocketAddr, now: Instant) {
        if self.endpoint != Some(from) {
            self.endpoint = Some(from);
            self.rtt = None;
            self.learn(from, now);
        }
        self.doubted = false;
        self.trusted_until = Some(now + TRUST);
    }

    /// The peer probes through a relay, so it does not trust a direct path
    /// to this node (it moved, or the path broke one way): the trusted
    /// endpoint keeps at most [`DOUBT`] unless proven again. Returns the
    /// endpoint to ping for that proof.
    pub(crate) fn doubt(&mut self, now: Instant) -> Option<SocketAddr> {
        let endpoint = self.trusted(now)?;
        self.doubted = true;
        self.trusted_until = self.trusted_until.map(|t| t.min(now + DOUBT));
        if let Some(candidate) = self.candidates.get_mut(&endpoint) {
            candidate.trusted_until = self.trusted_until;
        }
        Some(endpoint)
    }

    /// The peer pinged from `from`: a candidate even if it never advertised it.
    pub(crate) fn learn(&mut self, from: SocketAddr, now: Instant) {
        let learned = self
            .candidates
            .values()
            .filter(|c| c.learned.is_some())
            .count();
        let known = self.candidates.contains_key(&from);
        if !known && learned >= MAX_LEARNED {
            return;
        }
        self.candidates.entry(from).or_default().learned = Some(now);
    }

    /// A pong from `from` after `rtt`: the path works. Switches to it when no
    /// path is trusted, or when it is clearly faster than the current one.
    pub(crate) fn confirm(&mut self, from: SocketAddr, rtt: Duration, now: Instant) {
        let candidate = self.candidates.entry(from).or_default();
        if !candidate.advertised {
            candidate.learned = Some(now);
        }
        candidate.rtt = Some(rtt);
        candidate.trusted_until = Some(now + TRUST);
        match self.trusted(now) {
            Some(current) if current == from => {}
            Some(_)
                if !self.doubted
                    && !self.rtt.is_some_and(|current| clearly_better(rtt, current)) =>
            {
                return;
            }
            _ => self.endpoint = Some(from),
        }
        self.rtt = Some(rtt);
        self.doubted = false;
        self.trusted_until = Some(now + TRUST);
    }

    /// When the trusted path lapses, another candidate confirmed within
    /// [`TRUST`] takes over (the fastest); learned candidates that never
    /// proved themselves are forgotten after a while.
    pub(crate) fn expire(&mut self, now: Instant) {
        self.candidates.retain(|_, c| {
            c.advertised
                || c.trusted_until.is_some_and(|t| now < t)
                || c.learned
                    .is_some_and(|at| now.saturating_duration_since(at) < LEARNED_EXPIRY)
        });
        if self.trusted(now).is_some() {
            return;
        }
        let fallback = self
            .candidates
            .iter()
            .filter(|(_, c)| c.trusted_until.is_some_and(|t| now < t))
            .min_by_key(|(_, c)| c.rtt.unwrap_or(Duration::MAX))
            .map(|(address, c)| (*address, c.rtt, c.trusted_until));
        if let Some((address, rtt, until)) = fallback {
            self.endpoint = Some(address);
            self.rtt = rtt;
            self.doubted = false;
            self.trusted_until = until;
        }
    }

    /// Stops trusting every direct path (this node moved): they have to prove
    /// themselves again, and may be probed at once.
    pub(crate) fn distrust(&mut self) {
        self.trusted_until = None;
        self.rtt = None;
        self.doubted = false;
        for candidate in self.candidates.values_mut() {
            candidate.trusted_until = None;
            candidate.last_ping = None;
        }
    }

    /// The candidates to ping now, at most one ping per candidate per
    /// [`MIN_PING_GAP`]; marks them pinged.
    pub(crate) fn probe_targets(&mut self, now: Instant) -> Vec<SocketAddr> {
        self.candidates
            .iter_mut()
            .filter(|(_, c)| {
                c.last_ping
                    .is_none_or(|at| now.saturating_duration_since(at) >= MIN_PING_GAP)
            })
            .map(|(address, c)| {
                c.last_ping = Some(now);
                *address
            })
            .collect()
    }

    /// Whether `to` may be pinged now (see [`MIN_PING_GAP`]); marks it pinged if so.
    pub(crate) fn may_ping(&mut self, to: SocketAddr, now: Instant) -> bool {
        let Some(candidate) = self.candidates.get_mut(&to) else {
            return false;
        };
        if candidate
            .last_ping
            .is_some_and(|at| now.saturating_duration_since(at) < MIN_PING_GAP)
        {
            return false;
        }
        candidate.last_ping = Some(now);
        true
    }

    /// Whether the ping `tx` is new (not a replay); remembers it.
    pub(crate) fn fresh_ping(&mut self, tx: Tx) -> bool {
        if self.seen_pings.contains(&tx) {
            return false;
        }
        if self.seen_pings.len() >= SEEN_PINGS {
            self.seen_pings.pop_front();
        }
        self.seen_pings.push_back(tx);
        true
    }
}

/// At least 20 % and 1 ms faster: small differences do not flip paths.
fn clearly_better(rtt: Duration, current: Duration) -> bool {
    rtt * 5 <= current * 4 && current.saturating_sub(rtt) >= Duration::from_millis(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    #[test]
    fn the_first_advertised_endpoint_is_the_guess_until_one_is_confirmed() {
        let now = crate::test_clock();
        let mut paths = Paths::new(&[addr(1), addr(2)]);
        assert_eq!(paths.endpoint, Some(addr(1)));
        assert_eq!(paths.trusted(now), None);
        paths.confirm(addr(2), Duration::from_millis(10), now);
        assert_eq!(paths.trusted(now), Some(addr(2)));
        assert_eq!(paths.trusted(now + TRUST), None);
    }

    #[test]
    fn a_faster_path_wins_only_when_clearly_faster() {
        let now = crate::test_clock();
        let mut paths = Paths::new(&[addr(1), addr(2), addr(3)]);
        paths.confirm(addr(1), Duration::from_millis(10), now);
        paths.confirm(addr(2), Duration::from_millis(9), now);
        assert_eq!(paths.trusted(now), Some(addr(1)));
        paths.confirm(addr(3), Duration::from_millis(5), now);
        assert_eq!(paths.trusted(now), Some(addr(3)));
    }

    #[test]
    fn a_lapsed_path_falls_back_to_another_confirmed_one() {
        let now = crate::test_clock();
        let mut paths = Paths::new(&[addr(1), addr(2)]);
        paths.confirm(addr(1), Duration::from_millis(1), now);
        paths.confirm(
            addr(2),
            Duration::from_millis(3),
            now + Duration::from_secs(3),
        );
        let later = now + TRUST;
        paths.expire(later);
        assert_eq!(paths.trusted(later), Some(addr(2)));
        paths.distrust();
        assert_eq!(paths.trusted(later), None);
    }

    #[test]
    fn a_doubted_path_lapses_soon_and_yields_to_any_confirmed_one() {
        let now = crate::test_clock();
        let mut paths = Paths::new(&[addr(1), addr(2)]);
        paths.confirm(addr(1), Duration::from_millis(1), now);
        assert_eq!(paths.doubt(now), Some(addr(1)));
        assert_eq!(paths.trusted(now + DOUBT), None);
        paths.confirm(addr(2), Duration::from_millis(9), now);
        assert_eq!(paths.trusted(now), Some(addr(2)), "slower, but it answered");
        paths.confirm(addr(1), Duration::from_millis(1), now);
        assert_eq!(
            paths.trusted(now),
            Some(addr(1)),
            "undoubted, faster wins again"
        );
        assert_eq!(Paths::new(&[addr(1)]).doubt(now), None);
    }

    #[test]
    fn pings_to_one_candidate_are_spaced() {
        let now = crate::test_clock();
        let mut paths = Paths::new(&[addr(1)]);
        assert_eq!(paths.probe_targets(now), vec![addr(1)]);
        assert!(!paths.may_ping(addr(1), now));
        assert!(paths.may_ping(addr(1), now + MIN_PING_GAP));
        assert!(!paths.may_ping(addr(9), now), "only candidates are pinged");
    }

    #[test]
    fn replayed_pings_are_refused() {
        let mut paths = Paths::default();
        assert!(paths.fresh_ping([1; 12]));
        assert!(!paths.fresh_ping([1; 12]));
    }

    #[test]
    fn learned_candidates_are_bounded_and_expire() {
        let now = crate::test_clock();
        let mut paths = Paths::new(&[addr(1)]);
        for port in 100..120 {
            paths.learn(addr(port), now);
        }
        assert_eq!(paths.candidates.len(), 1 + MAX_LEARNED);
        paths.expire(now + LEARNED_EXPIRY);
        assert_eq!(paths.candidates.len(), 1);
    }
}
