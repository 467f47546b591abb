//! Hardening, tried as an attacker or a failing cluster would: the operator running as its
//! ServiceAccount against a real apiserver and a real Hydra.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use kube::api::{Api, Patch, PatchParams, PostParams};
use support::{Env, NS, OPERATOR_NS, OPERATOR_SA, ttl};
use wgtwo_operator::api::WgtwoGrant;
use wgtwo_testenv::{Fault, FaultServer, HydraOptions};

/// Sets the verbs the operator's ClusterRole grants on Secrets, and waits until RBAC enforces them.
async fn operator_secret_verbs(env: &Env, verbs: &[&str]) {
    let roles: Api<ClusterRole> = Api::all(env.kube.clone());
    let mut role = roles.get(OPERATOR_SA).await.unwrap();
    for rule in role.rules.as_mut().unwrap() {
        if rule.resources.as_ref().is_some_and(|r| r.iter().any(|r| r == "secrets")) {
            rule.verbs = verbs.iter().map(|v| v.to_string()).collect();
        }
    }
    roles.replace(OPERATOR_SA, &PostParams::default(), &role).await.unwrap();
    let reviews: Api<SubjectAccessReview> = Api::all(env.kube.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    for verb in ["get", "list", "watch", "create", "update"] {
        let want = verbs.contains(&verb);
        loop {
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(format!("system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}")),
                    resource_attributes: Some(ResourceAttributes {
                        namespace: Some(NS.into()),
                        verb: Some(verb.into()),
                        resource: Some("secrets".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let allowed = reviews.create(&PostParams::default(), &review).await.unwrap().status.unwrap().allowed;
            if allowed == want {
                break;
            }
            assert!(Instant::now() < deadline, "RBAC change for {verb} not in effect after 20s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn log_count(operator: &wgtwo_testenv::process::ChildGuard, needle: &str) -> usize {
    std::fs::read_to_string(operator.log_path()).unwrap().matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_answer_survives_failing_secret_reads_and_writes_over_several_refresh_cycles() {
    const ALL: &[&str] = &["get", "list", "watch", "create", "update"];
    let mut env = Env::start(ttl(8)).await;
    env.create_authorized_grant("alice").await;
    let operator = env.start_operator();
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;

    for cycle in 0..3 {
        // Writes fail: the next due refresh gets an answer that cannot be written. Counted from a
        // moment with no refresh in flight (the recovered answer of the last cycle is due at once).
        env.wait_quiet(&["alice".to_owned()], Duration::from_secs(2)).await;
        let requests = env.hydra.token_requests();
        let failures = log_count(&operator, "could not persist the rotated refresh token");
        operator_secret_verbs(&env, &["get", "list", "watch", "create"]).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while env.hydra.token_requests() == requests
            || log_count(&operator, "could not persist the rotated refresh token") == failures
        {
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: no refresh with a failed write; log:\n{}",
                operator.log_tail(25)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Nothing can change the state Secret now.
        let persisted = env.live_refresh_token("alice").await.unwrap();
        // Reads fail too, as they do when the apiserver itself is the thing failing; the operator
        // keeps retrying the publish (backoff 0.5 s to 4 s) for a while.
        operator_secret_verbs(&env, &["list", "watch"]).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            env.live_refresh_token("alice").await.as_deref(),
            Some(persisted.as_str()),
            "nothing could be written"
        );
        // The cluster recovers: the kept answer is published, and it is the live lineage.
        operator_secret_verbs(&env, ALL).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while env.live_refresh_token("alice").await.as_deref() == Some(persisted.as_str()) {
            assert!(Instant::now() < deadline, "cycle {cycle}: the kept refresh token was never persisted");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            env.live_token_is_active("alice").await,
            "cycle {cycle}: the persisted refresh token is not the live one; log:\n{}",
            operator.log_tail(30)
        );
        env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(20)).await;
    }
    // And it keeps refreshing.
    let requests = env.hydra.token_requests();
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.hydra.token_requests() == requests {
        assert!(Instant::now() < deadline, "no refresh after the cycles");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(20)).await;
    assert!(env.live_token_is_active("alice").await);
}

/// A TCP server that counts the connections it gets and never answers.
struct Silent {
    port: u16,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Silent {
    async fn start() -> Silent {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
        Silent { port, connections, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_author_who_cannot_read_secrets_cannot_make_the_operator_send_one_to_their_server() {
    let mut env = Env::start(ttl(3600)).await;
    // Mallory may manage grants in the namespace, and nothing else.
    let rules = vec![PolicyRule {
        api_groups: Some(vec!["auth.wgtwo.com".into()]),
        resources: Some(vec!["wgtwogrants".into()]),
        verbs: ["get", "list", "watch", "create", "update", "patch"].map(String::from).to_vec(),
        ..Default::default()
    }];
    env.cp.grant_service_account(NS, "mallory", "grant-author", rules).await.unwrap();
    let (mallory, _) = env.cp.service_account_client(NS, "mallory").await.unwrap();
    env.put_secret("db", &[("password", "the-database-password")]).await;
    let as_mallory: Api<Secret> = Api::namespaced(mallory.clone(), NS);
    let denied = as_mallory.get("db").await.unwrap_err();
    assert!(matches!(denied, kube::Error::Api(ref s) if s.code == 403), "{denied}");

    // Her own "identity service", and a grant that would send the team's OAuth client (as Basic
    // auth) and the database password (as the refresh token) there.
    let capture = Silent::start().await;
    let _operator = env.start_operator();
    let grant: WgtwoGrant = serde_json::from_value(serde_json::json!({
        "apiVersion": "auth.wgtwo.com/v1alpha1", "kind": "WgtwoGrant",
        "metadata": {"name": "exfiltrate"},
        "spec": {
            "issuerUrl": capture.url(),
            "clientSecretRef": {"name": "wgtwo-client"},
            "refreshTokenSecretRef": {"name": "db", "key": "password"},
            "target": {"secretName": "loot"},
        }
    }))
    .unwrap();
    Api::<WgtwoGrant>::namespaced(mallory, NS).create(&PostParams::default(), &grant).await.unwrap();

    // Whatever the operator decides, it decides it within seconds; the listener must stay silent.
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.ready("exfiltrate").await.is_none() {
        assert!(Instant::now() < deadline, "the grant was never reconciled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(capture.connections.load(Ordering::SeqCst), 0, "the operator connected to the grant author's server");
    env.wait_ready("exfiltrate", "False", "IssuerNotAllowed", Duration::from_secs(1)).await;
    let message = env.status("exfiltrate").await.unwrap().conditions[0].message.clone();
    assert!(message.contains(&capture.url()) && message.contains(&env.hydra.base_url()), "{message}");
    assert!(env.events("exfiltrate").await.iter().any(|(r, _)| r == "IssuerNotAllowed"));
    // Touching the grant changes nothing.
    let patch = serde_json::json!({"metadata": {"annotations": {"auth.wgtwo.com/refresh-requested-at": "now"}}});
    env.grants().patch("exfiltrate", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(capture.connections.load(Ordering::SeqCst), 0, "the operator connected to the grant author's server");
    assert!(env.secrets().get_opt("loot").await.unwrap().is_none());
    for (_, note) in env.events("exfiltrate").await {
        assert!(!note.contains("the-database-password"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_that_never_answers_does_not_delay_the_other_grants() {
    let mut env = Env::start(ttl(6)).await;
    let healthy = ["a", "b", "c"];
    for name in healthy {
        env.create_authorized_grant(name).await;
    }
    let silent = Silent::start().await;
    let silent_url = silent.url();
    env.create_grant("stuck", "unused", |s| s.issuer_url = silent_url.clone()).await;
    // A long request timeout: each attempt at the silent issuer hangs for 8 s.
    let _operator = env.start_operator_with(&[
        "--allowed-issuer",
        &silent.url(),
        "--request-timeout",
        "8s",
        "--lease-duration",
        "20s",
    ]);
    for name in healthy {
        env.wait_ready(name, "True", "Refreshed", Duration::from_secs(30)).await;
    }
    // For 25 s (about six refreshes each), note how late each refresh comes after its planned time.
    let mut planned: Vec<Option<jiff::Timestamp>> = vec![None; healthy.len()];
    let mut tokens: Vec<Option<String>> = vec![None; healthy.len()];
    let mut lateness = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(25) {
        for (i, name) in healthy.iter().enumerate() {
            let token = env.secret_value(&format!("{name}-token"), "access_token").await;
            if token != tokens[i] {
                if let (Some(plan), Some(_)) = (planned[i], &tokens[i]) {
                    lateness.push(jiff::Timestamp::now().duration_since(plan).as_secs_f64());
                }
                tokens[i] = token;
                planned[i] = None;
            }
            if planned[i].is_none() {
                // The status is written after the target Secret: until it is, it still holds the
                // plan of the refresh just seen (in the past).
                let plan = env.status(name).await.and_then(|s| s.next_refresh_time).map(|t| t.0);
                planned[i] = plan.filter(|p| *p > jiff::Timestamp::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(silent.connections.load(Ordering::SeqCst) > 0, "the stuck grant did try its issuer");
    lateness.sort_by(f64::total_cmp);
    let max = lateness.last().copied().unwrap_or(f64::INFINITY);
    println!(
        "refreshes of healthy grants next to a silent issuer: {} seen, lateness p50 {:.2}s max {max:.2}s (1 s of it is status rounding)",
        lateness.len(),
        lateness.get(lateness.len() / 2).copied().unwrap_or_default(),
    );
    assert!(lateness.len() >= 9, "only {} refreshes of the healthy grants in 25 s", lateness.len());
    // Blocked behind the silent issuer, a refresh would wait out its 8 s request timeout; 4 s leaves
    // room for a loaded test machine (a refresh has come 2.75 s late once, with the p50 at -0.16 s).
    assert!(max < 4.0, "a healthy grant refreshed {max:.2}s late");
    for name in healthy {
        env.wait_ready(name, "True", "Refreshed", Duration::from_secs(1)).await;
    }
}

fn unavailable(retry_after: Option<&str>) -> wgtwo_testenv::Fault {
    wgtwo_testenv::Fault::Status {
        status: 503,
        retry_after: retry_after.map(str::to_owned),
        body: r#"{"error":"temporarily_unavailable"}"#.into(),
    }
}

/// A stub identity service whose token endpoint answers 503 to the next `n` requests.
async fn failing_issuer(n: usize, retry_after: Option<&str>) -> wgtwo_testenv::FaultServer {
    let stub = wgtwo_testenv::FaultServer::start().await.unwrap();
    for _ in 0..n {
        stub.push(unavailable(retry_after));
    }
    stub
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_operator_ten_times_does_not_reset_the_backoff_of_a_failing_grant() {
    const WINDOW: Duration = Duration::from_secs(30);
    let mut env = Env::start(ttl(3600)).await;
    let flags = |issuer: &str| {
        ["--leader-elect=false", "--min-backoff", "2s", "--max-backoff", "8s", "--allowed-issuer"]
            .map(String::from)
            .into_iter()
            .chain([issuer.to_owned()])
            .collect::<Vec<_>>()
    };

    // Without restarts.
    let steady = failing_issuer(200, None).await;
    env.create_grant("steady", "rt-steady", |s| s.issuer_url = steady.base_url().to_owned()).await;
    let args = flags(steady.base_url());
    let mut operator = env.start_operator_with(&args.iter().map(String::as_str).collect::<Vec<_>>()).0;
    tokio::time::sleep(WINDOW).await;
    let without = steady.token_requests();
    operator.terminate(Duration::from_secs(10)).unwrap();
    env.grants().delete("steady", &Default::default()).await.unwrap();

    // The same, with a restart every 3 s.
    let restarted = failing_issuer(200, None).await;
    env.create_grant("restarted", "rt-restarted", |s| s.issuer_url = restarted.base_url().to_owned()).await;
    let args = flags(restarted.base_url());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let mut operator = env.start_operator_with(&args).0;
    for _ in 0..10 {
        tokio::time::sleep(WINDOW / 10).await;
        assert!(operator.terminate(Duration::from_secs(10)).unwrap().success());
        operator = env.start_operator_with(&args).0;
    }
    tokio::time::sleep(WINDOW.saturating_sub(started.elapsed())).await;
    operator.terminate(Duration::from_secs(10)).unwrap();
    let with = restarted.token_requests();
    println!("token requests of a failing grant in {WINDOW:?}: {without} without restarts, {with} with 10 restarts");
    assert!(without >= 3, "the failing grant was retried only {without} times");
    assert!(with <= without + 1, "restarts reset the backoff: {with} requests with restarts, {without} without");
    let status = env.status("restarted").await.unwrap();
    assert_eq!(status.failed_attempts, Some(with as u32), "every failed attempt is counted in the status");
    assert!(status.last_failure_time.is_some());
    let ready = &status.conditions[0];
    assert_eq!(ready.reason, "IdentityServiceUnavailable");
    assert!(!ready.message.contains("retrying in"), "the message changes on every retry: {}", ready.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_longer_than_the_backoff_is_honoured_also_across_a_restart() {
    let mut env = Env::start(ttl(3600)).await;
    let stub = failing_issuer(3, Some("6")).await;
    env.create_grant("alice", "rt-alice", |s| s.issuer_url = stub.base_url().to_owned()).await;
    let args = ["--leader-elect=false", "--allowed-issuer", stub.base_url()];
    let mut operator = env.start_operator_with(&args).0;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while seen.len() < 4 {
        assert!(Instant::now() < deadline, "only {} token requests in 40 s", seen.len());
        if stub.token_requests() > seen.len() {
            seen.push(Instant::now());
            if seen.len() == 2 {
                // Restart while waiting for the second Retry-After.
                tokio::time::sleep(Duration::from_secs(1)).await;
                assert!(operator.terminate(Duration::from_secs(10)).unwrap().success());
                operator = env.start_operator_with(&args).0;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gaps: Vec<f64> = seen.windows(2).map(|w| w[1].duration_since(w[0]).as_secs_f64()).collect();
    println!("gaps between token requests with Retry-After: 6 (min backoff 0.5 s): {gaps:.2?}");
    for gap in &gaps {
        assert!(*gap >= 5.5, "a request came {gap:.2}s after a Retry-After of 6 s; log:\n{}", operator.log_tail(40));
    }
    // The fourth request succeeded.
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(10)).await;
    let status = env.status("alice").await.unwrap();
    assert_eq!((status.failed_attempts, status.last_failure_time), (None, None), "a success resets the count");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_api_connections_that_go_silent_do_not_stall_the_operator() {
    let mut env = Env::start(ttl(8)).await;
    env.create_authorized_grant("alice").await;
    let upstream = env.cp.url().trim_start_matches("https://").parse().unwrap();
    let proxy = wgtwo_testenv::TcpProxy::start(upstream).await.unwrap();
    let kubeconfig = env.operator_kubeconfig_through(proxy.port());
    let (operator, _) = env.start_operator_using(&["--leader-elect=false", "--kube-api-timeout", "3s"], &kubeconfig);
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;

    // Three times, every connection the operator has open to the apiserver (pooled request
    // connections and watches) goes silent for good; the operator must notice within its
    // timeouts, reconnect and keep refreshing.
    for round in 0..3 {
        let before = proxy.connections();
        let requests = env.hydra.token_requests();
        proxy.blackhole_open_connections();
        let silenced = Instant::now();
        let deadline = silenced + Duration::from_secs(40);
        while env.hydra.token_requests() < requests + 2 {
            assert!(
                Instant::now() < deadline,
                "round {round}: {} refreshes in 40 s after the connections went silent; log:\n{}",
                env.hydra.token_requests() - requests,
                operator.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!(
            "round {round}: two refreshes {:.1}s after the apiserver connections went silent; {} new connections",
            silenced.elapsed().as_secs_f64(),
            proxy.connections() - before
        );
        env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(10)).await;
        assert!(env.live_token_is_active("alice").await, "round {round}: the live refresh token is not active");
    }
}

/// After Hydra rotates its ID-token signing key (admin API), the operator keeps refreshing every
/// grant without a restart. A grant authorized after the rotation has its ID tokens verified at
/// once: the client fetches the issuer's keys again when an ID token names one it has not seen. A
/// grant authorized before keeps its tokens and phone number flowing even though Hydra v2.3 gives
/// that chain ID tokens that name the old key but are signed with the new one (ory/hydra#3573):
/// those get a Warning Event, never a lost grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_hydra_rotates_its_id_token_signing_key_the_operator_verifies_with_the_new_key_and_keeps_refreshing() {
    const NOT_VERIFIED: &str = "IdTokenNotVerified";
    let mut env = Env::start(ttl(8)).await;
    env.create_authorized_grant("before").await;
    let (_operator, port) = env.start_operator_with(&[]);
    env.wait_ready("before", "True", "Refreshed", Duration::from_secs(30)).await;
    assert!(!env.events("before").await.iter().any(|(r, _)| r == NOT_VERIFIED));

    let kid = env.hydra.rotate_id_token_signing_key().await.unwrap();
    // Only the operator's client, discovered before the rotation, is under test here.
    env.rediscover_test_client().await;
    env.create_authorized_grant("after").await;
    let successes = |scrape: &str, g: &str| {
        support::metric(scrape, "wgtwo_grant_refresh_total", &[("name", g), ("result", "success")])
    };
    let before_at_rotation = successes(&support::scrape(port).await, "before");
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let scrape = support::scrape(port).await;
        if successes(&scrape, "after") >= 2.0 && successes(&scrape, "before") >= before_at_rotation + 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the grants did not refresh twice after the rotation");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let after_events = env.events("after").await;
    assert!(
        !after_events.iter().any(|(r, _)| r == NOT_VERIFIED),
        "the ID tokens signed with the new key {kid} were not verified: {after_events:?}"
    );
    let before_warnings = env.events("before").await.into_iter().filter(|(r, _)| r == NOT_VERIFIED).count();
    println!("rotated to {kid}; IdTokenNotVerified Events for the chain from before the rotation: {before_warnings}");
    for g in ["before", "after"] {
        env.wait_ready(g, "True", "Refreshed", Duration::from_secs(5)).await;
        assert!(env.live_token_is_active(g).await, "{g}: the persisted refresh token is no longer active");
        assert_eq!(env.secret_value(&format!("{g}-token"), "phone_number").await.as_deref(), Some("+4799999999"));
    }
}

/// Issue 23, item 2: a grant naming another grant's state Secret as its refresh token presented the
/// victim's live token (the victim's next refresh was then a reuse), and two grants naming one
/// authorization Secret each started a lineage from it (one of them dies). Both are refused before
/// any input is read, with no token request, and the victim keeps refreshing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_can_neither_read_another_grants_secrets_nor_fork_a_lineage_from_its_authorization() {
    let mut env = Env::start(HydraOptions { recording_proxy: true, ..ttl(3600) }).await;
    // An older grant with an authorization of its own, to be re-pointed at the victim's later.
    env.create_authorized_grant("elder").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    env.create_authorized_grant("victim").await;
    let _operator = env.start_operator();
    env.wait_ready("victim", "True", "Refreshed", Duration::from_secs(30)).await;
    env.wait_ready("elder", "True", "Refreshed", Duration::from_secs(30)).await;
    let requests = env.hydra.token_requests();

    let grant = |name: &str, client: &str, token: &str, key: &str| -> WgtwoGrant {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "auth.wgtwo.com/v1alpha1", "kind": "WgtwoGrant",
            "metadata": {"name": name},
            "spec": {
                "issuerUrl": env.hydra.base_url(),
                "clientSecretRef": {"name": client},
                "refreshTokenSecretRef": {"name": token, "key": key},
                "target": {"secretName": format!("{name}-token")},
            }
        }))
        .unwrap()
    };
    for g in [
        // The victim's live refresh token, from its state Secret.
        grant("thief", "wgtwo-client", "victim-wgtwo-state", "refresh_token"),
        // The victim's target Secret as an OAuth client.
        grant("peer", "victim-token", "victim-authorization", "refresh_token"),
        // A copied manifest: the victim's authorization, a second target.
        grant("copy", "wgtwo-client", "victim-authorization", "refresh_token"),
    ] {
        env.grants().create(&PostParams::default(), &g).await.unwrap();
    }
    // The older grant edited to name the victim's authorization (its creation time stays).
    let mut elder = env.grants().get("elder").await.unwrap();
    elder.spec.refresh_token_secret_ref.as_mut().unwrap().name = "victim-authorization".into();
    env.grants().replace("elder", &PostParams::default(), &elder).await.unwrap();
    env.wait_ready("elder", "False", "RefreshTokenInUse", Duration::from_secs(30)).await;
    env.wait_ready("thief", "False", "SecretNotAllowed", Duration::from_secs(30)).await;
    env.wait_ready("peer", "False", "SecretNotAllowed", Duration::from_secs(30)).await;
    env.wait_ready("copy", "False", "RefreshTokenInUse", Duration::from_secs(30)).await;
    let env = &env;
    let message = async |name: &str| env.status(name).await.unwrap().conditions[0].message.clone();
    let thief = message("thief").await;
    assert!(thief.contains("Secret victim-wgtwo-state (refreshTokenSecretRef) is written by the operator"), "{thief}");
    let peer = message("peer").await;
    assert!(peer.contains("Secret victim-token (clientSecretRef) is written by the operator"), "{peer}");
    let copy = message("copy").await;
    assert!(
        copy.contains("Secret victim-authorization (refreshTokenSecretRef) is the authorization of grant victim"),
        "{copy}"
    );
    let elder = message("elder").await;
    assert!(elder.contains("is the authorization of grant victim"), "{elder}");
    for (name, reason) in [("thief", "SecretNotAllowed"), ("peer", "SecretNotAllowed"), ("copy", "RefreshTokenInUse")] {
        assert!(env.events(name).await.iter().any(|(r, _)| r == reason), "{name}: no {reason} Event");
    }
    assert_eq!(env.hydra.token_requests(), requests, "no token request for any of them");
    for name in ["thief", "peer", "copy"] {
        assert!(env.secrets().get_opt(&format!("{name}-token")).await.unwrap().is_none(), "{name} got a token");
    }

    // The victim's lineage is whole: a requested refresh presents its live token, once.
    let live = env.live_refresh_token("victim").await.unwrap();
    env.request_refresh("victim", "after").await;
    env.wait_refresh_handled("victim", "after", Duration::from_secs(20)).await;
    assert_ne!(env.live_refresh_token("victim").await.as_deref(), Some(live.as_str()), "the victim did not refresh");
    assert!(env.live_token_is_active("victim").await);
    assert_eq!(env.hydra.recording_proxy().refresh_tokens_presented_twice(), Vec::<String>::new());
}

/// Issue 23, item 3: the watch client had no read timeout and no keepalive, so a watch connection
/// that died silently (a peer lost behind a stateful firewall) left the caches stale for good while
/// the Lease client reconnected and the process went on leading. Now the apiserver ends each watch
/// after 50 s and a connection silent for 60 s is made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_connection_that_dies_silently_is_noticed_and_made_again_within_a_minute() {
    let mut env = Env::start(ttl(3600)).await;
    env.create_authorized_grant("alice").await;
    let proxy =
        wgtwo_testenv::TcpProxy::start(env.cp.url().trim_start_matches("https://").parse().unwrap()).await.unwrap();
    let kubeconfig = env.operator_kubeconfig_through(proxy.port());
    let (operator, _) = env.start_operator_using(&[], &kubeconfig);
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;

    // Every connection open now (the watches among them) forwards nothing more and is never closed;
    // new connections work.
    proxy.blackhole_open_connections();
    let silenced = Instant::now();
    // A change that only the grant watch brings.
    env.request_refresh("alice", "after-silence").await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while env.status("alice").await.and_then(|s| s.refresh_request_handled).as_deref() != Some("after-silence") {
        assert!(
            Instant::now() < deadline,
            "the operator never saw the change through its dead watch; log:\n{}",
            operator.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let noticed = silenced.elapsed();
    println!("a silently dead watch was replaced and the change acted on {:.1}s later", noticed.as_secs_f64());
    assert!(noticed < Duration::from_secs(75), "{noticed:?}");
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(10)).await;
    assert!(env.live_token_is_active("alice").await);
}

/// Takes the operator's rights to write Secrets, then has it refresh `grant`: the rotated token is
/// kept, unwritten, once this returns.
async fn refresh_while_writes_are_refused(env: &Env, leader: &wgtwo_testenv::process::ChildGuard, grant: &str) {
    operator_secret_verbs(env, &["get", "list", "watch"]).await;
    env.request_refresh(grant, "doomed").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while log_count(leader, "could not persist the rotated refresh token") == 0 {
        assert!(Instant::now() < deadline, "no failed state write; log:\n{}", leader.log_tail(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 23, item 4: at SIGTERM the controller stopped at once and released the Lease, dropping an
/// answer whose state write was failing: the standby led at its next tick and presented the
/// rotated-away token (a reuse: Hydra revokes the family). Now the write is retried until
/// `--shutdown-timeout`, and the Lease is handed over only once no rotated token is held only here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_retrying_a_failed_state_write_and_hands_the_lease_over_only_once_it_landed() {
    const ALL: &[&str] = &["get", "list", "watch", "create", "update"];
    let mut env = Env::start(HydraOptions { recording_proxy: true, ..ttl(3600) }).await;
    env.create_authorized_grant("alice").await;
    let (mut leader, _) = env.start_operator_with(&["--shutdown-timeout", "20s"]);
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;
    let (standby, standby_port) = env.start_operator_with(&[]);
    support::scrape(standby_port).await;
    let persisted = env.live_refresh_token("alice").await.unwrap();

    // The leader refreshes, and cannot write the rotated token.
    refresh_while_writes_are_refused(&env, &leader, "alice").await;

    // SIGTERM now; the apiserver lets the write through again 3 s later.
    let sent = Instant::now();
    let exit = tokio::task::spawn_blocking(move || {
        let status = leader.terminate(Duration::from_secs(30)).unwrap();
        (status, leader)
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    operator_secret_verbs(&env, ALL).await;
    let (status, leader) = exit.await.unwrap();
    let took = sent.elapsed();
    println!("SIGTERM with an unwritten rotated token: exited {status} after {:.1}s", took.as_secs_f64());
    assert!(status.success(), "{status}");
    assert!(took > Duration::from_secs(3), "exited before the write could land");
    let log = std::fs::read_to_string(leader.log_path()).unwrap();
    assert!(log.contains("released the Lease"), "{}", leader.log_tail(20));
    let live = env.live_refresh_token("alice").await.unwrap();
    assert_ne!(live, persisted, "the rotated token was not written");
    assert!(env.active(&live).await, "the written token is not the live one");

    // The standby leads and continues the lineage from it.
    env.request_refresh("alice", "after").await;
    env.wait_refresh_handled("alice", "after", Duration::from_secs(30)).await;
    drop(standby);
    assert!(env.live_token_is_active("alice").await);
    assert_eq!(env.hydra.recording_proxy().refresh_tokens_presented_twice(), Vec::<String>::new());
}

/// The other half of item 4: when the write cannot land before the shutdown timeout, the Lease is
/// not released (the standby would present the rotated-away token at once); it expires instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_rotated_token_that_cannot_be_written_leaves_the_lease_to_expire() {
    let mut env = Env::start(HydraOptions { recording_proxy: true, ..ttl(3600) }).await;
    env.create_authorized_grant("alice").await;
    let (mut leader, _) = env.start_operator_with(&["--shutdown-timeout", "2s"]);
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;
    refresh_while_writes_are_refused(&env, &leader, "alice").await;
    let status = tokio::task::block_in_place(|| leader.terminate(Duration::from_secs(20))).unwrap();
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(leader.log_path()).unwrap();
    assert!(log.contains("not releasing the Lease"), "{}", leader.log_tail(20));
    assert!(!log.contains("released the Lease"), "{}", leader.log_tail(20));
    use k8s_openapi::api::coordination::v1::Lease;
    let lease = Api::<Lease>::namespaced(env.kube.clone(), OPERATOR_NS).get("wgtwo-operator").await.unwrap();
    let holder = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    assert!(holder.starts_with("operator-1_"), "the Lease still names the stopped leader: {holder:?}");
}

/// Issue 23, item 5, against the operator: a 2xx refresh answer the typed parser refuses still
/// rotated the token at the server. Its tokens are kept and published (with a Warning); an answer
/// with no token in it at all ends the grant's refreshes instead of presenting the old token again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_answer_that_cannot_be_parsed_never_leads_to_the_old_token_being_sent_again() {
    let mut env = Env::start(ttl(3600)).await;
    let stub = FaultServer::start().await.unwrap();
    let odd = serde_json::json!({
        "access_token": "stub-access-raw", "refresh_token": "stub-refresh-raw", "token_type": "bearer",
        "expires_in": 3600, "id_token": "not-a-jwt",
    });
    stub.push(Fault::Malformed(odd.to_string()));
    env.create_grant("odd", "user-token-odd", |s| s.issuer_url = stub.base_url().to_owned()).await;
    let (_operator, _) = env.start_operator_with(&["--allowed-issuer", stub.base_url()]);
    env.wait_ready("odd", "True", "Refreshed", Duration::from_secs(30)).await;
    assert_eq!(env.live_refresh_token("odd").await.as_deref(), Some("stub-refresh-raw"));
    assert_eq!(env.secret_value("odd-token", "access_token").await.as_deref(), Some("stub-access-raw"));
    let events = env.events("odd").await;
    assert!(events.iter().any(|(r, _)| r == "IdTokenNotVerified"), "{events:?}");
    assert!(events.iter().all(|(_, note)| !note.contains("not-a-jwt") && !note.contains("stub-")), "{events:?}");
    assert_eq!(stub.token_requests(), 1);

    stub.push(Fault::Malformed("<html>OK</html>".into()));
    env.create_grant("lost", "user-token-lost", |s| s.issuer_url = stub.base_url().to_owned()).await;
    env.wait_ready("lost", "False", "RefreshOutcomeUnknown", Duration::from_secs(30)).await;
    let message = env.status("lost").await.unwrap().conditions[0].message.clone();
    assert!(message.contains("not sent again") && message.contains("wgtwo-operator authorize lost"), "{message}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(stub.token_requests(), 2, "the used-up refresh token was sent again");
}

/// Issue 23, item 6: the ID token was verified between the answer and the state write, outside the
/// Lease margin, and an ID token naming an unknown key made each waiting request fetch the issuer's
/// keys in turn when the fetch failed. Now the state is written first, and a failed fetch is
/// remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rotated_token_is_written_before_the_id_token_is_verified_and_a_failed_key_fetch_is_not_repeated() {
    const GRANTS: usize = 4;
    let mut env = Env::start(HydraOptions { recording_proxy: true, ..ttl(3600) }).await;
    env.create_authorized_grant("warm").await;
    let (_operator, _) = env.start_operator_with(&[]);
    env.wait_ready("warm", "True", "Refreshed", Duration::from_secs(30)).await;
    // The operator knows the issuer's keys; the issuer adds one, and signs the ID tokens of new
    // authorizations with it.
    env.hydra.rotate_id_token_signing_key().await.unwrap();
    env.rediscover_test_client().await;
    let names: Vec<String> = (0..GRANTS).map(|i| format!("new-{i}")).collect();
    let mut tokens = Vec::new();
    for name in &names {
        tokens.push(env.authorize(name).await);
    }
    // Its key set answers slowly, then with a 503.
    let proxy = env.hydra.recording_proxy();
    proxy.hold_key_set(Duration::from_secs(8));
    proxy.fail_key_set(true);
    let fetches = proxy.key_set_requests();
    let created = Instant::now();
    for (name, token) in names.iter().zip(&tokens) {
        env.create_grant(name, token, |_| {}).await;
    }
    for name in &names {
        while env.live_refresh_token(name).await.is_none() {
            assert!(
                created.elapsed() < Duration::from_secs(6),
                "{name}: the rotated refresh token waited for the issuer's keys"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!(
        "all {GRANTS} rotated tokens written {:.1}s after the grants were created",
        created.elapsed().as_secs_f64()
    );
    for name in &names {
        env.wait_ready(name, "True", "Refreshed", Duration::from_secs(30)).await;
        assert!(env.live_token_is_active(name).await);
        let events = env.events(name).await;
        assert!(events.iter().any(|(r, _)| r == "IdTokenNotVerified"), "{name}: {events:?}");
    }
    assert_eq!(proxy.key_set_requests() - fetches, 1, "each waiting request fetched the keys again");
}

/// Issue 23, item 8: a grant deleted while its token request was in flight left memory and metric
/// series behind (the reconcile's error path re-created them after the deletion was handled), until
/// the next relist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_deleted_mid_refresh_leaves_no_memory_or_metric_series_behind() {
    let mut env = Env::start(ttl(3600)).await;
    let stub = FaultServer::start().await.unwrap();
    stub.push(Fault::Delay(Duration::from_secs(3)));
    env.create_grant("doomed", "user-token", |s| s.issuer_url = stub.base_url().to_owned()).await;
    let (_operator, port) = env.start_operator_with(&["--allowed-issuer", stub.base_url()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while stub.token_requests() == 0 {
        assert!(Instant::now() < deadline, "no token request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.grants().delete("doomed", &Default::default()).await.unwrap();
    // The answer comes 3 s after the request; its writes fail or land on a deleted grant.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let scrape = support::scrape(port).await;
    assert_eq!(support::metric(&scrape, "wgtwo_operator_grants_in_memory", &[]), 0.0, "{scrape}");
    let series: Vec<&str> = scrape.lines().filter(|l| !l.starts_with('#') && l.contains("name=\"doomed\"")).collect();
    assert!(series.is_empty(), "{series:#?}");
}
