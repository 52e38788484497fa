//! Heap held by the data-plane core per configured peer: a node's live
//! heap bytes with an empty netmap, then with 1,000 peers (each with two
//! endpoints and a home relay), counted by a global allocator. Peers that
//! never exchange a packet hold no WireGuard tunnel. Prints the per-peer
//! figure; `cargo bench -p weft-dataplane --bench memory`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use weft_dataplane::core::Node;
use weft_proto::{Identity, NetMap, NodeId, PacketFilter, Peer, PrivateKey, SelfNode};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only
// adds to a counter.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract, passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: the caller upholds `realloc`'s contract, passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const PEERS: u32 = 1_000;

fn peer(n: u32) -> Peer {
    let [_, _, hi, lo] = n.to_be_bytes();
    Peer {
        id: NodeId(u64::from(n) + 2),
        name: format!("node-{n}"),
        node_key: PrivateKey::generate().public_key(),
        addresses: vec![
            IpAddr::V4(Ipv4Addr::new(100, 64, hi, lo)),
            IpAddr::V6(
                format!("fd7a:115c:a1e0::{n:x}")
                    .parse()
                    .unwrap_or(std::net::Ipv6Addr::LOCALHOST),
            ),
        ],
        endpoints: vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, hi, lo)), 51820),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, lo)), 41641),
        ],
        home_relay: Some("fra1".to_owned()),
        identity: Identity::default(),
    }
}

fn netmap(peers: Vec<Peer>) -> NetMap {
    NetMap {
        revision: 1,
        self_node: SelfNode {
            id: NodeId(1),
            name: "self".into(),
            ipv4: Ipv4Addr::new(100, 64, 0, 1),
            ipv6: std::net::Ipv6Addr::LOCALHOST,
            identity: Identity::default(),
            key_expiry: None,
        },
        peers,
        filter: PacketFilter::default(),
        capabilities: Vec::new(),
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "the node starts at the real clock"
)]
fn main() {
    println!(
        "a WireGuard tunnel, made on a peer's first packet: {} B",
        weft_dataplane::core::TUNNEL_SIZE
    );
    let now = Instant::now();
    let mut node = Node::new(PrivateKey::generate(), now, std::time::SystemTime::now(), 1);
    node.set_netmap(&netmap(Vec::new()), now);
    let peers = netmap((0..PEERS).map(peer).collect());
    let before = LIVE.load(Ordering::Relaxed);
    node.set_netmap(&peers, now);
    let after = LIVE.load(Ordering::Relaxed);
    let per_peer = (after - before) / PEERS as isize;
    println!(
        "core heap for {PEERS} configured peers: {} KiB, {per_peer} B per peer",
        (after - before) / 1024
    );
    drop(peers);
    drop(node);
}
