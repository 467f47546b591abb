//! Two replicas on one Lease, against a real apiserver and a real Hydra without a rotation grace
//! period. Hydra refuses (invalid_grant) a refresh token presented a second time only when the two
//! requests do not overlap, so the tests also put a recording proxy in front of Hydra that sees
//! every refresh token presented and proves directly that none was presented twice.

mod support;

use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use support::{Env, OPERATOR_NS, metric, scrape};
use wgtwo_testenv::process::ChildGuard;
use wgtwo_testenv::{Fault, FaultServer, HydraOptions};

/// Must match the test flags in support::Env::start_operator_with.
const LEASE: Duration = Duration::from_secs(12);
const RENEW: Duration = Duration::from_secs(1);

struct Replica {
    name: &'static str,
    process: ChildGuard,
    port: u16,
}

impl Replica {
    async fn leads(&self) -> bool {
        metric(&scrape(self.port).await, "wgtwo_operator_leader", &[]) == 1.0
    }

    async fn refreshes(&self, result: &str) -> f64 {
        metric(&scrape(self.port).await, "wgtwo_grant_refresh_total", &[("result", result)])
    }

    /// Token requests sent, whatever their result.
    async fn requests(&self) -> f64 {
        metric(&scrape(self.port).await, "wgtwo_grant_refresh_total", &[])
    }

