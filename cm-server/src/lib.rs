//! CMServer: keeps the cluster state, tells every agent what to run, and answers
//! cm_ctl.

pub mod assignments;
pub mod reports;
pub mod service;
pub mod state;
pub mod status;

pub use service::{serve, CmService, ServerError};
