//! Wires the coordinator together: store, registry, netmap task, control
//! listener, admin socket and policy watcher.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use weft_proto::{PublicKey, RelayInfo, CLOSE_BY_COORDINATOR};

use crate::admin::{self, AdminState};
use crate::config::{check_public_url, OidcSettings, StoreSettings, WorkloadIssuer};
use crate::control::{self, ListenError};
use crate::http;
use crate::keyfile::{self, KeyFileError};
use crate::netmap::NetmapHandle;
use crate::nodes::Registry;
use crate::oidc::Logins;
use crate::policy_follow;
use crate::policy_watch::{self, LoadError};
use crate::store::{EtcdStore, RedbStore, Store, StoreError};
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
    /// The UDP address of the control listener.
    pub listen: SocketAddr,
    /// The TCP address of the HTTP endpoints; `None` uses the control
    /// listener's address and port.
    pub http_listen: Option<SocketAddr>,
    /// The base URL browsers reach the HTTP endpoints at; `None` derives it
    /// from the HTTP listener's address.
    pub public_url: Option<String>,
    /// The identity provider people log in with.
    pub oidc: Option<OidcSettings>,
    /// Administrator principals (`tag:admin`, `alice@example.com`) that a
    /// new policy must not cut off; see `netmap::Lockout`.
    pub admins: Vec<String>,
    /// Where the state lives: redb in `data_dir`, or etcd.
    pub store: StoreSettings,
    /// The issuers whose workload tokens admit nodes.
    pub workload_issuers: Vec<WorkloadIssuer>,
    /// How long an ephemeral node may stay offline before it is deleted.
    pub ephemeral_timeout: Duration,
    /// The relays nodes are told about and that may follow the admitted node keys.
    pub relays: Vec<RelayInfo>,
}

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory or key file is unusable.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// The policy file is unreadable or invalid.
    #[error("refusing to start: {0}")]
    Policy(String),
    /// The database could not be opened or read.
    #[error("{0}")]
    Store(String),
    /// The control listener could not start.
    #[error("{0}")]
    Listen(String),
    /// The HTTP listener could not start.
    #[error("cannot listen for HTTP on TCP {addr}: {source} (pass --http-listen to use another address)")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// The admin socket could not be created.
    #[error("cannot create the admin socket {path}: {source}")]
    AdminSocket {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl From<LoadError> for StartError {
    fn from(e: LoadError) -> Self {
        StartError::Policy(e.to_string())
    }
}

impl From<StoreError> for StartError {
    fn from(e: StoreError) -> Self {
        StartError::Store(e.to_string())
    }
}

impl From<ListenError> for StartError {
    fn from(e: ListenError) -> Self {
        StartError::Listen(e.to_string())
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
    admin: JoinHandle<()>,
    admin_stop: oneshot::Sender<()>,
    http_addr: SocketAddr,
    http: JoinHandle<()>,
    http_stop: oneshot::Sender<()>,
    discovery: Option<JoinHandle<()>>,
    prefetch: Option<JoinHandle<()>>,
    watcher: Option<JoinHandle<()>>,
    policy_follower: JoinHandle<()>,
    netmap: JoinHandle<()>,
}

impl Coordinator {
    /// Starts serving: fails before listening if anything is misconfigured.
    pub async fn start(options: ServeOptions) -> Result<Self, StartError> {
        let key = keyfile::load_or_create_key(&options.data_dir)?;
        let store = open_store(&options).await?;
        let registry = Registry::open(store)?;
        let policy = match &options.policy {
            Some(path) => {
                let (validated, content) = policy_watch::load_at_start(path, &**registry.store())?;
                for warning in &validated.warnings {
                    tracing::warn!("{warning}");
                }
                Some((path.clone(), validated.policy, content))
            }
            None => None,
        };
        let (initial, follow) = match policy {
            Some((path, policy, content)) => (Some(Arc::new(policy)), Some((path, content))),
            None => (policy_watch::installed(&**registry.store())?, None),
        };
        let policy_changes = registry.store().watch(policy_watch::CURRENT_KEY);
        let in_force = policy_watch::last_good(&**registry.store())
            .map_err(LoadError::Store)?
            .map(|stored| stored.source);
        let (netmaps, netmap) =
            NetmapHandle::spawn(registry.clone(), initial, options.ephemeral_timeout)?;
        let policy_follower = tokio::spawn(policy_follow::follow(
            registry.store().clone(),
            policy_changes,
            netmaps.clone(),
            in_force,
        ));
        let admins: Arc<[String]> = options.admins.clone().into();

        let endpoint = control::bind(options.listen, &key)?;
        let local_addr = endpoint.local_addr().map_err(|e| {
            StartError::Listen(format!("cannot read the control listener's address: {e}"))
        })?;
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
                admins.clone(),
            ))
        });
        let (admin_stop, stopped) = oneshot::channel();
        let router = admin::router(AdminState {
            registry: registry.clone(),
            netmaps: netmaps.clone(),
            admins,
        });
        let admin = tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!("admin API stopped: {e}");
            }
        });
        let http_addr = options.http_listen.unwrap_or(local_addr);
        let http_listener = http::bind(http_addr)
            .await
            .map_err(|source| StartError::Http {
                addr: http_addr,
                source,
            })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| StartError::Http {
                addr: http_addr,
                source,
            })?;
        let public_url = public_url(
            options.public_url.as_deref(),
            http_addr,
            options.oidc.is_some(),
        )?;
        let logins = match options.oidc {
            Some(settings) => Some(Logins::new(settings, &public_url).map_err(StartError::Config)?),
            None => None,
        };
        let discovery = logins
            .clone()
            .map(|logins| tokio::spawn(logins.discover_in_background()));
        let (http_stop, http_stopped) = oneshot::channel();
        let router = http::router(logins.clone(), public_url.starts_with("https://"));
        let http = tokio::spawn(async move {
            let serve = axum::serve(http_listener, router).with_graceful_shutdown(async move {
                let _ = http_stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!("HTTP server stopped: {e}");
            }
        });
        tracing::info!(%http_addr, %public_url, "HTTP endpoints listening");
        let workloads = if options.workload_issuers.is_empty() {
            None
        } else {
            let workloads = Workloads::new(options.workload_issuers).map_err(StartError::Config)?;
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
        });
        let control = tokio::spawn(control::accept(endpoint.clone(), context));
        tracing::info!(%local_addr, coordinator_key = %public_key, "coordinator listening");
        Ok(Self {
            local_addr,
            public_key,
            endpoint,
            socket,
            control,
            admin,
            admin_stop,
            http_addr,
            http,
            http_stop,
            discovery,
            prefetch,
            watcher,
            policy_follower,
            netmap,
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
        let _ = self.admin_stop.send(());
        let _ = self.http_stop.send(());
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
        let _ = tokio::time::timeout(DRAIN, self.admin).await;
        let _ = tokio::time::timeout(DRAIN, self.http).await;
        // The netmap task ends once the last handle (held by sessions, the
        // admin API and the watcher) is gone, and with it the database.
        let _ = tokio::time::timeout(DRAIN, self.netmap).await;
        let _ = tokio::time::timeout(DRAIN, self.endpoint.wait_idle()).await;
        let _ = std::fs::remove_file(&self.socket);
        tracing::info!("coordinator stopped");
    }
}

