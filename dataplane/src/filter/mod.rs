//! weft's inbound packet filter: stateful, default deny, with deny rules and
//! audit mode.
//!
//! Packets from the tunnel are decided in this order (the precedence
//! documented on [`weft_proto::PacketFilter`]): return traffic of a flow this
//! node opened passes; a matching deny rule drops; a matching audit-mode deny
//! rule passes and is logged as a would-be denial; a matching accept rule
//! passes; otherwise the filter's default decides (drop, or pass and log
//! when the whole policy is in audit mode). Packets this node sends are never
//! filtered (each destination enforces its own inbound policy); they only
//! open flows.
//!
//! So when A may reach B but B may not reach A, A's connections to B work
//! both ways while a connection B opens to A is dropped at A.
//!
//! Would-be denials are logged at INFO on the `weft::audit` target once per
//! new flow, with addresses and ports only; enforced denials are counted and
//! logged at TRACE, never at a per-packet rate above it.
//!
//! Every flow the filter admits or this node opens is reported to the flow
//! log ([`FlowLog`]) with its traffic and deciding rule, and denied packets
//! are summed into per-interval summaries there.

mod conntrack;
mod flow_log;
mod packet;
mod rules;

#[cfg(test)]
pub(crate) mod test_packets;

use std::net::IpAddr;
use std::time::Instant;

use weft_proto::{DefaultAction, FlowVerdict, PacketFilter, Protocol, RuleRef};

pub use conntrack::{
    ConnTrack, Direction, FlowKey, Opening, Origin, Probe, DEFAULT_CAPACITY, ICMP_IDLE, TCP_IDLE,
    UDP_IDLE,
};
pub use flow_log::{
    DeniedFlows, FlowLog, FlowLogStats, FlowReport, ACTIVE_INTERVAL, FIRST_REPORT, MAX_DENIALS,
    QUEUE_CAPACITY, SUMMARY_INTERVAL,
};
pub use packet::{parse, Headers, ParseError, Transport};
pub use rules::{Decided, Decision, Filter, Query};

/// The rules plus the connection-tracking table: one node's filter state.
///
/// Non-first IPv4 and IPv6 fragments carry no ports, so they match no tracked
/// flow: an accept rule admits them only when it admits every port
/// ([`weft_proto::PortRange::ANY`]) of their protocol between their
/// addresses, and any deny rule between those addresses drops them. ICMP
/// errors are matched by the rules alone, not related to the flow they
/// report on.
#[derive(Debug, Default)]
pub struct Firewall {
    filter: Filter,
    conntrack: ConnTrack,
    log: FlowLog,
}

/// The decision on one inbound packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it.
    Accept(Admission),
    /// Drop it.
    Drop(Denial),
}

/// Why an inbound packet was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// It answers a flow this node opened.
    Return,
    /// It belongs to a peer-opened flow the rules still admit.
    Established,
    /// An accept rule admitted it; it opens a flow.
    Rule {
        /// The policy line of the rule.
        line: u32,
    },
    /// A deny rule in audit mode (`line`), or the audit-mode default
    /// (`None`), would have dropped it; it passes and opens a flow.
    Audit {
        /// The policy line of the audit rule, if a rule matched.
        line: Option<u32>,
    },
}

/// Why an inbound packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No rule admits it and it answers no flow of this node's.
    NoRule,
    /// A deny rule drops it.
    Denied {
        /// The policy line of the deny rule.
        line: u32,
    },
    /// Its flow was admitted once, but the current rules no longer admit it.
    Revoked,
}

impl Firewall {
    /// A filter that admits nothing but return traffic, tracking at most
    /// `capacity` flows.
    pub fn new(capacity: usize) -> Self {
        Self {
            filter: Filter::default(),
            conntrack: ConnTrack::new(capacity),
            log: FlowLog::default(),
        }
    }

    /// Replaces the filter. Peer-opened flows are re-checked against the new
    /// one, so removing an accept or adding a deny also cuts the flows the
    /// old filter admitted (and a new audit rule lets them go on).
    pub fn set_filter(&mut self, filter: &PacketFilter) {
        self.filter = Filter::new(filter);
        let filter = &self.filter;
        self.conntrack
            .recheck_inbound(|key| filter.evaluate(&query(key)).admits());
    }

    /// Records a packet of `len` bytes this node sends, so its answers are
    /// admitted.
    ///
    /// A packet on a tracked flow only keeps that flow alive, whoever opened
    /// it (so answering a peer-opened flow never turns it into one this node
    /// opened); an echo reply opens nothing, and of TCP only a SYN opens a flow.
    pub fn outbound(&mut self, headers: &Headers, len: usize, now: Instant) {
        let Some(key) = FlowKey::of(headers) else {
            return;
        };
        if let Some(mut flow) = self.conntrack.probe(&key) {
            flow.pass(len, now);
            return;
        }
        // Only a request opens a flow: an echo reply or a TCP segment of a
        // connection this node does not track (a peer's connection whose
        // entry expired after its rule was revoked, or one from before a
        // restart) must not turn the peer's side into return traffic.
        let opens = match (headers.protocol, headers.transport) {
            (_, Transport::Echo { reply: true, .. }) => false,
            (Protocol::Tcp, _) => headers.tcp_syn,
            _ => true,
        };
        if opens {
            let opening = Opening {
                origin: Origin::Outbound,
                verdict: FlowVerdict::Opened,
                rule: None,
                discriminator: headers.tcp_isn,
            };
            self.conntrack.insert(key, opening, len, now, &mut self.log);
        }
    }

