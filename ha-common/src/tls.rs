//! Mutual TLS on every gRPC link: the cluster CA, one certificate per role, and the role a peer's certificate names.
//!
//! Every certificate is signed by the cluster CA and names its role twice: in the
//! subject (`OU=role=<role>`) for authorization, and as the DNS name `<role>.mpp-ha`
//! that a client checks when it connects (a client of the CMServer refuses a server
//! that does not hold a `cmserver` certificate). A process loads its own role's
//! material once (`init`); every channel and server is then built here (`endpoint`,
//! `server`), so no link can be plaintext while `[tls] enabled = true`.
//!
//! Files in `tls.dir` (default `<base_dir>/tls`): `ca.crt` (and `ca.key`, kept by the
//! operator who issues), `<role>.crt` and `<role>.key` for each role.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

use crate::ClusterConfig;

/// Which part of the cluster a certificate belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// One role's CA, certificate and key, as PEM.
#[derive(Clone)]
pub struct TlsMaterial {
    pub role: CertRole,
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("TlsMaterial")
            .field("role", &self.role)
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
    /// `role`'s material from `dir` (`ca.crt`, `<role>.crt`, `<role>.key`).
    pub fn load_dir(dir: &Path, role: CertRole) -> Result<TlsMaterial, TlsError> {
        Ok(TlsMaterial {
            role,
            ca: read(&dir.join("ca.crt"))?,
            cert: read(&dir.join(format!("{role}.crt")))?,
            key: read(&dir.join(format!("{role}.key")))?,
        })
    }

