//! The grant controller end to end: the operator binary against a real apiserver and a real Hydra
//! with short token lifetimes.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding};
use kube::api::{Patch, PatchParams};
use support::{Env, NS, ttl};
use wgtwo_testenv::HydraOptions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_becomes_ready_and_is_refreshed_ahead_of_every_expiry_killing_each_old_refresh_token() {
    let mut env = Env::start(ttl(12)).await;
    let first = env.authorize("alice").await;
    env.create_grant("alice", &first, |_| {}).await;
    let _operator = env.start_operator();
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;

    let target = env.secrets().get("alice-token").await.unwrap();
    let mut keys: Vec<_> = target.data.as_ref().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["access_token", "expires_at", "phone_number", "scope", "token_type"]);
    assert_eq!(env.secret_value("alice-token", "phone_number").await.as_deref(), Some("+4799999999"));
    assert_eq!(env.secret_value("alice-token", "token_type").await.as_deref(), Some("Bearer"));
    let owner = &target.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("WgtwoGrant", "alice", Some(true)));
    let status = env.status("alice").await.unwrap();
    assert_eq!(status.subject.as_deref(), Some("alice"));
    assert!(status.expires_at.is_some() && status.next_refresh_time.is_some() && status.last_refresh_time.is_some());
    assert_eq!(status.observed_generation, Some(1));
    let table = env.cp.kubectl(&["get", "wgtwogrants", "-n", NS]).unwrap();
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..4], ["alice", "refresh_token", "True", "Refreshed"], "{table}");

    // Watch three more refreshes: each new token appears before the one it replaces expires, and
    // every refresh token the operator has moved past is dead.
    let mut seen_refresh_tokens = vec![first];
    let mut current = env.secret_value("alice-token", "access_token").await.unwrap();
    let mut current_expiry: jiff::Timestamp =
        env.secret_value("alice-token", "expires_at").await.unwrap().parse().unwrap();
    let mut refreshes = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while refreshes < 3 {
        assert!(Instant::now() < deadline, "only {refreshes} refreshes in 60s");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let token = env.secret_value("alice-token", "access_token").await.unwrap();
        if token == current {
            continue;
        }
        let now = jiff::Timestamp::now();
        assert!(now < current_expiry, "the new token came after the old one expired ({now} >= {current_expiry})");
        assert!(env.active(&token).await, "the published access token is active");
        current = token;
        current_expiry = env.secret_value("alice-token", "expires_at").await.unwrap().parse().unwrap();
        let live = env.live_refresh_token("alice").await.unwrap();
        if !seen_refresh_tokens.contains(&live) {
            seen_refresh_tokens.push(live);
        }
        refreshes += 1;
    }
    let (live, old) = seen_refresh_tokens.split_last().unwrap();
    assert!(env.active(live).await);
    for token in old {
        assert!(!env.active(token).await, "a rotated-out refresh token is still active");
    }
    // One token request per refresh (plus the test's own code exchange), nothing more.
    let requests = env.hydra.token_requests();
    assert!(requests <= 1 + 1 + refreshes + 1, "{requests} token requests for {refreshes} refreshes");
    // Reconciles triggered by the operator's own Secret writes see a cached grant older than its
    // last status write; they must not drop what only a refresh knows.
    let status = env.status("alice").await.unwrap();
    assert_eq!(status.subject.as_deref(), Some("alice"));
    assert!(status.scope.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_restart_sends_no_refresh_while_the_published_token_is_valid() {
    let mut env = Env::start(ttl(3600)).await;
    env.create_authorized_grant("alice").await;
    let mut operator = env.start_operator();
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;
    let published = env.secret_value("alice-token", "access_token").await;
    let requests = env.hydra.token_requests();

    for restart in 0..3 {
        assert!(operator.terminate(Duration::from_secs(10)).unwrap().success(), "SIGTERM exits 0");
        operator = env.start_operator();
        // Wait until the new process has reconciled the grant and decided to wait.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(operator.log_path()).unwrap().contains("next refresh scheduled") {
            assert!(Instant::now() < deadline, "restart {restart}: no reconcile logged");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.hydra.token_requests(), requests, "a restart refreshed a valid token");
    assert_eq!(env.secret_value("alice-token", "access_token").await, published);
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_now_annotation_refreshes_once() {
    let mut env = Env::start(ttl(3600)).await;
    env.create_authorized_grant("alice").await;
    let _operator = env.start_operator();
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;
    let before = env.secret_value("alice-token", "access_token").await;
    let requests = env.hydra.token_requests();
    let patch = serde_json::json!({"metadata": {"annotations": {"auth.wgtwo.com/refresh-requested-at": "2026-11-24T12:00:00Z"}}});
    env.grants().patch("alice", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.secret_value("alice-token", "access_token").await == before {
        assert!(Instant::now() < deadline, "the annotation did not trigger a refresh");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.hydra.token_requests(), requests + 1, "one request per annotation value");
    let status = env.status("alice").await.unwrap();
    assert_eq!(status.refresh_request_handled.as_deref(), Some("2026-11-24T12:00:00Z"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_permanent_problem_has_its_reason_and_sends_no_repeated_token_requests() {
    let mut env = Env::start(ttl(3600)).await;

    // A refresh token that was already rotated away.
    let used = env.authorize("used").await;
    env.wgtwo.refresh(&wgtwo_operator::oauth::secrets::RefreshToken::new(used.clone()), None).await.unwrap();
    env.create_grant("used", &used, |_| {}).await;
    // A wrong client secret.
    env.put_secret("bad-client", &[("client_id", &env.client.client_id), ("client_secret", "wrong-secret-value")])
        .await;
    let valid = env.authorize("badclient").await;
    env.create_grant("badclient", &valid, |s| s.client_secret_ref.name = "bad-client".into()).await;
    // A Secret that does not exist, and a key that does not exist.
    env.create_grant("nosecret", "unused", |s| {
        s.refresh_token_secret_ref.as_mut().unwrap().name = "missing-secret".into()
    })
    .await;
    env.create_grant("nokey", "unused", |s| s.refresh_token_secret_ref.as_mut().unwrap().key = "other".into()).await;
    // A target name already taken by someone else's Secret.
    env.put_secret("taken", &[("config", "someone else's")]).await;
    let valid2 = env.authorize("conflict").await;
    env.create_grant("conflict", &valid2, |s| s.target.secret_name = "taken".into()).await;

    let baseline = env.hydra.token_requests();
    let _operator = env.start_operator();
    let timeout = Duration::from_secs(30);
    env.wait_ready("used", "False", "InvalidGrant", timeout).await;
    env.wait_ready("badclient", "False", "InvalidClient", timeout).await;
    env.wait_ready("nosecret", "False", "SecretNotFound", timeout).await;
    env.wait_ready("nokey", "False", "SecretKeyMissing", timeout).await;
    env.wait_ready("conflict", "False", "TargetConflict", timeout).await;
    assert_eq!(env.secret_value("taken", "config").await.as_deref(), Some("someone else's"), "not overwritten");

    // Messages say what to do; Events carry the same reasons.
    let message = |name: &'static str| {
        let env = &env;
        async move { env.status(name).await.unwrap().conditions[0].message.clone() }
    };
    assert!(message("used").await.contains("Re-authorize"), "{}", message("used").await);
    assert!(message("badclient").await.contains("Secret bad-client"), "{}", message("badclient").await);
    assert!(message("nosecret").await.contains("missing-secret"));
    assert!(message("nokey").await.contains("key other"));
    assert!(env.events("used").await.iter().any(|(r, _)| r == "InvalidGrant"));

    // Two token requests (one per grant that reached the identity service), and no more: not after
    // a while, not when the grants are touched.
    assert_eq!(env.hydra.token_requests(), baseline + 2);
    for name in ["used", "badclient", "nosecret", "nokey", "conflict"] {
        let patch = serde_json::json!({"metadata": {"annotations": {"example.com/touched": "yes"}}});
        env.grants().patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(env.hydra.token_requests(), baseline + 2, "a permanent failure was retried");
    for (_, note) in env.events("badclient").await {
        assert!(!note.contains("wrong-secret-value"), "an Event carries the client secret");
    }

    // Re-authorization through the user's Secret recovers the InvalidGrant grant without a restart.
    let fresh = env.authorize("used").await;
    env.put_secret("used-authorization", &[("refresh_token", &fresh)]).await;
    env.wait_ready("used", "True", "Refreshed", timeout).await;
    // Fixing the missing Secret recovers that one.
    let fixed = env.authorize("nosecret").await;
    env.put_secret("missing-secret", &[("refresh_token", &fixed)]).await;
    env.wait_ready("nosecret", "True", "Refreshed", timeout).await;
    // Moving the target off the taken name recovers the conflict.
    let patch = serde_json::json!({"spec": {"target": {"secretName": "conflict-token"}}});
    env.grants().patch("conflict", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    env.wait_ready("conflict", "True", "Refreshed", timeout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_service_outage_backs_off_visibly_and_recovers_without_restart() {
    let mut env = Env::start(HydraOptions { persistent: true, ..ttl(8) }).await;
    env.create_authorized_grant("alice").await;
    let _operator = env.start_operator();
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;

    env.hydra.stop().unwrap();
    let outage = Instant::now();
    // While the published token is valid: still Ready, retrying; after it expires: not Ready.
    env.wait_ready("alice", "True", "RetryingRefresh", Duration::from_secs(15)).await;
    env.wait_ready("alice", "False", "IdentityServiceUnavailable", Duration::from_secs(20)).await;
    let status = env.status("alice").await.unwrap();
    let message = status.conditions[0].message.clone();
    assert!(message.contains("Retrying with backoff"), "{message}");
    assert!(status.failed_attempts.is_some_and(|n| n >= 1) && status.last_failure_time.is_some(), "{status:?}");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let failures: Vec<String> =
        env.events("alice").await.into_iter().filter(|(r, _)| r == "RefreshFailed").map(|(_, n)| n).collect();
    assert!(!failures.is_empty(), "no RefreshFailed Event");
    // Backoff: far fewer attempts than a hot loop would make (min 500 ms, doubling, max 4 s).
    let log = std::fs::read_to_string(env.dir.path().join("operator-1.log")).unwrap();
    let attempts = log.matches("refreshing").count();
    println!("outage: {attempts} refresh attempts in the first {:?} of the outage", outage.elapsed());
    assert!(attempts < 15, "{attempts} refresh attempts during the outage");

    env.hydra.restart().await.unwrap();
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(15)).await;
    let published = env.secret_value("alice-token", "access_token").await.unwrap();
    assert!(env.active(&published).await);
}

/// A ValidatingAdmissionPolicy refusing UPDATEs of `resource` (in API group `group`) whose object
/// fails `expression`, as an outage or a bad webhook would; in effect once a write is refused.
struct Freeze {
    name: &'static str,
    policies: kube::Api<ValidatingAdmissionPolicy>,
    bindings: kube::Api<ValidatingAdmissionPolicyBinding>,
}

impl Freeze {
    async fn start(env: &Env, name: &'static str, group: &str, resource: &str, expression: &str) -> Self {
        let policy: ValidatingAdmissionPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{"apiGroups": [group], "apiVersions": ["*"], "operations": ["UPDATE"], "resources": [resource]}]},
                "validations": [{"expression": expression, "message": "frozen by the test"}],
            }
        }))
        .unwrap();
        let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"policyName": name, "validationActions": ["Deny"]}
        }))
        .unwrap();
        let freeze =
            Freeze { name, policies: kube::Api::all(env.kube.clone()), bindings: kube::Api::all(env.kube.clone()) };
        freeze.policies.create(&Default::default(), &policy).await.unwrap();
        freeze.bindings.create(&Default::default(), &binding).await.unwrap();
        freeze
    }

    async fn lift(self) {
        self.bindings.delete(self.name, &Default::default()).await.unwrap();
        self.policies.delete(self.name, &Default::default()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_refresh_token_that_cannot_be_persisted_is_kept_in_memory_until_it_can() {
    let mut env = Env::start(ttl(3600)).await;
    env.create_authorized_grant("alice").await;
    let _operator = env.start_operator();
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;
    let persisted = env.live_refresh_token("alice").await.unwrap();
    let published = env.secret_value("alice-token", "access_token").await;

    // The apiserver refuses every update of the state Secret, as an outage or a bad webhook would.
    let freeze =
        Freeze::start(&env, "freeze-state", "", "secrets", "object.metadata.name != 'alice-wgtwo-state'").await;
    // Policies take effect asynchronously: wait until an update is refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut state = env.secrets().get("alice-wgtwo-state").await.unwrap();
        state.metadata.labels.get_or_insert_default().insert("probe".into(), "x".into());
        if env.secrets().replace("alice-wgtwo-state", &Default::default(), &state).await.is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "the admission policy never took effect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let requests = env.hydra.token_requests();
    let patch = serde_json::json!({"metadata": {"annotations": {"auth.wgtwo.com/refresh-requested-at": "now"}}});
    env.grants().patch("alice", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.hydra.token_requests() == requests {
        assert!(Instant::now() < deadline, "the requested refresh never happened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The write keeps failing; the operator retries it, but never refreshes again meanwhile, and
    // does not publish an access token whose refresh token is not safe.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(env.hydra.token_requests(), requests + 1, "refreshed again while an answer was unpersisted");
    assert_eq!(env.live_refresh_token("alice").await.as_deref(), Some(persisted.as_str()));
    assert_eq!(env.secret_value("alice-token", "access_token").await, published);
    let log = std::fs::read_to_string(env.dir.path().join("operator-1.log")).unwrap();
    assert!(log.contains("could not persist the rotated refresh token"), "the failure is logged");

    // Lift the freeze: the answer held in memory is written, and it is the live lineage.
    freeze.lift().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.live_refresh_token("alice").await.as_deref() == Some(persisted.as_str()) {
        assert!(Instant::now() < deadline, "the kept refresh token was never persisted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let live = env.live_refresh_token("alice").await.unwrap();
    assert!(env.active(&live).await, "the persisted token is the one the server issued");
    assert!(!env.active(&persisted).await);
    assert_ne!(env.secret_value("alice-token", "access_token").await, published);
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(10)).await;
    assert_eq!(env.hydra.token_requests(), requests + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_refresh_whose_status_cannot_be_written_is_not_repeated() {
    let mut env = Env::start(ttl(3600)).await;
    env.create_authorized_grant("alice").await;
    let _operator = env.start_operator();
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;

    // The apiserver refuses every status write of the grant, as an outage or a bad webhook would.
    let freeze =
        Freeze::start(&env, "freeze-status", "auth.wgtwo.com", "wgtwogrants/status", "object.metadata.name != 'alice'")
            .await;
    // Policies take effect asynchronously: wait until a status write (changing nothing) is refused.
    let deadline = Instant::now() + Duration::from_secs(20);
    let probe = serde_json::json!({"status": {"grantType": "refresh_token"}});
    while env.grants().patch_status("alice", &PatchParams::default(), &Patch::Merge(&probe)).await.is_ok() {
        assert!(Instant::now() < deadline, "the admission policy never took effect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let requests = env.hydra.token_requests();
    env.request_refresh("alice", "once").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.hydra.token_requests() == requests {
        assert!(Instant::now() < deadline, "the requested refresh never happened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The state and target Secrets hold the answer; the status that records the request as
    // handled keeps failing. Its retries must not refresh again.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(env.hydra.token_requests(), requests + 1, "refreshed again while the status could not be written");

    freeze.lift().await;
    env.wait_refresh_handled("alice", "once", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.hydra.token_requests(), requests + 1, "one request, one refresh");
    assert!(env.live_token_is_active("alice").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_unauthorized_client_invalid_scope_other_rejections_and_state_conflicts_each_have_their_reason() {
    use wgtwo_testenv::{Fault, FaultServer};
    let mut env = Env::start(ttl(3600)).await;
    let rejected = |error: &str| Fault::Status {
        status: 400,
        retry_after: None,
        body: format!(r#"{{"error":"{error}","error_description":"refused by the test"}}"#),
    };

    // An issuer URL that is not an OpenID Connect issuer (allowed, so it is tried).
    let not_oidc = format!("{}/not-here", env.hydra.base_url());
    env.create_grant("discovery", "unused", |s| s.issuer_url = not_oidc.clone()).await;
    // A client that may not use the refresh_token grant (Hydra answers unauthorized_client).
    let limited = env.hydra.create_client_with_grant_types(&[], &["client_credentials"]).await.unwrap();
    env.put_secret("limited-client", &[("client_id", &limited.client_id), ("client_secret", &limited.client_secret)])
        .await;
    let token = env.authorize("unauthorized").await;
    env.create_grant("unauthorized", &token, |s| s.client_secret_ref.name = "limited-client".into()).await;
    // Hydra ignores spec.scope on refresh, so invalid_scope and other OAuth errors come from stubs.
    let scope_stub = FaultServer::start().await.unwrap();
    scope_stub.push(rejected("invalid_scope"));
    env.create_grant("scope", "rt-scope", |s| {
        s.issuer_url = scope_stub.base_url().to_owned();
        s.scope = Some("payments".into());
    })
    .await;
    let other_stub = FaultServer::start().await.unwrap();
    other_stub.push(rejected("unsupported_grant_type"));
    env.create_grant("other", "rt-other", |s| s.issuer_url = other_stub.base_url().to_owned()).await;
    // The state Secret's name is taken by someone else's Secret.
    env.put_secret("conflicted-wgtwo-state", &[("note", "not the operator's")]).await;
    env.create_authorized_grant("conflicted").await;

    let baseline = env.hydra.token_requests();
    let _operator = env.start_operator_with(&[
        "--allowed-issuer",
        &not_oidc,
        "--allowed-issuer",
        scope_stub.base_url(),
        "--allowed-issuer",
        other_stub.base_url(),
    ]);
    let timeout = Duration::from_secs(30);
    env.wait_ready("discovery", "False", "DiscoveryFailed", timeout).await;
    env.wait_ready("unauthorized", "False", "UnauthorizedClient", timeout).await;
    env.wait_ready("scope", "False", "InvalidScope", timeout).await;
    env.wait_ready("other", "False", "RefreshRejected", timeout).await;
    env.wait_ready("conflicted", "False", "StateConflict", timeout).await;

    let message = |name: &'static str| {
        let env = &env;
        async move { env.status(name).await.unwrap().conditions[0].message.clone() }
    };
    for (name, advice) in [
        ("discovery", "Check spec.issuerUrl"),
        ("unauthorized", "Secret limited-client"),
        ("scope", "Fix spec.scope"),
        ("other", "Re-authorize"),
        ("conflicted", "conflicted-wgtwo-state"),
    ] {
        let text = message(name).await;
        assert!(text.contains(advice), "{name}: {text}");
        assert!(!env.events(name).await.is_empty(), "{name}: no Event");
    }
    assert_eq!(
        env.secret_value("conflicted-wgtwo-state", "note").await.as_deref(),
        Some("not the operator's"),
        "not overwritten"
    );
    // Refused for good: no repeated token requests.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(env.hydra.token_requests(), baseline + 1, "only the unauthorized client's one request");
    assert_eq!((scope_stub.token_requests(), other_stub.token_requests()), (1, 1));
}

/// The operator reacts to someone else's change of a Secret it owns at once, not at the grant's
/// next scheduled refresh: a target Secret whose access token was removed holds one again within
/// seconds (tokens live an hour here, so only the change can have caused it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_secret_someone_else_changes_is_put_right_at_once() {
    let mut env = Env::start(HydraOptions::default()).await;
    env.create_authorized_grant("alice").await;
    let _operator = env.start_operator();
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;
    let published = env.secret_value("alice-token", "access_token").await.unwrap();
    let patch = serde_json::json!({"data": {"access_token": null}});
    env.secrets().patch("alice-token", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(token) = env.secret_value("alice-token", "access_token").await.filter(|t| !t.is_empty()) {
            assert_ne!(token, published, "a new token is published");
            assert!(env.active(&token).await);
            break;
        }
        assert!(Instant::now() < deadline, "the target Secret was not put right within 15 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
