//! Prometheus metrics: one registry per daemon (names prefixed `mpp_ha_`), and the small HTTP server that serves `/metrics` beside the daemon's health endpoints.
//!
//! Metrics are atomics (prometheus-client counters and gauges), so a hot path pays one
//! relaxed atomic add; label families are touched only off the hot paths.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Every metric name starts with this (and `_`).
pub const PREFIX: &str = "mpp_ha";

/// Re-exported so that daemons register metrics without their own dependency.
pub use prometheus_client;

/// Label pairs of a family member.
pub type Labels = Vec<(String, String)>;

/// A gauge family keyed by label pairs.
pub type GaugeFamily = Family<Labels, Gauge>;
/// A float gauge family (ages, durations).
pub type FloatGaugeFamily = Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>;
/// A counter family keyed by label pairs.
pub type CounterFamily = Family<Labels, Counter>;

/// The content type Prometheus expects for the text format.
const TEXT_FORMAT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A new, empty registry with the project's prefix.
pub fn registry() -> Registry {
    Registry::with_prefix(PREFIX)
}

/// Builds a label set from `(name, value)` pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// What an endpoint answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl HttpReply {
    pub fn text(status: u16, body: impl Into<String>) -> HttpReply {
        HttpReply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn html(status: u16, body: impl Into<String>) -> HttpReply {
        HttpReply {
            status,
            content_type: "text/html; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn json(status: u16, body: impl Into<String>) -> HttpReply {
        HttpReply {
            status,
            content_type: "application/json",
            body: body.into(),
        }
    }
}

impl IntoResponse for HttpReply {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            [(header::CONTENT_TYPE, self.content_type)],
            self.body,
        )
            .into_response()
    }
}

/// A boxed future, for handlers and scrape hooks.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// A GET endpoint.
pub type Handler = Arc<dyn Fn() -> BoxFuture<HttpReply> + Send + Sync>;
/// Runs before every scrape (to refresh gauges computed from the daemon's state).
pub type ScrapeHook = Arc<dyn Fn() -> BoxFuture<()> + Send + Sync>;

/// Wraps an async closure as a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HttpReply> + Send + 'static,
{
    Arc::new(move || Box::pin(f()))
}

/// The HTTP side of a daemon: `/metrics` plus the daemon's own GET endpoints.
pub struct HttpServer {
    registry: Arc<Registry>,
    hook: Option<ScrapeHook>,
    routes: Vec<(&'static str, Handler)>,
}

impl HttpServer {
    pub fn new(registry: Registry) -> HttpServer {
        HttpServer {
            registry: Arc::new(registry),
            hook: None,
            routes: Vec::new(),
        }
    }

    /// Refreshes computed gauges before each `/metrics` answer.
    pub fn before_scrape(mut self, hook: ScrapeHook) -> HttpServer {
        self.hook = Some(hook);
        self
    }

    /// Adds `GET path`.
    pub fn route(mut self, path: &'static str, h: Handler) -> HttpServer {
        self.routes.push((path, h));
        self
    }

    /// The `/metrics` text now (what a scrape gets).
    pub async fn scrape(&self) -> String {
        scrape(&self.registry, self.hook.as_ref()).await
    }

    fn router(self) -> Router {
        let registry = self.registry;
        let hook = self.hook;
        let mut router = Router::new().route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                let hook = hook.clone();
                async move {
                    HttpReply {
                        status: 200,
                        content_type: TEXT_FORMAT,
                        body: scrape(&registry, hook.as_ref()).await,
                    }
                }
            }),
        );
        for (path, h) in self.routes {
            router = router.route(path, get(move || h()));
        }
        router
    }

    /// Serves on `addr` in the background. A port that cannot be bound is logged and
    /// tried again every few seconds: metrics must never stop a daemon from serving.
    pub fn spawn(self, name: &str, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
        let router = self.router();
        let name = name.to_owned();
        tokio::spawn(async move {
            let mut warned = false;
            let listener = loop {
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => break l,
                    Err(e) => {
                        if !warned {
                            tracing::error!(%addr, "{name}: cannot listen for metrics on {addr}: {e} (retrying)");
                            warned = true;
                        }
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            };
            tracing::info!(%addr, "{name}: metrics on http://{addr}/metrics");
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!("{name}: metrics server stopped: {e}");
            }
        })
    }

    /// Serves on the address named by `host:port` (resolved once); does nothing when
    /// `endpoint` is None (no metrics_port configured).
    pub async fn spawn_at(
        self,
        name: &str,
        endpoint: Option<String>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let endpoint = endpoint?;
        match tokio::net::lookup_host(endpoint.as_str())
            .await
            .map(|mut a| a.next())
        {
            Ok(Some(addr)) => Some(self.spawn(name, addr)),
            Ok(None) => {
                tracing::error!("{name}: metrics endpoint {endpoint} has no address");
                None
            }
            Err(e) => {
                tracing::error!("{name}: cannot resolve metrics endpoint {endpoint}: {e}");
                None
            }
        }
    }
}

