//! SIGKILL the operator at random moments while it refreshes, and count the grants that survive.
//!
//! With rotating refresh tokens and no grace period, a grant is lost if the process dies after the
//! identity service rotated the token and before the new one was written to the state Secret: no
//! client can close that window. Hydra's `rotation_grace_period` closes it, because the operator
//! retries with the last refresh token it persisted. So:
//! - with a grace period, no grant may be lost;
//! - without one (Hydra's default), losses are counted, and each must be reported as InvalidGrant.
//!
//! CI runs `WGTWO_KILL_CYCLES` refreshes per test (default 20); the full run is
//! `WGTWO_KILL_CYCLES=200 cargo test --test kill_loop -- --nocapture`.

mod support;

use std::time::{Duration, Instant};

use rand::Rng;
use support::Env;
use wgtwo_testenv::HydraOptions;

const GRANTS: usize = 5;
/// One replica, restarted at once after each kill: a Lease would make each new process wait for
/// the killed one's to expire (leader failover has its own test).
const SINGLE_REPLICA: &[&str] = &["--leader-elect=false"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_rotation_grace_period_sigkill_at_random_moments_loses_no_grant() {
    let lost = kill_loop(Duration::from_secs(60)).await;
    assert!(lost.is_empty(), "grants lost despite the grace period: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_grace_period_every_grant_lost_to_sigkill_is_reported_as_invalid_grant() {
    // kill_loop asserts that each lost grant says InvalidGrant; the count is printed.
    kill_loop(Duration::ZERO).await;
}

/// Returns the names of the grants lost.
async fn kill_loop(grace: Duration) -> Vec<String> {
    let cycles: usize = std::env::var("WGTWO_KILL_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let options = HydraOptions {
        access_token_ttl: Duration::from_secs(6),
        refresh_token_grace_period: grace,
        ..Default::default()
    };
    let mut env = Env::start(options).await;
    let names: Vec<String> = (0..GRANTS).map(|i| format!("grant-{i}")).collect();
    for name in &names {
        env.create_authorized_grant(name).await;
    }
    let baseline = env.hydra.token_requests();
    let started = Instant::now();
    let mut kills = 0;
    let mut operator = env.start_operator_with(SINGLE_REPLICA).0;
    while env.hydra.token_requests() - baseline < cycles {
        let pause = rand::rng().random_range(200..3000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        operator.signal(libc::SIGKILL).unwrap();
        drop(operator);
        kills += 1;
        operator = env.start_operator_with(SINGLE_REPLICA).0;
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "too slow: {} refreshes",
            env.hydra.token_requests() - baseline
        );
    }
    let refreshes = env.hydra.token_requests() - baseline;

    // Let the last operator settle, stop it so nothing rotates while we look, and judge each grant
    // by its live refresh token: the one the operator will present next.
    tokio::time::sleep(Duration::from_secs(12)).await;
    operator.terminate(Duration::from_secs(10)).unwrap();
    let mut lost = Vec::new();
    for name in &names {
        let live = env.live_refresh_token(name).await.unwrap_or_default();
        if !env.active(&live).await {
            lost.push(name.clone());
        }
    }
    // A lost grant must say so (InvalidGrant, with advice to re-authorize) once the operator next
    // tries it; the others keep refreshing: each must refresh again after this last start (a status
    // written before the kills proves nothing).
    let last_start = jiff::Timestamp::now();
    let _operator = env.start_operator_with(SINGLE_REPLICA).0;
    let deadline = Instant::now() + Duration::from_secs(30);
    for name in &names {
        if lost.contains(name) {
            env.wait_ready(name, "False", "InvalidGrant", Duration::from_secs(20)).await;
            continue;
        }
        loop {
            let status = env.status(name).await.unwrap_or_default();
            let last = status.last_refresh_time.map(|t| t.0.as_second()).unwrap_or_default();
            if last > last_start.as_second() {
                break;
            }
            assert!(Instant::now() < deadline, "{name}: not refreshed after the last restart (last refresh {last})");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        env.wait_ready(name, "True", "Refreshed", Duration::from_secs(5)).await;
        assert!(env.live_token_is_active(name).await, "{name}: refreshed, yet its live refresh token is inactive");
    }
    let window = persist_window_ms(&env);
    println!(
        "kill loop (grace period {}s): {kills} SIGKILLs over {:.0}s, {refreshes} refreshes, {} of {GRANTS} grants lost {lost:?}; answer->state written (ms, from the operator logs, {} refreshes): p50 {} p99 {} max {}",
        grace.as_secs(),
        started.elapsed().as_secs_f64(),
        lost.len(),
        window.len(),
        percentile(&window, 50),
        percentile(&window, 99),
        window.last().copied().unwrap_or_default(),
    );
    lost
}

/// Every `persist_ms` the operators logged: how long a rotated refresh token lived only in memory.
fn persist_window_ms(env: &Env) -> Vec<u64> {
    let mut values = Vec::new();
    for entry in std::fs::read_dir(env.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("operator-")) {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            values.extend(log.split("persist_ms=").skip(1).filter_map(|rest| {
                rest.split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse::<u64>().ok())
            }));
        }
    }
    values.sort_unstable();
    values
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}
