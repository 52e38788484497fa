//! What keeps clients from exhausting the coordinator: timeouts on HTTP
//! connections, caps on TCP connections (per source address and in total)
//! and on logins in progress, and a reserve of file descriptors that client
//! connections never take, so the admin socket and the policy watcher keep
//! working while the control port is flooded.
//!
//! The caps refuse at once (an excess connection is closed as soon as it is
//! accepted, an excess login is refused with a sentence saying why), and a
//! refusal is logged at most every [`REPORT_EVERY`] with how many there were,
//! not once per connection.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Descriptors kept for the coordinator itself (admin connections, the
/// policy file, the store, the identity provider, accept's momentary one)
/// whatever the clients do.
pub(crate) const RESERVED_DESCRIPTORS: u64 = 64;
/// The fewest TCP connections admitted however low the descriptor limit.
const MIN_CONNECTIONS: usize = 16;
/// How often a limit that keeps being hit is reported.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Accept errors back off from this, doubling up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The coordinator's limits on what clients may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Time a client has to send an HTTP request's head, counted from the
    /// moment the server waits for it: when the connection opens and after
    /// each response. A kept-alive connection that sends no new request is
    /// closed after it too.
    pub http_header_timeout: Duration,
    /// An HTTP connection on which no byte moved either way for this long is
    /// closed, whatever it was doing.
    pub http_idle_timeout: Duration,
    /// TCP connections (control sessions over TLS and HTTP together) one
    /// source address may hold; IPv6 addresses count per /64.
    pub connections_per_address: usize,
    /// Interactive logins that may wait at once for someone to finish them.
    pub pending_logins: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            http_header_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(60),
            connections_per_address: 256,
            pending_logins: 1024,
        }
    }
}

/// Raises the soft descriptor limit to the hard one and returns how many TCP
/// connections clients may hold: the limit less the descriptors open now
/// and [`RESERVED_DESCRIPTORS`].
pub(crate) fn connection_budget() -> usize {
    let limit = match raise_descriptor_limit() {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!("cannot read or raise the open-file limit (RLIMIT_NOFILE): {e}");
            return MIN_CONNECTIONS;
        }
    };
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count) as u64;
    let budget = limit.saturating_sub(open + RESERVED_DESCRIPTORS);
    let budget = usize::try_from(budget).unwrap_or(usize::MAX);
    if budget < MIN_CONNECTIONS {
        tracing::warn!(
            limit,
            open,
            "the open-file limit leaves room for only {budget} TCP connections; raise it (LimitNOFILE= in the systemd unit)"
        );
    }
    tracing::debug!(limit, open, connections = budget, "descriptor budget");
    budget.max(MIN_CONNECTIONS)
}

/// Raises `RLIMIT_NOFILE`'s soft limit to its hard limit; returns the soft
/// limit in force.
fn raise_descriptor_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a live rlimit the call writes into.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a live rlimit the call only reads.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

/// Counts the TCP connections held, per source address and in total, and
/// refuses those beyond either cap.
#[derive(Debug)]
pub(crate) struct ConnectionGate {
    max_total: usize,
    max_per_address: usize,
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
    refusals: Report,
}

/// A connection's place under the caps; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct Permit {
    gate: Arc<ConnectionGate>,
    address: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.gate.state();
        state.total = state.total.saturating_sub(1);
        if let Some(count) = state.by_address.get_mut(&self.address) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                state.by_address.remove(&self.address);
            }
        }
    }
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Every connection the descriptor budget allows is taken.
    Total,
    /// The source address holds as many as one address may.
    Address,
}

impl ConnectionGate {
    pub(crate) fn new(max_total: usize, max_per_address: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_address,
            state: Mutex::new(GateState::default()),
        })
    }

    /// Admits a connection from `remote`, or says which cap it is beyond
    /// (and logs it, at most every [`REPORT_EVERY`]).
    pub(crate) fn admit(self: &Arc<Self>, remote: IpAddr, now: Instant) -> Result<Permit, Refused> {
        let address = source(remote);
        let mut state = self.state();
        let held = state.by_address.get(&address).copied().unwrap_or(0);
        let refused = if state.total >= self.max_total {
            Some(Refused::Total)
        } else if held >= self.max_per_address {
            Some(Refused::Address)
        } else {
            None
        };
        if let Some(refused) = refused {
            let total = state.total;
            if let Some((recent, since_start)) = state.refusals.hit(now) {
                let cap = match refused {
                    Refused::Total => format!(
                        "all {} connections the open-file limit allows are taken",
                        self.max_total
                    ),
                    Refused::Address => format!(
                        "{address} holds {held}, the most one address may (--max-connections-per-address)"
                    ),
                };
                tracing::warn!(
                    open = total,
                    refused = recent,
                    refused_since_start = since_start,
                    "closing new TCP connections at once: {cap}"
                );
            }
            return Err(refused);
        }
        state.total += 1;
        *state.by_address.entry(address).or_default() += 1;
        drop(state);
        Ok(Permit {
            gate: Arc::clone(self),
            address,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The address a connection counts against: IPv4 (IPv4-mapped included) as
/// is, IPv6 by its /64, which one subscriber usually holds whole.
fn source(remote: IpAddr) -> IpAddr {
    match remote.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

/// Counts the hits of a limit and says when to report them: at the first
/// hit, then at most every [`REPORT_EVERY`], with the hits since the last
/// report and since start.
#[derive(Debug, Default)]
pub(crate) struct Report {
    since_start: u64,
    unreported: u64,
    last: Option<Instant>,
}

impl Report {
    /// Records a hit; returns `(hits since the last report, hits since
    /// start)` when it is time to report.
    pub(crate) fn hit(&mut self, now: Instant) -> Option<(u64, u64)> {
        self.since_start += 1;
        self.unreported += 1;
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= REPORT_EVERY);
        if !due {
            return None;
        }
        self.last = Some(now);
        let recent = std::mem::take(&mut self.unreported);
        Some((recent, self.since_start))
    }
}

/// Accepts TCP connections on `listener` until `shutdown`, then waits for
/// their tasks to end. Each connection is admitted through `gate` (one
/// beyond a cap is closed at once) and handed to `serve` with its
/// [`Permit`]; while accepting fails (out of descriptors, above all) the
/// loop backs off instead of spinning. `listener` names it in the log.
pub(crate) async fn accept_until<S, F>(
    listener: TcpListener,
    name: &'static str,
    gate: Arc<ConnectionGate>,
    mut shutdown: watch::Receiver<bool>,
    mut serve: S,
) where
    S: FnMut(TcpStream, SocketAddr, Permit) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    let mut backoff = AcceptBackoff::new(name);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    backoff.succeeded();
                    // Beyond a cap the stream is dropped here: closed at once.
                    if let Ok(permit) = gate.admit(remote.ip(), Instant::now()) {
                        connections.spawn(serve(stream, remote, permit));
                    }
                }
                Err(e) => tokio::time::sleep(backoff.failed(&e, Instant::now())).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = stopping(&mut shutdown) => break,
        }
    }
    drop((listener, serve));
    while connections.join_next().await.is_some() {}
}

