//! The admin API's routes and handlers.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post, put};
use axum::serve::IncomingStream;
use axum::{Json, Router};

use serde::Deserialize;
use tokio::net::UnixListener;

use super::error::ApiError;
use super::{AuditLog, AuthKeyRequest, CreatedAuthKey, NodeView, PolicyInstalled, PolicyRequest};
use crate::audit::{self, Actor, Event, Pin, Verification};
use crate::authkey::{self, AuthKeySpec};
use crate::flows::{FlowFilter, FlowList, FlowQuery, FlowReader};
use crate::netmap::NetmapHandle;
use crate::nodes::{NodeRecord, Registry};
use crate::policy_watch;

/// What the handlers share.
#[derive(Debug, Clone)]
pub(crate) struct AdminState {
    pub(crate) registry: Registry,
    pub(crate) netmaps: NetmapHandle,
    /// The role members and the administrators a new policy must not cut
    /// off (unless forced).
    pub(crate) policy: policy_watch::Context,
    pub(crate) in_force: policy_watch::InForce,
    /// Reads the flow records this replica keeps.
    pub(crate) flows: FlowReader,
}

/// Who is calling, from the socket's peer credentials: the actor of the
/// audit entries its commands write.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    uid: Option<u32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        Self {
            uid: stream.io().peer_cred().ok().map(|cred| cred.uid()),
        }
    }
}

impl Peer {
    fn actor(self) -> Actor {
        Actor::Admin { uid: self.uid }
    }
}

type Caller = ConnectInfo<Peer>;

/// The admin API's routes; serve them with [`Peer`] as the connect info.
pub(crate) fn router(state: AdminState) -> Router {
    Router::new()
        .route("/v1/audit", get(list_audit))
        .route("/v1/audit/verify", get(verify_audit))
        .route("/v1/authkeys", post(create_auth_key))
        .route("/v1/flows", get(list_flows))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{node}", delete(delete_node))
        .route("/v1/nodes/{node}/expire", post(expire_node))
        .route("/v1/users/{email}/disable", post(disable_user))
        .route(
            "/v1/policy",
            put(set_policy).layer(DefaultBodyLimit::max(POLICY_BODY_LIMIT)),
        )
        .with_state(Arc::new(state))
}

type Shared = State<Arc<AdminState>>;

async fn create_auth_key(
    ConnectInfo(peer): Caller,
    State(state): Shared,
    Json(request): Json<AuthKeyRequest>,
) -> Result<(StatusCode, Json<CreatedAuthKey>), ApiError> {
    if request.expiry_secs == 0 || request.expiry_secs > MAX_AUTH_KEY_EXPIRY.as_secs() {
        return Err(ApiError::BadRequest(
            "an auth key's expiry must be between 1 second and 1 year (e.g. `--expiry 1h`); \
             keys are bearer secrets, so keep them short-lived"
                .into(),
        ));
    }
    let spec = AuthKeySpec {
        tags: request.tags,
        reusable: request.reusable,
        ephemeral: request.ephemeral,
        expiry: Duration::from_secs(request.expiry_secs),
    };
    let (key, record) = authkey::create(&**state.registry.store(), &spec, SystemTime::now())?;
    tracing::info!(id = %record.id, tags = ?record.tags, reusable = record.reusable, "auth key created");
    audit::record(
        &**state.registry.store(),
        SystemTime::now(),
        peer.actor(),
        Event::AuthKeyCreated {
            id: record.id.clone(),
            tags: record.tags.clone(),
            reusable: record.reusable,
            ephemeral: record.ephemeral,
            expires: record.expires,
        },
    );
    Ok((
        StatusCode::CREATED,
        Json(CreatedAuthKey {
            id: record.id,
            key: key.expose_secret().to_owned(),
            tags: record.tags,
            reusable: record.reusable,
            ephemeral: record.ephemeral,
            expires: rfc3339(record.expires),
        }),
    ))
}

async fn list_nodes(State(state): Shared) -> Result<Json<Vec<NodeView>>, ApiError> {
    let online = state.netmaps.online().await;
    let nodes = state.registry.nodes()?;
    Ok(Json(
        nodes
            .into_iter()
            .map(|(record, _)| {
                let online = online.contains(&record.id);
                view(record, online)
            })
            .collect(),
    ))
}

/// `node` is an id, a name, `id:ID` or `name:NAME` (see `Registry::find`).
async fn delete_node(
    ConnectInfo(peer): Caller,
    State(state): Shared,
    Path(node): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let record = state.registry.delete_by(&node)?;
    tracing::info!(node = %record.id, name = %record.name, "node deleted by an administrator");
    audit::record(
        &**state.registry.store(),
        SystemTime::now(),
        peer.actor(),
        Event::NodeDeleted {
            node: record.id,
            name: record.name.clone(),
        },
    );
    Ok(Json(view(record, false)))
}

async fn expire_node(
    ConnectInfo(peer): Caller,
    State(state): Shared,
    Path(node): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let now = SystemTime::now();
    let record = state.registry.expire_by(&node, now)?;
    tracing::info!(node = %record.id, name = %record.name, "node's login expired by an administrator");
    audit::record(
        &**state.registry.store(),
        now,
        peer.actor(),
        Event::NodeExpired {
            node: record.id,
            name: record.name.clone(),
        },
    );
    Ok(Json(view(record, false)))
}

