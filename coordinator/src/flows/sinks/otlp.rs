//! The OTLP sink: logs over HTTP, `POST ENDPOINT/v1/logs` with a protobuf
//! `ExportLogsServiceRequest`, built from the OpenTelemetry protocol's own
//! definitions (the `opentelemetry-proto` crate).
//!
//! One resource (`service.name` = `weft-coordinator`, `host.name`) and one
//! scope (`weft.flows`) per export. Each record is a log record whose body
//! is the record as `flows --json` prints one, whose attributes carry its
//! fields (semantic-convention names where there is one: `source.address`,
//! `destination.port`, `network.transport`; `weft.*` for the rest), whose
//! event name is `weft.flow`, time the flow's last packet, observed time
//! when the coordinator kept it, and severity WARN for `deny`, INFO2 for
//! `audit-deny`, INFO otherwise. Audit entries are `weft.audit` events with
//! the entry as the body.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message as _;
use weft_proto::flows::{FlowDirection, FlowEndpoint, FlowPath, FlowVerdict};

use super::{Item, SinkError};
use crate::flows::FlowView;

/// How long one export may take.
const TIMEOUT: Duration = Duration::from_secs(10);
const SERVICE_NAME: &str = "weft-coordinator";
const SCOPE: &str = "weft.flows";

#[derive(Debug)]
pub(super) struct Otlp {
    url: url::Url,
    client: reqwest::Client,
    headers: reqwest::header::HeaderMap,
    host: String,
}

impl Otlp {
    pub(super) fn new(url: url::Url, headers: &[(String, String)]) -> Result<Self, reqwest::Error> {
        let mut map = reqwest::header::HeaderMap::new();
        for (name, value) in headers {
            // Checked when the configuration was read.
            if let (Ok(name), Ok(mut value)) = (
                reqwest::header::HeaderName::from_bytes(name.as_bytes()),
                reqwest::header::HeaderValue::from_str(value),
            ) {
                value.set_sensitive(true);
                map.insert(name, value);
            }
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .unwrap_or_default();
        Ok(Self {
            url,
            client: reqwest::Client::builder().timeout(TIMEOUT).build()?,
            headers: map,
            host,
        })
    }

    pub(super) async fn deliver(&mut self, items: &[Item]) -> Result<(), SinkError> {
        let request = export(items, &self.host)?;
        let response = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .body(request.encode_to_vec())
            .send()
            .await
            .map_err(|source| SinkError::Http {
                url: self.url.to_string(),
                source: source.without_url(),
            })?;
        let status = response.status();
        if !status.is_success() {
            return Err(SinkError::Status {
                url: self.url.to_string(),
                status,
            });
        }
        Ok(())
    }
}

/// The export request carrying `items`.
fn export(items: &[Item], host: &str) -> Result<ExportLogsServiceRequest, SinkError> {
    let mut records = Vec::with_capacity(items.len());
    for item in items {
        records.push(log_record(item)?);
    }
    let mut resource = vec![string("service.name", SERVICE_NAME)];
    if !host.is_empty() {
        resource.push(string("host.name", host));
    }
    Ok(ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: resource,
                ..Resource::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: SCOPE.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..InstrumentationScope::default()
                }),
                log_records: records,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    })
}

fn log_record(item: &Item) -> Result<LogRecord, SinkError> {
    let body = Some(AnyValue {
        value: Some(Value::StringValue(item.json()?)),
    });
    Ok(match item {
        Item::Flow(view) => {
            let severity = match view.kept.record.verdict {
                FlowVerdict::Deny => SeverityNumber::Warn,
                FlowVerdict::AuditDeny => SeverityNumber::Info2,
                FlowVerdict::Accept | FlowVerdict::Opened => SeverityNumber::Info,
            };
            LogRecord {
                time_unix_nano: view.kept.record.end_ms.saturating_mul(1_000_000),
                observed_time_unix_nano: view.received_ms.saturating_mul(1_000_000),
                severity_number: severity as i32,
                severity_text: severity_text(severity).into(),
                body,
                attributes: flow_attributes(view),
                event_name: "weft.flow".into(),
                ..LogRecord::default()
            }
        }
        Item::Audit(entry) => {
            let time = entry.time.saturating_mul(1_000_000_000);
            LogRecord {
                time_unix_nano: time,
                observed_time_unix_nano: time,
                severity_number: SeverityNumber::Info2 as i32,
                severity_text: severity_text(SeverityNumber::Info2).into(),
                body,
                attributes: vec![
                    int("weft.audit.seq", entry.seq),
                    string("weft.audit.event", entry.event.kind()),
                    string("weft.audit.actor", &entry.actor.to_string()),
                    string("weft.audit.hash", &entry.hash),
                ],
                event_name: "weft.audit".into(),
                ..LogRecord::default()
            }
        }
    })
}

fn severity_text(severity: SeverityNumber) -> &'static str {
    match severity {
        SeverityNumber::Warn => "WARN",
        SeverityNumber::Info2 => "INFO2",
        _ => "INFO",
    }
}

