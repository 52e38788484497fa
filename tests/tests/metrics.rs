//! Metrics and alerts with a real Prometheus (Debian's `prometheus`): it
//! scrapes weftd on two nodes, the coordinator and a relay over the lab's
//! underlay, evaluates the alert rules shipped in deploy/prometheus, and a
//! connection the policy denies must raise the server's deny counter and
//! fire `WeftDenialsRising`.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use weft_tests::{
    fixture, in_netns, tcp_echo, wait_until, EchoServer, Host, Lab, Overlay, Process,
};

const COORDINATOR_METRICS: u16 = 9460;
const NODE_METRICS: u16 = 9461;
const PROMETHEUS_PORT: u16 = 9090;
/// How long Prometheus gets to start, scrape everything, count and alert;
/// with 1 s scrape and evaluation intervals each takes a few seconds.
const PROMETHEUS_WAIT: Duration = Duration::from_secs(60);

#[test]
fn a_denied_connection_raises_the_counter_and_fires_the_alert() {
    weft_tests::require_root().expect("root");
    let prometheus = Path::new("/usr/bin/prometheus");
    assert!(
        prometheus.exists(),
        "{} is missing: install Debian's `prometheus` package (tests/run does)",
        prometheus.display()
    );
    let mut lab = Lab::new().expect("create lab");
    for (name, octet) in [
        ("coord", 10),
        ("client", 11),
        ("server", 12),
        ("relay", 13),
        ("prom", 14),
    ] {
        lab.add_host(name, octet).expect("add host");
    }
    let mut overlay = Overlay::new(lab).expect("create overlay");
    let mut prometheus_process = None;
    if let Err(e) = scenario(&mut overlay, prometheus, &mut prometheus_process) {
        let prometheus_log = prometheus_process
            .as_ref()
            .map(Process::log)
            .unwrap_or_default();
        panic!(
            "{e:?}\n\n{}\n\n--- prometheus ---\n{prometheus_log}",
            overlay.logs()
        );
    }
}

