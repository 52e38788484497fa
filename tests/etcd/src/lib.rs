//! Real etcd servers on loopback for weft's tests.
//!
//! [`EtcdCluster::start`] runs one or more `etcd` members on free ports of
//! 127.0.0.1, each with its data directory in a temporary directory, and
//! waits until the cluster answers `/health`. Members can be stopped,
//! killed and started again (with their data) to test faults. Every
//! process is tracked by its PID and killed when the cluster is dropped,
//! including when a test panics.
//!
//! [`EtcdCluster::start_in_netns`] runs the members inside a network
//! namespace instead, on one of its addresses, for coordinators that run in
//! namespaces of their own and reach etcd over a simulated network.
//!
//! The binary is `$WEFT_ETCD` if set, otherwise `etcd` on the `PATH`
//! (Debian's `etcd-server` package).

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a cluster or a member may take to become healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopped member may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts with fresh ports when a member cannot bind its ports.
const START_ATTEMPTS: usize = 3;

/// Why an etcd cluster could not be started or driven.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No etcd binary was found.
    #[error(
        "etcd is not installed ({0}); install it with `apt-get install etcd-server` \
         (tests/run does), or set WEFT_ETCD to an etcd binary"
    )]
    NotInstalled(String),
    /// A file, port or process operation failed.
    #[error("cannot {action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The cluster did not answer `/health` in time.
    #[error("etcd did not become healthy within {}s; member logs:\n{logs}", READY_TIMEOUT.as_secs())]
    NotReady {
        /// The members' logs.
        logs: String,
    },
    /// No such member.
    #[error("the cluster has no member {0}")]
    NoMember(usize),
}

/// A running etcd cluster on loopback, torn down on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    binary: PathBuf,
    token: String,
    place: Place,
    members: Vec<Member>,
    // Last: removed after the members have been killed.
    dir: tempfile::TempDir,
}

/// Where the members listen: a namespace (`None`: the caller's) and an address in it.
#[derive(Debug, Clone)]
struct Place {
    netns: Option<String>,
    host: Ipv4Addr,
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts a one-member cluster.
    pub fn single() -> Result<Self, EtcdError> {
        Self::start(1)
    }

    /// Starts a cluster of `size` members and waits until every member is healthy.
    pub fn start(size: usize) -> Result<Self, EtcdError> {
        Self::start_at(
            size,
            Place {
                netns: None,
                host: Ipv4Addr::LOCALHOST,
            },
        )
    }

    /// Starts a cluster of `size` members inside the network namespace
    /// `netns`, listening on `host` (an address of that namespace), and
    /// waits until every member is healthy.
    pub fn start_in_netns(size: usize, netns: &str, host: Ipv4Addr) -> Result<Self, EtcdError> {
        Self::start_at(
            size,
            Place {
                netns: Some(netns.to_owned()),
                host,
            },
        )
    }

    fn start_at(size: usize, place: Place) -> Result<Self, EtcdError> {
        let binary = find_binary()?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let mut cluster = Self::spawn(&binary, size, place.clone())?;
            match cluster.wait_until(|c| (0..c.members.len()).all(|i| c.is_healthy(i))) {
                Ok(()) => return Ok(cluster),
                // A member that exited lost a race for its ports: try others.
                Err(e) if cluster.any_exited() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(EtcdError::NotReady {
            logs: String::new(),
        }))
    }

    /// Every member's client URL (`http://HOST:PORT`, HOST 127.0.0.1 unless
    /// started in a namespace), stopped ones included.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `member`'s client URL.
    pub fn endpoint(&self, member: usize) -> String {
        self.members
            .get(member)
            .map(|m| format!("http://{}:{}", self.place.host, m.client_port))
            .unwrap_or_default()
    }

    /// The number of members.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// The PID of a running member.
    pub fn pid(&self, member: usize) -> Option<u32> {
        self.members
            .get(member)
            .and_then(|m| m.child.as_ref())
            .map(Child::id)
    }

