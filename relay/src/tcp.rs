//! The TLS-over-TCP fallback for networks that block UDP: the same
//! handshake, admission and messages as over QUIC, with every message a
//! `u16`-length stream frame instead of a datagram.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use weft_net::handshake::{self, AuthError};
use weft_net::relay::write_frame;
use weft_net::tls::{self, TlsError};
use weft_net::Service;
use weft_proto::relay::StreamDecoder;
use weft_proto::PublicKey;

use crate::server::{admitted_frame, closed_frame, Link, Shared};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages queued for one TCP client before further ones are dropped, as
/// a congested UDP path would.
const QUEUE: usize = 256;
/// A TCP client silent this long is gone.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The TLS acceptor of the fallback listener.
pub(crate) fn acceptor() -> Result<TlsAcceptor, TlsError> {
    tls::acceptor(Service::Relay)
}

/// Accepts connections forever.
pub(crate) async fn accept(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, remote, acceptor.clone(), Arc::clone(&shared)));
            }
            Err(e) => {
                tracing::warn!("cannot accept a TCP relay connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve(stream: TcpStream, remote: SocketAddr, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let authenticated = timeout(HANDSHAKE_TIMEOUT, async {
        let mut tls = acceptor.accept(stream).await.map_err(AuthError::Tls)?;
        let key = handshake::respond_tls(&mut tls, Service::Relay, &shared.key).await?;
        Ok::<_, AuthError>((tls, key))
    })
    .await;
    let (mut tls, key) = match authenticated {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => {
            tracing::debug!(%remote, "TCP relay handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "TCP relay handshake timed out");
            return;
        }
    };
    let id = shared.next_conn();
    let (messages, queue) = mpsc::channel(QUEUE);
    let (close, closing) = watch::channel(None);
    if let Err(refused) = shared.connect(key, id, Link::Tcp { messages, close }) {
        tracing::info!(%remote, "refusing TCP relay client: {refused}");
        let _ = tls.write_all(&closed_frame(refused.code())).await;
        let _ = tls.shutdown().await;
        return;
    }
    let (reader, mut writer) = tokio::io::split(tls);
    let end = match writer.write_all(&admitted_frame()).await {
        Ok(()) => pump(reader, &mut writer, key, id, &shared, queue, closing).await,
        Err(e) => e.to_string(),
    };
    tracing::debug!(%remote, node_key = %key.short(), "TCP relay session ended: {end}");
    let _ = writer.shutdown().await;
    shared.disconnect(&key, id);
}

/// Moves messages both ways until the session ends; returns why it ended.
async fn pump<R, W>(
    mut reader: R,
    writer: &mut W,
    key: PublicKey,
    id: crate::core::ConnId,
    shared: &Shared,
    mut queue: mpsc::Receiver<Vec<u8>>,
    mut closing: watch::Receiver<Option<u32>>,
) -> String
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut decoder = StreamDecoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = timeout(IDLE_TIMEOUT, reader.read(&mut buf)) => {
                let n = match read {
                    Ok(Ok(0)) => return "the client closed the connection".into(),
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) => return e.to_string(),
                    Err(_) => return format!("no traffic for {IDLE_TIMEOUT:?}"),
                };
                decoder.push(&buf[..n]);
                loop {
                    match decoder.next_frame() {
                        Ok(Some(message)) => shared.handle(key, id, message),
                        Ok(None) => break,
                        Err(e) => return e.to_string(),
                    }
                }
            }
            message = queue.recv() => {
                let Some(message) = message else {
                    return "the relay dropped the session".into();
                };
                if let Err(e) = write_frame(writer, &message).await {
                    return e.to_string();
                }
            }
            changed = closing.changed() => {
                let code = match changed {
                    Ok(()) => *closing.borrow(),
                    Err(_) => None,
                };
                if let Some(code) = code {
                    let _ = writer.write_all(&closed_frame(code)).await;
                    return format!("closed with code {code:#x}");
                }
                return "the relay dropped the session".into();
            }
        }
    }
}
