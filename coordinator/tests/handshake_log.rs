//! Failed control handshakes do not flood the log: the real
//! `weft-coordinator serve`, hit by hundreds of TLS connections that speak
//! garbage instead of the Noise handshake, says so in a line or two.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const BIN: &str = env!("CARGO_BIN_EXE_weft-coordinator");
const ATTEMPTS: usize = 300;

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn log_text(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

#[tokio::test]
async fn failed_handshakes_are_logged_in_aggregate() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("coordinator.log");
    let _server = Server(
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let address: SocketAddr = loop {
        let found = log_text(&log)
            .lines()
            .filter(|line| line.contains("coordinator listening"))
            .find_map(|line| {
                line.split("local_addr=")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            });
        if let Some(address) = found {
            break address;
        }
        assert!(Instant::now() < deadline, "the coordinator did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let tls = tokio_rustls::TlsConnector::from(Arc::new(
        weft_net::tls::client_config(weft_proto::ALPN).unwrap(),
    ));
    let name = rustls::pki_types::ServerName::try_from("weft").unwrap();
    let started = Instant::now();
    for _ in 0..ATTEMPTS {
        assert!(started.elapsed() < Duration::from_secs(60), "too slow");
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut stream = tls.connect(name.clone(), tcp).await.unwrap();
        stream.write_all(&[0x55; 200]).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    }

    let failures = |text: &str| text.matches("control handshake").count();
    let wait = Instant::now() + Duration::from_secs(5);
    while !log_text(&log).contains("control handshakes failing") {
        assert!(
            Instant::now() < wait,
            "no failed handshake logged:\n{}",
            log_text(&log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = log_text(&log);
    assert!(
        (1..=3).contains(&failures(&text)),
        "{ATTEMPTS} failed handshakes in {:?} gave these lines:\n{text}",
        started.elapsed()
    );
}
