//! Bytes survive the fast path: 50 MB over one TCP connection through the
//! tunnel between two namespaces, compared by SHA-256 on the far side. Bulk
//! traffic exercises what pings do not: batched reads from the TUN device,
//! GSO sends and GRO receives on the UDP socket, reused buffers.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use weft_tests::{fixture, hashed_transfer, in_netns, ping, wait_until, Lab, Overlay};

const TOTAL: usize = 50 * 1024 * 1024;
/// The database port the fixture policy opens from web to db.
const PORT: u16 = 5432;

/// Runs `test` on an overlay of a coordinator, web and db; on failure the
/// panic carries every daemon's log.
fn with_overlay(test: fn(&mut Overlay) -> Result<()>) {
    let setup = || -> Result<Overlay> {
        let mut lab = Lab::new()?;
        for (name, octet) in [("coord", 1), ("web", 11), ("db", 12)] {
            lab.add_host(name, octet)?;
        }
        Overlay::new(lab)
    };
    let mut overlay = match setup() {
        Ok(overlay) => overlay,
        Err(e) => panic!("cannot set up the lab: {e:?}"),
    };
    if let Err(e) = test(&mut overlay) {
        panic!("{e:?}\n\n{}", overlay.logs());
    }
}

#[test]
fn fifty_megabytes_cross_the_tunnel_intact() {
    with_overlay(transfer);
}

fn transfer(overlay: &mut Overlay) -> Result<()> {
    let policy = overlay.lab().dir().join("policy.hujson");
    std::fs::copy(fixture("policy-initial.hujson"), &policy)?;
    let (web_ns, db_ns) =
        overlay.join_pair("coord", &policy, [("web", "tag:web"), ("db", "tag:db")])?;
    let db_addr = overlay.node("db")?.overlay_ipv4()?;

    let elapsed = hashed_transfer(
        &web_ns,
        &db_ns,
        SocketAddr::new(db_addr, PORT),
        TOTAL,
        Duration::from_secs(300),
    )?;
    weft_tests::record_metric(&format!(
        "50 MB through the tunnel over TCP, hash checked: {} ms ({:.2} Gbit/s, debug or release as built)",
        elapsed.as_millis(),
        (TOTAL * 8) as f64 / elapsed.as_secs_f64() / 1e9
    ));
    Ok(())
}

/// The variable that turns weftd's TUN offloads off.
const OFFLOAD_ENV: &str = "WEFT_TUN_OFFLOAD";
/// The UDP port the test policy opens from web to db.
const UDP_PORT: u16 = 5201;
/// Large datagrams, then small ones: two runs of one flow at different
/// sizes, each becoming USO frames on the receiving node.
const BURSTS: [(usize, usize); 2] = [(200, 1200), (50, 100)];
/// Datagrams sent back to back before the sender pauses, so a loaded
/// machine does not overflow a socket buffer on the way.
const BATCH: usize = 25;

#[test]
fn udp_bursts_cross_the_tunnel_intact_with_and_without_offloads() {
    with_overlay(udp_bursts);
}

fn udp_bursts(overlay: &mut Overlay) -> Result<()> {
    let policy = overlay.lab().dir().join("policy.hujson");
    std::fs::write(
        &policy,
        format!(
            r#"{{
              "tagOwners": {{"tag:web": [], "tag:db": []}},
              "acls": [
                {{"action": "accept", "src": ["tag:web"], "dst": ["tag:db:*"], "proto": "icmp"}},
                {{"action": "accept", "src": ["tag:web"], "dst": ["tag:db:{UDP_PORT}"], "proto": "udp"}},
              ],
            }}"#
        ),
    )?;
    let (web_ns, db_ns) =
        overlay.join_pair("coord", &policy, [("web", "tag:web"), ("db", "tag:db")])?;
    let dst = SocketAddr::new(overlay.node("db")?.overlay_ipv4()?, UDP_PORT);
    ensure!(
        overlay.node("db")?.log().contains("tcp+udp"),
        "db's TUN device did not take UDP segmentation offload; the burst would not test it"
    );
    udp_burst(&web_ns, &db_ns, dst).context("with TUN offloads on")?;

    for host in ["web", "db"] {
        let node = overlay.node_mut(host)?;
        node.set_env(OFFLOAD_ENV, "off");
        node.restart(false)?;
    }
    wait_until(Duration::from_secs(15), || {
        ping(&web_ns, dst.ip(), Duration::from_millis(300))
    })
    .context("no ping crossed the tunnel within 15 s of restarting")?;
    ensure!(
        overlay.node("db")?.log().contains("TUN offloads off"),
        "db did not turn its TUN offloads off"
    );
    udp_burst(&web_ns, &db_ns, dst).context("with TUN offloads off")?;
    Ok(())
}

/// Sends [`BURSTS`] over one connected UDP socket from namespace `from` to
/// `dst` in namespace `to`, and checks every datagram arrived once, whole
/// and in order: one flow over a veth is never reordered, and the
/// receiver's socket buffer is large enough that none is dropped.
fn udp_burst(from: &str, to: &str, dst: SocketAddr) -> Result<()> {
    let port = dst.port();
    let receiver = in_netns(to, move || -> Result<UdpSocket> {
        let socket = UdpSocket::bind(("0.0.0.0", port))?;
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &(8 << 20))?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(socket)
    })??;
    let expected: Vec<Vec<u8>> = BURSTS
        .iter()
        .flat_map(|&(count, len)| std::iter::repeat_n(len, count))
        .enumerate()
        .map(|(seq, len)| datagram(seq, len))
        .collect();
    let total = expected.len();
    let receiving = std::thread::spawn(move || -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        // Ends on the last datagram or after 3 s without one.
        while got.len() < total {
            let Ok(n) = receiver.recv(&mut buf) else {
                break;
            };
            got.push(buf[..n].to_vec());
        }
        got
    });
    let to_send = expected.clone();
    in_netns(from, move || -> Result<()> {
        let socket = UdpSocket::bind(("0.0.0.0", 0))?;
        socket.connect(dst)?;
        for batch in to_send.chunks(BATCH) {
            for d in batch {
                socket.send(d).context("sending a datagram")?;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    })??;
    let got = receiving
        .join()
        .map_err(|_| anyhow::anyhow!("the receiving thread panicked"))?;
    let first_wrong = got.iter().zip(&expected).position(|(g, e)| g != e);
    if let Some(at) = first_wrong {
        anyhow::bail!(
            "datagram {at} arrived altered or out of order: {} bytes starting {:02x?}",
            got[at].len(),
            &got[at][..got[at].len().min(8)]
        );
    }
    ensure!(
        got.len() == total,
        "{} of {total} datagrams arrived through the tunnel (the first {} in order and intact)",
        got.len(),
        got.len()
    );
    Ok(())
}

/// Datagram `seq` of the burst: its number, then `len - 4` bytes derived
/// from it, so a datagram cut, joined with another or moved shows.
fn datagram(seq: usize, len: usize) -> Vec<u8> {
    let seq = seq as u32;
    let mut out = seq.to_be_bytes().to_vec();
    out.extend((0..len - 4).map(|i| (i as u32).wrapping_mul(31).wrapping_add(seq) as u8));
    out
}
