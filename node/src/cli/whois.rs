//! `weft whois ADDRESS[:PORT]`: who owns an overlay address, and what the
//! policy's grants let them do on this node.

use std::fmt::Write as _;

use crate::api::{ApiClient, WhoIs};

/// Prints the answer as text, or as the API's JSON with `json`.
pub(crate) async fn run(client: &ApiClient, address: &str, json: bool) -> anyhow::Result<()> {
    let who = client.whois(address).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&who)?);
    } else {
        print!("{}", render(&who));
    }
    Ok(())
}

fn render(who: &WhoIs) -> String {
    let mut out = String::new();
    let addresses: Vec<String> = who.node.addresses.iter().map(|a| a.to_string()).collect();
    let _ = writeln!(out, "node:         {} (n{})", who.node.name, who.node.id);
    let _ = writeln!(out, "addresses:    {}", addresses.join(", "));
    let identity = &who.identity;
    if let Some(user) = &identity.user {
        let _ = writeln!(out, "user:         {user}");
    }
    if !identity.groups.is_empty() {
        let _ = writeln!(out, "groups:       {}", identity.groups.join(", "));
    }
    if let Some(workload) = &identity.workload {
        let _ = writeln!(out, "workload:     {workload}");
    }
    if !identity.tags.is_empty() {
        let _ = writeln!(out, "tags:         {}", identity.tags.join(", "));
    }
    if who.capabilities.is_empty() {
        let _ = writeln!(out, "capabilities: none");
    }
    for (name, values) in &who.capabilities {
        let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let _ = writeln!(out, "capability:   {name} = [{}]", values.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::{WhoIsIdentity, WhoIsNode};

    #[test]
    fn text_names_the_node_identity_and_capabilities() {
        let who = WhoIs {
            node: WhoIsNode {
                id: 3,
                name: "ci-runner".into(),
                addresses: vec!["100.64.0.3".parse().unwrap()],
            },
            identity: WhoIsIdentity {
                user: None,
                groups: vec![],
                workload: None,
                tags: vec!["tag:ci".into()],
            },
            capabilities: BTreeMap::from([(
                "example.com/cap/deploy".to_owned(),
                vec![serde_json::json!({"env": "prod"})],
            )]),
        };
        let text = render(&who);
        assert!(text.contains("ci-runner (n3)"), "{text}");
        assert!(text.contains("tag:ci"), "{text}");
        assert!(
            text.contains(r#"example.com/cap/deploy = [{"env":"prod"}]"#),
            "{text}"
        );
    }
}