async fn disable_user(
    ConnectInfo(peer): Caller,
    State(state): Shared,
    Path(email): Path<String>,
) -> Result<Json<Vec<NodeView>>, ApiError> {
    let now = SystemTime::now();
    let cut = state.registry.disable_user(&email, now)?;
    tracing::info!(nodes = cut.len(), "user disabled by an administrator");
    audit::record(
        &**state.registry.store(),
        now,
        peer.actor(),
        Event::UserDisabled {
            email: weft_proto::canonical::email(email.trim()).into_owned(),
            nodes: cut.len(),
        },
    );
    Ok(Json(cut.into_iter().map(|r| view(r, false)).collect()))
}

/// The largest `policy set` body: a policy of [`policy_watch::MAX_POLICY_BYTES`]
/// as a JSON string, where escaping can double its quotes and backslashes.
const POLICY_BODY_LIMIT: usize = 2 * policy_watch::MAX_POLICY_BYTES + 64 * 1024;

async fn set_policy(
    ConnectInfo(peer): Caller,
    State(state): Shared,
    request: Result<Json<PolicyRequest>, JsonRejection>,
) -> Result<Json<PolicyInstalled>, ApiError> {
    let request = match request {
        Ok(Json(request)) => request,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ApiError::TooLarge(format!(
                "the policy is over the {}-byte limit for policies (the same for --policy \
                 files and `policy set`)",
                policy_watch::MAX_POLICY_BYTES
            )))
        }
        Err(rejection) => return Err(ApiError::BadRequest(rejection.body_text())),
    };
    if request.source.len() > policy_watch::MAX_POLICY_BYTES {
        return Err(ApiError::TooLarge(policy_watch::too_large(
            &request.file_name,
            request.source.len() as u64,
        )));
    }
    let validated =
        policy_watch::validate(&request.source, &request.file_name, &state.policy.roles)
            .map_err(|diagnostics| ApiError::PolicyRejected(diagnostics.to_string()))?;
    let policy = Arc::new(validated.policy);
    let report = state
        .netmaps
        .check_tests(policy.clone())
        .await
        .map_err(|failures| {
            ApiError::PolicyRejected(format!(
                "the policy's tests fail on the registered nodes:\n{failures}"
            ))
        })?;
    if request.force {
        tracing::warn!(
            "installing a policy with --force: the administrator lockout guard is skipped"
        );
    } else {
        state
            .netmaps
            .check_lockout(policy.clone(), state.policy.admins.clone())
            .await
            .map_err(|lockout| ApiError::PolicyRejected(lockout.to_string()))?;
    }
    state
        .netmaps
        .check_budget(policy.clone())
        .await
        .map_err(|over| ApiError::PolicyRejected(over.to_string()))?;
    let stored = policy_watch::StoredPolicy {
        file_name: request.file_name,
        source: request.source,
    };
    policy_watch::install(
        &**state.registry.store(),
        &stored,
        &policy,
        &state.policy.roles,
        &peer.actor(),
        request.force,
        SystemTime::now(),
    )?;
    let warnings = policy
        .warnings_with_nodes()
        .map(ToString::to_string)
        .collect();
    if state.in_force.claim(&stored.source) {
        state.netmaps.set_policy(Some(policy)).await;
    }
    tracing::info!("installed a policy through the admin API");
    Ok(Json(PolicyInstalled {
        tests_passed: report.passed,
        warnings,
    }))
}

/// `since`: Unix seconds.
#[derive(Debug, Deserialize)]
struct AuditQuery {
    since: Option<u64>,
}

async fn list_audit(
    State(state): Shared,
    Query(query): Query<AuditQuery>,
) -> Result<Json<AuditLog>, ApiError> {
    Ok(Json(AuditLog {
        entries: audit::list(&**state.registry.store(), query.since)?,
        failed_appends: audit::failed_appends(),
    }))
}

/// The flow records this replica keeps that match the query, newest last.
async fn list_flows(
    State(state): Shared,
    Query(query): Query<FlowQuery>,
) -> Result<Json<FlowList>, ApiError> {
    let filter = FlowFilter::parse(&query)?;
    let reader = state.flows.clone();
    let (records, more) = tokio::task::spawn_blocking(move || reader.query(&filter))
        .await
        .map_err(ApiError::Task)??;
    Ok(Json(FlowList { records, more }))
}

/// An entry the chain must still hold: `seq` and `hash` together.
#[derive(Debug, Deserialize)]
struct VerifyQuery {
    seq: Option<u64>,
    hash: Option<String>,
}

async fn verify_audit(
    State(state): Shared,
    Query(query): Query<VerifyQuery>,
) -> Result<Json<Verification>, ApiError> {
    let pin = match (query.seq, query.hash) {
        (Some(seq), Some(hash)) => Some(Pin { seq, hash }),
        (None, None) => None,
        _ => {
            return Err(ApiError::BadRequest(
                "a pinned entry needs both its sequence number and its hash".into(),
            ))
        }
    };
    Ok(Json(audit::verify(
        &**state.registry.store(),
        pin.as_ref(),
    )?))
}

fn view(record: NodeRecord, online: bool) -> NodeView {
    NodeView {
        id: record.id,
        name: record.name,
        ipv4: record.ipv4,
        ipv6: record.ipv6,
        identity: record.identity,
        endpoints: record.endpoints,
        attributes: record.attributes,
        online,
        created: rfc3339(record.created),
        ephemeral: record.ephemeral,
    }
}

/// The longest an auth key may live.
const MAX_AUTH_KEY_EXPIRY: Duration = Duration::from_secs(366 * 24 * 3600);

fn rfc3339(unix_secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix_secs)).to_string()
}
