//! The relay's forwarding logic, without IO.
//!
//! [`Core`] holds the admitted node keys (from the coordinator's feed), the
//! connected clients by key and a token bucket per client. Drive it with:
//!
//! - [`Core::apply_admissions`] for every `RelayAdmissions` message;
//! - [`Core::connect`] once a client's handshake proved its key, and
//!   [`Core::disconnect`] when its transport ends;
//! - [`Core::handle_message`] for every message a client sends;
//!
//! then take [`Core::poll_disconnect`] until `None` and close those
//! sessions with the given code. The shell never decides whom to admit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use weft_proto::relay::{
    self, Message, CLOSE_RELAY_NOT_ADMITTED, CLOSE_RELAY_REMOVED, CLOSE_RELAY_REPLACED,
};
use weft_proto::PublicKey;

/// Identifies one client session (one transport connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// How much one client may send through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained payload bytes per second.
    pub bytes_per_sec: u64,
    /// Bytes a client may send at once after being idle.
    pub burst: u64,
}

impl Default for RateLimit {
    /// 10 MiB/s sustained with a 1 MiB burst per client.
    fn default() -> Self {
        Self {
            bytes_per_sec: 10 << 20,
            burst: 1 << 20,
        }
    }
}

/// What happened to the messages clients sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets forwarded.
    pub forwarded: u64,
    /// Payload bytes forwarded.
    pub forwarded_bytes: u64,
    /// Sessions that exceeded their rate at least once.
    pub rate_limited_sessions: u64,
    /// Dropped: the destination key is not admitted.
    pub dropped_not_admitted: u64,
    /// Dropped: the destination is admitted but not connected here.
    pub dropped_no_destination: u64,
    /// Dropped: the sender exceeded its rate.
    pub dropped_rate_limited: u64,
    /// Dropped: not a valid `Send` message.
    pub dropped_malformed: u64,
}

/// A packet to pass on: send `message` (an encoded `Recv`) to session `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The destination's session.
    pub to: ConnId,
    /// The encoded [`Message::Recv`].
    pub message: Vec<u8>,
}

/// A session the shell must end, with the QUIC close code (or final
/// `Closed` frame) that tells the client why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnect {
    /// The session.
    pub conn: ConnId,
    /// The client's key.
    pub key: PublicKey,
    /// A `CLOSE_RELAY_*` code.
    pub code: u32,
}

/// Why a client was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("node key {} is not admitted by the coordinator", .0.short())]
pub struct NotAdmitted(pub PublicKey);

impl NotAdmitted {
    /// The close code to send.
    pub fn code(&self) -> u32 {
        CLOSE_RELAY_NOT_ADMITTED
    }
}

/// The sans-IO relay. See the module documentation for how to drive it.
#[derive(Debug)]
pub struct Core {
    admitted: HashSet<PublicKey>,
    clients: HashMap<PublicKey, Client>,
    rate: RateLimit,
    counters: Counters,
    disconnects: VecDeque<Disconnect>,
}

#[derive(Debug)]
struct Client {
    conn: ConnId,
    bucket: Bucket,
    /// Whether the session was ever over its rate, so it counts once.
    throttled: bool,
}

impl Core {
    /// A relay that admits nobody until the first full admission set arrives.
    pub fn new(rate: RateLimit) -> Self {
        Self {
            admitted: HashSet::new(),
            clients: HashMap::new(),
            rate,
            counters: Counters::default(),
            disconnects: VecDeque::new(),
        }
    }

    /// Applies a `RelayAdmissions` message. Connected clients whose key is no
    /// longer admitted are queued for [`Core::poll_disconnect`].
    pub fn apply_admissions(&mut self, full: bool, add: &[PublicKey], remove: &[PublicKey]) {
        if full {
            self.admitted.clear();
        }
        for key in remove {
            self.admitted.remove(key);
        }
        self.admitted.extend(add.iter().copied());
        let gone: Vec<PublicKey> = self
            .clients
            .keys()
            .filter(|key| !self.admitted.contains(key))
            .copied()
            .collect();
        for key in gone {
            if let Some(client) = self.clients.remove(&key) {
                self.disconnects.push_back(Disconnect {
                    conn: client.conn,
                    key,
                    code: CLOSE_RELAY_REMOVED,
                });
            }
        }
    }

    /// Whether `key` is admitted now.
    pub fn is_admitted(&self, key: &PublicKey) -> bool {
        self.admitted.contains(key)
    }

    /// How many keys are admitted.
    pub fn admitted_len(&self) -> usize {
        self.admitted.len()
    }

