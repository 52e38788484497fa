//! `weft ping` and `weft netcheck`: the real binary against the real local
//! API server, with a scripted daemon behind it.

#![expect(
    clippy::unwrap_used,
    reason = "the scripted daemon's fixed addresses parse"
)]

use std::path::Path;
use std::process::Output;

use tokio::sync::mpsc;
use weft_node::api::{
    bind, serve, Command, CommandError, NetcheckReport, PathKind, PingReply, RelayReport,
    RelayTransport,
};

/// Answers pings to `web-1` over the relay and `db` directly; `gone`
/// never answers (every probe times out); anything else is unknown.
async fn daemon(mut commands: mpsc::Receiver<Command>) {
    let mut probes = 0u32;
    while let Some(command) = commands.recv().await {
        match command {
            Command::Ping(request, reply) => {
                probes += 1;
                let pong = |path, relay: Option<&str>, endpoint: Option<&str>| PingReply {
                    peer: request.peer.clone(),
                    address: Some("100.64.0.2".parse().unwrap()),
                    pong: true,
                    path: Some(path),
                    relay: relay.map(Into::into),
                    endpoint: endpoint.map(|e| e.parse().unwrap()),
                    rtt_ms: Some(f64::from(probes) + 0.25),
                };
                let answer = match request.peer.as_str() {
                    "web-1" => Ok(pong(PathKind::Relay, Some("fra1"), None)),
                    "db" => Ok(pong(PathKind::Direct, None, Some("203.0.113.7:51820"))),
                    "gone" => Ok(PingReply {
                        pong: false,
                        path: None,
                        relay: None,
                        endpoint: None,
                        rtt_ms: None,
                        ..pong(PathKind::Relay, None, None)
                    }),
                    other => Err(CommandError::NotFound(format!(
                        "no peer named or addressed {other}; `weft status` lists the peers"
                    ))),
                };
                let _ = reply.send(answer);
            }
            Command::Netcheck(reply) => {
                let _ = reply.send(NetcheckReport {
                    udp: false,
                    mapping: None,
                    reflexive: vec![],
                    local: vec!["198.18.1.2:51820".parse().unwrap()],
                    relays: vec![RelayReport {
                        name: "fra1".into(),
                        home: true,
                        transport: Some(RelayTransport::Tcp),
                        rtt_ms: Some(4.5),
                        max_payload: None,
                        oversized: 0,
                        dropped: 0,
                    }],
                });
            }
            other => panic!("unexpected command {other:?}"),
        }
    }
}

async fn weft(socket: &Path, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_weft"));
    command.arg("--socket").arg(socket).args(args);
    match command.output().await {
        Ok(output) => output,
        Err(err) => panic!("cannot run weft: {err}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn ping_prints_each_probe_and_fails_only_when_none_came_back() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("weftd.sock");
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(serve(bind(&socket, None).unwrap(), tx));
    tokio::spawn(daemon(rx));

    let out = weft(&socket, &["ping", "web-1", "-c", "2"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "pong from web-1 (100.64.0.2) via relay fra1 in 1.25 ms\n\
         pong from web-1 (100.64.0.2) via relay fra1 in 2.25 ms\n"
    );

    let out = weft(&socket, &["ping", "db", "-c", "1", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["path"], "direct");
    assert_eq!(reply["endpoint"], "203.0.113.7:51820");
    assert_eq!(reply["rtt_ms"], 3.25);

    let out = weft(&socket, &["ping", "gone", "-c", "2"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("timeout: no pong from gone"))
            .count(),
        2
    );

    let out = weft(&socket, &["ping", "nobody"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no peer named or addressed nobody"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn netcheck_reports_udp_blocked_and_the_tcp_relay() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("weftd.sock");
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(serve(bind(&socket, None).unwrap(), tx));
    tokio::spawn(daemon(rx));

    let out = weft(&socket, &["netcheck"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for line in ["UDP:        no", "mapping:    unknown", "reflexive:  none"] {
        assert!(stdout.contains(line), "{line:?} missing:\n{stdout}");
    }
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("  fra1  tcp") && l.ends_with("4.5 ms  home")),
        "{stdout}"
    );

    let out = weft(&socket, &["netcheck", "--json"]).await;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["udp"], false);
    assert_eq!(report["relays"][0]["transport"], "tcp");
}