/// Opens the configured backend. Connecting to etcd blocks for up to its
/// dial and request timeouts, so it runs off the async workers.
async fn open_store(options: &ServeOptions) -> Result<Arc<dyn Store>, StartError> {
    match &options.store {
        StoreSettings::Embedded => RedbStore::open(&options.data_dir.join("weft.redb"))
            .map(|store| Arc::new(store) as Arc<dyn Store>)
            .map_err(|e| {
                StartError::Store(format!(
                    "{e} (is another coordinator already serving this data directory?)"
                ))
            }),
        StoreSettings::Etcd(settings) => {
            let settings = settings.clone();
            tokio::task::spawn_blocking(move || EtcdStore::connect(&settings))
                .await
                .map_err(|e| StartError::Store(format!("cannot connect to etcd: {e}")))?
                .map(|store| Arc::new(store) as Arc<dyn Store>)
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
        Some(url) => check_public_url(url).map_err(|e| StartError::Config(e.to_string())),
        None if needed && http_addr.ip().is_unspecified() => Err(StartError::Config(format!(
            "the HTTP endpoints listen on {http_addr}, which browsers cannot be sent to; set public_url in the configuration file (or --public-url) to the address people reach the coordinator at"
        ))),
        None => Ok(format!("http://{http_addr}")),
    }
}
