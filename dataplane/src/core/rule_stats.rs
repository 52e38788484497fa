//! Per-rule verdict counters: how many inbound packets each policy rule
//! admitted, let pass in audit mode, or dropped, keyed by the rule's policy
//! line. The table changes only with the filter; the packet path only
//! finds a line and adds one.

use serde::{Deserialize, Serialize};
use weft_proto::PacketFilter;

use crate::filter::{Admission, Denial, Verdict};

/// One policy rule's verdicts on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleVerdicts {
    /// The rule's line in the policy file.
    pub line: u32,
    /// Packets an accept rule admitted: the first of each flow (the rest
    /// pass as the established flow).
    pub accepted: u64,
    /// Packets a deny rule in audit mode let pass.
    pub audit_passed: u64,
    /// Packets a deny rule dropped.
    pub denied: u64,
}

/// The counters of the rules in force, sorted by line.
#[derive(Debug, Default)]
pub(crate) struct RuleStats {
    rules: Vec<RuleVerdicts>,
}

impl RuleStats {
    /// Follows a new filter: lines it still has keep their counts, new
    /// lines start at zero, lines it dropped are forgotten.
    pub(crate) fn set_rules(&mut self, filter: &PacketFilter) {
        let mut lines: Vec<u32> = filter.rules.iter().map(|r| r.policy_line).collect();
        lines.sort_unstable();
        lines.dedup();
        let old = std::mem::take(&mut self.rules);
        self.rules = lines
            .into_iter()
            .map(|line| match old.binary_search_by_key(&line, |r| r.line) {
                Ok(kept) => old[kept],
                Err(_) => RuleVerdicts {
                    line,
                    ..RuleVerdicts::default()
                },
            })
            .collect();
    }

    /// Counts `verdict` for the rule that decided it, if a rule did.
    pub(crate) fn count(&mut self, verdict: &Verdict) {
        let line = match verdict {
            Verdict::Accept(Admission::Rule { line })
            | Verdict::Accept(Admission::Audit { line: Some(line) })
            | Verdict::Drop(Denial::Denied { line }) => *line,
            _ => return,
        };
        let Ok(at) = self.rules.binary_search_by_key(&line, |r| r.line) else {
            return;
        };
        let rule = &mut self.rules[at];
        match verdict {
            Verdict::Accept(Admission::Audit { .. }) => rule.audit_passed += 1,
            Verdict::Accept(_) => rule.accepted += 1,
            Verdict::Drop(_) => rule.denied += 1,
        }
    }

    /// Every rule's counters, by line.
    pub(crate) fn snapshot(&self) -> Vec<RuleVerdicts> {
        self.rules.clone()
    }
}

#[cfg(test)]
mod tests {
    use weft_proto::{DefaultAction, FilterRule, RuleAction};

    use super::*;

    fn filter(lines: &[u32]) -> PacketFilter {
        PacketFilter {
            rules: lines
                .iter()
                .map(|&policy_line| FilterRule {
                    rule_id: weft_proto::RuleId::default(),
                    src: Vec::new(),
                    dst: Vec::new(),
                    ports: Vec::new(),
                    protocols: Vec::new(),
                    action: RuleAction::Accept,
                    policy_line,
                })
                .collect(),
            default: DefaultAction::default(),
        }
    }

    #[test]
    fn verdicts_count_per_line_and_survive_a_filter_that_keeps_the_line() {
        let mut stats = RuleStats::default();
        stats.set_rules(&filter(&[12, 7, 12]));
        stats.count(&Verdict::Accept(Admission::Rule { line: 7 }));
        stats.count(&Verdict::Drop(Denial::Denied { line: 12 }));
        stats.count(&Verdict::Drop(Denial::Denied { line: 12 }));
        stats.count(&Verdict::Accept(Admission::Audit { line: Some(12) }));
        stats.count(&Verdict::Accept(Admission::Established));
        stats.count(&Verdict::Drop(Denial::NoRule));
        stats.count(&Verdict::Drop(Denial::Denied { line: 99 }));
        let seen = |stats: &RuleStats| -> Vec<(u32, u64, u64, u64)> {
            stats
                .snapshot()
                .iter()
                .map(|r| (r.line, r.accepted, r.audit_passed, r.denied))
                .collect()
        };
        assert_eq!(seen(&stats), [(7, 1, 0, 0), (12, 0, 1, 2)]);
        stats.set_rules(&filter(&[12, 20]));
        assert_eq!(seen(&stats), [(12, 0, 1, 2), (20, 0, 0, 0)]);
    }
}
