//! The Grafana dashboard and the Prometheus alert rules under `deploy/` name only metrics
//! that a live pollcast exports: a renamed or removed metric fails here, not silently on a
//! dashboard that shows "No data" or an alert that can never fire.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{Backend, SETTLE, TestApp};

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/grafana/dashboards/pollcast.json"
);
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
const DATASOURCES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/grafana/provisioning/datasources/prometheus.yml"
);

/// Every `pollcast_…` metric name in a PromQL expression (series names as Prometheus sees
/// them: a histogram's `_bucket`, `_sum` and `_count` included).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("pollcast_") {
        let preceded_by_name = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if !preceded_by_name {
            names.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

/// The `expr` of every target of every panel (rows nest panels), with the panel's title.
fn dashboard_exprs(dashboard: &Value, out: &mut Vec<(String, String)>) {
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((title.clone(), expr.to_string()));
            }
        }
        dashboard_exprs(panel, out);
    }
}

/// The `expr` of every rule of a Prometheus rule file, with the rule's `alert` name. Reads
/// the subset of YAML the file uses: `- alert: Name` items, each with `expr:` on one line or
/// as a block scalar (`|`, `>-`, …) on the lines indented below it.
fn alert_exprs(yaml: &str) -> Vec<(String, String)> {
    let mut rules = Vec::new();
    let mut alert = None::<String>;
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            alert = Some(name.trim().to_string());
        } else if let Some(value) = trimmed.strip_prefix("expr:") {
            let value = value.trim();
            let expr = if value.starts_with('|') || value.starts_with('>') {
                let mut block = Vec::new();
                while let Some(next) = lines.peek() {
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    block.push(next.trim());
                    lines.next();
                }
                block.join(" ")
            } else {
                value.to_string()
            };
            let name = alert.clone().expect("an expr belongs to a `- alert:` rule");
            rules.push((name, expr));
        }
    }
    rules
}

/// Metric names in the Prometheus text format (`# TYPE`/`# HELP` lines skipped).
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn metric_names_are_read_from_expressions() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(pollcast_http_request_duration_seconds_bucket{status=~"5.."}[5m]))) / my_pollcast_x"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["pollcast_http_request_duration_seconds_bucket"]
    );
    let rules = alert_exprs(
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: pollcast_a > 0\n      - alert: B\n        expr: >-\n          pollcast_b\n          / pollcast_c\n        for: 5m\n",
    );
    assert_eq!(
        rules,
        [
            ("A".to_string(), "pollcast_a > 0".to_string()),
            ("B".to_string(), "pollcast_b / pollcast_c".to_string()),
        ]
    );
}

/// Every panel and query reads the datasource Grafana is provisioned with (by uid), so the
/// dashboard shows data on a fresh `docker compose up` without picking one by hand.
#[test]
fn the_dashboard_reads_the_provisioned_datasource() {
    let provisioned = std::fs::read_to_string(DATASOURCES).unwrap();
    let uid = provisioned
        .lines()
        .find_map(|line| line.trim().strip_prefix("uid:"))
        .expect("the datasource has a uid")
        .trim()
        .to_string();
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    fn check(panels: &Value, uid: &str, seen: &mut usize) {
        for panel in panels.as_array().into_iter().flatten() {
            if panel["type"] != "row" {
                assert_eq!(panel["datasource"]["uid"], uid, "panel {}", panel["title"]);
                for target in panel["targets"].as_array().into_iter().flatten() {
                    assert_eq!(target["datasource"]["uid"], uid, "panel {}", panel["title"]);
                    *seen += 1;
                }
            }
            check(&panel["panels"], uid, seen);
        }
    }
    let mut seen = 0;
    check(&dashboard["panels"], &uid, &mut seen);
    assert!(seen > 0);
}

async fn dashboards_and_alerts_use_only_exported_metrics(backend: Backend) {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(
        exprs.len() >= 15,
        "the dashboard has {} queries",
        exprs.len()
    );
    let rules = alert_exprs(&std::fs::read_to_string(ALERTS).unwrap());
    assert!(rules.len() >= 5, "the alert rules: {rules:?}");
    for (alert, _) in &rules {
        assert!(alert.starts_with("Pollcast"), "alert {alert}");
    }

    // (metric name, where it is used)
    let mut used = BTreeSet::new();
    for (place, expr) in exprs
        .iter()
        .map(|(title, expr)| (format!("dashboard panel {title:?}"), expr))
        .chain(rules.iter().map(|(n, e)| (format!("alert {n}"), e)))
    {
        for name in metric_names(expr) {
            used.insert((name, place.clone()));
        }
    }
    let distinct: BTreeSet<_> = used.iter().map(|(name, _)| name.as_str()).collect();
    assert!(distinct.len() >= 15, "only {distinct:?}");

    // Enough traffic that the series born of events exist: a vote (and a duplicate), a
    // flush, a WebSocket subscriber; the consumer reports its lag.
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let (socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws/polls/{poll}", app.api.addr))
            .await
            .unwrap();
    assert_eq!(app.api.vote(poll, 1, "u1").await.0, 202);
    assert_eq!(app.api.vote(poll, 2, "u1").await.0, 409);
    app.api.wait_for_total(poll, 1, SETTLE).await;

    let deadline = Instant::now() + SETTLE;
    loop {
        let text = app
            .api
            .http
            .get(app.api.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let exported = exported_names(&text);
        let missing: Vec<_> = used
            .iter()
            .filter(|(name, _)| !exported.contains(name))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics used by deploy/ but not exported by pollcast (name, where): {missing:?}\n\
             exported: {exported:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(socket);
}

crate::contract_tests!(dashboards_and_alerts_use_only_exported_metrics);
