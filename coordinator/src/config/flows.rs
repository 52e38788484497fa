//! The `[flows]` section: how long the coordinator keeps flow records, and
//! where it forwards them.
//!
//! ```toml
//! [flows]
//! max_age = "7d"            # records older than this are deleted, a segment at a time
//! max_megabytes = 1024      # and the oldest segments go once all of them hold more
//! segment_age = "1h"        # a segment is closed and a new one started after this long
//! segment_megabytes = 64    # or once it holds this much
//!
//! [[flows.sinks]]
//! type = "syslog"           # "jsonl", "syslog" or "otlp"
//! name = "siem"             # the metrics' `sink` label; default TYPE-N
//! transport = "tcp"         # syslog: "udp" (default) or "tcp" (RFC 6587 octet counting)
//! address = "siem.example.com:6514"
//! facility = "local0"       # syslog: local0 to local7, user or daemon
//! queue = 10000             # records held for the sink while it is slow or down
//! audit = true              # forward audit trail entries too
//!
//! [[flows.sinks]]
//! type = "jsonl"
//! path = "/var/log/weft/flows.jsonl"
//!
//! [[flows.sinks]]
//! type = "otlp"
//! endpoint = "http://otel-collector.example.com:4318"   # records go to ENDPOINT/v1/logs
//! headers = { authorization = "Bearer ..." }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{duration, ConfigError, FileConfig};

/// How long records are kept unless configured.
pub const DEFAULT_FLOW_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// How much all segments may hold together unless configured.
pub const DEFAULT_FLOW_MAX_BYTES: u64 = 1024 << 20;
/// How long a segment takes records unless configured.
pub const DEFAULT_FLOW_SEGMENT_AGE: Duration = Duration::from_secs(3600);
/// How large a segment grows unless configured.
pub const DEFAULT_FLOW_SEGMENT_BYTES: u64 = 64 << 20;
/// Records held for one sink unless configured.
const DEFAULT_SINK_QUEUE: usize = 10_000;
/// The most records a sink's queue may be configured to hold: a queue is
/// memory, and a sink down for long loses records either way.
const MAX_SINK_QUEUE: usize = 1_000_000;

/// The `[flows]` section as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowsFileConfig {
    /// Records older than this are deleted (`7d`).
    pub max_age: Option<String>,
    /// All segments together hold at most this many MiB (1024).
    pub max_megabytes: Option<u64>,
    /// A segment takes records for at most this long (`1h`).
    pub segment_age: Option<String>,
    /// A segment holds at most this many MiB (64).
    pub segment_megabytes: Option<u64>,
    /// Where records are forwarded.
    #[serde(default)]
    pub sinks: Vec<SinkFileConfig>,
}

/// One `[[flows.sinks]]` entry as written; which keys apply depends on `type`.
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkFileConfig {
    /// `jsonl`, `syslog` or `otlp`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The sink's name in metrics and logs.
    pub name: Option<String>,
    /// jsonl: the file records are appended to.
    pub path: Option<PathBuf>,
    /// syslog: `HOST:PORT` of the receiver.
    pub address: Option<String>,
    /// syslog: `udp` or `tcp`.
    pub transport: Option<String>,
    /// syslog: the facility.
    pub facility: Option<String>,
    /// otlp: the collector's base URL; records go to `ENDPOINT/v1/logs`.
    pub endpoint: Option<String>,
    /// otlp: HTTP headers sent with every export (credentials). Never logged.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Records held while the sink is slow or down; more are dropped and counted.
    pub queue: Option<usize>,
    /// Whether audit trail entries go to this sink too.
    #[serde(default)]
    pub audit: bool,
}

impl fmt::Debug for SinkFileConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkFileConfig")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .field("path", &self.path)
            .field("address", &self.address)
            .field("endpoint", &self.endpoint)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The `[flows]` section, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowSettings {
    /// Records older than this are deleted.
    pub max_age: Duration,
    /// All segments together hold at most this many bytes.
    pub max_bytes: u64,
    /// A segment takes records for at most this long.
    pub segment_age: Duration,
    /// A segment holds at most this many bytes.
    pub segment_bytes: u64,
    /// Where records are forwarded.
    pub sinks: Vec<SinkSettings>,
}

impl Default for FlowSettings {
    fn default() -> Self {
        Self {
            max_age: DEFAULT_FLOW_MAX_AGE,
            max_bytes: DEFAULT_FLOW_MAX_BYTES,
            segment_age: DEFAULT_FLOW_SEGMENT_AGE,
            segment_bytes: DEFAULT_FLOW_SEGMENT_BYTES,
            sinks: Vec::new(),
        }
    }
}

