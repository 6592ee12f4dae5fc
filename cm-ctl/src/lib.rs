//! cm_ctl: the operator's CLI. Finds the primary CMServer from the config and asks it
//! for status or start/stop; `local up|down` runs a whole cluster on one machine.

pub mod cli;
pub mod client;
pub mod commands;
pub mod error;
pub mod netns;
pub mod processes;
pub mod progress;

pub use cli::Cli;
pub use error::CtlError;
