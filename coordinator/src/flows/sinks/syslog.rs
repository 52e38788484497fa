//! The syslog sink: RFC 5424 messages over UDP (RFC 5426, one message a
//! datagram) or TCP (RFC 6587 octet counting, `LEN SP MESSAGE`).
//!
//! Each message is
//! `<PRI>1 TIMESTAMP HOSTNAME weft-coordinator PID MSGID - BOM JSON`:
//! MSGID `flow` or `audit`; no structured data; the MSG is the record as
//! `flows --json` prints one (or the entry as `audit --json` does), UTF-8
//! with its byte order mark as RFC 5424 asks. TIMESTAMP is when the
//! coordinator kept the record (or recorded the entry). Severity: `deny`
//! warning, `audit-deny` notice, `accept` and `opened` informational, audit
//! entries notice.

use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpStream, UdpSocket};
use weft_proto::flows::FlowVerdict;

use super::{Item, SinkError};
use crate::config::SyslogTransport;

/// How long connecting or writing may take before the delivery fails.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest UDP payload over IPv4; a larger message is dropped.
const MAX_DATAGRAM: usize = 65_507;
const APP_NAME: &str = "weft-coordinator";
/// Severities (RFC 5424 section 6.2.1).
const WARNING: u8 = 4;
const NOTICE: u8 = 5;
const INFORMATIONAL: u8 = 6;

#[derive(Debug)]
pub(super) struct Syslog {
    address: String,
    transport: SyslogTransport,
    facility: u8,
    hostname: String,
    procid: u32,
    udp: Option<UdpSocket>,
    tcp: Option<TcpStream>,
}

impl Syslog {
    pub(super) fn new(address: String, transport: SyslogTransport, facility: u8) -> Self {
        Self {
            address,
            transport,
            facility,
            hostname: hostname(),
            procid: std::process::id(),
            udp: None,
            tcp: None,
        }
    }

    /// Sends every item; returns how many were dropped as too large for a
    /// datagram.
    pub(super) async fn deliver(&mut self, items: &[Item]) -> Result<usize, SinkError> {
        let mut messages = Vec::with_capacity(items.len());
        for item in items {
            messages.push(format(item, self.facility, &self.hostname, self.procid)?);
        }
        let delivered = match self.transport {
            SyslogTransport::Udp => self.send_udp(&messages).await,
            SyslogTransport::Tcp => self.send_tcp(&messages).await.map(|()| 0),
        };
        if delivered.is_err() {
            self.udp = None;
            self.tcp = None;
        }
        delivered
    }

    async fn resolve(&self) -> Result<SocketAddr, SinkError> {
        let mut addresses = tokio::net::lookup_host(&self.address)
            .await
            .map_err(|source| SinkError::Resolve {
                address: self.address.clone(),
                source,
            })?;
        addresses.next().ok_or_else(|| SinkError::NoAddress {
            address: self.address.clone(),
        })
    }

    fn send_error(&self, source: std::io::Error) -> SinkError {
        SinkError::Send {
            address: self.address.clone(),
            source,
        }
    }

    async fn send_udp(&mut self, messages: &[String]) -> Result<usize, SinkError> {
        let socket = match self.udp.take() {
            Some(socket) => socket,
            None => {
                let to = self.resolve().await?;
                let any: SocketAddr = if to.is_ipv4() {
                    (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let socket = UdpSocket::bind(any).await.map_err(|e| self.send_error(e))?;
                socket.connect(to).await.map_err(|e| self.send_error(e))?;
                socket
            }
        };
        let mut dropped = 0;
        for message in messages {
            if message.len() > MAX_DATAGRAM {
                dropped += 1;
                continue;
            }
            socket
                .send(message.as_bytes())
                .await
                .map_err(|e| self.send_error(e))?;
        }
        self.udp = Some(socket);
        Ok(dropped)
    }

    async fn send_tcp(&mut self, messages: &[String]) -> Result<(), SinkError> {
        let timed_out = || SinkError::Timeout {
            address: self.address.clone(),
            timeout: IO_TIMEOUT,
        };
        let mut stream = match self.tcp.take() {
            Some(stream) => stream,
            None => {
                let to = self.resolve().await?;
                tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(to))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|e| self.send_error(e))?
            }
        };
        let mut bytes = Vec::new();
        for message in messages {
            bytes.extend_from_slice(format!("{} ", message.len()).as_bytes());
            bytes.extend_from_slice(message.as_bytes());
        }
        tokio::time::timeout(IO_TIMEOUT, stream.write_all(&bytes))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| self.send_error(e))?;
        self.tcp = Some(stream);
        Ok(())
    }
}

