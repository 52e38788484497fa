//! The thread that drives QUIC: the endpoint (one UDP socket for every
//! node) and each connection's timers and packets.
//!
//! On the shared runtime a policy change wakes one session task per node
//! at once, each signing and encoding its delta. The endpoint is a single
//! task in that queue: it reached the socket again only after every one of
//! them ran, seconds at ten thousand nodes on a loaded machine, while the
//! connections' idle timers (3 s, the nodes' choice) kept firing. Sessions
//! then timed out with their keep-alives still waiting in the socket
//! buffer. Here QUIC runs on a thread of its own, so receiving a
//! keep-alive never waits for application work; sessions still run on
//! the shared runtime and only hand bytes to and from their streams.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime};

/// A quinn runtime whose tasks, timers and socket live on the QUIC thread.
/// Public for any process that drives thousands of QUIC connections (the
/// load tool's simulated fleet has the same problem).
#[derive(Debug)]
pub struct QuicThread {
    handle: tokio::runtime::Handle,
}

impl QuicThread {
    /// The process's QUIC thread, started on first use. Every endpoint
    /// shares it; it lives until the process exits.
    pub fn shared() -> std::io::Result<Arc<Self>> {
        static THREAD: Mutex<Option<tokio::runtime::Handle>> = Mutex::new(None);
        let mut thread = THREAD
            .lock()
            .map_err(|_| std::io::Error::other("the QUIC thread's start-up panicked"))?;
        let handle = match &*thread {
            Some(handle) => handle.clone(),
            None => thread.insert(start()?).clone(),
        };
        Ok(Arc::new(Self { handle }))
    }
}

impl Runtime for QuicThread {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        let _on_thread = self.handle.enter();
        TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.handle.spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn AsyncUdpSocket>> {
        let _on_thread = self.handle.enter();
        TokioRuntime.wrap_udp_socket(socket)
    }

    fn now(&self) -> Instant {
        TokioRuntime.now()
    }
}

/// Starts a single-threaded runtime on a new thread that runs its tasks
/// for the rest of the process.
fn start() -> std::io::Result<tokio::runtime::Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("weft-quic".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_and_timers_run_on_the_quic_thread_without_a_caller_runtime() {
        let quic = QuicThread::shared().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut timer = quic.new_timer(quic.now() + std::time::Duration::from_millis(20));
        quic.spawn(Box::pin(async move {
            std::future::poll_fn(|cx| timer.as_mut().poll(cx)).await;
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        }));
        let ran_on = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(ran_on.as_deref(), Some("weft-quic"));
    }

    #[test]
    fn every_endpoint_shares_one_thread() {
        let thread_of = |quic: Arc<QuicThread>| {
            let (tx, rx) = std::sync::mpsc::channel();
            quic.spawn(Box::pin(async move {
                let _ = tx.send(std::thread::current().id());
            }));
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap()
        };
        let a = thread_of(QuicThread::shared().unwrap());
        let b = thread_of(QuicThread::shared().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, std::thread::current().id());
    }
}
