//! The `/metrics` endpoint of `--metrics-listen`: the smallest HTTP/1.1
//! server Prometheus scrapes, shared by weftd, the coordinator and the relay
//! so none of them needs an HTTP framework for it.
//!
//! Each connection carries one request and is closed after the answer; a
//! client gets 10 s and 8 KiB to send its request head, so a slow or
//! hostile client costs one small task.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The exposition's media type: OpenMetrics text, which Prometheus
/// negotiates and parses like its own text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a client has to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head read; a scrape's is a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;

/// Answers `GET /metrics` on `listener` with what `render` returns, until
/// the task is dropped. Other paths get 404, other methods 405.
pub async fn serve<F, Fut>(listener: TcpListener, render: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send,
{
    loop {
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
            if let Err(error) = answer(stream, render).await {
                tracing::debug!(%error, "metrics request failed");
            }
        });
    }
}

async fn answer<F, Fut>(mut stream: TcpStream, render: F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let response = match route(&head) {
        Route::Metrics => {
            let body = render().await;
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {CONTENT_TYPE}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
        }
        Route::NotFound => plain("404 Not Found", "only /metrics is served here\n"),
        Route::BadMethod => plain("405 Method Not Allowed", "use GET\n"),
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn plain(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
}

fn route(head: &[u8]) -> Route {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (parts.next(), parts.next().unwrap_or_default());
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    match (method, path) {
        (Some(b"GET"), b"/metrics") => Route::Metrics,
        (Some(b"GET"), _) => Route::NotFound,
        _ => Route::BadMethod,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b""), Route::BadMethod);
    }

    #[tokio::test]
    async fn a_scrape_gets_the_rendered_text() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, || async { "up 1\n# EOF\n".to_string() }));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains(CONTENT_TYPE));
        assert!(response.ends_with("\r\n\r\nup 1\n# EOF\n"), "{response}");
        server.abort();
    }
}