/// One sink, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkSettings {
    /// The metrics' `sink` label.
    pub name: String,
    /// Records held while the sink is slow or down.
    pub queue: usize,
    /// Whether audit trail entries go to it too.
    pub audit: bool,
    /// Where and how.
    pub target: SinkTarget,
}

/// Where a sink sends records.
#[derive(Clone, PartialEq)]
pub enum SinkTarget {
    /// JSON lines appended to a file.
    Jsonl {
        /// The file.
        path: PathBuf,
    },
    /// RFC 5424 syslog messages.
    Syslog {
        /// `HOST:PORT`, resolved at each (re)connection.
        address: String,
        /// UDP, one message a datagram, or TCP with octet counting.
        transport: SyslogTransport,
        /// The facility code (16 for local0).
        facility: u8,
    },
    /// OTLP logs over HTTP (protobuf).
    Otlp {
        /// `ENDPOINT/v1/logs`.
        url: url::Url,
        /// Headers sent with each export.
        headers: Vec<(String, String)>,
    },
}

impl fmt::Debug for SinkTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SinkTarget::Jsonl { path } => f.debug_struct("Jsonl").field("path", path).finish(),
            SinkTarget::Syslog {
                address,
                transport,
                facility,
            } => f
                .debug_struct("Syslog")
                .field("address", address)
                .field("transport", transport)
                .field("facility", facility)
                .finish(),
            SinkTarget::Otlp { url, headers } => f
                .debug_struct("Otlp")
                .field("url", &url.as_str())
                .field(
                    "headers",
                    &headers.iter().map(|(name, _)| name).collect::<Vec<_>>(),
                )
                .finish(),
        }
    }
}

/// How syslog messages travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyslogTransport {
    /// RFC 5426: one message per datagram.
    Udp,
    /// RFC 6587 octet counting: `LEN SP MESSAGE`.
    Tcp,
}

impl FileConfig {
    /// The `[flows]` section, or the defaults without one.
    pub fn resolve_flows(&self) -> Result<FlowSettings, ConfigError> {
        match &self.flows {
            Some(flows) => flows.resolve(),
            None => Ok(FlowSettings::default()),
        }
    }
}

impl FlowsFileConfig {
    /// Checks the section.
    pub fn resolve(&self) -> Result<FlowSettings, ConfigError> {
        let invalid = |what: String| ConfigError::Invalid(format!("[flows] {what}"));
        let max_age = self
            .max_age
            .as_deref()
            .map_or(Ok(DEFAULT_FLOW_MAX_AGE), |text| duration("max_age", text))
            .map_err(|e| invalid(e.to_string()))?;
        let segment_age = self
            .segment_age
            .as_deref()
            .map_or(Ok(DEFAULT_FLOW_SEGMENT_AGE), |text| {
                duration("segment_age", text)
            })
            .map_err(|e| invalid(e.to_string()))?;
        let megabytes = |key: &str, value: Option<u64>, default: u64| match value {
            None => Ok(default),
            Some(0) => Err(invalid(format!("{key} must be at least 1"))),
            Some(mb) => mb
                .checked_mul(1 << 20)
                .ok_or_else(|| invalid(format!("{key} {mb} is too large"))),
        };
        let max_bytes = megabytes("max_megabytes", self.max_megabytes, DEFAULT_FLOW_MAX_BYTES)?;
        let segment_bytes = megabytes(
            "segment_megabytes",
            self.segment_megabytes,
            DEFAULT_FLOW_SEGMENT_BYTES,
        )?;
        if segment_bytes.saturating_mul(2) > max_bytes {
            return Err(invalid(format!(
                "max_megabytes ({}) must be at least twice segment_megabytes ({}): retention \
                 deletes whole segments and never the one being written",
                max_bytes >> 20,
                segment_bytes >> 20
            )));
        }
        if segment_age > max_age {
            return Err(invalid(
                "segment_age must not be longer than max_age: retention deletes whole segments"
                    .into(),
            ));
        }
        let mut sinks: Vec<SinkSettings> = Vec::with_capacity(self.sinks.len());
        for (index, entry) in self.sinks.iter().enumerate() {
            let sink = entry.resolve(index)?;
            if sinks.iter().any(|s| s.name == sink.name) {
                return Err(ConfigError::Invalid(format!(
                    "[[flows.sinks]] name {:?} appears twice; give every sink its own",
                    sink.name
                )));
            }
            sinks.push(sink);
        }
        Ok(FlowSettings {
            max_age,
            max_bytes,
            segment_age,
            segment_bytes,
            sinks,
        })
    }
}

