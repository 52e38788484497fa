//! One peer as the data plane sees it: its netmap entry and its WireGuard session.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use weft_proto::{Peer, PublicKey};

/// A peer and its tunnel. The tunnel lives as long as the peer's key does.
pub(crate) struct PeerTunnel {
    pub(crate) peer: Peer,
    pub(crate) tunn: Tunn,
    /// The 24-bit index the tunnel's session indices start with.
    pub(crate) index: u32,
    /// Where to send: the advertised endpoint until an authenticated packet
    /// arrives from elsewhere (WireGuard roaming).
    pub(crate) endpoint: Option<SocketAddr>,
    /// When this node last offered the peer a fresh handshake because it
    /// sent on a session this node no longer has.
    pub(crate) last_nudge: Option<Instant>,
}

impl PeerTunnel {
    /// A fresh tunnel to `peer` with session index `index`.
    pub(crate) fn new(
        static_private: &x25519_dalek::StaticSecret,
        peer: Peer,
        index: u32,
        limiter: &Arc<RateLimiter>,
    ) -> Self {
        let tunn = Tunn::new(
            static_private.clone(),
            x25519_dalek::PublicKey::from(peer.node_key),
            None,
            None,
            index,
            Some(Arc::clone(limiter)),
        );
        let endpoint = peer.endpoints.first().copied();
        Self {
            peer,
            tunn,
            index,
            endpoint,
            last_nudge: None,
        }
    }

    /// Takes the details of `peer`, whose key is unchanged, keeping the session.
    /// A changed list of advertised endpoints resets the endpoint to its first.
    pub(crate) fn update(&mut self, peer: Peer) {
        if peer.endpoints != self.peer.endpoints {
            self.endpoint = peer.endpoints.first().copied();
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

impl fmt::Debug for PeerTunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTunnel")
            .field("id", &self.peer.id)
            .field("key", &self.peer.node_key)
            .field("index", &self.index)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}
