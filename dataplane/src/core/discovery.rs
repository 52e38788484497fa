//! Where this node can be reached: the relays it is connected to and its
//! home relay, its local addresses, and the reflexive endpoints STUN finds
//! for the WireGuard socket.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use weft_proto::stun;
use weft_proto::{Advertisement, RelayInfo};

use super::{NatMapping, Netcheck, Reflection, RelayLatency, Transmit};

/// How often the STUN servers are asked again.
pub(crate) const STUN_INTERVAL: Duration = Duration::from_secs(20);
/// Unanswered STUN requests are sent again this often, [`STUN_RETRIES`] times
/// per round, so one lost datagram does not cost a whole interval.
const STUN_RETRY: Duration = Duration::from_secs(2);
const STUN_RETRIES: u8 = 2;
/// Another relay becomes home only when at least this much faster in
/// proportion (here 20 %) …
const HOME_SWITCH_RATIO: (u32, u32) = (4, 5);
/// … and by at least this much.
const HOME_SWITCH_MARGIN: Duration = Duration::from_millis(5);

/// Relays, home relay, local and reflexive endpoints.
#[derive(Debug)]
pub(crate) struct Discovery {
    /// In the coordinator's order.
    relays: Vec<Relay>,
    home: Option<String>,
    local: Vec<SocketAddr>,
    /// Reflexive endpoint by the relay whose STUN server reported it.
    reflexive: BTreeMap<String, SocketAddr>,
    /// Outstanding STUN transactions and the relay asked.
    pending: HashMap<stun::TransactionId, String>,
    answered_this_round: bool,
    answered_last_round: bool,
    next_stun: Option<Instant>,
    next_retry: Option<Instant>,
    retries_left: u8,
    /// STUN transaction ids come from here, seeded by the node.
    rng: StdRng,
}

#[derive(Debug)]
struct Relay {
    info: RelayInfo,
    /// Set while the shell has an admitted session to it.
    rtt: Option<Duration>,
}

impl Discovery {
    /// No relays and no endpoints yet; STUN transaction ids are drawn from
    /// a generator seeded with `rng_seed`.
    pub(crate) fn new(rng_seed: u64) -> Self {
        Self {
            relays: Vec::new(),
            home: None,
            local: Vec::new(),
            reflexive: BTreeMap::new(),
            pending: HashMap::new(),
            answered_this_round: false,
            answered_last_round: false,
            next_stun: None,
            next_retry: None,
            retries_left: 0,
            rng: StdRng::seed_from_u64(rng_seed),
        }
    }

    /// The coordinator's relay list. Sessions to relays still listed keep
    /// their state; STUN runs again at once when the list changed.
    pub(crate) fn set_relays(
        &mut self,
        relays: &[RelayInfo],
        now: Instant,
        out: &mut VecDeque<Transmit>,
    ) {
        let before: Vec<&RelayInfo> = self.relays.iter().map(|r| &r.info).collect();
        if before.iter().copied().eq(relays.iter()) {
            return;
        }
        let mut old: HashMap<String, Relay> = self
            .relays
            .drain(..)
            .map(|r| (r.info.name.clone(), r))
            .collect();
        self.relays = relays
            .iter()
            .map(|info| Relay {
                rtt: old.remove(&info.name).and_then(|r| r.rtt),
                info: info.clone(),
            })
            .collect();
        self.reflexive
            .retain(|name, _| relays.iter().any(|r| &r.name == name));
        self.choose_home();
        self.stun(now, out);
    }

    /// Whether any relay is listed (so timers must run for STUN).
    pub(crate) fn has_relays(&self) -> bool {
        !self.relays.is_empty()
    }

