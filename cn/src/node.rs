//! The CN process's shared state: config, catalog, DN topology, pool, GTM client,
//! users, and the facts the resolver and the gRPC service need.

use ha_common::metrics::prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::Instant;

use async_trait::async_trait;
use gtm::client::GtmClient;
use ha_common::ClusterConfig;
use pgwire::api::auth::sasl::scram::gen_salted_password;
use pgwire::api::auth::{AuthSource, LoginInfo, Password};
use pgwire::api::results::{FieldFormat, FieldInfo};
use pgwire::api::Type;
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};

use crate::catalog::{Catalog, CatalogError, CatalogStore, Change};
use crate::dn::{DnError, Pool, Target};

pub const SCRAM_ITERATIONS: usize = 4096;

/// Parameter types and result columns of a statement.
type Described = (Vec<Type>, Vec<FieldInfo>);

/// Users from the config with their SCRAM salted passwords (computed once at start).
#[derive(Debug)]
pub struct UserAuth {
    users: HashMap<String, (Vec<u8>, Vec<u8>)>,
}

impl UserAuth {
    /// Reads every user's password (its `password_file`; a missing or empty file is
    /// an error naming it) and salts it.
    pub fn new(cfg: &ClusterConfig) -> Result<UserAuth, ha_common::dn_auth::DnAuthError> {
        let mut users = HashMap::new();
        for u in &cfg.users {
            if u.password.is_some() {
                tracing::warn!(
                    user = %u.name,
                    "[[user]] password in the clear is deprecated: put it in a file named by password_file (default {})",
                    ha_common::dn_auth::user_password_file(cfg, u).display()
                );
            }
            let password = ha_common::dn_auth::user_password(cfg, u)?;
            let salt: [u8; 16] = rand::random();
            let salted = gen_salted_password(&password, &salt, SCRAM_ITERATIONS);
            users.insert(u.name.clone(), (salt.to_vec(), salted));
        }
        Ok(UserAuth { users })
    }
}

#[async_trait]
impl AuthSource for UserAuth {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let user = login.user().unwrap_or_default();
        match self.users.get(user) {
            Some((salt, salted)) => Ok(Password::new(Some(salt.clone()), salted.clone())),
            None => Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                "FATAL".into(),
                "28P01".into(),
                format!("password authentication failed for user \"{user}\""),
            )))),
        }
    }
}

/// A CN of the DDL set other than this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// `http://address:rpc_port`
    pub rpc: String,
    pub catalog_version: u64,
}

/// Where each DN member's Unix-domain socket is if it runs on this host: the agent
/// puts it in the member's instance dir (`unix_socket_directories`), a path that exists
/// only on the member's host. pg_hba trusts that socket (it is reachable only by the
/// PostgreSQL OS user and root), so no password is asked there.
fn local_dn_sockets(cfg: &ClusterConfig) -> HashMap<(String, u16), PathBuf> {
    cfg.dn_groups
        .iter()
        .flat_map(|g| g.members.iter())
        .map(|m| {
            (
                (cfg.address_of(m).to_owned(), m.port()),
                cfg.instance_dir(&m.name)
                    .join(format!(".s.PGSQL.{}", m.port())),
            )
        })
        .collect()
}

pub struct Node {
    pub name: String,
    pub cfg: ClusterConfig,
    pub state_dir: PathBuf,
    pub store: CatalogStore,
    catalog: RwLock<Catalog>,
    topology: RwLock<Vec<Target>>,
    pub pool: Arc<Pool>,
    pub gtm: GtmClient,
    pub auth: Arc<UserAuth>,
    /// Sessions by their BackendKeyData, for cancel requests.
    pub cancels: Arc<crate::cancel::Registry>,
    /// One DDL at a time from this CN.
    pub ddl_lock: tokio::sync::Mutex<()>,
    /// gids this process is committing right now (the resolver leaves them alone).
    pub in_flight: Mutex<HashSet<String>>,
    /// The DDL set from the CMServer (None until a CMServer answers CnSync: then the
    /// config's other CNs).
    peers: RwLock<Option<Vec<Peer>>>,
    accepting: AtomicBool,
    pub cm_term: AtomicU64,
    describe_cache: Mutex<HashMap<(String, Vec<Type>), Described>>,
    /// Plan templates by statement shape (the hot path plans without sqlparser).
    pub plans: crate::plan_cache::PlanCache,
    /// When the resolver first saw another CN's prepared catalog change.
    pub seen_prepared: Mutex<HashMap<String, Instant>>,
    /// Test-only fault point (`MPP_CN_FAULT`), read at start.
    fault: Option<String>,
    /// Prometheus counters (atomics).
    pub counters: CnCounters,
}

