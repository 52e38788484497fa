//! The connection-tracking table: which flows exist, who opened them, and
//! when they go idle.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use weft_proto::Protocol;

use super::packet::{Headers, Transport};

/// Idle lifetime of a TCP flow.
pub const TCP_IDLE: Duration = Duration::from_secs(5 * 60);
/// Idle lifetime of a UDP flow, and of flows of protocols without ports.
pub const UDP_IDLE: Duration = Duration::from_secs(2 * 60);
/// Idle lifetime of an ICMP echo flow.
pub const ICMP_IDLE: Duration = Duration::from_secs(30);
/// Default bound on the number of tracked flows.
pub const DEFAULT_CAPACITY: usize = 65_536;

/// One direction of a flow: protocol, addresses and ports as a packet carries them.
///
/// ICMP echo uses the identifier as a port on the requester's side and 0 on
/// the responder's, so a reply's reversed key is its request's key and a
/// request never looks like a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Transport protocol.
    pub protocol: Protocol,
    /// Source address.
    pub src: IpAddr,
    /// Source port (or echo identifier of a request).
    pub src_port: u16,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port (or echo identifier of a reply).
    pub dst_port: u16,
}

impl FlowKey {
    /// The key of `headers`, or `None` for packets that belong to no
    /// trackable flow (non-echo ICMP, non-first fragments).
    pub fn of(headers: &Headers) -> Option<Self> {
        let (src_port, dst_port) = match headers.transport {
            Transport::Ports { src, dst } => (src, dst),
            Transport::Echo { reply: false, id } => (id, 0),
            Transport::Echo { reply: true, id } => (0, id),
            Transport::Opaque => (0, 0),
            Transport::IcmpOther | Transport::Fragment => return None,
        };
        Some(Self {
            protocol: headers.protocol,
            src: headers.src,
            src_port,
            dst: headers.dst,
            dst_port,
        })
    }

    /// The key of the same flow's packets in the other direction.
    pub fn reversed(&self) -> Self {
        Self {
            protocol: self.protocol,
            src: self.dst,
            src_port: self.dst_port,
            dst: self.src,
            dst_port: self.src_port,
        }
    }

    /// How long the flow lives without traffic.
    pub fn idle_timeout(&self) -> Duration {
        match self.protocol {
            Protocol::Tcp => TCP_IDLE,
            Protocol::Icmp => ICMP_IDLE,
            Protocol::Udp | Protocol::Other(_) => UDP_IDLE,
        }
    }
}

/// Who opened a flow, which decides what its packets are allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This node opened it; the peer's packets on it are return traffic.
    Outbound,
    /// A peer opened it and a rule admitted it. `allowed` turns false when a
    /// rule change no longer admits it: the entry stays until idle, so this
    /// node's answers on the flow cannot re-open it as an outbound flow.
    Inbound {
        /// Whether the current rules still admit the flow.
        allowed: bool,
    },
}

/// A bounded table of flows keyed by the direction their opener sent in.
///
/// Time comes in as `now`; nothing here reads a clock. When full, inserting
/// evicts the flow closest to expiry.
#[derive(Debug)]
pub struct ConnTrack {
    /// Keyed with a random seed: keys come from the network, so a fixed
    /// hash would let a peer aim collisions at the table.
    flows: AHashMap<FlowKey, Flow>,
    /// One entry per flow, holding a deadline no later than the flow's own
    /// (refreshing a flow leaves its entry stale-early; expiry re-queues it).
    deadlines: BinaryHeap<Reverse<(Instant, FlowKey)>>,
    capacity: usize,
}

#[derive(Debug, Clone, Copy)]
struct Flow {
    origin: Origin,
    deadline: Instant,
}

impl ConnTrack {
    /// An empty table holding at most `capacity` flows (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            flows: AHashMap::with_capacity(64),
            deadlines: BinaryHeap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The origin of the flow `key` opened, if tracked.
    pub fn origin(&self, key: &FlowKey) -> Option<Origin> {
        self.flows.get(key).map(|flow| flow.origin)
    }

    /// Extends the life of flow `key` from `now`. Returns its origin, or
    /// `None` when it is not tracked.
    pub fn touch(&mut self, key: &FlowKey, now: Instant) -> Option<Origin> {
        let flow = self.flows.get_mut(key)?;
        flow.deadline = now + key.idle_timeout();
        Some(flow.origin)
    }

    /// Extends the life of flow `key` from `now` if its origin is `origin`.
    /// Returns whether it did; one hash lookup, no allocation.
    pub fn touch_if(&mut self, key: &FlowKey, now: Instant, origin: Origin) -> bool {
        match self.flows.get_mut(key) {
            Some(flow) if flow.origin == origin => {
                flow.deadline = now + key.idle_timeout();
                true
            }
            _ => false,
        }
    }

    /// Starts tracking flow `key` (or refreshes it with a new origin).
    pub fn insert(&mut self, key: FlowKey, origin: Origin, now: Instant) {
        let deadline = now + key.idle_timeout();
        if let Some(flow) = self.flows.get_mut(&key) {
            *flow = Flow { origin, deadline };
            return;
        }
        while self.flows.len() >= self.capacity {
            if !self.pop_earliest(None) {
                break;
            }
        }
        self.flows.insert(key, Flow { origin, deadline });
        self.deadlines.push(Reverse((deadline, key)));
    }

    /// Re-decides every peer-opened flow with `allowed`.
    pub fn recheck_inbound(&mut self, mut allowed: impl FnMut(&FlowKey) -> bool) {
        for (key, flow) in &mut self.flows {
            if let Origin::Inbound { .. } = flow.origin {
                flow.origin = Origin::Inbound {
                    allowed: allowed(key),
                };
            }
        }
    }

