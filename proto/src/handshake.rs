//! The Noise `IK` handshake that authenticates a control session.
//!
//! The node (initiator) knows the coordinator's static key in advance — the
//! operator pins it with `weft up --coordinator-key` — and proves its own
//! machine key in the first message. Both messages have fixed sizes
//! ([`INITIATION_LEN`], [`RESPONSE_LEN`]), so the shell reads them with
//! `read_exact` and needs no extra framing.
//!
//! The prologue mixes in `binding`, the TLS exporter value of the QUIC
//! connection carrying the handshake. Both ends must see the same TLS session
//! for the handshake to succeed, which is what lets the rest of the session
//! rely on QUIC's encryption even though its certificate is self-signed.

use crate::frame::PROTOCOL_VERSION;
use crate::keys::{PrivateKey, PublicKey};

const PATTERN: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
const PAYLOAD_LEN: usize = 2;

/// What a handshake authenticates. Each purpose has its own Noise prologue,
/// so a handshake made for one can never complete as the other: a control
/// initiation replayed to a relay, or a relay initiation to the coordinator,
/// fails as [`HandshakeError::Authentication`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A node's (or relay's) control session with the coordinator, proving its machine key.
    Control,
    /// A node's session with a relay, proving its WireGuard node key.
    Relay,
}

impl Purpose {
    fn prologue(self) -> &'static [u8] {
        match self {
            Purpose::Control => b"weft control v1",
            Purpose::Relay => b"weft relay v1",
        }
    }
}
/// Size of the node's first message: ephemeral key, encrypted static key, encrypted payload.
pub const INITIATION_LEN: usize = 32 + (32 + 16) + (PAYLOAD_LEN + 16);
/// Size of the coordinator's answer: ephemeral key and encrypted payload.
pub const RESPONSE_LEN: usize = 32 + (PAYLOAD_LEN + 16);

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The peer's message did not decrypt: the pinned key is wrong, or the
    /// connection was tampered with.
    #[error("control handshake failed: the coordinator's key does not match the pinned key (check --coordinator-key against `weft-coordinator key`), or the connection was intercepted")]
    Authentication,
    /// The message has the wrong size.
    #[error("control handshake message has {got} bytes, expected {want}")]
    Length {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The peer speaks another protocol version.
    #[error("peer speaks control protocol version {got}, this build speaks {PROTOCOL_VERSION}; upgrade the older of node and coordinator")]
    Version {
        /// The peer's version.
        got: u16,
    },
}

/// The node's side of a handshake in progress.
#[derive(Debug)]
pub struct Initiator {
    state: snow::HandshakeState,
}

impl Initiator {
    /// Starts a control handshake and returns the first message to send.
    pub fn start(
        machine_key: &PrivateKey,
        coordinator_key: &PublicKey,
        binding: &[u8],
    ) -> Result<(Self, [u8; INITIATION_LEN]), HandshakeError> {
        Self::start_for(Purpose::Control, machine_key, coordinator_key, binding)
    }

    /// Starts a handshake for `purpose`: the initiator proves `local_key`
    /// and pins `remote_key`.
    pub fn start_for(
        purpose: Purpose,
        local_key: &PrivateKey,
        remote_key: &PublicKey,
        binding: &[u8],
    ) -> Result<(Self, [u8; INITIATION_LEN]), HandshakeError> {
        let prologue = prologue(purpose, binding);
        let mut state = builder()
            .local_private_key(local_key.as_bytes())
            .and_then(|b| b.remote_public_key(remote_key.as_bytes()))
            .and_then(|b| b.prologue(&prologue))
            .and_then(|b| b.build_initiator())
            .map_err(|_| HandshakeError::Authentication)?;
        let mut message = [0u8; INITIATION_LEN];
        let written = state
            .write_message(&PROTOCOL_VERSION.to_be_bytes(), &mut message)
            .map_err(|_| HandshakeError::Authentication)?;
        debug_assert_eq!(written, INITIATION_LEN);
        Ok((Self { state }, message))
    }

    /// Checks the coordinator's answer. Success proves the coordinator holds
    /// the pinned key and sees the same transport session.
    pub fn finish(mut self, response: &[u8]) -> Result<(), HandshakeError> {
        if response.len() != RESPONSE_LEN {
            return Err(HandshakeError::Length {
                got: response.len(),
                want: RESPONSE_LEN,
            });
        }
        let mut payload = [0u8; RESPONSE_LEN];
        let n = self
            .state
            .read_message(response, &mut payload)
            .map_err(|_| HandshakeError::Authentication)?;
        check_version(&payload[..n])
    }
}

/// What the coordinator learns from a successful handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The node's machine key, now proven.
    pub machine_key: PublicKey,
}

/// The coordinator's side: checks the node's first message and produces the answer.
pub fn respond(
    coordinator_key: &PrivateKey,
    binding: &[u8],
    initiation: &[u8],
) -> Result<(Accepted, [u8; RESPONSE_LEN]), HandshakeError> {
    respond_for(Purpose::Control, coordinator_key, binding, initiation)
}

