//! Wires the coordinator together: store, registry, netmap task, control
//! listeners (QUIC, and TLS on TCP sharing the port with HTTP), admin
//! socket and policy watcher. Client connections on TCP are capped so that
//! the admin socket and the policy watcher always find a descriptor (see
//! [`crate::limits`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use weft_net::tls::TlsError;
use weft_policy::Roles;
use weft_proto::{PrivateKey, PublicKey, RelayInfo, CLOSE_BY_COORDINATOR};

use crate::admin::{self, AdminState};
use crate::config::{
    check_public_url, ConfigError, FlowSettings, OidcSettings, StoreSettings, WorkloadIssuer,
};
use crate::control::{self, ListenError};
use crate::flows::{self, FlowReader, FlowWriter, Sinks};
use crate::http;
use crate::keyfile::{self, KeyFileError};
use crate::limits::{self, ConnectionGate, Limits};
use crate::netmap::{self, NetmapHandle};
use crate::nodes::Registry;
use crate::oidc::Logins;
use crate::policy_follow;
use crate::policy_watch::{self, LoadError};
use crate::store::{Counted, EtcdStore, RedbStore, Store, StoreError};
use crate::workload::Workloads;

/// How long shutdown waits for sessions to end.
const DRAIN: Duration = Duration::from_secs(5);