/// Resolves once the coordinator shuts down (or was dropped without).
pub(crate) async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Backs an accept loop off while accepting fails (out of descriptors,
/// above all), instead of retrying at once, and reports the failures.
#[derive(Debug)]
struct AcceptBackoff {
    listener: &'static str,
    delay: Duration,
    failures: Report,
}

impl AcceptBackoff {
    pub(crate) fn new(listener: &'static str) -> Self {
        Self {
            listener,
            delay: ACCEPT_BACKOFF_FIRST,
            failures: Report::default(),
        }
    }

    /// Accepting failed: how long to wait before the next try.
    pub(crate) fn failed(&mut self, error: &std::io::Error, now: Instant) -> Duration {
        let delay = self.delay;
        self.delay = (self.delay * 2).min(ACCEPT_BACKOFF_MAX);
        if let Some((recent, since_start)) = self.failures.hit(now) {
            tracing::warn!(
                failures = recent,
                failures_since_start = since_start,
                "cannot accept connections on the {}: {error}; retrying in {delay:?}",
                self.listener
            );
        }
        delay
    }

    /// Accepting works again.
    pub(crate) fn succeeded(&mut self) {
        self.delay = ACCEPT_BACKOFF_FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_address_gets_its_share_and_no_more() {
        let gate = ConnectionGate::new(10, 2);
        let now = Instant::now();
        let a1 = gate.admit(ip("192.0.2.1"), now).unwrap();
        let _a2 = gate.admit(ip("192.0.2.1"), now).unwrap();
        assert_eq!(
            gate.admit(ip("192.0.2.1"), now).unwrap_err(),
            Refused::Address
        );
        let _b = gate.admit(ip("192.0.2.2"), now).unwrap();
        drop(a1);
        assert!(
            gate.admit(ip("192.0.2.1"), now).is_ok(),
            "a closed connection frees its place"
        );
    }

    #[test]
    fn the_total_is_capped_across_addresses() {
        let gate = ConnectionGate::new(3, 2);
        let now = Instant::now();
        let held: Vec<_> = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
            .iter()
            .map(|a| gate.admit(ip(a), now).unwrap())
            .collect();
        assert_eq!(
            gate.admit(ip("192.0.2.4"), now).unwrap_err(),
            Refused::Total
        );
        drop(held);
        let _d = gate.admit(ip("192.0.2.4"), now).unwrap();
        assert_eq!(gate.state().total, 1);
        assert_eq!(gate.state().by_address.len(), 1);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let gate = ConnectionGate::new(10, 1);
        let now = Instant::now();
        let _a = gate.admit(ip("2001:db8:1:2::1"), now).unwrap();
        assert_eq!(
            gate.admit(ip("2001:db8:1:2:ffff::9"), now).unwrap_err(),
            Refused::Address
        );
        assert!(gate.admit(ip("2001:db8:1:3::1"), now).is_ok());
        let _v4 = gate.admit(ip("192.0.2.1"), now).unwrap();
        assert_eq!(
            gate.admit(ip("::ffff:192.0.2.1"), now).unwrap_err(),
            Refused::Address
        );
    }

    #[test]
    fn a_limit_hit_again_and_again_is_reported_once_per_period() {
        let mut report = Report::default();
        let start = Instant::now();
        assert_eq!(report.hit(start), Some((1, 1)));
        for _ in 0..99 {
            assert_eq!(report.hit(start + Duration::from_secs(1)), None);
        }
        assert_eq!(report.hit(start + REPORT_EVERY), Some((100, 101)));
    }

    #[test]
    fn accept_failures_back_off_up_to_a_second() {
        let mut backoff = AcceptBackoff::new("test listener");
        let error = std::io::Error::from_raw_os_error(libc::EMFILE);
        let now = Instant::now();
        let delays: Vec<_> = (0..10).map(|_| backoff.failed(&error, now)).collect();
        assert_eq!(delays[0], ACCEPT_BACKOFF_FIRST);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(delays[9], ACCEPT_BACKOFF_MAX);
        backoff.succeeded();
        assert_eq!(backoff.failed(&error, now), ACCEPT_BACKOFF_FIRST);
    }
}
