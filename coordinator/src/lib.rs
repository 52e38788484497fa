//! weft's coordinator: it admits nodes with auth keys, gives them stable
//! overlay addresses and names, compiles the access policy into per-node
//! views and streams those views to every connected node.
//!
//! The binary `weft-coordinator` is a thin CLI over [`Coordinator`] (the
//! server) and [`AdminClient`] (the admin commands).

mod admin;
mod audit;
mod authkey;
mod config;
mod control;
mod error_chain;
mod flows;
mod http;
mod keyfile;
mod limits;
pub mod metrics;
mod netmap;
mod nodes;
mod oidc;
mod policy_follow;
mod policy_watch;
mod relays;
mod server;
mod store;
mod users;
mod workload;

pub use admin::{
    AdminClient, AuditLog, AuthKeyRequest, ClientError, CreatedAuthKey, NodeView, PolicyInstalled,
    PolicyRequest,
};
pub use audit::{Actor, AuditEntry, Event, Outcome, Pin, Tamper, Verification, GENESIS_HASH};
pub use config::RelayConfig;
pub use config::{
    check_public_url, load as load_config, ConfigError, FileConfig, OidcFileConfig, OidcSettings,
    WorkloadIssuer, WorkloadIssuerConfig, WorkloadKind, DEFAULT_EPHEMERAL_TIMEOUT,
};
pub use config::{
    EtcdSettings, EtcdTls, EtcdTlsFileConfig, StoreFileConfig, StoreKind, StoreSettings,
};
pub use config::{
    FlowSettings, FlowsFileConfig, SinkFileConfig, SinkSettings, SinkTarget, SyslogTransport,
    DEFAULT_FLOW_MAX_AGE, DEFAULT_FLOW_MAX_BYTES, DEFAULT_FLOW_SEGMENT_AGE,
    DEFAULT_FLOW_SEGMENT_BYTES,
};
pub use control::QuicThread;
pub use error_chain::error_chain;
pub use flows::{FlowList, FlowQuery, FlowView, KeptRecord, Reporter};
pub use keyfile::{ensure_data_dir, load_or_create_key, KeyFileError};
pub use limits::Limits;
pub use server::{Coordinator, ServeOptions, StartError};
