//! The `/metrics` endpoint of `--metrics-listen`, shared by weftd, the
//! coordinator and the relay: HTTP/1.1 from hyper, answering `GET /metrics`
//! only.
//!
//! Each connection carries one request and is closed after the answer. A
//! client gets 10 s to send its request head, and at most
//! [`MAX_CONNECTIONS`] are served at once (further ones wait in the
//! listener's backlog), so slow or hostile clients cost a few small tasks.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE as CONTENT_TYPE_HEADER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The exposition's media type: OpenMetrics text, which Prometheus
/// negotiates and parses like its own text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a client has to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; a scraper needs one.
pub const MAX_CONNECTIONS: usize = 64;

/// Answers `GET /metrics` on `listener` with what `render` returns, until
/// the task is dropped. Other paths get 404, other methods 405.
pub async fn serve<F, Fut>(listener: TcpListener, render: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::debug!(%error, "metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(&request, render).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%error, "metrics request failed");
            }
            drop(slot);
        });
    }
}

async fn answer<F, Fut>(request: &Request<Incoming>, render: F) -> Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, CONTENT_TYPE, render().await),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "only /metrics is served here\n".to_owned(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE_HEADER, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, HeaderValue::from_static("GET"));
    }
    response
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn a_scrape_gets_the_rendered_text_and_nothing_else_is_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, || async { "up 1\n# EOF\n".to_string() }));

        let response = exchange(addr, b"GET /metrics?x=1 HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains(CONTENT_TYPE), "{response}");
        assert!(response.ends_with("\r\n\r\nup 1\n# EOF\n"), "{response}");

        let response = exchange(addr, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");
        let response = exchange(
            addr,
            b"POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 405"), "{response}");
        assert!(
            response.to_ascii_lowercase().contains("allow: get"),
            "{response}"
        );
        let response = exchange(addr, b"garbage\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 400"), "{response}");
        server.abort();
    }

    /// Idle connections hold at most [`MAX_CONNECTIONS`] slots; a scrape
    /// still gets through once the header timeout frees them.
    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_closed_after_the_header_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, || async { "up 1\n".to_string() }));
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /metr").await.unwrap();
        tokio::time::sleep(HEADER_TIMEOUT + Duration::from_secs(1)).await;
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(_))),
            "the idle connection was not closed: {read:?}"
        );
        server.abort();
    }
}
