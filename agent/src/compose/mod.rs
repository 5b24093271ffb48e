//! Compose file loading (being written).
