//! The relay's STUN responder: answers Binding requests on its UDP socket
//! with the address each came from ([`weft_proto::stun`]).

use tokio::net::UdpSocket;
use weft_proto::stun::respond;

/// Answers Binding requests on `socket` forever.
pub(crate) async fn serve(socket: UdpSocket) {
    let mut buf = [0u8; 1500];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!("STUN socket error: {e}");
                continue;
            }
        };
        if let Some(response) = respond(&buf[..n], from) {
            if let Err(e) = socket.send_to(&response, from).await {
                tracing::debug!(%from, "cannot answer a STUN request: {e}");
            }
        }
    }
}