async fn scrape(registry: &Registry, hook: Option<&ScrapeHook>) -> String {
    if let Some(h) = hook {
        h().await;
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

/// The metrics every daemon has: which role and state each of its instances is in and
/// the term it last saw.
#[derive(Clone, Default)]
pub struct InstanceMetrics {
    role: GaugeFamily,
    state: GaugeFamily,
    term: GaugeFamily,
}

impl InstanceMetrics {
    /// Registers `instance_role`, `instance_state` and `instance_term`.
    pub fn register(registry: &mut Registry) -> InstanceMetrics {
        let m = InstanceMetrics::default();
        registry.register(
            "instance_role",
            "1 for the role (primary/standby/secondary/...) an instance is in",
            m.role.clone(),
        );
        registry.register(
            "instance_state",
            "1 for the state (normal/down/...) an instance is in",
            m.state.clone(),
        );
        registry.register(
            "instance_term",
            "The term (fencing epoch) an instance last saw",
            m.term.clone(),
        );
        m
    }

    /// `instance` is now in `role` (the previous role's series is removed).
    pub fn set_role(&self, instance: &str, role: &str) {
        set_one_of(&self.role, instance, "role", role);
    }

    /// `instance` is now in `state`.
    pub fn set_state(&self, instance: &str, state: &str) {
        set_one_of(&self.state, instance, "state", state);
    }

    pub fn set_term(&self, instance: &str, term: u64) {
        self.term
            .get_or_create(&labels(&[("node", instance)]))
            .set(term as i64);
    }
}

/// Keeps exactly one series `{instance, key=value}` at 1 for `instance`.
fn set_one_of(family: &GaugeFamily, instance: &str, key: &str, value: &str) {
    let wanted = labels(&[("node", instance), (key, value)]);
    if family.get_or_create(&wanted).get() == 1 {
        return;
    }
    // A role change is rare: rebuilding the family's other series for this instance
    // is cheap. The family has no iterator, so the few known values are removed.
    for v in KNOWN_VALUES {
        if *v != value {
            family.remove(&labels(&[("node", instance), (key, v)]));
        }
    }
    family.get_or_create(&wanted).set(1);
}

/// Roles and states a daemon may report of itself.
const KNOWN_VALUES: &[&str] = &[
    "primary",
    "standby",
    "secondary",
    "pending",
    "unknown",
    "normal",
    "down",
    "stopped",
    "starting",
    "degraded",
    "catching_up",
    "alone",
    "idle",
    "streaming",
    "holding",
    "accepting",
    "not_accepting",
];

/// A plain `GET path` to `addr` (`host:port`), for tests and tools: the status code
/// and the body. Bounded by `timeout`.
pub async fn http_get(addr: &str, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    };
    let text = tokio::time::timeout(timeout, work).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("GET {addr}{path} timed out"),
        )
    })??;
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("GET {addr}{path}: not an HTTP answer"),
        )
    };
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .ok_or_else(bad)?;
    Ok((status, body))
}

