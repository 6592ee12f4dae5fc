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
/// sources). With `tls_dir`, it presents that dir's `restore` certificate of `host`
/// (or the host-less one), the one the OS user PostgreSQL runs as may read.
pub fn restore_wal(
    from: &str,
    file: &str,
    path: &Path,
    tls_dir: Option<&Path>,
    host: Option<&str>,
) -> anyhow::Result<ExitCode> {
    use ha_common::tls::{CertRole, TlsMaterial};
    // A certificate we cannot read is an error (logged by PostgreSQL), not "not available".
    let material = tls_dir
        .map(|d| TlsMaterial::load_dir_for(d, CertRole::Restore, host))
        .transpose()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    rt.block_on(async {
        let timeout = Duration::from_secs(2);
        let ep =
            ha_common::tls::endpoint_with(material.as_ref(), from, CertRole::Replicator, timeout)
                .with_context(|| format!("bad --from {from:?}"))?;
        let ch = match ep.connect().await {
            Ok(ch) => ch,
            Err(e) => {
                // Unreachable secondary: not available, not an error worth a log line.
                // A refused certificate is a misconfiguration: one line in PostgreSQL's log.
                let detail = format!("{e:?}");
                if detail.contains("ertificate") || detail.contains("Tls") {
                    eprintln!("dn_replicator restore-wal: TLS with {from}: {detail}");
                }
                return Ok(ExitCode::from(1));
            }
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
        let data = restored_segment(file, data, path);
        // Written whole, then renamed: PostgreSQL must never see half a file.
        let tmp = path.with_extension("dnr-partial");
        std::fs::write(&tmp, &data).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
        Ok(ExitCode::SUCCESS)
    })
}

/// PostgreSQL's default WAL segment size, the one initdb uses here; the size of a
/// restored segment when the standby has no segment of its own to measure.
const DEFAULT_SEGMENT_SIZE: usize = 16 << 20;

/// What `restore_command` hands PostgreSQL for `file`, given what the secondary
/// served (`served`) and the standby's own WAL directory (that of `path`, which is
/// `pg_wal/RECOVERYXLOG`).
///
/// A history file, or a segment the secondary holds whole, is served as is. The
/// secondary's partial last segment is laid over the standby's own copy of that
/// segment (zeros when it has none) and filled out to a whole segment. PostgreSQL
/// prefers restored WAL to its own and keeps the restored file in place of its own:
/// the padded partial segment served before replaced a standby's longer copy, so a
/// standby that had more of the segment than the secondary (it acknowledged those
/// commits as the synchronous standby) lost them, or could not even start again
/// ("invalid magic number 0000", "could not locate a valid checkpoint record").
/// Both copies hold the same bytes up to the shorter one's end (one timeline, one
/// history): the overlay keeps whichever has more.
pub fn restored_segment(file: &str, served: Vec<u8>, path: &Path) -> Vec<u8> {
    let is_segment = file.len() == 24 && file.bytes().all(|b| b.is_ascii_hexdigit());
    let wal_dir = path.parent().unwrap_or(Path::new("."));
    let own = if is_segment {
        std::fs::read(wal_dir.join(file)).ok()
    } else {
        None
    };
    let size = own
        .as_ref()
        .map(Vec::len)
        .filter(|n| *n > 0)
        .or_else(|| segment_size_in(wal_dir))
        .unwrap_or(DEFAULT_SEGMENT_SIZE);
    if !is_segment || served.len() >= size {
        return served;
    }
    let mut out = own.filter(|o| o.len() == size).unwrap_or_default();
    out.resize(size, 0);
    out[..served.len()].copy_from_slice(&served);
    out
}

/// The size of any WAL segment in `wal_dir` (they are all one size).
fn segment_size_in(wal_dir: &Path) -> Option<usize> {
    std::fs::read_dir(wal_dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name();
        let name = name.to_str()?;
        let is_segment = name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit());
        let len = e.metadata().ok()?.len() as usize;
        (is_segment && len > 0).then_some(len)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: usize = 1 << 16;
    const FILE: &str = "000000030000000000000003";

    fn wal_dir() -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("RECOVERYXLOG");
        (d, path)
    }

    /// The seed-1002 corruption: the standby holds 3000 bytes of the segment, the
    /// secondary only 1000; the padded copy served before put zeros over the
    /// standby's 2000 more bytes (its acknowledged commits and a checkpoint).
    #[test]
    fn a_shorter_partial_segment_never_replaces_the_standbys_longer_copy() {
        let (d, path) = wal_dir();
        let mut own = vec![7u8; 3000];
        own.resize(SEG, 0);
        std::fs::write(d.path().join(FILE), &own).unwrap();
        let out = restored_segment(FILE, vec![7u8; 1000], &path);
        assert_eq!(out.len(), SEG);
        assert_eq!(out, own, "the standby's WAL past the secondary's end kept");
    }

    /// The catch-up the secondary exists for: it holds more of the segment than the
    /// standby (it acknowledged commits while the standby was away).
    #[test]
    fn a_longer_partial_segment_extends_the_standbys_copy() {
        let (d, path) = wal_dir();
        let mut own = vec![7u8; 1000];
        own.resize(SEG, 0);
        std::fs::write(d.path().join(FILE), &own).unwrap();
        let out = restored_segment(FILE, vec![7u8; 3000], &path);
        assert_eq!(out.len(), SEG);
        assert!(out[..3000].iter().all(|b| *b == 7));
        assert!(out[3000..].iter().all(|b| *b == 0));
    }

    #[test]
    fn without_a_copy_of_its_own_the_partial_segment_is_padded_to_the_size_of_the_others() {
        let (d, path) = wal_dir();
        std::fs::write(d.path().join("000000030000000000000002"), vec![1u8; SEG]).unwrap();
        let out = restored_segment(FILE, vec![7u8; 10], &path);
        assert_eq!(out.len(), SEG);
        assert_eq!(out[9], 7);
        assert_eq!(out[10], 0);
    }

    #[test]
    fn a_whole_segment_and_a_history_file_are_served_as_they_are() {
        let (d, path) = wal_dir();
        std::fs::write(d.path().join(FILE), vec![1u8; SEG]).unwrap();
        assert_eq!(
            restored_segment(FILE, vec![2u8; SEG], &path),
            vec![2u8; SEG]
        );
        let history = b"1\t0/3000000\tno recovery target specified\n".to_vec();
        assert_eq!(
            restored_segment("00000003.history", history.clone(), &path),
            history
        );
    }
}