    /// Stops a member gracefully (SIGTERM, then SIGKILL after a few seconds).
    pub fn stop(&mut self, member: usize) -> Result<(), EtcdError> {
        let m = self
            .members
            .get_mut(member)
            .ok_or(EtcdError::NoMember(member))?;
        if let Some(child) = m.child.take() {
            end(child, Signal::SIGTERM);
        }
        Ok(())
    }

    /// Kills a member outright (SIGKILL), as a crash would.
    pub fn kill(&mut self, member: usize) -> Result<(), EtcdError> {
        let m = self
            .members
            .get_mut(member)
            .ok_or(EtcdError::NoMember(member))?;
        if let Some(child) = m.child.take() {
            end(child, Signal::SIGKILL);
        }
        Ok(())
    }

    /// Stops every member.
    pub fn stop_all(&mut self) {
        for m in &mut self.members {
            if let Some(child) = m.child.take() {
                end(child, Signal::SIGTERM);
            }
        }
    }

    /// Starts a stopped member again with its data, without waiting for it.
    pub fn restart(&mut self, member: usize) -> Result<(), EtcdError> {
        if self.members.get(member).is_none() {
            return Err(EtcdError::NoMember(member));
        }
        if self.members[member].child.is_none() {
            let child = self.spawn_member(member)?;
            self.members[member].child = Some(child);
        }
        Ok(())
    }

    /// Starts every stopped member and waits until the cluster serves requests.
    pub fn restart_all(&mut self) -> Result<(), EtcdError> {
        for i in 0..self.members.len() {
            self.restart(i)?;
        }
        self.wait_until(|c| (0..c.members.len()).all(|i| c.is_healthy(i)))
    }

    /// Waits until the running members that form a quorum answer `/health`.
    pub fn wait_healthy(&self) -> Result<(), EtcdError> {
        self.wait_until(|c| {
            (0..c.members.len()).any(|i| c.members[i].child.is_some() && c.is_healthy(i))
        })
    }

    /// A member's log so far.
    pub fn log(&self, member: usize) -> String {
        self.members
            .get(member)
            .map(|m| std::fs::read_to_string(self.log_path(&m.name)).unwrap_or_default())
            .unwrap_or_default()
    }

    fn spawn(binary: &Path, size: usize, place: Place) -> Result<Self, EtcdError> {
        let dir = tempfile::Builder::new()
            .prefix("weft-etcd-")
            .tempdir()
            .map_err(|source| EtcdError::Io {
                action: "create a temporary directory for etcd".into(),
                source,
            })?;
        let ports = free_ports(size * 2)?;
        let members = ports
            .chunks(2)
            .enumerate()
            .map(|(i, p)| Member {
                name: format!("m{i}"),
                client_port: p[0],
                peer_port: p[1],
                child: None,
            })
            .collect();
        let token = dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "weft-test".into());
        let mut cluster = Self {
            binary: binary.to_owned(),
            token,
            place,
            members,
            dir,
        };
        for i in 0..size {
            let child = cluster.spawn_member(i)?;
            cluster.members[i].child = Some(child);
        }
        Ok(cluster)
    }

    fn spawn_member(&self, i: usize) -> Result<Child, EtcdError> {
        let m = &self.members[i];
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}:{}", m.name, self.place.host, m.peer_port))
            .collect();
        let client = format!("http://{}:{}", self.place.host, m.client_port);
        let peer = format!("http://{}:{}", self.place.host, m.peer_port);
        let log_path = self.log_path(&m.name);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| EtcdError::Io {
                action: format!("create {}", log_path.display()),
                source,
            })?;
        let log_err = log.try_clone().map_err(|source| EtcdError::Io {
            action: format!("open {}", log_path.display()),
            source,
        })?;
        // `ip netns exec` execs etcd, so the child's PID is etcd's.
        let mut command = match &self.place.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(&self.binary);
                command
            }
            None => Command::new(&self.binary),
        };
        command
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.dir.path().join(&m.name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", &self.token])
            // Loopback round trips are microseconds: elect a leader quickly.
            .args(["--heartbeat-interval", "20", "--election-timeout", "200"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| EtcdError::Io {
                action: format!("start {}", self.binary.display()),
                source,
            })
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn is_healthy(&self, i: usize) -> bool {
        self.members
            .get(i)
            .is_some_and(|m| m.child.is_some() && health(&self.place, m.client_port))
    }

    fn any_exited(&mut self) -> bool {
        self.members.iter_mut().any(|m| {
            m.child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
        })
    }

    fn wait_until(&self, ready: impl Fn(&Self) -> bool) -> Result<(), EtcdError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if ready(self) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let logs = (0..self.members.len())
            .map(|i| format!("--- {} ---\n{}", self.members[i].name, self.log(i)))
            .collect::<Vec<_>>()
            .join("\n");
        Err(EtcdError::NotReady { logs })
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(child) = m.child.take() {
                end(child, Signal::SIGKILL);
            }
        }
    }
}