fn flow_attributes(view: &FlowView) -> Vec<KeyValue> {
    let record = &view.kept.record;
    let verdict = match record.verdict {
        FlowVerdict::Accept => "accept",
        FlowVerdict::Deny => "deny",
        FlowVerdict::AuditDeny => "audit-deny",
        FlowVerdict::Opened => "opened",
    };
    let direction = match record.direction {
        FlowDirection::Inbound => "inbound",
        FlowDirection::Outbound => "outbound",
    };
    let transport = match record.protocol {
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        1 => "icmp".to_owned(),
        58 => "icmpv6".to_owned(),
        other => other.to_string(),
    };
    let mut attributes = vec![
        string("weft.flow.id", &record.id.to_string()),
        string("weft.flow.verdict", verdict),
        string("weft.flow.direction", direction),
        boolean("weft.flow.ended", record.ended),
        string("network.transport", &transport),
        string("source.address", &record.src.ip().to_string()),
        int("source.port", u64::from(record.src.port())),
        string("destination.address", &record.dst.ip().to_string()),
        int("destination.port", u64::from(record.dst.port())),
        int("weft.flow.to_dst.bytes", record.to_dst.bytes),
        int("weft.flow.to_dst.packets", record.to_dst.packets),
        int("weft.flow.to_src.bytes", record.to_src.bytes),
        int("weft.flow.to_src.packets", record.to_src.packets),
        int("weft.reporter.node", view.reporter.node.0),
        string("weft.reporter.name", &view.reporter.name),
        int("weft.batch", view.batch),
        int("weft.record.index", u64::from(view.kept.index)),
    ];
    if let Some(rule) = record.rule {
        attributes.push(int("weft.rule.line", u64::from(rule.line)));
        attributes.push(string("weft.rule.id", &rule.id.to_string()));
    }
    match &record.path {
        FlowPath::Direct => attributes.push(string("weft.flow.path", "direct")),
        FlowPath::Relay { name } => {
            attributes.push(string("weft.flow.path", "relay"));
            attributes.push(string("weft.flow.relay", name));
        }
        FlowPath::Unknown => attributes.push(string("weft.flow.path", "unknown")),
    }
    if let Some(summary) = &record.summary {
        attributes.push(int("weft.flow.summary.flows", summary.flows));
    }
    endpoint(
        &mut attributes,
        "weft.src",
        &record.src_identity,
        view.kept.src_verified,
    );
    endpoint(
        &mut attributes,
        "weft.dst",
        &record.dst_identity,
        view.kept.dst_verified,
    );
    attributes
}

/// `PREFIX.node`, `.name`, `.user`, `.workload`, `.tags`, `.groups`, `.verified`.
fn endpoint(attributes: &mut Vec<KeyValue>, prefix: &str, end: &FlowEndpoint, verified: bool) {
    let key = |what: &str| format!("{prefix}.{what}");
    if let Some(node) = end.node {
        attributes.push(int(&key("node"), node.0));
    }
    let identity = &end.identity;
    let strings = [
        ("name", &end.name),
        ("user", &identity.user),
        ("workload", &identity.workload),
    ];
    for (what, value) in strings {
        if let Some(value) = value {
            attributes.push(string(&key(what), value));
        }
    }
    for (what, list) in [("tags", &identity.tags), ("groups", &identity.groups)] {
        if !list.is_empty() {
            let values = list
                .iter()
                .map(|s| AnyValue {
                    value: Some(Value::StringValue(s.clone())),
                })
                .collect();
            attributes.push(KeyValue {
                key: key(what),
                value: Some(AnyValue {
                    value: Some(Value::ArrayValue(ArrayValue { values })),
                }),
                ..KeyValue::default()
            });
        }
    }
    attributes.push(boolean(&key("verified"), verified));
}

fn string(key: &str, value: &str) -> KeyValue {
    attribute(key, Value::StringValue(value.to_owned()))
}

fn int(key: &str, value: u64) -> KeyValue {
    attribute(
        key,
        Value::IntValue(i64::try_from(value).unwrap_or(i64::MAX)),
    )
}

fn boolean(key: &str, value: bool) -> KeyValue {
    attribute(key, Value::BoolValue(value))
}

fn attribute(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::tests::view;
    use super::*;

    fn attribute_of<'a>(record: &'a LogRecord, key: &str) -> Option<&'a Value> {
        record
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    #[test]
    fn a_flow_becomes_a_log_record_that_decodes_as_sent() {
        let mut audited = view();
        audited.kept.record.verdict = FlowVerdict::AuditDeny;
        let request = export(&[Item::Flow(Arc::new(audited.clone()))], "coord-1").unwrap();
        let decoded = ExportLogsServiceRequest::decode(&*request.encode_to_vec()).unwrap();
        assert_eq!(decoded, request);
        let resource = decoded.resource_logs[0].resource.as_ref().unwrap();
        assert_eq!(
            resource.attributes[0],
            string("service.name", "weft-coordinator")
        );
        let record = &decoded.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!(record.event_name, "weft.flow");
        assert_eq!(record.severity_number, SeverityNumber::Info2 as i32);
        assert_eq!(
            record.time_unix_nano,
            audited.kept.record.end_ms * 1_000_000
        );
        assert_eq!(
            attribute_of(record, "weft.flow.verdict"),
            Some(&Value::StringValue("audit-deny".into()))
        );
        assert_eq!(
            attribute_of(record, "destination.port"),
            Some(&Value::IntValue(5432))
        );
        assert_eq!(
            attribute_of(record, "weft.rule.line"),
            Some(&Value::IntValue(3))
        );
        let Some(Value::StringValue(body)) = record.body.as_ref().and_then(|b| b.value.as_ref())
        else {
            panic!("no string body: {record:?}");
        };
        assert_eq!(serde_json::from_str::<FlowView>(body).unwrap(), audited);
    }
}
