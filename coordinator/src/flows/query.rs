//! What `weft-coordinator flows` asks for, and which records match.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use weft_proto::flows::{FlowEndpoint, FlowId, FlowVerdict};

use super::FlowView;

/// The most records one query returns.
const MAX_QUERY_LIMIT: usize = 100_000;
/// Records a query returns unless it says.
const DEFAULT_QUERY_LIMIT: usize = 100;

/// A query, as the admin API takes it (its query string).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowQuery {
    /// Who opened the flow: a node name or id (`n7`), a user's email, a
    /// `tag:NAME`, a `group:idp:NAME`, a SPIFFE ID, an IP address or a
    /// CIDR prefix.
    pub src: Option<String>,
    /// Who it was opened to, the same way.
    pub dst: Option<String>,
    /// `accept`, `deny`, `audit-deny` or `opened`.
    pub verdict: Option<String>,
    /// Only flows whose last packet was seen at or after this time
    /// (milliseconds since the Unix epoch).
    pub since_ms: Option<u64>,
    /// Only this flow (32 hexadecimal digits); a denial summary matches
    /// any of the flows it names.
    pub id: Option<String>,
    /// At most this many records, the newest.
    pub limit: Option<usize>,
}

/// The answer to a [`FlowQuery`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowList {
    /// The newest matching records, oldest first.
    pub records: Vec<FlowView>,
    /// Older records may match too: the limit cut the answer short.
    pub more: bool,
}

/// A query the admin API cannot answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FilterError {
    #[error("verdict {0:?} is not one of accept, deny, audit-deny or opened")]
    Verdict(String),
    #[error("{0}")]
    Id(#[from] weft_proto::flows::IdParseError),
    #[error("limit must be between 1 and {MAX_QUERY_LIMIT}")]
    Limit,
    #[error("--{0} is empty; name a node, user, tag, SPIFFE ID or address")]
    Empty(&'static str),
}

/// A checked [`FlowQuery`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FlowFilter {
    pub(crate) src: Option<Who>,
    pub(crate) dst: Option<Who>,
    pub(crate) verdict: Option<FlowVerdict>,
    pub(crate) since_ms: Option<u64>,
    pub(crate) id: Option<FlowId>,
    pub(crate) limit: usize,
}

/// One end of a flow, as a query names it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Who {
    Address(IpAddr),
    Prefix(IpNet),
    /// A name, id, email, tag, group or SPIFFE ID.
    Name(String),
}

impl Who {
    fn parse(text: &str, flag: &'static str) -> Result<Self, FilterError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(FilterError::Empty(flag));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Who::Address(ip.to_canonical()));
        }
        if let Ok(net) = text.parse::<IpNet>() {
            return Ok(Who::Prefix(net));
        }
        Ok(Who::Name(text.to_owned()))
    }

    fn matches(&self, address: IpAddr, end: &FlowEndpoint) -> bool {
        let address = address.to_canonical();
        match self {
            Who::Address(ip) => *ip == address,
            Who::Prefix(net) => net.contains(&address),
            Who::Name(name) => {
                let identity = &end.identity;
                let node_id = end.node.map(|id| id.to_string());
                let eq = |value: &str| value.eq_ignore_ascii_case(name);
                end.name.as_deref().is_some_and(eq)
                    || node_id.as_deref().is_some_and(eq)
                    || identity.user.as_deref().is_some_and(eq)
                    || identity.workload.as_deref() == Some(name)
                    || identity.tags.iter().any(|t| t == name)
                    || identity.groups.iter().any(|g| g == name)
            }
        }
    }
}

impl FlowFilter {
    /// Checks `query`.
    pub(crate) fn parse(query: &FlowQuery) -> Result<Self, FilterError> {
        let verdict = query
            .verdict
            .as_deref()
            .map(|v| match v.replace('_', "-").as_str() {
                "accept" => Ok(FlowVerdict::Accept),
                "deny" => Ok(FlowVerdict::Deny),
                "audit-deny" => Ok(FlowVerdict::AuditDeny),
                "opened" => Ok(FlowVerdict::Opened),
                _ => Err(FilterError::Verdict(v.chars().take(32).collect())),
            })
            .transpose()?;
        let limit = query.limit.unwrap_or(DEFAULT_QUERY_LIMIT);
        if !(1..=MAX_QUERY_LIMIT).contains(&limit) {
            return Err(FilterError::Limit);
        }
        Ok(Self {
            src: query
                .src
                .as_deref()
                .map(|s| Who::parse(s, "src"))
                .transpose()?,
            dst: query
                .dst
                .as_deref()
                .map(|s| Who::parse(s, "dst"))
                .transpose()?,
            verdict,
            since_ms: query.since_ms,
            id: query.id.as_deref().map(str::parse).transpose()?,
            limit,
        })
    }