    /// Forgets every flow that has one of `addresses` at either end.
    pub fn forget_addresses(&mut self, addresses: &[IpAddr]) {
        let involved = |key: &FlowKey| addresses.contains(&key.src) || addresses.contains(&key.dst);
        self.flows.retain(|key, _| !involved(key));
        self.deadlines.retain(|Reverse((_, key))| !involved(key));
    }

    /// Drops flows idle at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while self.pop_earliest(Some(now)) {}
    }

    /// When the next flow may go idle (possibly early; then nothing happens).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines
            .peek()
            .map(|Reverse((deadline, _))| *deadline)
    }

    /// Number of tracked flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no flow is tracked.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.flows.clear();
        self.deadlines.clear();
    }

    /// Removes the flow with the earliest deadline, if that deadline is not
    /// after `until` (no bound: remove it regardless). Returns whether one was removed.
    fn pop_earliest(&mut self, until: Option<Instant>) -> bool {
        while let Some(Reverse((queued, key))) = self.deadlines.peek().copied() {
            if until.is_some_and(|until| queued > until) {
                return false;
            }
            self.deadlines.pop();
            let Some(flow) = self.flows.get(&key) else {
                continue;
            };
            if flow.deadline > queued {
                // Refreshed since it was queued: queue it at its real deadline.
                self.deadlines.push(Reverse((flow.deadline, key)));
                continue;
            }
            self.flows.remove(&key);
            return true;
        }
        false
    }
}

impl Default for ConnTrack {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn key(src_port: u16) -> FlowKey {
        FlowKey {
            protocol: Protocol::Udp,
            src: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1)),
            src_port,
            dst: IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)),
            dst_port: 53,
        }
    }

    #[test]
    fn flows_expire_after_their_idle_time_unless_touched() {
        let start = Instant::now();
        let mut table = ConnTrack::new(16);
        table.insert(key(1), Origin::Outbound, start);
        table.insert(key(2), Origin::Outbound, start);
        assert_eq!(table.poll_timeout(), Some(start + UDP_IDLE));

        let later = start + UDP_IDLE / 2;
        assert!(table.touch(&key(2), later).is_some());
        table.handle_timeout(start + UDP_IDLE);
        assert_eq!(table.origin(&key(1)), None);
        assert_eq!(table.origin(&key(2)), Some(Origin::Outbound));

        table.handle_timeout(later + UDP_IDLE);
        assert!(table.is_empty());
        assert_eq!(table.poll_timeout(), None);
    }

    #[test]
    fn idle_times_depend_on_the_protocol() {
        let mut k = key(1);
        assert_eq!(k.idle_timeout(), UDP_IDLE);
        k.protocol = Protocol::Tcp;
        assert_eq!(k.idle_timeout(), TCP_IDLE);
        k.protocol = Protocol::Icmp;
        assert_eq!(k.idle_timeout(), ICMP_IDLE);
    }

    #[test]
    fn a_full_table_evicts_the_flow_closest_to_expiry() {
        let start = Instant::now();
        let mut table = ConnTrack::new(3);
        for port in 1..=3 {
            table.insert(
                key(port),
                Origin::Outbound,
                start + Duration::from_secs(u64::from(port)),
            );
        }
        // Flow 1 was refreshed, so flow 2 is now the closest to expiry.
        table.touch(&key(1), start + Duration::from_secs(10));
        table.insert(key(4), Origin::Outbound, start + Duration::from_secs(11));
        assert_eq!(table.len(), 3);
        assert_eq!(table.origin(&key(2)), None);
        for port in [1, 3, 4] {
            assert!(table.origin(&key(port)).is_some(), "flow {port} evicted");
        }
    }

    #[test]
    fn rechecking_marks_only_peer_opened_flows() {
        let now = Instant::now();
        let mut table = ConnTrack::new(16);
        table.insert(key(1), Origin::Outbound, now);
        table.insert(key(2), Origin::Inbound { allowed: true }, now);
        table.insert(key(3), Origin::Inbound { allowed: true }, now);
        table.recheck_inbound(|k| k.src_port == 3);
        assert_eq!(table.origin(&key(1)), Some(Origin::Outbound));
        assert_eq!(
            table.origin(&key(2)),
            Some(Origin::Inbound { allowed: false })
        );
        assert_eq!(
            table.origin(&key(3)),
            Some(Origin::Inbound { allowed: true })
        );
    }

    #[test]
    fn forgetting_an_address_drops_its_flows_and_their_deadlines() {
        let now = Instant::now();
        let mut table = ConnTrack::new(16);
        table.insert(key(1), Origin::Outbound, now);
        let mut elsewhere = key(2);
        elsewhere.dst = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 9));
        table.insert(elsewhere, Origin::Outbound, now);
        table.forget_addresses(&[IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2))]);
        assert_eq!(table.len(), 1);
        assert_eq!(table.deadlines.len(), 1);
        assert!(table.origin(&elsewhere).is_some());
    }

    #[test]
    fn echo_replies_reverse_to_their_requests() {
        let a = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2));
        let headers = |src, dst, reply| Headers {
            src,
            dst,
            protocol: Protocol::Icmp,
            transport: Transport::Echo { reply, id: 9 },
        };
        let request = FlowKey::of(&headers(a, b, false)).unwrap();
        let reply = FlowKey::of(&headers(b, a, true)).unwrap();
        let counter_request = FlowKey::of(&headers(b, a, false)).unwrap();
        assert_eq!(reply.reversed(), request);
        assert_ne!(counter_request.reversed(), request);
    }
}
