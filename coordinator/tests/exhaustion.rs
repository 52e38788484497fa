//! Idle and slow clients cannot take the coordinator's descriptors: the
//! real `weft-coordinator serve` under a 1,024-descriptor limit, flooded on
//! loopback with kept-alive HTTP connections that go quiet after one request
//! and with clients sending a header line a second, keeps answering
//! `/healthz` and its admin socket, installs a policy edit, and closes the
//! quiet connections once the header timeout passes.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test harness: a failed step fails the test"
)]

use std::io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, PoisonError};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_weft-coordinator");
/// The descriptor limit the coordinator runs under, soft and hard: the
/// systemd default soft limit, which it cannot raise.
const DESCRIPTOR_LIMIT: u64 = 1024;
/// Connections that send `GET /healthz`, read nothing and stay quiet.
const IDLE: usize = 1100;
/// Connections that send one header line a second and never finish.
const SLOW: usize = 20;
/// Short enough for the test, long enough that the checks below run while
/// the quiet connections are held.
const HEADER_TIMEOUT: Duration = Duration::from_secs(12);
/// The longest any single check may take.
const CHECK: Duration = Duration::from_secs(10);
const POLICY_INITIAL: &str = "../tests/fixtures/policy-initial.hujson";
const POLICY_EDITED: &str = "../tests/fixtures/policy-edited.hujson";

#[test]
fn a_flood_on_the_control_port_leaves_the_coordinator_working() {
    flood(Listener::Shared);
}

#[test]
fn a_flood_beyond_the_descriptor_budget_leaves_the_coordinator_working() {
    flood(Listener::OwnWithoutAddressCap);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    /// HTTP on the control port; every client from one address, so the
    /// per-address cap keeps room for everyone else.
    Shared,
    /// HTTP on its own port (`--http-listen`) with the per-address cap out
    /// of the way, so the descriptor budget is what holds.
    OwnWithoutAddressCap,
}

/// One flood at a time: two would share the loopback and the cores.
static FLOODING: Mutex<()> = Mutex::new(());

fn flood(listener: Listener) {
    let _alone = FLOODING.lock().unwrap_or_else(PoisonError::into_inner);
    raise_own_descriptor_limit();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let policy = dir.path().join("policy.hujson");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(fixtures.join(POLICY_INITIAL), &policy).unwrap();
    let mut server = Server::start(&data, &policy, listener);
    let http = server.http_addr();
    wait_for_admin(&data);
    let base = server.descriptors();
    let (_, quiet_latency) = healthz(http, "127.0.0.2").expect("/healthz before the flood");

    let started = Instant::now();
    let slow: Vec<_> = (0..SLOW).map(|_| slowloris(http)).collect();
    let idle = open_idle(http);
    let held = server.descriptors();
    eprintln!(
        "flood: {} idle and {SLOW} slow connections opened in {:?}; coordinator descriptors {base} before, {held} during",
        idle.len(),
        started.elapsed()
    );
    assert!(
        held < DESCRIPTOR_LIMIT as usize,
        "the coordinator holds {held} descriptors, at its limit"
    );

    // (a) a fresh client is answered, from another address on the shared
    // port; with the budget taken on the own port it must wait for the
    // timeout, checked after (d).
    if listener == Listener::Shared {
        let (_, latency) = healthz(http, "127.0.0.2").expect("/healthz during the flood");
        eprintln!("/healthz latency: {quiet_latency:?} before the flood, {latency:?} during");
    }
    // (b) the admin socket answers.
    let admin = admin_latency(&data).expect("`nodes list` during the flood");
    // (c) a policy edit is installed.
    let edited = Instant::now();
    std::fs::copy(fixtures.join(POLICY_EDITED), &policy).unwrap();
    let installed = server
        .wait_for_log("installed the changed policy", CHECK)
        .map(|()| edited.elapsed());
    let checked = started.elapsed();
    eprintln!(
        "during the flood: `nodes list` took {admin:?}, the policy edit was installed after {installed:?}; checks done {checked:?} after the flood began"
    );
    assert!(installed.is_some(), "the policy edit was not installed");
    assert!(
        checked < HEADER_TIMEOUT,
        "the checks took {checked:?}, longer than the connections are held"
    );
    if listener == Listener::OwnWithoutAddressCap {
        server
            .wait_for_log("closing new TCP connections at once", CHECK)
            .expect("the refused connections were not reported");
    }

    // (d) the server closes the quiet and the slow connections once the
    // header timeout passes.
    let deadline = started + HEADER_TIMEOUT + CHECK;
    let open = idle
        .into_iter()
        .filter(|stream| !closed_by(stream, deadline))
        .count();
    assert_eq!(
        open, 0,
        "{open} idle connections still open after {HEADER_TIMEOUT:?}"
    );
    let slow: Vec<_> = slow.into_iter().map(|t| t.join().unwrap()).collect();
    let still_open = slow.iter().filter(|closed| closed.is_none()).count();
    assert_eq!(
        still_open, 0,
        "{still_open} slow connections were never closed"
    );
    eprintln!(
        "slow connections closed after at most {:?}; coordinator descriptors {} afterwards",
        slow.iter().flatten().max().unwrap(),
        server.descriptors()
    );
    let (_, latency) = healthz(http, "127.0.0.3").expect("/healthz after the flood");
    eprintln!("/healthz latency after the flood: {latency:?}");
}

