//! `cm_ctl switchover --instance NAME`: the named standby becomes primary once fully in
//! sync, the old primary its standby; answers when done (or why not, on one line).

use std::time::{Duration, Instant};

use ha_common::proto::cm::SwitchoverRequest;
use ha_common::ClusterConfig;

use crate::cli::Operation;
use crate::client::Primary;
use crate::error::CtlError;

pub async fn run(cfg: &ClusterConfig, op: &Operation) -> Result<(), CtlError> {
    super::check_instance(cfg, &op.instance)?;
    let started = Instant::now();
    let primary = Primary::find(cfg).await?;
    let timeout = Duration::from_secs(op.timeout);
    let mut client = primary.long_client(timeout).await?;
    let reply = client
        .switchover(SwitchoverRequest {
            instance: op.instance.clone(),
            timeout_ms: timeout.as_millis() as u64,
        })
        .await
        .map_err(|s| primary.operation_error("switchover", s))?
        .into_inner();
    super::print_done(&reply, started);
    Ok(())
}