    /// Decides on a packet of `len` bytes arriving from the tunnel.
    pub fn inbound(&mut self, headers: &Headers, len: usize, now: Instant) -> Verdict {
        let key = FlowKey::of(headers);
        if let Some((key, flow)) = key.and_then(|key| Some((key, self.conntrack.probe(&key)?))) {
            match tracked(flow, len, now) {
                Tracked::Decided(verdict) => return verdict,
                Tracked::Revoked { discriminator } => {
                    // The rule that now refuses the flow, or the default.
                    let rule = self.filter.decide(&query(&key)).rule;
                    self.log.deny(&key, discriminator, rule, len, now);
                    return Verdict::Drop(Denial::Revoked);
                }
                Tracked::Undecided => {}
            }
        }
        let dst_port = match headers.transport {
            Transport::Ports { dst, .. } => Some(dst),
            _ => None,
        };
        let query = Query {
            protocol: headers.protocol,
            src: headers.src,
            dst: headers.dst,
            dst_port,
        };
        let decided = self.filter.decide(&query);
        let (admission, verdict) = match decided.decision {
            Decision::Accept { policy_line } => {
                (Admission::Rule { line: policy_line }, FlowVerdict::Accept)
            }
            Decision::AuditDeny { policy_line } => (
                Admission::Audit {
                    line: Some(policy_line),
                },
                FlowVerdict::AuditDeny,
            ),
            Decision::Default(DefaultAction::AuditDeny) => {
                (Admission::Audit { line: None }, FlowVerdict::AuditDeny)
            }
            Decision::Deny { policy_line } => {
                self.deny(headers, key, decided.rule, len, now);
                return Verdict::Drop(Denial::Denied { line: policy_line });
            }
            Decision::Default(DefaultAction::Deny) => {
                self.deny(headers, key, None, len, now);
                return Verdict::Drop(Denial::NoRule);
            }
        };
        if let Admission::Audit { line } = admission {
            log_would_deny(headers, key.is_some(), line);
        }
        if let Some(key) = key {
            let opening = Opening {
                origin: Origin::Inbound { allowed: true },
                verdict,
                rule: decided.rule,
                discriminator: headers.tcp_isn,
            };
            self.conntrack.insert(key, opening, len, now, &mut self.log);
        }
        Verdict::Accept(admission)
    }

    /// Sums a denied packet into its summary.
    fn deny(
        &mut self,
        headers: &Headers,
        key: Option<FlowKey>,
        rule: Option<RuleRef>,
        len: usize,
        now: Instant,
    ) {
        let key = key.unwrap_or_else(|| portless(headers));
        self.log.deny(&key, headers.tcp_isn, rule, len, now);
    }

    /// Forgets flows involving `addresses` (a peer left: its addresses may be
    /// handed to another node, which must not inherit its flows), reporting
    /// them ended.
    pub fn forget_addresses(&mut self, addresses: &[IpAddr]) {
        self.conntrack.forget_addresses(addresses, &mut self.log);
    }

    /// Expires idle flows and reports what is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.conntrack.handle_timeout(now, &mut self.log);
        self.log.handle_timeout(now);
    }

    /// When [`Firewall::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.conntrack.poll_timeout(), self.log.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    /// The oldest flow report not yet taken.
    pub fn poll_report(&mut self) -> Option<FlowReport> {
        self.log.poll()
    }

    /// The flow log's counters.
    pub fn log_stats(&self) -> FlowLogStats {
        self.log.stats()
    }

    /// Number of tracked flows.
    pub fn flows(&self) -> usize {
        self.conntrack.len()
    }

    /// Forgets the filter (deny all) and every flow, reporting them ended
    /// along with the denials summed so far.
    pub fn clear(&mut self) {
        self.filter = Filter::default();
        self.conntrack.clear(&mut self.log);
        self.log.flush();
    }
}

/// What the tracked flow of an inbound packet says about it.
enum Tracked {
    /// Admitted (and counted on the flow).
    Decided(Verdict),
    /// The flow's rule was revoked: drop it.
    Revoked {
        /// The flow's discriminator, for the denial summary.
        discriminator: u32,
    },
    /// The rules must decide.
    Undecided,
}

/// What to do with an inbound packet of `len` bytes on the tracked `flow`,
/// counting and refreshing the flow when it admits the packet.
#[inline]
fn tracked(mut flow: Probe<'_>, len: usize, now: Instant) -> Tracked {
    let direction = flow.direction();
    let verdict = match flow.origin() {
        Origin::Outbound if direction.answers() => Verdict::Accept(Admission::Return),
        Origin::Inbound { allowed: true } if direction.opens() => {
            Verdict::Accept(Admission::Established)
        }
        Origin::Inbound { allowed: false } if direction.opens() => {
            return Tracked::Revoked {
                discriminator: flow.discriminator(),
            }
        }
        // The peer sends the way this node did (with the peer's addresses
        // and ports), or answers its own flow: nothing to answer, so the
        // rules decide.
        Origin::Outbound | Origin::Inbound { .. } => return Tracked::Undecided,
    };
    flow.pass(len, now);
    Tracked::Decided(verdict)
}

/// The flow key of a packet that has none (a fragment, an ICMP error), for
/// its denial summary: its addresses and protocol, its destination port
/// when it shows one.
fn portless(headers: &Headers) -> FlowKey {
    FlowKey {
        protocol: headers.protocol,
        src: headers.src,
        src_port: 0,
        dst: headers.dst,
        dst_port: match headers.transport {
            Transport::Ports { dst, .. } => dst,
            _ => 0,
        },
    }
}

/// Logs a packet that passes only because the policy is in audit mode: once
/// per flow (`opens_flow`) at INFO, or at TRACE for packets that belong to no
/// flow (fragments, ICMP errors), which would otherwise log at packet rate.
fn log_would_deny(headers: &Headers, opens_flow: bool, line: Option<u32>) {
    let (src_port, dst_port) = match headers.transport {
        Transport::Ports { src, dst } => (src, dst),
        _ => (0, 0),
    };
    let proto = protocol_name(headers.protocol);
    let src = std::net::SocketAddr::new(headers.src, src_port);
    let dst = std::net::SocketAddr::new(headers.dst, dst_port);
    let rule = line.map_or_else(|| "default".to_owned(), |l| format!("line {l}"));
    if opens_flow {
        tracing::info!(target: "weft::audit", %proto, %src, %dst, policy = %rule, "would deny");
    } else {
        tracing::trace!(target: "weft::audit", %proto, %src, %dst, policy = %rule, "would deny");
    }
}