    /// Lets a client that proved `key` in. A previous session with the same
    /// key is queued for disconnection: the newest session wins, as after
    /// a client's network changed.
    pub fn connect(
        &mut self,
        key: PublicKey,
        conn: ConnId,
        now: Instant,
    ) -> Result<(), NotAdmitted> {
        if !self.admitted.contains(&key) {
            return Err(NotAdmitted(key));
        }
        let client = Client {
            conn,
            bucket: Bucket::full(self.rate, now),
            throttled: false,
        };
        if let Some(old) = self.clients.insert(key, client) {
            self.disconnects.push_back(Disconnect {
                conn: old.conn,
                key,
                code: CLOSE_RELAY_REPLACED,
            });
        }
        Ok(())
    }

    /// Forgets a session that ended. A later session of the same key stays.
    pub fn disconnect(&mut self, key: &PublicKey, conn: ConnId) {
        if self.clients.get(key).is_some_and(|c| c.conn == conn) {
            self.clients.remove(key);
        }
    }

    /// Handles a message from session `conn`, authenticated as `from`. A
    /// valid `Send` to a connected, admitted destination becomes a
    /// [`Forward`]; everything else is dropped and counted.
    pub fn handle_message(
        &mut self,
        from: PublicKey,
        conn: ConnId,
        bytes: &[u8],
        now: Instant,
    ) -> Option<Forward> {
        let Some(sender) = self.clients.get_mut(&from).filter(|c| c.conn == conn) else {
            // A session already replaced or removed: its packets go nowhere.
            self.counters.dropped_not_admitted += 1;
            return None;
        };
        let Ok(Message::Send { to, payload }) = relay::decode(bytes) else {
            self.counters.dropped_malformed += 1;
            return None;
        };
        if !sender.bucket.take(payload.len() as u64, self.rate, now) {
            self.counters.dropped_rate_limited += 1;
            if !std::mem::replace(&mut sender.throttled, true) {
                self.counters.rate_limited_sessions += 1;
            }
            return None;
        }
        let size = payload.len() as u64;
        if !self.admitted.contains(&to) {
            self.counters.dropped_not_admitted += 1;
            return None;
        }
        let Some(destination) = self.clients.get(&to) else {
            self.counters.dropped_no_destination += 1;
            return None;
        };
        let Ok(message) = (Message::Recv { from, payload }).to_vec() else {
            self.counters.dropped_malformed += 1;
            return None;
        };
        self.counters.forwarded += 1;
        self.counters.forwarded_bytes += size;
        Some(Forward {
            to: destination.conn,
            message,
        })
    }

    /// The next session to end, if any.
    pub fn poll_disconnect(&mut self) -> Option<Disconnect> {
        self.disconnects.pop_front()
    }

    /// The counters so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// How many clients are connected.
    pub fn connected(&self) -> usize {
        self.clients.len()
    }
}

/// A token bucket of payload bytes.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u64,
    at: Instant,
}

impl Bucket {
    fn full(rate: RateLimit, now: Instant) -> Self {
        Self {
            tokens: rate.burst,
            at: now,
        }
    }

    fn take(&mut self, bytes: u64, rate: RateLimit, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at);
        let refill = refill(elapsed, rate.bytes_per_sec);
        if refill > 0 {
            self.tokens = self.tokens.saturating_add(refill).min(rate.burst);
            self.at = now;
        }
        if self.tokens >= bytes {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }
}

