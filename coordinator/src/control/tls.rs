//! The control listeners' TLS configuration (QUIC, and TLS on TCP): a fresh
//! self-signed certificate per start.
//!
//! Nodes do not verify the certificate. They authenticate the coordinator by
//! its Noise static key, and the handshake is bound to this TLS session
//! through an exporter value, so the certificate only has to exist.

use std::sync::Arc;

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// Why the TLS server configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("cannot generate the TLS certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot configure TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot configure QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// The QUIC server configuration of the control listener.
pub(crate) fn server_config() -> Result<quinn::ServerConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls()?)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Nodes keep their session alive; a node silent this long is gone.
    transport.max_idle_timeout(Some(quinn::VarInt::from_u32(30_000).into()));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The TLS acceptor of control sessions on TCP, for nodes whose network
/// blocks UDP: the same protocol (ALPN) and the same unchecked certificate.
pub(crate) fn acceptor() -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server_tls()?)))
}

/// TLS 1.3 with a fresh self-signed certificate, offering the control ALPN.
fn server_tls() -> Result<rustls::ServerConfig, TlsError> {
    let certified = rcgen::generate_simple_self_signed(vec!["weft-coordinator".to_owned()])?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)?;
    tls.alpn_protocols = vec![weft_proto::ALPN.to_vec()];
    Ok(tls)
}
