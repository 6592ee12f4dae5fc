//! Mutual TLS on every gRPC link: the cluster CA, one certificate per role and host,
//! and the role (and host) a peer's certificate names.
//!
//! Every certificate is signed by the cluster CA and names its role twice: in the
//! subject (`OU=role=<role>`) for authorization, and as the DNS name `<role>.mpp-ha`
//! that a client checks when it connects (a client of the CMServer refuses a server
//! that does not hold a `cmserver` certificate). A daemon's certificate also names
//! the host it was issued for (`OU=host=<host>`, SAN: that host's address only), so
//! a CMServer can refuse an agent that speaks for another host (`require_role_on_host`).
//! A process loads its own role's material once (`init`); every channel and server is
//! then built here (`endpoint`, `server`), so no link can be plaintext while
//! `[tls] enabled = true`.
//!
//! Files in `tls.dir` (default `<base_dir>/tls`): `ca.crt` (and `ca.key`, kept by the
//! operator who issues), `operator.crt`/`.key` (host-less), and `<role>@<host>.crt`/
//! `.key` for each role on each host that runs it (`CertName::for_config`). A dir made
//! before certificates named hosts holds `<role>.crt`/`.key` instead; a daemon falls
//! back to those when its `<role>@<host>` files are absent (`TlsMaterial::load_dir_for`).

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

use crate::ClusterConfig;

/// Which part of the cluster a certificate belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CertRole {
    /// `cm_ctl`: the only role whose orders a CMServer obeys.
    Operator,
    Agent,
    CmServer,
    Gtm,
    Cn,
    Replicator,
    /// `dn_replicator restore-wal`, run by PostgreSQL as the OS user (a standby's
    /// `restore_command`): may only read WAL from a secondary. Its key is the OS
    /// user's (`give_restore_identity`), the only key that user can read.
    Restore,
}

impl CertRole {
    pub const ALL: [CertRole; 7] = [
        CertRole::Operator,
        CertRole::Agent,
        CertRole::CmServer,
        CertRole::Gtm,
        CertRole::Cn,
        CertRole::Replicator,
        CertRole::Restore,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CertRole::Operator => "operator",
            CertRole::Agent => "agent",
            CertRole::CmServer => "cmserver",
            CertRole::Gtm => "gtm",
            CertRole::Cn => "cn",
            CertRole::Replicator => "replicator",
            CertRole::Restore => "restore",
        }
    }

    pub fn parse(s: &str) -> Option<CertRole> {
        CertRole::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The DNS name in this role's certificate that clients verify.
    pub fn server_name(self) -> String {
        format!("{}.mpp-ha", self.as_str())
    }
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS file {path}: {source} (make the cluster's certificates with `cm_ctl cert init`)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS file {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("TLS: cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS: issuing certificates: {0}")]
    Issue(String),
}

/// The name of one certificate in a TLS dir: its role and, for a daemon's
/// certificate, the host it was issued for. Files: `<role>.crt` (host-less: the
/// operator's, or a legacy dir's) or `<role>@<host>.crt`, each with its `.key`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CertName {
    pub role: CertRole,
    pub host: Option<String>,
}

impl CertName {
    pub fn new(role: CertRole, host: Option<&str>) -> CertName {
        CertName {
            role,
            host: host.map(str::to_owned),
        }
    }

    /// The file name without extension: `operator`, `agent@h1`.
    pub fn stem(&self) -> String {
        match &self.host {
            None => self.role.as_str().to_owned(),
            Some(h) => format!("{}@{h}", self.role),
        }
    }

    pub fn crt(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.crt", self.stem()))
    }

    pub fn key(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.key", self.stem()))
    }

    /// Every certificate a cluster needs: the operator's (host-less), and one for each
    /// role on each host that runs it: `agent` on every host, `cmserver`, `gtm` and
    /// `cn` where the config places those instances, `replicator` where a DN
    /// secondary runs (dn_replicator serve), and `restore` where a DN member that may
    /// restore WAL from its group's secondary runs (a standby's restore_command).
    pub fn for_config(cfg: &ClusterConfig) -> Vec<CertName> {
        let mut out = std::collections::BTreeSet::new();
        out.insert(CertName::new(CertRole::Operator, None));
        for h in &cfg.hosts {
            out.insert(CertName::new(CertRole::Agent, Some(&h.name)));
        }
        for (role, list) in [
            (CertRole::CmServer, &cfg.cm_servers),
            (CertRole::Gtm, &cfg.gtm.instances),
            (CertRole::Cn, &cfg.cns),
        ] {
            for i in list {
                out.insert(CertName::new(role, Some(&i.host)));
            }
        }
        for g in &cfg.dn_groups {
            let has_secondary = g
                .members
                .iter()
                .any(|m| m.role() == Some(crate::config::Role::Secondary));
            for m in &g.members {
                if m.role() == Some(crate::config::Role::Secondary) {
                    out.insert(CertName::new(CertRole::Replicator, Some(&m.host)));
                } else if has_secondary {
                    out.insert(CertName::new(CertRole::Restore, Some(&m.host)));
                }
            }
        }
        out.into_iter().collect()
    }
}

