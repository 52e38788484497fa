//! TUN offloads, sans-IO: the kernel hands the TUN device TCP (and UDP)
//! super-packets of up to 64 KiB behind a [`VirtioNetHdr`]; [`split`] cuts
//! them into packets of at most the MTU for the core, and [`Coalescer`]
//! joins the core's consecutive TCP segments, or UDP datagrams, of a flow
//! back into one super-packet for the kernel. One system call and one trip through the
//! host's stack then carry up to 64 KiB instead of one MTU.

pub(crate) mod checksum;
mod coalesce;
mod headers;
mod split;
mod virtio;

pub use coalesce::Coalescer;
pub use split::split;
pub use virtio::{GsoType, VirtioNetHdr, NEEDS_CSUM, VIRTIO_NET_HDR_LEN};

/// Why a frame read from the TUN device was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// The frame ends inside a header.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A header field contradicts the packet.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A well-formed frame asks for something weft does not implement.
    #[error("unsupported {0}")]
    Unsupported(&'static str),
}

#[cfg(test)]
mod testing;