/// The names (with prefix) a text exposition defines (`# TYPE name ...`), for tests
/// and the dashboard check.
pub fn metric_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The family names (with prefix) registered in `registry`, whether or not they have a
/// series yet. The text exposition cannot say this: prometheus-client leaves a family
/// with no series out entirely (not even its `# TYPE` line), and a freshly started daemon
/// has many such (a failover counter before the first failover). The registry has no
/// public iterator, so this reads the descriptors from its `Debug` form; the unit test
/// `registered_names_include_empty_families` pins that form, so an upgrade of
/// prometheus-client that changes it fails there, not silently in the dashboard check.
pub fn registered_names(registry: &Registry) -> Vec<String> {
    let text = format!("{registry:?}");
    let prefix = text
        .split_once("prefix: Some(Prefix(\"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(p, _)| format!("{p}_"))
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some((_, tail)) = rest.split_once("Descriptor { name: \"") {
        let Some((name, tail)) = tail.split_once('"') else {
            break;
        };
        out.push(format!("{prefix}{name}"));
        rest = tail;
    }
    out
}

/// The series names a scrape may show for family `name`: itself, and the suffixes the
/// text format adds (`_total` for counters; `_bucket`, `_sum`, `_count` for histograms).
/// The type of an empty family is not visible (see [`registered_names`]), so every
/// suffix is allowed: a dashboard naming `x_total` of a gauge `x` would pass, a
/// misspelt or removed name would not.
pub fn series_names(name: &str) -> Vec<String> {
    ["", "_total", "_bucket", "_sum", "_count"]
        .iter()
        .map(|s| format!("{name}{s}"))
        .collect()
}

/// The value of the first sample of `name` whose labels contain every `(k, v)` of
/// `with`; None if there is none.
pub fn sample(text: &str, name: &str, with: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, labels) = match series.split_once('{') {
            Some((m, l)) => (m, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        if with
            .iter()
            .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
        {
            return value.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scrape_has_prefix_and_one_role_per_instance() {
        let mut reg = registry();
        let m = InstanceMetrics::register(&mut reg);
        let gx = Counter::<u64>::default();
        reg.register("gxids_handed_out", "GXIDs", gx.clone());
        m.set_role("gtm1", "standby");
        m.set_role("gtm1", "primary");
        m.set_term("gtm1", 3);
        gx.inc_by(5);
        let text = HttpServer::new(reg).scrape().await;
        assert!(metric_names(&text).contains(&"mpp_ha_instance_role".to_owned()));
        assert_eq!(
            sample(
                &text,
                "mpp_ha_instance_role",
                &[("node", "gtm1"), ("role", "primary")]
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "mpp_ha_instance_role", &[("role", "standby")]),
            None,
            "the old role's series is gone: {text}"
        );
        assert_eq!(sample(&text, "mpp_ha_instance_term", &[]), Some(3.0));
        assert_eq!(
            sample(&text, "mpp_ha_gxids_handed_out_total", &[]),
            Some(5.0)
        );
    }

    #[tokio::test]
    async fn registered_names_include_empty_families() {
        let mut reg = registry();
        let _m = InstanceMetrics::register(&mut reg);
        reg.register("failovers", "Failovers", CounterFamily::default());
        let text = HttpServer::new(reg).scrape().await;
        assert!(
            !text.contains("failovers"),
            "an empty family is left out of a scrape: {text}"
        );
        let mut reg = registry();
        let _m = InstanceMetrics::register(&mut reg);
        reg.register("failovers", "Failovers", CounterFamily::default());
        assert_eq!(
            registered_names(&reg),
            vec![
                "mpp_ha_instance_role",
                "mpp_ha_instance_state",
                "mpp_ha_instance_term",
                "mpp_ha_failovers"
            ]
        );
        assert!(series_names("mpp_ha_failovers").contains(&"mpp_ha_failovers_total".to_owned()));
    }

    #[tokio::test]
    async fn serves_metrics_and_routes_over_http() {
        let mut reg = registry();
        let m = InstanceMetrics::register(&mut reg);
        m.set_state("x", "normal");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let server =
            HttpServer::new(reg).route("/health", handler(|| async { HttpReply::text(503, "no") }));
        let task = server.spawn("test", addr);
        let get = |path: &'static str| async move {
            let a = addr.to_string();
            for _ in 0..100 {
                if let Ok((code, body)) = http_get(&a, path, Duration::from_secs(5)).await {
                    return format!("{code}\n{body}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("metrics server did not come up");
        };
        let metrics = get("/metrics").await;
        assert!(metrics.starts_with("200"), "{metrics}");
        assert!(metrics.contains("mpp_ha_instance_state{node=\"x\",state=\"normal\"} 1"));
        let health = get("/health").await;
        assert!(health.starts_with("503"), "{health}");
        let missing = get("/nope").await;
        assert!(missing.starts_with("404"), "{missing}");
        task.abort();
    }
}
