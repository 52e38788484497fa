//! weft node.
