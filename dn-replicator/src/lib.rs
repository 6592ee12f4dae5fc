//! DN secondary (`dn_replicator`): WAL-only keeper and data-unit build channel.
//! Not implemented yet: a later issue fills this crate.
