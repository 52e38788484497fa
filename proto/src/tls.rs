//! The TLS under weft's QUIC and TCP transports (control sessions and
//! relays), client side.
//!
//! Coordinators and relays present fresh self-signed certificates that no
//! client checks: the Noise handshake that follows authenticates the server
//! by its pinned static key, and its prologue carries a TLS exporter value,
//! so a machine-in-the-middle terminating TLS with its own certificate sees
//! a different exporter value and cannot complete the handshake. The
//! certificate's signature over the TLS handshake is still verified, so the
//! server does hold the certificate's key.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

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
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::{ClientConnection, ServerConnection};

    use super::*;

    /// A server with a fresh self-signed certificate for a name no client asks for.
    fn server(alpn: &[u8]) -> Arc<rustls::ServerConfig> {
        let certified = rcgen::generate_simple_self_signed(vec!["elsewhere".into()]).unwrap();
        let key =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![certified.cert.der().clone()], key)
                .unwrap();
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
}
