//! `cm_ctl stop [--instance NAME]`: wants the cluster (or one instance) stopped, which
//! the CMServer persists (the agent will not restart it), and waits until it is.

use std::time::{Duration, Instant};

use ha_common::ClusterConfig;

use crate::cli::Target;
use crate::client::Primary;
use crate::error::CtlError;
use crate::progress::{wait_for, Goal};

pub async fn run(cfg: &ClusterConfig, t: &Target) -> Result<(), CtlError> {
    if let Some(name) = &t.instance {
        super::check_instance(cfg, name)?;
    }
    let started = Instant::now();
    let mut primary = Primary::find(cfg).await?;
    let names = primary.set_desired(t.instance.as_deref(), false).await?;
    let what = match &t.instance {
        Some(n) => format!("{n} to stop"),
        None => "every instance to stop".to_owned(),
    };
    wait_for(
        cfg,
        t.instance.as_deref(),
        Goal::Stopped,
        Duration::from_secs(t.timeout),
        &what,
    )
    .await?;
    println!(
        "stopped {} ({:.1} s); they stay stopped until cm_ctl start",
        names.join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
