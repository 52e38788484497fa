//! The control protocol's rules for one session, without IO: what the node
//! sends, what it accepts from the coordinator and in which order, and what
//! it reports. The task ([`super`]) connects, runs the Noise handshake and
//! then only moves bytes, events and timeouts between the network, the
//! daemon and a [`Session`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use weft_proto::flows::MAX_BATCHES_IN_FLIGHT;
use weft_proto::signing::NetmapKey;
use weft_proto::{
    Advertisement, ClientMessage, Credential, FrameDecoder, NodeId, Opener, PublicKey, Refusal,
    Register, ServerMessage, SignedRecord,
};

use super::held::Held;
use super::{ControlError, ControlEvent};
use crate::posture::Attributes;

/// How often a registered node re-reports its attributes even when its
/// posture file did not change; the coordinator stores only changes.
/// System attributes (OS version after an upgrade, disk encryption) change
/// without the posture file changing, so posture rules are re-evaluated at
/// least this often.
pub(crate) const ATTRIBUTE_REFRESH: Duration = Duration::from_secs(180);

/// What the node registers with, as of the session's start.
#[derive(Debug, Clone)]
pub(crate) struct Hello {
    /// What admits the node; `None` for a machine the coordinator knows.
    pub(crate) credential: Option<Credential>,
    pub(crate) hostname: String,
    pub(crate) node_key: PublicKey,
    pub(crate) advertisement: Advertisement,
    /// The node's full attribute report ([`crate::posture::report`]).
    pub(crate) attributes: Attributes,
}

/// What the task does for a [`Session`], in the order given.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "most events are reports, passed on at once; boxing them would only add an allocation"
)]
pub(crate) enum SessionEvent {
    /// Report to the daemon.
    Control(ControlEvent),
    /// Update the netmap cache, before reporting what follows.
    Cache(CacheUpdate),
    /// The periodic refresh is due: read the node's attributes afresh and
    /// pass them to [`Session::attributes_changed`].
    RefreshAttributes,
    /// The coordinator kept the flow batch with this id: release it.
    FlowsAcked(u64),
    /// The session is over; nothing follows.
    Ended(End),
}

/// A change to the netmap cache ([`crate::netmap_cache::CacheWriter`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CacheUpdate {
    /// A verified netmap for node `node`, replacing the cache.
    NetMap { node: NodeId, record: SignedRecord },
    /// A verified delta, appended.
    Delta(SignedRecord),
    /// The key the coordinator signs netmaps with.
    Key(NetmapKey),
    /// The coordinator is still connected: the cache is current.
    Touch,
}

/// How a session ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The coordinator refused the node.
    Refused(Refusal),
    /// The stream ended cleanly; what that means depends on the transport.
    Closed,
    /// The coordinator broke the protocol, or what it sent did not verify.
    Failed(ControlError),
}

/// One control session with a coordinator, from the registration on.
///
/// The task drives it so:
/// 1. [`Session::new`] after the Noise handshake, with the view to resume
///    from; the registration is then waiting in [`Session::poll_transmit`].
/// 2. Feed it what arrives with [`Session::handle_input`] and
///    [`Session::handle_eof`], the node's changes with
///    [`Session::attributes_changed`] and
///    [`Session::advertisement_changed`], and call
///    [`Session::handle_timeout`] once [`Session::poll_timeout`] passed.
/// 3. After each of those, write every frame [`Session::poll_transmit`]
///    gives, then carry out every [`Session::poll_event`] in order, up to
///    [`SessionEvent::Ended`]. While [`Session::can_send_flows`], hand it
///    the flow batches waiting ([`Session::send_flows`]); each comes back
///    as [`SessionEvent::FlowsAcked`] once the coordinator kept it.
/// 4. [`Session::into_held`] keeps the view for the next session.
///
/// It reads no clock (`now` comes in) and does no IO: cache writes are
/// events for the task.
#[derive(Debug)]
pub(crate) struct Session {
    /// Whether the node asked for an interactive login, the only case in
    /// which a login prompt is expected.
    interactive: bool,
    opener: Opener,
    decoder: FrameDecoder,
    held: Option<Held>,
    /// The key of the view this session resumed from.
    resume_key: Option<NetmapKey>,
    registered: bool,
    ended: bool,
    /// When the attributes are re-reported next, once registered.
    refresh_at: Instant,
    /// Changes reported before registration, sent once registered.
    pending_attributes: Option<Attributes>,
    pending_advertisement: Option<Advertisement>,
    /// Ids of the flow batches sent in this session and not yet acknowledged.
    flows_in_flight: Vec<u64>,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<SessionEvent>,
}

