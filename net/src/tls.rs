//! The TLS under weft's QUIC and TCP transports (control sessions and
//! relays), both sides.
//!
//! Coordinators and relays present fresh self-signed certificates that no
//! client checks: the Noise handshake that follows authenticates the server
//! by its pinned static key, and its prologue carries a TLS exporter value
//! ([`crate::handshake`]), so a machine-in-the-middle terminating TLS with
//! its own certificate sees a different exporter value and cannot complete
//! the handshake. The certificate's signature over the TLS handshake is
//! still verified, so the server does hold the certificate's key.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::Service;

/// Why TLS or QUIC could not be configured.
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
    /// The idle timeout is beyond what QUIC can carry.
    #[error("cannot configure QUIC: {0}")]
    IdleTimeout(#[from] quinn::VarIntBoundsExceeded),
}

/// How a QUIC client notices a server that went away: a keep-alive every
/// `keep_alive`, and the connection ends after `idle_timeout` without
/// hearing from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// How often an otherwise idle connection sends a keep-alive.
    pub keep_alive: Duration,
    /// Silence after which the connection is gone.
    pub idle_timeout: Duration,
}

/// The TLS server configuration of `service`'s listeners, QUIC and TCP: TLS
/// 1.3 with a fresh self-signed certificate, offering the service's ALPN.
pub fn server_config(service: Service) -> Result<rustls::ServerConfig, TlsError> {
    let certified = rcgen::generate_simple_self_signed(vec![service.server_name().to_owned()])?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)?;
    tls.alpn_protocols = vec![service.alpn().to_vec()];
    Ok(tls)
}

/// The TLS acceptor of `service`'s TCP listener.
pub fn acceptor(service: Service) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server_config(
        service,
    )?)))
}

/// The QUIC server configuration of `service`'s listener: a client silent
/// for `idle_timeout` is gone. `transport` starts from quinn's defaults and
/// may set limits of the service's own (streams a client may open).
pub fn quic_server_config(
    service: Service,
    idle_timeout: Duration,
    mut transport: quinn::TransportConfig,
) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_config(service)?)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(idle_timeout)?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The QUIC client configuration for `service`, with `liveness`.
pub fn quic_client_config(
    service: Service,
    liveness: Liveness,
) -> Result<quinn::ClientConfig, TlsError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_config(service.alpn())?)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(liveness.keep_alive));
    transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(liveness.idle_timeout)?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A QUIC client endpoint bound to `bind` whose connections to `service`
/// keep `liveness`.
pub fn quic_client(
    bind: std::net::SocketAddr,
    service: Service,
    liveness: Liveness,
) -> Result<quinn::Endpoint, ClientEndpointError> {
    let config = quic_client_config(service, liveness)?;
    let mut endpoint = quinn::Endpoint::client(bind)
        .map_err(|source| ClientEndpointError::Bind { bind, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Why a QUIC client endpoint could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientEndpointError {
    /// The configuration was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {bind}: {source}")]
    Bind {
        /// The address asked for.
        bind: std::net::SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// A TLS 1.3 client configuration offering `alpn` that accepts the
/// server's certificate without checking it (see the module documentation).
pub fn client_config(alpn: &[u8]) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoiseBoundVerifier { provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// Accepts any certificate; see the module documentation for why that is safe here.
#[derive(Debug)]
struct NoiseBoundVerifier {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoiseBoundVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rustls::{ClientConnection, ServerConnection};

    use super::*;

    /// A server with a fresh self-signed certificate, offering `alpn`.
    fn server(alpn: &[u8]) -> Arc<rustls::ServerConfig> {
        let mut config = server_config(Service::Relay).unwrap();
        config.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(config)
    }

    /// Runs a handshake in memory; the negotiated ALPN.
    fn handshake(
        client: rustls::ClientConfig,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<Vec<u8>, rustls::Error> {
        let name = ServerName::try_from("weft-coordinator").unwrap();
        let mut client = ClientConnection::new(Arc::new(client), name)?;
        let mut server = ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(client.alpn_protocol().unwrap_or_default().to_vec());
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn any_self_signed_certificate_completes_the_handshake() {
        let alpn = handshake(client_config(b"weft/1").unwrap(), server(b"weft/1")).unwrap();
        assert_eq!(alpn, b"weft/1");
    }

    #[test]
    fn a_server_speaking_another_protocol_is_refused() {
        let result = handshake(client_config(b"weft/1").unwrap(), server(b"other/1"));
        assert!(result.is_err(), "{result:?}");
    }

    #[test]
    fn a_service_server_completes_the_handshake_with_its_alpn() {
        for service in [Service::Control, Service::Relay] {
            let config = Arc::new(server_config(service).unwrap());
            let alpn = handshake(client_config(service.alpn()).unwrap(), config).unwrap();
            assert_eq!(alpn, service.alpn());
        }
    }
}
