//! A client of the admin API, as the `weft-coordinator` admin commands use it.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    AuditLog, AuthKeyRequest, CreatedAuthKey, ErrorBody, NodeView, PolicyInstalled, PolicyRequest,
};
use crate::audit::{Pin, Verification};
use crate::flows::{FlowList, FlowQuery};

/// Talks to a running coordinator over its admin socket.
#[derive(Debug, Clone)]
pub struct AdminClient {
    socket: PathBuf,
    data_dir: PathBuf,
}

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No coordinator is serving the data directory.
    #[error("cannot reach the coordinator's admin socket at {}: is `weft-coordinator serve --data-dir {}` running?", socket.display(), data_dir.display())]
    Unreachable {
        /// The socket tried.
        socket: PathBuf,
        /// The data directory it belongs to.
        data_dir: PathBuf,
        /// Why connecting failed.
        #[source]
        source: std::io::Error,
    },
    /// The socket is there, but this user may not use it.
    #[error("permission denied on the coordinator's admin socket at {}: admin commands run as root or as the user that runs `weft-coordinator serve`", socket.display())]
    PermissionDenied {
        /// The socket tried.
        socket: PathBuf,
        /// The refusal.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed mid-request.
    #[error("admin request to the coordinator failed: {0}")]
    Http(#[source] hyper::Error),
    /// The request could not be encoded.
    #[error("admin request to the coordinator failed: {0}")]
    Encode(#[source] serde_json::Error),
    /// The request could not be built.
    #[error("admin request to the coordinator failed: {0}")]
    Request(#[source] hyper::http::Error),
    /// The coordinator refused the request.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The coordinator's explanation.
        message: String,
    },
    /// The coordinator's answer was not what this client expects.
    #[error("unexpected answer from the coordinator (is it the same weft version?): {0}")]
    Decode(#[source] serde_json::Error),
}

impl AdminClient {
    /// A client for the coordinator serving `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            socket: super::socket_path(data_dir),
            data_dir: data_dir.to_owned(),
        }
    }

    /// Creates an auth key.
    pub async fn create_auth_key(
        &self,
        request: &AuthKeyRequest,
    ) -> Result<CreatedAuthKey, ClientError> {
        self.call(Method::POST, "/v1/authkeys", Some(request)).await
    }

    /// Lists every node.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, ClientError> {
        self.call(Method::GET, "/v1/nodes", None::<&()>).await
    }

    /// Deletes the node `node` names: its id (`n7`), its name, or either
    /// spelled out (`id:n7`, `name:web`).
    pub async fn delete_node(&self, node: &str) -> Result<NodeView, ClientError> {
        let path = format!("/v1/nodes/{}", percent_encode(node));
        self.call(Method::DELETE, &path, None::<&()>).await
    }

    /// Ends the login of the node `node` names, as for [`AdminClient::delete_node`].
    pub async fn expire_node(&self, node: &str) -> Result<NodeView, ClientError> {
        let path = format!("/v1/nodes/{}/expire", percent_encode(node));
        self.call(Method::POST, &path, None::<&()>).await
    }

    /// Disables a user; returns the nodes whose login was ended.
    pub async fn disable_user(&self, email: &str) -> Result<Vec<NodeView>, ClientError> {
        let path = format!("/v1/users/{}/disable", percent_encode(email));
        self.call(Method::POST, &path, None::<&()>).await
    }

    /// Validates and installs a policy.
    pub async fn set_policy(
        &self,
        file_name: &str,
        source: &str,
        force: bool,
    ) -> Result<PolicyInstalled, ClientError> {
        let request = PolicyRequest {
            file_name: file_name.to_owned(),
            source: source.to_owned(),
            force,
        };
        self.call(Method::PUT, "/v1/policy", Some(&request)).await
    }

    /// The audit trail's entries recorded at or after `since` (Unix seconds).
    pub async fn audit(&self, since: Option<u64>) -> Result<AuditLog, ClientError> {
        let path = match since {
            Some(since) => format!("/v1/audit?since={since}"),
            None => "/v1/audit".to_owned(),
        };
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// The flow records the coordinator keeps that match `query`.
    pub async fn flows(&self, query: &FlowQuery) -> Result<FlowList, ClientError> {
        let mut params = Vec::new();
        let strings = [
            ("src", &query.src),
            ("dst", &query.dst),
            ("verdict", &query.verdict),
            ("id", &query.id),
        ];
        for (name, value) in strings {
            if let Some(value) = value {
                params.push(format!("{name}={}", percent_encode(value)));
            }
        }
        if let Some(since) = query.since_ms {
            params.push(format!("since_ms={since}"));
        }
        if let Some(limit) = query.limit {
            params.push(format!("limit={limit}"));
        }
        let path = if params.is_empty() {
            "/v1/flows".to_owned()
        } else {
            format!("/v1/flows?{}", params.join("&"))
        };
        self.call(Method::GET, &path, None::<&()>).await
    }

    /// Verifies the audit trail's chain, and that it still holds `pin`.
    pub async fn verify_audit(&self, pin: Option<&Pin>) -> Result<Verification, ClientError> {
        let path = match pin {
            Some(pin) => format!(
                "/v1/audit/verify?seq={}&hash={}",
                pin.seq,
                percent_encode(&pin.hash)
            ),
            None => "/v1/audit/verify".to_owned(),
        };
        self.call(Method::GET, &path, None::<&()>).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                    socket: self.socket.clone(),
                    source,
                },
                _ => ClientError::Unreachable {
                    socket: self.socket.clone(),
                    data_dir: self.data_dir.clone(),
                    source,
                },
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ClientError::Http)?;
        let driver = tokio::spawn(connection);
        let body = match body {
            Some(body) => serde_json::to_vec(body).map_err(ClientError::Encode)?,
            None => Vec::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "weft-coordinator")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(ClientError::Request)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(ClientError::Http)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(ClientError::Http)?
            .to_bytes();
        driver.abort();
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(ClientError::Decode);
        }
        Err(api_error(status, &bytes))
    }
}

fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let message = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(body) => body.error,
        Err(_) => format!("{status}: {}", String::from_utf8_lossy(body).trim()),
    };
    ClientError::Api {
        status: status.as_u16(),
        message,
    }
}

/// Escapes everything but RFC 3986 unreserved characters, for a path segment.
fn percent_encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(percent_encode("web-1"), "web-1");
        assert_eq!(percent_encode("a/b c"), "a%2Fb%20c");
        assert_eq!(percent_encode(".."), "..");
    }

    #[tokio::test]
    async fn an_absent_server_is_reported_with_the_command_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let err = AdminClient::new(dir.path()).nodes().await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("admin.sock"), "{text}");
        assert!(
            text.contains(&format!(
                "weft-coordinator serve --data-dir {}",
                dir.path().display()
            )),
            "{text}"
        );
    }
}
