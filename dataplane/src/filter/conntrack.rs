//! The connection-tracking table: which flows exist, who opened them, when
//! they go idle, and what passed on them: each flow is reported to the
//! [`FlowLog`] [`FIRST_REPORT`] after it opens, every [`ACTIVE_INTERVAL`]
//! while it lasts, and when it ends.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use weft_proto::{FlowVerdict, Protocol, RuleRef, Traffic};

use super::flow_log::{FlowLog, FlowReport, ACTIVE_INTERVAL, FIRST_REPORT};
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

/// Which way a packet travels on a tracked flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The way the flow's opener sent.
    Opening,
    /// The way answers to the opener travel.
    Answering,
    /// Both: the two ends have the same address and port, so a packet reads
    /// the same either way.
    Both,
}

impl Direction {
    /// Whether the packet travels the way the opener sent.
    pub fn opens(self) -> bool {
        !matches!(self, Self::Answering)
    }

    /// Whether the packet travels the way answers to the opener do.
    pub fn answers(self) -> bool {
        !matches!(self, Self::Opening)
    }
}

/// What a new flow is tracked with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opening {
    /// Who opened it.
    pub origin: Origin,
    /// What the filter decided ([`FlowVerdict::Opened`] for this node's own).
    pub verdict: FlowVerdict,
    /// The rule that decided, if one did.
    pub rule: Option<RuleRef>,
    /// The opening SYN's initial sequence number; 0 for other flows.
    pub discriminator: u32,
}

/// A bounded table of flows, one entry per flow whichever way its packets
/// travel, so a packet of either direction costs one hash probe.
///
/// Time comes in as `now`; nothing here reads a clock. When full, inserting
/// evicts the flow closest to expiry. Every flow that leaves the table
/// (idle, evicted, forgotten, cleared, replaced) is reported ended.
#[derive(Debug)]
pub struct ConnTrack {
    /// Keyed with a random seed: keys come from the network, so a fixed
    /// hash would let a peer aim collisions at the table.
    flows: AHashMap<Slot, Flow>,
    /// One entry per flow, holding a deadline no later than the flow's own
    /// (refreshing a flow leaves its entry stale-early; expiry re-queues it).
    deadlines: BinaryHeap<Reverse<(Instant, Slot)>>,
    /// When each flow's next interim report is due. Entries of flows that
    /// left the table stay until due or compacted away, so the heap is
    /// compacted once it outgrows twice the table.
    reports: BinaryHeap<Reverse<(Instant, Slot)>>,
    capacity: usize,
}

/// A tracked flow as one packet sees it: found by [`ConnTrack::probe`],
/// refreshed through it without a second lookup.
#[derive(Debug)]
pub struct Probe<'a> {
    flow: &'a mut Flow,
    direction: Direction,
}

impl Probe<'_> {
    /// Who opened the flow.
    pub fn origin(&self) -> Origin {
        self.flow.origin
    }

    /// Which way the probing packet travels on it.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// Extends the flow's life from `now`.
    pub fn refresh(&mut self, now: Instant) {
        self.flow.seen = now;
    }

    /// Counts a packet of `len` bytes that passed on the flow the way it
    /// travels, and extends the flow's life from `now`.
    #[inline]
    pub fn pass(&mut self, len: usize, now: Instant) {
        self.flow.seen = now;
        let traffic = if self.direction.opens() {
            &mut self.flow.to_dst
        } else {
            &mut self.flow.to_src
        };
        traffic.packets += 1;
        traffic.bytes += len as u64;
    }

    /// The flow's discriminator ([`Opening::discriminator`]).
    pub fn discriminator(&self) -> u32 {
        self.flow.discriminator
    }
}

/// A flow's table key: its protocol and its two ends in a fixed order, so
/// both directions of a flow find the same entry. It is three plain integers
/// so that ordering, hashing (three hasher rounds) and comparing stay cheap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Slot {
    low: u128,
    high: u128,
    /// From the top: low port, high port, families (bit 0: the low end is
    /// IPv6, bit 1: the high end is), protocol code.
    rest: u64,
}

