//! `wgtwo-operator status`, `refresh` and `revoke` end to end, as a person runs them (the binary,
//! with their own kubeconfig, also as `kubectl wgtwo`), against the real apiserver and Hydra,
//! including their errors: grant missing, not ready, forbidden, identity service unreachable.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::rbac::v1::PolicyRule;
use support::{Env, NS, ttl};
use wgtwo_testenv::HydraOptions;

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs the CLI (blocking, off the runtime's workers) with `kubeconfig`.
async fn cli(kubeconfig: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wgtwo-operator"));
    cmd.args(args).env("KUBECONFIG", kubeconfig).env("RUST_LOG", "warn");
    run(cmd).await
}

async fn run(mut cmd: Command) -> Output {
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn argv(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn line<'a>(text: &'a str, start: &str) -> &'a str {
    text.lines().find(|l| l.starts_with(start)).unwrap_or_else(|| panic!("no line {start:?} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_refresh_report_each_grant_and_every_error_plainly() {
    let mut env = Env::start(ttl(3600)).await;
    env.create_authorized_grant("alice").await;
    // Its refresh-token Secret never appears: not ready, waiting for a fix.
    env.create_grant("broken", "unused", |spec| {
        spec.refresh_token_secret_ref.as_mut().unwrap().name = "nowhere".into();
    })
    .await;
    let _operator = env.start_operator();
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;
    env.wait_ready("broken", "False", "SecretNotFound", Duration::from_secs(30)).await;
    let admin = env.cp.admin_kubeconfig().to_owned();

    // status: one line per grant.
    let out = cli(&admin, &["status", "-n", NS]).await;
    assert!(out.ok, "{}", out.stderr);
    assert!(line(&out.stdout, "NAME").contains("NEXT REFRESH"), "{}", out.stdout);
    let alice: Vec<&str> = line(&out.stdout, "alice ").split_whitespace().collect();
    assert_eq!(&alice[..4], ["alice", "refresh_token", "True", "Refreshed"], "{}", out.stdout);
    assert!(alice[4..].join(" ").starts_with("in 59m") || alice[4..].join(" ").starts_with("in 1h0m"), "{alice:?}");
    let broken: Vec<&str> = line(&out.stdout, "broken ").split_whitespace().collect();
    assert_eq!(&broken[..4], ["broken", "refresh_token", "False", "SecretNotFound"]);
    // One grant: its Ready message too; all namespaces: the namespace column.
    let out = cli(&admin, &["status", "broken", "-n", NS]).await;
    assert!(line(&out.stdout, "SecretNotFound: ").contains("nowhere"), "{}", out.stdout);
    let out = cli(&admin, &["status", "-A"]).await;
    assert!(line(&out.stdout, NS).contains("alice"), "{}", out.stdout);

    // As a kubectl plugin, through the documented symlink.
    let bin = env.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_wgtwo-operator"), bin.join("kubectl-wgtwo")).unwrap();
    let mut kubectl = Command::new(wgtwo_testenv::binaries::path("kubectl"));
    kubectl
        .args(["wgtwo", "status", "-n", NS])
        .env("KUBECONFIG", &admin)
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()));
    let out = run(kubectl).await;
    assert!(out.ok, "{}", out.stderr);
    assert!(line(&out.stdout, "alice ").contains("Refreshed"), "{}", out.stdout);

    // refresh: a new token, the new expiry printed, one token request.
    let before = env.secret_value("alice-token", "access_token").await.unwrap();
    let requests = env.hydra.token_requests();
    let out = cli(&admin, &["refresh", "alice", "-n", NS]).await;
    assert!(out.ok, "{}", out.stderr);
    assert!(line(&out.stdout, "Refreshed: ").contains("alice-token is valid until"), "{}", out.stdout);
    let after = env.secret_value("alice-token", "access_token").await.unwrap();
    assert_ne!(before, after);
    assert!(env.active(&after).await && !env.active(&before).await);
    assert_eq!(env.hydra.token_requests(), requests + 1);

    // Errors: missing, not ready, forbidden.
    for args in [&["status", "ghost", "-n", NS][..], &["refresh", "ghost", "-n", NS][..]] {
        let out = cli(&admin, args).await;
        assert!(!out.ok);
        assert!(out.stderr.contains("WgtwoGrant ghost not found in namespace team-a"), "{}", out.stderr);
    }
    let out = cli(&admin, &["refresh", "broken", "-n", NS]).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("is not ready (SecretNotFound)"), "{}", out.stderr);
    let (_, nobody) = env.cp.service_account_client(NS, "nobody").await.unwrap();
    for args in [&["status", "-n", NS][..], &["refresh", "alice", "-n", NS][..]] {
        let out = cli(&nobody, args).await;
        assert!(!out.ok);
        assert!(out.stderr.contains("forbidden"), "{}", out.stderr);
        assert!(out.stderr.contains("system:serviceaccount:team-a:nobody"), "names who: {}", out.stderr);
    }
    // May read grants but not annotate them: status works, refresh is refused.
    let read_only = PolicyRule {
        api_groups: Some(vec!["auth.wgtwo.com".into()]),
        resources: Some(vec!["wgtwogrants".into()]),
        verbs: vec!["get".into(), "list".into()],
        ..Default::default()
    };
    env.cp.grant_service_account(NS, "nobody", "grant-reader", vec![read_only]).await.unwrap();
    assert!(cli(&nobody, &["status", "-n", NS]).await.ok);
    let out = cli(&nobody, &["refresh", "alice", "-n", NS]).await;
    assert!(out.stderr.contains("annotate WgtwoGrant team-a/alice: forbidden"), "{}", out.stderr);

    // A refresh that fails says why: the authorization was ended at the identity service.
    let live = env.live_refresh_token("alice").await.unwrap();
    env.wgtwo.revoke_refresh_token(&wgtwo_operator::oauth::secrets::RefreshToken::new(live)).await.unwrap();
    let out = cli(&admin, &["refresh", "alice", "-n", NS]).await;
    assert!(!out.ok, "{}", out.stdout);
    assert!(out.stderr.contains("refresh of team-a/alice failed (InvalidGrant)"), "{}", out.stderr);
    assert!(out.stderr.contains("Re-authorize"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_ends_the_authorization_at_hydra_and_deletes_the_grant_but_deletes_nothing_it_could_not_revoke() {
    let mut env = Env::start(HydraOptions { persistent: true, ..ttl(3600) }).await;
    env.cp.start_garbage_collector().await.unwrap();
    env.create_authorized_grant("alice").await;
    let _operator = env.start_operator();
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;
    let admin = env.cp.admin_kubeconfig().to_owned();
    let (issuer, ca) = (env.hydra.base_url(), env.ca_file.to_str().unwrap().to_owned());
    let revoke = |extra: &'static [&'static str]| {
        let mut args =
            vec!["revoke", "alice", "-n", NS, "--allowed-issuer", &issuer, "--ca-bundle", &ca, "--timeout", "3s"];
        args.extend(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };

    // A grant's issuer that revoke may not send the tokens to is refused before any connection.
    let out = cli(&admin, &["revoke", "alice", "-n", NS, "--ca-bundle", &ca]).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("is not an identity service revoke may send"), "{}", out.stderr);
    assert!(out.stderr.contains("nothing was deleted"), "{}", out.stderr);

    // Unreachable identity service: an error, and nothing deleted.
    let live = env.live_refresh_token("alice").await.unwrap();
    let access = env.secret_value("alice-token", "access_token").await.unwrap();
    tokio::task::block_in_place(|| env.hydra.stop()).unwrap();
    let out = cli(&admin, &argv(&revoke(&[]))).await;
    assert!(!out.ok, "{}", out.stdout);
    assert!(out.stderr.contains("could not be used"), "{}", out.stderr);
    assert!(out.stderr.contains("nothing was deleted; pass --force"), "{}", out.stderr);
    for secret in [&live, &access] {
        assert!(!out.stderr.contains(secret.as_str()) && !out.stdout.contains(secret.as_str()));
    }
    assert!(env.grants().get_opt("alice").await.unwrap().is_some(), "the grant is kept");
    env.hydra.restart().await.unwrap();
    assert!(env.active(&live).await, "still authorized");

    // Revoke: the refresh token and the last access token are inactive, the grant and its Secrets gone.
    let live = env.live_refresh_token("alice").await.unwrap();
    let access = env.secret_value("alice-token", "access_token").await.unwrap();
    let out = cli(&admin, &argv(&revoke(&[]))).await;
    assert!(out.ok, "{}", out.stderr);
    assert!(line(&out.stdout, "Revoked the authorization of team-a/alice").contains(&issuer), "{}", out.stdout);
    assert!(!env.active(&live).await, "the refresh token is revoked");
    assert!(!env.active(&access).await, "the last access token is revoked");
    assert!(env.grants().get_opt("alice").await.unwrap().is_none());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while env.secrets().get_opt("alice-token").await.unwrap().is_some()
        || env.secrets().get_opt("alice-wgtwo-state").await.unwrap().is_some()
    {
        assert!(std::time::Instant::now() < deadline, "the grant's Secrets outlived it");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = cli(&admin, &argv(&revoke(&[]))).await;
    assert!(out.stderr.contains("WgtwoGrant alice not found"), "{}", out.stderr);

    // --force deletes anyway, and says the authorization was not revoked.
    env.create_authorized_grant("bob").await;
    env.wait_ready("bob", "True", "Refreshed", Duration::from_secs(30)).await;
    let live = env.live_refresh_token("bob").await.unwrap();
    tokio::task::block_in_place(|| env.hydra.stop()).unwrap();
    let mut args = revoke(&["--force"]);
    args[1] = "bob".into();
    let out = cli(&admin, &argv(&args)).await;
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("NOT revoked at"), "{}", out.stdout);
    assert!(out.stdout.contains("stays valid at the identity service"), "{}", out.stdout);
    assert!(env.grants().get_opt("bob").await.unwrap().is_none());
    env.hydra.restart().await.unwrap();
    assert!(env.active(&live).await, "--force did not revoke");

    // Forbidden: someone who may not read the grant's Secrets cannot make revoke do it for them.
    env.create_authorized_grant("carol").await;
    let (_, nobody) = env.cp.service_account_client(NS, "grant-admin").await.unwrap();
    let grants_only = PolicyRule {
        api_groups: Some(vec!["auth.wgtwo.com".into()]),
        resources: Some(vec!["wgtwogrants".into()]),
        verbs: vec!["get".into(), "delete".into()],
        ..Default::default()
    };
    env.cp.grant_service_account(NS, "grant-admin", "grants-only", vec![grants_only]).await.unwrap();
    let mut args = revoke(&[]);
    args[1] = "carol".into();
    let out = cli(&nobody, &argv(&args)).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("forbidden"), "{}", out.stderr);
    assert!(env.grants().get_opt("carol").await.unwrap().is_some());
}
