//! CMAgent: the per-host supervisor. It starts, watches and restarts the PostgreSQL
//! DNs, GTMs and CNs the config places on its host, as the CMServer assigns, carries out
//! the CMServer's orders, and reports every instance's state each heartbeat.

pub mod agent;
pub mod cn_instance;
pub mod detached;
pub mod error;
pub mod gtm_instance;
pub mod lease;
pub mod lifecycle;
pub mod metrics;
pub mod orders;
pub mod os_tools;
pub mod os_user;
pub mod postgres;
pub mod process;
pub mod report;
pub mod secondary_instance;
pub mod supervisor;

pub use agent::{run, AgentOptions};
pub use error::AgentError;
