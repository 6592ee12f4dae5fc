//! `cm_ctl start [--instance NAME]`: wants the cluster (or one instance) running and
//! waits until the status shows it normal.

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
    let names = primary.set_desired(t.instance.as_deref(), true).await?;
    let what = match &t.instance {
        Some(n) => format!("{n} to run normally"),
        None => "every instance to run normally".to_owned(),
    };
    wait_for(
        cfg,
        t.instance.as_deref(),
        Goal::Running,
        Duration::from_secs(t.timeout),
        &what,
    )
    .await?;
    println!(
        "started {} ({:.1} s)",
        names.join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
