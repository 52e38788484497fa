//! From a verified token's claims to a SPIFFE ID, by the issuer's `kind`.
//!
//! Every claim value lands in the ID verbatim or not at all: a value that
//! would make an invalid ID, or one whose `/` would add path segments, is
//! refused rather than escaped, so two different workloads can never be
//! mapped onto one identity.

use serde_json::Value;

/// The longest SPIFFE ID accepted (the SPIFFE specification's limit).
const MAX_SPIFFE_ID: usize = 2048;
/// The longest trust domain accepted.
const MAX_TRUST_DOMAIN: usize = 255;

/// How an issuer's claims become an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// `sub` = `system:serviceaccount:NS:SA` → `spiffe://TD/ns/NS/sa/SA`.
    Kubernetes,
    /// `repository` and `job_workflow_ref` →
    /// `spiffe://TD/github/OWNER/REPO/workflow/FILE/ref/REF`.
    GithubActions,
    /// An operator's template over the claims.
    Generic(Template),
}

/// Why a token's claims name no valid identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MappingError {
    #[error("the token has no string claim `{0}`; the issuer must include it")]
    MissingClaim(String),
    #[error("the token's `sub` is {0:?}, not a Kubernetes service account (`system:serviceaccount:NAMESPACE:NAME`); use a projected service-account token")]
    NotServiceAccount(String),
    #[error("the token's `{claim}` claim {value:?} does not have the form {expected}")]
    Shape {
        claim: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("the token's `{claim}` claim {value:?} cannot be part of a SPIFFE ID (only letters, digits, `.`, `-` and `_` are allowed, and not `.` or `..` alone); it is refused rather than rewritten")]
    BadValue { claim: String, value: String },
    #[error("the identity {0:?} made from the token is not a valid SPIFFE ID; fix the issuer's `identity` template")]
    BadId(String),
}

/// A parsed `identity` template: `spiffe://{trust_domain}/vm/{google.compute_engine.instance_name}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    TrustDomain,
    /// A dotted path into the claims.
    Claim(Vec<String>),
}

impl Template {
    /// Parses `text` and checks that every ID it can produce lies in
    /// `trust_domain`: it must start with `spiffe://{trust_domain}/` (or the
    /// trust domain written out), and have at least one placeholder-free
    /// character after it or a placeholder.
    pub(crate) fn parse(text: &str, trust_domain: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                Some(i) if rest[i..].starts_with('}') => {
                    return Err(format!(
                        "identity template {text:?} has a `}}` without `{{`"
                    ));
                }
                Some(i) => {
                    if i > 0 {
                        parts.push(Part::Literal(rest[..i].to_owned()));
                    }
                    let after = &rest[i + 1..];
                    let Some(end) = after.find('}') else {
                        return Err(format!(
                            "identity template {text:?} has a `{{` without `}}`"
                        ));
                    };
                    let name = &after[..end];
                    parts.push(placeholder(name, text)?);
                    rest = &after[end + 1..];
                }
                None => {
                    parts.push(Part::Literal(rest.to_owned()));
                    rest = "";
                }
            }
        }
        let template = Self { parts };
        let prefix = template.fixed_prefix(trust_domain);
        let wanted = format!("spiffe://{trust_domain}/");
        if !prefix.starts_with(&wanted) {
            return Err(format!(
                "identity template {text:?} must start with \"spiffe://{{trust_domain}}/\" so that every identity of this issuer lies in its trust domain"
            ));
        }
        Ok(template)
    }

    /// The text before the first claim placeholder.
    fn fixed_prefix(&self, trust_domain: &str) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::TrustDomain => out.push_str(trust_domain),
                Part::Claim(_) => break,
            }
        }
        out
    }

    fn render(&self, claims: &Value, trust_domain: &str) -> Result<String, MappingError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::TrustDomain => out.push_str(trust_domain),
                Part::Claim(path) => {
                    let name = path.join(".");
                    let value = path
                        .iter()
                        .try_fold(claims, |v, key| v.get(key))
                        .and_then(scalar)
                        .ok_or_else(|| MappingError::MissingClaim(name.clone()))?;
                    out.push_str(&segment(&name, &value)?);
                }
            }
        }
        Ok(out)
    }
}

fn placeholder(name: &str, template: &str) -> Result<Part, String> {
    if name == "trust_domain" {
        return Ok(Part::TrustDomain);
    }
    let path: Vec<String> = name.split('.').map(str::to_owned).collect();
    if path.iter().any(|key| {
        key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == ':')
    }) {
        return Err(format!(
            "identity template {template:?} has the placeholder {{{name}}}; write {{claim}} or {{claim.nested.key}} (letters, digits, `_`, `-`, `:`) or {{trust_domain}}"
        ));
    }
    Ok(Part::Claim(path))
}

