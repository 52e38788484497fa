//! One peer as the data plane sees it: its netmap entry and its WireGuard
//! sessions — the current one, and across a key change the one it replaces.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::RngCore;
use weft_proto::{Peer, PublicKey};

use crate::wireguard::rate_limiter::RateLimiter;
use crate::wireguard::Tunn;

use super::paths::Paths;

/// How long the tunnel of a replaced key pair is kept at most.
const RETIRE_MAX: Duration = Duration::from_secs(120);
/// How long the replaced tunnel still takes datagrams once the new one has a
/// session: packets sent on the old session just before the switch.
const RETIRE_DRAIN: Duration = Duration::from_secs(5);

/// A peer and its tunnel. A tunnel lives as long as the key pair (this
/// node's key and the peer's) it was made for.
pub(crate) struct PeerTunnel {
    pub(crate) peer: Peer,
    /// The WireGuard tunnel, made when the peer is first reached or
    /// reaches this node ([`PeerTunnel::tunn`]): a `Tunn` is
    /// 11 KB, and most peers of a large netmap never exchange a packet.
    pub(crate) tunn: Option<Box<Tunn>>,
    /// The 24-bit index the tunnel's session indices start with.
    pub(crate) index: u32,
    /// The tunnel of the key pair before the last key change, while `tunn`
    /// has no session of its own yet (make-before-break).
    pub(crate) retiring: Option<Retiring>,
    /// The direct paths: candidates, the one in use and whether it is trusted.
    pub(crate) paths: Paths,
    /// When this node last offered the peer a fresh handshake because it
    /// sent on a session this node no longer has.
    pub(crate) last_nudge: Option<Instant>,
    /// When to send the handshake again on a new path, unless a session
    /// exists by then.
    pub(crate) handshake_due: Option<Instant>,
}

impl PeerTunnel {
    /// A fresh tunnel to `peer` with session index `index`; the WireGuard
    /// state is made on first use.
    pub(crate) fn new(peer: Peer, index: u32) -> Self {
        let paths = Paths::new(&peer.endpoints);
        Self {
            peer,
            tunn: None,
            index,
            retiring: None,
            paths,
            last_nudge: None,
            handshake_due: None,
        }
    }

    /// Makes this fresh tunnel the successor of `old`, the same peer's tunnel
    /// before a key change of either side. `old`'s session, if it has one,
    /// carries traffic both ways until this tunnel's handshake completes:
    /// WireGuard session keys do not depend on the static keys once
    /// derived, and the other side keeps its own old session just as long.
    pub(crate) fn succeed(&mut self, old: PeerTunnel, now: Instant) {
        if old.peer.endpoints == self.peer.endpoints {
            let guess = self.paths.endpoint;
            self.paths = old.paths;
            self.paths.endpoint = self.paths.endpoint.or(guess);
        }
        if let Some(tunn) = old.tunn.filter(|tunn| has_session(tunn)) {
            self.retiring = Some(Retiring {
                tunn,
                index: old.index,
                until: now + RETIRE_MAX,
            });
        }
    }

    /// The current tunnel, made now if the peer has none yet.
    pub(crate) fn tunn(&mut self, maker: &mut Maker, now: Instant) -> &mut Tunn {
        maker.made(&mut self.tunn, self.peer.node_key, self.index, now)
    }

    /// The tunnel to encrypt with: the current one, or while it has no
    /// session yet the retiring one that still has.
    pub(crate) fn sending_tunn(&mut self, maker: &mut Maker, now: Instant) -> &mut Tunn {
        let Self {
            peer,
            tunn,
            index,
            retiring,
            ..
        } = self;
        match retiring {
            Some(retiring)
                if !tunn.as_deref().is_some_and(has_session) && has_session(&retiring.tunn) =>
            {
                &mut retiring.tunn
            }
            _ => maker.made(tunn, peer.node_key, *index, now),
        }
    }

    /// Ends the retiring tunnel when its time is up, or shortens its time
    /// once the current tunnel has a session. Returns the index of a tunnel
    /// that ended.
    pub(crate) fn expire_retiring(&mut self, now: Instant) -> Option<u32> {
        let retiring = self.retiring.as_mut()?;
        if self.tunn.as_deref().is_some_and(has_session) {
            retiring.until = retiring.until.min(now + RETIRE_DRAIN);
        }
        if now < retiring.until {
            return None;
        }
        self.retiring.take().map(|r| r.index)
    }

    /// Whether any of the peer's tunnels has a session to send on.
    pub(crate) fn has_session(&self) -> bool {
        self.tunn.as_deref().is_some_and(has_session)
            || self.retiring.as_ref().is_some_and(|r| has_session(&r.tunn))
    }