fn scenario(
    overlay: &mut Overlay,
    prometheus_bin: &Path,
    prometheus: &mut Option<Process>,
) -> Result<()> {
    let coord = overlay.lab().host("coord")?.clone();
    let dir = overlay.lab().dir().to_path_buf();
    let policy = dir.join("policy.hujson");
    std::fs::copy(fixture("policy-enforce.hujson"), &policy)?;
    overlay.add_relay("relay", "relay1")?;
    let config = dir.join("coordinator.toml");
    std::fs::write(&config, overlay.relays_config())?;
    let coordinator_metrics = SocketAddr::from((coord.addr, COORDINATOR_METRICS));
    overlay.start_coordinator_with(
        "coord",
        &policy,
        &[
            "--config",
            &config.to_string_lossy(),
            "--metrics-listen",
            &coordinator_metrics.to_string(),
        ],
    )?;
    overlay.start_relays()?;
    let relay_metrics = overlay.relay("relay1")?.metrics_address();
    let mut nodes = Vec::new();
    for name in ["client", "server"] {
        let host = overlay.lab().host(name)?.clone();
        let metrics = SocketAddr::from((host.addr, NODE_METRICS));
        overlay.start_node_with(name, &["--metrics-listen", &metrics.to_string()])?;
        nodes.push(metrics);
    }
    let client_key = overlay.coordinator()?.authkey(&["tag:client"], false)?;
    let server_key = overlay.coordinator()?.authkey(&["tag:server"], false)?;
    overlay.join("client", &client_key)?;
    overlay.join("server", &server_key)?;
    let server_metrics = nodes[1];

    let prom = overlay.lab().host("prom")?.clone();
    let api = SocketAddr::from((prom.addr, PROMETHEUS_PORT));
    *prometheus = Some(start_prometheus(
        prometheus_bin,
        &prom,
        &dir.join("prometheus"),
        &[
            ("weftd", &nodes),
            ("weft-coordinator", &[coordinator_metrics]),
            ("weft-relay", &[relay_metrics]),
        ],
    )?);

    // Every target is scraped, and the server's deny counter has a first
    // sample: a later rise is then a rise, not the series appearing.
    let deny = format!(
        "weft_filter_verdicts_total{{instance=\"{server_metrics}\",verdict=\"drop\",rule=\"deny\"}}"
    );
    let scraped = wait_until(PROMETHEUS_WAIT, || {
        value(&prom, api, "count(up == 1)").is_ok_and(|v| v == Some(4.0))
            && value(&prom, api, &deny).is_ok_and(|v| v == Some(0.0))
    });
    ensure!(
        scraped.is_some(),
        "Prometheus did not scrape all four targets with the deny counter at 0 within {PROMETHEUS_WAIT:?}: {}",
        query(&prom, api, "up").map_or_else(|e| e.to_string(), |v| v.to_string())
    );

    let server_ns = overlay.lab().host("server")?.netns.clone();
    let client_ns = overlay.lab().host("client")?.netns.clone();
    let _echo: Vec<EchoServer> = [7000, 7001]
        .into_iter()
        .map(|port| EchoServer::start(&server_ns, port))
        .collect::<Result<_>>()?;
    let server_ip = overlay.node("server")?.overlay_ipv4()?;
    let allowed = SocketAddr::new(server_ip, 7000);
    let reached = wait_until(Duration::from_secs(5), || {
        tcp_echo(&client_ns, allowed, Duration::from_millis(800)).is_ok()
    });
    ensure!(reached.is_some(), "client -> server:7000 must pass");
    let denied = SocketAddr::new(server_ip, 7001);
    ensure!(
        tcp_echo(&client_ns, denied, Duration::from_millis(1500)).is_err(),
        "client -> server:7001 must be dropped: a deny rule covers it"
    );

    let counted = wait_until(PROMETHEUS_WAIT, || {
        value(&prom, api, &deny).is_ok_and(|v| v.is_some_and(|v| v > 0.0))
    });
    ensure!(
        counted.is_some(),
        "the server's deny counter did not rise in Prometheus within {PROMETHEUS_WAIT:?}"
    );
    // The same scrape counted the deny rule's line, and the packets that
    // came over the direct path.
    let by_rule = format!(
        "weft_filter_rule_verdicts_total{{instance=\"{server_metrics}\",verdict=\"drop\"}} > 0"
    );
    let rules = query(&prom, api, &by_rule)?;
    let lines: Vec<&str> = rules
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|s| s["metric"]["line"].as_str())
                .collect()
        })
        .unwrap_or_default();
    let deny_line = std::fs::read_to_string(&policy)?
        .lines()
        .position(|l| l.contains(r#""dst": ["tag:server:7001"]"#))
        .map(|i| (i + 1).to_string())
        .context("the policy has no deny rule for port 7001")?;
    ensure!(
        lines == [deny_line.as_str()],
        "the drops must count for the deny rule's line {deny_line}, not {lines:?}"
    );
    let received = format!(
        "weft_tunnel_packets_total{{instance=\"{server_metrics}\",path=\"direct\",direction=\"rx\"}}"
    );
    let packets = value(&prom, api, &received)?;
    ensure!(
        packets.is_some_and(|v| v > 0.0),
        "the server counts no packet received over the direct path: {packets:?}"
    );
    let fired = wait_until(PROMETHEUS_WAIT, || {
        firing(&prom, api, "WeftDenialsRising", &server_metrics.to_string()).unwrap_or(false)
    });
    ensure!(
        fired.is_some(),
        "WeftDenialsRising did not fire for {server_metrics} within {PROMETHEUS_WAIT:?}: {}",
        get(&prom, api, "/api/v1/alerts").unwrap_or_default()
    );
    ensure!(
        !firing(&prom, api, "WeftDenialsRising", &nodes[0].to_string())?,
        "WeftDenialsRising fired for the client, which denied nothing"
    );

    // The coordinator counted both registrations; the relay admits both nodes.
    for (expr, what) in [
        (
            "weft_coordinator_registrations_total",
            "the coordinator's registrations",
        ),
        ("weft_relay_admitted_keys", "the relay's admitted keys"),
    ] {
        let seen = wait_until(PROMETHEUS_WAIT, || {
            value(&prom, api, expr).is_ok_and(|v| v.is_some_and(|v| v >= 2.0))
        });
        ensure!(seen.is_some(), "{what} ({expr}) did not reach 2");
    }

    // No peer's name, tags or address is in the server's metrics, on
    // --metrics-listen or the local API.
    let client_ip = overlay.node("client")?.overlay_ipv4()?.to_string();
    let server_host = overlay.lab().host("server")?.clone();
    let served = get(&server_host, server_metrics, "/metrics")?;
    let local = get_local(overlay.node("server")?.socket(), "/metrics")?;
    for text in [served, local] {
        ensure!(text.contains("weft_filter_verdicts_total"), "{text}");
        ensure!(
            !text.contains("tag:") && !text.contains(&client_ip) && !text.contains("client"),
            "a peer's identity is in the metrics:\n{text}"
        );
    }
    Ok(())
}

/// Starts Prometheus in `host`'s namespace, scraping `jobs` every second
/// and evaluating the shipped alert rules every second with their `for:`
/// durations cut to zero, so an alert fires as soon as its expression holds.
fn start_prometheus(
    bin: &Path,
    host: &Host,
    dir: &Path,
    jobs: &[(&str, &[SocketAddr])],
) -> Result<Process> {
    std::fs::create_dir_all(dir.join("data"))?;
    let rules = std::fs::read_to_string(shipped_rules())?;
    let rules: String = rules
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for: ") {
            Some(_) => line.replace(line.trim_start(), "for: 0s"),
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let rules_file = dir.join("weft-alerts.yml");
    std::fs::write(&rules_file, rules)?;
    let mut config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n",
        rules_file.display()
    );
    for (job, targets) in jobs {
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        config.push_str(&format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ));
    }
    let config_file = dir.join("prometheus.yml");
    std::fs::write(&config_file, config)?;
    let listen = SocketAddr::from((host.addr, PROMETHEUS_PORT)).to_string();
    let process = Process::spawn(
        "prometheus",
        &host.netns,
        bin,
        &[
            &format!("--config.file={}", config_file.display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            &format!("--web.listen-address={listen}"),
        ],
        dir.join("prometheus.log"),
        &[],
    )?;
    Ok(process)
}

