//! Owner references, proven with Kubernetes' own garbage collector (kube-controller-manager built
//! from the same module as the apiserver): a deleted grant takes its target and state Secrets with
//! it, and the operator does not bring them back while the grant is being deleted, also when its
//! watch of grants lags its watch of Secrets (the collector's deletions then arrive first).

mod support;

use std::time::{Duration, Instant};

use kube::api::{DeleteParams, Patch, PatchParams, PropagationPolicy};
use support::Env;
use wgtwo_testenv::{HydraOptions, WatchLagProxy};

/// How late the operator hears of grant changes while grants are deleted.
const LAG: Duration = Duration::from_secs(8);

async fn wait_gone(env: &Env, secret: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.secrets().get_opt(secret).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "Secret {secret} still exists 60 s after its grant was deleted; the operator's log:\n{}",
            log_of(env)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The operator's log lines about grants (it logs no secret), for a failure message.
fn log_of(env: &Env) -> String {
    let logs = support::operator_logs(env).join("\n");
    logs.lines().filter(|l| l.contains("grant=")).collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_grant_removes_its_secrets_and_the_operator_does_not_recreate_them_even_with_its_grant_watch_lagging()
 {
    let mut env = Env::start(HydraOptions { access_token_ttl: Duration::from_secs(3600), ..Default::default() }).await;
    env.cp.start_garbage_collector().await.unwrap();
    for name in ["alice", "bob"] {
        env.create_authorized_grant(name).await;
    }
    let proxy = WatchLagProxy::start(env.cp.url(), env.cp.ca_pem(), "wgtwogrants").unwrap();
    let kubeconfig = env.operator_kubeconfig_via(&proxy.url(), proxy.ca_pem());
    let _operator = env.start_operator_using(&[], &kubeconfig);
    for name in ["alice", "bob"] {
        env.wait_ready(name, "True", "Refreshed", Duration::from_secs(30)).await;
    }
    let requests = env.hydra.token_requests();
    // From here the operator learns of a grant's deletion LAG late, and of its Secrets' deletion at
    // once: what it sees first is a grant that looks live and has lost its Secrets.
    proxy.set_lag(LAG);

    // Foreground deletion, held open by a finalizer of ours: the garbage collector deletes the
    // Secrets while the grant still exists (with a deletionTimestamp), and each deletion wakes the
    // operator for that grant.
    let hold = serde_json::json!({"metadata": {"finalizers": ["test.example/hold"]}});
    env.grants().patch("alice", &PatchParams::default(), &Patch::Merge(&hold)).await.unwrap();
    let foreground = DeleteParams { propagation_policy: Some(PropagationPolicy::Foreground), ..Default::default() };
    env.grants().delete("alice", &foreground).await.unwrap();
    wait_gone(&env, "alice-token").await;
    wait_gone(&env, "alice-wgtwo-state").await;
    // Until the lagging watch has delivered the deletion, and a while after.
    tokio::time::sleep(LAG + Duration::from_secs(4)).await;
    assert!(env.grants().get_opt("alice").await.unwrap().is_some(), "the finalizer holds the grant");
    for secret in ["alice-token", "alice-wgtwo-state"] {
        assert!(
            env.secrets().get_opt(secret).await.unwrap().is_none(),
            "{secret} was recreated for a deleted grant; the operator's log:\n{}",
            log_of(&env)
        );
    }
    assert_eq!(env.hydra.token_requests(), requests, "a grant being deleted was refreshed:\n{}", log_of(&env));
    let release = serde_json::json!({"metadata": {"finalizers": null}});
    env.grants().patch("alice", &PatchParams::default(), &Patch::Merge(&release)).await.unwrap();

    // Background deletion (kubectl's default): the Secrets go after the grant.
    env.grants().delete("bob", &DeleteParams::default()).await.unwrap();
    wait_gone(&env, "bob-token").await;
    wait_gone(&env, "bob-wgtwo-state").await;
    tokio::time::sleep(LAG + Duration::from_secs(4)).await;
    for secret in ["alice-token", "alice-wgtwo-state", "bob-token", "bob-wgtwo-state"] {
        assert!(env.secrets().get_opt(secret).await.unwrap().is_none(), "{secret} came back:\n{}", log_of(&env));
    }
    assert_eq!(env.hydra.token_requests(), requests, "a deleted grant was refreshed:\n{}", log_of(&env));
    // The user's own Secrets (inputs) are not owned by the grant and stay.
    assert!(env.secrets().get_opt("alice-authorization").await.unwrap().is_some());
}