impl Session {
    /// A session registering with `hello` at `now`, resuming from `held`
    /// when given: the coordinator may then answer with a delta against it.
    pub(crate) fn new(hello: Hello, held: Option<Held>, now: Instant) -> Self {
        let resume = held.as_ref().map(Held::resume);
        let opener = match &resume {
            Some(resume) => Opener::resume(hello.node_key, resume.last_record),
            None => Opener::new(hello.node_key),
        };
        let mut session = Self {
            interactive: matches!(hello.credential, Some(Credential::Interactive(_))),
            opener,
            decoder: FrameDecoder::new(),
            resume_key: held.as_ref().map(Held::key),
            held,
            registered: false,
            ended: false,
            refresh_at: now + ATTRIBUTE_REFRESH,
            pending_attributes: None,
            pending_advertisement: None,
            flows_in_flight: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        };
        let Advertisement {
            endpoints,
            home_relay,
        } = hello.advertisement;
        tracing::debug!(?endpoints, ?home_relay, "registering");
        let register = ClientMessage::Register(Register {
            credential: hello.credential,
            hostname: hello.hostname,
            node_key: hello.node_key,
            endpoints,
            home_relay,
            attributes: hello.attributes,
            resume: resume.map(Box::new),
        });
        session.send(&register, "registration too large to send");
        session
    }

    /// Takes bytes received from the coordinator.
    pub(crate) fn handle_input(&mut self, bytes: &[u8]) {
        if self.ended {
            return;
        }
        self.decoder.push(bytes);
        while !self.ended {
            match self.decoder.next_message::<ServerMessage>() {
                Ok(Some(message)) => {
                    if let Err(end) = self.receive(message) {
                        self.end(end);
                    }
                }
                Ok(None) => return,
                Err(e) => self.end(End::Failed(e.into())),
            }
        }
    }

    /// The coordinator's stream ended.
    pub(crate) fn handle_eof(&mut self) {
        if self.ended {
            return;
        }
        let end = match self.decoder.finish() {
            Ok(()) => End::Closed,
            Err(e) => End::Failed(e.into()),
        };
        self.end(end);
    }