impl SinkFileConfig {
    /// Checks the entry, the `index`th of the list.
    fn resolve(&self, index: usize) -> Result<SinkSettings, ConfigError> {
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{}", self.kind, index + 1));
        let invalid =
            |what: String| ConfigError::Invalid(format!("[[flows.sinks]] {name:?}: {what}"));
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "name must be 1 to 64 letters, digits, dashes or underscores".into(),
            ));
        }
        let queue = self.queue.unwrap_or(DEFAULT_SINK_QUEUE);
        if queue == 0 || queue > MAX_SINK_QUEUE {
            return Err(invalid(format!(
                "queue must be between 1 and {MAX_SINK_QUEUE} records"
            )));
        }
        let unused = |keys: &[(&str, bool)]| -> Result<(), ConfigError> {
            match keys.iter().find(|(_, set)| *set) {
                Some((key, _)) => Err(invalid(format!(
                    "{key} does not apply to a sink of type {:?}",
                    self.kind
                ))),
                None => Ok(()),
            }
        };
        let target = match self.kind.as_str() {
            "jsonl" => {
                unused(&[
                    ("address", self.address.is_some()),
                    ("transport", self.transport.is_some()),
                    ("facility", self.facility.is_some()),
                    ("endpoint", self.endpoint.is_some()),
                    ("headers", !self.headers.is_empty()),
                ])?;
                let path = self
                    .path
                    .clone()
                    .ok_or_else(|| invalid("a jsonl sink needs a path".into()))?;
                SinkTarget::Jsonl { path }
            }
            "syslog" => {
                unused(&[
                    ("path", self.path.is_some()),
                    ("endpoint", self.endpoint.is_some()),
                    ("headers", !self.headers.is_empty()),
                ])?;
                let address = self
                    .address
                    .clone()
                    .ok_or_else(|| invalid("a syslog sink needs an address (HOST:PORT)".into()))?;
                if address
                    .rsplit_once(':')
                    .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
                {
                    return Err(invalid(format!("address {address:?} is not HOST:PORT")));
                }
                let transport = match self.transport.as_deref() {
                    None | Some("udp") => SyslogTransport::Udp,
                    Some("tcp") => SyslogTransport::Tcp,
                    Some(other) => {
                        return Err(invalid(format!(
                            "transport {other:?} is neither \"udp\" nor \"tcp\""
                        )))
                    }
                };
                let facility = match self.facility.as_deref() {
                    None => 16,
                    Some(name) => facility_code(name).ok_or_else(|| {
                        invalid(format!(
                            "facility {name:?} is not one of local0 to local7, user or daemon"
                        ))
                    })?,
                };
                SinkTarget::Syslog {
                    address,
                    transport,
                    facility,
                }
            }
            "otlp" => {
                unused(&[
                    ("path", self.path.is_some()),
                    ("address", self.address.is_some()),
                    ("transport", self.transport.is_some()),
                    ("facility", self.facility.is_some()),
                ])?;
                let endpoint = self.endpoint.as_deref().ok_or_else(|| {
                    invalid("an otlp sink needs an endpoint (http(s)://HOST:PORT)".into())
                })?;
                let url = otlp_logs_url(endpoint).map_err(invalid)?;
                for (header, value) in &self.headers {
                    let valid_name = hyper::header::HeaderName::from_bytes(header.as_bytes());
                    let valid_value = hyper::header::HeaderValue::from_str(value);
                    if valid_name.is_err() || valid_value.is_err() {
                        return Err(invalid(format!(
                            "header {header:?} is not a valid HTTP header name and value"
                        )));
                    }
                }
                SinkTarget::Otlp {
                    url,
                    headers: self
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                }
            }
            other => {
                return Err(invalid(format!(
                    "type {other:?} is not one of \"jsonl\", \"syslog\" or \"otlp\""
                )))
            }
        };
        Ok(SinkSettings {
            name,
            queue,
            audit: self.audit,
            target,
        })
    }
}

/// `ENDPOINT/v1/logs`, as OTLP/HTTP exporters derive it from the base URL.
fn otlp_logs_url(endpoint: &str) -> Result<url::Url, String> {
    let base = url::Url::parse(endpoint)
        .map_err(|e| format!("endpoint {endpoint:?} is not a URL ({e})"))?;
    if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
        return Err(format!(
            "endpoint {endpoint:?} must be an http:// or https:// URL with a host"
        ));
    }
    if !base.username().is_empty() || base.password().is_some() {
        // Errors and logs name the URL; credentials belong in `headers`.
        return Err(
            "endpoint must not hold credentials; put them in headers, which are never logged"
                .into(),
        );
    }
    let path = format!("{}/v1/logs", base.path().trim_end_matches('/'));
    let mut url = base;
    url.set_path(&path);
    Ok(url)
}