impl fmt::Display for CertName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.stem())
    }
}

/// A host name becomes part of a file name and of a certificate subject: refuse one
/// that could leave the TLS dir or is empty (the config does not restrict host names).
fn check_host_name(host: &str) -> Result<(), TlsError> {
    if host.is_empty() || host == "." || host == ".." || host.contains(['/', '\0']) {
        return Err(TlsError::Issue(format!(
            "host name {host:?} cannot name a certificate file"
        )));
    }
    Ok(())
}

/// One role's CA, certificate and key, as PEM.
#[derive(Clone)]
pub struct TlsMaterial {
    pub role: CertRole,
    /// The host the certificate names; `None` for an operator's or a legacy
    /// (host-less) certificate.
    pub host: Option<String>,
    /// The certificate file it came from (for messages).
    pub cert_path: PathBuf,
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("TlsMaterial")
            .field("role", &self.role)
            .field("host", &self.host)
            .field("cert_path", &self.cert_path)
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
        return Err(TlsError::Invalid {
            path: path.to_owned(),
            problem: "not a PEM file".into(),
        });
    }
    Ok(bytes)
}

impl TlsMaterial {
    /// `role`'s host-less material from `dir` (`ca.crt`, `<role>.crt`, `<role>.key`):
    /// the operator's, or any role's in a dir made before certificates named hosts.
    pub fn load_dir(dir: &Path, role: CertRole) -> Result<TlsMaterial, TlsError> {
        Self::load_name(dir, &CertName::new(role, None))
    }

    /// `role`'s material for `host` from `dir`: `<role>@<host>.crt` and `.key`, or,
    /// when that certificate is absent, the host-less `<role>.crt` (a dir made before
    /// certificates named hosts keeps working). Logs which file it loaded.
    pub fn load_dir_for(
        dir: &Path,
        role: CertRole,
        host: Option<&str>,
    ) -> Result<TlsMaterial, TlsError> {
        let own = CertName::new(role, host);
        let name = if host.is_some() && !own.crt(dir).exists() {
            let legacy = CertName::new(role, None);
            tracing::info!(
                wanted = %own.crt(dir).display(),
                loaded = %legacy.crt(dir).display(),
                "TLS: no certificate for this host; using the host-less {role} certificate (run `cm_ctl cert init` to issue one per host)"
            );
            legacy
        } else {
            own
        };
        let m = Self::load_name(dir, &name)?;
        tracing::info!(file = %m.cert_path.display(), "TLS: loaded certificate");
        Ok(m)
    }

    fn load_name(dir: &Path, name: &CertName) -> Result<TlsMaterial, TlsError> {
        let cert_path = name.crt(dir);
        Ok(TlsMaterial {
            role: name.role,
            host: name.host.clone(),
            ca: read(&dir.join("ca.crt"))?,
            cert: read(&cert_path)?,
            key: read(&name.key(dir))?,
            cert_path,
        })
    }

    /// `role`'s material (for `host`, see `load_dir_for`) from the config's `tls.dir`;
    /// `None` when `[tls]` is off.
    pub fn load(
        cfg: &ClusterConfig,
        role: CertRole,
        host: Option<&str>,
    ) -> Result<Option<TlsMaterial>, TlsError> {
        if !cfg.tls.enabled {
            return Ok(None);
        }
        Self::load_dir_for(&cfg.tls_dir(), role, host).map(Some)
    }

    /// Client side: trust only the cluster CA, present this role's certificate, and
    /// expect the server to hold a `target` certificate.
    pub fn client_config(&self, target: CertRole) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(target.server_name())
    }

    /// `client_config` whose handshake gives up after `timeout`.
    pub fn client_config_timeout(&self, target: CertRole, timeout: Duration) -> ClientTlsConfig {
        self.client_config(target).timeout(timeout)
    }

    /// Server side: present this role's certificate and require a client certificate
    /// signed by the cluster CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
    }
}

type Loaded = Option<(Arc<TlsMaterial>, Server)>;

/// This process's material and its server builder, set by `init`.
static PROCESS: RwLock<Loaded> = RwLock::new(None);

fn process() -> Loaded {
    PROCESS.read().map(|g| g.clone()).unwrap_or(None)
}