    /// When [`Session::handle_timeout`] is next due, if ever.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        (self.registered && !self.ended).then_some(self.refresh_at)
    }

    /// Runs what is due at `now`: the periodic attribute refresh, which
    /// also marks the cache current.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_none_or(|due| now < due) {
            return;
        }
        self.refresh_at = now + ATTRIBUTE_REFRESH;
        self.events.push_back(SessionEvent::RefreshAttributes);
        self.events
            .push_back(SessionEvent::Cache(CacheUpdate::Touch));
    }

    /// The node's attributes changed (or were read afresh for the
    /// refresh); sent once the node is registered.
    pub(crate) fn attributes_changed(&mut self, attributes: Attributes) {
        if self.registered {
            self.send_attributes(attributes);
        } else {
            self.pending_attributes = Some(attributes);
        }
    }

    /// Where the node can be reached changed; sent once the node is registered.
    pub(crate) fn advertisement_changed(&mut self, advertisement: Advertisement) {
        if self.registered {
            self.send_advertisement(advertisement);
        } else {
            self.pending_advertisement = Some(advertisement);
        }
    }

    /// Whether the session takes another flow batch: the node is
    /// registered and fewer than [`MAX_BATCHES_IN_FLIGHT`] batches wait
    /// for their acknowledgement.
    pub(crate) fn can_send_flows(&self) -> bool {
        self.registered && !self.ended && self.flows_in_flight.len() < MAX_BATCHES_IN_FLIGHT
    }

    /// Sends flow batch `id`, already encoded as its `Flows` frame; ignored
    /// unless [`Session::can_send_flows`].
    pub(crate) fn send_flows(&mut self, id: u64, frame: Vec<u8>) {
        if !self.can_send_flows() {
            return;
        }
        tracing::trace!(batch = id, "sending flow records");
        self.flows_in_flight.push(id);
        self.transmits.push_back(frame);
    }

    /// The next frame to write to the coordinator.
    pub(crate) fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// The next thing to do for the session.
    pub(crate) fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// Whether the coordinator accepted the node in this session.
    pub(crate) fn is_registered(&self) -> bool {
        self.registered
    }

    /// The view to resume the next session from.
    pub(crate) fn into_held(self) -> Option<Held> {
        self.held
    }

    /// Applies the protocol's rules to one message; `Err` ends the session.
    fn receive(&mut self, message: ServerMessage) -> Result<(), End> {
        let opened = self
            .opener
            .open(message)
            .map_err(|e| End::Failed(e.into()))?;
        let message = match (opened.signed, self.opener.key()) {
            (Some(signed), Some(key)) => {
                // Stored before the daemon applies it.
                let update = match &opened.message {
                    ServerMessage::NetMap(netmap) => CacheUpdate::NetMap {
                        node: netmap.self_node.id,
                        record: signed.clone(),
                    },
                    _ => CacheUpdate::Delta(signed.clone()),
                };
                self.events.push_back(SessionEvent::Cache(update));
                Held::advance(&mut self.held, opened.message, &signed, key)
            }
            _ => opened.message,
        };
        let event = match message {
            ServerMessage::Refused(refusal) => return Err(End::Refused(refusal)),
            ServerMessage::LoginRequired(prompt) => {
                if !self.interactive || self.registered {
                    return Err(protocol(
                        "the coordinator asked for an interactive login, which this node did not request",
                    ));
                }
                ControlEvent::LoginRequired(prompt)
            }
            ServerMessage::Registered(node) => {
                self.registered = true;
                self.events
                    .push_back(SessionEvent::Control(ControlEvent::Registered(node)));
                if let Some(attributes) = self.pending_attributes.take() {
                    self.send_attributes(attributes);
                }
                if let Some(advertisement) = self.pending_advertisement.take() {
                    self.send_advertisement(advertisement);
                }
                return Ok(());
            }
            _ if !self.registered => {
                return Err(protocol("a netmap arrived before registration"));
            }
            ServerMessage::NetMap(netmap) => ControlEvent::NetMap(netmap),
            ServerMessage::Delta(delta) => ControlEvent::Delta(delta),
            ServerMessage::Relays(relays) => ControlEvent::Relays(relays),
            ServerMessage::NetmapKey(key) => {
                if self.resume_key.is_some_and(|held_key| held_key != key) {
                    self.held = None;
                    return Err(protocol(
                        "the coordinator signs with another netmap key than the view this node resumed from; reconnecting for a full netmap",
                    ));
                }
                self.events
                    .push_back(SessionEvent::Cache(CacheUpdate::Key(key)));
                return Ok(());
            }
            ServerMessage::Signed(_) => {
                return Err(protocol("a signed record was not opened"));
            }
            ServerMessage::RelayAdmissions { .. } => {
                return Err(protocol(
                    "the coordinator sent relay admissions, which only relays ask for",
                ));
            }
            ServerMessage::FlowsAck { id } => {
                let Some(at) = self.flows_in_flight.iter().position(|sent| *sent == id) else {
                    return Err(protocol(
                        "the coordinator acknowledged flow records this node did not send",
                    ));
                };
                self.flows_in_flight.swap_remove(at);
                self.events.push_back(SessionEvent::FlowsAcked(id));
                return Ok(());
            }
        };
        self.events.push_back(SessionEvent::Control(event));
        Ok(())
    }

    fn send_attributes(&mut self, attributes: Attributes) {
        tracing::debug!("sending updated attributes");
        self.send(
            &ClientMessage::UpdateAttributes(attributes),
            "attributes too large to send",
        );
    }

    fn send_advertisement(&mut self, advertisement: Advertisement) {
        tracing::debug!(endpoints = ?advertisement.endpoints, home_relay = ?advertisement.home_relay, "advertising");
        self.send(
            &ClientMessage::UpdateEndpoints(advertisement),
            "endpoints too large to send",
        );
    }

    /// Queues `message`, or ends the session when it cannot be framed;
    /// nothing once the session ended.
    fn send(&mut self, message: &ClientMessage, too_large: &'static str) {
        if self.ended {
            return;
        }
        match weft_proto::encode_frame(message) {
            Ok(frame) => self.transmits.push_back(frame),
            Err(_) => self.end(protocol(too_large)),
        }
    }

    fn end(&mut self, end: End) {
        self.ended = true;
        self.transmits.clear();
        self.events.push_back(SessionEvent::Ended(end));
    }
}

