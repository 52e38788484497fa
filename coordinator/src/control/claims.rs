//! Which connection holds each machine key on this coordinator, so that two
//! machines with one key (a cloned VM image, a copied state directory) do
//! not take the node from each other hundreds of times a second.
//!
//! A new session for a machine key whose session is still live replaces it:
//! a restarted or roaming node reconnects before its old connection times
//! out. Once newcomers found a key held more than [`MAX_REPLACEMENTS`]
//! times within [`WINDOW`], two machines are using it: newcomers are
//! refused while the holder stays connected, until [`HOLD`] has passed
//! without one, and the operator is told at most once per [`WINDOW`] per
//! key. When the holder goes away, the next newcomer takes the key.
//!
//! The table is this coordinator's alone: clones that reach different
//! replicas are not told apart here.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use weft_proto::{PublicKey, Refusal, RefusalCode};

/// How long a contest of a key counts.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Live sessions a key's newcomers may replace within [`WINDOW`].
pub(crate) const MAX_REPLACEMENTS: usize = 2;
/// How long after refusing a newcomer the key stays refused to others
/// while its holder is connected: longer than a node's retry delay.
const HOLD: Duration = Duration::from_secs(300);

/// The machine keys with a live session here, and how often each was contested.
#[derive(Debug, Default)]
pub(crate) struct Claims {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_token: u64,
    keys: HashMap<PublicKey, Entry>,
}

#[derive(Debug, Default)]
struct Entry {
    holder: Option<Holder>,
    /// When newcomers found the key held, oldest first, within [`WINDOW`].
    contests: VecDeque<Instant>,
    /// Until when newcomers are refused while the key is held.
    refusing_until: Option<Instant>,
    /// When the operator was last told about this key.
    warned: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Holder {
    token: u64,
    remote: SocketAddr,
}

/// The outcome of [`Claims::claim`].
#[derive(Debug)]
pub(crate) enum Claim {
    /// The session may go on; it holds the key until the guard drops.
    Granted(ClaimGuard),
    /// Another connection holds the key and has been contested too often.
    InUse(InUse),
}

/// A refused newcomer: who holds the key, and whether to tell the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InUse {
    pub(crate) holder: SocketAddr,
    /// Whether this is the first refusal for the key within [`WINDOW`],
    /// the one the operator's log shows.
    pub(crate) first: bool,
}

impl InUse {
    /// What the refused node is told.
    pub(crate) fn refusal(&self) -> Refusal {
        Refusal {
            code: RefusalCode::MachineKeyInUse,
            message: format!(
                "machine key in use by another connection from {}: was this machine cloned? \
                 Two machines cannot share one machine key; on the copy, stop weftd, delete \
                 machine.key and node.key from its state directory, start weftd and join \
                 again (`weft up --auth-key KEY` or a login). Retrying in a while.",
                self.holder
            ),
        }
    }
}

/// A session's hold on a machine key; released on drop unless a newer
/// session took the key meanwhile.
#[derive(Debug)]
pub(crate) struct ClaimGuard {
    claims: Arc<Claims>,
    key: PublicKey,
    token: u64,
}

