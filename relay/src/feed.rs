//! The relay's session with the coordinator: which node keys are admitted.
//!
//! The relay connects like a node (QUIC, Noise IK with its relay key as the
//! machine key), sends `RelayFeed`, and applies every `RelayAdmissions` to
//! the core. When the coordinator is away the relay keeps its last set and
//! reconnects with backoff.

use std::sync::Arc;
use std::time::Duration;

use weft_net::handshake::{self, InitiateError, QuicInitiateError};
use weft_net::tls::{self, Liveness};
use weft_net::Service;
use weft_proto::{
    encode_frame, ClientMessage, DecodeError, EncodeError, FrameDecoder, PublicKey, ServerMessage,
};

use crate::server::Shared;

/// The first wait before reconnecting, doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A session that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
/// The largest coordinator frame a relay accepts: one key set of 500,000 nodes.
const MAX_FRAME: usize = 16 << 20;
/// How the relay notices a coordinator that went away.
const LIVENESS: Liveness = Liveness {
    keep_alive: Duration::from_secs(5),
    idle_timeout: Duration::from_secs(15),
};

/// Where the coordinator is and who the relay is to it.
#[derive(Debug, Clone)]
pub(crate) struct FeedConfig {
    pub(crate) coordinator: String,
    pub(crate) coordinator_key: PublicKey,
    pub(crate) name: String,
}

/// Why a feed session ended.
#[derive(Debug, thiserror::Error)]
enum FeedError {
    /// `source` is the resolver's error, unless it found no address.
    #[error("cannot resolve the coordinator address {address:?}; pass --coordinator HOST:PORT")]
    Resolve {
        address: String,
        #[source]
        source: Option<std::io::Error>,
    },
    /// quinn refused to start the connection.
    #[error("cannot reach the coordinator: {0}")]
    Connect(#[source] quinn::ConnectError),
    /// The connection failed before it was established.
    #[error("cannot reach the coordinator: {0}")]
    Unreachable(#[source] quinn::ConnectionError),
    #[error("control handshake with the coordinator failed: {0} (check --coordinator-key against `weft-coordinator key`)")]
    Handshake(#[source] QuicInitiateError),
    /// The coordinator's own sentence.
    #[error("the coordinator refused this relay: {0}")]
    Refused(String),
    /// The connection or its stream broke; quinn's error is inside the
    /// `io::Error`, whose kind says reset, timed out or not connected.
    #[error("coordinator session lost: {0}")]
    Lost(#[source] std::io::Error),
    #[error("coordinator session lost: the coordinator ended the session")]
    Ended,
    /// A message out of place, described.
    #[error("the coordinator sent something a relay does not expect: {0}")]
    Protocol(String),
    #[error("the coordinator sent something a relay does not expect: {0}")]
    Decode(#[source] DecodeError),
    #[error("the coordinator sent something a relay does not expect: {0}")]
    Encode(#[source] EncodeError),
}

/// Follows the coordinator forever.
pub(crate) async fn follow(config: FeedConfig, shared: Arc<Shared>) {
    let endpoint = match client_endpoint() {
        Ok(endpoint) => endpoint,
        Err(e) => {
            tracing::error!("cannot start the relay's coordinator client: {e}");
            return;
        }
    };
    let mut backoff = MIN_BACKOFF;
    loop {
        let started = tokio::time::Instant::now();
        let error = session(&endpoint, &config, &shared).await;
        if started.elapsed() >= STABLE {
            backoff = MIN_BACKOFF;
        }
        match &error {
            FeedError::Refused(_) | FeedError::Handshake(_) => {
                tracing::error!("{error}; keeping the last admitted set, retrying in {backoff:?}")
            }
            _ => tracing::warn!("{error}; keeping the last admitted set, retrying in {backoff:?}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn client_endpoint() -> Result<quinn::Endpoint, tls::ClientEndpointError> {
    let bind = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    tls::quic_client(bind, Service::Control, LIVENESS)
}

async fn session(endpoint: &quinn::Endpoint, config: &FeedConfig, shared: &Shared) -> FeedError {
    match run(endpoint, config, shared).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn run(
    endpoint: &quinn::Endpoint,
    config: &FeedConfig,
    shared: &Shared,
) -> Result<std::convert::Infallible, FeedError> {
    let unresolved = |source| FeedError::Resolve {
        address: config.coordinator.clone(),
        source,
    };
    let addr = tokio::net::lookup_host(&config.coordinator)
        .await
        .map_err(|e| unresolved(Some(e)))?
        .next()
        .ok_or_else(|| unresolved(None))?;
    let conn = endpoint
        .connect(addr, Service::Control.server_name())
        .map_err(FeedError::Connect)?
        .await
        .map_err(FeedError::Unreachable)?;
    let (mut send, mut recv) = handshake::initiate_quic(
        &conn,
        Service::Control,
        &shared.key,
        &config.coordinator_key,
    )
    .await
    .map_err(|e| match e {
        QuicInitiateError::Stream(e) => FeedError::Lost(e.into()),
        QuicInitiateError::Handshake(InitiateError::Send(e)) => FeedError::Lost(e),
        e => FeedError::Handshake(e),
    })?;
    let hello = encode_frame(&ClientMessage::RelayFeed {
        name: config.name.clone(),
    })
    .map_err(FeedError::Encode)?;
    send.write_all(&hello)
        .await
        .map_err(|e| FeedError::Lost(e.into()))?;
    tracing::info!(coordinator = %addr, "relay following the coordinator's admissions");
    let mut decoder = FrameDecoder::with_limit(MAX_FRAME);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(message) = decoder
            .next_message::<ServerMessage>()
            .map_err(FeedError::Decode)?
        {
            match message {
                ServerMessage::RelayAdmissions { full, add, remove } => {
                    shared.apply_admissions(full, &add, &remove);
                }
                ServerMessage::Refused(refusal) => return Err(FeedError::Refused(refusal.message)),
                other => {
                    return Err(FeedError::Protocol(format!(
                        "{} instead of relay admissions",
                        other.kind()
                    )))
                }
            }
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.push(&buf[..n]),
            Ok(None) => return Err(FeedError::Ended),
            Err(e) => return Err(FeedError::Lost(e.into())),
        }
    }
}