/// Loads this process's material (`role` on `host`; `None` for host-less roles: the
/// operator) from the config and checks that the certificate and key make a usable
/// TLS configuration. Each binary calls it once after loading its config (a test
/// process again for each cluster it makes).
pub fn init(cfg: &ClusterConfig, role: CertRole, host: Option<&str>) -> Result<(), TlsError> {
    let loaded = match TlsMaterial::load(cfg, role, host)? {
        None => None,
        Some(m) => Some(m.checked()?),
    };
    if let Ok(mut g) = PROCESS.write() {
        *g = loaded.map(|(m, s)| (Arc::new(m), s));
    }
    Ok(())
}

impl TlsMaterial {
    /// Builds the server and a client configuration once, so that a bad certificate or
    /// key is reported at start and not at the first connection.
    pub fn checked(self) -> Result<(TlsMaterial, Server), TlsError> {
        let bad = |e: tonic::transport::Error| TlsError::Invalid {
            path: self.cert_path.clone(),
            problem: crate::message::one_line(&format!("{e}: {e:?}")),
        };
        let server = Server::builder()
            .tls_config(self.server_config())
            .map_err(bad)?;
        Endpoint::from_static("https://127.0.0.1:1")
            .tls_config(self.client_config(CertRole::CmServer))
            .map_err(bad)?;
        Ok((self, server))
    }
}

/// The material `init` loaded (`None`: TLS off or `init` not called).
pub fn process_material() -> Option<Arc<TlsMaterial>> {
    process().map(|(m, _)| m)
}

/// Whether this process runs its links with TLS.
pub fn enabled() -> bool {
    process().is_some()
}

/// A channel endpoint to a `target` server at `url` (`http://host:port` or
/// `host:port`), with this process's TLS when it is on.
///
/// `connect_timeout` bounds the TCP connect and, with TLS, the handshake as well
/// (each): a peer that accepts but never answers (a SIGSTOPped GTM primary, whose
/// kernel still completes TCP handshakes) fails the connection like an unreachable
/// one, so a client following a failover moves on to the other endpoint.
pub fn endpoint(
    url: &str,
    target: CertRole,
    connect_timeout: Duration,
) -> Result<Endpoint, tonic::transport::Error> {
    endpoint_with(process_material().as_deref(), url, target, connect_timeout)
}

/// `endpoint` with explicit material (tests; `None` = plaintext).
pub fn endpoint_with(
    material: Option<&TlsMaterial>,
    url: &str,
    target: CertRole,
    connect_timeout: Duration,
) -> Result<Endpoint, tonic::transport::Error> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    let ep = match material {
        None => Endpoint::from_shared(format!("http://{rest}"))?,
        Some(m) => Endpoint::from_shared(format!("https://{rest}"))?
            .tls_config(m.client_config_timeout(target, connect_timeout))?,
    };
    Ok(ep.connect_timeout(connect_timeout))
}

/// The connections a gRPC server accepts on `listener`, with TCP_NODELAY. Without it a
/// small answer written while the previous one is unacknowledged waits for that ACK,
/// which the client delays by ~40 ms: every call on a kept connection took ~44 ms
/// (agent reports, CnSync, the CN-to-CN calls of a DDL). tonic applies its own
/// `tcp_nodelay` setting only to listeners it binds itself, not to these.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A server builder with this process's TLS when it is on.
pub fn server() -> Server {
    match process() {
        None => Server::builder(),
        Some((_, server)) => server,
    }
}

/// What a peer's certificate says it is: its role, and the host it was issued for
/// (`None`: an operator's or a legacy host-less certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub role: CertRole,
    pub host: Option<String>,
}

/// The role and host named by a certificate (DER): its subject's `OU=role=<role>`
/// and `OU=host=<host>`.
pub fn identity_of_certificate(der: &[u8]) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let (mut role, mut host) = (None, None);
    for ou in cert.subject().iter_organizational_unit() {
        let Ok(text) = ou.as_str() else { continue };
        if let Some(r) = text.strip_prefix("role=").and_then(CertRole::parse) {
            role.get_or_insert(r);
        } else if let Some(h) = text.strip_prefix("host=") {
            host.get_or_insert_with(|| h.to_owned());
        }
    }
    Some(PeerIdentity { role: role?, host })
}

/// The role named by a certificate (DER): its subject's `OU=role=<role>`.
pub fn role_of_certificate(der: &[u8]) -> Option<CertRole> {
    identity_of_certificate(der).map(|i| i.role)
}

/// The identity in the certificate a request's peer presented.
fn peer_identity<T>(request: &tonic::Request<T>) -> Option<PeerIdentity> {
    request
        .peer_certs()
        .and_then(|certs| certs.first().and_then(|c| identity_of_certificate(c)))
}

