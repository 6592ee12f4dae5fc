//! The GTM: hands out globally unique GXIDs from blocks whose boundary is persisted on
//! the standby and then on the primary, stores 2PC decisions on both, and fails over
//! by term-fenced promotion. `client` is the library other roles use to reach it.

pub mod bench;
pub mod cli;
pub mod client;
pub mod control_file;
pub mod decisions;
mod fast_lane;
mod gxid_stream;
pub mod lease;
pub mod node;
pub mod renew;
pub mod replication;
pub mod reservation;
pub mod server;

pub use client::{ClientError, ClientOptions, Decision, GtmClient};
