//! What each `dn_replicator` subcommand does (the binary only parses flags).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use ha_common::proto::replicator::replicator_client::ReplicatorClient;
use ha_common::proto::replicator::ReadWalRequest;

use crate::{build_sink, build_source};

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
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{from}"))
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

/// `dn_replicator build-source` flags.
pub struct BuildSourceArgs {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub pg_host: String,
    pub pg_port: u16,
    pub pg_user: String,
    pub resume_window: u64,
    pub max_rate_mb: u64,
}

/// `dn_replicator build-source`: serves one build, then exits.
pub fn build_source(a: BuildSourceArgs) -> anyhow::Result<ExitCode> {
    ha_common::logging::init("dn_replicator");
    let rt = tokio::runtime::Runtime::new().context("start the tokio runtime")?;
    rt.block_on(async {
        let listener = build_source::bind(a.listen)
            .await
            .with_context(|| format!("listen on {}", a.listen))?;
        // The sink (or the test driving us) reads the real port from here.
        println!("listening on {}", listener.local_addr()?);
        let cfg = build_source::SourceConfig {
            data_dir: a.data_dir,
            pg: build_source::PgTarget {
                host: a.pg_host,
                port: a.pg_port,
                user: a.pg_user,
            },
            resume_window: Duration::from_secs(a.resume_window),
            first_wait: Duration::from_secs(a.resume_window),
            max_rate: (a.max_rate_mb > 0).then_some(a.max_rate_mb << 20),
        };
        let r = build_source::serve_one(&listener, &cfg).await?;
        println!(
            "build session {} complete: {} units ({} sent, {} unchanged), {} WAL bytes, {} connections",
            r.session, r.units, r.units_sent, r.same_units, r.wal_bytes_sent, r.connections
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// `dn_replicator build-sink` flags.
pub struct BuildSinkArgs {
    pub source: String,
    pub data_dir: PathBuf,
    pub state_dir: Option<PathBuf>,
    pub incremental: bool,
    pub full: bool,
    pub owner: Option<String>,
    pub retry_for: u64,
}

/// `dn_replicator build-sink`: builds (or resumes building) a data dir from a source.
pub fn build_sink(a: BuildSinkArgs) -> anyhow::Result<ExitCode> {
    ha_common::logging::init("dn_replicator");
    let owner = match a.owner {
        Some(name) => {
            let u = nix::unistd::User::from_name(&name)
                .with_context(|| format!("look up OS user {name}"))?
                .with_context(|| format!("--owner: no OS user named {name:?}"))?;
            Some((u.uid.as_raw(), u.gid.as_raw()))
        }
        None => None,
    };
    let state_dir = a
        .state_dir
        .or_else(|| a.data_dir.parent().map(|p| p.to_path_buf()))
        .context("--state-dir is needed when the data dir has no parent")?;
    let cfg = build_sink::SinkConfig {
        source: a.source,
        data_dir: a.data_dir,
        state_dir,
        incremental: a.incremental,
        owner,
        batch_bytes: 8 << 20,
        retry_for: Duration::from_secs(a.retry_for),
    };
    if a.full {
        cfg.forget_progress()
            .context("remove saved build progress")?;
    }
    let rt = tokio::runtime::Runtime::new().context("start the tokio runtime")?;
    let r = rt.block_on(build_sink::run(&cfg))?;
    println!(
        "build session {} complete: {} units ({} written, {} unchanged, {} refused and resent), resumed from unit {}, {} WAL bytes, {} connections",
        r.session, r.units, r.units_written, r.units_same, r.refused, r.resumed_from, r.wal_bytes, r.connections
    );
    Ok(ExitCode::SUCCESS)
}