/// The RFC 5424 facility code of the names a sink may use.
fn facility_code(name: &str) -> Option<u8> {
    match name {
        "user" => Some(1),
        "daemon" => Some(3),
        _ => {
            let n: u8 = name.strip_prefix("local")?.parse().ok()?;
            (n <= 7).then_some(16 + n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flows(text: &str) -> Result<FlowSettings, ConfigError> {
        super::super::parse(text).unwrap().resolve_flows()
    }

    #[test]
    fn without_a_section_the_defaults_apply() {
        let settings = flows("").unwrap();
        assert_eq!(settings, FlowSettings::default());
        assert_eq!(settings.max_age, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(settings.max_bytes, 1 << 30);
    }

    #[test]
    fn every_sink_type_resolves() {
        let settings = flows(
            r#"
            [flows]
            max_age = "2d"
            max_megabytes = 256
            segment_megabytes = 16
            segment_age = "10m"
            [[flows.sinks]]
            type = "jsonl"
            path = "/var/log/weft/flows.jsonl"
            [[flows.sinks]]
            type = "syslog"
            name = "siem"
            transport = "tcp"
            address = "siem.example.com:6514"
            facility = "local3"
            audit = true
            [[flows.sinks]]
            type = "otlp"
            endpoint = "https://collector.example.com:4318/otel/"
            headers = { authorization = "Bearer s3cret" }
            queue = 50
            "#,
        )
        .unwrap();
        assert_eq!(settings.max_age, Duration::from_secs(2 * 24 * 3600));
        assert_eq!(settings.segment_bytes, 16 << 20);
        let names: Vec<_> = settings.sinks.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["jsonl-1", "siem", "otlp-3"]);
        assert_eq!(
            settings.sinks[1].target,
            SinkTarget::Syslog {
                address: "siem.example.com:6514".into(),
                transport: SyslogTransport::Tcp,
                facility: 19,
            }
        );
        assert!(settings.sinks[1].audit);
        let SinkTarget::Otlp { url, .. } = &settings.sinks[2].target else {
            panic!("not an otlp sink: {:?}", settings.sinks[2]);
        };
        assert_eq!(
            url.as_str(),
            "https://collector.example.com:4318/otel/v1/logs"
        );
        assert_eq!(settings.sinks[2].queue, 50);
        let debug = format!("{:?}", settings.sinks[2]);
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn mistakes_are_named() {
        for (text, needle) in [
            ("[flows]\nmax_age = \"soon\"", "max_age"),
            ("[flows]\nmax_megabytes = 10\nsegment_megabytes = 8", "twice"),
            ("[flows]\nmax_age = \"1h\"\nsegment_age = \"2h\"", "segment_age"),
            ("[[flows.sinks]]\ntype = \"kafka\"", "kafka"),
            ("[[flows.sinks]]\ntype = \"jsonl\"", "needs a path"),
            (
                "[[flows.sinks]]\ntype = \"jsonl\"\npath = \"/x\"\naddress = \"a:1\"",
                "address does not apply",
            ),
            ("[[flows.sinks]]\ntype = \"syslog\"\naddress = \"nohost\"", "HOST:PORT"),
            (
                "[[flows.sinks]]\ntype = \"syslog\"\naddress = \"h:514\"\ntransport = \"quic\"",
                "quic",
            ),
            (
                "[[flows.sinks]]\ntype = \"syslog\"\naddress = \"h:514\"\nfacility = \"local9\"",
                "local9",
            ),
            ("[[flows.sinks]]\ntype = \"otlp\"\nendpoint = \"ftp://h\"", "http"),
            (
                "[[flows.sinks]]\ntype = \"otlp\"\nendpoint = \"https://u:secret@h\"",
                "must not hold credentials",
            ),
            (
                "[[flows.sinks]]\ntype = \"jsonl\"\npath = \"/a\"\nname = \"x\"\n[[flows.sinks]]\ntype = \"jsonl\"\npath = \"/b\"\nname = \"x\"",
                "twice",
            ),
            ("[[flows.sinks]]\ntype = \"jsonl\"\npath = \"/a\"\nqueue = 0", "queue"),
        ] {
            let err = flows(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
