//! The device: what a node runs to be part of the overlay, on whatever
//! operating system hosts it.
//!
//! The underlay socket ([`Underlay`]) is the engine's own; the overlay
//! interface's packets come through [`PacketIo`] and everything else the
//! device asks of the operating system through [`Platform`].

mod packet_io;
mod platform;
mod underlay;

pub use packet_io::PacketIo;
pub use platform::Platform;
pub use underlay::{RecvBatch, SendBatch, Underlay};