/// One RFC 5424 message.
fn format(item: &Item, facility: u8, hostname: &str, procid: u32) -> Result<String, SinkError> {
    let (severity, msgid, time) = match item {
        Item::Flow(view) => {
            let severity = match view.kept.record.verdict {
                FlowVerdict::Deny => WARNING,
                FlowVerdict::AuditDeny => NOTICE,
                FlowVerdict::Accept | FlowVerdict::Opened => INFORMATIONAL,
            };
            let time = UNIX_EPOCH + Duration::from_millis(view.received_ms);
            (severity, "flow", time)
        }
        Item::Audit(entry) => (
            NOTICE,
            "audit",
            UNIX_EPOCH + Duration::from_secs(entry.time),
        ),
    };
    let pri = u16::from(facility) * 8 + u16::from(severity);
    let timestamp = humantime::format_rfc3339_millis(time);
    Ok(format!(
        "<{pri}>1 {timestamp} {hostname} {APP_NAME} {procid} {msgid} - \u{feff}{}",
        item.json()?
    ))
}

/// This machine's name as RFC 5424 allows it (printable US-ASCII, at most
/// 255 characters), or `-` when it is not known.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name = name.trim();
    if !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| (33..=126).contains(&b)) {
        name.to_owned()
    } else {
        "-".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::tests::view;
    use super::*;
    use crate::audit::{Actor, AuditEntry, Event};
    use crate::flows::FlowView;

    fn parse(message: &str) -> syslog_rfc5424::SyslogMessage {
        syslog_rfc5424::parse_message(message).unwrap()
    }

    #[test]
    fn a_flow_is_one_rfc5424_message_with_the_record_as_json() {
        let mut denied = view();
        denied.kept.record.verdict = FlowVerdict::Deny;
        let message = format(&Item::Flow(Arc::new(denied.clone())), 16, "coord-1", 42).unwrap();
        let parsed = parse(&message);
        assert_eq!(parsed.facility, syslog_rfc5424::SyslogFacility::LOG_LOCAL0);
        assert_eq!(parsed.severity, syslog_rfc5424::SyslogSeverity::SEV_WARNING);
        assert_eq!(parsed.hostname.as_deref(), Some("coord-1"));
        assert_eq!(parsed.appname.as_deref(), Some("weft-coordinator"));
        assert_eq!(parsed.msgid.as_deref(), Some("flow"));
        assert_eq!(parsed.timestamp, Some(1_780_000_000));
        assert_eq!(parsed.timestamp_nanos, Some(123_000_000));
        let json = parsed.msg.strip_prefix('\u{feff}').unwrap();
        assert_eq!(serde_json::from_str::<FlowView>(json).unwrap(), denied);
    }

    #[test]
    fn audit_entries_carry_their_own_msgid() {
        let entry = AuditEntry::new(
            3,
            1_780_000_000,
            Actor::Admin { uid: Some(0) },
            Event::NodeDeleted {
                node: weft_proto::NodeId(4),
                name: "db".into(),
            },
            crate::audit::GENESIS_HASH.into(),
        );
        let message = format(&Item::Audit(Arc::new(entry)), 19, "-", 1).unwrap();
        let parsed = parse(&message);
        assert_eq!(parsed.msgid.as_deref(), Some("audit"));
        assert_eq!(parsed.facility, syslog_rfc5424::SyslogFacility::LOG_LOCAL3);
        assert_eq!(parsed.severity, syslog_rfc5424::SyslogSeverity::SEV_NOTICE);
        assert_eq!(parsed.hostname, None);
    }
}
