//! Wires the coordinator together: store, registry, netmap task, control
//! listener, admin socket and policy watcher.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use weft_proto::{PublicKey, CLOSE_BY_COORDINATOR};

use crate::admin::{self, AdminState};
use crate::control::{self, ListenError};
use crate::keyfile::{self, KeyFileError};
use crate::netmap::NetmapHandle;
use crate::nodes::Registry;
use crate::policy_watch::{self, LoadError};
use crate::store::{RedbStore, StoreError};

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
    /// The database could not be opened.
    #[error("{0} (is another coordinator already serving this data directory?)")]
    Store(String),
    /// The control listener could not start.
    #[error("{0}")]
    Listen(String),
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
    watcher: Option<JoinHandle<()>>,
    netmap: JoinHandle<()>,
}

impl Coordinator {
    /// Starts serving: fails before listening if anything is misconfigured.
    pub async fn start(options: ServeOptions) -> Result<Self, StartError> {
        let key = keyfile::load_or_create_key(&options.data_dir)?;
        let store = Arc::new(RedbStore::open(&options.data_dir.join("weft.redb"))?);
        let registry = Registry::open(store)?;
        let policy = match &options.policy {
            Some(path) => {
                let (validated, content) = policy_watch::load_at_start(path, &**registry.store())?;
                for warning in &validated.warnings {
                    tracing::warn!("{warning}");
                }
                Some((path.clone(), validated.policy, content))
            }
            None => {
                tracing::warn!(
                    "no --policy given: every node is denied all traffic and sees no peers"
                );
                None
            }
        };
        let (initial, follow) = match policy {
            Some((path, policy, content)) => (Some(Arc::new(policy)), Some((path, content))),
            None => (None, None),
        };
        let (netmaps, netmap) = NetmapHandle::spawn(registry.clone(), initial)?;

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
            ))
        });
        let (admin_stop, stopped) = oneshot::channel();
        let router = admin::router(AdminState {
            registry: registry.clone(),
            netmaps: netmaps.clone(),
        });
        let admin = tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!("admin API stopped: {e}");
            }
        });
        let public_key = key.public_key();
        let context = Arc::new(control::Context {
            key,
            registry,
            netmaps,
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
            watcher,
            netmap,
        })
    }

    /// The control listener's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
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
        if let Some(watcher) = self.watcher {
            watcher.abort();
            let _ = watcher.await;
        }
        let _ = tokio::time::timeout(DRAIN, self.control).await;
        let _ = tokio::time::timeout(DRAIN, self.admin).await;
        // The netmap task ends once the last handle (held by sessions, the
        // admin API and the watcher) is gone, and with it the database.
        let _ = tokio::time::timeout(DRAIN, self.netmap).await;
        let _ = tokio::time::timeout(DRAIN, self.endpoint.wait_idle()).await;
        let _ = std::fs::remove_file(&self.socket);
        tracing::info!("coordinator stopped");
    }
}