    /// `role`'s material from the config's `tls.dir`; `None` when `[tls]` is off.
    pub fn load(cfg: &ClusterConfig, role: CertRole) -> Result<Option<TlsMaterial>, TlsError> {
        if !cfg.tls.enabled {
            return Ok(None);
        }
        Self::load_dir(&cfg.tls_dir(), role).map(Some)
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

/// Loads this process's material (`role`) from the config and checks that the
/// certificate and key make a usable TLS configuration. Each binary calls it once
/// after loading its config (a test process again for each cluster it makes).
pub fn init(cfg: &ClusterConfig, role: CertRole) -> Result<(), TlsError> {
    let loaded = match TlsMaterial::load(cfg, role)? {
        None => None,
        Some(m) => Some(m.checked(&cfg.tls_dir())?),
    };
    if let Ok(mut g) = PROCESS.write() {
        *g = loaded.map(|(m, s)| (Arc::new(m), s));
    }
    Ok(())
}

impl TlsMaterial {
    /// Builds the server and a client configuration once, so that a bad certificate or
    /// key is reported at start and not at the first connection.
    pub fn checked(self, dir: &Path) -> Result<(TlsMaterial, Server), TlsError> {
        let bad = |e: tonic::transport::Error| TlsError::Invalid {
            path: dir.join(format!("{}.crt", self.role)),
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

/// A server builder with this process's TLS when it is on.
pub fn server() -> Server {
    match process() {
        None => Server::builder(),
        Some((_, server)) => server,
    }
}

/// The role named by a certificate (DER): its subject's `OU=role=<role>`.
pub fn role_of_certificate(der: &[u8]) -> Option<CertRole> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    for ou in subject.iter_organizational_unit() {
        if let Some(role) = ou
            .as_str()
            .ok()
            .and_then(|s| s.strip_prefix("role="))
            .and_then(CertRole::parse)
        {
            return Some(role);
        }
    }
    None
}

/// Refuses a request whose peer certificate names none of `allowed` (a CMServer
/// takes orders only from operators, reports only from agents). With TLS off there
/// is no certificate to check and everything is allowed.
#[allow(clippy::result_large_err)]
pub fn require_role<T>(
    request: &tonic::Request<T>,
    allowed: &[CertRole],
) -> Result<(), tonic::Status> {
    if !enabled() {
        return Ok(());
    }
    let role = request
        .peer_certs()
        .and_then(|certs| certs.first().and_then(|c| role_of_certificate(c)));
    match role {
        Some(r) if allowed.contains(&r) => Ok(()),
        Some(r) => Err(tonic::Status::permission_denied(format!(
            "a {r} certificate may not call this; it needs a {} certificate",
            names(allowed)
        ))),
        None => Err(tonic::Status::unauthenticated(format!(
            "no client certificate naming a role; this needs a {} certificate",
            names(allowed)
        ))),
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
    let role = request
        .peer_certs()
        .and_then(|certs| certs.first().and_then(|c| role_of_certificate(c)));
    if role == Some(CertRole::Restore) {
        return Err(tonic::Status::permission_denied(
            "a restore certificate may only read WAL from a DN secondary",
        ));
    }
    Ok(request)
}

/// Hands `restore.crt` and `restore.key` in `dir` to the OS user (mode 0644 and 0600):
/// PostgreSQL runs `dn_replicator restore-wal` as that user, which may read no other
/// key. `cm_ctl cert init` and `cm_ctl local up` call it after `init_dir`.
pub fn give_restore_identity(dir: &Path, os_user: &str) -> Result<(), TlsError> {
    let role = CertRole::Restore;
    for (file, mode) in [
        (format!("{role}.crt"), 0o644),
        (format!("{role}.key"), 0o600),
    ] {
        let path = dir.join(file);
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

/// What `issue` makes: validity and the addresses server certificates answer on.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// IP addresses put in every certificate (the cluster's host addresses).
    pub addresses: Vec<IpAddr>,
    /// Days from today the certificates are valid for.
    pub valid_days: i64,
    /// Days before today the validity starts (negative `valid_days` + this = expired).
    pub backdate_days: i64,
}

impl IssueOptions {
    /// Addresses of the config's hosts (plus loopback), valid ten years.
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
            valid_days: 3650,
            backdate_days: 1,
        }
    }
}

/// A CA (certificate + key, PEM) that signs role certificates.
pub struct Ca {
    pub cert_pem: String,
    key_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

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

    /// A certificate (PEM cert, PEM key) for `role`, signed by this CA.
    pub fn issue(&self, role: CertRole, opts: &IssueOptions) -> Result<(String, String), TlsError> {
        let mut params =
            rcgen::CertificateParams::new(vec![role.server_name(), "localhost".to_owned()])
                .map_err(issue_err)?;
        for ip in &opts.addresses {
            params
                .subject_alt_names
                .push(rcgen::SanType::IpAddress(*ip));
        }
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, role.server_name());
        params.distinguished_name.push(
            rcgen::DnType::OrganizationalUnitName,
            format!("role={role}"),
        );
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

/// Issues `role`'s certificate into a complete `dir` that lacks it (one made before
/// the role existed), signed by the dir's own CA (`ca.key` must be there). Returns
/// whether it made one; a dir whose CA key is elsewhere is left alone.
pub fn add_missing_role(dir: &Path, role: CertRole, opts: &IssueOptions) -> Result<bool, TlsError> {
    let (crt, key, ca_key) = (
        dir.join(format!("{role}.crt")),
        dir.join(format!("{role}.key")),
        dir.join("ca.key"),
    );
    if crt.exists() || !ca_key.exists() {
        return Ok(false);
    }
    let ca = Ca::from_files(&dir.join("ca.crt"), &ca_key)?;
    let (cert, private) = ca.issue(role, opts)?;
    write(&key, &private, true)?;
    write(&crt, &cert, false)?;
    Ok(true)
}

/// Makes `dir` hold a CA (`ca` if given, else a new one) and one certificate per role.
/// Refuses a dir that already holds a `ca.crt` (never overwrites a cluster's CA).
pub fn init_dir(
    dir: &Path,
    cluster: &str,
    ca: Option<Ca>,
    opts: &IssueOptions,
) -> Result<(), TlsError> {
    let ca_path = dir.join("ca.crt");
    if ca_path.exists() {
        return Err(TlsError::Invalid {
            path: ca_path,
            problem: "already exists; remove the directory to make new certificates".into(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let (ca, own_ca) = match ca {
        Some(ca) => (ca, false),
        None => (Ca::generate(cluster, opts)?, true),
    };
    for role in CertRole::ALL {
        let (cert, key) = ca.issue(role, opts)?;
        write(&dir.join(format!("{role}.crt")), &cert, false)?;
        write(&dir.join(format!("{role}.key")), &key, true)?;
    }
    if own_ca {
        write(&dir.join("ca.key"), &ca.key_pem(), true)?;
    }
    // ca.crt last: its presence says the dir is complete.
    write(&ca_path, &ca.cert_pem, false)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> IssueOptions {
        IssueOptions {
            addresses: vec![IpAddr::from([127, 0, 0, 1])],
            valid_days: 10,
            backdate_days: 1,
        }
    }

    #[test]
    fn each_certificate_names_its_role() {
        let ca = Ca::generate("t", &opts()).unwrap();
        for role in CertRole::ALL {
            let (pem, _) = ca.issue(role, &opts()).unwrap();
            let der = pem_to_der(&pem);
            assert_eq!(role_of_certificate(&der), Some(role));
        }
        assert_eq!(role_of_certificate(b"garbage"), None);
    }

    #[test]
    fn init_dir_refuses_to_overwrite_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path(), "t", None, &opts()).unwrap();
        let before = std::fs::read(dir.path().join("ca.crt")).unwrap();
        let err = init_dir(dir.path(), "t", None, &opts()).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(std::fs::read(dir.path().join("ca.crt")).unwrap(), before);
        let m = TlsMaterial::load_dir(dir.path(), CertRole::Agent).unwrap();
        assert_eq!(m.role, CertRole::Agent);
        // A dir made before a role existed gets it from its own CA, once.
        assert!(!add_missing_role(dir.path(), CertRole::Restore, &opts()).unwrap());
        std::fs::remove_file(dir.path().join("restore.crt")).unwrap();
        assert!(add_missing_role(dir.path(), CertRole::Restore, &opts()).unwrap());
        let pem = std::fs::read_to_string(dir.path().join("restore.crt")).unwrap();
        assert_eq!(
            role_of_certificate(&pem_to_der(&pem)),
            Some(CertRole::Restore)
        );
        TlsMaterial::load_dir(dir.path(), CertRole::Restore).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("agent.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "keys are private");
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
        init_dir(&out, "t", Some(loaded), &opts()).unwrap();
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
        init_dir(dir.path(), "t", None, &opts()).unwrap();
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

    fn pem_to_der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }
}