/// A claim that can stand in an ID: a string, or a number written as JSON writes it.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Mapping {
    /// The SPIFFE ID the verified `claims` name in `trust_domain`.
    pub(crate) fn spiffe_id(
        &self,
        claims: &Value,
        trust_domain: &str,
    ) -> Result<String, MappingError> {
        let id = match self {
            Mapping::Kubernetes => kubernetes(claims, trust_domain)?,
            Mapping::GithubActions => github_actions(claims, trust_domain)?,
            Mapping::Generic(template) => template.render(claims, trust_domain)?,
        };
        check_spiffe_id(&id, trust_domain).map_err(|()| MappingError::BadId(id.clone()))?;
        Ok(id)
    }
}

fn kubernetes(claims: &Value, trust_domain: &str) -> Result<String, MappingError> {
    let sub = string_claim(claims, "sub")?;
    let mut parts = sub.splitn(4, ':');
    let (Some("system"), Some("serviceaccount"), Some(ns), Some(sa)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(MappingError::NotServiceAccount(sub.to_owned()));
    };
    Ok(format!(
        "spiffe://{trust_domain}/ns/{}/sa/{}",
        segment("sub", ns)?,
        segment("sub", sa)?
    ))
}

/// The caller's `repository` names OWNER/REPO; `job_workflow_ref` gives the
/// workflow file and the ref. A reusable workflow's file is the called one
/// (its own repository is not part of the identity).
fn github_actions(claims: &Value, trust_domain: &str) -> Result<String, MappingError> {
    let repository = string_claim(claims, "repository")?;
    let Some((owner, repo)) = repository.split_once('/') else {
        return Err(MappingError::Shape {
            claim: "repository",
            value: repository.to_owned(),
            expected: "OWNER/REPO",
        });
    };
    let workflow_ref = string_claim(claims, "job_workflow_ref")?;
    let shape = || MappingError::Shape {
        claim: "job_workflow_ref",
        value: workflow_ref.to_owned(),
        expected: "OWNER/REPO/.github/workflows/FILE@REF",
    };
    let (path, git_ref) = workflow_ref.split_once('@').ok_or_else(shape)?;
    let [_, _, ".github", "workflows", file] = path.split('/').collect::<Vec<_>>()[..] else {
        return Err(shape());
    };
    if git_ref.is_empty() {
        return Err(shape());
    }
    let ref_segments = git_ref
        .split('/')
        .map(|s| segment("job_workflow_ref", s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(format!(
        "spiffe://{trust_domain}/github/{}/{}/workflow/{}/ref/{}",
        segment("repository", owner)?,
        segment("repository", repo)?,
        segment("job_workflow_ref", file)?,
        ref_segments.join("/")
    ))
}

fn string_claim<'a>(claims: &'a Value, name: &str) -> Result<&'a str, MappingError> {
    claims
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| MappingError::MissingClaim(name.to_owned()))
}

/// `value` as one SPIFFE path segment, or the refusal.
fn segment(claim: &str, value: &str) -> Result<String, MappingError> {
    if is_segment(value) {
        Ok(value.to_owned())
    } else {
        Err(MappingError::BadValue {
            claim: claim.to_owned(),
            value: value.chars().take(200).collect(),
        })
    }
}

fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Checks a trust domain: lowercase letters, digits, `.`, `-` and `_`.
pub(crate) fn check_trust_domain(domain: &str) -> Result<(), String> {
    let ok = !domain.is_empty()
        && domain.len() <= MAX_TRUST_DOMAIN
        && domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "trust domain {domain:?} is invalid: write it in lowercase letters, digits, `.`, `-` and `_` (e.g. \"cluster.local\")"
        ))
    }
}

