//! weft's device engine: what a node runs that is not integration with its
//! operating system, so that `weftd` on Linux and a later mobile shell wrap
//! the same code.
//!
//! It owns the control client ([`control`]) and what it keeps between runs:
//! the coordinator's replicas ([`coordinators`]), the state directory and
//! preferences ([`state`]) and the verified netmap cache ([`netmap_cache`]).
//! The attributes a node reports ([`posture`]) come from the host through a
//! hook. It builds on the wire contract (`weft-proto`) and the connection
//! layer (`weft-net`); it holds no TUN device, netlink, local API or command
//! line, which stay in the shell (`weft-node`).

pub mod control;
pub mod coordinators;
pub mod device;
pub mod key_text;
pub mod netmap_cache;
pub mod posture;
pub mod state;