/// The responder's side for `purpose`. For [`Purpose::Relay`] the proven
/// key in [`Accepted::machine_key`] is the node's WireGuard key.
pub fn respond_for(
    purpose: Purpose,
    local_key: &PrivateKey,
    binding: &[u8],
    initiation: &[u8],
) -> Result<(Accepted, [u8; RESPONSE_LEN]), HandshakeError> {
    if initiation.len() != INITIATION_LEN {
        return Err(HandshakeError::Length {
            got: initiation.len(),
            want: INITIATION_LEN,
        });
    }
    let prologue = prologue(purpose, binding);
    let mut state = builder()
        .local_private_key(local_key.as_bytes())
        .and_then(|b| b.prologue(&prologue))
        .and_then(|b| b.build_responder())
        .map_err(|_| HandshakeError::Authentication)?;
    let mut payload = [0u8; INITIATION_LEN];
    let n = state
        .read_message(initiation, &mut payload)
        .map_err(|_| HandshakeError::Authentication)?;
    check_version(&payload[..n])?;
    let machine_key = state
        .get_remote_static()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .map(PublicKey::from_bytes)
        .ok_or(HandshakeError::Authentication)?;
    let mut response = [0u8; RESPONSE_LEN];
    state
        .write_message(&PROTOCOL_VERSION.to_be_bytes(), &mut response)
        .map_err(|_| HandshakeError::Authentication)?;
    Ok((Accepted { machine_key }, response))
}

fn builder() -> snow::Builder<'static> {
    // The pattern string is a constant that snow supports.
    #[expect(clippy::unwrap_used, reason = "constant, valid Noise pattern")]
    snow::Builder::new(PATTERN.parse().unwrap())
}

fn prologue(purpose: Purpose, binding: &[u8]) -> Vec<u8> {
    [purpose.prologue(), binding].concat()
}

fn check_version(payload: &[u8]) -> Result<(), HandshakeError> {
    let got = match payload {
        [a, b] => u16::from_be_bytes([*a, *b]),
        _ => 0,
    };
    if got == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(HandshakeError::Version { got })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_node_and_coordinator_agree() {
        let coordinator = PrivateKey::generate();
        let machine = PrivateKey::generate();
        let (initiator, first) =
            Initiator::start(&machine, &coordinator.public_key(), b"binding").unwrap();
        let (accepted, second) = respond(&coordinator, b"binding", &first).unwrap();
        assert_eq!(accepted.machine_key, machine.public_key());
        initiator.finish(&second).unwrap();
    }

    #[test]
    fn a_wrong_pinned_key_fails_on_the_coordinator() {
        let coordinator = PrivateKey::generate();
        let impostor_pin = PrivateKey::generate().public_key();
        let (_, first) = Initiator::start(&PrivateKey::generate(), &impostor_pin, b"b").unwrap();
        assert_eq!(
            respond(&coordinator, b"b", &first).unwrap_err(),
            HandshakeError::Authentication
        );
    }

    #[test]
    fn an_impostor_coordinator_fails_on_the_node() {
        // The impostor answers with its own key: the node must not accept it.
        let real = PrivateKey::generate();
        let (initiator, _) =
            Initiator::start(&PrivateKey::generate(), &real.public_key(), b"b").unwrap();
        let impostor = PrivateKey::generate();
        let (_, forged_first) =
            Initiator::start(&PrivateKey::generate(), &impostor.public_key(), b"b").unwrap();
        let (_, forged_answer) = respond(&impostor, b"b", &forged_first).unwrap();
        assert_eq!(
            initiator.finish(&forged_answer),
            Err(HandshakeError::Authentication)
        );
    }

    #[test]
    fn different_transport_sessions_fail() {
        let coordinator = PrivateKey::generate();
        let (initiator, first) = Initiator::start(
            &PrivateKey::generate(),
            &coordinator.public_key(),
            b"session seen by node",
        )
        .unwrap();
        assert!(respond(&coordinator, b"session seen by relay", &first).is_err());
        let (_, second) = respond(&coordinator, b"session seen by node", &first).unwrap();
        initiator.finish(&second).unwrap();
    }

    #[test]
    fn a_node_and_relay_agree() {
        let relay = PrivateKey::generate();
        let node = PrivateKey::generate();
        let (initiator, first) =
            Initiator::start_for(Purpose::Relay, &node, &relay.public_key(), b"b").unwrap();
        let (accepted, second) = respond_for(Purpose::Relay, &relay, b"b", &first).unwrap();
        assert_eq!(accepted.machine_key, node.public_key());
        initiator.finish(&second).unwrap();
    }

    #[test]
    fn handshakes_of_different_purposes_do_not_cross() {
        let responder = PrivateKey::generate();
        let local = PrivateKey::generate();
        for (made, replayed) in [
            (Purpose::Control, Purpose::Relay),
            (Purpose::Relay, Purpose::Control),
        ] {
            let (initiator, first) =
                Initiator::start_for(made, &local, &responder.public_key(), b"b").unwrap();
            assert_eq!(
                respond_for(replayed, &responder, b"b", &first).unwrap_err(),
                HandshakeError::Authentication
            );
            // An answer made for the other purpose fails on the initiator too.
            let (_, other_first) =
                Initiator::start_for(replayed, &local, &responder.public_key(), b"b").unwrap();
            let (_, answer) = respond_for(replayed, &responder, b"b", &other_first).unwrap();
            assert_eq!(
                initiator.finish(&answer),
                Err(HandshakeError::Authentication)
            );
        }
    }

    #[test]
    fn the_error_tells_the_operator_what_to_check() {
        let text = HandshakeError::Authentication.to_string();
        assert!(text.contains("--coordinator-key"));
    }

    proptest! {
        #[test]
        fn garbage_initiations_are_rejected_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let coordinator = PrivateKey::generate();
            prop_assert!(respond(&coordinator, b"b", &bytes).is_err());
        }

        #[test]
        fn garbage_responses_are_rejected_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let coordinator = PrivateKey::generate();
            let (initiator, _) = Initiator::start(&PrivateKey::generate(), &coordinator.public_key(), b"b").unwrap();
            prop_assert!(initiator.finish(&bytes).is_err());
        }
    }
}
