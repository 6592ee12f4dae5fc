//! DN secondary (`dn_replicator`): WAL-only keeper and the 8 KiB data-unit build channel.

pub mod build_cli;
pub mod build_sink;
pub mod build_source;
pub mod cli;
pub mod data_unit;
pub mod framing;
pub mod manifest;
pub mod node;
pub mod pgproto;
pub mod receiver;
pub mod secondary;
pub mod service;
pub mod wal_store;
