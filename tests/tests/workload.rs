//! Workload identity end to end: a loopback issuer shaped like a Kubernetes
//! service-account issuer, a coordinator trusting it, and pods that join
//! with their projected tokens as SPIFFE identities — admitted by SPIFFE
//! rules on real traffic, refused for every kind of bad token, rotating
//! their keys without losing a ping, cleaned up when they go away, and
//! named to applications by `weft whois`.

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use serde_json::{json, Value};
use weft_tests::{
    fixture, in_netns, record_metric, tcp_echo, unix_now, wait_until, EchoServer, Lab, Overlay,
    Signer, WorkloadIssuer,
};

const ISSUER_PORT: u16 = 9500;
const ECHO_PORT: u16 = 7000;
const WHOIS_PORT: u16 = 7100;
const HOUR: Duration = Duration::from_secs(3600);
const API_SPIFFE: &str = "spiffe://cluster.local/ns/payments/sa/api";
const API_NAME: &str = "api-7d9f8";

#[test]
fn workloads_join_with_their_platform_tokens() {
    weft_tests::require_root().expect("root");
    let mut lab = Lab::new().expect("create lab");
    for (name, octet) in [
        ("coord", 1),
        ("ledger", 41),
        ("api", 42),
        ("batch", 43),
        ("forger", 44),
    ] {
        lab.add_host(name, octet).expect("add host");
    }
    let mut overlay = Overlay::new(lab).expect("create overlay");
    let mut issuer = None;
    if let Err(e) = scenario(&mut overlay, &mut issuer) {
        panic!("{e:?}\n\n{}", overlay.logs());
    }
}

fn scenario(overlay: &mut Overlay, issuer_slot: &mut Option<WorkloadIssuer>) -> Result<()> {
    let coord = overlay.lab().host("coord")?.clone();
    let dir = overlay.lab().host_dir("coord");
    std::fs::create_dir_all(&dir)?;
    let issuer = issuer_slot.insert(WorkloadIssuer::start(&coord.netns, ISSUER_PORT)?);
    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            r#"ephemeral_timeout = "3s"

[[workload_issuers]]
issuer = "{url}"
audience = "weft"
kind = "kubernetes"
trust_domain = "cluster.local"
key_expiry = "1h"
"#,
            url = issuer.url()
        ),
    )?;
    let config_arg = config.to_string_lossy().into_owned();
    overlay.start_coordinator_with(
        "coord",
        &fixture("workload-policy.hujson"),
        &["--config", &config_arg],
    )?;
    let (address, key) = {
        let c = overlay.coordinator()?;
        (c.address().to_owned(), c.public_key()?)
    };

    // The ledger is a tagged server with an echo port.
    let ledger_key = overlay.coordinator()?.authkey(&["tag:ledger"], false)?;
    overlay.start_node("ledger")?;
    overlay.join("ledger", &ledger_key)?;
    let ledger_ns = overlay.node("ledger")?.host().netns.clone();
    let _echo = EchoServer::start(&ledger_ns, ECHO_PORT)?;
    let ledger_ip = overlay.node("ledger")?.overlay_ipv4()?;

    // The payments API's pod: weftd joins on its own with the projected token.
    let api_token = token_file(overlay, "api")?;
    std::fs::write(
        &api_token,
        issuer.service_account_token("payments", "api", "weft", HOUR),
    )?;
    let started = Instant::now();
    let api_args = sidecar_args(&address, &key, &api_token);
    let api_args: Vec<&str> = api_args.iter().map(String::as_str).collect();
    overlay.start_node_with("api", &api_args)?;
    let api_ns = overlay.node("api")?.host().netns.clone();
    let first_packet = wait_until(Duration::from_secs(10), || {
        reaches(&api_ns, ledger_ip, Duration::from_millis(300))
    })
    .map(|_| started.elapsed())
    .context("the payments API never reached the ledger")?;
    record_metric(&format!(
        "workload: weftd start with a service-account token -> first packet to the ledger: {} ms",
        first_packet.as_millis()
    ));
    let status = overlay.node("api")?.status()?;
    ensure!(
        status["self"]["identity"] == API_SPIFFE,
        "the pod's identity: {status}"
    );
    ensure!(
        status["self"]["hostname"] == API_NAME,
        "the pod's name: {status}"
    );
    let expiry = status["self"]["key_expiry"]
        .as_str()
        .context("a workload's key has an expiry")?;
    let expiry = humantime::parse_rfc3339(expiry)?
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    ensure!(
        expiry <= unix_now() + 3600 + 5,
        "the key outlives the token: {status}"
    );

    // A workload of another namespace joins, and reaches nothing.
    let batch_token = token_file(overlay, "batch")?;
    std::fs::write(
        &batch_token,
        issuer.service_account_token("reports", "batch", "weft", HOUR),
    )?;
    overlay.start_node("batch")?;
    let out = up_with_token(overlay, "batch", &address, &key, &batch_token)?;
    ensure!(out.status.success(), "batch up: {}", output_text(&out));
    let batch_ns = overlay.node("batch")?.host().netns.clone();
    ensure!(
        !reaches(&batch_ns, ledger_ip, Duration::from_millis(800)),
        "a workload outside payments reached the ledger"
    );

    whois_names_the_caller(overlay, &api_ns, &ledger_ns, ledger_ip)?;
    bad_tokens_are_refused(overlay, issuer, &address, &key)?;
    rotation_loses_no_ping(overlay, issuer, &api_ns, ledger_ip, &api_token)?;
    ephemeral_nodes_are_removed(overlay, &api_ns, ledger_ip)?;
    Ok(())
}

