//! Child processes the harness starts, ended by PID on drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Runs a command to completion; its stdout on success, an error with its stderr otherwise.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A long-running process inside a namespace, with its output in a log file.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Process {
    /// Starts `program args…` in namespace `ns`, logging stdout and stderr to `log`.
    pub fn spawn(
        name: &str,
        ns: &str,
        program: &Path,
        args: &[&str],
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        // `ip netns exec` execs the program, so the child's PID is the program's.
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    /// The PID, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `signal` and waits for the process to exit (SIGKILL after 5 s).
    pub fn stop_with(&mut self, signal: Signal) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, signal);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("[harness] {} did not stop on {signal}; killed", self.name);
    }

    /// Stops the process to start it again: killed outright when `hard`
    /// (a crash), otherwise asked to exit.
    pub fn stop_for_restart(&mut self, hard: bool) {
        self.stop_with(if hard {
            Signal::SIGKILL
        } else {
            Signal::SIGTERM
        });
    }

    /// Stops gracefully (SIGTERM).
    pub fn stop(&mut self) {
        self.stop_with(Signal::SIGTERM);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}
