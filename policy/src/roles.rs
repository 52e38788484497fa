//! Who holds Tailscale's administrative roles, for the role autogroups
//! (`autogroup:admin`, `autogroup:owner`, …).
//!
//! A Tailscale tailnet knows its admins; a policy file only names the role.
//! weft learns the members from the coordinator's roles setting or
//! `weft policy check --roles FILE`, whose JSON form is one object mapping a
//! role to its members, each a user login or an identity-provider group:
//!
//! ```json
//! { "admin": ["alice@example.com", "group:idp:secops"], "auditor": ["carol@example.com"] }
//! ```
//!
//! The roles are `owner`, `admin`, `it-admin`, `network-admin`,
//! `billing-admin` and `auditor`; each stands only for the members listed
//! for it (listing an owner as `admin` too is up to the configuration). A
//! role without members matches nothing in accept rules.

use std::collections::BTreeMap;
use std::fmt;

use crate::selector;
use serde::{Deserialize, Serialize};

/// A Tailscale administrative role, as named by its autogroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// `autogroup:owner`.
    Owner,
    /// `autogroup:admin`.
    Admin,
    /// `autogroup:it-admin`.
    ItAdmin,
    /// `autogroup:network-admin`.
    NetworkAdmin,
    /// `autogroup:billing-admin`.
    BillingAdmin,
    /// `autogroup:auditor`.
    Auditor,
}

impl Role {
    /// Every role, in the order of the documentation.
    pub const ALL: [Role; 6] = [
        Role::Owner,
        Role::Admin,
        Role::ItAdmin,
        Role::NetworkAdmin,
        Role::BillingAdmin,
        Role::Auditor,
    ];

    /// The role's name in a roles file: `admin`, `it-admin`, …
    pub fn name(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::ItAdmin => "it-admin",
            Role::NetworkAdmin => "network-admin",
            Role::BillingAdmin => "billing-admin",
            Role::Auditor => "auditor",
        }
    }

    /// The autogroup that names the role in a policy: `autogroup:admin`, …
    pub fn autogroup(self) -> String {
        format!("autogroup:{}", self.name())
    }

    /// The role named by `name` (`admin`, `it-admin`, …).
    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The members of each role: user logins and identity-provider groups.
///
/// The coordinator's roles setting and `weft policy check --roles FILE`
/// deserialize into this from one JSON object mapping a role (`owner`,
/// `admin`, `it-admin`, `network-admin`, `billing-admin`, `auditor`) to its
/// members:
///
/// ```json
/// { "admin": ["alice@example.com", "group:idp:secops"], "auditor": ["carol@example.com"] }
/// ```
///
/// Members are checked ([`RolesError`]) and put in canonical form (logins
/// lower-cased). A role stands only for the members listed for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<Role, Vec<String>>",
    into = "BTreeMap<Role, Vec<String>>"
)]
pub struct Roles {
    members: BTreeMap<Role, RoleMembers>,
}

/// One role's members, split by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RoleMembers {
    pub(crate) users: Vec<String>,
    /// `group:idp:NAME` groups.
    pub(crate) groups: Vec<String>,
}

/// A roles file or setting names something that cannot be a role member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("role \"{role}\": \"{member}\" is not a user login or an identity-provider group (group:idp:NAME)")]
pub struct RolesError {
    /// The role.
    pub role: Role,
    /// The member as written.
    pub member: String,
}

impl Roles {
    /// Adds `member` (a login or `group:idp:NAME`) to `role`.
    pub fn add(&mut self, role: Role, member: &str) -> Result<(), RolesError> {
        let entry = self.members.entry(role).or_default();
        let invalid = || RolesError {
            role,
            member: member.to_owned(),
        };
        match selector::parse(member).map_err(|_| invalid())? {
            selector::Selector::User(user) => entry.users.push(user),
            selector::Selector::Group(group) if selector::is_external_group(&group) => {
                entry.groups.push(group);
            }
            _ => return Err(invalid()),
        }
        Ok(())
    }

    /// The members of `role` as configured (canonical logins, then groups).
    pub fn members(&self, role: Role) -> Vec<String> {
        self.members
            .get(&role)
            .map(|m| m.users.iter().chain(&m.groups).cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn get(&self, role: Role) -> Option<&RoleMembers> {
        self.members
            .get(&role)
            .filter(|m| !m.users.is_empty() || !m.groups.is_empty())
    }
}

impl TryFrom<BTreeMap<Role, Vec<String>>> for Roles {
    type Error = RolesError;

    fn try_from(map: BTreeMap<Role, Vec<String>>) -> Result<Roles, RolesError> {
        let mut roles = Roles::default();
        for (role, members) in map {
            roles.members.entry(role).or_default();
            for member in members {
                roles.add(role, &member)?;
            }
        }
        Ok(roles)
    }
}

impl From<Roles> for BTreeMap<Role, Vec<String>> {
    fn from(roles: Roles) -> Self {
        Role::ALL
            .into_iter()
            .filter(|r| roles.members.contains_key(r))
            .map(|r| (r, roles.members(r)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_form_round_trips_and_canonicalises() {
        let roles: Roles = serde_json::from_str(
            r#"{"admin": ["Alice@Example.com", "group:idp:secops"], "it-admin": []}"#,
        )
        .unwrap();
        assert_eq!(
            roles.members(Role::Admin),
            ["alice@example.com", "group:idp:secops"]
        );
        assert!(roles.get(Role::ItAdmin).is_none(), "no members");
        assert!(roles.members(Role::Owner).is_empty());
        let json = serde_json::to_string(&roles).unwrap();
        assert_eq!(
            json,
            r#"{"admin":["alice@example.com","group:idp:secops"],"it-admin":[]}"#
        );
    }

    #[test]
    fn bad_members_and_roles_are_refused() {
        let err = serde_json::from_str::<Roles>(r#"{"admin": ["group:eng"]}"#).unwrap_err();
        assert!(
            err.to_string()
                .contains("role \"admin\": \"group:eng\" is not a user login"),
            "{err}"
        );
        let err = serde_json::from_str::<Roles>(r#"{"superuser": []}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `superuser`"),
            "{err}"
        );
        assert_eq!(Role::from_name("network-admin"), Some(Role::NetworkAdmin));
        assert_eq!(Role::BillingAdmin.autogroup(), "autogroup:billing-admin");
    }
}
