//! Public keys as their base64 text in JSON, as operators see them everywhere else.

use serde::{Deserialize as _, Deserializer, Serializer};
use weft_proto::PublicKey;

/// Writes the key as its base64 text.
pub fn serialize<S: Serializer>(key: &PublicKey, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(key)
}

/// Reads a key from its base64 text.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PublicKey, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(serde::de::Error::custom)
}
