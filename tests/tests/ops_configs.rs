//! `configs/grafana-dashboard.json` and `configs/prometheus-alerts.yml` name only metrics that some daemon registers (CMServer, GTM, CN, DN secondary, cm_agent): a renamed metric breaks this test, not the operator's dashboard.

use std::collections::BTreeSet;

use ha_common::metrics::prometheus_client::registry::Registry;
use ha_common::metrics::{registered_names, registry, series_names};

/// Every series name a scrape of any daemon may contain, read from each registry's
/// descriptors (a scrape leaves out families with no series yet, e.g. failovers before
/// the first one), with the suffixes the text format derives (`_total`, `_bucket`, ...).
fn registered() -> BTreeSet<String> {
    let mut regs: Vec<Registry> = Vec::new();
    let mut r = registry();
    cm_server::metrics::CmsMetrics::register(&mut r);
    regs.push(r);
    let mut r = registry();
    gtm::server::register_metrics(&mut r, &gtm::node::GtmCounters::default());
    regs.push(r);
    let mut r = registry();
    ha_common::metrics::InstanceMetrics::register(&mut r);
    cn::node::CnCounters::default().register(&mut r);
    regs.push(r);
    let mut r = registry();
    dn_replicator::service::register_metrics(&mut r);
    regs.push(r);
    let mut r = registry();
    cm_agent::metrics::AgentMetrics::register(&mut r);
    regs.push(r);
    let mut out = BTreeSet::new();
    for r in regs {
        let names = registered_names(&r);
        assert!(!names.is_empty(), "a daemon's registry lists no metric");
        for n in names {
            out.extend(series_names(&n));
        }
    }
    out
}

/// The `mpp_ha_...` names in a PromQL expression.
fn names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("mpp_ha_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

fn config(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../configs")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[tokio::test]
async fn every_dashboard_panel_uses_registered_metrics() {
    let known = registered();
    let dash: serde_json::Value =
        serde_json::from_str(&config("grafana-dashboard.json")).expect("dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels[]");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        let targets = p["targets"].as_array().expect("targets[]");
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let names = names_in(expr);
            assert!(
                !names.is_empty(),
                "panel {title:?}: {expr:?} names no mpp_ha metric"
            );
            for n in names {
                assert!(
                    known.contains(&n),
                    "panel {title:?} uses {n}, which no daemon registers; known: {known:?}"
                );
            }
        }
    }
}

#[tokio::test]
async fn every_alert_uses_registered_metrics() {
    let known = registered();
    let text = config("prometheus-alerts.yml");
    let exprs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("expr:"))
        .collect();
    let alerts = text
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert_eq!(exprs.len(), alerts, "one expr per alert");
    assert!(
        alerts >= 4,
        "primary lost, pair degraded, lag, in-doubt: {alerts}"
    );
    for e in exprs {
        for n in names_in(e) {
            assert!(
                known.contains(&n),
                "alert expr {e:?} uses {n}, which no daemon registers"
            );
        }
    }
}