fn find_binary() -> Result<PathBuf, EtcdError> {
    if let Some(path) = std::env::var_os("WEFT_ETCD") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(EtcdError::NotInstalled(format!(
                "WEFT_ETCD={} is not a file",
                path.display()
            )))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| EtcdError::NotInstalled("no `etcd` on the PATH".into()))
}

/// Ports the kernel picks on 127.0.0.1, all held at once so they differ.
fn free_ports(n: usize) -> Result<Vec<u16>, EtcdError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| EtcdError::Io {
            action: "pick a free port on 127.0.0.1".into(),
            source,
        })?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| EtcdError::Io {
            action: "read a listener's port".into(),
            source,
        })
}

/// Whether the member on `port` answers `/health` with `"health":"true"`,
/// asked from inside its namespace.
fn health(place: &Place, port: u16) -> bool {
    let addr = SocketAddr::from((place.host, port));
    let Some(netns) = place.netns.clone() else {
        return health_at(addr);
    };
    std::thread::spawn(move || {
        let path = format!("/var/run/netns/{netns}");
        File::open(path)
            .ok()
            .is_some_and(|ns| setns(ns, CloneFlags::CLONE_NEWNET).is_ok() && health_at(addr))
    })
    .join()
    .unwrap_or(false)
}

fn health_at(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(1));
    if stream.set_read_timeout(timeout).is_err()
        || stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
    {
        return false;
    }
    let mut response = String::new();
    stream.read_to_string(&mut response).is_ok() && response.contains("\"health\":\"true\"")
}

/// Signals the process by its PID and reaps it; SIGKILL if it lingers.
fn end(mut child: Child, signal: Signal) {
    let Ok(pid) = i32::try_from(child.id()) else {
        let _ = child.kill();
        let _ = child.wait();
        return;
    };
    let _ = kill(Pid::from_raw(pid), signal);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_member_serves_and_is_gone_after_drop() {
        let cluster = EtcdCluster::single().unwrap();
        let port = cluster.members[0].client_port;
        let pid = cluster.pid(0).unwrap();
        assert!(health(&cluster.place, port));
        let place = cluster.place.clone();
        drop(cluster);
        assert!(!health(&place, port));
        let alive = kill(Pid::from_raw(i32::try_from(pid).unwrap()), None).is_ok();
        assert!(!alive, "etcd {pid} outlived its cluster");
    }

    #[test]
    fn a_three_member_cluster_survives_one_stopped_member() {
        let mut cluster = EtcdCluster::start(3).unwrap();
        assert_eq!(cluster.endpoints().len(), 3);
        cluster.stop(1).unwrap();
        assert!(cluster.pid(1).is_none());
        cluster.wait_healthy().unwrap();
        cluster.restart(1).unwrap();
        cluster.restart_all().unwrap();
        assert!(cluster.log(1).contains("m1"));
    }
}
