//! One file per subcommand; `run` dispatches.

pub mod build;
pub mod failover;
pub mod local;
pub mod start;
pub mod status;
pub mod stop;
pub mod switchover;

use ha_common::config::InstanceKind;
use ha_common::ClusterConfig;

use crate::cli::{CertAction, Cli, Command, LocalAction};
use crate::error::CtlError;

pub async fn run(cli: Cli) -> Result<(), CtlError> {
    let cfg = cli.load_config_and_tls()?;
    match &cli.command {
        Command::Status { json } => status::run(&cfg, *json).await,
        Command::Start(t) => start::run(&cfg, t).await,
        Command::Stop(t) => stop::run(&cfg, t).await,
        Command::Switchover(op) => switchover::run(&cfg, op).await,
        Command::Failover { instance, force } => failover::run(&cfg, instance, *force).await,
        Command::Build(op) => build::run(&cfg, op).await,
        Command::Cert {
            action:
                CertAction::Init {
                    out,
                    ca_cert,
                    ca_key,
                },
        } => cert_init(&cfg, out.as_deref(), ca_cert.as_deref(), ca_key.as_deref()),
        Command::Local { action } => match action {
            LocalAction::Up { timeout, netns } => {
                local::up::run(&cfg, &cli, *timeout, netns.as_deref()).await
            }
            LocalAction::Down { timeout, netns } => {
                local::down::run(&cfg, *timeout, netns.as_deref()).await
            }
        },
    }
}

/// Checks `--instance` against the config before asking the CMServer.
pub(crate) fn check_instance(cfg: &ClusterConfig, name: &str) -> Result<(), CtlError> {
    match cfg.find(name) {
        None => Err(CtlError::UnknownInstance {
            name: name.to_owned(),
            config: cfg.source.clone(),
        }),
        Some(r) if r.kind == InstanceKind::CmServer => Err(CtlError::NotManaged {
            name: name.to_owned(),
        }),
        Some(_) => Ok(()),
    }
}

/// Prints an operation's one-line answer with how long it took.
fn print_done(reply: &ha_common::proto::cm::OperationReply, started: std::time::Instant) {
    println!(
        "{} ({:.1} s)",
        reply.message,
        started.elapsed().as_secs_f64()
    );
}

/// `cm_ctl cert init`: the CA (new, or the operator's own) and one certificate per role
/// and host; on an existing dir, the missing certificates only.
fn cert_init(
    cfg: &ClusterConfig,
    out: Option<&std::path::Path>,
    ca_cert: Option<&std::path::Path>,
    ca_key: Option<&std::path::Path>,
) -> Result<(), CtlError> {
    use ha_common::tls;
    let dir = out.map(Into::into).unwrap_or_else(|| cfg.tls_dir());
    let ca = match (ca_cert, ca_key) {
        (Some(c), Some(k)) => {
            Some(tls::Ca::from_files(c, k).map_err(ha_common::ConfigError::from)?)
        }
        _ => None,
    };
    let issued = tls::init_dir(&dir, cfg, ca).map_err(ha_common::ConfigError::from)?;
    // A standby's restore_command runs as the OS user: the `restore` keys are that user's.
    tls::give_restore_identity(&dir, &cfg.cluster.os_user).map_err(ha_common::ConfigError::from)?;
    let made = issued
        .made
        .iter()
        .map(|n| n.stem())
        .collect::<Vec<_>>()
        .join(", ");
    match (issued.new_ca, issued.made.is_empty()) {
        (true, _) => println!(
            "certificates for {} written to {} (new CA; {made})",
            cfg.cluster.name,
            dir.display()
        ),
        (false, true) => println!(
            "{} already holds every certificate of {}; nothing changed",
            dir.display(),
            cfg.cluster.name
        ),
        (false, false) => println!(
            "{}: added {made} (signed by its existing CA; no file was rewritten)",
            dir.display()
        ),
    }
    // The DN roles' passwords belong with the certificates: made once per cluster,
    // copied to every host with them.
    let made = ha_common::dn_auth::init_password_files(cfg)?;
    println!(
        "DN role passwords in {} ({} new; existing files are kept)",
        ha_common::dn_auth::dir(cfg).display(),
        made.len()
    );
    Ok(())
}