fn shipped_rules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/weft-alerts.yml")
}

/// The first sample's value of an instant query, or `None` for an empty result.
fn value(host: &Host, api: SocketAddr, expr: &str) -> Result<Option<f64>> {
    let result = query(host, api, expr)?;
    let Some(first) = result.as_array().and_then(|r| r.first()) else {
        return Ok(None);
    };
    let text = first["value"][1]
        .as_str()
        .context("a sample without a value")?;
    Ok(Some(text.parse()?))
}

/// An instant query's `data.result`.
fn query(host: &Host, api: SocketAddr, expr: &str) -> Result<Value> {
    let body = get(host, api, &format!("/api/v1/query?query={}", encode(expr)))?;
    let reply: Value = serde_json::from_str(&body)?;
    ensure!(reply["status"] == "success", "query {expr} failed: {body}");
    Ok(reply["data"]["result"].clone())
}

/// Whether alert `name` is firing for `instance`.
fn firing(host: &Host, api: SocketAddr, name: &str, instance: &str) -> Result<bool> {
    let reply: Value = serde_json::from_str(&get(host, api, "/api/v1/alerts")?)?;
    let alerts = reply["data"]["alerts"]
        .as_array()
        .context("no alerts list")?;
    Ok(alerts.iter().any(|a| {
        a["labels"]["alertname"] == name
            && a["labels"]["instance"] == instance
            && a["state"] == "firing"
    }))
}

/// GETs `path` from `addr` inside `host`'s namespace; HTTP/1.0, so the
/// body is never chunked.
fn get(host: &Host, addr: SocketAddr, path: &str) -> Result<String> {
    let path = path.to_owned();
    in_netns(&host.netns, move || -> Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let Some((head, body)) = response.split_once("\r\n\r\n") else {
            bail!("no HTTP response from {addr}: {response}");
        };
        ensure!(head.contains(" 200 "), "GET {path} from {addr}: {head}");
        Ok(body.to_owned())
    })?
}

/// GETs `path` from weftd's local API socket.
fn get_local(socket: &Path, path: &str) -> Result<String> {
    let mut stream =
        UnixStream::connect(socket).with_context(|| format!("connect to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: weft\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        bail!("no HTTP response on {}: {response}", socket.display());
    };
    ensure!(
        head.contains(" 200 "),
        "GET {path} on {}: {head}",
        socket.display()
    );
    Ok(body.to_owned())
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