/// What a CN counts for /metrics.
#[derive(Clone, Default)]
pub struct CnCounters {
    pub ddl: Counter,
    pub two_phase_commits: Counter,
    /// Prepared transactions on the DN primaries at the resolver's last pass.
    pub in_doubt: Gauge,
    pub in_doubt_oldest_seconds: Gauge,
    /// Finished by the resolver.
    pub resolved: Counter,
}

impl CnCounters {
    pub fn register(&self, reg: &mut ha_common::metrics::prometheus_client::registry::Registry) {
        reg.register(
            "ddl",
            "DDL statements committed through this CN (2PC on every group)",
            self.ddl.clone(),
        );
        reg.register(
            "two_phase_commits",
            "Multi-group transactions this CN committed by 2PC",
            self.two_phase_commits.clone(),
        );
        reg.register(
            "in_doubt_transactions",
            "Prepared (in-doubt) transactions on the DN primaries at the resolver's last pass",
            self.in_doubt.clone(),
        );
        reg.register(
            "in_doubt_oldest_seconds",
            "Age of the oldest in-doubt transaction at the resolver's last pass",
            self.in_doubt_oldest_seconds.clone(),
        );
        reg.register(
            "in_doubt_resolved",
            "In-doubt transactions this CN's resolver finished",
            self.resolved.clone(),
        );
    }
}

impl Node {
    pub fn new(
        name: &str,
        cfg: ClusterConfig,
        state_dir: PathBuf,
        catalog: Catalog,
        gtm: GtmClient,
        auth: UserAuth,
    ) -> Node {
        let topology = cfg
            .dn_groups
            .iter()
            .map(|g| {
                let p = g.member_with_role(ha_common::Role::Primary);
                Target {
                    group: g.name.clone(),
                    host: p.map(|m| cfg.address_of(m).to_owned()).unwrap_or_default(),
                    port: p.map(|m| m.port()).unwrap_or(0),
                    available: p.is_some(),
                }
            })
            .collect();
        // The admin role (superuser): the CN runs every client's statements and
        // finishes 2PC transactions other sessions prepared (see ha_common::dn_auth).
        let admin = ha_common::dn_auth::DnRole::Admin;
        let password_file = ha_common::dn_auth::password_file(&cfg, admin);
        let timeout = cfg.timing.probe_timeout();
        Node {
            name: name.to_owned(),
            auth: Arc::new(auth),
            cancels: Arc::default(),
            store: CatalogStore::new(&state_dir),
            state_dir,
            catalog: RwLock::new(catalog),
            topology: RwLock::new(topology),
            pool: Pool::new(
                admin.name(),
                Some(password_file),
                timeout,
                local_dn_sockets(&cfg),
            ),
            gtm,
            ddl_lock: tokio::sync::Mutex::new(()),
            in_flight: Mutex::new(HashSet::new()),
            peers: RwLock::new(None),
            accepting: AtomicBool::new(false),
            cm_term: AtomicU64::new(0),
            describe_cache: Mutex::new(HashMap::new()),
            plans: Default::default(),
            seen_prepared: Mutex::new(HashMap::new()),
            fault: std::env::var("MPP_CN_FAULT").ok().filter(|s| !s.is_empty()),
            counters: CnCounters::default(),
            cfg,
        }
    }

    /// Test-only fault point for the next DDL: `MPP_CN_FAULT` (read at start), or the
    /// file `<state_dir>/test_fault` (read once and removed, so that a CN restarted by
    /// its agent does not repeat it).
    pub fn take_fault(&self) -> Option<String> {
        if self.fault.is_some() {
            return self.fault.clone();
        }
        let path = self.state_dir.join("test_fault");
        let text = std::fs::read_to_string(&path).ok()?;
        let _ = std::fs::remove_file(&path);
        let f = text.trim().to_owned();
        (!f.is_empty()).then_some(f)
    }

