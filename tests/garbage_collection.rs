//! Owner references, proven with Kubernetes' own garbage collector (kube-controller-manager built
//! from the same module as the apiserver): a deleted grant takes its target and state Secrets with
//! it, and the operator does not bring them back (nor send a token request) while the grant is
//! being deleted, also when its watch of grants lags its watch of Secrets: the collector's
//! deletions then reach it before the grant's own deletion does.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy, WatchEvent, WatchParams};
use support::Env;
use wgtwo_testenv::{HydraOptions, WatchLagProxy};

/// How late the operator hears of grant changes while grants are deleted. Its watch read timeout
/// is the watch's 50 s plus 10 s: a lag near 10 s would reset quiet watches.
const LAG: Duration = Duration::from_secs(8);

async fn wait_gone(env: &Env, created: &Created, secret: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(stored) = env.secrets().get_opt(secret).await.unwrap() {
        assert!(
            Instant::now() < deadline,
            "Secret {secret} still exists 60 s after its grant was deleted (created at {:?}; created since the \
             deletions: {:?}); the garbage collector's log about grants:\n{}\nthe operator's log:\n{}",
            stored.metadata.creation_timestamp,
            created.names.lock().unwrap(),
            collector_log(env),
            log_of(env)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// kube-controller-manager's log lines naming grants (is the collector watching them at all?).
fn collector_log(env: &Env) -> String {
    let log = std::fs::read_to_string(env.cp.dir().join("kube-controller-manager.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("wgtwogrant") || l.contains("monitors")).collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The operator's log lines about grants (it logs no secret), for a failure message.
fn log_of(env: &Env) -> String {
    let logs = support::operator_logs(env).join("\n");
    logs.lines().filter(|l| l.contains("grant=")).collect::<Vec<_>>().join("\n")
}

/// The Secrets created in the test namespace from now on (a recreated Secret shows even if the
/// collector deletes it again at once).
struct Created {
    names: Arc<Mutex<Vec<String>>>,
    ended: Arc<AtomicBool>,
}

impl Created {
    async fn record(env: &Env) -> Self {
        let list = env.secrets().list_metadata(&ListParams::default().limit(1)).await.unwrap();
        let version = list.metadata.resource_version.unwrap();
        let mut events = env.secrets().watch(&WatchParams::default().timeout(280), &version).await.unwrap().boxed();
        let (names, ended) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (n, e) = (names.clone(), ended.clone());
        tokio::spawn(async move {
            while let Some(Ok(event)) = events.next().await {
                match event {
                    WatchEvent::Added(secret) => n.lock().unwrap().push(Secret::name_any(&secret)),
                    WatchEvent::Error(_) => break,
                    _ => {}
                }
            }
            e.store(true, Ordering::SeqCst);
        });
        Self { names, ended }
    }

    /// Those of `names` created so far; fails if the watch ended (it would have missed some).
    fn of(&self, names: &[&str]) -> Vec<String> {
        assert!(!self.ended.load(Ordering::SeqCst), "the watch recording created Secrets ended early");
        self.names.lock().unwrap().iter().filter(|n| names.contains(&n.as_str())).cloned().collect()
    }
}

/// Whether the operator read `grant` from the apiserver and found it deleted or being deleted
/// before its lagging watch showed it (else the collector was slower than the lag, and the race
/// this test is about did not happen).
fn read_before_its_watch_showed(env: &Env, grant: &str) -> bool {
    let logs = support::operator_logs(env).join("\n");
    let grant = format!("grant=\"{grant}\"");
    logs.lines().any(|l| l.contains(&grant) && l.contains("which its watch had not shown yet"))
}

/// Deletes `name` in the foreground, held open by a finalizer of ours: the garbage collector deletes
/// the Secrets while the grant still exists (with a deletionTimestamp).
async fn delete_held(env: &Env, name: &str) {
    let hold = serde_json::json!({"metadata": {"finalizers": ["test.example/hold"]}});
    env.grants().patch(name, &PatchParams::default(), &Patch::Merge(&hold)).await.unwrap();
    let foreground = DeleteParams { propagation_policy: Some(PropagationPolicy::Foreground), ..Default::default() };
    env.grants().delete(name, &foreground).await.unwrap();
}

async fn release(env: &Env, name: &str) {
    let release = serde_json::json!({"metadata": {"finalizers": null}});
    env.grants().patch(name, &PatchParams::default(), &Patch::Merge(&release)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_grant_removes_its_secrets_and_the_operator_does_not_recreate_them_even_with_its_grant_watch_lagging()
 {
    let mut env = Env::start(HydraOptions { access_token_ttl: Duration::from_secs(3600), ..Default::default() }).await;
    env.cp.start_garbage_collector().await.unwrap();
    for name in ["alice", "bob"] {
        env.create_authorized_grant(name).await;
    }
    // Refused at its first attempt: never served, the refusal kept in its state Secret.
    env.create_grant("carol", "not-a-refresh-token-hydra-issued", |_| {}).await;
    let proxy = WatchLagProxy::start(env.cp.url(), env.cp.ca_pem(), "wgtwogrants").unwrap();
    let kubeconfig = env.operator_kubeconfig_via(&proxy.url(), proxy.ca_pem());
    let _operator = env.start_operator_using(&[], &kubeconfig);
    for name in ["alice", "bob"] {
        env.wait_ready(name, "True", "Refreshed", Duration::from_secs(30)).await;
    }
    env.wait_ready("carol", "False", "InvalidGrant", Duration::from_secs(30)).await;
    assert!(env.secrets().get_opt("carol-wgtwo-state").await.unwrap().is_some(), "the refusal is kept");
    // The collector deletes, in a foreground deletion, the dependents its graph holds when the
    // deletion begins: a Secret written a moment ago that its informer has not shown it yet stays
    // until the owner is gone (here: held by our finalizer). Seen here with Secrets written under
    // a second before the deletion; give its informer time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let requests = env.hydra.token_requests();
    let created = Created::record(&env).await;
    // From here the operator learns of a grant's deletion LAG late, and of its Secrets' deletion at
    // once: what it sees first is a grant that looks live and has lost its Secrets.
    proxy.set_lag(LAG);
    let lagged = proxy.lagged_chunks();

    for name in ["alice", "carol"] {
        delete_held(&env, name).await;
    }
    for secret in ["alice-token", "alice-wgtwo-state", "carol-wgtwo-state"] {
        wait_gone(&env, &created, secret).await;
    }
    // Until the lagging watch has delivered the deletions, and a while after.
    tokio::time::sleep(LAG + Duration::from_secs(4)).await;
    assert!(proxy.lagged_chunks() > lagged, "the operator's grant watch did not lag: the test proves nothing");
    let held = ["alice-token", "alice-wgtwo-state", "carol-wgtwo-state"];
    for secret in held {
        assert!(
            env.secrets().get_opt(secret).await.unwrap().is_none(),
            "{secret} was recreated for a grant being deleted; the operator's log:\n{}",
            log_of(&env)
        );
    }
    let recreated = created.of(&held);
    assert!(recreated.is_empty(), "recreated for a grant being deleted: {recreated:?}\n{}", log_of(&env));
    assert_eq!(env.hydra.token_requests(), requests, "a grant being deleted was refreshed:\n{}", log_of(&env));
    // Last, that the race happened at all: else the above proves nothing.
    for name in ["alice", "carol"] {
        assert!(env.grants().get_opt(name).await.unwrap().is_some(), "the finalizer holds {name}");
        assert!(
            read_before_its_watch_showed(&env, name),
            "the operator never saw {name}'s Secrets gone before its deletion (the collector slower than the lag?):\n{}",
            log_of(&env)
        );
    }
    for name in ["alice", "carol"] {
        release(&env, name).await;
    }

    // Background deletion (kubectl's default): the Secrets go after the grant.
    env.grants().delete("bob", &DeleteParams::default()).await.unwrap();
    wait_gone(&env, &created, "bob-token").await;
    wait_gone(&env, &created, "bob-wgtwo-state").await;
    tokio::time::sleep(LAG + Duration::from_secs(4)).await;
    let gone = ["alice-token", "alice-wgtwo-state", "carol-wgtwo-state", "bob-token", "bob-wgtwo-state"];
    for secret in gone {
        assert!(env.secrets().get_opt(secret).await.unwrap().is_none(), "{secret} came back:\n{}", log_of(&env));
    }
    let recreated = created.of(&gone);
    assert!(recreated.is_empty(), "recreated for a deleted grant: {recreated:?}\n{}", log_of(&env));
    assert_eq!(env.hydra.token_requests(), requests, "a deleted grant was refreshed:\n{}", log_of(&env));
    assert!(
        read_before_its_watch_showed(&env, "bob"),
        "the operator never saw bob's Secrets gone before its deletion (the collector slower than the lag?):\n{}",
        log_of(&env)
    );
    // The user's own Secrets (inputs) are not owned by the grant and stay.
    assert!(env.secrets().get_opt("alice-authorization").await.unwrap().is_some());
}
