//! `cm_ctl failover --instance NAME [--force]`: promotes the named standby now. Without
//! --force the CMServer refuses when that could lose acknowledged commits, and says why.

use std::time::{Duration, Instant};

use ha_common::proto::cm::FailoverRequest;
use ha_common::ClusterConfig;

use crate::client::Primary;
use crate::error::CtlError;

/// Promotion of a DN standby is quick; pg_ctl's own limit is 120 s.
const TIMEOUT: Duration = Duration::from_secs(180);

pub async fn run(cfg: &ClusterConfig, instance: &str, force: bool) -> Result<(), CtlError> {
    super::check_instance(cfg, instance)?;
    let started = Instant::now();
    let primary = Primary::find(cfg).await?;
    let mut client = primary.long_client(TIMEOUT).await?;
    let reply = client
        .failover(FailoverRequest {
            instance: instance.to_owned(),
            force,
        })
        .await
        .map_err(|s| primary.operation_error("failover", s))?
        .into_inner();
    super::print_done(&reply, started);
    Ok(())
}
