//! The QUIC listener: one task per client connection.
//!
//! Handshake on the first bidirectional stream, an admission frame on the
//! same stream, then `Send` messages as QUIC datagrams until the client goes
//! away or the core cuts it. A message too large for the connection's
//! datagram limit travels as a stream frame on the handshake stream instead,
//! both ways, so a full-size WireGuard packet is never dropped for its size.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::timeout;
use weft_net::handshake::{self, AuthError};
use weft_net::relay::{close_reason, write_frame};
use weft_net::tls::{self, TlsError};
use weft_net::Service;
use weft_proto::relay::StreamDecoder;
use weft_proto::{PublicKey, CLOSE_HANDSHAKE_FAILED};

use crate::server::{admitted_frame, closed_frame, Link, Shared};

/// Time allowed from the first packet to a completed Noise handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a refusal to reach the client before the connection closes.
const LINGER: Duration = Duration::from_secs(1);
/// Oversized messages queued for one client's stream before further ones
/// are dropped, as a congested path would.
const STREAM_QUEUE: usize = 64;
/// A client silent this long is gone.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub(crate) enum BindError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Binds the QUIC endpoint.
pub(crate) fn bind(addr: SocketAddr) -> Result<quinn::Endpoint, BindError> {
    let mut transport = quinn::TransportConfig::default();
    // Clients open only the handshake stream.
    transport.max_concurrent_uni_streams(0u8.into());
    transport.max_concurrent_bidi_streams(1u8.into());
    let config = tls::quic_server_config(Service::Relay, IDLE_TIMEOUT, transport)?;
    Ok(quinn::Endpoint::server(config, addr)?)
}

/// Accepts connections until the endpoint closes.
pub(crate) async fn accept(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    sessions.spawn(serve(incoming, Arc::clone(&shared)));
                }
                None => break,
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

async fn serve(incoming: quinn::Incoming, shared: Arc<Shared>) {
    let remote = incoming.remote_address();
    let authenticated = timeout(HANDSHAKE_TIMEOUT, async {
        let conn = incoming.await?;
        let (key, send, recv) = handshake::respond_quic(&conn, Service::Relay, &shared.key)
            .await
            .inspect_err(|_| {
                conn.close(CLOSE_HANDSHAKE_FAILED.into(), b"relay handshake failed");
            })?;
        Ok::<_, AuthError>((conn, key, send, recv))
    })
    .await;
    let (conn, key, mut send, recv) = match authenticated {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => {
            tracing::debug!(%remote, "relay handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "relay handshake timed out after {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let id = shared.next_conn();
    let (oversize, queue) = mpsc::channel(STREAM_QUEUE);
    let link = Link::Quic {
        conn: conn.clone(),
        oversize,
    };
    if let Err(refused) = shared.connect(key, id, link) {
        tracing::info!(%remote, "refusing relay client: {refused}");
        let _ = send.write_all(&closed_frame(refused.code())).await;
        let _ = send.finish();
        let _ = timeout(LINGER, send.stopped()).await;
        conn.close(refused.code().into(), close_reason(refused.code()));
        return;
    }
    if send.write_all(&admitted_frame()).await.is_err() {
        shared.disconnect(&key, id);
        return;
    }
    let end = pump(&conn, send, recv, key, id, &shared, queue).await;
    tracing::debug!(%remote, node_key = %key.short(), "relay session ended: {end}");
    shared.disconnect(&key, id);
}

/// Moves messages both ways, datagrams and stream frames, until the session
/// ends; returns why it ended.
async fn pump(
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    key: PublicKey,
    id: crate::core::ConnId,
    shared: &Shared,
    mut queue: mpsc::Receiver<Vec<u8>>,
) -> String {
    let mut decoder = StreamDecoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut stream_open = true;
    loop {
        tokio::select! {
            datagram = conn.read_datagram() => match datagram {
                Ok(datagram) => shared.handle(key, id, &datagram),
                Err(e) => return e.to_string(),
            },
            read = recv.read(&mut buf), if stream_open => match read {
                Ok(Some(n)) => {
                    decoder.push(&buf[..n]);
                    loop {
                        match decoder.next_frame() {
                            Ok(Some(message)) => shared.handle(key, id, message),
                            Ok(None) => break,
                            Err(e) => return e.to_string(),
                        }
                    }
                }
                // The client finished its stream; datagrams may still flow.
                Ok(None) => stream_open = false,
                Err(e) => return e.to_string(),
            },
            message = queue.recv() => {
                let Some(message) = message else {
                    return "the relay dropped the session".into();
                };
                if let Err(e) = write_frame(&mut send, &message).await {
                    return e.to_string();
                }
            }
        }
    }
}