    async fn wait_leads(&self, within: Duration) -> Duration {
        let start = Instant::now();
        while !self.leads().await {
            assert!(start.elapsed() < within, "{} did not become the leader within {within:?}", self.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        start.elapsed()
    }
}

async fn lease_holder(env: &Env) -> Option<String> {
    use k8s_openapi::api::coordination::v1::Lease;
    let leases: kube::Api<Lease> = kube::Api::namespaced(env.kube.clone(), OPERATOR_NS);
    leases.get_opt("wgtwo-operator").await.unwrap()?.spec?.holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_pause_and_kill_failovers_exactly_one_replica_refreshes_and_no_refresh_token_is_presented_twice() {
    let options =
        HydraOptions { access_token_ttl: Duration::from_secs(20), recording_proxy: true, ..Default::default() };
    let mut env = Env::start(options).await;
    let grants: Vec<String> = (0..3).map(|i| format!("grant-{i}")).collect();
    for g in &grants {
        env.create_authorized_grant(g).await;
    }
    let baseline = env.hydra.token_requests();

    let (process, port) = env.start_operator_with(&[]);
    let a = Replica { name: "A", process, port };
    a.wait_leads(Duration::from_secs(10)).await;
    let (process, port) = env.start_operator_with(&[]);
    let b = Replica { name: "B", process, port };
    for g in &grants {
        env.wait_ready(g, "True", "Refreshed", Duration::from_secs(30)).await;
    }
    // Let the leader go through a refresh cycle while B stands by.
    tokio::time::sleep(Duration::from_secs(18)).await;
    assert!(a.leads().await && !b.leads().await, "exactly one leader");
    assert!(a.refreshes("success").await >= 6.0, "A refreshed every grant at least twice");
    assert_eq!(b.requests().await, 0.0, "the standby sent token requests");

    // 1. Pause the leader (SIGSTOP, as a long GC pause or a frozen node would): B takes over once
    //    the Lease lapses; when A resumes, it must not send a single token request.
    env.wait_quiet(&grants, Duration::from_secs(3)).await;
    let a_before_pause = a.requests().await;
    a.process.signal(libc::SIGSTOP).unwrap();
    let paused = Instant::now();
    let takeover = b.wait_leads(LEASE + RENEW * 3).await;
    println!("pause: B led {:.1}s after A was paused (lease {LEASE:?})", takeover.as_secs_f64());
    // B refreshes every grant (tokens live 20s, so within ~20s of taking over).
    let deadline = Instant::now() + Duration::from_secs(40);
    while b.refreshes("success").await < 3.0 {
        assert!(Instant::now() < deadline, "B did not refresh after taking over");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    a.process.signal(libc::SIGCONT).unwrap();
    println!("A resumed after {:.1}s paused", paused.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!a.leads().await, "the resumed ex-leader claims the lead");
    assert_eq!(a.requests().await, a_before_pause, "the resumed ex-leader sent token requests");

    // 2. Kill the leader (SIGKILL): A takes over once the Lease lapses.
    env.wait_quiet(&grants, Duration::from_secs(3)).await;
    let b_scrape = scrape(b.port).await;
    let holder_before = lease_holder(&env).await;
    drop(b.process); // SIGKILL
    let takeover = a.wait_leads(LEASE + RENEW * 3).await;
    println!("kill: A led {:.1}s after B was killed (lease {LEASE:?})", takeover.as_secs_f64());
    assert_ne!(lease_holder(&env).await, holder_before);
    let a_after_kill = a.refreshes("success").await;
    let deadline = Instant::now() + Duration::from_secs(40);
    while a.refreshes("success").await < a_after_kill + 3.0 {
        assert!(Instant::now() < deadline, "A did not refresh after taking over again");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Every token request Hydra saw was sent by a replica holding the Lease, and Hydra refused
    // none of them: a refresh token presented twice would have been refused (invalid_grant).
    let a_scrape = scrape(a.port).await;
    let total_requests = env.hydra.token_requests() - baseline;
    let mut counted = 0.0;
    println!("token requests per grant, A / B (success + retried after Hydra's HTTP 500):");
    for g in &grants {
        let per = |s: &str, r: &str| metric(s, "wgtwo_grant_refresh_total", &[("name", g), ("result", r)]);
        let (a_ok, a_retry) = (per(&a_scrape, "success"), per(&a_scrape, "retryable_error"));
        let (b_ok, b_retry) = (per(&b_scrape, "success"), per(&b_scrape, "retryable_error"));
        println!("  {g}: {a_ok} + {a_retry} / {b_ok} + {b_retry}");
        counted += a_ok + a_retry + b_ok + b_retry;
    }
    let refused = metric(&a_scrape, "wgtwo_grant_refresh_total", &[("result", "rejected")])
        + metric(&b_scrape, "wgtwo_grant_refresh_total", &[("result", "rejected")]);
    println!("Hydra saw {total_requests} token requests; the replicas sent {counted}, {refused} refused");
    assert_eq!(refused, 0.0, "a refresh token was refused");
    assert_eq!(total_requests as f64, counted, "token requests no replica accounts for");
    let reused = env.hydra.recording_proxy().refresh_tokens_presented_twice();
    assert!(reused.is_empty(), "{reused:#?}");
    for g in &grants {
        env.wait_ready(g, "True", "Refreshed", Duration::from_secs(5)).await;
        assert!(env.live_token_is_active(g).await, "{g}: the persisted refresh token is no longer active");
    }
}

/// Many grants refreshing at once, their answers held back 1 s at the proxy so that up to
/// `--concurrency` token requests overlap, and the leader handed over (SIGTERM) twice while answers
/// are in flight: no refresh token is presented twice, each grant is refreshed exactly once per
/// request, and every persisted refresh token is live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_concurrent_token_requests_and_handovers_while_answers_are_in_flight_no_refresh_token_is_presented_twice()
{
    const GRANTS: usize = 24;
    const ROUNDS: usize = 2;
    const NAMES: [&str; 2 + ROUNDS] = ["A", "B", "C", "D"];
    // One-hour tokens: the only refreshes are the first one and the requested ones.
    let mut env = Env::start(HydraOptions { recording_proxy: true, ..Default::default() }).await;
    let grants: Vec<String> = (0..GRANTS).map(|i| format!("grant-{i}")).collect();
    for g in &grants {
        env.create_authorized_grant(g).await;
    }
    env.hydra.recording_proxy().hold_token_answers(Duration::from_secs(1));

    let (process, port) = env.start_operator_with(&[]);
    let mut leader = Replica { name: NAMES[0], process, port };
    leader.wait_leads(Duration::from_secs(10)).await;
    let (process, port) = env.start_operator_with(&[]);
    let mut standby = Replica { name: NAMES[1], process, port };
    for g in &grants {
        env.wait_ready(g, "True", "Refreshed", Duration::from_secs(60)).await;
    }

    for round in 1..=ROUNDS {
        let request = format!("round-{round}");
        let patch = serde_json::json!({"metadata": {"annotations": {"auth.wgtwo.com/refresh-requested-at": request}}});
        for g in &grants {
            env.grants().patch(g, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while env.hydra.recording_proxy().token_requests_in_flight() < 4 {
            assert!(Instant::now() < deadline, "round {round}: token requests did not overlap");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let in_flight = env.hydra.recording_proxy().token_requests_in_flight();
        let start = Instant::now();
        // Blocks this worker thread; the proxy's tasks move to the other.
        let status = tokio::task::block_in_place(|| leader.process.terminate(Duration::from_secs(15))).unwrap();
        assert!(status.success(), "{}: {status}", leader.name);
        let exited = start.elapsed();
        let takeover = standby.wait_leads(RENEW * 4).await;
        println!(
            "round {round}: SIGTERM to {} with {in_flight} answers in flight; it exited after {:.2}s, {} led {:.2}s later",
            leader.name,
            exited.as_secs_f64(),
            standby.name,
            takeover.as_secs_f64()
        );
        let (process, port) = env.start_operator_with(&[]);
        leader = std::mem::replace(&mut standby, Replica { name: NAMES[round + 1], process, port });
        let deadline = Instant::now() + Duration::from_secs(60);
        for g in &grants {
            while env.status(g).await.and_then(|s| s.refresh_request_handled).as_deref() != Some(request.as_str()) {
                let reused = env.hydra.recording_proxy().refresh_tokens_presented_twice();
                assert!(
                    Instant::now() < deadline,
                    "round {round}: {g} did not act on the refresh request; {reused:#?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            env.wait_ready(g, "True", "Refreshed", Duration::from_secs(10)).await;
        }
    }

    let proxy = env.hydra.recording_proxy();
    let presented = proxy.presentations();
    let accepted = presented.iter().filter(|p| p.answered.is_some_and(|(_, s)| (200..300).contains(&s))).count();
    // Hydra on SQLite answers some concurrent requests with a 500 (database locked); those are retried.
    let mut answers = std::collections::BTreeMap::<(Option<u16>, Option<String>), usize>::new();
    for p in &presented {
        *answers.entry((p.answered.map(|(_, s)| s), p.error.clone())).or_default() += 1;
    }
    println!(
        "{} refresh tokens presented, up to {} token requests in flight at once; Hydra's answers:",
        presented.len(),
        proxy.max_token_requests_in_flight()
    );
    for ((status, error), n) in &answers {
        println!("  {n} x {status:?} {}", error.as_deref().unwrap_or(""));
    }
    let reused = proxy.refresh_tokens_presented_twice();
    assert!(reused.is_empty(), "{reused:#?}");
    assert!(proxy.max_token_requests_in_flight() >= 8, "token requests did not overlap");
    assert_eq!(accepted, GRANTS * (1 + ROUNDS), "each grant is refreshed once at start and once per request");
    for g in &grants {
        assert!(env.live_token_is_active(g).await, "{g}: the persisted refresh token is no longer active");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_lease_so_the_standby_takes_over_at_once_and_exits_zero() {
    let mut env = Env::start(HydraOptions::default()).await;
    env.create_authorized_grant("alice").await;
    let (process, port) = env.start_operator_with(&[]);
    let mut a = Replica { name: "A", process, port };
    a.wait_leads(Duration::from_secs(10)).await;
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;
    let (process, port) = env.start_operator_with(&[]);
    let b = Replica { name: "B", process, port };
    scrape(b.port).await;

    let start = Instant::now();
    let status = a.process.terminate(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "SIGTERM exit: {status}");
    let exited = start.elapsed();
    let takeover = b.wait_leads(RENEW * 4).await;
    println!("A exited {:.2}s after SIGTERM; B led {:.2}s later", exited.as_secs_f64(), takeover.as_secs_f64());
    let log = std::fs::read_to_string(a.process.log_path()).unwrap();
    assert!(log.contains("released the Lease"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_refresh_waits_for_the_answer_persists_the_rotated_token_and_exits_zero() {
    let mut env = Env::start(HydraOptions::default()).await;
    // A stub identity service that takes 2 s to answer (Hydra cannot be slowed on demand).
    let stub = FaultServer::start().await.unwrap();
    stub.push(Fault::Delay(Duration::from_secs(2)));
    env.create_grant("slow", "user-refresh-token", |s| s.issuer_url = stub.base_url().to_owned()).await;
    let (mut operator, _) = env.start_operator_with(&["--allowed-issuer", stub.base_url()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while stub.token_requests() == 0 {
        assert!(Instant::now() < deadline, "no token request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let start = Instant::now();
    let status = operator.terminate(Duration::from_secs(10)).unwrap();
    println!("SIGTERM with a refresh in flight: exited {status} after {:.2}s", start.elapsed().as_secs_f64());
    assert!(status.success(), "{status}");
    assert!(start.elapsed() > Duration::from_secs(1), "exited without waiting for the answer");
    assert_eq!(env.live_refresh_token("slow").await.as_deref(), Some("stub-refresh-0"), "rotated token not persisted");
    assert_eq!(env.secret_value("slow-token", "access_token").await.as_deref(), Some("stub-access-0"));
    assert_eq!(stub.token_requests(), 1);
}

/// Issue 23, item 1: leader A's state write outlives its budget on a slow apiserver but lands; A
/// loses the Lease; B refreshes from what A wrote (R1 -> R2). A still keeps its answer (R1) as
/// unwritten, and its retry used to write R1 over R2 at whatever version its cache showed: B's next
/// refresh then presented R1 again and Hydra revoked the family. A kept answer is now written only
/// while a consistent read shows the state still holding the token it rotated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_the_lease_never_writes_its_kept_answer_over_a_newer_refresh_token() {
    let mut env = Env::start(HydraOptions { recording_proxy: true, ..Default::default() }).await;
    env.create_authorized_grant("alice").await;
    let slow =
        wgtwo_testenv::TcpProxy::start(env.cp.url().trim_start_matches("https://").parse().unwrap()).await.unwrap();
    let kubeconfig = env.operator_kubeconfig_through(slow.port());
    let (process, port) = env.start_operator_using(&[], &kubeconfig);
    let a = Replica { name: "A", process, port };
    a.wait_leads(Duration::from_secs(10)).await;
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;
    let (process, port) = env.start_operator_with(&[]);
    let b = Replica { name: "B", process, port };
    scrape(b.port).await;
    let r0 = env.live_refresh_token("alice").await.unwrap();

    // A refreshes; while Hydra's answer is on its way, A's apiserver turns slow for 25 s: A's state
    // write lands at once, its answer comes after A gave up on it (5 s), and A's Lease lapses.
    let hydra = env.hydra.recording_proxy();
    hydra.hold_token_answers(Duration::from_millis(1500));
    env.request_refresh("alice", "one").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while hydra.token_requests_in_flight() == 0 {
        assert!(Instant::now() < deadline, "A sent no token request");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    slow.stall_answers(Duration::from_secs(25));
    hydra.hold_token_answers(Duration::ZERO);
    // A's state write lands.
    let r1 = env.wait_live_token_change("alice", Some(&r0), Duration::from_secs(10)).await;
    // B leads once A's Lease lapses, and refreshes (the request is not handled yet) from R1.
    b.wait_leads(LEASE * 2).await;
    let r2 = env.wait_live_token_change("alice", Some(&r1), Duration::from_secs(20)).await;
    assert!(!a.leads().await, "A still leads");

    // A's apiserver recovers; whatever A retries must leave R2 in place.
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = a.process.log_path().to_owned();
    while !std::fs::read_to_string(&log).unwrap().contains("superseded before it could be written") {
        assert_eq!(env.live_refresh_token("alice").await.as_deref(), Some(r2.as_str()), "A wrote over B's refresh");
        assert!(Instant::now() < deadline, "A never dropped its kept answer; log:\n{}", a.process.log_tail(30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.live_refresh_token("alice").await.as_deref(), Some(r2.as_str()), "A wrote over B's refresh");

    // B's next refresh presents R2: the lineage is whole, and no token was presented twice.
    env.request_refresh("alice", "two").await;
    env.wait_refresh_handled("alice", "two", Duration::from_secs(20)).await;
    assert!(env.live_token_is_active("alice").await);
    assert_eq!(hydra.refresh_tokens_presented_twice(), Vec::<String>::new());
}

/// Review of issue 23: a kept answer that began its lineage (the first refresh from the subscriber's
/// token u1) was retried with no look at the subscriber's Secret. After a re-authorization (u2)
/// that another leader took into use, the retry wrote the old lineage over the new one, and that
/// leader's next reconcile adopted u2 again: a reuse that revoked the new family.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_first_answer_is_dropped_once_the_subscriber_authorized_again_and_another_leader_took_it() {
    let mut env = Env::start(HydraOptions { recording_proxy: true, ..Default::default() }).await;
    let u1 = env.authorize("alice").await;
    env.create_grant("alice", &u1, |_| {}).await;
    let partition =
        wgtwo_testenv::TcpProxy::start(env.cp.url().trim_start_matches("https://").parse().unwrap()).await.unwrap();
    env.hydra.recording_proxy().hold_token_answers(Duration::from_millis(1500));
    let kubeconfig = env.operator_kubeconfig_through(partition.port());
    let (process, port) = env.start_operator_using(&[], &kubeconfig);
    let a = Replica { name: "A", process, port };
    // A presents u1; while the answer is on its way, A is cut off from the apiserver: its state
    // write hangs (kept, unwritten) and its Lease lapses.
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.hydra.recording_proxy().token_requests_in_flight() == 0 {
        assert!(Instant::now() < deadline, "A sent no token request");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    partition.blackhole_everything();
    env.hydra.recording_proxy().hold_token_answers(Duration::ZERO);
    // The write gives up after 5 s; reporting it (an Event, the status) waits out the API timeouts.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(a.process.log_path())
        .unwrap()
        .contains("could not persist the rotated refresh token")
    {
        assert!(Instant::now() < deadline, "A's state write did not fail; log:\n{}", a.process.log_tail(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.live_refresh_token("alice").await, None);
    // The subscriber authorizes again; B leads once A's Lease lapses and takes u2 into use.
    let u2 = env.authorize("alice").await;
    env.put_secret("alice-authorization", &[("refresh_token", &u2)]).await;
    let (process, port) = env.start_operator_with(&[]);
    let b = Replica { name: "B", process, port };
    b.wait_leads(LEASE * 2).await;
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;
    let n1 = env.live_refresh_token("alice").await.unwrap();
    // A reaches the apiserver again: its kept answer (from u1) must not replace B's lineage.
    partition.heal();
    let deadline = Instant::now() + Duration::from_secs(40);
    while !std::fs::read_to_string(a.process.log_path()).unwrap().contains("superseded before it could be written") {
        assert_eq!(
            env.live_refresh_token("alice").await.as_deref(),
            Some(n1.as_str()),
            "A wrote the old lineage over B's"
        );
        assert!(Instant::now() < deadline, "A never dropped its kept answer; log:\n{}", a.process.log_tail(30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(env.live_refresh_token("alice").await.as_deref(), Some(n1.as_str()), "A wrote the old lineage over B's");
    // B refreshes on from N1; nothing was presented twice.
    env.request_refresh("alice", "after").await;
    env.wait_refresh_handled("alice", "after", Duration::from_secs(20)).await;
    assert!(env.live_token_is_active("alice").await);
    assert_eq!(env.hydra.recording_proxy().refresh_tokens_presented_twice(), Vec::<String>::new());
}
