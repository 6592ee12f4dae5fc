//! DN secondary (`dn_replicator`): WAL-only keeper and data-unit build channel.

pub mod cli;
pub mod node;
pub mod pgproto;
pub mod receiver;
pub mod secondary;
pub mod service;
pub mod wal_store;