/// One end of a flow, in the order [`Slot`] sorts ends by.
type End = (u128, u16, bool);

#[derive(Debug, Clone, Copy)]
struct Flow {
    origin: Origin,
    /// Whether the opener sent from the slot's low end.
    opened_from_low: bool,
    verdict: FlowVerdict,
    discriminator: u32,
    /// The last packet that kept the flow alive. Storing the time rather
    /// than a deadline keeps `Instant` arithmetic off the per-packet path.
    seen: Instant,
    /// The first packet.
    first: Instant,
    /// The last report (or the first packet).
    reported: Instant,
    /// When the next interim report is due: [`FIRST_REPORT`] after the
    /// first packet, then every [`ACTIVE_INTERVAL`]. Only the report-heap
    /// entry with this time is current.
    next_report: Instant,
    /// Whether the flow was reported at all: the first report goes out
    /// even when the flow has had one packet.
    announced: bool,
    rule: Option<RuleRef>,
    to_dst: Traffic,
    to_src: Traffic,
}

impl ConnTrack {
    /// An empty table holding at most `capacity` flows (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            flows: AHashMap::with_capacity(64),
            deadlines: BinaryHeap::new(),
            reports: BinaryHeap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The flow a packet with `key` belongs to, in either direction, if
    /// tracked: one hash lookup, no allocation.
    pub fn probe(&mut self, key: &FlowKey) -> Option<Probe<'_>> {
        let (slot, from_low) = Slot::of(key);
        let flow = self.flows.get_mut(&slot)?;
        let direction = slot.direction(from_low, flow);
        Some(Probe { flow, direction })
    }

    /// The origin of the flow `key` opened, if tracked.
    pub fn origin(&self, key: &FlowKey) -> Option<Origin> {
        let (slot, from_low) = Slot::of(key);
        let flow = self.flows.get(&slot)?;
        slot.direction(from_low, flow)
            .opens()
            .then_some(flow.origin)
    }

    /// Extends the life of flow `key` opened from `now`. Returns its origin,
    /// or `None` when it is not tracked.
    pub fn touch(&mut self, key: &FlowKey, now: Instant) -> Option<Origin> {
        let mut flow = self.probe(key).filter(|flow| flow.direction().opens())?;
        flow.refresh(now);
        Some(flow.origin())
    }

    /// Starts tracking flow `key` as opened by its sender with a first
    /// packet of `len` bytes. A flow tracked on the same ends is reported
    /// ended and replaced.
    pub fn insert(
        &mut self,
        key: FlowKey,
        opening: Opening,
        len: usize,
        now: Instant,
        log: &mut FlowLog,
    ) {
        let (slot, opened_from_low) = Slot::of(&key);
        let flow = Flow {
            origin: opening.origin,
            opened_from_low,
            verdict: opening.verdict,
            discriminator: opening.discriminator,
            seen: now,
            first: now,
            reported: now,
            next_report: now + FIRST_REPORT,
            announced: false,
            rule: opening.rule,
            to_dst: Traffic {
                packets: 1,
                bytes: len as u64,
            },
            to_src: Traffic::default(),
        };
        if let Some(tracked) = self.flows.get_mut(&slot) {
            log.push(slot.report(tracked, true));
            *tracked = flow;
        } else {
            while self.flows.len() >= self.capacity {
                if !self.pop_earliest(None, log) {
                    break;
                }
            }
            self.flows.insert(slot, flow);
            self.deadlines
                .push(Reverse((now + slot.idle_timeout(), slot)));
        }
        self.reports.push(Reverse((now + FIRST_REPORT, slot)));
        if self.reports.len() > 2 * self.flows.len() + 64 {
            let flows = &self.flows;
            self.reports.retain(|Reverse((due, slot))| {
                flows.get(slot).is_some_and(|flow| flow.next_report == *due)
            });
        }
    }

    /// Re-decides every peer-opened flow with `allowed`, given the key of
    /// the packet that opened it.
    pub fn recheck_inbound(&mut self, mut allowed: impl FnMut(&FlowKey) -> bool) {
        for (slot, flow) in &mut self.flows {
            if let Origin::Inbound { .. } = flow.origin {
                flow.origin = Origin::Inbound {
                    allowed: allowed(&slot.opener(flow.opened_from_low)),
                };
            }
        }
    }

    /// Forgets every flow that has one of `addresses` at either end,
    /// reporting each ended.
    pub fn forget_addresses(&mut self, addresses: &[IpAddr], log: &mut FlowLog) {
        let involved = |slot: &Slot| {
            let (low, high) = slot.addresses();
            addresses.contains(&low) || addresses.contains(&high)
        };
        self.flows.retain(|slot, flow| {
            let gone = involved(slot);
            if gone {
                log.push(slot.report(flow, true));
            }
            !gone
        });
        self.deadlines.retain(|Reverse((_, slot))| !involved(slot));
        self.reports.retain(|Reverse((_, slot))| !involved(slot));
    }

    /// Drops flows idle at `now`, reporting each ended, and reports the
    /// flows whose interim report is due.
    pub fn handle_timeout(&mut self, now: Instant, log: &mut FlowLog) {
        while self.pop_earliest(Some(now), log) {}
        while let Some(Reverse((due, slot))) = self.reports.peek().copied() {
            if due > now {
                break;
            }
            self.reports.pop();
            let Some(flow) = self.flows.get_mut(&slot) else {
                continue;
            };
            if flow.next_report != due {
                continue;
            }
            // A flow with nothing new since its last report waits for its end.
            if !flow.announced || flow.seen > flow.reported {
                log.push(slot.report(flow, false));
            }
            flow.announced = true;
            flow.reported = if due + ACTIVE_INTERVAL > now {
                due
            } else {
                now
            };
            flow.next_report = flow.reported + ACTIVE_INTERVAL;
            self.reports.push(Reverse((flow.next_report, slot)));
        }
    }

    /// When the next flow may go idle (possibly early; then nothing
    /// happens) or is due an interim report.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.deadlines.peek(), self.reports.peek()]
            .into_iter()
            .flatten()
            .map(|Reverse((at, _))| *at)
            .min()
    }

    /// Number of tracked flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no flow is tracked.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Forgets everything, reporting every flow ended.
    pub fn clear(&mut self, log: &mut FlowLog) {
        for (slot, flow) in self.flows.drain() {
            log.push(slot.report(&flow, true));
        }
        self.deadlines.clear();
        self.reports.clear();
    }

    /// Removes the flow with the earliest deadline, if that deadline is not
    /// after `until` (no bound: remove it regardless), reporting it ended.
    /// Returns whether one was removed.
    fn pop_earliest(&mut self, until: Option<Instant>, log: &mut FlowLog) -> bool {
        while let Some(Reverse((queued, slot))) = self.deadlines.peek().copied() {
            if until.is_some_and(|until| queued > until) {
                return false;
            }
            self.deadlines.pop();
            let Some(flow) = self.flows.get(&slot).copied() else {
                continue;
            };
            let deadline = flow.seen + slot.idle_timeout();
            if deadline > queued {
                // Refreshed since it was queued: queue it at its real deadline.
                self.deadlines.push(Reverse((deadline, slot)));
                continue;
            }
            self.flows.remove(&slot);
            log.push(slot.report(&flow, true));
            return true;
        }
        false
    }
}