    /// The shell's session to `name` is up with round-trip time `rtt`.
    /// Returns whether it was down before.
    pub(crate) fn relay_connected(&mut self, name: &str, rtt: Duration) -> bool {
        let Some(relay) = self.relays.iter_mut().find(|r| r.info.name == name) else {
            tracing::debug!(
                relay = name,
                "ignoring a session to a relay the coordinator does not list"
            );
            return false;
        };
        let was_down = relay.rtt.replace(rtt).is_none();
        self.choose_home();
        was_down
    }

    /// The shell's session to `name` ended.
    pub(crate) fn relay_disconnected(&mut self, name: &str) {
        if let Some(relay) = self.relays.iter_mut().find(|r| r.info.name == name) {
            relay.rtt = None;
        }
        self.choose_home();
    }

    /// Whether a session to `name` is up.
    pub(crate) fn connected(&self, name: &str) -> bool {
        self.relays
            .iter()
            .any(|r| r.info.name == name && r.rtt.is_some())
    }

    /// The relay this node is reachable through.
    pub(crate) fn home(&self) -> Option<&str> {
        self.home.as_deref()
    }

    /// The relay to reach a peer through: its home relay, else the one it
    /// last came through, else this node's home — the first that is connected.
    pub(crate) fn relay_for<'a>(
        &'a self,
        peer_home: Option<&'a str>,
        came_through: Option<&'a str>,
    ) -> Option<&'a str> {
        peer_home
            .filter(|name| self.connected(name))
            .or(came_through.filter(|name| self.connected(name)))
            .or(self.home())
    }

    /// The host's addresses, preferred first (peers try the first one before
    /// any is confirmed). Returns whether the set changed from a previous,
    /// non-empty one: the node moved, and what STUN found no longer holds.
    /// A new order of the same addresses is not a move and is ignored.
    pub(crate) fn set_local(&mut self, local: Vec<SocketAddr>) -> bool {
        let same = local.len() == self.local.len() && local.iter().all(|a| self.local.contains(a));
        if same {
            return false;
        }
        let moved = !self.local.is_empty();
        self.local = local;
        if moved {
            self.reflexive.clear();
            self.answered_this_round = false;
            self.answered_last_round = false;
        }
        moved
    }

    /// Starts a STUN round: a Binding request to every relay's STUN server.
    pub(crate) fn stun(&mut self, now: Instant, out: &mut VecDeque<Transmit>) {
        self.pending.clear();
        self.answered_last_round = self.answered_this_round;
        self.answered_this_round = false;
        for relay in &self.relays {
            let Some(server) = relay.info.stun_address else {
                continue;
            };
            let tx: stun::TransactionId = self.rng.gen();
            self.pending.insert(tx, relay.info.name.clone());
            out.push_back(Transmit {
                dst: server,
                payload: stun::request(&tx),
            });
        }
        self.next_stun = self.has_relays().then(|| now + STUN_INTERVAL);
        self.next_retry = Some(now + STUN_RETRY);
        self.retries_left = STUN_RETRIES;
    }

    /// Runs the STUN round when it is due, and repeats unanswered requests.
    pub(crate) fn handle_timeout(&mut self, now: Instant, out: &mut VecDeque<Transmit>) {
        if self.next_stun.is_some_and(|at| at <= now) {
            self.stun(now, out);
            return;
        }
        if self.retries_left == 0 || self.next_retry.is_none_or(|at| at > now) {
            return;
        }
        self.retries_left -= 1;
        self.next_retry = Some(now + STUN_RETRY);
        for (tx, name) in &self.pending {
            let server = self
                .relays
                .iter()
                .find(|r| &r.info.name == name)
                .and_then(|r| r.info.stun_address);
            if let Some(server) = server {
                out.push_back(Transmit {
                    dst: server,
                    payload: stun::request(tx),
                });
            }
        }
    }

    /// A datagram that looks like STUN arrived on the WireGuard socket.
    /// Returns whether it answered an outstanding request.
    pub(crate) fn handle_stun(&mut self, from: SocketAddr, datagram: &[u8]) -> bool {
        let Some(tx) = datagram
            .get(8..20)
            .and_then(|t| stun::TransactionId::try_from(t).ok())
        else {
            return false;
        };
        let Some(relay) = self.pending.get(&tx) else {
            return false;
        };
        let server = self
            .relays
            .iter()
            .find(|r| &r.info.name == relay)
            .and_then(|r| r.info.stun_address);
        if server != Some(from) {
            return false;
        }
        let Some(reflexive) = stun::parse_response(datagram, &tx) else {
            return false;
        };
        let Some(relay) = self.pending.remove(&tx) else {
            return false;
        };
        tracing::debug!(%relay, %reflexive, "STUN: reflexive endpoint");
        self.answered_this_round = true;
        self.reflexive.insert(relay, reflexive);
        true
    }

    /// What to tell the coordinator.
    pub(crate) fn advertisement(&self) -> Advertisement {
        let mut endpoints = self.local.clone();
        for endpoint in self.reflexive.values() {
            if !endpoints.contains(endpoint) {
                endpoints.push(*endpoint);
            }
        }
        Advertisement {
            endpoints,
            home_relay: self.home.clone(),
        }
    }

    /// What discovery found, for `weft netcheck`.
    pub(crate) fn netcheck(&self) -> Netcheck {
        let reflexive: Vec<Reflection> = self
            .reflexive
            .iter()
            .map(|(relay, endpoint)| Reflection {
                relay: relay.clone(),
                endpoint: *endpoint,
            })
            .collect();
        let mapping = (reflexive.len() >= 2).then(|| {
            if reflexive
                .iter()
                .all(|r| r.endpoint == reflexive[0].endpoint)
            {
                NatMapping::EndpointIndependent
            } else {
                NatMapping::EndpointDependent
            }
        });
        let home = self.home.as_deref();
        let mut relays: Vec<RelayLatency> = self
            .relays
            .iter()
            .map(|r| RelayLatency {
                name: r.info.name.clone(),
                rtt: r.rtt,
                home: home == Some(r.info.name.as_str()),
            })
            .collect();
        relays.sort_by_key(|r| !r.home);
        Netcheck {
            reflexive,
            mapping,
            udp: self.answered_this_round || self.answered_last_round,
            relays,
            local: self.local.clone(),
        }
    }

    /// Keeps the home relay unless it is down or another connected relay is
    /// clearly faster (hysteresis, so RTT noise does not flap it).
    fn choose_home(&mut self) {
        let rtt_of = |name: &str| {
            self.relays
                .iter()
                .find(|r| r.info.name == name)
                .and_then(|r| r.rtt)
        };
        let fastest = self
            .relays
            .iter()
            .filter_map(|r| r.rtt.map(|rtt| (rtt, &r.info.name)))
            .min_by_key(|(rtt, _)| *rtt);
        let current = self.home.as_deref().and_then(rtt_of);
        let next = match (current, fastest) {
            (_, None) => None,
            (None, Some((_, name))) => Some(name.clone()),
            (Some(home_rtt), Some((rtt, name))) => {
                let (num, den) = HOME_SWITCH_RATIO;
                let faster = rtt * den <= home_rtt * num
                    && home_rtt.saturating_sub(rtt) >= HOME_SWITCH_MARGIN;
                if faster {
                    Some(name.clone())
                } else {
                    self.home.clone()
                }
            }
        };
        if next != self.home {
            tracing::info!(from = ?self.home, to = ?next, "home relay changed");
            self.home = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use weft_proto::PrivateKey;

    use super::*;

    fn relay(name: &str, n: u8) -> RelayInfo {
        RelayInfo {
            name: name.into(),
            address: SocketAddr::from(([198, 51, 100, n], 7444)),
            key: PrivateKey::generate().public_key(),
            tcp_address: None,
            stun_address: Some(SocketAddr::from(([198, 51, 100, n], 3478))),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_home_relay_moves_only_when_clearly_faster_or_down() {
        let now = crate::test_clock();
        let mut out = VecDeque::new();
        let mut d = Discovery::new(1);
        d.set_relays(&[relay("fra1", 1), relay("ams1", 2)], now, &mut out);
        assert_eq!(out.len(), 2, "one STUN request per relay");
        assert_eq!(d.home(), None);
        d.relay_connected("fra1", ms(30));
        assert_eq!(d.home(), Some("fra1"));
        d.relay_connected("ams1", ms(26));
        assert_eq!(d.home(), Some("fra1"), "13 % faster is not enough");
        d.relay_connected("ams1", ms(20));
        assert_eq!(d.home(), Some("ams1"));
        d.relay_connected("ams1", ms(6));
        d.relay_connected("fra1", ms(3));
        assert_eq!(d.home(), Some("ams1"), "3 ms faster is not enough");
        d.relay_disconnected("ams1");
        assert_eq!(d.home(), Some("fra1"));
        d.relay_disconnected("fra1");
        assert_eq!(d.home(), None);
        d.relay_connected("lon1", ms(1));
        assert_eq!(d.home(), None, "unlisted relays are ignored");
    }

    #[test]
    fn unanswered_stun_requests_are_repeated_a_few_times() {
        let now = crate::test_clock();
        let mut out = VecDeque::new();
        let mut d = Discovery::new(1);
        d.set_relays(&[relay("fra1", 1)], now, &mut out);
        let first = out.pop_front().unwrap();
        let mut at = now;
        for _ in 0..STUN_RETRIES {
            at += STUN_RETRY;
            d.handle_timeout(at, &mut out);
            assert_eq!(out.pop_front(), Some(first.clone()));
        }
        d.handle_timeout(at + STUN_RETRY, &mut out);
        assert!(out.is_empty());
        d.handle_timeout(now + STUN_INTERVAL, &mut out);
        assert_eq!(out.len(), 1, "the next round");
        assert_ne!(out[0], first, "with a new transaction");
    }

    #[test]
    fn stun_answers_make_reflexive_endpoints_and_the_mapping() {
        let now = crate::test_clock();
        let mut out = VecDeque::new();
        let mut d = Discovery::new(1);
        d.set_local(vec![SocketAddr::from(([198, 18, 1, 2], 41641))]);
        d.set_relays(&[relay("fra1", 1), relay("ams1", 2)], now, &mut out);
        let mapped = SocketAddr::from(([203, 0, 113, 1], 41641));
        let answer = |d: &mut Discovery, t: &Transmit, seen: SocketAddr| {
            let response = weft_proto::stun::respond(&t.payload, seen).unwrap();
            d.handle_stun(t.dst, &response)
        };
        assert!(answer(&mut d, &out[0], mapped));
        assert!(!answer(&mut d, &out[0], mapped), "answered once only");
        assert_eq!(d.netcheck().mapping, None);
        assert!(d.netcheck().udp);
        let other = SocketAddr::from(([203, 0, 113, 1], 60000));
        assert!(answer(&mut d, &out[1], other));
        let netcheck = d.netcheck();
        assert_eq!(netcheck.mapping, Some(NatMapping::EndpointDependent));
        assert_eq!(
            d.advertisement().endpoints,
            vec![SocketAddr::from(([198, 18, 1, 2], 41641)), other, mapped]
        );
        let before = out.len();
        d.handle_timeout(now + STUN_RETRY, &mut out);
        assert_eq!(out.len(), before, "answered requests are not repeated");
        let forged = weft_proto::stun::respond(&out[0].payload, mapped).unwrap();
        let mut d2 = Discovery::new(1);
        assert!(
            !d2.handle_stun(out[0].dst, &forged),
            "no request outstanding"
        );
        assert!(d.set_local(vec![SocketAddr::from(([198, 18, 2, 2], 41641))]));
        assert!(
            d.netcheck().reflexive.is_empty(),
            "moving forgets STUN results"
        );
    }
}
