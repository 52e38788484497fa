//! The one canonical form of every identifier that names an identity.
//!
//! Identity providers, operators and policy authors write the same identity
//! in different cases: `Mallory@Example.COM` at one place and
//! `mallory@example.com` at another. If any two places compared them as
//! written, a deny rule could miss the person it names and fail open. So
//! every identifier with a case-insensitive meaning is brought to one form
//! before it is stored or compared, by the functions here and nowhere else:
//!
//! - **emails**: ASCII-lowercased. Every mainstream identity provider treats
//!   the whole address case-insensitively, so the local part is folded too.
//!   Non-ASCII characters are left as they are (Unicode case folding would
//!   let look-alike characters such as the Kelvin sign `K` become ASCII).
//! - **domains**: ASCII-lowercased, without trailing dots.
//! - **tags**: `tag:NAME` with NAME ASCII-lowercased.
//! - **SPIFFE IDs**: the scheme and trust domain lowercased (the SPIFFE
//!   standard makes them case-insensitive); the path is case-sensitive and
//!   kept as written.
//!
//! Group names are not folded: identity providers have groups whose names
//! differ only in case, and merging them would widen access.

use std::borrow::Cow;

use crate::Identity;

/// An email address in canonical form.
pub fn email(text: &str) -> Cow<'_, str> {
    ascii_lower(text)
}

/// A DNS domain (as in an email domain allow-list) in canonical form.
pub fn domain(text: &str) -> Cow<'_, str> {
    match text.trim_end_matches('.') {
        bare if bare.len() < text.len() => Cow::Owned(bare.to_ascii_lowercase()),
        _ => ascii_lower(text),
    }
}

/// A `tag:NAME` in canonical form.
pub fn tag(text: &str) -> Cow<'_, str> {
    ascii_lower(text)
}

/// A SPIFFE ID, or a pattern of one, in canonical form: scheme and trust
/// domain lowercased, path as written.
pub fn spiffe_id(text: &str) -> Cow<'_, str> {
    const SCHEME: &str = "spiffe://";
    let Some(scheme) = text.get(..SCHEME.len()) else {
        return Cow::Borrowed(text);
    };
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return Cow::Borrowed(text);
    }
    let domain_end = text[SCHEME.len()..]
        .find('/')
        .map_or(text.len(), |i| SCHEME.len() + i);
    let head = &text[..domain_end];
    if !head.bytes().any(|b| b.is_ascii_uppercase()) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(format!(
        "{}{}",
        head.to_ascii_lowercase(),
        &text[domain_end..]
    ))
}

impl Identity {
    /// This identity with every identifier in canonical form.
    pub fn into_canonical(mut self) -> Identity {
        if let Some(user) = &mut self.user {
            into_owned_canonical(user, email);
        }
        if let Some(workload) = &mut self.workload {
            into_owned_canonical(workload, spiffe_id);
        }
        let mut folded = false;
        for tag_name in &mut self.tags {
            folded |= into_owned_canonical(tag_name, tag);
        }
        if folded {
            self.tags.sort();
            self.tags.dedup();
        }
        self
    }

    /// Whether every identifier is already in canonical form.
    pub fn is_canonical(&self) -> bool {
        self.user.as_deref().is_none_or(|u| is_borrowed(email(u)))
            && self
                .workload
                .as_deref()
                .is_none_or(|w| is_borrowed(spiffe_id(w)))
            && self.tags.iter().all(|t| is_borrowed(tag(t)))
    }
}

/// Replaces `text` with its canonical form; whether it changed.
fn into_owned_canonical(text: &mut String, canonical: fn(&str) -> Cow<'_, str>) -> bool {
    match canonical(text) {
        Cow::Borrowed(_) => false,
        Cow::Owned(folded) => {
            *text = folded;
            true
        }
    }
}

fn is_borrowed(text: Cow<'_, str>) -> bool {
    matches!(text, Cow::Borrowed(_))
}

fn ascii_lower(text: &str) -> Cow<'_, str> {
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(text.to_ascii_lowercase())
    } else {
        Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn emails_fold_whole_address_but_not_unicode() {
        assert_eq!(email("Mallory@Example.COM"), "mallory@example.com");
        assert!(matches!(email("alice@example.com"), Cow::Borrowed(_)));
        // The Kelvin sign is not an ASCII K, and stays what it is.
        assert_eq!(email("\u{212A}ate@x.com"), "\u{212A}ate@x.com");
    }

    #[test]
    fn domains_lose_case_and_trailing_dot() {
        assert_eq!(domain("Example.COM."), "example.com");
        assert_eq!(domain("example.com"), "example.com");
        assert_eq!(domain(".."), "");
    }

    #[test]
    fn spiffe_ids_fold_scheme_and_trust_domain_only() {
        assert_eq!(
            spiffe_id("SPIFFE://Prod.Example.com/ns/Shop/sa/API"),
            "spiffe://prod.example.com/ns/Shop/sa/API"
        );
        assert_eq!(spiffe_id("spiffe://Prod"), "spiffe://prod");
        assert!(matches!(
            spiffe_id("spiffe://prod/ns/A/sa/B"),
            Cow::Borrowed(_)
        ));
        assert_eq!(spiffe_id("not-a-spiffe-id"), "not-a-spiffe-id");
        assert_eq!(spiffe_id("sp"), "sp");
    }

    #[test]
    fn identities_fold_and_dedupe_tags() {
        let identity = Identity {
            user: Some("Alice@Example.com".into()),
            groups: vec!["group:idp:Admins".into()],
            workload: Some("spiffe://TD/ns/x/sa/y".into()),
            tags: vec!["tag:Web".into(), "tag:web".into(), "tag:DB".into()],
        };
        assert!(!identity.is_canonical());
        let folded = identity.into_canonical();
        assert!(folded.is_canonical());
        assert_eq!(folded.user.as_deref(), Some("alice@example.com"));
        assert_eq!(
            folded.groups,
            ["group:idp:Admins"],
            "groups keep their case"
        );
        assert_eq!(folded.workload.as_deref(), Some("spiffe://td/ns/x/sa/y"));
        assert_eq!(folded.tags, ["tag:db", "tag:web"]);
    }

    proptest! {
        #[test]
        fn canonical_forms_are_idempotent(text in "\\PC{0,40}") {
            for f in [email, domain, tag, spiffe_id] {
                let once = f(&text).into_owned();
                prop_assert_eq!(f(&once), once.as_str());
            }
        }

        #[test]
        fn emails_and_tags_are_case_blind(text in "[a-zA-Z0-9@:._-]{0,40}") {
            let (upper, lower) = (text.to_ascii_uppercase(), text.to_ascii_lowercase());
            prop_assert_eq!(email(&upper), email(&lower));
            prop_assert_eq!(tag(&upper), tag(&lower));
        }

        #[test]
        fn spiffe_paths_keep_their_case(domain in "[a-zA-Z0-9.]{1,20}", path in "(/[a-zA-Z0-9*]{1,8}){0,4}") {
            let id = format!("spiffe://{domain}{path}");
            let canonical = spiffe_id(&id);
            prop_assert!(canonical.ends_with(&path));
            prop_assert_eq!(canonical.as_ref(), format!("spiffe://{}{path}", domain.to_ascii_lowercase()));
        }
    }
}
