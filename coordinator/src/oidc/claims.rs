//! Who a verified ID token says the person is, and whether the
//! configuration admits them.

use serde_json::Value;
use weft_proto::canonical;

use crate::config::OidcSettings;

/// The prefix that turns an IdP group into a policy principal.
pub(crate) const GROUP_PREFIX: &str = "group:idp:";
/// At most this many groups are taken from a token.
const MAX_GROUPS: usize = 256;

/// A person the identity provider vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoginIdentity {
    /// The verified email address, in canonical form.
    pub(crate) email: String,
    /// Their groups as principals (`group:idp:NAME`), sorted.
    pub(crate) groups: Vec<String>,
}

/// Why a verified token's person is not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AdmissionError {
    #[error("the identity provider did not return an email address; add the `email` scope to [oidc] scopes")]
    NoEmail,
    #[error("the identity provider says the email address {0} is not verified")]
    Unverified(String),
    #[error("{0} is not in an allowed domain ({1}); ask an administrator to add the domain to [oidc] allowed_domains")]
    Domain(String, String),
    #[error("{0} is not in [oidc] allowed_users; ask an administrator to add it")]
    User(String),
    #[error("{0} is in none of the allowed groups ({1}); ask an administrator to add you to one")]
    Group(String, String),
}

/// Reads the person from a verified token's claims and applies the
/// allow-lists. `payload` is the token's whole claim set, for the groups
/// claim, whose name is configurable.
pub(crate) fn admit(
    settings: &OidcSettings,
    email: Option<&str>,
    email_verified: Option<bool>,
    payload: &Value,
) -> Result<LoginIdentity, AdmissionError> {
    let email = email
        .map(|e| canonical::email(e.trim()).into_owned())
        .filter(|e| !e.is_empty())
        .ok_or(AdmissionError::NoEmail)?;
    if email_verified == Some(false) {
        return Err(AdmissionError::Unverified(email));
    }
    let domain = email.rsplit_once('@').map(|(_, d)| d).unwrap_or_default();
    let domain = canonical::domain(domain);
    if !settings.allowed_domains.is_empty()
        && !settings.allowed_domains.iter().any(|d| *d == domain)
    {
        return Err(AdmissionError::Domain(
            email.clone(),
            settings.allowed_domains.join(", "),
        ));
    }
    if !settings.allowed_users.is_empty() && !settings.allowed_users.contains(&email) {
        return Err(AdmissionError::User(email));
    }
    let names = group_names(payload.get(&settings.groups_claim));
    if !settings.allowed_groups.is_empty()
        && !names.iter().any(|g| settings.allowed_groups.contains(g))
    {
        return Err(AdmissionError::Group(
            email,
            settings.allowed_groups.join(", "),
        ));
    }
    let mut groups: Vec<String> = names
        .into_iter()
        .map(|name| format!("{GROUP_PREFIX}{name}"))
        .collect();
    groups.sort();
    groups.dedup();
    Ok(LoginIdentity { email, groups })
}

/// The group names in a groups claim: an array of strings (most IdPs) or a
/// single string. Names that cannot be policy principals (empty, or with
/// whitespace or commas) are skipped.
fn group_names(claim: Option<&Value>) -> Vec<String> {
    let raw: Vec<&str> = match claim {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(one)) => vec![one.as_str()],
        _ => Vec::new(),
    };
    raw.into_iter()
        .filter(|name| {
            !name.is_empty()
                && name.len() <= 256
                && !name.chars().any(|c| c.is_whitespace() || c == ',')
        })
        .take(MAX_GROUPS)
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn settings() -> OidcSettings {
        OidcSettings {
            issuer: "https://idp.example.com".into(),
            client_id: "weft".into(),
            client_secret: "s".into(),
            scopes: vec!["openid".into()],
            allowed_domains: vec![],
            allowed_users: vec![],
            allowed_groups: vec![],
            groups_claim: "groups".into(),
            key_expiry: Duration::from_secs(60),
        }
    }

    #[test]
    fn groups_become_principals() {
        let payload = json!({"groups": ["eng", "ops", "eng", "bad name", ""]});
        let who = admit(&settings(), Some("Alice@Example.com"), Some(true), &payload).unwrap();
        assert_eq!(who.email, "alice@example.com");
        assert_eq!(who.groups, ["group:idp:eng", "group:idp:ops"]);
        let one = admit(&settings(), Some("a@x"), None, &json!({"groups": "eng"})).unwrap();
        assert_eq!(one.groups, ["group:idp:eng"]);
        let custom = OidcSettings {
            groups_claim: "roles".into(),
            ..settings()
        };
        let who = admit(&custom, Some("a@x"), None, &json!({"roles": ["r"]})).unwrap();
        assert_eq!(who.groups, ["group:idp:r"]);
    }

    #[test]
    fn allow_lists_refuse_with_the_reason() {
        let domains = OidcSettings {
            allowed_domains: vec!["example.com".into()],
            ..settings()
        };
        let err = admit(&domains, Some("eve@evil.test"), None, &json!({})).unwrap_err();
        assert!(err.to_string().contains("allowed_domains"), "{err}");
        assert!(admit(&domains, Some("bob@example.com"), None, &json!({})).is_ok());
        let users = OidcSettings {
            allowed_users: vec!["bob@example.com".into()],
            ..settings()
        };
        assert!(matches!(
            admit(&users, Some("carol@example.com"), None, &json!({})),
            Err(AdmissionError::User(_))
        ));
        let groups = OidcSettings {
            allowed_groups: vec!["eng".into()],
            ..settings()
        };
        assert!(matches!(
            admit(&groups, Some("a@x"), None, &json!({"groups": ["sales"]})),
            Err(AdmissionError::Group(..))
        ));
        assert_eq!(
            admit(&settings(), None, None, &json!({})),
            Err(AdmissionError::NoEmail)
        );
        assert!(matches!(
            admit(&settings(), Some("a@x"), Some(false), &json!({})),
            Err(AdmissionError::Unverified(_))
        ));
    }

    proptest! {
        #[test]
        fn any_groups_claim_yields_clean_principals(claim in proptest::collection::vec(".{0,12}", 0..8)) {
            let who = admit(&settings(), Some("a@x"), None, &json!({"groups": claim})).unwrap();
            for group in &who.groups {
                let name = group.strip_prefix(GROUP_PREFIX).unwrap();
                prop_assert!(!name.is_empty());
                prop_assert!(!name.chars().any(|c| c.is_whitespace() || c == ','));
            }
        }
    }
}
