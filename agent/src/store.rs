//! The state store (being written).