/// The test opens more sockets than a default soft limit allows.
fn raise_own_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a live rlimit the calls read and write.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(
        limit.rlim_cur >= 4 * (IDLE + SLOW) as u64,
        "this test needs a hard descriptor limit of at least {}",
        4 * (IDLE + SLOW)
    );
}

/// The coordinator, killed when the test ends, and its log.
struct Server {
    child: Child,
    log: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(data: &Path, policy: &Path, listener: Listener) -> Self {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--http-header-timeout"])
            .arg(format!("{}s", HEADER_TIMEOUT.as_secs()))
            .arg("--policy")
            .arg(policy)
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if listener == Listener::OwnWithoutAddressCap {
            command.args([
                "--http-listen",
                "127.0.0.1:0",
                "--max-connections-per-address",
                "100000",
            ]);
        }
        // SAFETY: setrlimit is async-signal-safe and touches only the child.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: DESCRIPTOR_LIMIT,
                    rlim_max: DESCRIPTOR_LIMIT,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (lines, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            log,
            seen: Vec::new(),
        }
    }

    fn http_addr(&mut self) -> SocketAddr {
        let deadline = Instant::now() + CHECK;
        loop {
            if let Some(addr) = self
                .seen
                .iter()
                .filter(|line| line.contains("HTTP endpoints listening"))
                .find_map(|line| field(line, "http_addr="))
            {
                return addr.parse().unwrap();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the coordinator did not start: {:?}",
                self.seen
            );
            if let Ok(line) = self.log.recv_timeout(left) {
                self.seen.push(line);
            }
        }
    }

    /// Waits up to `within` for a log line containing `text`.
    fn wait_for_log(&mut self, text: &str, within: Duration) -> Option<()> {
        let deadline = Instant::now() + within;
        loop {
            if self.seen.iter().any(|line| line.contains(text)) {
                return Some(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if let Ok(line) = self.log.recv_timeout(left) {
                self.seen.push(line);
            }
        }
    }

    /// The descriptors the coordinator holds.
    fn descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map_or(0, Iterator::count)
    }
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(name)? + name.len();
    line[start..].split_whitespace().next()
}

fn wait_for_admin(data: &Path) {
    let deadline = Instant::now() + CHECK;
    while admin_latency(data).is_none() {
        assert!(Instant::now() < deadline, "the admin socket did not answer");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `nodes list`; how long it took, or `None` when it failed or took
/// longer than [`CHECK`].
fn admin_latency(data: &Path) -> Option<Duration> {
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(["nodes", "list", "--data-dir"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while started.elapsed() < CHECK {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success().then(|| started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// `GET /healthz` from `source` (a loopback address); the answer and how
/// long it took, or `None` when none came within [`CHECK`].
fn healthz(http: SocketAddr, source: &str) -> Option<(String, Duration)> {
    let started = Instant::now();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    let source: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&source.into()).ok()?;
    socket.connect_timeout(&http.into(), CHECK).ok()?;
    let mut stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(CHECK)).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: coordinator\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    (answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"))
        .then(|| (answer, started.elapsed()))
}

/// Opens [`IDLE`] connections from 127.0.0.1, each sending one kept-alive
/// request and nothing more (within [`CHECK`] in all).
fn open_idle(http: SocketAddr) -> Vec<TcpStream> {
    let deadline = Instant::now() + CHECK;
    let mut streams = Vec::with_capacity(IDLE);
    while streams.len() < IDLE && Instant::now() < deadline {
        let Ok(mut stream) = TcpStream::connect_timeout(&http, Duration::from_secs(1)) else {
            continue;
        };
        // A connection the server closed at once may refuse the write.
        let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: coordinator\r\n\r\n");
        streams.push(stream);
    }
    assert_eq!(streams.len(), IDLE, "could not open the idle connections");
    streams
}

/// A client that sends a request's head one line a second and never ends
/// it; the thread returns how long the server took to close it, or `None`
/// if it did not within 30 lines.
fn slowloris(http: SocketAddr) -> std::thread::JoinHandle<Option<Duration>> {
    let mut stream = TcpStream::connect_timeout(&http, CHECK).unwrap();
    std::thread::spawn(move || {
        let started = Instant::now();
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\n");
        let mut buf = [0u8; 1024];
        for line in 0..30 {
            match stream.read(&mut buf) {
                Ok(0) => return Some(started.elapsed()),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if stream
                        .write_all(format!("X-Slow-{line}: 1\r\n").as_bytes())
                        .is_err()
                    {
                        return Some(started.elapsed());
                    }
                }
                Err(_) => return Some(started.elapsed()),
            }
        }
        None
    })
}

/// Whether the server closed `stream` by `deadline` (after any answer).
fn closed_by(mut stream: &TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}