/// The ledger asks weftd who is behind a connection it accepted.
fn whois_names_the_caller(
    overlay: &Overlay,
    api_ns: &str,
    ledger_ns: &str,
    ledger_ip: IpAddr,
) -> Result<()> {
    let listener = in_netns(ledger_ns, || TcpListener::bind(("0.0.0.0", WHOIS_PORT)))??;
    let target = SocketAddr::new(ledger_ip, WHOIS_PORT);
    let client = in_netns(api_ns, move || {
        TcpStream::connect_timeout(&target, Duration::from_secs(3))
    })??;
    let (mut accepted, caller) = listener.accept()?;
    let out = overlay
        .node("ledger")?
        .weft(&["whois", &caller.to_string(), "--json"])?;
    ensure!(out.status.success(), "whois: {}", output_text(&out));
    let answer: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        answer["identity"]["workload"] == API_SPIFFE,
        "whois {caller}: {answer}"
    );
    ensure!(
        answer["node"]["name"] == API_NAME,
        "whois {caller}: {answer}"
    );
    ensure!(
        answer["capabilities"]["example.com/cap/ledger"] == json!([{"role": "writer"}]),
        "whois {caller}: {answer}"
    );
    let text = overlay
        .node("ledger")?
        .weft(&["whois", &caller.to_string()])?;
    ensure!(
        String::from_utf8_lossy(&text.stdout).contains(API_SPIFFE),
        "whois text: {}",
        output_text(&text)
    );
    drop(client);
    let _ = accepted.read(&mut [0u8; 1]);
    Ok(())
}

/// Every kind of bad token is refused with an error naming the problem,
/// never echoing the token, and admits no node.
fn bad_tokens_are_refused(
    overlay: &mut Overlay,
    issuer: &WorkloadIssuer,
    address: &str,
    key: &str,
) -> Result<()> {
    let now = unix_now();
    let claims = |changes: Value| {
        let mut claims = json!({
            "iss": issuer.url(),
            "sub": "system:serviceaccount:payments:forged",
            "aud": ["weft"],
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
        });
        if let (Some(claims), Value::Object(changes)) = (claims.as_object_mut(), changes) {
            claims.extend(changes);
        }
        claims
    };
    let cases: [(&str, String, &str); 8] = [
        (
            "wrong audience",
            issuer.token(&claims(json!({"aud": ["api"]})), Signer::Rs256),
            "audience",
        ),
        (
            "expired",
            issuer.token(
                &claims(json!({"iat": now - 7200, "nbf": now - 7200, "exp": now - 3600})),
                Signer::Es256,
            ),
            "expired",
        ),
        (
            "not yet valid",
            issuer.token(&claims(json!({"nbf": now + 3600})), Signer::EdDsa),
            "not valid before",
        ),
        (
            "wrong issuer",
            issuer.token(
                &claims(json!({"iss": "https://evil.invalid"})),
                Signer::Rs256,
            ),
            "not trusted",
        ),
        (
            "bad signature",
            issuer.token(&claims(json!({})), Signer::BadSignature),
            "signature",
        ),
        (
            "alg none",
            issuer.token(&claims(json!({})), Signer::AlgNone),
            "none",
        ),
        (
            "HMAC with the public key",
            issuer.token(&claims(json!({})), Signer::HmacWithPublicKey),
            "hs256",
        ),
        (
            "unknown kid",
            issuer.token(&claims(json!({})), Signer::UnknownKid),
            "rotated-away",
        ),
    ];
    overlay.start_node("forger")?;
    let file = token_file(overlay, "forger")?;
    for (case, token, expected) in cases {
        std::fs::write(&file, &token)?;
        let out = up_with_token(overlay, "forger", address, key, &file)?;
        let text = output_text(&out);
        ensure!(!out.status.success(), "{case}: admitted: {text}");
        ensure!(
            text.to_lowercase().contains(expected),
            "{case}: the error does not say {expected:?}: {text}"
        );
        let signature = token.rsplit('.').next().unwrap_or_default();
        ensure!(
            signature.len() < 8 || !text.contains(signature),
            "{case}: the error echoes the token: {text}"
        );
        println!("refused ({case}): {}", text.trim());
    }
    let nodes = overlay.coordinator()?.nodes()?;
    ensure!(
        !nodes.to_string().contains("forger"),
        "a refused token admitted a node: {nodes}"
    );
    Ok(())
}

