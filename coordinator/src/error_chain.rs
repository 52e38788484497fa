//! An error's message with its causes, each said once. weft's errors name
//! their cause in their own message and keep it as `source()` too, while
//! reqwest and openidconnect keep the useful detail in their causes only:
//! printing every message of the chain would repeat the first kind and
//! printing only the first would lose the second.

/// `error`'s message followed by each cause the text does not already say.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigError;

    #[test]
    fn a_cause_the_message_already_names_is_said_once() {
        let error = ConfigError::Read {
            path: "/etc/weft/coordinator.toml".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        };
        assert_eq!(
            error_chain(&error),
            "cannot read the configuration file /etc/weft/coordinator.toml: gone"
        );
    }

    #[test]
    fn a_cause_the_message_does_not_name_is_appended() {
        let error = crate::admin::ClientError::PermissionDenied {
            socket: "/var/lib/weft/admin.sock".into(),
            source: std::io::Error::from_raw_os_error(13),
        };
        assert!(error_chain(&error)
            .ends_with("`weft-coordinator serve`: Permission denied (os error 13)"));
    }
}
