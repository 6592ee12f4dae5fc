//! What each `dn_replicator` subcommand does (the binary only parses flags).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use ha_common::proto::replicator::replicator_client::ReplicatorClient;
use ha_common::proto::replicator::ReadWalRequest;

/// `dn_replicator serve`.
pub fn serve(config: &Path, node: &str, base_dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    ha_common::logging::init("dn_replicator");
    let rt = tokio::runtime::Runtime::new().context("start the tokio runtime")?;
    rt.block_on(crate::service::serve(
        config,
        node,
        base_dir.map(Path::to_owned),
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// `dn_replicator restore-wal`: PostgreSQL's restore_command contract: exit 0 with
/// the file written, non-zero when it is not available (recovery then tries its other
/// sources).
pub fn restore_wal(from: &str, file: &str, path: &Path) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    rt.block_on(async {
        let timeout = Duration::from_secs(2);
        let ep = ha_common::tls::endpoint(from, ha_common::tls::CertRole::Replicator)
            .with_context(|| format!("bad --from {from:?}"))?
            .connect_timeout(timeout);
        let Ok(ch) = ep.connect().await else {
            // Unreachable secondary: not available, not an error worth a log line.
            return Ok(ExitCode::from(1));
        };
        let mut c = ReplicatorClient::new(ch);
        let mut s = match c
            .read_wal(ReadWalRequest {
                file_name: file.to_owned(),
            })
            .await
        {
            Ok(s) => s.into_inner(),
            Err(st) if st.code() == tonic::Code::NotFound => return Ok(ExitCode::from(1)),
            Err(st) => anyhow::bail!("read {file} from {from}: {}", st.message()),
        };
        let mut data = Vec::new();
        while let Some(chunk) = s
            .message()
            .await
            .with_context(|| format!("read {file} from {from}"))?
        {
            data.extend_from_slice(&chunk.data);
        }
        // Written whole, then renamed: PostgreSQL must never see half a file.
        let tmp = path.with_extension("dnr-partial");
        std::fs::write(&tmp, &data).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
        Ok(ExitCode::SUCCESS)
    })
}