fn protocol(reason: &'static str) -> End {
    End::Failed(ControlError::Protocol(reason))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use weft_proto::signing::{Chain, Digest, NetmapSigner, Record};
    use weft_proto::{
        AuthKey, LoginFlow, LoginPrompt, NetMap, NetMapDelta, PrivateKey, RefusalCode, Resume,
        SignatureError,
    };

    use super::*;
    use crate::control::fixtures::{empty_netmap, peer, self_node};
    use crate::netmap_cache::Restored;

    /// A coordinator's side of the records for node 4.
    struct Coordinator {
        signer: NetmapSigner,
        chain: Chain,
    }

    impl Coordinator {
        fn new() -> Self {
            Self::with(NetmapSigner::derive(&PrivateKey::from_bytes([1; 32])), None)
        }

        /// A coordinator signing with `signer` whose first record chains
        /// after `prev`, as for a resumed session.
        fn with(signer: NetmapSigner, prev: Option<Digest>) -> Self {
            let id = self_node().id;
            let chain = match prev {
                Some(prev) => Chain::resume(id, node_key(), prev),
                None => Chain::new(id, node_key()),
            };
            Self { signer, chain }
        }

        fn key(&self) -> ServerMessage {
            ServerMessage::NetmapKey(self.signer.public_key())
        }

        fn sign(&mut self, record: Record) -> SignedRecord {
            self.chain.sign(&self.signer, &record).unwrap()
        }

        fn netmap(&mut self, netmap: &NetMap) -> ServerMessage {
            ServerMessage::Signed(self.sign(Record::NetMap(netmap.clone())))
        }

        fn delta(&mut self, delta: &NetMapDelta) -> ServerMessage {
            ServerMessage::Signed(self.sign(Record::Delta(delta.clone())))
        }
    }

    fn node_key() -> PublicKey {
        PrivateKey::from_bytes([9; 32]).public_key()
    }

    fn auth_key() -> Option<Credential> {
        Some(Credential::AuthKey(AuthKey::new(
            "weft-auth-0123456789ab-secret",
        )))
    }

    fn hello(credential: Option<Credential>) -> Hello {
        Hello {
            credential,
            hostname: "web-1".into(),
            node_key: node_key(),
            advertisement: advertisement(10),
            attributes: attributes("linux"),
        }
    }

    fn advertisement(host: u8) -> Advertisement {
        Advertisement {
            endpoints: vec![format!("192.0.2.{host}:51820").parse().unwrap()],
            home_relay: None,
        }
    }

    fn attributes(os: &str) -> Attributes {
        Attributes::from([("node:os".to_owned(), os.to_owned())])
    }

    /// Peer 7 joined and peer 5 left, at `revision`.
    fn delta(revision: u64) -> NetMapDelta {
        NetMapDelta {
            revision,
            upsert_peers: vec![peer(7)],
            remove_peers: vec![weft_proto::NodeId(5)],
            filter: None,
            capabilities: None,
            self_node: None,
        }
    }

    fn netmap_of_5_and_6() -> NetMap {
        NetMap {
            peers: vec![peer(5), peer(6)],
            ..empty_netmap()
        }
    }

    /// `messages` as they arrive on the stream.
    fn stream(messages: &[ServerMessage]) -> Vec<u8> {
        messages
            .iter()
            .flat_map(|m| weft_proto::encode_frame(m).unwrap())
            .collect()
    }

    fn feed(session: &mut Session, messages: &[ServerMessage]) -> Vec<SessionEvent> {
        session.handle_input(&stream(messages));
        events(session)
    }

    fn events(session: &mut Session) -> Vec<SessionEvent> {
        std::iter::from_fn(|| session.poll_event()).collect()
    }

    /// What the session wants written, decoded.
    fn sent(session: &mut Session) -> Vec<ClientMessage> {
        let mut decoder = FrameDecoder::new();
        while let Some(frame) = session.poll_transmit() {
            decoder.push(&frame);
        }
        std::iter::from_fn(|| decoder.next_message().unwrap()).collect()
    }

    fn register(session: &mut Session) -> Register {
        match sent(session).as_slice() {
            [ClientMessage::Register(register)] => register.clone(),
            other => panic!("expected a registration, got {other:?}"),
        }
    }

    /// A session that sent its registration at `now` and was accepted.
    fn registered(now: Instant) -> Session {
        let mut session = Session::new(hello(auth_key()), None, now);
        register(&mut session);
        feed(&mut session, &[ServerMessage::Registered(self_node())]);
        session
    }

    /// The protocol error the session ended with.
    fn protocol_error(events: &[SessionEvent]) -> &'static str {
        match events.last() {
            Some(SessionEvent::Ended(End::Failed(ControlError::Protocol(why)))) => why,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn a_node_registers_and_takes_its_netmap_and_deltas() {
        let now = Instant::now();
        let mut session = Session::new(hello(auth_key()), None, now);
        let register = register(&mut session);
        assert_eq!(register.hostname, "web-1");
        assert_eq!(register.node_key, node_key());
        assert!(register.credential.is_some());
        assert_eq!(register.attributes, attributes("linux"));
        assert_eq!(register.endpoints, advertisement(10).endpoints);
        assert_eq!(register.resume, None);
        assert!(events(&mut session).is_empty());

        let mut coordinator = Coordinator::new();
        let netmap = netmap_of_5_and_6();
        let signed_netmap = coordinator.sign(Record::NetMap(netmap.clone()));
        let events = feed(
            &mut session,
            &[
                ServerMessage::Registered(self_node()),
                coordinator.key(),
                ServerMessage::Signed(signed_netmap.clone()),
            ],
        );
        assert!(session.is_registered());
        match events.as_slice() {
            [SessionEvent::Control(ControlEvent::Registered(node)), SessionEvent::Cache(CacheUpdate::Key(key)), SessionEvent::Cache(CacheUpdate::NetMap { node: id, record }), SessionEvent::Control(ControlEvent::NetMap(got))] =>
            {
                assert_eq!(*node, self_node());
                assert_eq!(ServerMessage::NetmapKey(*key), coordinator.key());
                assert_eq!(*id, self_node().id);
                assert_eq!(*record, signed_netmap);
                assert_eq!(*got, netmap);
            }
            other => panic!("{other:?}"),
        }

        let signed_delta = coordinator.sign(Record::Delta(delta(2)));
        let events = feed(&mut session, &[ServerMessage::Signed(signed_delta.clone())]);
        match events.as_slice() {
            [SessionEvent::Cache(CacheUpdate::Delta(record)), SessionEvent::Control(ControlEvent::Delta(got))] =>
            {
                assert_eq!(*record, signed_delta);
                assert_eq!(*got, delta(2));
            }
            other => panic!("{other:?}"),
        }
        assert!(sent(&mut session).is_empty());

        let mut folded = netmap;
        folded.apply(delta(2));
        let held = session.into_held().expect("a held view");
        assert_eq!(held.resume(), Resume::of(signed_delta.digest(), &folded));
    }

    #[test]
    fn a_netmap_before_registration_is_a_protocol_error() {
        for early in [ServerMessage::Relays(Vec::new()), Coordinator::new().key()] {
            let mut session = Session::new(hello(auth_key()), None, Instant::now());
            register(&mut session);
            let events = feed(&mut session, &[early]);
            assert_eq!(events.len(), 1, "{events:?}");
            assert_eq!(
                protocol_error(&events),
                "a netmap arrived before registration"
            );
            assert!(!session.is_registered());
        }
    }

    #[test]
    fn a_login_prompt_comes_only_to_an_interactive_node_before_registration() {
        let prompt = LoginPrompt {
            url: "https://login.example.com/device".into(),
            user_code: None,
            expires_in_secs: 600,
        };
        let unasked = ServerMessage::LoginRequired(prompt.clone());

        let mut session = Session::new(hello(auth_key()), None, Instant::now());
        let events = feed(&mut session, std::slice::from_ref(&unasked));
        assert!(protocol_error(&events).contains("did not request"));

        let interactive = Some(Credential::Interactive(LoginFlow::Browser));
        let mut session = Session::new(hello(interactive), None, Instant::now());
        let events = feed(&mut session, std::slice::from_ref(&unasked));
        assert!(
            matches!(events.as_slice(), [SessionEvent::Control(ControlEvent::LoginRequired(p))] if *p == prompt),
            "{events:?}"
        );
        let events = feed(
            &mut session,
            &[ServerMessage::Registered(self_node()), unasked],
        );
        assert!(protocol_error(&events).contains("did not request"));
    }

    #[test]
    fn a_refusal_ends_the_session() {
        let refusal = Refusal {
            code: RefusalCode::NodeDeleted,
            message: "node web-1 was deleted".into(),
        };
        let mut session = registered(Instant::now());
        let events = feed(
            &mut session,
            &[
                ServerMessage::Refused(refusal.clone()),
                ServerMessage::Relays(Vec::new()),
            ],
        );
        assert!(
            matches!(events.as_slice(), [SessionEvent::Ended(End::Refused(r))] if *r == refusal),
            "{events:?}"
        );
        // Nothing more is taken, sent or due.
        assert!(feed(&mut session, &[ServerMessage::Relays(Vec::new())]).is_empty());
        session.attributes_changed(attributes("linux"));
        session.handle_eof();
        assert!(sent(&mut session).is_empty());
        assert!(self::events(&mut session).is_empty());
        assert_eq!(session.poll_timeout(), None);
    }

    #[test]
    fn a_netmap_that_does_not_verify_ends_the_session_unapplied() {
        let mut coordinator = Coordinator::new();
        let ServerMessage::Signed(mut tampered) = coordinator.netmap(&empty_netmap()) else {
            unreachable!()
        };
        tampered.signature[0] ^= 1;
        let mut session = registered(Instant::now());
        let events = feed(
            &mut session,
            &[coordinator.key(), ServerMessage::Signed(tampered)],
        );
        assert!(
            matches!(
                events.as_slice(),
                [
                    SessionEvent::Cache(CacheUpdate::Key(_)),
                    SessionEvent::Ended(End::Failed(ControlError::Signature(
                        SignatureError::BadSignature
                    )))
                ]
            ),
            "{events:?}"
        );
        assert_eq!(session.into_held(), None);
    }

    /// The view held after a session that took `netmap` from `coordinator`.
    fn held_after(coordinator: &mut Coordinator, netmap: &NetMap) -> Held {
        let mut session = registered(Instant::now());
        feed(
            &mut session,
            &[coordinator.key(), coordinator.netmap(netmap)],
        );
        session.into_held().expect("a held view")
    }

    #[test]
    fn a_reconnect_resumes_from_the_held_view() {
        let mut first = Coordinator::new();
        let netmap = netmap_of_5_and_6();
        let held = held_after(&mut first, &netmap);

        let mut session = Session::new(hello(None), Some(held.clone()), Instant::now());
        let register = register(&mut session);
        assert_eq!(register.resume.as_deref(), Some(&held.resume()));
        assert_eq!(register.credential, None);
        let prev = held.resume().last_record;
        let mut resumed = Coordinator::with(first.signer, Some(prev));
        let events = feed(
            &mut session,
            &[
                ServerMessage::Registered(self_node()),
                resumed.key(),
                resumed.delta(&delta(2)),
            ],
        );
        assert!(
            matches!(events.last(), Some(SessionEvent::Control(ControlEvent::Delta(d))) if *d == delta(2)),
            "{events:?}"
        );
    }

    #[test]
    fn another_netmap_key_than_the_resumed_view_drops_the_view() {
        let held = held_after(&mut Coordinator::new(), &netmap_of_5_and_6());
        let mut session = Session::new(hello(None), Some(held), Instant::now());
        register(&mut session);
        let other = NetmapSigner::derive(&PrivateKey::from_bytes([2; 32]));
        let events = feed(
            &mut session,
            &[
                ServerMessage::Registered(self_node()),
                ServerMessage::NetmapKey(other.public_key()),
            ],
        );
        assert!(protocol_error(&events).contains("another netmap key"));
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, SessionEvent::Cache(CacheUpdate::Key(_)))),
            "{events:?}"
        );
        assert_eq!(session.into_held(), None, "the next session starts afresh");
    }

    #[test]
    fn a_view_restored_from_the_cache_is_reported_whole_on_the_first_delta() {
        let mut coordinator = Coordinator::new();
        let netmap = netmap_of_5_and_6();
        let ServerMessage::Signed(first) = coordinator.netmap(&netmap) else {
            unreachable!()
        };
        let ServerMessage::NetmapKey(key) = coordinator.key() else {
            unreachable!()
        };
        let held = Held::restored(Restored {
            netmap: netmap.clone(),
            last_record: first.digest(),
            key,
        });
        let mut session = Session::new(hello(None), Some(held), Instant::now());
        register(&mut session);
        let events = feed(
            &mut session,
            &[
                ServerMessage::Registered(self_node()),
                coordinator.key(),
                coordinator.delta(&delta(2)),
            ],
        );
        let mut folded = netmap;
        folded.apply(delta(2));
        assert!(
            matches!(events.last(), Some(SessionEvent::Control(ControlEvent::NetMap(n))) if *n == folded),
            "{events:?}"
        );
        // Later deltas are the daemon's to fold.
        let later = NetMapDelta {
            revision: 3,
            upsert_peers: vec![peer(8)],
            remove_peers: Vec::new(),
            filter: None,
            capabilities: None,
            self_node: None,
        };
        let events = feed(&mut session, &[coordinator.delta(&later)]);
        assert!(
            matches!(events.last(), Some(SessionEvent::Control(ControlEvent::Delta(d))) if *d == later),
            "{events:?}"
        );
    }

    #[test]
    fn changes_before_registration_wait_for_it() {
        let mut session = Session::new(hello(auth_key()), None, Instant::now());
        register(&mut session);
        session.attributes_changed(attributes("linux 6.1"));
        session.advertisement_changed(advertisement(11));
        assert!(sent(&mut session).is_empty());

        feed(&mut session, &[ServerMessage::Registered(self_node())]);
        assert_eq!(
            sent(&mut session),
            [
                ClientMessage::UpdateAttributes(attributes("linux 6.1")),
                ClientMessage::UpdateEndpoints(advertisement(11)),
            ]
        );
        session.attributes_changed(attributes("linux 6.2"));
        assert_eq!(
            sent(&mut session),
            [ClientMessage::UpdateAttributes(attributes("linux 6.2"))]
        );
    }

    #[test]
    fn the_attributes_are_refreshed_on_the_clock() {
        let start = Instant::now();
        let mut session = Session::new(hello(auth_key()), None, start);
        register(&mut session);
        assert_eq!(
            session.poll_timeout(),
            None,
            "nothing is due before registration"
        );
        let later = start + Duration::from_secs(5);
        feed(&mut session, &[ServerMessage::Registered(self_node())]);
        let due = start + ATTRIBUTE_REFRESH;
        assert_eq!(session.poll_timeout(), Some(due));

        session.handle_timeout(later);
        session.handle_timeout(due - Duration::from_millis(1));
        assert!(events(&mut session).is_empty());
        session.handle_timeout(due);
        assert!(
            matches!(
                events(&mut session).as_slice(),
                [
                    SessionEvent::RefreshAttributes,
                    SessionEvent::Cache(CacheUpdate::Touch)
                ]
            ),
            "the refresh reads the attributes afresh and keeps the cache current"
        );
        session.attributes_changed(attributes("linux"));
        assert_eq!(
            sent(&mut session),
            [ClientMessage::UpdateAttributes(attributes("linux"))]
        );
        assert_eq!(session.poll_timeout(), Some(due + ATTRIBUTE_REFRESH));
    }

    /// An outbox holding `batches` sealed batches of one record each.
    fn outbox_of(batches: usize) -> crate::flows::outbox::Outbox {
        let mut outbox = crate::flows::outbox::Outbox::new(1 << 20, 1, Vec::new());
        for _ in 0..batches {
            outbox.push(crate::flows::outbox::tests::record(1));
            outbox.seal();
        }
        outbox
    }

    /// Hands `session` every batch it takes; the ids handed.
    fn offer(session: &mut Session, outbox: &mut crate::flows::outbox::Outbox) -> Vec<u64> {
        let mut handed = Vec::new();
        while session.can_send_flows() {
            let Some((id, frame)) = outbox.next_unsent() else {
                break;
            };
            session.send_flows(id, frame);
            handed.push(id);
        }
        handed
    }

    fn batch_ids(messages: &[ClientMessage]) -> Vec<u64> {
        messages
            .iter()
            .map(|m| match m {
                ClientMessage::Flows(batch) => batch.id,
                other => panic!("expected flow records, got {other:?}"),
            })
            .collect()
    }

    #[test]
    fn flow_batches_go_out_once_registered_four_at_a_time_until_acknowledged() {
        let mut outbox = outbox_of(6);
        let mut session = Session::new(hello(auth_key()), None, Instant::now());
        register(&mut session);
        assert!(!session.can_send_flows(), "not before registration");
        session.send_flows(1, Vec::new());
        assert!(sent(&mut session).is_empty());

        feed(&mut session, &[ServerMessage::Registered(self_node())]);
        assert_eq!(offer(&mut session, &mut outbox), [1, 2, 3, 4]);
        assert_eq!(batch_ids(&sent(&mut session)), [1, 2, 3, 4]);
        assert!(!session.can_send_flows());

        let events = feed(&mut session, &[ServerMessage::FlowsAck { id: 2 }]);
        assert!(
            matches!(events.as_slice(), [SessionEvent::FlowsAcked(2)]),
            "{events:?}"
        );
        assert!(outbox.ack(2));
        assert_eq!(offer(&mut session, &mut outbox), [5]);
        assert_eq!(batch_ids(&sent(&mut session)), [5]);

        // The session ends with 1, 3, 4 and 5 unacknowledged: the next one
        // sends them again, oldest first, then 6.
        let events = feed(&mut session, &[ServerMessage::FlowsAck { id: 2 }]);
        assert!(protocol_error(&events).contains("did not send"));
        outbox.rewind();
        let mut next = registered(Instant::now());
        assert_eq!(offer(&mut next, &mut outbox), [1, 3, 4, 5]);
        for id in [4, 1] {
            feed(&mut next, &[ServerMessage::FlowsAck { id }]);
            outbox.ack(id);
        }
        assert_eq!(offer(&mut next, &mut outbox), [6]);
        assert_eq!(outbox.stats().batches, 3);
        assert_eq!(outbox.stats().last_acked, Some(4));
    }

    #[test]
    fn an_acknowledgement_of_a_batch_never_sent_is_a_protocol_error() {
        let mut session = registered(Instant::now());
        let events = feed(&mut session, &[ServerMessage::FlowsAck { id: 1 }]);
        assert!(protocol_error(&events).contains("did not send"));
        let mut early = Session::new(hello(auth_key()), None, Instant::now());
        register(&mut early);
        let events = feed(&mut early, &[ServerMessage::FlowsAck { id: 1 }]);
        assert!(protocol_error(&events).contains("before registration"));
    }

    #[test]
    fn the_end_of_the_stream_ends_the_session() {
        let mut session = registered(Instant::now());
        session.handle_eof();
        assert!(matches!(
            events(&mut session).as_slice(),
            [SessionEvent::Ended(End::Closed)]
        ));

        let mut session = registered(Instant::now());
        let frame = stream(&[ServerMessage::Relays(Vec::new())]);
        session.handle_input(&frame[..frame.len() - 1]);
        session.handle_eof();
        assert!(
            matches!(
                events(&mut session).as_slice(),
                [SessionEvent::Ended(End::Failed(ControlError::Decode(_)))]
            ),
            "a frame cut off is not a clean end"
        );
    }

    /// A whole session's stream from the coordinator, ending in a refusal.
    fn whole_session() -> Vec<u8> {
        let mut coordinator = Coordinator::new();
        stream(&[
            ServerMessage::Registered(self_node()),
            coordinator.key(),
            coordinator.netmap(&netmap_of_5_and_6()),
            ServerMessage::Relays(Vec::new()),
            coordinator.delta(&delta(2)),
            coordinator.delta(&delta(3)),
            ServerMessage::Refused(Refusal {
                code: RefusalCode::Unavailable,
                message: "restarting".into(),
            }),
        ])
    }

    /// What a session reports for `chunks` of the coordinator's stream.
    fn reported<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> String {
        let mut session = Session::new(hello(auth_key()), None, Instant::now());
        let mut reported = Vec::new();
        for chunk in chunks {
            session.handle_input(chunk);
            reported.extend(events(&mut session));
        }
        format!("{reported:?}")
    }

    proptest! {
        #[test]
        fn any_split_of_the_stream_reports_the_same(
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12)
        ) {
            let bytes = whole_session();
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                chunks.push(&bytes[from..cut]);
                from = cut;
            }
            let whole = reported([bytes.as_slice()]);
            prop_assert!(whole.contains("Refused"));
            prop_assert_eq!(reported(chunks), whole);
        }
    }
}