fn protocol_name(protocol: weft_proto::Protocol) -> std::borrow::Cow<'static, str> {
    use weft_proto::Protocol;
    match protocol {
        Protocol::Tcp => "tcp".into(),
        Protocol::Udp => "udp".into(),
        Protocol::Icmp => "icmp".into(),
        Protocol::Other(n) => format!("proto-{n}").into(),
    }
}

/// The rule query a tracked peer-opened flow stands for.
fn query(key: &FlowKey) -> Query {
    use weft_proto::Protocol;
    let dst_port = match key.protocol {
        Protocol::Tcp | Protocol::Udp => Some(key.dst_port),
        Protocol::Icmp | Protocol::Other(_) => None,
    };
    Query {
        protocol: key.protocol,
        src: key.src,
        dst: key.dst,
        dst_port,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    use ipnet::IpNet;
    use proptest::prelude::*;
    use weft_proto::{FilterRule, PortRange, Protocol, RuleAction};

    use super::test_packets::{self, ACK, SYN};
    use super::*;

    const ME: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1));
    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2));

    fn headers(packet: &[u8]) -> Headers {
        parse(packet).unwrap()
    }

    fn allow(src: IpAddr, dst: IpAddr, ports: &[(u16, u16)], protocols: &[Protocol]) -> FilterRule {
        FilterRule {
            src: vec![IpNet::from(src)],
            dst: vec![IpNet::from(dst)],
            ports: ports
                .iter()
                .map(|&(first, last)| PortRange { first, last })
                .collect(),
            protocols: protocols.to_vec(),
            policy_line: 1,
            rule_id: weft_proto::RuleId::default(),
            action: RuleAction::Accept,
        }
    }

    fn admitted(verdict: Verdict) -> bool {
        matches!(verdict, Verdict::Accept(_))
    }

    fn enforcing(rules: &[FilterRule]) -> PacketFilter {
        PacketFilter {
            rules: rules.to_vec(),
            default: DefaultAction::Deny,
        }
    }

    fn with(action: RuleAction, line: u32, rule: FilterRule) -> FilterRule {
        FilterRule {
            action,
            policy_line: line,
            ..rule
        }
    }

    #[test]
    fn a_deny_rule_overrides_an_accept_but_not_return_traffic() {
        let now = crate::test_clock();
        let mut fw = Firewall::default();
        fw.set_filter(&enforcing(&[
            allow(PEER, ME, &[(0, 65535)], &[]),
            with(
                RuleAction::Deny,
                9,
                allow(PEER, ME, &[(22, 22)], &[Protocol::Tcp]),
            ),
        ]));
        let ssh = headers(&test_packets::tcp(PEER, 50000, ME, 22, SYN));
        assert_eq!(
            fw.inbound(&ssh, 100, now),
            Verdict::Drop(Denial::Denied { line: 9 })
        );
        let web = headers(&test_packets::tcp(PEER, 50000, ME, 80, SYN));
        assert_eq!(
            fw.inbound(&web, 100, now),
            Verdict::Accept(Admission::Rule { line: 1 })
        );
        fw.outbound(
            &headers(&test_packets::tcp(ME, 40000, PEER, 22, SYN)),
            100,
            now,
        );
        let answer = headers(&test_packets::tcp(PEER, 22, ME, 40000, SYN | ACK));
        assert_eq!(
            fw.inbound(&answer, 100, now),
            Verdict::Accept(Admission::Return)
        );
    }

    #[test]
    fn audit_rules_and_audit_default_pass_and_say_so_once_per_flow() {
        let now = crate::test_clock();
        let mut fw = Firewall::default();
        fw.set_filter(&enforcing(&[
            allow(PEER, ME, &[(0, 65535)], &[]),
            with(
                RuleAction::AuditDeny,
                4,
                allow(PEER, ME, &[(22, 22)], &[Protocol::Tcp]),
            ),
        ]));
        let syn = headers(&test_packets::tcp(PEER, 50000, ME, 22, SYN));
        assert_eq!(
            fw.inbound(&syn, 100, now),
            Verdict::Accept(Admission::Audit { line: Some(4) })
        );
        let data = headers(&test_packets::tcp(PEER, 50000, ME, 22, ACK));
        assert_eq!(
            fw.inbound(&data, 100, now),
            Verdict::Accept(Admission::Established)
        );

        fw.set_filter(&PacketFilter {
            rules: Vec::new(),
            default: DefaultAction::AuditDeny,
        });
        let udp = headers(&test_packets::udp(PEER, 5000, ME, 53, b"q"));
        assert_eq!(
            fw.inbound(&udp, 100, now),
            Verdict::Accept(Admission::Audit { line: None })
        );
        assert_eq!(
            fw.inbound(&data, 100, now),
            Verdict::Accept(Admission::Established)
        );
    }

    /// Every report the firewall has queued.
    fn reports(fw: &mut Firewall) -> Vec<FlowReport> {
        std::iter::from_fn(|| fw.poll_report()).collect()
    }

    #[test]
    fn flows_are_reported_with_their_verdict_rule_traffic_and_syn() {
        let start = crate::test_clock();
        let mut fw = Firewall::default();
        let web = weft_proto::RuleId::of_text("web");
        fw.set_filter(&enforcing(&[FilterRule {
            rule_id: web,
            ..with(
                RuleAction::Accept,
                7,
                allow(PEER, ME, &[(80, 80)], &[Protocol::Tcp]),
            )
        }]));
        let syn = test_packets::tcp_seq(PEER, 50000, ME, 80, SYN, 0xfeed);
        let answer = test_packets::tcp(ME, 80, PEER, 50000, SYN | ACK);
        let data = test_packets::udp(PEER, 50000, ME, 80, b"ignored");
        assert!(admitted(fw.inbound(&headers(&syn), syn.len(), start)));
        fw.outbound(&headers(&answer), answer.len(), start);
        let later = start + Duration::from_secs(1);
        fw.outbound(&headers(&answer), answer.len(), later);
        assert!(!admitted(fw.inbound(&headers(&data), data.len(), later)));
        fw.outbound(
            &headers(&test_packets::tcp_seq(ME, 40000, PEER, 22, SYN, 99)),
            60,
            later,
        );
        assert!(reports(&mut fw).is_empty(), "nothing ended yet");

        fw.handle_timeout(start + TCP_IDLE + Duration::from_secs(1));
        let mut got = reports(&mut fw);
        got.sort_by_key(|r| {
            (
                r.verdict == FlowVerdict::Deny,
                r.verdict == FlowVerdict::Opened,
            )
        });
        let [accepted, opened, denied] = got.as_slice() else {
            panic!("{got:?}")
        };
        assert_eq!(accepted.verdict, FlowVerdict::Accept);
        assert_eq!(accepted.rule, Some(RuleRef { line: 7, id: web }));
        assert_eq!((accepted.key.src, accepted.key.src_port), (PEER, 50000));
        assert_eq!((accepted.key.dst, accepted.key.dst_port), (ME, 80));
        assert_eq!(accepted.discriminator, 0xfeed);
        assert_eq!((accepted.start, accepted.end), (start, later));
        assert_eq!(accepted.to_dst.packets, 1);
        assert_eq!(accepted.to_dst.bytes, syn.len() as u64);
        assert_eq!(accepted.to_src.packets, 2);
        assert_eq!(accepted.to_src.bytes, 2 * answer.len() as u64);
        assert!(accepted.ended && accepted.denied.is_none());

        assert_eq!(opened.verdict, FlowVerdict::Opened);
        assert_eq!((opened.key.src, opened.key.dst_port), (ME, 22));
        assert_eq!((opened.rule, opened.discriminator), (None, 99));
        assert_eq!(opened.to_dst.bytes, 60);

        assert_eq!(denied.verdict, FlowVerdict::Deny);
        assert_eq!(denied.rule, None, "the default denied it");
        assert_eq!(denied.key.protocol, Protocol::Udp);
        assert_eq!(denied.denied.as_ref().map(|d| d.flows), Some(1));
        assert_eq!(denied.to_dst.packets, 1);
    }

    #[test]
    fn revoked_flows_are_summarised_under_the_rule_that_now_denies_them() {
        let now = crate::test_clock();
        let mut fw = Firewall::default();
        let open = allow(PEER, ME, &[(22, 22)], &[Protocol::Tcp]);
        let syn = test_packets::tcp_seq(PEER, 50000, ME, 22, SYN, 5);
        fw.set_filter(&enforcing(std::slice::from_ref(&open)));
        assert!(admitted(fw.inbound(&headers(&syn), 60, now)));
        let deny_id = weft_proto::RuleId::of_text("no ssh");
        let deny = FilterRule {
            rule_id: deny_id,
            ..with(RuleAction::Deny, 2, open.clone())
        };
        fw.set_filter(&enforcing(&[open, deny]));
        let data = test_packets::tcp(PEER, 50000, ME, 22, ACK);
        for _ in 0..3 {
            assert_eq!(
                fw.inbound(&headers(&data), 40, now),
                Verdict::Drop(Denial::Revoked)
            );
        }
        fw.handle_timeout(now + SUMMARY_INTERVAL);
        let got = reports(&mut fw);
        // The flow's own first report, made while it was admitted, and the
        // summary of what was denied after.
        let [first, summary] = got.as_slice() else {
            panic!("{got:?}")
        };
        assert_eq!((first.verdict, first.ended), (FlowVerdict::Accept, false));
        assert_eq!(
            summary.rule,
            Some(RuleRef {
                line: 2,
                id: deny_id
            })
        );
        assert_eq!(summary.discriminator, 5, "the flow's own SYN");
        assert_eq!(summary.to_dst.packets, 3);
        assert_eq!(summary.to_dst.bytes, 120);
        let denied = summary.denied.as_ref().unwrap();
        assert_eq!(
            (denied.flows, denied.samples.as_slice()),
            (1, &[(50000, 5)][..])
        );
    }

    #[test]
    fn clearing_the_filter_reports_every_flow_and_summary_at_once() {
        let now = crate::test_clock();
        let mut fw = Firewall::default();
        fw.outbound(
            &headers(&test_packets::udp(ME, 5000, PEER, 53, b"q")),
            30,
            now,
        );
        fw.inbound(
            &headers(&test_packets::udp(PEER, 5000, ME, 53, b"q")),
            30,
            now,
        );
        fw.clear();
        let got = reports(&mut fw);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().all(|r| r.ended));
        assert_eq!(fw.poll_timeout(), None);
        assert_eq!(
            fw.log_stats(),
            FlowLogStats {
                recorded: 2,
                dropped: 0,
                queued: 0
            }
        );
    }

    #[test]
    fn a_new_deny_rule_cuts_flows_an_accept_let_in() {
        let now = crate::test_clock();
        let mut fw = Firewall::default();
        let open = allow(PEER, ME, &[(22, 22)], &[Protocol::Tcp]);
        fw.set_filter(&enforcing(std::slice::from_ref(&open)));
        let data = headers(&test_packets::tcp(PEER, 50000, ME, 22, ACK));
        assert!(admitted(fw.inbound(&data, 100, now)));
        let deny = with(
            RuleAction::Deny,
            2,
            allow(PEER, ME, &[(22, 22)], &[Protocol::Tcp]),
        );
        fw.set_filter(&enforcing(&[open.clone(), deny.clone()]));
        assert_eq!(fw.inbound(&data, 100, now), Verdict::Drop(Denial::Revoked));
        // The same deny in audit mode lets the flow go on.
        let audit = with(RuleAction::AuditDeny, 2, deny);
        fw.set_filter(&enforcing(&[open, audit]));
        assert_eq!(
            fw.inbound(&data, 100, now),
            Verdict::Accept(Admission::Established)
        );
    }

    #[test]
    fn return_traffic_of_an_outbound_flow_is_admitted_but_new_flows_are_not() {
        let now = crate::test_clock();
        let mut fw = Firewall::default();
        fw.outbound(
            &headers(&test_packets::tcp(ME, 40000, PEER, 22, SYN)),
            100,
            now,
        );
        let answer = headers(&test_packets::tcp(PEER, 22, ME, 40000, SYN | ACK));
        assert_eq!(
            fw.inbound(&answer, 100, now),
            Verdict::Accept(Admission::Return)
        );
        let fresh = headers(&test_packets::tcp(PEER, 22, ME, 40001, SYN));
        assert_eq!(fw.inbound(&fresh, 100, now), Verdict::Drop(Denial::NoRule));
        let to_listener = headers(&test_packets::tcp(PEER, 50000, ME, 22, SYN));
        assert_eq!(
            fw.inbound(&to_listener, 100, now),
            Verdict::Drop(Denial::NoRule)
        );
    }

    #[test]
    fn echo_replies_are_return_traffic_but_echo_requests_are_not() {
        let now = crate::test_clock();
        let mut fw = Firewall::default();
        fw.outbound(
            &headers(&test_packets::echo(ME, PEER, false, 5, 1)),
            100,
            now,
        );
        assert!(admitted(fw.inbound(
            &headers(&test_packets::echo(PEER, ME, true, 5, 1)),
            100,
            now
        )));
        assert!(!admitted(fw.inbound(
            &headers(&test_packets::echo(PEER, ME, true, 6, 1)),
            100,
            now
        )));
        assert!(!admitted(fw.inbound(
            &headers(&test_packets::echo(PEER, ME, false, 5, 2)),
            100,
            now
        )));
    }

    #[test]
    fn answering_a_peer_opens_nothing() {
        let now = crate::test_clock();
        let mut fw = Firewall::default();
        fw.outbound(
            &headers(&test_packets::echo(ME, PEER, true, 5, 1)),
            100,
            now,
        );
        assert_eq!(fw.flows(), 0);
        assert!(!admitted(fw.inbound(
            &headers(&test_packets::echo(PEER, ME, false, 5, 2)),
            100,
            now
        )));
    }

    #[test]
    fn rule_admitted_flows_are_tracked_and_revoked_with_their_rule() {
        let now = crate::test_clock();
        let mut fw = Firewall::default();
        fw.set_filter(&enforcing(&[allow(
            PEER,
            ME,
            &[(22, 22)],
            &[Protocol::Tcp],
        )]));
        let syn = headers(&test_packets::tcp(PEER, 50000, ME, 22, SYN));
        assert_eq!(
            fw.inbound(&syn, 100, now),
            Verdict::Accept(Admission::Rule { line: 1 })
        );
        let data = headers(&test_packets::tcp(PEER, 50000, ME, 22, ACK));
        assert_eq!(
            fw.inbound(&data, 100, now),
            Verdict::Accept(Admission::Established)
        );
        // This node answers; that keeps the flow but does not make it outbound.
        fw.outbound(
            &headers(&test_packets::tcp(ME, 22, PEER, 50000, ACK)),
            100,
            now,
        );

        fw.set_filter(&enforcing(&[]));
        assert_eq!(fw.inbound(&data, 100, now), Verdict::Drop(Denial::Revoked));
        // Further answers cannot turn the flow into return traffic.
        fw.outbound(
            &headers(&test_packets::tcp(ME, 22, PEER, 50000, ACK)),
            100,
            now,
        );
        assert_eq!(fw.inbound(&data, 100, now), Verdict::Drop(Denial::Revoked));

        // Restoring the rule restores the flow.
        fw.set_filter(&enforcing(&[allow(
            PEER,
            ME,
            &[(22, 22)],
            &[Protocol::Tcp],
        )]));
        assert_eq!(
            fw.inbound(&data, 100, now),
            Verdict::Accept(Admission::Established)
        );
    }

    #[test]
    fn answers_never_reopen_a_revoked_flow_once_it_expired() {
        let now = crate::test_clock();
        let mut fw = Firewall::default();
        fw.set_filter(&enforcing(&[allow(
            PEER,
            ME,
            &[(22, 22)],
            &[Protocol::Tcp],
        )]));
        let data = headers(&test_packets::tcp(PEER, 50000, ME, 22, ACK));
        assert!(admitted(fw.inbound(&data, 100, now)));
        fw.set_filter(&enforcing(&[]));
        assert_eq!(fw.inbound(&data, 100, now), Verdict::Drop(Denial::Revoked));
        // Once the revoked entry has expired: an answer is not a SYN.
        let later = now + conntrack::TCP_IDLE + Duration::from_secs(1);
        fw.handle_timeout(later);
        fw.outbound(
            &headers(&test_packets::tcp(ME, 22, PEER, 50000, ACK)),
            100,
            later,
        );
        assert_eq!(fw.inbound(&data, 100, later), Verdict::Drop(Denial::NoRule));
        // A connection this node opens is return traffic, as before.
        fw.outbound(
            &headers(&test_packets::tcp(ME, 41000, PEER, 443, SYN)),
            100,
            later,
        );
        let answer = headers(&test_packets::tcp(PEER, 443, ME, 41000, SYN | ACK));
        assert_eq!(
            fw.inbound(&answer, 100, later),
            Verdict::Accept(Admission::Return)
        );
    }

    #[test]
    fn flows_expire() {
        let start = crate::test_clock();
        let mut fw = Firewall::default();
        fw.outbound(
            &headers(&test_packets::udp(ME, 5000, PEER, 53, b"q")),
            100,
            start,
        );
        let answer = headers(&test_packets::udp(PEER, 53, ME, 5000, b"a"));
        let almost = start + UDP_IDLE - Duration::from_secs(1);
        fw.handle_timeout(almost);
        assert!(admitted(fw.inbound(&answer, 100, almost)));
        // The answer refreshed the flow.
        let expired = almost + UDP_IDLE;
        assert!(fw.poll_timeout().is_some_and(|t| t <= expired));
        fw.handle_timeout(expired);
        assert_eq!(fw.flows(), 0);
        assert!(!admitted(fw.inbound(&answer, 100, expired)));
    }

    #[test]
    fn fragments_and_icmp_errors_are_decided_by_rules_alone() {
        let now = crate::test_clock();
        let mut fw = Firewall::default();
        fw.outbound(
            &headers(&test_packets::udp(ME, 5000, PEER, 53, b"q")),
            100,
            now,
        );
        let fragment = headers(&test_packets::non_first_fragment(test_packets::udp(
            PEER, 53, ME, 5000, b"a",
        )));
        assert!(!admitted(fw.inbound(&fragment, 100, now)));
        fw.set_filter(&enforcing(&[allow(
            PEER,
            ME,
            &[(0, 65535)],
            &[Protocol::Udp],
        )]));
        assert!(admitted(fw.inbound(&fragment, 100, now)));
        assert_eq!(fw.flows(), 1, "fragments open no flow");
    }

    #[test]
    fn forgotten_addresses_lose_their_return_traffic() {
        let now = crate::test_clock();
        let mut fw = Firewall::default();
        fw.outbound(
            &headers(&test_packets::udp(ME, 5000, PEER, 53, b"q")),
            100,
            now,
        );
        fw.forget_addresses(&[PEER]);
        assert!(!admitted(fw.inbound(
            &headers(&test_packets::udp(PEER, 53, ME, 5000, b"a")),
            100,
            now
        )));
    }

    // Model-based tests: a reference evaluator written straight from the
    // rules' definition, over small address and port spaces so that random
    // packets hit rules and flows often.

    const PEERS: [IpAddr; 4] = [
        IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)),
        IpAddr::V4(Ipv4Addr::new(100, 64, 1, 3)),
        IpAddr::V6(Ipv6Addr::new(0xfd7a, 0, 0, 0, 0, 0, 0, 2)),
        IpAddr::V6(Ipv6Addr::new(0xfd7a, 0, 0, 1, 0, 0, 0, 3)),
    ];
    const SELVES: [IpAddr; 2] = [ME, IpAddr::V6(Ipv6Addr::new(0xfd7a, 0, 0, 0, 0, 0, 0, 1))];
    const PORTS: [u16; 4] = [22, 53, 80, 40000];

    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Tcp,
        Udp,
        Echo { reply: bool },
        IcmpOther,
        Gre,
        UdpFragment,
    }

    #[derive(Debug, Clone, Copy)]
    struct Spec {
        kind: Kind,
        peer: usize,
        me: usize,
        peer_port: u16,
        my_port: u16,
    }

    impl Spec {
        /// The peer and this node's address, of one family.
        fn addresses(&self) -> (IpAddr, IpAddr) {
            let me = SELVES[self.me];
            let peer = PEERS[(self.peer & 1) | if me.is_ipv4() { 0 } else { 2 }];
            (peer, me)
        }

        /// The packet flowing from the peer (`inbound`) or to it.
        fn packet(&self, inbound: bool) -> Vec<u8> {
            let (peer, me) = self.addresses();
            let (src, sport, dst, dport) = if inbound {
                (peer, self.peer_port, me, self.my_port)
            } else {
                (me, self.my_port, peer, self.peer_port)
            };
            match self.kind {
                // This node opens its connections with a SYN; a peer's
                // segments are mid-connection.
                Kind::Tcp if inbound => test_packets::tcp(src, sport, dst, dport, ACK),
                Kind::Tcp => test_packets::tcp(src, sport, dst, dport, SYN),
                Kind::Udp => test_packets::udp(src, sport, dst, dport, b"x"),
                Kind::Echo { reply } => test_packets::echo(src, dst, reply, self.peer_port, 1),
                Kind::IcmpOther => {
                    let mut packet = test_packets::echo(src, dst, false, 1, 1);
                    let at = if src.is_ipv4() { 20 } else { 40 };
                    packet[at] = 3;
                    packet
                }
                Kind::Gre => test_packets::opaque(src, dst, 47),
                Kind::UdpFragment if src.is_ipv4() => test_packets::non_first_fragment(
                    test_packets::udp(src, sport, dst, dport, b"x"),
                ),
                Kind::UdpFragment => test_packets::udp(src, sport, dst, dport, b"x"),
            }
        }
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Tcp),
            Just(Kind::Udp),
            any::<bool>().prop_map(|reply| Kind::Echo { reply }),
            Just(Kind::IcmpOther),
            Just(Kind::Gre),
            Just(Kind::UdpFragment),
        ]
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (kind(), 0..4usize, 0..2usize, 0..4usize, 0..4usize).prop_map(|(kind, peer, me, pp, mp)| {
            Spec {
                kind,
                peer,
                me,
                peer_port: PORTS[pp],
                my_port: PORTS[mp],
            }
        })
    }

    fn net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (0..4usize).prop_map(|i| IpNet::from(PEERS[i])),
            (0..2usize).prop_map(|i| IpNet::from(SELVES[i])),
            Just("100.64.0.0/24".parse().unwrap()),
            Just("fd7a::/64".parse().unwrap()),
            Just("0.0.0.0/0".parse().unwrap()),
            Just("::/0".parse().unwrap()),
        ]
    }

    fn rule() -> impl Strategy<Value = FilterRule> {
        let range = prop_oneof![
            (0..4usize).prop_map(|i| PortRange {
                first: PORTS[i],
                last: PORTS[i]
            }),
            Just(PortRange {
                first: 20,
                last: 60
            }),
            Just(PortRange::ANY),
        ];
        let protocol = prop_oneof![
            Just(Protocol::Tcp),
            Just(Protocol::Udp),
            Just(Protocol::Icmp),
            Just(Protocol::Other(47)),
            Just(Protocol::Other(17)),
        ];
        (
            proptest::collection::vec(net(), 0..3),
            proptest::collection::vec(net(), 0..3),
            proptest::collection::vec(range, 0..3),
            proptest::collection::vec(protocol, 0..3),
            0..100u32,
            action(),
        )
            .prop_map(
                |(src, dst, ports, protocols, policy_line, action)| FilterRule {
                    rule_id: weft_proto::RuleId::default(),
                    src,
                    dst,
                    ports,
                    protocols,
                    policy_line,
                    action,
                },
            )
    }

    fn action() -> impl Strategy<Value = RuleAction> {
        prop_oneof![
            3 => Just(RuleAction::Accept),
            1 => Just(RuleAction::Deny),
            1 => Just(RuleAction::AuditDeny),
        ]
    }

    fn default_action() -> impl Strategy<Value = DefaultAction> {
        prop_oneof![
            3 => Just(DefaultAction::Deny),
            1 => Just(DefaultAction::AuditDeny),
        ]
    }

    /// Whether `filter` admits the inbound packet of `spec`, by the
    /// precedence of [`PacketFilter`]: deny, then audit deny, then accept,
    /// then the default.
    fn reference_filter(filter: &PacketFilter, spec: &Spec) -> bool {
        let matching = |action: RuleAction| {
            filter
                .rules
                .iter()
                .any(|rule| rule.action == action && reference_match(rule, spec))
        };
        if matching(RuleAction::Deny) {
            false
        } else if matching(RuleAction::AuditDeny) || matching(RuleAction::Accept) {
            true
        } else {
            filter.default == DefaultAction::AuditDeny
        }
    }

    /// Whether `rule` matches the inbound packet of `spec`, from the rules'
    /// definition. A packet without a port (a fragment) matches an accept
    /// only when it covers every port, and a deny when it names any port.
    fn reference_match(rule: &FilterRule, spec: &Spec) -> bool {
        let (src, dst) = spec.addresses();
        let (protocol, port) = match spec.kind {
            Kind::Tcp => (Protocol::Tcp, Some(spec.my_port)),
            Kind::Udp => (Protocol::Udp, Some(spec.my_port)),
            Kind::UdpFragment if src.is_ipv4() => (Protocol::Udp, None),
            Kind::UdpFragment => (Protocol::Udp, Some(spec.my_port)),
            Kind::Echo { .. } | Kind::IcmpOther => (Protocol::Icmp, None),
            Kind::Gre => (Protocol::Other(47), None),
        };
        {
            let protocols: Vec<Protocol> = if rule.protocols.is_empty() {
                Protocol::DEFAULT.to_vec()
            } else {
                rule.protocols
                    .iter()
                    .map(|p| match p {
                        Protocol::Other(n) => Protocol::from_number(*n),
                        p => *p,
                    })
                    .collect()
            };
            let ports_ok = match protocol {
                Protocol::Tcp | Protocol::Udp => match port {
                    Some(port) => rule.ports.iter().any(|r| r.contains(port)),
                    None if rule.action == RuleAction::Accept => {
                        rule.ports.contains(&PortRange::ANY)
                    }
                    None => !rule.ports.is_empty(),
                },
                _ => true,
            };
            protocols.contains(&protocol)
                && rule.src.iter().any(|n| n.contains(&src))
                && rule.dst.iter().any(|n| n.contains(&dst))
                && ports_ok
        }
    }

    /// Whether the inbound packet of `spec` answers one of the outbound packets in `opened`.
    fn reference_return(opened: &[Spec], spec: &Spec) -> bool {
        opened.iter().any(|out| {
            let same_ends = out.addresses() == spec.addresses();
            let same_ports = out.peer_port == spec.peer_port && out.my_port == spec.my_port;
            match (out.kind, spec.kind) {
                (Kind::Tcp, Kind::Tcp) | (Kind::Udp, Kind::Udp) => same_ends && same_ports,
                (Kind::Udp, Kind::UdpFragment) if !spec.addresses().0.is_ipv4() => {
                    same_ends && same_ports
                }
                (Kind::UdpFragment, Kind::Udp | Kind::UdpFragment)
                    if !out.addresses().0.is_ipv4() =>
                {
                    same_ends && same_ports && !spec.addresses().0.is_ipv4()
                }
                (Kind::Echo { reply: false }, Kind::Echo { reply: true }) => {
                    same_ends && out.peer_port == spec.peer_port
                }
                (Kind::Gre, Kind::Gre) => same_ends,
                _ => false,
            }
        })
    }

    #[derive(Debug, Clone)]
    enum Op {
        Out(Spec),
        In(Spec),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![spec().prop_map(Op::Out), spec().prop_map(Op::In)]
    }

    proptest! {
        /// With a fixed filter, an inbound packet is admitted exactly when the
        /// filter's precedence admits it or it answers a flow this node opened.
        #[test]
        fn admission_matches_the_reference(
            rules in proptest::collection::vec(rule(), 0..5),
            default in default_action(),
            ops in proptest::collection::vec(op(), 1..40),
        ) {
            let now = crate::test_clock();
            let filter = PacketFilter { rules, default };
            let mut fw = Firewall::default();
            fw.set_filter(&filter);
            let mut opened = Vec::new();
            for op in ops {
                match op {
                    Op::Out(spec) => {
                        fw.outbound(&headers(&spec.packet(false)), 100, now);
                        opened.push(spec);
                    }
                    Op::In(spec) => {
                        let got = admitted(fw.inbound(&headers(&spec.packet(true)), 100, now));
                        let want = reference_filter(&filter, &spec) || reference_return(&opened, &spec);
                        prop_assert_eq!(got, want, "{:?}", spec);
                    }
                }
            }
        }

        /// Removing an accept rule, or adding a deny rule, never admits more,
        /// also for flows admitted earlier, and what is admitted is always
        /// allowed by the current filter or answers a flow this node opened.
        #[test]
        fn narrowing_the_filter_never_admits_more(
            rules in proptest::collection::vec(rule(), 1..5),
            default in default_action(),
            removed in 0..5usize,
            deny in rule(),
            add_deny in any::<bool>(),
            before in proptest::collection::vec(op(), 0..30),
            after in proptest::collection::vec(op(), 1..30),
        ) {
            let now = crate::test_clock();
            let mut narrower = rules.clone();
            if add_deny {
                narrower.push(FilterRule { action: RuleAction::Deny, ..deny });
            } else {
                let removed = removed % rules.len();
                if narrower[removed].action == RuleAction::Accept {
                    narrower.remove(removed);
                }
            }
            let wide = PacketFilter { rules, default };
            let narrow = PacketFilter { rules: narrower, default };
            let mut kept = Firewall::default();
            let mut changed = Firewall::default();
            kept.set_filter(&wide);
            changed.set_filter(&wide);
            let mut opened = Vec::new();
            for op in &before {
                match op {
                    Op::Out(spec) => {
                        kept.outbound(&headers(&spec.packet(false)), 100, now);
                        changed.outbound(&headers(&spec.packet(false)), 100, now);
                        opened.push(*spec);
                    }
                    Op::In(spec) => {
                        let packet = headers(&spec.packet(true));
                        prop_assert_eq!(kept.inbound(&packet, 100, now), changed.inbound(&packet, 100, now));
                    }
                }
            }
            changed.set_filter(&narrow);
            for op in &after {
                match op {
                    Op::Out(spec) => {
                        kept.outbound(&headers(&spec.packet(false)), 100, now);
                        changed.outbound(&headers(&spec.packet(false)), 100, now);
                        opened.push(*spec);
                    }
                    Op::In(spec) => {
                        let packet = headers(&spec.packet(true));
                        let with_rule = admitted(kept.inbound(&packet, 100, now));
                        let without = admitted(changed.inbound(&packet, 100, now));
                        prop_assert!(!without || with_rule, "{:?}", spec);
                        prop_assert!(
                            !without || reference_filter(&narrow, spec) || reference_return(&opened, spec),
                            "{:?}", spec
                        );
                    }
                }
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Packet(Op),
        Wait(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => op().prop_map(Step::Packet),
            1 => (1..200u64).prop_map(Step::Wait),
        ]
    }

    proptest! {
        /// What the ended reports and the denial summaries count adds up to
        /// exactly the packets and bytes the filter tracked or denied;
        /// interim reports never count more than their flow's end, and
        /// summaries stay within their bounds.
        #[test]
        fn reports_add_up_to_the_traffic(
            rules in proptest::collection::vec(rule(), 0..5),
            default in default_action(),
            steps in proptest::collection::vec(step(), 1..60),
        ) {
            let mut now = crate::test_clock();
            let mut fw = Firewall::default();
            fw.set_filter(&PacketFilter { rules, default });
            let (mut packets, mut bytes) = (0u64, 0u64);
            let mut seen = Vec::new();
            for (n, step) in steps.into_iter().enumerate() {
                match step {
                    Step::Wait(secs) => {
                        now += Duration::from_secs(secs);
                        fw.handle_timeout(now);
                    }
                    Step::Packet(op) => {
                        let (spec, inbound) = match op {
                            Op::Out(spec) => (spec, false),
                            Op::In(spec) => (spec, true),
                        };
                        let packet = spec.packet(inbound);
                        let len = packet.len() + n;
                        let h = headers(&packet);
                        let key = FlowKey::of(&h);
                        let counted = if inbound {
                            match fw.inbound(&h, len, now) {
                                Verdict::Accept(_) => key.is_some(),
                                Verdict::Drop(_) => true,
                            }
                        } else {
                            // Counted on a flow that was tracked or opened.
                            fw.outbound(&h, len, now);
                            key.is_some_and(|k| fw.conntrack.probe(&k).is_some())
                        };
                        if counted {
                            packets += 1;
                            bytes += len as u64;
                        }
                    }
                }
                seen.extend(std::iter::from_fn(|| fw.poll_report()));
            }
            fw.clear();
            seen.extend(std::iter::from_fn(|| fw.poll_report()));
            prop_assert_eq!(fw.log_stats().dropped, 0);
            let ended = seen.iter().filter(|r| r.ended);
            let total = |r: &FlowReport| (r.to_dst.packets + r.to_src.packets, r.to_dst.bytes + r.to_src.bytes);
            let (got_packets, got_bytes) = ended.map(total).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            prop_assert_eq!((got_packets, got_bytes), (packets, bytes));
            for report in &seen {
                prop_assert!(report.start <= report.end);
                if !report.ended {
                    let last = seen.iter().rfind(|r| r.key == report.key && r.start == report.start && r.ended);
                    let last = last.map(total);
                    prop_assert!(last.is_some_and(|(p, b)| total(report).0 <= p && total(report).1 <= b));
                }
                if let Some(denied) = &report.denied {
                    prop_assert!(denied.samples.len() <= weft_proto::flows::MAX_SUMMARY_IDS);
                    prop_assert!(!denied.samples.is_empty());
                    prop_assert!(denied.flows >= denied.samples.len() as u64);
                    prop_assert!(denied.flows <= report.to_dst.packets);
                    prop_assert_eq!(report.verdict, FlowVerdict::Deny);
                }
            }
        }
    }

    proptest! {
        /// Compacting a filter ([`PacketFilter::compact`]) changes no
        /// decision and no policy line a decision names, for filters with
        /// repeated rules and runs of one line that differ in sources.
        #[test]
        fn compacting_changes_no_decision(
            rules in proptest::collection::vec(rule(), 0..6),
            repeats in proptest::collection::vec((0..6usize, 0..100u32, any::<bool>(), net()), 0..6),
            default in default_action(),
        ) {
            let mut all = rules.clone();
            for (at, line, same_line, src) in repeats {
                let Some(original) = rules.get(at % rules.len().max(1)) else { continue };
                let mut copy = original.clone();
                if same_line {
                    copy.src = vec![src];
                } else {
                    copy.policy_line = line;
                }
                let at = (at % (all.len() + 1)).min(all.len());
                all.insert(at, copy);
            }
            let filter = PacketFilter { rules: all, default };
            let mut compacted = filter.clone();
            compacted.compact();
            prop_assert!(compacted.rules.len() <= filter.rules.len());
            let (before, after) = (Filter::new(&filter), Filter::new(&compacted));
            let protocols = [Protocol::Tcp, Protocol::Udp, Protocol::Icmp, Protocol::Other(47)];
            let ports = [Some(PORTS[0]), Some(PORTS[1]), Some(PORTS[2]), Some(PORTS[3]), None];
            let queries = protocols.iter().flat_map(|&protocol| {
                PEERS.iter().flat_map(move |&src| {
                    SELVES.iter().flat_map(move |&dst| {
                        ports.into_iter().map(move |dst_port| Query { protocol, src, dst, dst_port })
                    })
                })
            });
            for query in queries {
                prop_assert_eq!(before.evaluate(&query), after.evaluate(&query), "{:?}", query);
            }
        }
    }
}