impl Slot {
    /// The slot of the flow `key` belongs to, and whether `key`'s sender is
    /// the slot's low end.
    fn of(key: &FlowKey) -> (Self, bool) {
        let src: End = (address_bits(key.src), key.src_port, key.src.is_ipv6());
        let dst: End = (address_bits(key.dst), key.dst_port, key.dst.is_ipv6());
        let from_low = src <= dst;
        let (low, high) = if from_low { (src, dst) } else { (dst, src) };
        let families = u64::from(low.2) | u64::from(high.2) << 1;
        let slot = Self {
            low: low.0,
            high: high.0,
            rest: u64::from(low.1) << 48
                | u64::from(high.1) << 32
                | families << 16
                | u64::from(protocol_code(key.protocol)),
        };
        (slot, from_low)
    }

    /// The addresses of the low and the high end.
    fn addresses(&self) -> (IpAddr, IpAddr) {
        (
            address(self.low, self.rest & 1 << 16 != 0),
            address(self.high, self.rest & 2 << 16 != 0),
        )
    }

    fn low_port(&self) -> u16 {
        (self.rest >> 48) as u16
    }

    fn high_port(&self) -> u16 {
        (self.rest >> 32) as u16
    }

    fn protocol(&self) -> Protocol {
        match self.rest as u16 {
            TCP => Protocol::Tcp,
            UDP => Protocol::Udp,
            ICMP => Protocol::Icmp,
            number => Protocol::Other(number as u8),
        }
    }

