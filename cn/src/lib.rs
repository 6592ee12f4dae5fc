//! Coordinator node (CN): PostgreSQL wire endpoint, catalog, router, two-phase commit.

pub mod cancel;
pub mod catalog;
pub mod cli;
pub mod distribute_clause;
pub mod dn;
pub mod dn_wire;
pub mod merge;
pub mod node;
pub mod plan_cache;
pub mod router;
pub mod rpc;
pub mod server;
pub mod session;
pub mod sql_text;
pub mod topology;
pub mod two_phase;