/// How to run a coordinator.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Holds the key, the database and the admin socket.
    pub data_dir: PathBuf,
    /// The policy file to load and follow; `None` denies all traffic.
    pub policy: Option<PathBuf>,
    /// The address of the control listener: QUIC on this UDP port, and TLS
    /// on the same TCP port for nodes whose network blocks UDP.
    pub listen: SocketAddr,
    /// The TCP address of the HTTP endpoints; `None` shares the control
    /// listener's TCP port (connections are told apart by their first byte).
    pub http_listen: Option<SocketAddr>,
    /// The base URL browsers reach the HTTP endpoints at; `None` derives it
    /// from the HTTP listener's address.
    pub public_url: Option<String>,
    /// The identity provider people log in with.
    pub oidc: Option<OidcSettings>,
    /// Administrator principals (`tag:admin`, `alice@example.com`) that a
    /// new policy must not cut off; see `netmap::Lockout`. The `admin`
    /// role's members are administrators too.
    pub admins: Vec<String>,
    /// Who holds the roles the policy's role autogroups (`autogroup:admin`,
    /// …) stand for.
    pub roles: Roles,
    /// Where the state lives: redb in `data_dir`, or etcd.
    pub store: StoreSettings,
    /// The issuers whose workload tokens admit nodes.
    pub workload_issuers: Vec<WorkloadIssuer>,
    /// How long an ephemeral node may stay offline before it is deleted.
    pub ephemeral_timeout: Duration,
    /// The relays nodes are told about and that may follow the admitted node keys.
    pub relays: Vec<RelayInfo>,
    /// Timeouts and caps on what clients may hold.
    pub limits: Limits,
    /// How long flow records are kept.
    pub flows: FlowSettings,
}

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory or key file is unusable.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// The policy file is unreadable or invalid; the cause is the
    /// crate's policy loading error.
    #[error("refusing to start: {0}")]
    Policy(#[source] BoxError),
    /// The database could not be opened or read; the cause is the
    /// crate's store error.
    #[error("{0}")]
    Store(#[source] BoxError),
    /// The database is held by another coordinator, or unusable.
    #[error("{source} (is another coordinator already serving this data directory?)")]
    StoreInUse {
        /// The crate's store error.
        source: BoxError,
    },
    /// The etcd client's start-up task failed.
    #[error("cannot connect to etcd: {0}")]
    EtcdTask(#[source] tokio::task::JoinError),
    /// The control listener could not start; the cause is the crate's
    /// listener error.
    #[error("{0}")]
    Listen(#[source] BoxError),
    /// The control listener's TLS on TCP could not be configured.
    #[error("{0}")]
    ListenTls(#[source] TlsError),
    /// The control listener's address could not be read back.
    #[error("cannot read the control listener's address: {0}")]
    ListenAddress(#[source] std::io::Error),
    /// The control listener's TCP side could not start.
    #[error("cannot listen for control sessions on TCP {addr}: {source} (nodes whose network blocks UDP connect there, on the same port as QUIC; free the port or choose another --listen)")]
    ControlTcp {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The HTTP listener could not start.
    #[error("cannot listen for HTTP on TCP {addr}: {source} (check --http-listen, or leave it out to share the control port)")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// A configured value is unusable.
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    /// The public URL does not make a callback URL.
    #[error("public_url {public_url:?} gives no valid callback URL: {source}")]
    CallbackUrl {
        /// The public URL.
        public_url: String,
        /// Why.
        source: url::ParseError,
    },
    /// An HTTP client could not be built.
    #[error("cannot build the HTTP client for {what}: {source}")]
    HttpClient {
        /// Whom the client talks to.
        what: &'static str,
        /// The underlying error.
        source: reqwest::Error,
    },
    /// The flow records directory is unusable, or a sink cannot start; the
    /// cause is the crate's flow store or sink error.
    #[error("{0}")]
    Flows(#[source] BoxError),
    /// The admin socket could not be created.
    #[error("cannot create the admin socket {path}: {source}")]
    AdminSocket {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// A cause whose type is private to this crate.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl From<LoadError> for StartError {
    fn from(e: LoadError) -> Self {
        StartError::Policy(Box::new(e))
    }
}

impl From<StoreError> for StartError {
    fn from(e: StoreError) -> Self {
        StartError::Store(Box::new(e))
    }
}

impl From<flows::StartError> for StartError {
    fn from(e: flows::StartError) -> Self {
        StartError::Flows(Box::new(e))
    }
}

impl From<flows::SinkStartError> for StartError {
    fn from(e: flows::SinkStartError) -> Self {
        StartError::Flows(Box::new(e))
    }
}

impl From<ListenError> for StartError {
    fn from(e: ListenError) -> Self {
        StartError::Listen(Box::new(e))
    }
}

/// Times to look for a port free for both QUIC and TCP when the listen
/// address leaves the port to the kernel.
const CONTROL_PORT_ATTEMPTS: usize = 16;

/// The control listener: QUIC on UDP and, on the same port, TCP for nodes
/// whose network blocks UDP. Asked for port 0, it takes a port free for
/// both: the kernel's pick for TCP may be in use for UDP.
async fn bind_control(
    listen: SocketAddr,
    key: &PrivateKey,
) -> Result<(quinn::Endpoint, tokio::net::TcpListener), StartError> {
    let bind_tcp = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::ControlTcp { addr, source })
    };
    if listen.port() != 0 {
        let endpoint = control::bind(listen, key)?;
        return Ok((endpoint, bind_tcp(listen).await?));
    }
    let mut attempts = 0;
    loop {
        let tcp = bind_tcp(listen).await?;
        let addr = tcp.local_addr().map_err(|source| StartError::ControlTcp {
            addr: listen,
            source,
        })?;
        attempts += 1;
        match control::bind(addr, key) {
            Ok(endpoint) => return Ok((endpoint, tcp)),
            Err(e) if attempts >= CONTROL_PORT_ATTEMPTS => return Err(e.into()),
            Err(_) => {}
        }
    }
}

/// A running coordinator.
#[derive(Debug)]
pub struct Coordinator {
    local_addr: SocketAddr,
    public_key: PublicKey,
    endpoint: quinn::Endpoint,
    socket: PathBuf,
    control: JoinHandle<()>,
    control_tcp: JoinHandle<()>,
    shutdown: watch::Sender<bool>,
    admin: JoinHandle<()>,
    admin_stop: oneshot::Sender<()>,
    http_addr: SocketAddr,
    /// Serves the HTTP endpoints' own listener (`--http-listen`); on a
    /// shared port the control listener serves them.
    http: Option<JoinHandle<()>>,
    discovery: Option<JoinHandle<()>>,
    prefetch: Option<JoinHandle<()>>,
    watcher: Option<JoinHandle<()>>,
    policy_follower: JoinHandle<()>,
    netmap: JoinHandle<()>,
    flows: JoinHandle<()>,
    /// Each sink's delivery task.
    sinks: Vec<JoinHandle<()>>,
    /// Forwards audit entries to the sinks that take them.
    audit_forwarder: Option<JoinHandle<()>>,
}

impl Coordinator {
    /// Starts serving: fails before listening if anything is misconfigured.
    pub async fn start(options: ServeOptions) -> Result<Self, StartError> {
        let key = keyfile::load_or_create_key(&options.data_dir)?;
        let store = open_store(&options.store, &options.data_dir).await?;
        let registry = Registry::open(store)?;
        let context = policy_watch::Context::new(options.roles.clone(), options.admins.clone());
        let policy = match &options.policy {
            Some(path) => {
                let nodes = registry.nodes()?;
                let now = crate::authkey::unix_secs(std::time::SystemTime::now());
                let live: Vec<_> = nodes
                    .iter()
                    .map(|(n, _)| n)
                    .filter(|n| !n.is_expired(now))
                    .collect();
                let checks = |policy: &weft_policy::Policy| {
                    let infos: Vec<_> = live.iter().map(|n| n.info()).collect();
                    let report = policy.run_tests_on_nodes(&infos)?;
                    netmap::budget_check(policy, live.iter().copied(), netmap::NETMAP_BUDGET)?;
                    Ok(report)
                };
                let (validated, content) =
                    policy_watch::load_at_start(path, &**registry.store(), &context.roles, checks)?;
                for warning in &validated.warnings {
                    tracing::warn!("{warning}");
                }
                Some((path.clone(), validated.policy, content))
            }
            None => None,
        };
        let (initial, follow) = match policy {
            Some((path, policy, content)) => (Some(Arc::new(policy)), Some((path, content))),
            None => (
                policy_watch::installed(&**registry.store(), &context.roles)?,
                None,
            ),
        };
        let policy_changes = registry.store().watch(policy_watch::CURRENT_KEY);
        let in_force = policy_watch::InForce::new(
            policy_watch::last_good(&**registry.store())
                .map_err(LoadError::Store)?
                .map(|stored| stored.source),
        );
        let (netmaps, netmap) =
            NetmapHandle::spawn(registry.clone(), initial, options.ephemeral_timeout)?;
        let (sinks, sink_tasks) = Sinks::start(&options.flows.sinks)?;
        let audit_forwarder = sinks.wants_audit().then(|| {
            tokio::spawn(flows::forward_audit(
                registry.store().clone(),
                sinks.clone(),
            ))
        });
        let (flow_writer, flows) =
            FlowWriter::start(&options.data_dir, options.flows, netmaps.clone(), sinks).await?;
        let policy_follower = tokio::spawn(policy_follow::follow(
            registry.store().clone(),
            policy_changes,
            netmaps.clone(),
            in_force.clone(),
            context.roles.clone(),
        ));

        let (endpoint, control_tcp) = bind_control(options.listen, &key).await?;
        let local_addr = endpoint.local_addr().map_err(StartError::ListenAddress)?;
        let socket = admin::socket_path(&options.data_dir);
        let listener = admin::bind(&socket).map_err(|source| StartError::AdminSocket {
            path: socket.clone(),
            source,
        })?;

        let watcher = follow.map(|(path, content)| {
            tokio::spawn(policy_watch::follow(
                path,
                content,
                netmaps.clone(),
                registry.store().clone(),
                context.clone(),
                in_force.clone(),
            ))
        });
        let (admin_stop, stopped) = oneshot::channel();
        let router = admin::router(AdminState {
            registry: registry.clone(),
            netmaps: netmaps.clone(),
            policy: context,
            in_force,
            flows: FlowReader::new(&options.data_dir),
        });
        let admin = tokio::spawn(async move {
            let service = router.into_make_service_with_connect_info::<admin::Peer>();
            let serve = axum::serve(listener, service).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!("admin API stopped: {e}");
            }
        });
        let acceptor = control::tls_acceptor().map_err(StartError::ListenTls)?;
        let http_elsewhere = options
            .http_listen
            .filter(|addr| !is_control_address(*addr, options.listen, local_addr));
        let (http_listener, http_addr) = match http_elsewhere {
            None => (None, local_addr),
            Some(addr) => {
                let listener = http::bind(addr)
                    .await
                    .map_err(|source| StartError::Http { addr, source })?;
                let http_addr = listener
                    .local_addr()
                    .map_err(|source| StartError::Http { addr, source })?;
                (Some(listener), http_addr)
            }
        };
        let public_url = public_url(
            options.public_url.as_deref(),
            http_addr,
            options.oidc.is_some(),
        )?;
        let logins = match options.oidc {
            Some(settings) => Some(Logins::new(
                settings,
                &public_url,
                options.limits.pending_logins,
            )?),
            None => None,
        };
        let discovery = logins
            .clone()
            .map(|logins| tokio::spawn(logins.discover_in_background()));
        let (shutdown, shutting_down) = watch::channel(false);
        let http_server = http::Server::new(
            http::router(logins.clone(), public_url.starts_with("https://")),
            &options.limits,
        );
        let gate = ConnectionGate::new(
            limits::connection_budget(),
            options.limits.connections_per_address,
        );
        let (http, handoff) = match http_listener {
            Some(listener) => {
                let serve = http::accept(
                    listener,
                    http_server,
                    Arc::clone(&gate),
                    shutting_down.clone(),
                );
                (Some(tokio::spawn(serve)), None)
            }
            None => (None, Some(http_server)),
        };
        tracing::info!(%http_addr, %public_url, "HTTP endpoints listening");
        let workloads = if options.workload_issuers.is_empty() {
            None
        } else {
            let workloads = Workloads::new(options.workload_issuers).map_err(|source| {
                StartError::HttpClient {
                    what: "workload issuers",
                    source,
                }
            })?;
            Some(Arc::new(workloads))
        };
        let prefetch = workloads
            .clone()
            .map(|workloads| tokio::spawn(async move { workloads.prefetch().await }));
        let public_key = key.public_key();
        let context = Arc::new(control::Context {
            key,
            registry,
            netmaps,
            logins,
            workloads,
            relays: options.relays,
            flows: flow_writer,
            shutdown: shutting_down.clone(),
            first_frames: control::first_frame_budget(),
            claims: Arc::default(),
            failed_handshakes: Default::default(),
        });
        let control_tcp = tokio::spawn(control::accept_tcp(
            control_tcp,
            acceptor,
            Arc::clone(&context),
            handoff,
            gate,
            shutting_down,
        ));
        let control = tokio::spawn(control::accept(endpoint.clone(), context));
        tracing::info!(%local_addr, coordinator_key = %public_key, "coordinator listening");
        Ok(Self {
            local_addr,
            public_key,
            endpoint,
            socket,
            control,
            control_tcp,
            shutdown,
            admin,
            admin_stop,
            http_addr,
            http,
            discovery,
            prefetch,
            watcher,
            policy_follower,
            netmap,
            flows,
            sinks: sink_tasks,
            audit_forwarder,
        })
    }

    /// The control listener's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The HTTP listener's bound address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The key nodes pin.
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// Closes every session and releases the data directory.
    pub async fn shutdown(self) {
        self.endpoint
            .close(CLOSE_BY_COORDINATOR.into(), b"coordinator shutting down");
        let _ = self.shutdown.send(true);
        let _ = self.admin_stop.send(());
        if let Some(discovery) = self.discovery {
            discovery.abort();
        }
        if let Some(prefetch) = self.prefetch {
            prefetch.abort();
        }
        if let Some(watcher) = self.watcher {
            watcher.abort();
            let _ = watcher.await;
        }
        self.policy_follower.abort();
        let _ = self.policy_follower.await;
        let _ = tokio::time::timeout(DRAIN, self.control).await;
        let _ = tokio::time::timeout(DRAIN, self.control_tcp).await;
        let _ = tokio::time::timeout(DRAIN, self.admin).await;
        if let Some(http) = self.http {
            let _ = tokio::time::timeout(DRAIN, http).await;
        }
        // The netmap task ends once the last handle (held by sessions, the
        // admin API and the watcher) is gone, and with it the database.
        let _ = tokio::time::timeout(DRAIN, self.netmap).await;
        // The flow writer ends with the last session, having answered
        // every batch handed to it.
        let _ = tokio::time::timeout(DRAIN, self.flows).await;
        // Records the sinks have not delivered yet are in the segments.
        if let Some(forwarder) = self.audit_forwarder {
            forwarder.abort();
        }
        for sink in self.sinks {
            sink.abort();
        }
        let _ = tokio::time::timeout(DRAIN, self.endpoint.wait_idle()).await;
        let _ = std::fs::remove_file(&self.socket);
        tracing::info!("coordinator stopped");
    }
}

/// Whether `--http-listen` names the control address itself, which means
/// sharing its port (an unspecified port is a port of its own).
fn is_control_address(http: SocketAddr, listen: SocketAddr, bound: SocketAddr) -> bool {
    http == bound || (http.port() != 0 && http == listen)
}

/// Opens the configured backend. Connecting to etcd blocks for up to its
/// dial and request timeouts, so it runs off the async workers.
async fn open_store(
    settings: &StoreSettings,
    data_dir: &Path,
) -> Result<Arc<dyn Store>, StartError> {
    match settings {
        StoreSettings::Embedded => RedbStore::open(&data_dir.join("weft.redb"))
            .map(|store| Arc::new(Counted(store)) as Arc<dyn Store>)
            .map_err(|e| StartError::StoreInUse {
                source: Box::new(e),
            }),
        StoreSettings::Etcd(settings) => {
            let settings = settings.clone();
            tokio::task::spawn_blocking(move || EtcdStore::connect(&settings))
                .await
                .map_err(StartError::EtcdTask)?
                .map(|store| Arc::new(Counted(store)) as Arc<dyn Store>)
                .map_err(StartError::from)
        }
    }
}

/// The URL browsers use: as configured, or the HTTP listener's own address
/// when that is one a browser can reach.
fn public_url(
    configured: Option<&str>,
    http_addr: SocketAddr,
    needed: bool,
) -> Result<String, StartError> {
    match configured {
        Some(url) => check_public_url(url).map_err(StartError::from),
        None if needed && http_addr.ip().is_unspecified() => Err(StartError::Config(format!(
            "the HTTP endpoints listen on {http_addr}, which browsers cannot be sent to; set public_url in the configuration file (or --public-url) to the address people reach the coordinator at"
        ))),
        None => Ok(format!("http://{http_addr}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_at_the_control_address_shares_its_port() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let listen = addr("0.0.0.0:7443");
        assert!(is_control_address(listen, listen, listen));
        assert!(!is_control_address(addr("0.0.0.0:8080"), listen, listen));
        // Port 0 asks for a port of its own, even when the control listener asked for one too.
        let any = addr("127.0.0.1:0");
        assert!(!is_control_address(any, any, addr("127.0.0.1:40000")));
        assert!(is_control_address(
            addr("127.0.0.1:40000"),
            any,
            addr("127.0.0.1:40000")
        ));
    }

    #[tokio::test]
    async fn a_store_in_use_keeps_the_store_error_and_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let _serving = open_store(&StoreSettings::Embedded, dir.path())
            .await
            .unwrap();
        let Err(err) = open_store(&StoreSettings::Embedded, dir.path()).await else {
            panic!("opened a data directory another store holds");
        };
        assert!(
            err.to_string()
                .ends_with("(is another coordinator already serving this data directory?)"),
            "{err}"
        );
        let store = std::error::Error::source(&err)
            .and_then(|e| e.downcast_ref::<StoreError>())
            .unwrap();
        assert!(
            std::error::Error::source(store).is_some_and(|e| e.is::<redb::DatabaseError>()),
            "{store:?}"
        );
    }
}
