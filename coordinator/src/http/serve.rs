//! Serving HTTP connections with hyper's HTTP/1.1 server, bounded in time:
//! a request's head must arrive within the header timeout (hyper counts it
//! from when it waits for a request, so it also closes kept-alive
//! connections that send nothing more), and a connection on which no byte
//! moves for the idle timeout is closed at any stage. Connections come from
//! the control port's TCP listener, or from the endpoints' own listener
//! (`--http-listen`), both under the same [`ConnectionGate`].

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::limits::{self, stopping, ConnectionGate, Limits, Permit};

/// The HTTP endpoints and the timeouts their connections run under.
#[derive(Debug)]
pub(crate) struct Server {
    router: axum::Router,
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl Server {
    pub(crate) fn new(router: axum::Router, limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            router,
            header_timeout: limits.http_header_timeout,
            idle_timeout: limits.http_idle_timeout,
        })
    }

    /// Serves one connection until the client closes it, a timeout ends it
    /// or the coordinator shuts down (requests in flight are answered).
    pub(crate) async fn serve(
        &self,
        stream: TcpStream,
        remote: SocketAddr,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let io = TokioIo::new(IdleTimeout::new(stream, self.idle_timeout));
        let service = TowerToHyperService::new(self.router.clone());
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout);
        let connection = builder.serve_connection(io, service);
        let mut connection = std::pin::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = stopping(shutdown) => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%remote, "HTTP connection ended: {e}");
        }
    }
}

/// Accepts connections on the HTTP endpoints' own listener until
/// `shutdown`, then waits for them to close.
pub(crate) async fn accept(
    listener: TcpListener,
    server: Arc<Server>,
    gate: Arc<ConnectionGate>,
    shutdown: watch::Receiver<bool>,
) {
    let serving = shutdown.clone();
    limits::accept_until(
        listener,
        "HTTP listener",
        gate,
        shutdown,
        |stream, remote, permit| {
            serve_admitted(Arc::clone(&server), stream, remote, permit, serving.clone())
        },
    )
    .await;
}

async fn serve_admitted(
    server: Arc<Server>,
    stream: TcpStream,
    remote: SocketAddr,
    _permit: Permit,
    mut shutdown: watch::Receiver<bool>,
) {
    server.serve(stream, remote, &mut shutdown).await;
}

/// A socket that fails with [`io::ErrorKind::TimedOut`] once no byte moved
/// either way for its timeout while it was waiting to read or write.
#[derive(Debug)]
struct IdleTimeout<S> {
    inner: S,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    fn moved(&mut self) {
        let deadline = Instant::now() + self.timeout;
        self.deadline.as_mut().reset(deadline);
    }

    /// The inner socket is not ready: an error if the deadline passed.
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no data moved for {:?}", self.timeout),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => this.waiting(cx),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(result) => {
                if matches!(result, Ok(1..)) {
                    this.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => this.waiting(cx),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => this.waiting(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn a_silent_socket_times_out_and_traffic_keeps_it_open() {
        let (near, mut far) = tokio::io::duplex(64);
        let timeout = Duration::from_millis(300);
        let mut socket = IdleTimeout::new(near, timeout);
        let mut byte = [0u8; 1];
        for _ in 0..3 {
            tokio::time::sleep(timeout * 2 / 3).await;
            far.write_all(b"x").await.unwrap();
            socket.read_exact(&mut byte).await.unwrap();
        }
        let error = socket.read_exact(&mut byte).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }
}