impl Claims {
    /// Asks for `key` for a session from `remote` at `now`.
    pub(crate) fn claim(
        self: &Arc<Self>,
        key: PublicKey,
        remote: SocketAddr,
        now: Instant,
    ) -> Claim {
        let mut inner = self.lock();
        inner.next_token += 1;
        let token = inner.next_token;
        let entry = inner.keys.entry(key).or_default();
        while entry
            .contests
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= WINDOW)
        {
            entry.contests.pop_front();
        }
        if let Some(holder) = entry.holder {
            entry.contests.push_back(now);
            // Only the count past the limit matters; the queue stays short.
            while entry.contests.len() > MAX_REPLACEMENTS + 1 {
                entry.contests.pop_front();
            }
            let refusing = entry.refusing_until.is_some_and(|until| now < until);
            if refusing || entry.contests.len() > MAX_REPLACEMENTS {
                entry.refusing_until = Some(now + HOLD);
                let first = entry
                    .warned
                    .is_none_or(|at| now.saturating_duration_since(at) >= WINDOW);
                if first {
                    entry.warned = Some(now);
                }
                return Claim::InUse(InUse {
                    holder: holder.remote,
                    first,
                });
            }
        }
        entry.holder = Some(Holder { token, remote });
        Claim::Granted(ClaimGuard {
            claims: Arc::clone(self),
            key,
            token,
        })
    }

    fn release(&self, key: &PublicKey, token: u64) {
        let mut inner = self.lock();
        let Some(entry) = inner.keys.get_mut(key) else {
            return;
        };
        if entry.holder.is_some_and(|h| h.token == token) {
            entry.holder = None;
        }
        // A key nobody holds is forgotten; its contests only count while it is held.
        if entry.holder.is_none() {
            inner.keys.remove(key);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.claims.release(&self.key, self.token);
    }
}

#[cfg(test)]
mod tests {
    use weft_proto::PrivateKey;

    use super::*;

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, last], 40000))
    }

    fn granted(claim: Claim) -> ClaimGuard {
        match claim {
            Claim::Granted(guard) => guard,
            Claim::InUse(in_use) => panic!("refused: {in_use:?}"),
        }
    }

    #[test]
    fn a_reconnect_replaces_a_lingering_session() {
        let claims = Arc::new(Claims::default());
        let key = PrivateKey::generate().public_key();
        let now = Instant::now();
        let old = granted(claims.claim(key, addr(1), now));
        let new = granted(claims.claim(key, addr(2), now));
        drop(old);
        // The replaced session's end does not release the newcomer's hold.
        assert!(claims.lock().keys[&key].holder.is_some());
        drop(new);
        assert!(claims.lock().keys.is_empty());
    }

    #[test]
    fn two_machines_with_one_key_are_refused_after_a_few_replacements() {
        let claims = Arc::new(Claims::default());
        let key = PrivateKey::generate().public_key();
        let start = Instant::now();
        let mut held = granted(claims.claim(key, addr(1), start));
        let mut holder = addr(1);
        let mut refusals = Vec::new();
        for i in 0..50u32 {
            let now = start + Duration::from_millis(u64::from(i) * 2);
            let remote = if i % 2 == 0 { addr(2) } else { addr(1) };
            match claims.claim(key, remote, now) {
                Claim::Granted(guard) => {
                    held = guard;
                    holder = remote;
                }
                Claim::InUse(in_use) => refusals.push(in_use),
            }
        }
        assert_eq!(refusals.len(), 50 - MAX_REPLACEMENTS);
        assert!(refusals.iter().all(|r| r.holder == holder));
        assert_eq!(refusals.iter().filter(|r| r.first).count(), 1);
        let text = refusals[0].refusal().message;
        assert!(
            text.contains(&holder.to_string()) && text.contains("cloned"),
            "{text}"
        );
        // The other machine retries slowly: still refused, and the operator
        // hears again once a window has passed.
        let later = start + WINDOW + Duration::from_secs(1);
        let again = claims.claim(key, addr(2), later);
        assert!(matches!(again, Claim::InUse(InUse { first: true, .. })));
        let again = claims.claim(key, addr(2), later + Duration::from_secs(30));
        assert!(matches!(again, Claim::InUse(InUse { first: false, .. })));
        // The holder leaves: the other machine gets the key.
        drop(held);
        granted(claims.claim(key, addr(2), later + Duration::from_secs(2)));
    }

    #[test]
    fn contests_older_than_the_window_are_forgotten() {
        let claims = Arc::new(Claims::default());
        let key = PrivateKey::generate().public_key();
        let start = Instant::now();
        let mut guards = vec![granted(claims.claim(key, addr(1), start))];
        for i in 1..=20u64 {
            let now = start + (WINDOW / 2) * u32::try_from(i).unwrap();
            guards.push(granted(claims.claim(key, addr(2), now)));
        }
    }
}
