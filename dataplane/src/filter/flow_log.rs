//! The flow log: what the filter reports about flows, in a bounded queue
//! the shell drains ([`crate::core::Node::poll_flow_report`]).
//!
//! Tracked flows are reported [`FIRST_REPORT`] after they open, every
//! [`ACTIVE_INTERVAL`] while they last, and when they end
//! ([`super::ConnTrack`] does that). Denied packets
//! open no flow: they are summed here per source, destination, protocol,
//! destination port and deciding rule, and each sum is reported once per
//! [`SUMMARY_INTERVAL`]. Nothing waits: a full queue or summary table
//! counts what it could not keep.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use weft_proto::flows::MAX_SUMMARY_IDS;
use weft_proto::{FlowVerdict, Protocol, RuleRef, Traffic};

use super::conntrack::FlowKey;

/// How soon after its first packet a flow is first reported (`ended:
/// false`): a connection shows within seconds, not when it ends, with the
/// packets of its first second (a handshake, usually) counted.
pub const FIRST_REPORT: Duration = Duration::from_secs(1);
/// How often a flow that is still open is reported again, when it had
/// traffic since its last report.
pub const ACTIVE_INTERVAL: Duration = Duration::from_secs(60);
/// How long denied packets are summed before their summaries are
/// reported: short enough that a denial shows within seconds.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);
/// Reports the queue holds before it drops new ones.
pub const QUEUE_CAPACITY: usize = 4096;
/// Denial summaries one interval holds; denied packets of further
/// summaries are dropped and counted.
pub const MAX_DENIALS: usize = 1024;

/// Bits of the sketch that counts distinct denied flows past the samples.
const SKETCH_BITS: usize = 512;

/// One flow as this node saw it, or a summary of denied flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowReport {
    /// The flow as its opener sent it: `src` opened it. For a summary,
    /// the first denied flow's.
    pub key: FlowKey,
    /// The initial sequence number of the SYN that opened a TCP flow; 0
    /// for other flows and for TCP flows first seen mid-connection.
    pub discriminator: u32,
    /// What the filter decided; [`FlowVerdict::Opened`] for flows this
    /// node opened.
    pub verdict: FlowVerdict,
    /// The rule that decided, if one did.
    pub rule: Option<RuleRef>,
    /// The flow's first packet (a summary's first denied packet).
    pub start: Instant,
    /// Its last packet so far.
    pub end: Instant,
    /// Packets and bytes from the opener (denied ones, for a summary).
    pub to_dst: Traffic,
    /// Packets and bytes back to the opener.
    pub to_src: Traffic,
    /// Whether the flow is over; `false` for an interim report.
    pub ended: bool,
    /// Set for a summary of denied flows.
    pub denied: Option<DeniedFlows>,
}

/// The denied flows one summary stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeniedFlows {
    /// How many distinct flows: exact up to [`MAX_SUMMARY_IDS`], an
    /// estimate (never above the packets) beyond.
    pub flows: u64,
    /// Source port and discriminator of up to [`MAX_SUMMARY_IDS`] distinct
    /// flows, the report's own first.
    pub samples: Vec<(u16, u32)>,
}

/// The flow log's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowLogStats {
    /// Reports queued since the node started.
    pub recorded: u64,
    /// Reports lost because the queue was full, plus denied packets the
    /// summary table had no room for.
    pub dropped: u64,
    /// Reports waiting to be drained.
    pub queued: u64,
}

/// The bounded queue of reports and this interval's denial summaries.
#[derive(Debug, Default)]
pub struct FlowLog {
    queue: VecDeque<FlowReport>,
    recorded: u64,
    dropped: u64,
    /// Keyed with a random seed: keys come from the network.
    denials: AHashMap<DenialKey, Denials>,
    /// When this interval's summaries are reported, once a packet was denied.
    summary_due: Option<Instant>,
}

/// What one summary groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct DenialKey {
    protocol: Protocol,
    src: IpAddr,
    dst: IpAddr,
    dst_port: u16,
    rule: Option<RuleRef>,
}

/// One summary being summed.
#[derive(Debug, Clone)]
struct Denials {
    start: Instant,
    end: Instant,
    traffic: Traffic,
    samples: [(u16, u32); MAX_SUMMARY_IDS],
    sampled: usize,
    /// Linear-counting sketch of the distinct flows.
    sketch: [u64; SKETCH_BITS / 64],
}

