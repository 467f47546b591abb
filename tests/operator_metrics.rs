//! /metrics, /healthz and /readyz of a running operator: the scrape passes `promtool check
//! metrics`, per-grant series follow the grant and vanish with it, no token appears, and the
//! chart's dashboard and alerts query only what it exports.

mod dashboard_queries;
mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::DeleteParams;
use support::{Env, NS, get, metric, scrape};
use wgtwo_testenv::HydraOptions;
use wgtwo_testenv::process::ChildGuard;

fn promtool_check_metrics(scrape: &str) -> (bool, String) {
    let mut child = Command::new(wgtwo_testenv::binaries::path("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// An operator with a Ready grant `alice` (authorized with the returned refresh token) and a
/// grant `broken` whose Secret is missing, for the error counter; returns it and its metrics port.
async fn operator_with_a_ready_and_a_broken_grant(env: &mut Env) -> (ChildGuard, u16, String) {
    let token = env.authorize("alice").await;
    env.create_grant("alice", &token, |_| {}).await;
    let (operator, port) = env.start_operator_with(&[]);
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;
    env.create_grant("broken", "unused", |s| s.refresh_token_secret_ref.as_mut().unwrap().name = "missing".into())
        .await;
    env.wait_ready("broken", "False", "SecretNotFound", Duration::from_secs(30)).await;
    (operator, port, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_passes_promtool_and_grant_series_follow_the_grant_and_vanish_with_it() {
    let mut env = Env::start(HydraOptions::default()).await;
    let (_operator, port, token) = operator_with_a_ready_and_a_broken_grant(&mut env).await;

    assert_eq!(get(port, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(port, "/readyz").await, (200, "ok\n".into()));

    // The gauges follow the status (written by this operator, read back through the watch).
    let status = env.status("alice").await.unwrap();
    let expires = status.expires_at.unwrap().0.as_second() as f64;
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape(port).await;
        let alice = [("namespace", NS), ("name", "alice")];
        if metric(&text, "wgtwo_grant_access_token_expiration_timestamp_seconds", &alice) == expires
            && metric(&text, "wgtwo_grant_ready", &[("namespace", NS), ("name", "broken")]) == 0.0
            && text.contains(r#"wgtwo_grant_ready{name="broken""#)
        {
            break text;
        }
        assert!(Instant::now() < deadline, "gauges did not follow the status:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("--- sample scrape ---\n{text}---");
    let alice = [("namespace", NS), ("name", "alice")];
    assert_eq!(metric(&text, "wgtwo_grant_ready", &alice), 1.0);
    assert_eq!(metric(&text, "wgtwo_grant_refresh_total", &[("name", "alice"), ("result", "success")]), 1.0);
    assert_eq!(metric(&text, "wgtwo_grant_refresh_duration_seconds_count", &[("result", "success")]), 1.0);
    let refresh_requests = [("grant_type", "refresh_token"), ("result", "success")];
    assert_eq!(metric(&text, "wgtwo_operator_token_requests_total", &refresh_requests), 1.0);
    let published = [("grant_type", "refresh_token"), ("source", "requested")];
    assert_eq!(metric(&text, "wgtwo_operator_tokens_published_total", &published), 1.0);
    assert!(metric(&text, "wgtwo_grant_reconcile_errors_total", &[("reason", "SecretNotFound")]) >= 1.0);
    assert_eq!(metric(&text, "wgtwo_operator_leader", &[]), 1.0);
    assert!(metric(&text, "process_resident_memory_bytes", &[]) > 1e6, "the process_* series are exported");
    let (ok, report) = promtool_check_metrics(&text);
    assert!(ok, "promtool check metrics:\n{report}");
    for secret in [
        env.secret_value("alice-token", "access_token").await.unwrap(),
        env.live_refresh_token("alice").await.unwrap(),
        token,
        env.client.client_secret.clone(),
    ] {
        assert!(!text.contains(&secret), "a secret appears in /metrics");
    }

    // Deleting a grant removes its series.
    env.grants().delete("alice", &DeleteParams::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(port).await;
        if !text.contains(r#"name="alice""#) {
            assert!(text.contains(r#"name="broken""#), "the other grant's series went too:\n{text}");
            break;
        }
        assert!(Instant::now() < deadline, "series of the deleted grant remain:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_uses_only_metrics_and_labels_a_live_operator_exports() {
    let mut env = Env::start(HydraOptions::default()).await;
    let (_operator, port, _) = operator_with_a_ready_and_a_broken_grant(&mut env).await;
    // Every family is in the scrape once the first refresh and the first error are counted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let scrape = loop {
        let text = scrape(port).await;
        if metric(&text, "wgtwo_grant_reconcile_errors_total", &[]) >= 1.0
            && metric(&text, "wgtwo_operator_tokens_published_total", &[]) >= 1.0
        {
            break dashboard_queries::scraped(&text);
        }
        assert!(Instant::now() < deadline, "no error or published token counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let dashboard = dashboard_queries::dashboard();
    let queries: Vec<_> = dashboard_queries::dashboard_queries(&dashboard)
        .into_iter()
        .chain(dashboard_queries::alert_queries())
        .collect();
    let mut used = std::collections::BTreeSet::new();
    let mut problems = Vec::new();
    for (place, expr) in &queries {
        used.extend(dashboard_queries::names(expr).0);
        for missing in dashboard_queries::missing_from(&scrape, expr) {
            problems.push(format!("{place}: {missing} is not in the scrape ({expr})"));
        }
    }
    assert!(problems.is_empty(), "{}\nscraped: {:?}", problems.join("\n"), scrape.keys().collect::<Vec<_>>());
    // What the dashboard is for: per-grant expiry, refresh results, failures by reason, the leader.
    for wanted in [
        "wgtwo_grant_access_token_expiration_timestamp_seconds",
        "wgtwo_grant_ready",
        "wgtwo_grant_refresh_total",
        "wgtwo_grant_reconcile_errors_total",
        "wgtwo_operator_leader",
        "wgtwo_grant_refresh_duration_seconds_bucket",
    ] {
        assert!(used.contains(wanted), "no query uses {wanted}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_ready_and_healthy_and_reports_it_does_not_lead() {
    let mut env = Env::start(HydraOptions::default()).await;
    let (_leader, leader_port) = env.start_operator_with(&[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&scrape(leader_port).await, "wgtwo_operator_leader", &[]) != 1.0 {
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_standby, port) = env.start_operator_with(&[]);
    scrape(port).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(port, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "standby never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(port, "/healthz").await.0, 200);
    assert_eq!(metric(&scrape(port).await, "wgtwo_operator_leader", &[]), 0.0);
}

#[test]
fn a_lease_too_short_for_a_safe_refresh_is_refused_at_startup_naming_the_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_wgtwo-operator"))
        .args(["run", "--lease-duration", "12s", "--request-timeout", "10s"])
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--lease-duration (12s) must be longer than --request-timeout (10s)"), "{stderr}");
}
