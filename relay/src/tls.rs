//! TLS for relay connections: a fresh self-signed certificate per start on
//! the relay, and a client that accepts any certificate.
//!
//! Neither side trusts the certificate. The Noise handshake that follows
//! authenticates the relay by its pinned static key and is bound to this
//! TLS session through an exporter value, so the certificate only has to
//! exist.

use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::ring;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// The TLS server name clients send; the certificate is not checked against it.
pub(crate) const SERVER_NAME: &str = "weft-relay";
/// A client silent this long is gone.
const IDLE_TIMEOUT_MS: u32 = 15_000;
/// Clients keep their session (and NAT mappings) alive this often.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Why TLS could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate could not be generated.
    #[error("cannot generate the TLS certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("cannot configure TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the configuration.
    #[error("cannot configure QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// The relay's TLS server configuration, shared by QUIC and TCP.
pub(crate) fn server_tls(alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// The QUIC server configuration of the relay listener.
pub(crate) fn quic_server(alpn: &[u8]) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls(alpn)?)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(quinn::VarInt::from_u32(IDLE_TIMEOUT_MS).into()));
    // Clients open only the handshake stream.
    transport.max_concurrent_uni_streams(0u8.into());
    transport.max_concurrent_bidi_streams(1u8.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A TLS client configuration for `alpn` that accepts any certificate.
pub(crate) fn client_tls(alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    Ok(weft_proto::tls::client_config(alpn)?)
}

/// A QUIC client configuration for `alpn` with keep-alives.
pub(crate) fn quic_client(alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(alpn)?)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(quinn::VarInt::from_u32(IDLE_TIMEOUT_MS).into()));
    config.transport_config(Arc::new(transport));
    Ok(config)
}
