//! weft end-to-end harness.
