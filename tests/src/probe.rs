//! Traffic probes: ICMP with the system's ping, TCP with sockets opened
//! inside a namespace.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::netns::in_netns;

/// One ICMP echo from namespace `ns` to `dst`, waiting at most `timeout`.
pub fn ping(ns: &str, dst: IpAddr, timeout: Duration) -> bool {
    let wait = timeout.as_secs_f64().max(0.2).to_string();
    Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-n", "-q", "-c", "1", "-W", &wait,
        ])
        .arg(dst.to_string())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Connects from namespace `ns` to `dst`, sends a line and expects it echoed
/// back: proves the flow and its return traffic both pass.
pub fn tcp_echo(ns: &str, dst: SocketAddr, timeout: Duration) -> Result<()> {
    in_netns(ns, move || -> Result<()> {
        let mut stream = TcpStream::connect_timeout(&dst, timeout)
            .with_context(|| format!("connect to {dst}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(b"weft\n")?;
        let mut buf = [0u8; 5];
        stream
            .read_exact(&mut buf)
            .with_context(|| format!("read echo from {dst}"))?;
        anyhow::ensure!(&buf == b"weft\n", "echo from {dst} was {buf:?}");
        Ok(())
    })?
}

/// A TCP echo server in a namespace, stopped on drop.
#[derive(Debug)]
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `0.0.0.0:port` (and `[::]:port`) inside namespace `ns`.
    pub fn start(ns: &str, port: u16) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let path = format!("/var/run/netns/{ns}");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let listener = (|| -> Result<TcpListener> {
                let file = std::fs::File::open(&path)?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let listener = TcpListener::bind(("::", port))
                    .or_else(|_| TcpListener::bind(("0.0.0.0", port)))?;
                listener.set_nonblocking(true)?;
                Ok(listener)
            })();
            let listener = match listener {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 512];
                        if let Ok(n) = stream.read(&mut buf) {
                            let _ = stream.write_all(&buf[..n]);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("echo server did not start")??;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls `check` every 100 ms until it holds or `timeout` passes; returns
/// how long it took.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if check() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