    pub fn catalog_read(&self) -> RwLockReadGuard<'_, Catalog> {
        self.catalog.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    pub fn set_accepting(&self, v: bool) {
        self.accepting.store(v, Ordering::SeqCst);
    }

    pub fn target(&self, g: usize) -> Result<Target, DnError> {
        let t = self.topology.read().unwrap_or_else(|p| p.into_inner());
        t.get(g)
            .cloned()
            .ok_or_else(|| DnError::new("XX000", format!("no DN group #{g} in the topology")))
    }

    /// Applies the DN primaries a CMServer reported (by group name).
    pub fn set_primaries(&self, primaries: &[Target]) {
        let mut t = self.topology.write().unwrap_or_else(|p| p.into_inner());
        for p in primaries {
            if let Some(slot) = t.iter_mut().find(|x| x.group == p.group) {
                if *slot != *p {
                    tracing::info!(group = %p.group, host = %p.host, port = p.port, available = p.available, "DN primary changed");
                    *slot = p.clone();
                }
            }
        }
    }

    pub fn set_peers(&self, peers: Vec<Peer>) {
        *self.peers.write().unwrap_or_else(|p| p.into_inner()) = Some(peers);
    }

    /// The other CNs that must prepare every catalog change.
    pub fn ddl_peers(&self) -> Vec<Peer> {
        if let Some(p) = self.peers.read().unwrap_or_else(|p| p.into_inner()).clone() {
            return p;
        }
        self.config_peers()
    }

    pub fn config_peers(&self) -> Vec<Peer> {
        self.cfg
            .cns
            .iter()
            .filter(|c| c.name != self.name)
            .map(|c| Peer {
                name: c.name.clone(),
                rpc: format!("http://{}:{}", self.cfg.address_of(c), c.rpc_port()),
                catalog_version: 0,
            })
            .collect()
    }

    pub fn prepare_catalog(
        &self,
        gid: &str,
        base: u64,
        change: Change,
    ) -> Result<u64, CatalogError> {
        let mut c = self.catalog.write().unwrap_or_else(|p| p.into_inner());
        let mut next = c.clone();
        next.prepare(gid, base, change)?;
        self.store.save(&next)?;
        *c = next;
        Ok(c.version)
    }

    pub fn finish_catalog(&self, gid: &str, commit: bool) -> Result<u64, CatalogError> {
        let mut c = self.catalog.write().unwrap_or_else(|p| p.into_inner());
        let mut next = c.clone();
        if next.finish(gid, commit) {
            self.store.save(&next)?;
            *c = next;
        }
        self.clear_describe_cache();
        Ok(c.version)
    }

    /// Replaces the whole catalog (copied from a peer).
    pub fn replace_catalog(&self, new: Catalog) -> Result<(), CatalogError> {
        let mut c = self.catalog.write().unwrap_or_else(|p| p.into_inner());
        self.store.save(&new)?;
        *c = new;
        self.clear_describe_cache();
        Ok(())
    }

    /// Forgets what was learnt about statements under the catalog before a change:
    /// descriptions and plan templates.
    pub fn clear_describe_cache(&self) {
        self.plans.clear();
        self.describe_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Parameter types and result columns of a statement, as a DN primary describes it
    /// (cached until the next DDL).
    pub async fn describe(&self, sql: &str, given: &[Type]) -> (Vec<Type>, Vec<FieldInfo>) {
        let key = (sql.to_owned(), given.to_vec());
        if let Some(v) = self
            .describe_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return v.clone();
        }
        let text = match crate::distribute_clause::strip(sql) {
            Ok((t, _)) => t,
            Err(_) => sql.to_owned(),
        };
        let described = async {
            let target = self.target(0).ok()?;
            let mut c = self.pool.get(0, &target).await.ok()?;
            let oids: Vec<u32> = given.iter().map(Type::oid).collect();
            let r = c.describe(&target.group, &text, &oids).await;
            self.pool.put(c).await;
            let d = r.ok()?;
            let fields = d
                .columns
                .iter()
                .map(|col| crate::dn::field_info(col, FieldFormat::Text))
                .collect::<Vec<_>>();
            Some((
                d.params.into_iter().map(crate::dn::pg_type).collect(),
                fields,
            ))
        }
        .await;
        match described {
            Some(v) => {
                self.describe_cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, v.clone());
                v
            }
            None => (given.to_vec(), Vec::new()),
        }
    }
}