    /// Matches every record, up to `limit`.
    #[cfg(test)]
    pub(crate) fn everything(limit: usize) -> Self {
        Self {
            src: None,
            dst: None,
            verdict: None,
            since_ms: None,
            id: None,
            limit,
        }
    }

    pub(crate) fn matches(&self, view: &FlowView) -> bool {
        let record = &view.kept.record;
        self.verdict.is_none_or(|v| v == record.verdict)
            && self.since_ms.is_none_or(|since| record.end_ms >= since)
            && self.id.is_none_or(|id| {
                record.id == id
                    || record
                        .summary
                        .as_ref()
                        .is_some_and(|s| s.more_ids.contains(&id))
            })
            && self
                .src
                .as_ref()
                .is_none_or(|who| who.matches(record.src.ip(), &record.src_identity))
            && self
                .dst
                .as_ref()
                .is_none_or(|who| who.matches(record.dst.ip(), &record.dst_identity))
    }
}

#[cfg(test)]
mod tests {
    use weft_proto::flows::FlowDirection;
    use weft_proto::{Identity, NodeId};

    use super::super::intake::tests::record;
    use super::super::{KeptRecord, Reporter};
    use super::*;

    fn view() -> FlowView {
        let mut record = record("100.64.0.1:40000", "[fd7a:115c::2]:5432");
        record.direction = FlowDirection::Inbound;
        record.src_identity = FlowEndpoint {
            node: Some(NodeId(1)),
            name: Some("laptop".into()),
            identity: Identity {
                user: Some("Alice@example.com".into()),
                groups: vec!["group:idp:eng".into()],
                workload: None,
                tags: Vec::new(),
            },
        };
        record.dst_identity = FlowEndpoint {
            node: Some(NodeId(2)),
            name: Some("db".into()),
            identity: Identity {
                user: None,
                groups: Vec::new(),
                workload: Some("spiffe://example.org/ns/prod/sa/db".into()),
                tags: vec!["tag:db".into()],
            },
        };
        FlowView {
            received_ms: record.end_ms,
            reporter: Reporter {
                node: NodeId(2),
                name: "db".into(),
            },
            batch: 1,
            kept: KeptRecord {
                index: 0,
                src_verified: true,
                dst_verified: true,
                record,
            },
        }
    }

    fn matches(query: FlowQuery) -> bool {
        FlowFilter::parse(&query).unwrap().matches(&view())
    }

    #[test]
    fn ends_match_by_any_of_their_names() {
        let by = |src: Option<&str>, dst: Option<&str>| {
            matches(FlowQuery {
                src: src.map(Into::into),
                dst: dst.map(Into::into),
                ..FlowQuery::default()
            })
        };
        let src_names = [
            "laptop",
            "LAPTOP",
            "n1",
            "alice@example.com",
            "group:idp:eng",
            "100.64.0.1",
            "::ffff:100.64.0.1",
            "100.64.0.0/10",
        ];
        for src in src_names {
            assert!(by(Some(src), None), "--src {src}");
        }
        let dst_names = [
            "db",
            "tag:db",
            "spiffe://example.org/ns/prod/sa/db",
            "fd7a:115c::2",
        ];
        for dst in dst_names {
            assert!(by(None, Some(dst)), "--dst {dst}");
        }
        for src in ["db", "tag:db", "100.64.0.2", "n2", "10.0.0.0/8", "lap"] {
            assert!(!by(Some(src), None), "--src {src}");
        }
    }

    #[test]
    fn verdict_time_and_id_narrow_the_answer() {
        let v = view();
        let id = v.kept.record.id.to_string();
        let end = v.kept.record.end_ms;
        assert!(matches(FlowQuery {
            verdict: Some("accept".into()),
            since_ms: Some(end),
            id: Some(id),
            ..FlowQuery::default()
        }));
        let misses = [
            ("audit-deny", None, None),
            ("accept", Some(end + 1), None),
            ("accept", None, Some("00".repeat(16))),
        ];
        for (verdict, since_ms, id) in misses {
            let query = FlowQuery {
                verdict: Some(verdict.into()),
                since_ms,
                id,
                ..FlowQuery::default()
            };
            assert!(!matches(query.clone()), "{query:?}");
        }
    }

    #[test]
    fn bad_queries_are_named() {
        let bad = |change: fn(&mut FlowQuery)| {
            let mut query = FlowQuery::default();
            change(&mut query);
            FlowFilter::parse(&query).unwrap_err().to_string()
        };
        assert!(bad(|q| q.verdict = Some("maybe".into())).contains("maybe"));
        assert!(bad(|q| q.id = Some("xyz".into())).contains("flow id"));
        assert!(bad(|q| q.limit = Some(0)).contains("limit"));
        assert!(bad(|q| q.dst = Some(" ".into())).contains("--dst"));
    }
}
