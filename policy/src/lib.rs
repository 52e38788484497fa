//! weft access policy.
