//! DN secondary (`dn_replicator`): WAL-only keeper and data-unit build channel.

pub mod cli;