/// Refuses a request whose peer certificate names none of `allowed`; returns the
/// peer's identity (`None`: TLS off, nothing to check).
#[allow(clippy::result_large_err)]
fn authorize<T>(
    request: &tonic::Request<T>,
    allowed: &[CertRole],
) -> Result<Option<PeerIdentity>, tonic::Status> {
    if !enabled() {
        return Ok(None);
    }
    match peer_identity(request) {
        Some(peer) if allowed.contains(&peer.role) => Ok(Some(peer)),
        Some(peer) => Err(tonic::Status::permission_denied(format!(
            "a {} certificate may not call this; it needs a {} certificate",
            peer.role,
            names(allowed)
        ))),
        None => Err(tonic::Status::unauthenticated(format!(
            "no client certificate naming a role; this needs a {} certificate",
            names(allowed)
        ))),
    }
}

/// Refuses a request whose peer certificate names none of `allowed` (a CMServer
/// takes orders only from operators, reports only from agents). With TLS off there
/// is no certificate to check and everything is allowed.
#[allow(clippy::result_large_err)]
pub fn require_role<T>(
    request: &tonic::Request<T>,
    allowed: &[CertRole],
) -> Result<(), tonic::Status> {
    authorize(request, allowed).map(|_| ())
}

/// `require_role`, and the request speaks for `host` (an agent's report names its
/// host): a certificate issued for another host is refused (PermissionDenied naming
/// both) and logged, so one host's agent key cannot report, or take orders, for
/// another host. A host-less certificate (a dir made before certificates named hosts)
/// is accepted, as `require_role` would.
#[allow(clippy::result_large_err)]
pub fn require_role_on_host<T>(
    request: &tonic::Request<T>,
    allowed: &[CertRole],
    host: &str,
) -> Result<(), tonic::Status> {
    match authorize(request, allowed)? {
        Some(PeerIdentity {
            role,
            host: Some(cert_host),
        }) if cert_host != host => {
            let remote = request
                .remote_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|| "?".into());
            tracing::warn!(
                %role, certificate_host = %cert_host, claimed_host = %host, %remote,
                "refused: a certificate of one host speaking for another"
            );
            Err(tonic::Status::permission_denied(format!(
                "the {role} certificate of host {cert_host:?} may not speak for host {host:?}"
            )))
        }
        _ => Ok(()),
    }
}

/// An interceptor for every service but the secondary's `ReadWal`: refuses the
/// `restore` certificate (the OS user's, whose only business is reading WAL from a
/// secondary), so a stolen restore key orders nothing, reads no state and takes no
/// GXIDs. With TLS off it lets everything through, like `require_role`.
#[allow(clippy::result_large_err)]
pub fn deny_restore(request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    if !enabled() {
        return Ok(request);
    }
    if peer_identity(&request).map(|p| p.role) == Some(CertRole::Restore) {
        return Err(tonic::Status::permission_denied(
            "a restore certificate may only read WAL from a DN secondary",
        ));
    }
    Ok(request)
}

/// Hands the `restore` certificates in `dir` (`restore.crt`/`.key` of a legacy dir,
/// `restore@<host>.crt`/`.key`) to the OS user (mode 0644 and 0600): PostgreSQL runs
/// `dn_replicator restore-wal` as that user, which may read no other key.
/// `cm_ctl cert init` and `cm_ctl local up` call it after `init_dir`.
pub fn give_restore_identity(dir: &Path, os_user: &str) -> Result<(), TlsError> {
    let entries = std::fs::read_dir(dir).map_err(|source| TlsError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let role = CertRole::Restore.as_str();
    for entry in entries.flatten() {
        let path = entry.path();
        let (Some(stem), Some(ext)) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|s| s.to_str()),
        ) else {
            continue;
        };
        let ours = stem == role || stem.strip_prefix(role).is_some_and(|r| r.starts_with('@'));
        if !ours {
            continue;
        }
        let mode = match ext {
            "crt" => 0o644,
            "key" => 0o600,
            _ => continue,
        };
        crate::dn_auth::give_to_os_user(&path, os_user, mode).map_err(|e| TlsError::Write {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    Ok(())
}

fn names(roles: &[CertRole]) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// What `issue` makes: validity, the host, and the addresses server certificates
/// answer on.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// IP addresses put in the certificate.
    pub addresses: Vec<IpAddr>,
    /// DNS names put in the certificate besides `<role>.mpp-ha` (a host whose
    /// configured address is a name).
    pub dns_names: Vec<String>,
    /// The host the certificate is for (`OU=host=<host>`); `None`: host-less (the
    /// operator's, and every role's in a legacy dir).
    pub host: Option<String>,
    /// Days from today the certificates are valid for.
    pub valid_days: i64,
    /// Days before today the validity starts (negative `valid_days` + this = expired).
    pub backdate_days: i64,
}

impl IssueOptions {
    /// Host-less: addresses of the config's hosts (plus loopback), valid ten years.
    pub fn for_config(cfg: &ClusterConfig) -> IssueOptions {
        let mut addresses: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1])];
        for h in &cfg.hosts {
            if let Ok(ip) = h.address.parse::<IpAddr>() {
                if !addresses.contains(&ip) {
                    addresses.push(ip);
                }
            }
        }
        IssueOptions {
            addresses,
            dns_names: Vec::new(),
            host: None,
            valid_days: 3650,
            backdate_days: 1,
        }
    }

    /// These options for one host: its name in the subject and its address (IP, or
    /// DNS name) as the only address in the certificate.
    pub fn for_host(&self, host: &crate::config::Host) -> IssueOptions {
        let (addresses, dns_names) = match host.address.parse::<IpAddr>() {
            Ok(ip) => (vec![ip], Vec::new()),
            Err(_) => (Vec::new(), vec![host.address.clone()]),
        };
        IssueOptions {
            addresses,
            dns_names,
            host: Some(host.name.clone()),
            ..self.clone()
        }
    }
}

