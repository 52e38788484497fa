//! Bulk TCP transfers through the tunnel, hashed on both sides: bytes that
//! arrive whole, in order and unaltered prove the data path end to end.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use ring::digest::{Context, SHA256};

use crate::netns::in_netns;

const CHUNK: usize = 64 * 1024;
/// How long either side may wait for the other before the transfer fails.
const STALL: Duration = Duration::from_secs(20);

/// Sends `total` bytes (a whole number of 64 KiB chunks) of a pseudo-random
/// pattern over one TCP connection from namespace `from` to `dst`, received
/// by a listener on `dst`'s port inside namespace `to`, and checks that
/// every byte arrived intact (SHA-256) `within` the time given. Returns how
/// long the transfer took.
pub fn hashed_transfer(
    from: &str,
    to: &str,
    dst: SocketAddr,
    total: usize,
    within: Duration,
) -> Result<Duration> {
    let port = dst.port();
    let listener = in_netns(to, move || TcpListener::bind(("0.0.0.0", port)))??;
    let receiver = std::thread::spawn(move || -> Result<(usize, Vec<u8>)> {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(STALL))?;
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

    let started = Instant::now();
    let sent_hash = in_netns(from, move || -> Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
            .with_context(|| format!("connect to {dst}"))?;
        stream.set_write_timeout(Some(STALL))?;
        let mut hash = Context::new(&SHA256);
        let mut data = Pattern(0x9e37_79b9_7f4a_7c15);
        let mut chunk = vec![0u8; CHUNK];
        for sent in 0..total / CHUNK {
            ensure!(
                started.elapsed() < within,
                "only {} of {total} bytes sent within {within:?}",
                sent * CHUNK
            );
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
    let expected = total / CHUNK * CHUNK;
    ensure!(
        received == expected,
        "{received} of {expected} bytes arrived through the tunnel"
    );
    ensure!(
        received_hash == sent_hash,
        "the bytes that arrived differ from those sent (SHA-256 mismatch)"
    );
    Ok(elapsed)
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