    /// Which way a packet sent from the low end (`from_low`) or the high end
    /// travels on `flow`.
    fn direction(&self, from_low: bool, flow: &Flow) -> Direction {
        let families = (self.rest >> 16) & 3;
        let symmetric = self.low == self.high
            && self.low_port() == self.high_port()
            && (families == 0 || families == 3);
        if symmetric {
            Direction::Both
        } else if flow.opened_from_low == from_low {
            Direction::Opening
        } else {
            Direction::Answering
        }
    }

    /// The key of the packets sent from the low end (`from_low`) or the high end.
    fn opener(&self, from_low: bool) -> FlowKey {
        let (low, high) = self.addresses();
        let (src, src_port, dst, dst_port) = if from_low {
            (low, self.low_port(), high, self.high_port())
        } else {
            (high, self.high_port(), low, self.low_port())
        };
        FlowKey {
            protocol: self.protocol(),
            src,
            src_port,
            dst,
            dst_port,
        }
    }

    fn idle_timeout(&self) -> Duration {
        self.opener(true).idle_timeout()
    }

    /// What `flow` on this slot amounts to so far.
    fn report(&self, flow: &Flow, ended: bool) -> FlowReport {
        FlowReport {
            key: self.opener(flow.opened_from_low),
            discriminator: flow.discriminator,
            verdict: flow.verdict,
            rule: flow.rule,
            start: flow.first,
            end: flow.seen,
            to_dst: flow.to_dst,
            to_src: flow.to_src,
            ended,
            denied: None,
        }
    }
}

const TCP: u16 = 0x106;
const UDP: u16 = 0x111;
const ICMP: u16 = 0x101;

/// A protocol as a number of its own: the named protocols sit above every
/// [`Protocol::Other`] number, so no two protocols share one.
fn protocol_code(protocol: Protocol) -> u16 {
    match protocol {
        Protocol::Tcp => TCP,
        Protocol::Udp => UDP,
        Protocol::Icmp => ICMP,
        Protocol::Other(number) => u16::from(number),
    }
}

/// An address as an integer; the families bits of [`Slot::rest`] tell
/// the families apart.
fn address_bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address [`address_bits`] turned into `bits`.
fn address(bits: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(bits))
    } else {
        // IPv4 bits came from a `u32`, so nothing is cut off.
        IpAddr::V4(Ipv4Addr::from(bits as u32))
    }
}

impl Default for ConnTrack {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn opened_by(origin: Origin) -> Opening {
        Opening {
            origin,
            verdict: match origin {
                Origin::Outbound => FlowVerdict::Opened,
                Origin::Inbound { .. } => FlowVerdict::Accept,
            },
            rule: None,
            discriminator: 0,
        }
    }

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
        let start = crate::test_clock();
        let mut table = ConnTrack::new(16);
        let mut log = FlowLog::default();
        table.insert(key(1), opened_by(Origin::Outbound), 0, start, &mut log);
        table.insert(key(2), opened_by(Origin::Outbound), 0, start, &mut log);
        assert_eq!(table.poll_timeout(), Some(start + FIRST_REPORT));

