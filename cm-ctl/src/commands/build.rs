//! `cm_ctl build --instance NAME [--full]`: rebuilds a DN standby from its primary over
//! the data-unit build channel (incremental unless --full, which moves the old data dir
//! aside to `data.old` and copies afresh); answers when done.

use std::time::{Duration, Instant};

use ha_common::proto::cm::BuildRequest;
use ha_common::ClusterConfig;

use crate::cli::BuildArgs;
use crate::client::Primary;
use crate::error::CtlError;

pub async fn run(cfg: &ClusterConfig, args: &BuildArgs) -> Result<(), CtlError> {
    let op = &args.op;
    super::check_instance(cfg, &op.instance)?;
    let started = Instant::now();
    let primary = Primary::find(cfg).await?;
    let mut client = primary.long_client(Duration::from_secs(op.timeout)).await?;
    let reply = client
        .build(BuildRequest {
            instance: op.instance.clone(),
            full: args.full,
        })
        .await
        .map_err(|s| primary.operation_error("build", s))?
        .into_inner();
    super::print_done(&reply, started);
    Ok(())
}