impl Denials {
    fn new(now: Instant) -> Self {
        Self {
            start: now,
            end: now,
            traffic: Traffic::default(),
            samples: [(0, 0); MAX_SUMMARY_IDS],
            sampled: 0,
            sketch: [0; SKETCH_BITS / 64],
        }
    }

    fn add(&mut self, flow: (u16, u32), len: usize, now: Instant) {
        self.end = now;
        self.traffic.packets += 1;
        self.traffic.bytes += len as u64;
        // A multiplicative mix picks the sketch bit: cheap, and spread
        // enough for counting (it guards nothing).
        let mixed = (u64::from(flow.0) << 32 | u64::from(flow.1))
            .wrapping_add(1)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let bit = (mixed >> (64 - SKETCH_BITS.trailing_zeros())) as usize;
        self.sketch[bit / 64] |= 1 << (bit % 64);
        if self.sampled < MAX_SUMMARY_IDS && !self.samples[..self.sampled].contains(&flow) {
            self.samples[self.sampled] = flow;
            self.sampled += 1;
        }
    }

    fn flows(&self) -> u64 {
        if self.sampled < MAX_SUMMARY_IDS {
            return self.sampled as u64;
        }
        let set: u32 = self.sketch.iter().map(|word| word.count_ones()).sum();
        let bits = SKETCH_BITS as f64;
        let zeros = (SKETCH_BITS as f64 - f64::from(set)).max(1.0);
        let estimate = (-bits * (zeros / bits).ln()).round() as u64;
        estimate.max(self.sampled as u64).min(self.traffic.packets)
    }

    fn report(self, key: DenialKey) -> FlowReport {
        let (src_port, discriminator) = self.samples[0];
        let flows = self.flows();
        FlowReport {
            key: FlowKey {
                protocol: key.protocol,
                src: key.src,
                src_port,
                dst: key.dst,
                dst_port: key.dst_port,
            },
            discriminator,
            verdict: FlowVerdict::Deny,
            rule: key.rule,
            start: self.start,
            end: self.end,
            to_dst: self.traffic,
            to_src: Traffic::default(),
            ended: true,
            denied: Some(DeniedFlows {
                flows,
                samples: self.samples[..self.sampled].to_vec(),
            }),
        }
    }
}

impl FlowLog {
    /// Queues `report`, or counts it dropped when the queue is full.
    pub(crate) fn push(&mut self, report: FlowReport) {
        if self.queue.len() >= QUEUE_CAPACITY {
            self.dropped += 1;
            return;
        }
        self.recorded += 1;
        self.queue.push_back(report);
    }

    /// Counts a denied packet of `len` bytes into its summary. `key` is
    /// the packet's flow as its sender opened it (ports 0 where it has
    /// none), `discriminator` as for [`FlowReport::discriminator`].
    pub(crate) fn deny(
        &mut self,
        key: &FlowKey,
        discriminator: u32,
        rule: Option<RuleRef>,
        len: usize,
        now: Instant,
    ) {
        let group = DenialKey {
            protocol: key.protocol,
            src: key.src,
            dst: key.dst,
            dst_port: key.dst_port,
            rule,
        };
        let full = self.denials.len() >= MAX_DENIALS;
        let denials = match self.denials.get_mut(&group) {
            Some(denials) => denials,
            None if full => {
                self.dropped += 1;
                return;
            }
            None => self
                .denials
                .entry(group)
                .or_insert_with(|| Denials::new(now)),
        };
        denials.add((key.src_port, discriminator), len, now);
        self.summary_due.get_or_insert(now + SUMMARY_INTERVAL);
    }

