//! The `weft-coordinator` command line, as operators and scripts use it.
#![expect(
    clippy::unwrap_used,
    reason = "test harness: a failed step fails the test"
)]

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_weft-coordinator");

fn run(args: &[&str], data_dir: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap()
}

fn last_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(data_dir: &Path, policy: &Path) -> Server {
    let child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--policy"])
        .arg(policy)
        .arg("--data-dir")
        .arg(data_dir)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !run(&["nodes", "list"], data_dir).status.success() {
        assert!(Instant::now() < deadline, "the coordinator did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

#[test]
fn key_prints_a_stable_public_key_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let first = run(&["key"], dir.path());
    assert!(first.status.success());
    let key = last_line(&first);
    assert_eq!(key.len(), 44, "{key:?}");
    assert_eq!(last_line(&run(&["key"], dir.path())), key);
}

#[test]
fn admin_commands_without_a_server_say_what_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(&["nodes", "list"], dir.path());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach the coordinator's admin socket"),
        "{stderr}"
    );
    assert!(
        stderr.contains("weft-coordinator serve --data-dir"),
        "{stderr}"
    );
}

/// `serve ARGS` with its data directory in `dir`, which must fail; its stderr.
fn serve_fails(args: &[&OsStr], dir: &Path) -> String {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_invalid_policy_prevents_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.hujson");
    std::fs::write(&policy, "{ \"acls\": [ }").unwrap();
    let stderr = serve_fails(&[OsStr::new("--policy"), policy.as_os_str()], dir.path());
    assert!(stderr.contains("policy.hujson:1:"), "{stderr}");
}

#[test]
fn an_invalid_flows_section_prevents_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        "[flows]\nmax_megabytes = 10\nsegment_megabytes = 8\n",
    )
    .unwrap();
    let stderr = serve_fails(&[OsStr::new("--config"), config.as_os_str()], dir.path());
    assert!(stderr.contains("[flows] max_megabytes (10)"), "{stderr}");
}

#[test]
fn flows_lists_nothing_before_nodes_report_and_refuses_a_bad_query() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let policy = dir.path().join("policy.hujson");
    std::fs::write(&policy, "{}").unwrap();
    let _server = serve(&data_dir, &policy);
    let out = run(&["flows", "--since", "1h"], &data_dir);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("TIME "), "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let out = run(&["flows", "--id", "not-a-flow-id"], &data_dir);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("a flow id must be 32 hexadecimal digits"),
        "{stderr}"
    );
}

#[test]
fn auth_keys_nodes_and_policies_through_the_admin_socket() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/policy-initial.hujson");
    let _server = serve(&data, &policy);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.join("admin.sock"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let out = run(
        &["authkey", "create", "--tag", "tag:web", "--expiry", "30m"],
        &data,
    );
    assert!(out.status.success());
    assert!(last_line(&out).starts_with("weft-auth-"));
    let out = run(&["authkey", "create", "--tag", "web"], &data);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tag:NAME"));

    let out = run(&["nodes", "list", "--json"], &data);
    assert!(out.status.success());
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes, serde_json::json!([]));
    let out = run(&["nodes", "delete", "ghost"], &data);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node named \"ghost\""));

    let failing =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/policy-failing-test.hujson");
    let out = run(&["policy", "set", failing.to_str().unwrap()], &data);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("policy refused"));
    let out = run(&["policy", "set", policy.to_str().unwrap()], &data);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `weft-coordinator … | head` ends quietly when the reader goes away,
/// like any Unix tool: no panic, no backtrace.
#[test]
fn a_closed_pipe_ends_admin_output_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let out = Command::new(BIN)
        .arg("key")
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(libc::SIGPIPE)
    );
}
