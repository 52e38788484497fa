//! The coordinator's admin commands run by a user the admin socket does not
//! admit. Needs root, to start the command as another user; it lives here
//! with the other root-only tests so the suite without root never skips it.

use std::os::unix::process::CommandExt as _;
use std::process::Command;

/// A user who may not use the admin socket is told so, not that the
/// server is down.
#[test]
fn admin_commands_without_permission_say_so() {
    weft_tests::require_root().expect("root");
    let bin = weft_tests::bin_dir()
        .expect("built binaries")
        .join("weft-coordinator");
    let dir = tempfile::tempdir().expect("temporary directory");
    let _socket = std::os::unix::net::UnixListener::bind(dir.path().join("admin.sock"))
        .expect("bind the admin socket");
    let out = Command::new(bin)
        .args(["nodes", "list", "--data-dir"])
        .arg(dir.path())
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run weft-coordinator");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("permission denied on the coordinator's admin socket"),
        "{stderr}"
    );
}
