//! Bytes survive the fast path: 50 MB over one TCP connection through the
//! tunnel between two namespaces, compared by SHA-256 on the far side. Bulk
//! traffic exercises what pings do not: batched reads from the TUN device,
//! GSO sends and GRO receives on the UDP socket, reused buffers.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use ring::digest::{Context, SHA256};
use weft_tests::{fixture, in_netns, ping, wait_until, Lab, Overlay};

const TOTAL: usize = 50 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
/// The database port the fixture policy opens from web to db.
const PORT: u16 = 5432;

#[test]
fn fifty_megabytes_cross_the_tunnel_intact() {
    let mut lab = Lab::new().unwrap();
    for (name, octet) in [("coord", 1), ("web", 11), ("db", 12)] {
        lab.add_host(name, octet).unwrap();
    }
    let mut overlay = Overlay::new(lab).unwrap();
    if let Err(e) = transfer(&mut overlay) {
        panic!("{e:?}\n\n{}", overlay.logs());
    }
}

fn transfer(overlay: &mut Overlay) -> Result<()> {
    let policy = overlay.lab().dir().join("policy.hujson");
    std::fs::copy(fixture("policy-initial.hujson"), &policy)?;
    overlay.start_coordinator("coord", &policy)?;
    overlay.start_node("web")?;
    overlay.start_node("db")?;
    let web_key = overlay.coordinator()?.authkey(&["tag:web"], false)?;
    let db_key = overlay.coordinator()?.authkey(&["tag:db"], false)?;
    overlay.join("web", &web_key)?;
    overlay.join("db", &db_key)?;
    let web_ns = overlay.lab().host("web")?.netns.clone();
    let db_ns = overlay.lab().host("db")?.netns.clone();
    let db_addr = overlay.node("db")?.overlay_ipv4()?;
    wait_until(Duration::from_secs(10), || {
        ping(&web_ns, db_addr, Duration::from_millis(300))
    })
    .context("no ping crossed the tunnel within 10 s of joining")?;

    let listener = in_netns(&db_ns, || TcpListener::bind(("0.0.0.0", PORT)))??;
    let receiver = std::thread::spawn(move || -> Result<(usize, Vec<u8>)> {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut hash = Context::new(&SHA256);
        let mut buf = vec![0u8; CHUNK];
        let mut received = 0;
        loop {
            let n = stream.read(&mut buf).context("reading the transfer")?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            received += n;
        }
        Ok((received, hash.finish().as_ref().to_vec()))
    });

    let dst = SocketAddr::new(db_addr, PORT);
    let started = Instant::now();
    let sent_hash = in_netns(&web_ns, move || -> Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
            .with_context(|| format!("connect to {dst}"))?;
        stream.set_write_timeout(Some(Duration::from_secs(20)))?;
        let mut hash = Context::new(&SHA256);
        let mut data = Pattern(0x9e37_79b9_7f4a_7c15);
        let mut chunk = vec![0u8; CHUNK];
        for _ in 0..TOTAL / CHUNK {
            data.fill(&mut chunk);
            hash.update(&chunk);
            stream.write_all(&chunk).context("sending the transfer")?;
        }
        stream.shutdown(std::net::Shutdown::Write)?;
        Ok(hash.finish().as_ref().to_vec())
    })??;
    let (received, received_hash) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the receiving thread panicked"))??;
    let elapsed = started.elapsed();
    ensure!(
        received == TOTAL,
        "{received} of {TOTAL} bytes arrived through the tunnel"
    );
    ensure!(
        received_hash == sent_hash,
        "the bytes that arrived differ from those sent (SHA-256 mismatch)"
    );
    weft_tests::record_metric(&format!(
        "50 MB through the tunnel over TCP, hash checked: {} ms ({:.2} Gbit/s, debug or release as built)",
        elapsed.as_millis(),
        (TOTAL * 8) as f64 / elapsed.as_secs_f64() / 1e9
    ));
    Ok(())
}

/// Bytes no compressor or coincidence makes easy: xorshift64.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            word.copy_from_slice(&self.0.to_le_bytes()[..word.len()]);
        }
    }
}
