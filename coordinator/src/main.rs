//! Placeholder until the coordinator lands.
fn main() {}
