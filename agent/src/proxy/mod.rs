//! The proxy (being written).
pub mod protocol;
