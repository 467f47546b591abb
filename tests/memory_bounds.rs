//! Nothing the controller keeps per grant outlives the grant: create 1,000 grants, let them all
//! refresh (against a fast stub token endpoint; correctness is proven against Hydra elsewhere),
//! delete them, and read the sizes of the controller's maps from /metrics.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
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
    for c in 0..CLIENTS {
        env.put_secret(
            &format!("client-{c}"),
            &[("client_id", &format!("client-{c}")), ("client_secret", &format!("secret-{c}"))],
        )
        .await;
    }
    let created = Instant::now();
    futures::stream::iter(0..GRANTS)
        .map(|i| {
            let env = &env;
            let issuer = stub.base_url().to_owned();
            async move {
                env.create_grant(&format!("g{i}"), &format!("rt-{i}"), |s| {
                    s.issuer_url = issuer;
                    s.client_secret_ref.name = format!("client-{}", i % CLIENTS);
                })
                .await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    println!("created {GRANTS} grants in {:.1}s", created.elapsed().as_secs_f64());

    let (_operator, port) = env.start_operator_with(&["--allowed-issuer", stub.base_url()]);
    let started = Instant::now();
    let text = wait_for_gauges(port, GRANTS as f64, CLIENTS as f64, Duration::from_secs(300)).await;
    println!("{GRANTS} grants refreshed and remembered after {:.1}s", started.elapsed().as_secs_f64());
    assert_eq!(stub.token_requests(), GRANTS, "one token request per grant");
    assert_eq!(metric(&text, "wgtwo_operator_unpersisted_refresh_tokens", &[]), 0.0);

    env.grants().delete_collection(&DeleteParams::default(), &ListParams::default()).await.unwrap();
    let deleted = Instant::now();
    let text = wait_for_gauges(port, 0.0, 0.0, Duration::from_secs(120)).await;
    println!("memory empty {:.1}s after deleting every grant", deleted.elapsed().as_secs_f64());
    assert_eq!(metric(&text, "wgtwo_grant_ready", &[]), 0.0);
    assert!(!text.contains("wgtwo_grant_ready{"), "per-grant series of deleted grants remain");
}
