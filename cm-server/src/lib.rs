//! CMServer: keeps the cluster state, tells every agent what to run, and answers
//! cm_ctl.

pub mod arbiter;
pub mod arbitration;
pub mod assignments;
pub mod cadence;
pub mod cn_sync;
pub mod ddl_set;
pub mod election;
pub mod gtm_lease;
pub mod metrics;
pub mod operations;
pub mod order_book;
pub mod outside;
pub mod pair;
pub mod reports;
pub mod secondary;
pub mod service;
pub mod state;
pub mod status;

pub use service::{serve, CmService, ServerError};