        let later = start + UDP_IDLE / 2;
        assert!(table.touch(&key(2), later).is_some());
        table.handle_timeout(start + UDP_IDLE, &mut log);
        assert_eq!(table.origin(&key(1)), None);
        assert_eq!(table.origin(&key(2)), Some(Origin::Outbound));

        table.handle_timeout(later + UDP_IDLE, &mut log);
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
        let start = crate::test_clock();
        let mut table = ConnTrack::new(3);
        let mut log = FlowLog::default();
        for port in 1..=3 {
            table.insert(
                key(port),
                opened_by(Origin::Outbound),
                0,
                start + Duration::from_secs(u64::from(port)),
                &mut log,
            );
        }
        // Flow 1 was refreshed, so flow 2 is now the closest to expiry.
        table.touch(&key(1), start + Duration::from_secs(10));
        table.insert(
            key(4),
            opened_by(Origin::Outbound),
            0,
            start + Duration::from_secs(11),
            &mut log,
        );
        assert_eq!(table.len(), 3);
        assert_eq!(table.origin(&key(2)), None);
        for port in [1, 3, 4] {
            assert!(table.origin(&key(port)).is_some(), "flow {port} evicted");
        }
    }

    #[test]
    fn rechecking_marks_only_peer_opened_flows() {
        let now = crate::test_clock();
        let mut table = ConnTrack::new(16);
        let mut log = FlowLog::default();
        table.insert(key(1), opened_by(Origin::Outbound), 0, now, &mut log);
        table.insert(
            key(2),
            opened_by(Origin::Inbound { allowed: true }),
            0,
            now,
            &mut log,
        );
        table.insert(
            key(3),
            opened_by(Origin::Inbound { allowed: true }),
            0,
            now,
            &mut log,
        );
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
        let now = crate::test_clock();
        let mut table = ConnTrack::new(16);
        let mut log = FlowLog::default();
        table.insert(key(1), opened_by(Origin::Outbound), 0, now, &mut log);
        let mut elsewhere = key(2);
        elsewhere.dst = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 9));
        table.insert(elsewhere, opened_by(Origin::Outbound), 0, now, &mut log);
        table.forget_addresses(&[IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2))], &mut log);
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
            tcp_syn: false,
            tcp_isn: 0,
        };
        let request = FlowKey::of(&headers(a, b, false)).unwrap();
        let reply = FlowKey::of(&headers(b, a, true)).unwrap();
        let counter_request = FlowKey::of(&headers(b, a, false)).unwrap();
        assert_eq!(reply.reversed(), request);
        assert_ne!(counter_request.reversed(), request);
    }

    #[test]
    fn both_directions_of_a_flow_share_one_entry() {
        let now = crate::test_clock();
        let mut table = ConnTrack::new(16);
        let mut log = FlowLog::default();
        let opening = key(1);
        let answering = opening.reversed();
        table.insert(opening, opened_by(Origin::Outbound), 0, now, &mut log);
        assert_eq!(table.len(), 1);
        assert_eq!(table.origin(&answering), None, "answers open nothing");
        let flow = table.probe(&answering).unwrap();
        assert_eq!(flow.direction(), Direction::Answering);
        assert_eq!(flow.origin(), Origin::Outbound);
        assert_eq!(
            table.probe(&opening).unwrap().direction(),
            Direction::Opening
        );
        // Re-opening from the other side replaces the flow, never adds one.
        table.insert(
            answering,
            opened_by(Origin::Inbound { allowed: true }),
            0,
            now,
            &mut log,
        );
        assert_eq!(table.len(), 1);
        assert_eq!(
            table.probe(&opening).unwrap().direction(),
            Direction::Answering
        );
    }

    #[test]
    fn a_flow_between_identical_ends_reads_the_same_both_ways() {
        let now = crate::test_clock();
        let mut table = ConnTrack::new(16);
        let mut log = FlowLog::default();
        let mut looped = key(53);
        looped.dst = looped.src;
        assert_eq!(looped.reversed(), looped);
        table.insert(looped, opened_by(Origin::Outbound), 0, now, &mut log);
        let flow = table.probe(&looped).unwrap();
        assert!(flow.direction().opens() && flow.direction().answers());
    }

    #[test]
    fn probing_refreshes_only_when_asked() {
        let start = crate::test_clock();
        let mut table = ConnTrack::new(16);
        let mut log = FlowLog::default();
        table.insert(key(1), opened_by(Origin::Outbound), 0, start, &mut log);
        let later = start + UDP_IDLE / 2;
        assert!(table.probe(&key(1).reversed()).is_some());
        table.handle_timeout(start + UDP_IDLE, &mut log);
        assert!(table.is_empty(), "a probe alone keeps nothing alive");

        table.insert(key(1), opened_by(Origin::Outbound), 0, start, &mut log);
        table.probe(&key(1).reversed()).unwrap().refresh(later);
        table.handle_timeout(start + UDP_IDLE, &mut log);
        assert_eq!(table.origin(&key(1)), Some(Origin::Outbound));
    }

    fn drain(log: &mut FlowLog) -> Vec<FlowReport> {
        std::iter::from_fn(|| log.poll()).collect()
    }

    #[test]
    fn long_flows_are_reported_every_active_interval_while_they_have_traffic() {
        let start = crate::test_clock();
        let mut table = ConnTrack::new(16);
        let mut log = FlowLog::default();
        let mut tcp = key(1);
        tcp.protocol = Protocol::Tcp;
        table.insert(tcp, opened_by(Origin::Outbound), 100, start, &mut log);
        // The first report comes soon after the opening packet, whatever
        // followed it.
        let first = start + FIRST_REPORT;
        assert_eq!(table.poll_timeout(), Some(first));
        table.handle_timeout(first, &mut log);
        let got = drain(&mut log);
        assert!(
            matches!(got.as_slice(), [r] if !r.ended && r.to_dst.packets == 1 && r.to_src.packets == 0),
            "{got:?}"
        );
        let mut now = first;
        for _ in 0..3 {
            now += Duration::from_secs(20);
            table.probe(&tcp.reversed()).unwrap().pass(50, now);
        }
        assert_eq!(table.poll_timeout(), Some(first + ACTIVE_INTERVAL));
        table.handle_timeout(first + ACTIVE_INTERVAL, &mut log);
        let got = drain(&mut log);
        let [interim] = got.as_slice() else {
            panic!("{got:?}")
        };
        assert!(!interim.ended);
        assert_eq!((interim.start, interim.end), (start, now));
        assert_eq!((interim.to_dst.packets, interim.to_src.packets), (1, 3));
        assert_eq!(interim.to_src.bytes, 150);

        // Nothing new in the next interval: no report until it ends.
        table.handle_timeout(first + 2 * ACTIVE_INTERVAL, &mut log);
        assert!(drain(&mut log).is_empty());
        table.handle_timeout(now + TCP_IDLE, &mut log);
        let got = drain(&mut log);
        assert!(
            matches!(got.as_slice(), [last] if last.ended && last.to_src.packets == 3),
            "{got:?}"
        );
        assert!(table.is_empty());
        assert_eq!(table.poll_timeout(), None);
    }

    #[test]
    fn evicted_replaced_and_forgotten_flows_are_reported_ended() {
        let now = crate::test_clock();
        let mut table = ConnTrack::new(2);
        let mut log = FlowLog::default();
        table.insert(key(1), opened_by(Origin::Outbound), 10, now, &mut log);
        table.insert(key(2), opened_by(Origin::Outbound), 20, now, &mut log);
        table.insert(key(3), opened_by(Origin::Outbound), 30, now, &mut log);
        let evicted = drain(&mut log);
        assert!(
            matches!(evicted.as_slice(), [r] if r.ended && r.key.src_port <= 2),
            "{evicted:?}"
        );
        table.insert(
            key(3).reversed(),
            opened_by(Origin::Inbound { allowed: true }),
            40,
            now,
            &mut log,
        );
        let replaced = drain(&mut log);
        assert!(
            matches!(replaced.as_slice(), [r] if r.key == key(3) && r.verdict == FlowVerdict::Opened && r.to_dst.bytes == 30),
            "{replaced:?}"
        );
        table.forget_addresses(&[IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2))], &mut log);
        assert_eq!(drain(&mut log).len(), 2);
        assert!(table.is_empty());
    }

    #[test]
    fn the_report_heap_stays_bounded_under_churn() {
        let now = crate::test_clock();
        let mut table = ConnTrack::new(4);
        let mut log = FlowLog::default();
        for port in 0..10_000 {
            table.insert(key(port), opened_by(Origin::Outbound), 1, now, &mut log);
        }
        assert!(table.reports.len() <= 2 * table.len() + 65);
        assert_eq!(log.stats().recorded + log.stats().dropped, 10_000 - 4);
    }

    fn any_key() -> impl Strategy<Value = FlowKey> {
        let addr = prop_oneof![
            (0..3u8).prop_map(|n| IpAddr::V4(Ipv4Addr::new(100, 64, 0, n))),
            (0..3u16).prop_map(|n| IpAddr::V6(Ipv6Addr::new(0xfd7a, 0, 0, 0, 0, 0, 0, n))),
            // The IPv4-mapped twin of an IPv4 address is another address.
            (0..3u8).prop_map(|n| IpAddr::V6(Ipv4Addr::new(100, 64, 0, n).to_ipv6_mapped())),
        ];
        let protocol = prop_oneof![
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Icmp),
            any::<u8>().prop_map(Protocol::Other),
        ];
        (protocol, addr.clone(), 0..3u16, addr, 0..3u16).prop_map(
            |(protocol, src, src_port, dst, dst_port)| FlowKey {
                protocol,
                src,
                src_port,
                dst,
                dst_port,
            },
        )
    }

    proptest! {
        /// A flow is found from its opening key and from the reversed key,
        /// in the right direction, and from no other key.
        #[test]
        fn flows_are_found_from_either_direction_only(
            opened in any_key(),
            other in any_key(),
        ) {
            let now = crate::test_clock();
            let mut table = ConnTrack::new(16);
            let mut log = FlowLog::default();
            table.insert(opened, opened_by(Origin::Outbound), 0, now, &mut log);
            let symmetric = opened == opened.reversed();
            let direction = table.probe(&opened).map(|flow| flow.direction());
            prop_assert_eq!(
                direction,
                Some(if symmetric { Direction::Both } else { Direction::Opening })
            );
            let direction = table.probe(&opened.reversed()).map(|flow| flow.direction());
            prop_assert_eq!(
                direction,
                Some(if symmetric { Direction::Both } else { Direction::Answering })
            );
            let mut opener = None;
            table.recheck_inbound(|key| {
                opener = Some(*key);
                true
            });
            prop_assert_eq!(opener, None, "outbound flows are not rechecked");
            if other != opened && other != opened.reversed() {
                prop_assert!(table.probe(&other).is_none());
            }
        }

        /// Rechecking hands over the key of the packet that opened the flow.
        #[test]
        fn rechecks_see_the_opening_key(opened in any_key()) {
            let now = crate::test_clock();
            let mut table = ConnTrack::new(16);
            let mut log = FlowLog::default();
            table.insert(opened, opened_by(Origin::Inbound { allowed: true }), 0, now, &mut log);
            let mut seen = Vec::new();
            table.recheck_inbound(|key| {
                seen.push(*key);
                false
            });
            prop_assert_eq!(seen, vec![opened]);
            prop_assert_eq!(
                table.origin(&opened),
                Some(Origin::Inbound { allowed: false })
            );
        }
    }
}