fn refill(elapsed: Duration, bytes_per_sec: u64) -> u64 {
    let bytes = elapsed.as_nanos().saturating_mul(u128::from(bytes_per_sec)) / 1_000_000_000;
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key(byte: u8) -> PublicKey {
        PublicKey::from_bytes([byte; 32])
    }

    fn send(to: u8, payload: &[u8]) -> Vec<u8> {
        Message::Send {
            to: key(to),
            payload,
        }
        .to_vec()
        .unwrap()
    }

    /// A core admitting keys 1, 2 and 3, with 1 and 2 connected as sessions 1 and 2.
    fn core(now: Instant) -> Core {
        let mut core = Core::new(RateLimit::default());
        core.apply_admissions(true, &[key(1), key(2), key(3)], &[]);
        core.connect(key(1), ConnId(1), now).unwrap();
        core.connect(key(2), ConnId(2), now).unwrap();
        core
    }

    #[test]
    fn a_send_is_forwarded_with_the_authenticated_sender() {
        let now = Instant::now();
        let mut core = core(now);
        let forward = core
            .handle_message(key(1), ConnId(1), &send(2, b"wg packet"), now)
            .unwrap();
        assert_eq!(forward.to, ConnId(2));
        assert_eq!(core.counters().forwarded_bytes, 9);
        assert_eq!(
            relay::decode(&forward.message).unwrap(),
            Message::Recv {
                from: key(1),
                payload: b"wg packet"
            }
        );
        assert_eq!(core.counters().forwarded, 1);
    }

    #[test]
    fn unadmitted_keys_are_refused_and_unknown_destinations_dropped() {
        let now = Instant::now();
        let mut core = core(now);
        assert_eq!(
            core.connect(key(9), ConnId(9), now),
            Err(NotAdmitted(key(9)))
        );
        assert!(core
            .handle_message(key(9), ConnId(9), &send(2, b"x"), now)
            .is_none());
        // Admitted but not connected, and not admitted at all.
        assert!(core
            .handle_message(key(1), ConnId(1), &send(3, b"x"), now)
            .is_none());
        assert!(core
            .handle_message(key(1), ConnId(1), &send(9, b"x"), now)
            .is_none());
        assert!(core
            .handle_message(key(1), ConnId(1), b"\x02garbage", now)
            .is_none());
        let counters = core.counters();
        assert_eq!(counters.forwarded, 0);
        assert_eq!(counters.dropped_no_destination, 1);
        assert_eq!(counters.dropped_not_admitted, 2);
        assert_eq!(counters.dropped_malformed, 1);
    }

    #[test]
    fn nobody_is_admitted_before_the_first_feed() {
        let mut core = Core::new(RateLimit::default());
        assert!(core.connect(key(1), ConnId(1), Instant::now()).is_err());
    }

    #[test]
    fn a_removed_key_cuts_its_client_and_its_packets() {
        let now = Instant::now();
        let mut core = core(now);
        core.apply_admissions(false, &[], &[key(2)]);
        assert_eq!(
            core.poll_disconnect(),
            Some(Disconnect {
                conn: ConnId(2),
                key: key(2),
                code: CLOSE_RELAY_REMOVED
            })
        );
        assert_eq!(core.poll_disconnect(), None);
        assert!(core
            .handle_message(key(1), ConnId(1), &send(2, b"x"), now)
            .is_none());
        assert!(core
            .handle_message(key(2), ConnId(2), &send(1, b"x"), now)
            .is_none());
        // A full set without key 1 cuts it too.
        core.apply_admissions(true, &[key(3)], &[]);
        assert_eq!(core.poll_disconnect().unwrap().key, key(1));
        assert_eq!(core.connected(), 0);
    }

    #[test]
    fn a_new_session_replaces_the_old_one() {
        let now = Instant::now();
        let mut core = core(now);
        core.connect(key(2), ConnId(7), now).unwrap();
        assert_eq!(
            core.poll_disconnect(),
            Some(Disconnect {
                conn: ConnId(2),
                key: key(2),
                code: CLOSE_RELAY_REPLACED
            })
        );
        // The old session ending does not remove the new one.
        core.disconnect(&key(2), ConnId(2));
        let forward = core
            .handle_message(key(1), ConnId(1), &send(2, b"x"), now)
            .unwrap();
        assert_eq!(forward.to, ConnId(7));
        assert!(core
            .handle_message(key(2), ConnId(2), &send(1, b"x"), now)
            .is_none());
    }

    #[test]
    fn the_rate_limit_drops_excess_and_refills_over_time() {
        let now = Instant::now();
        let mut core = Core::new(RateLimit {
            bytes_per_sec: 1000,
            burst: 1000,
        });
        core.apply_admissions(true, &[key(1), key(2)], &[]);
        core.connect(key(1), ConnId(1), now).unwrap();
        core.connect(key(2), ConnId(2), now).unwrap();
        let packet = send(2, &[0u8; 400]);
        assert!(core
            .handle_message(key(1), ConnId(1), &packet, now)
            .is_some());
        assert!(core
            .handle_message(key(1), ConnId(1), &packet, now)
            .is_some());
        assert!(core
            .handle_message(key(1), ConnId(1), &packet, now)
            .is_none());
        assert_eq!(core.counters().dropped_rate_limited, 1);
        assert_eq!(core.counters().rate_limited_sessions, 1);
        // Other clients have their own bucket.
        assert!(core
            .handle_message(key(2), ConnId(2), &send(1, &[0u8; 400]), now)
            .is_some());
        let later = now + Duration::from_millis(400);
        assert!(core
            .handle_message(key(1), ConnId(1), &packet, later)
            .is_some());
        assert!(core
            .handle_message(key(1), ConnId(1), &packet, later)
            .is_none());
    }

    proptest! {
        #[test]
        fn garbage_is_dropped_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let now = Instant::now();
            let mut core = core(now);
            if let Some(forward) = core.handle_message(key(1), ConnId(1), &bytes, now) {
                // Only a well-formed Send to key 2 may come out, stamped with the real sender.
                prop_assert_eq!(forward.to, ConnId(2));
                let Message::Recv { from, .. } = relay::decode(&forward.message).unwrap() else {
                    panic!("a forward is always a Recv");
                };
                prop_assert_eq!(from, key(1));
            }
        }
    }
}
