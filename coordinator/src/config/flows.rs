//! The `[flows]` section: how long the coordinator keeps flow records.
//!
//! ```toml
//! [flows]
//! max_age = "7d"            # records older than this are deleted, a segment at a time
//! max_megabytes = 1024      # and the oldest segments go once all of them hold more
//! segment_age = "1h"        # a segment is closed and a new one started after this long
//! segment_megabytes = 64    # or once it holds this much
//! ```

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
}

impl Default for FlowSettings {
    fn default() -> Self {
        Self {
            max_age: DEFAULT_FLOW_MAX_AGE,
            max_bytes: DEFAULT_FLOW_MAX_BYTES,
            segment_age: DEFAULT_FLOW_SEGMENT_AGE,
            segment_bytes: DEFAULT_FLOW_SEGMENT_BYTES,
        }
    }
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
        Ok(FlowSettings {
            max_age,
            max_bytes,
            segment_age,
            segment_bytes,
        })
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
    fn mistakes_are_named() {
        for (text, needle) in [
            ("[flows]\nmax_age = \"soon\"", "max_age"),
            (
                "[flows]\nmax_megabytes = 10\nsegment_megabytes = 8",
                "twice",
            ),
            (
                "[flows]\nmax_age = \"1h\"\nsegment_age = \"2h\"",
                "segment_age",
            ),
        ] {
            let err = flows(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