    /// Reports this interval's summaries once it is over.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.summary_due.is_some_and(|due| due <= now) {
            self.flush();
        }
    }

    /// Reports this interval's summaries now.
    pub(crate) fn flush(&mut self) {
        self.summary_due = None;
        let mut reports: Vec<FlowReport> = self
            .denials
            .drain()
            .map(|(key, denials)| denials.report(key))
            .collect();
        // The table's order is random; reports come in the order of time.
        reports.sort_by(|a, b| {
            let rule = |r: &FlowReport| r.rule.map(|rule| (rule.line, rule.id));
            (a.start, a.key, rule(a)).cmp(&(b.start, b.key, rule(b)))
        });
        for report in reports {
            self.push(report);
        }
    }

    /// When this interval's summaries are due.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.summary_due
    }

    /// The oldest report.
    pub(crate) fn poll(&mut self) -> Option<FlowReport> {
        self.queue.pop_front()
    }

    /// The counters.
    pub(crate) fn stats(&self) -> FlowLogStats {
        FlowLogStats {
            recorded: self.recorded,
            dropped: self.dropped,
            queued: self.queue.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2));
    const ME: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1));

    fn key(src_port: u16, dst_port: u16) -> FlowKey {
        FlowKey {
            protocol: Protocol::Tcp,
            src: PEER,
            src_port,
            dst: ME,
            dst_port,
        }
    }

    fn drain(log: &mut FlowLog) -> Vec<FlowReport> {
        std::iter::from_fn(|| log.poll()).collect()
    }

    #[test]
    fn denials_are_summed_per_port_and_rule_once_per_interval() {
        let start = crate::test_clock();
        let mut log = FlowLog::default();
        let rule = Some(RuleRef {
            line: 4,
            id: weft_proto::RuleId(9),
        });
        // One connection retried three times, another, and one to another port.
        for _ in 0..3 {
            log.deny(&key(40000, 22), 7, rule, 60, start);
        }
        let later = start + Duration::from_secs(2);
        log.deny(&key(40001, 22), 8, rule, 60, later);
        log.deny(&key(40002, 23), 9, rule, 60, later);
        log.deny(&key(40003, 22), 10, None, 60, later);
        assert_eq!(log.poll_timeout(), Some(start + SUMMARY_INTERVAL));
        log.handle_timeout(start + SUMMARY_INTERVAL - Duration::from_millis(1));
        assert!(drain(&mut log).is_empty());

        log.handle_timeout(start + SUMMARY_INTERVAL);
        assert_eq!(log.poll_timeout(), None);
        let got = drain(&mut log);
        assert_eq!(got.len(), 3, "{got:?}");
        let ssh = &got[0];
        assert_eq!((ssh.key.dst_port, ssh.rule), (22, rule));
        assert_eq!((ssh.key.src_port, ssh.discriminator), (40000, 7));
        assert_eq!((ssh.start, ssh.end), (start, later));
        assert_eq!(ssh.to_dst.packets, 4);
        assert_eq!(ssh.to_dst.bytes, 240);
        assert_eq!(
            ssh.denied,
            Some(DeniedFlows {
                flows: 2,
                samples: vec![(40000, 7), (40001, 8)],
            })
        );
        assert!(got
            .iter()
            .all(|r| r.ended && r.verdict == FlowVerdict::Deny));
    }

    #[test]
    fn a_scan_keeps_a_bounded_sample_and_an_estimate_of_its_flows() {
        let now = crate::test_clock();
        let mut log = FlowLog::default();
        for port in 0..2000u16 {
            log.deny(&key(port, 22), u32::from(port) * 7919, None, 40, now);
        }
        log.handle_timeout(now + SUMMARY_INTERVAL);
        let got = drain(&mut log);
        let denied = got[0].denied.as_ref().unwrap();
        assert_eq!(denied.samples.len(), MAX_SUMMARY_IDS);
        // Linear counting with 512 bits is within a few percent here.
        assert!(
            (1500..=2000).contains(&denied.flows),
            "estimated {} flows",
            denied.flows
        );
    }

    #[test]
    fn a_full_queue_or_summary_table_counts_what_it_drops() {
        let now = crate::test_clock();
        let mut log = FlowLog::default();
        for port in 0..(MAX_DENIALS + 5) {
            log.deny(&key(1, port as u16), 0, None, 40, now);
        }
        assert_eq!(log.stats().dropped, 5);
        log.handle_timeout(now + SUMMARY_INTERVAL);
        for port in 0..QUEUE_CAPACITY {
            log.deny(&key(1, port as u16), 0, None, 40, now);
            log.flush();
        }
        let stats = log.stats();
        assert_eq!(stats.queued, QUEUE_CAPACITY as u64);
        assert_eq!(stats.recorded, QUEUE_CAPACITY as u64);
        assert_eq!(stats.dropped, 5 + MAX_DENIALS as u64);
    }
}
