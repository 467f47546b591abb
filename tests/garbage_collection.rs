//! Owner references, proven with Kubernetes' own garbage collector (kube-controller-manager built
//! from the same module as the apiserver): a deleted grant takes its target and state Secrets with
//! it, and the operator does not bring them back while the grant is being deleted.

mod support;

use std::time::{Duration, Instant};

use kube::api::{DeleteParams, Patch, PatchParams, PropagationPolicy};
use support::Env;
use wgtwo_testenv::HydraOptions;

async fn wait_gone(env: &Env, secret: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.secrets().get_opt(secret).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "Secret {secret} still exists 60 s after its grant was deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_grant_removes_its_secrets_and_the_operator_does_not_recreate_them() {
    let mut env = Env::start(HydraOptions { access_token_ttl: Duration::from_secs(3600), ..Default::default() }).await;
    env.cp.start_garbage_collector().await.unwrap();
    for name in ["alice", "bob"] {
        env.create_authorized_grant(name).await;
    }
    let _operator = env.start_operator();
    for name in ["alice", "bob"] {
        env.wait_ready(name, "True", "Refreshed", Duration::from_secs(30)).await;
    }
    let requests = env.hydra.token_requests();

    // Foreground deletion, held open by a finalizer of ours: the garbage collector deletes the
    // Secrets while the grant still exists (with a deletionTimestamp), and each deletion wakes the
    // operator for that grant.
    let hold = serde_json::json!({"metadata": {"finalizers": ["test.example/hold"]}});
    env.grants().patch("alice", &PatchParams::default(), &Patch::Merge(&hold)).await.unwrap();
    let foreground = DeleteParams { propagation_policy: Some(PropagationPolicy::Foreground), ..Default::default() };
    env.grants().delete("alice", &foreground).await.unwrap();
    wait_gone(&env, "alice-token").await;
    wait_gone(&env, "alice-wgtwo-state").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(env.grants().get_opt("alice").await.unwrap().is_some(), "the finalizer holds the grant");
    for secret in ["alice-token", "alice-wgtwo-state"] {
        assert!(env.secrets().get_opt(secret).await.unwrap().is_none(), "{secret} was recreated for a deleted grant");
    }
    let release = serde_json::json!({"metadata": {"finalizers": null}});
    env.grants().patch("alice", &PatchParams::default(), &Patch::Merge(&release)).await.unwrap();

    // Background deletion (kubectl's default): the Secrets go after the grant.
    env.grants().delete("bob", &DeleteParams::default()).await.unwrap();
    wait_gone(&env, "bob-token").await;
    wait_gone(&env, "bob-wgtwo-state").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for secret in ["alice-token", "alice-wgtwo-state", "bob-token", "bob-wgtwo-state"] {
        assert!(env.secrets().get_opt(secret).await.unwrap().is_none(), "{secret} came back");
    }
    assert_eq!(env.hydra.token_requests(), requests, "a deleted grant was refreshed");
    // The user's own Secrets (inputs) are not owned by the grant and stay.
    assert!(env.secrets().get_opt("alice-authorization").await.unwrap().is_some());
}
