//! Nothing the controller keeps per grant outlives the grant: create 1,000 grants, let them all
//! refresh (against a fast stub token endpoint; correctness is proven against Hydra elsewhere),
//! delete them, and read the sizes of the controller's maps from /metrics.

mod support;

use std::time::{Duration, Instant};

use kube::api::{DeleteParams, ListParams};
use support::{Env, metric, scrape};
use wgtwo_testenv::{FaultServer, HydraOptions};

const GRANTS: usize = 1000;
const CLIENTS: usize = 10;

async fn wait_for_gauges(port: u16, grants: f64, clients: f64, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let text = scrape(port).await;
        let now = (
            metric(&text, "wgtwo_operator_grants_in_memory", &[]),
            metric(&text, "wgtwo_operator_oauth_clients_cached", &[]),
        );
        if now == (grants, clients) {
            return text;
        }
        assert!(Instant::now() < deadline, "grants and clients in memory: {now:?}, wanted {:?}", (grants, clients));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_grant_memory_and_cached_clients_are_forgotten_when_1000_grants_are_deleted() {
    let mut env = Env::start(HydraOptions::default()).await;
    let stub = FaultServer::start().await.unwrap();
    env.put_clients(CLIENTS).await;
    let created = Instant::now();
    env.create_grants_at(stub.base_url(), GRANTS, CLIENTS, |i| format!("g{i}"), |i| format!("rt-{i}")).await;
    println!("created {GRANTS} grants in {:.1}s", created.elapsed().as_secs_f64());

    let (operator, port) = env.start_operator_with(&["--allowed-issuer", stub.base_url()]);
    let started = Instant::now();
    while stub.token_requests() < GRANTS {
        assert!(started.elapsed() < Duration::from_secs(300), "{} token requests after 300 s", stub.token_requests());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_for_gauges(port, GRANTS as f64, CLIENTS as f64, Duration::from_secs(60)).await;
    println!("{GRANTS} grants refreshed and remembered after {:.1}s", started.elapsed().as_secs_f64());
    assert_eq!(stub.token_requests(), GRANTS, "one token request per grant");
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&scrape(port).await, "wgtwo_operator_unpersisted_refresh_tokens", &[]) != 0.0 {
        assert!(Instant::now() < deadline, "answers still unpersisted after 60 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The crash window under load: how long each rotated refresh token lived only in memory
    // (answer received -> state Secret written), from the operator's own log.
    let log = std::fs::read_to_string(operator.log_path()).unwrap();
    let mut window: Vec<u64> = log
        .split("persist_ms=")
        .skip(1)
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    window.sort_unstable();
    assert_eq!(window.len(), GRANTS, "one persisted answer per grant");
    let at = |p: usize| window[(window.len() * p / 100).min(window.len() - 1)];
    println!(
        "answer -> state written with {GRANTS} grants converging at once (ms): p50 {} p90 {} p99 {} max {}",
        at(50),
        at(90),
        at(99),
        window[window.len() - 1]
    );

    env.grants().delete_collection(&DeleteParams::default(), &ListParams::default()).await.unwrap();
    let deleted = Instant::now();
    let text = wait_for_gauges(port, 0.0, 0.0, Duration::from_secs(120)).await;
    println!("memory empty {:.1}s after deleting every grant", deleted.elapsed().as_secs_f64());
    assert_eq!(metric(&text, "wgtwo_grant_ready", &[]), 0.0);
    assert!(!text.contains("wgtwo_grant_ready{"), "per-grant series of deleted grants remain");
}