/// A CA (certificate + key, PEM) that signs role certificates.
pub struct Ca {
    pub cert_pem: String,
    key_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// id-at-organizationalUnitName (2.5.4.11). rcgen keeps one value per attribute type,
/// so the host's OU is pushed under this custom type: the same OID in the certificate.
const OU_OID: [u64; 4] = [2, 5, 4, 11];

fn issue_err(e: rcgen::Error) -> TlsError {
    TlsError::Issue(e.to_string())
}

fn validity(params: &mut rcgen::CertificateParams, opts: &IssueOptions) {
    // rcgen's dates are `time` values; count from the epoch rather than add a dependency.
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - days(opts.backdate_days);
    params.not_after = if opts.valid_days >= 0 {
        now + days(opts.valid_days)
    } else {
        now - days(opts.valid_days)
    };
}

fn days(n: i64) -> std::time::Duration {
    std::time::Duration::from_secs(n.unsigned_abs() * 86_400)
}

impl Ca {
    /// A new self-signed cluster CA.
    pub fn generate(cluster: &str, opts: &IssueOptions) -> Result<Ca, TlsError> {
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("mpp-ha {cluster} CA"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, opts);
        let key = rcgen::KeyPair::generate().map_err(issue_err)?;
        let cert = params.self_signed(&key).map_err(issue_err)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// An existing CA from its PEM certificate and key files.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Ca, TlsError> {
        let cert_pem = String::from_utf8_lossy(&read(cert)?).into_owned();
        let key_pem = String::from_utf8_lossy(&read(key)?).into_owned();
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Invalid {
            path: key.to_owned(),
            problem: e.to_string(),
        })?;
        let issuer =
            rcgen::Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| TlsError::Invalid {
                path: cert.to_owned(),
                problem: e.to_string(),
            })?;
        Ok(Ca {
            cert_pem,
            key_pem,
            issuer,
        })
    }

    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// A certificate (PEM cert, PEM key) for `role` (on `opts.host`), signed by this CA.
    /// A host's certificate answers on `<role>.mpp-ha` (what clients verify) and that
    /// host's address only; a host-less one also on `localhost` and every address in
    /// `opts`.
    pub fn issue(&self, role: CertRole, opts: &IssueOptions) -> Result<(String, String), TlsError> {
        let mut names = vec![role.server_name()];
        if opts.host.is_none() {
            names.push("localhost".to_owned());
        }
        names.extend(opts.dns_names.iter().cloned());
        let mut params = rcgen::CertificateParams::new(names).map_err(issue_err)?;
        for ip in &opts.addresses {
            params
                .subject_alt_names
                .push(rcgen::SanType::IpAddress(*ip));
        }
        let common_name = match &opts.host {
            None => role.server_name(),
            Some(h) => {
                check_host_name(h)?;
                format!("{role}@{h}")
            }
        };
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.distinguished_name.push(
            rcgen::DnType::OrganizationalUnitName,
            format!("role={role}"),
        );
        if let Some(h) = &opts.host {
            // A second OU: `identity_of_certificate` reads both.
            params.distinguished_name.push(
                rcgen::DnType::CustomDnType(OU_OID.to_vec()),
                format!("host={h}"),
            );
        }
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, opts);
        let key = rcgen::KeyPair::generate().map_err(issue_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Writes `text` to `path` (mode 0600 for keys, 0644 otherwise).
fn write(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// What `init_dir` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Issued {
    /// Whether it made the dir's `ca.crt` (a new dir).
    pub new_ca: bool,
    /// The certificates it issued (`operator`, `agent@h1`, ...).
    pub made: Vec<CertName>,
}

/// Makes `dir` hold the cluster CA and every certificate `cfg` needs
/// (`CertName::for_config`), issuing only what is missing: never overwrites a file.
///
/// A new dir gets a CA (`ca` if given, else a new one, whose key is kept as
/// `ca.key`). A dir that has a `ca.crt` is topped up (a dir made before
/// certificates named hosts, or before a host or instance was added) with
/// certificates signed by that CA: `ca`, which must be the one in `ca.crt`, or the
/// dir's own `ca.key`. With nothing missing it changes nothing and needs no CA key.
pub fn init_dir(dir: &Path, cfg: &ClusterConfig, ca: Option<Ca>) -> Result<Issued, TlsError> {
    let base = IssueOptions::for_config(cfg);
    let ca_path = dir.join("ca.crt");
    let existing = ca_path.exists();
    let wanted = CertName::for_config(cfg);
    // Without a ca.crt the dir was never completed: whatever an interrupted run left
    // was signed by a CA that is gone, so everything is issued afresh.
    let missing: Vec<&CertName> = wanted
        .iter()
        .filter(|n| !existing || !n.crt(dir).exists())
        .collect();
    if existing && missing.is_empty() {
        return Ok(Issued::default());
    }
    let ca_key = dir.join("ca.key");
    let (ca, own_ca) = match (ca, existing) {
        (Some(ca), true) => {
            let in_dir = pem_der(&read(&ca_path)?);
            if in_dir.is_none() || in_dir != pem_der(ca.cert_pem.as_bytes()) {
                return Err(TlsError::Invalid {
                    path: ca_path,
                    problem: "is not the CA given with --ca-cert; top up a dir with the CA that made it".into(),
                });
            }
            (ca, false)
        }
        (None, true) if ca_key.exists() => (Ca::from_files(&ca_path, &ca_key)?, false),
        (None, true) => {
            return Err(TlsError::Invalid {
                path: ca_path,
                problem: format!(
                    "missing {}; its CA key is not in the dir: pass the CA that signed it (--ca-cert, --ca-key)",
                    missing
                        .iter()
                        .map(|n| format!("{n}.crt"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
        }
        (Some(ca), false) => (ca, false),
        (None, false) => (Ca::generate(&cfg.cluster.name, &base)?, true),
    };
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    for name in &missing {
        let opts = match &name.host {
            None => base.clone(),
            Some(h) => match cfg.host(h) {
                Some(host) => base.for_host(host),
                None => continue,
            },
        };
        let (cert, key) = ca.issue(name.role, &opts)?;
        // The key first: a certificate's presence says its pair is complete.
        write(&name.key(dir), &key, true)?;
        write(&name.crt(dir), &cert, false)?;
    }
    if own_ca {
        write(&ca_key, &ca.key_pem(), true)?;
    }
    if !existing {
        // ca.crt last: its presence says the dir was made.
        write(&ca_path, &ca.cert_pem, false)?;
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(Issued {
        new_ca: !existing,
        made: missing.into_iter().cloned().collect(),
    })
}

/// The DER inside a PEM file (to compare certificates whatever their line endings).
fn pem_der(pem: &[u8]) -> Option<Vec<u8>> {
    x509_parser::pem::parse_x509_pem(pem)
        .ok()
        .map(|(_, p)| p.contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> IssueOptions {
        IssueOptions {
            addresses: vec![IpAddr::from([127, 0, 0, 1])],
            dns_names: Vec::new(),
            host: None,
            valid_days: 10,
            backdate_days: 1,
        }
    }

    #[test]
    fn each_certificate_names_its_role() {
        let ca = Ca::generate("t", &opts()).unwrap();
        for role in CertRole::ALL {
            let (pem, _) = ca.issue(role, &opts()).unwrap();
            let der = pem_der(pem.as_bytes()).unwrap();
            assert_eq!(role_of_certificate(&der), Some(role));
        }
        assert_eq!(role_of_certificate(b"garbage"), None);
    }

    /// local.toml with the hosts on distinct addresses (h1 10.0.0.1, ...), its TLS dir
    /// in `dir`.
    fn cluster(dir: &Path) -> ClusterConfig {
        let mut text = include_str!("../../configs/local.toml").to_owned();
        for n in 1..=3 {
            text = text.replacen(
                "address = \"127.0.0.1\"",
                &format!("address = \"10.0.0.{n}\""),
                1,
            );
        }
        let mut cfg = ClusterConfig::parse(&text, Path::new("local.toml")).unwrap();
        cfg.tls.dir = Some(dir.to_owned());
        cfg
    }

    /// Every file of `dir` and its bytes.
    fn snapshot(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    }

    fn ip_sans(pem: &[u8]) -> Vec<IpAddr> {
        let der = pem_der(pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::IPAddress(b) if b.len() == 4 => {
                    Some(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()))
                }
                _ => None,
            })
            .collect()
    }

    /// `cm_ctl cert init`: the CA, the operator's host-less certificate, and one
    /// certificate per role and host whose subject names the host and whose only
    /// address is that host's; no host-less daemon certificate that any host could use.
    #[test]
    fn init_dir_issues_one_certificate_per_role_and_host() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cluster(dir.path());
        let issued = init_dir(dir.path(), &cfg, None).unwrap();
        assert!(issued.new_ca);
        let made: Vec<String> = issued.made.iter().map(|n| n.stem()).collect();
        for stem in [
            "operator",
            "agent@h1",
            "agent@h2",
            "agent@h3",
            "cmserver@h1",
            "cmserver@h2",
            "gtm@h1",
            "gtm@h2",
            "cn@h1",
            "cn@h2",
            // dn1's secondary is on h3, its primary and standby may restore WAL from it.
            "replicator@h3",
            "restore@h1",
            "restore@h2",
        ] {
            assert!(made.contains(&stem.to_owned()), "{stem} in {made:?}");
            assert!(
                dir.path().join(format!("{stem}.key")).exists(),
                "{stem}.key"
            );
        }
        assert!(
            !made.contains(&"cmserver@h3".to_owned()),
            "no CMServer on h3"
        );
        for legacy in ["agent", "cmserver", "gtm", "cn", "replicator", "restore"] {
            assert!(
                !dir.path().join(format!("{legacy}.crt")).exists(),
                "{legacy}.crt"
            );
        }
        let pem = std::fs::read(dir.path().join("agent@h2.crt")).unwrap();
        assert_eq!(
            identity_of_certificate(&pem_der(&pem).unwrap()),
            Some(PeerIdentity {
                role: CertRole::Agent,
                host: Some("h2".into())
            })
        );
        assert_eq!(
            ip_sans(&pem),
            vec![IpAddr::from([10, 0, 0, 2])],
            "h2's address only"
        );
        let op = std::fs::read(dir.path().join("operator.crt")).unwrap();
        assert_eq!(
            identity_of_certificate(&pem_der(&op).unwrap()),
            Some(PeerIdentity {
                role: CertRole::Operator,
                host: None
            })
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("agent@h1.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "keys are private");

        // Again: nothing changes, the CA above all.
        let before = snapshot(dir.path());
        assert_eq!(init_dir(dir.path(), &cfg, None).unwrap(), Issued::default());
        assert_eq!(snapshot(dir.path()), before);

        // A lost certificate is issued again from the dir's CA, alone.
        std::fs::remove_file(dir.path().join("agent@h3.crt")).unwrap();
        let issued = init_dir(dir.path(), &cfg, None).unwrap();
        assert_eq!(
            issued.made,
            vec![CertName::new(CertRole::Agent, Some("h3"))]
        );
        assert!(!issued.new_ca);
        let after = snapshot(dir.path());
        for (file, bytes) in &before {
            if !file.starts_with("agent@h3.") {
                assert_eq!(&after[file], bytes, "{file} was rewritten");
            }
        }
        TlsMaterial::load_dir_for(dir.path(), CertRole::Agent, Some("h3")).unwrap();
    }

    /// A dir made before certificates named hosts (`<role>.crt` only): every daemon
    /// still loads (the host-less file), and `init_dir` tops it up from its own CA
    /// without touching the CA or the old files.
    #[test]
    fn a_legacy_dir_keeps_working_and_is_topped_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = cluster(dir.path());
        let opts = IssueOptions::for_config(&cfg);
        let ca = Ca::generate("t", &opts).unwrap();
        for role in CertRole::ALL {
            let (cert, key) = ca.issue(role, &opts).unwrap();
            let name = CertName::new(role, None);
            write(&name.crt(dir.path()), &cert, false).unwrap();
            write(&name.key(dir.path()), &key, true).unwrap();
        }
        write(&dir.path().join("ca.key"), &ca.key_pem(), true).unwrap();
        write(&dir.path().join("ca.crt"), &ca.cert_pem, false).unwrap();

        let m = TlsMaterial::load_dir_for(dir.path(), CertRole::Agent, Some("h1")).unwrap();
        assert_eq!((m.role, m.host.as_deref()), (CertRole::Agent, None));
        assert!(m.cert_path.ends_with("agent.crt"), "{:?}", m.cert_path);
        cfg.tls.enabled = true;
        init(&cfg, CertRole::CmServer, Some("h1")).expect("a daemon starts on a legacy dir");

        let before = snapshot(dir.path());
        let issued = init_dir(dir.path(), &cfg, None).unwrap();
        assert!(!issued.new_ca);
        assert!(issued
            .made
            .contains(&CertName::new(CertRole::Agent, Some("h1"))));
        assert!(!issued
            .made
            .contains(&CertName::new(CertRole::Operator, None)));
        let after = snapshot(dir.path());
        for (file, bytes) in &before {
            assert_eq!(&after[file], bytes, "{file} was rewritten");
        }
        let m = TlsMaterial::load_dir_for(dir.path(), CertRole::Agent, Some("h1")).unwrap();
        assert_eq!(m.host.as_deref(), Some("h1"));
        assert!(m.cert_path.ends_with("agent@h1.crt"), "{:?}", m.cert_path);
        if let Ok(mut g) = PROCESS.write() {
            *g = None;
        }
    }

    /// A run interrupted before `ca.crt` (the dir's "complete" mark) left certificates
    /// of a CA that was never saved: the next run issues every one afresh.
    #[test]
    fn an_interrupted_init_is_redone_whole() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cluster(dir.path());
        std::fs::write(dir.path().join("agent@h1.crt"), "left over").unwrap();
        let issued = init_dir(dir.path(), &cfg, None).unwrap();
        assert!(issued.new_ca);
        assert!(issued
            .made
            .contains(&CertName::new(CertRole::Agent, Some("h1"))));
        TlsMaterial::load_dir_for(dir.path(), CertRole::Agent, Some("h1"))
            .unwrap()
            .checked()
            .unwrap();
    }

    /// A dir whose CA key is kept elsewhere is topped up only with that CA; without
    /// it, the error names what is missing and how to issue it.
    #[test]
    fn a_top_up_needs_the_dirs_own_ca() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cluster(dir.path());
        let ca = Ca::generate("t", &IssueOptions::for_config(&cfg)).unwrap();
        let kept = tempfile::tempdir().unwrap();
        let (ca_crt, ca_key) = (kept.path().join("ca.crt"), kept.path().join("ca.key"));
        write(&ca_crt, &ca.cert_pem, false).unwrap();
        write(&ca_key, &ca.key_pem(), true).unwrap();
        init_dir(dir.path(), &cfg, Some(ca)).unwrap();
        assert!(
            !dir.path().join("ca.key").exists(),
            "an existing CA's key stays where it was"
        );
        // Complete: nothing to do, no key needed.
        assert_eq!(init_dir(dir.path(), &cfg, None).unwrap(), Issued::default());
        std::fs::remove_file(dir.path().join("gtm@h2.crt")).unwrap();
        let err = init_dir(dir.path(), &cfg, None).unwrap_err().to_string();
        assert!(
            err.contains("gtm@h2.crt") && err.contains("--ca-key"),
            "{err}"
        );
        let other = Ca::generate("x", &IssueOptions::for_config(&cfg)).unwrap();
        let err = init_dir(dir.path(), &cfg, Some(other))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not the CA"), "{err}");
        assert!(!dir.path().join("gtm@h2.crt").exists());
        let ca = Ca::from_files(&ca_crt, &ca_key).unwrap();
        let issued = init_dir(dir.path(), &cfg, Some(ca)).unwrap();
        assert_eq!(issued.made, vec![CertName::new(CertRole::Gtm, Some("h2"))]);
    }

    #[test]
    fn an_existing_ca_signs_the_role_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("t", &opts()).unwrap();
        write(&dir.path().join("my.crt"), &ca.cert_pem, false).unwrap();
        write(&dir.path().join("my.key"), &ca.key_pem(), true).unwrap();
        let loaded =
            Ca::from_files(&dir.path().join("my.crt"), &dir.path().join("my.key")).unwrap();
        let out = dir.path().join("tls");
        let cfg = cluster(&out);
        init_dir(&out, &cfg, Some(loaded)).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("ca.crt")).unwrap(),
            ca.cert_pem
        );
        assert!(
            !out.join("ca.key").exists(),
            "an existing CA's key stays where it was"
        );
    }

    #[test]
    fn a_missing_or_broken_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = TlsMaterial::load_dir(dir.path(), CertRole::Gtm).unwrap_err();
        assert!(err.to_string().contains("ca.crt"), "{err}");
        std::fs::write(dir.path().join("ca.crt"), "hello").unwrap();
        let err = TlsMaterial::load_dir(dir.path(), CertRole::Gtm).unwrap_err();
        assert!(err.to_string().contains("not a PEM file"), "{err}");
    }

    /// A peer that accepts TCP but never answers the TLS handshake (a SIGSTOPped
    /// server: its kernel still completes the TCP handshake) fails a connect within
    /// the connect timeout, as an unreachable one does.
    #[tokio::test]
    async fn a_handshake_with_a_silent_peer_is_bounded_by_the_connect_timeout() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path(), &cluster(dir.path()), None).unwrap();
        let m = TlsMaterial::load_dir(dir.path(), CertRole::Operator).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and holds the connections, never writes a byte.
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                conns.push(c);
            }
        });
        let timeout = Duration::from_millis(300);
        let ep = endpoint_with(Some(&m), &addr.to_string(), CertRole::Gtm, timeout).unwrap();
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), ep.connect()).await;
        let elapsed = started.elapsed();
        held.abort();
        let r = r.expect("the connect must give up by itself, not hang");
        assert!(r.is_err(), "a silent peer cannot complete a handshake");
        assert!(
            elapsed < Duration::from_secs(3),
            "gave up after {elapsed:?}, connect timeout {timeout:?}"
        );
    }
}
