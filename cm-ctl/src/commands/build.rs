//! `cm_ctl build --instance NAME`: rebuilds a DN standby from its primary (its data
//! dir is moved aside to `data.old`, then copied afresh); answers when done.

use std::time::{Duration, Instant};

use ha_common::proto::cm::BuildRequest;
use ha_common::ClusterConfig;

use crate::cli::Operation;
use crate::client::Primary;
use crate::error::CtlError;

pub async fn run(cfg: &ClusterConfig, op: &Operation) -> Result<(), CtlError> {
    super::check_instance(cfg, &op.instance)?;
    let started = Instant::now();
    let primary = Primary::find(cfg).await?;
    let mut client = primary.long_client(Duration::from_secs(op.timeout)).await?;
    let reply = client
        .build(BuildRequest {
            instance: op.instance.clone(),
        })
        .await
        .map_err(|s| primary.operation_error("build", s))?
        .into_inner();
    super::print_done(&reply, started);
    Ok(())
}