    /// The session indices this peer's tunnels answer to.
    pub(crate) fn indices(&self) -> impl Iterator<Item = (u32, Slot)> + '_ {
        std::iter::once((self.index, Slot::Current))
            .chain(self.retiring.as_ref().map(|r| (r.index, Slot::Retiring)))
    }

    /// Takes the details of `peer`, whose key is unchanged, keeping the session.
    /// A changed list of advertised endpoints resets an untrusted endpoint to its first.
    pub(crate) fn update(&mut self, peer: Peer, now: Instant) {
        if peer.endpoints != self.peer.endpoints {
            self.paths.set_advertised(&peer.endpoints, now);
        }
        self.peer = peer;
    }

    pub(crate) fn key(&self) -> PublicKey {
        self.peer.node_key
    }

    /// Whether `src` is one of the peer's own overlay addresses.
    pub(crate) fn owns(&self, src: IpAddr) -> bool {
        self.peer.addresses.contains(&src)
    }
}

/// Which of a peer's tunnels a session index belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Current,
    Retiring,
}

/// The tunnel of a replaced key pair.
pub(crate) struct Retiring {
    pub(crate) tunn: Box<Tunn>,
    pub(crate) index: u32,
    /// When it is dropped.
    pub(crate) until: Instant,
}

/// What a peer's tunnel is made from: this node's key, the rate limiter
/// its handshakes share, the wall clock for handshake timestamps, and the
/// generator every tunnel's ephemeral keys are seeded from.
pub(crate) struct Maker {
    pub(crate) static_private: x25519_dalek::StaticSecret,
    pub(crate) static_public: x25519_dalek::PublicKey,
    /// Shared by every `Tunn`; never under load, since the node's gate
    /// already decided.
    pub(crate) limiter: Arc<RateLimiter>,
    /// An instant of the caller's clock and the wall-clock time then, as
    /// a duration since the Unix epoch.
    pub(crate) wall: (Instant, Duration),
    pub(crate) rng: StdRng,
}

impl Maker {
    /// A maker for `static_private`'s tunnels; `wall` is the wall-clock
    /// time at `now` as a duration since the Unix epoch.
    pub(crate) fn new(
        static_private: x25519_dalek::StaticSecret,
        now: Instant,
        wall: Duration,
        mut rng: StdRng,
    ) -> Self {
        let static_public = x25519_dalek::PublicKey::from(&static_private);
        Self {
            limiter: Arc::new(RateLimiter::new_at(&static_public, u64::MAX, &mut rng, now)),
            static_private,
            static_public,
            wall: (now, wall),
            rng,
        }
    }

    /// Makes the tunnels of `static_private` from now on.
    pub(crate) fn set_key(&mut self, static_private: x25519_dalek::StaticSecret, now: Instant) {
        self.static_public = x25519_dalek::PublicKey::from(&static_private);
        self.static_private = static_private;
        self.limiter = Arc::new(RateLimiter::new_at(
            &self.static_public,
            u64::MAX,
            &mut self.rng,
            now,
        ));
    }

    /// The tunnel in `slot`, made at `now` for the key pair and `index` if
    /// there is none.
    pub(crate) fn made<'a>(
        &mut self,
        slot: &'a mut Option<Box<Tunn>>,
        peer_key: PublicKey,
        index: u32,
        now: Instant,
    ) -> &'a mut Tunn {
        slot.get_or_insert_with(|| {
            let (at, unix) = self.wall;
            Box::new(Tunn::new_at(
                self.static_private.clone(),
                x25519_dalek::PublicKey::from(peer_key),
                index,
                Arc::clone(&self.limiter),
                now,
                unix + now.saturating_duration_since(at),
                self.rng.next_u64(),
            ))
        })
    }
}

impl fmt::Debug for Maker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maker")
            .field("static_public", &PublicKey::from(self.static_public))
            .finish_non_exhaustive()
    }
}

/// Whether `tunn` has a session to send on (it reports a handshake age
/// exactly then).
fn has_session(tunn: &Tunn) -> bool {
    tunn.has_session()
}

impl fmt::Debug for PeerTunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTunnel")
            .field("id", &self.peer.id)
            .field("key", &self.peer.node_key)
            .field("index", &self.index)
            .field("retiring", &self.retiring.as_ref().map(|r| r.index))
            .field("endpoint", &self.paths.endpoint)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use weft_proto::{Identity, NodeId, PrivateKey};

    #[test]
    fn a_tunnel_is_made_on_first_use_only() {
        let now = crate::test_clock();
        let me = PrivateKey::generate().to_x25519();
        let mut maker = Maker::new(me, now, Duration::from_secs(1), StdRng::seed_from_u64(1));
        let peer = Peer {
            id: NodeId(2),
            name: "db".into(),
            node_key: PrivateKey::generate().public_key(),
            addresses: vec!["100.64.0.2".parse().unwrap()],
            endpoints: vec!["192.0.2.2:51820".parse().unwrap()],
            home_relay: None,
            identity: Identity::default(),
        };
        let mut tunnel = PeerTunnel::new(peer, 7);
        assert!(tunnel.tunn.is_none());
        assert!(!tunnel.has_session());
        tunnel.sending_tunn(&mut maker, now);
        assert!(tunnel.tunn.is_some());
        assert!(!tunnel.has_session());
    }
}