/// The platform rewrites the token file; weftd renews its identity and
/// rotates its WireGuard key while a ping at 10 packets a second runs.
fn rotation_loses_no_ping(
    overlay: &Overlay,
    issuer: &WorkloadIssuer,
    api_ns: &str,
    ledger_ip: IpAddr,
    token: &Path,
) -> Result<()> {
    let api = overlay.node("api")?;
    let old_key = api.status()?["self"]["node_key"].clone();
    let ping = Command::new("ip")
        .args(["netns", "exec", api_ns, "ping", "-n", "-q", "-i", "0.1"])
        .args(["-c", "80", "-W", "2"])
        .arg(ledger_ip.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("start ping")?;
    std::thread::sleep(Duration::from_secs(2));
    std::fs::write(
        token,
        issuer.service_account_token("payments", "api", "weft", HOUR),
    )?;
    let rotated = wait_until(Duration::from_secs(5), || {
        api.status()
            .is_ok_and(|s| s["self"]["node_key"] != old_key && s["state"] == "running")
    });
    let out = ping.wait_with_output()?;
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let rotated = rotated.context("the node key did not rotate after the token file changed")?;
    let (sent, received) = ping_counts(&report).context("ping's summary")?;
    record_metric(&format!(
        "workload: token file rewritten -> node key rotated: {} ms; pings across the rotation at 10/s: {received}/{sent} answered",
        rotated.as_millis()
    ));
    ensure!(
        sent == 80 && received == 80,
        "pings lost across the key rotation: {report}"
    );
    ensure!(
        reaches(api_ns, ledger_ip, Duration::from_secs(2)),
        "the rotated node lost the ledger"
    );
    Ok(())
}

/// A pod that goes away is deleted after `ephemeral_timeout`; a new pod of
/// the same service account joins with the same identity.
fn ephemeral_nodes_are_removed(
    overlay: &mut Overlay,
    api_ns: &str,
    ledger_ip: IpAddr,
) -> Result<()> {
    let gone_ip = overlay.node("api")?.overlay_ipv4()?;
    let killed = Instant::now();
    overlay.node_mut("api")?.stop(true);
    let removed = wait_until(Duration::from_secs(30), || {
        overlay
            .coordinator()
            .and_then(|c| c.nodes())
            .is_ok_and(|nodes| !nodes.to_string().contains(API_NAME))
    })
    .context("the pod's node was not removed after it disconnected")?;
    record_metric(&format!(
        "workload: pod killed -> ephemeral node removed (timeout 3 s + disconnect detection): {} ms",
        removed.as_millis()
    ));
    ensure!(
        killed.elapsed() >= Duration::from_secs(3),
        "removed too soon"
    );
    let peers_cleared = wait_until(Duration::from_secs(5), || {
        overlay
            .node("ledger")
            .and_then(|n| n.peer_names())
            .is_ok_and(|names| !names.iter().any(|n| n == API_NAME))
    });
    ensure!(peers_cleared.is_some(), "the ledger still lists the pod");
    let nodes = overlay.coordinator()?.nodes()?;
    ensure!(
        !nodes.to_string().contains(&format!("\"{gone_ip}\"")),
        "the address {gone_ip} is still held: {nodes}"
    );

    // The rescheduled pod: a new machine with the same service account.
    overlay.node_mut("api")?.start_fresh()?;
    let back = wait_until(Duration::from_secs(10), || {
        reaches(api_ns, ledger_ip, Duration::from_millis(300))
    });
    ensure!(
        back.is_some(),
        "the rescheduled pod did not reach the ledger"
    );
    let status = overlay.node("api")?.status()?;
    ensure!(
        status["self"]["identity"] == API_SPIFFE,
        "the rescheduled pod's identity: {status}"
    );
    Ok(())
}

fn sidecar_args(address: &str, key: &str, token: &Path) -> Vec<String> {
    vec![
        "--coordinator".into(),
        address.into(),
        "--coordinator-key".into(),
        key.into(),
        "--identity-token-file".into(),
        token.to_string_lossy().into_owned(),
        "--hostname".into(),
        API_NAME.into(),
    ]
}

fn up_with_token(
    overlay: &Overlay,
    host: &str,
    address: &str,
    key: &str,
    token: &Path,
) -> Result<std::process::Output> {
    let token = token.to_string_lossy().into_owned();
    overlay.node(host)?.weft(&[
        "up",
        "--coordinator",
        address,
        "--coordinator-key",
        key,
        "--hostname",
        host,
        "--identity-token-file",
        &token,
    ])
}

fn token_file(overlay: &Overlay, host: &str) -> Result<PathBuf> {
    let dir = overlay.lab().host_dir(host);
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join("token"))
}

fn reaches(ns: &str, ip: IpAddr, timeout: Duration) -> bool {
    tcp_echo(ns, SocketAddr::new(ip, ECHO_PORT), timeout).is_ok()
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `80 packets transmitted, 80 received` from ping's summary.
fn ping_counts(report: &str) -> Option<(u32, u32)> {
    let line = report.lines().find(|l| l.contains("transmitted"))?;
    let mut numbers = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(str::parse::<u32>);
    Some((numbers.next()?.ok()?, numbers.next()?.ok()?))
}