/// Whether `id` is `spiffe://TRUST_DOMAIN/SEG/…` with valid, non-dot segments.
fn check_spiffe_id(id: &str, trust_domain: &str) -> Result<(), ()> {
    let path = id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.strip_prefix(trust_domain))
        .and_then(|rest| rest.strip_prefix('/'))
        .ok_or(())?;
    if id.len() > MAX_SPIFFE_ID || !path.split('/').all(is_segment) {
        return Err(());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    const TD: &str = "cluster.local";

    #[test]
    fn kubernetes_service_accounts_map_to_ns_and_sa() {
        let id = Mapping::Kubernetes
            .spiffe_id(&json!({"sub": "system:serviceaccount:payments:api"}), TD)
            .unwrap();
        assert_eq!(id, "spiffe://cluster.local/ns/payments/sa/api");
        for sub in [
            "system:node:worker-1",
            "alice",
            "system:serviceaccount:payments",
            "system:serviceaccount::api",
            "system:serviceaccount:payments:api:extra",
            "system:serviceaccount:pay/ments:api",
            "system:serviceaccount:..:api",
        ] {
            let err = Mapping::Kubernetes
                .spiffe_id(&json!({ "sub": sub }), TD)
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    MappingError::NotServiceAccount(_) | MappingError::BadValue { .. }
                ),
                "{sub}: {err}"
            );
        }
        assert_eq!(
            Mapping::Kubernetes.spiffe_id(&json!({"sub": 7}), TD),
            Err(MappingError::MissingClaim("sub".into()))
        );
    }

    #[test]
    fn github_actions_map_repository_workflow_and_ref() {
        let claims = json!({
            "repository": "acme/shop",
            "job_workflow_ref": "acme/shop/.github/workflows/deploy.yml@refs/heads/main",
        });
        assert_eq!(
            Mapping::GithubActions
                .spiffe_id(&claims, "ci.acme")
                .unwrap(),
            "spiffe://ci.acme/github/acme/shop/workflow/deploy.yml/ref/refs/heads/main"
        );
        let reusable = json!({
            "repository": "acme/shop",
            "job_workflow_ref": "acme/shared/.github/workflows/release.yml@refs/tags/v1",
        });
        assert_eq!(
            Mapping::GithubActions
                .spiffe_id(&reusable, "ci.acme")
                .unwrap(),
            "spiffe://ci.acme/github/acme/shop/workflow/release.yml/ref/refs/tags/v1"
        );
        for (repository, workflow_ref) in [
            ("acme", "acme/shop/.github/workflows/d.yml@refs/heads/main"),
            ("acme/shop", "acme/shop/.github/workflows/d.yml"),
            ("acme/shop", "acme/shop/workflows/d.yml@refs/heads/main"),
            ("acme/shop", "acme/shop/.github/workflows/d.yml@"),
            (
                "acme/shop",
                "acme/shop/.github/workflows/d.yml@refs/heads/a+b",
            ),
            (
                "acme/shop",
                "acme/shop/.github/workflows/d.yml@refs/../main",
            ),
            (
                "acme/sh op",
                "acme/shop/.github/workflows/d.yml@refs/heads/main",
            ),
        ] {
            let claims = json!({"repository": repository, "job_workflow_ref": workflow_ref});
            assert!(
                Mapping::GithubActions.spiffe_id(&claims, TD).is_err(),
                "{repository} {workflow_ref}"
            );
        }
    }

    #[test]
    fn generic_templates_read_nested_claims() {
        let template = Template::parse(
            "spiffe://{trust_domain}/vm/{google.compute_engine.project_id}/{google.compute_engine.instance_name}",
            "gcp.example",
        )
        .unwrap();
        let claims = json!({"google": {"compute_engine": {"project_id": "shop-prod", "instance_name": "db-1"}}});
        let mapping = Mapping::Generic(template);
        assert_eq!(
            mapping.spiffe_id(&claims, "gcp.example").unwrap(),
            "spiffe://gcp.example/vm/shop-prod/db-1"
        );
        let number = Mapping::Generic(Template::parse("spiffe://td/acct/{account}", "td").unwrap());
        assert_eq!(
            number.spiffe_id(&json!({"account": 1234}), "td").unwrap(),
            "spiffe://td/acct/1234"
        );
        assert_eq!(
            number.spiffe_id(&json!({"account": ["a"]}), "td"),
            Err(MappingError::MissingClaim("account".into()))
        );
        for value in ["a/b", "..", "", "a b", "é"] {
            let err = number
                .spiffe_id(&json!({ "account": value }), "td")
                .unwrap_err();
            assert!(
                matches!(err, MappingError::BadValue { .. }),
                "{value}: {err}"
            );
        }
    }

    #[test]
    fn templates_must_stay_in_their_trust_domain() {
        for bad in [
            "spiffe://other/vm/{x}",
            "{x}",
            "spiffe://{trust_domain}{x}",
            "spiffe://{trust_domain}/{x",
            "spiffe://{trust_domain}/x}",
            "spiffe://{trust_domain}/{}",
            "spiffe://{trust_domain}/{a..b}",
        ] {
            assert!(Template::parse(bad, "td").is_err(), "{bad}");
        }
        assert!(Template::parse("spiffe://td/vm/{x}", "td").is_ok());
    }

    #[test]
    fn trust_domains_are_checked() {
        assert!(check_trust_domain("cluster.local").is_ok());
        assert!(check_trust_domain("prod_1-a.example").is_ok());
        for bad in ["", "Cluster.local", "a/b", "a b", "spiffe://x"] {
            assert!(check_trust_domain(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn every_produced_id_is_a_valid_spiffe_id(sub in ".{0,40}", ns in "[a-z./-]{0,8}", sa in "[a-zA-Z0-9._:/-]{0,8}") {
            for claims in [json!({"sub": sub}), json!({"sub": format!("system:serviceaccount:{ns}:{sa}")})] {
                if let Ok(id) = Mapping::Kubernetes.spiffe_id(&claims, TD) {
                    prop_assert!(check_spiffe_id(&id, TD).is_ok());
                    prop_assert_eq!(id.matches('/').count(), 6, "{}", id);
                }
            }
        }

        #[test]
        fn generic_values_never_add_segments(value in ".{0,20}") {
            let mapping = Mapping::Generic(Template::parse("spiffe://td/x/{v}", "td").unwrap());
            if let Ok(id) = mapping.spiffe_id(&json!({ "v": value }), "td") {
                prop_assert_eq!(id, format!("spiffe://td/x/{value}"));
                prop_assert!(!value.contains('/'));
            }
        }
    }
}
