//! The write-ahead journal (`--journal-dir`) against the real apiserver and Hydra without a rotation
//! grace period: a SIGKILL forced between the token answer and the state Secret write (the
//! apiserver black-holed for the operator, Hydra's answer held until then) loses the grant without
//! the journal and nothing with it; a superseded entry never overwrites a newer authorization; the
//! journal's files are private and their content never reaches a log.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use support::Env;
use wgtwo_operator::controller::lineage::sha256_hex;
use wgtwo_testenv::process::ChildGuard;
use wgtwo_testenv::{HydraOptions, TcpProxy};

const SINGLE_REPLICA: &str = "--leader-elect=false";

fn hydra() -> HydraOptions {
    HydraOptions { recording_proxy: true, ..support::ttl(3600) }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o777
}

async fn wait_for(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a kill in the window left behind.
struct Killed {
    /// The refresh token the killed process presented (still in the state Secret).
    presented: String,
    /// The journal entry's JSON, if the process had a journal.
    entry: Option<serde_json::Value>,
}

/// Runs an operator (with `journal`, if any) that reaches the apiserver through a proxy, lets it
/// refresh `grant`, and SIGKILLs it after Hydra's answer reached it while its state Secret write
/// hangs (the apiserver black-holed): the rotated refresh token is then nowhere but in the dead
/// process, and in its journal.
async fn kill_between_answer_and_state_write(env: &mut Env, grant: &str, journal: Option<&Path>) -> Killed {
    let proxy = TcpProxy::start(env.cp.url().trim_start_matches("https://").parse().unwrap()).await.unwrap();
    let kubeconfig = env.operator_kubeconfig_through(proxy.port());
    let mut args = vec![SINGLE_REPLICA.to_owned()];
    if let Some(dir) = journal {
        args.extend(["--journal-dir".to_owned(), dir.to_str().unwrap().to_owned()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (operator, _) = env.start_operator_using(&argv, &kubeconfig);
    env.wait_ready(grant, "True", "Refreshed", Duration::from_secs(30)).await;
    let presented = env.live_refresh_token(grant).await.unwrap();
    let hydra_proxy = env.hydra.recording_proxy();
    hydra_proxy.hold_token_answers(Duration::from_millis(1500));
    env.request_refresh(grant, &format!("kill-{grant}")).await;
    wait_for("a token request", Duration::from_secs(10), async || hydra_proxy.token_requests_in_flight() == 1).await;
    proxy.blackhole_everything();
    wait_for("the answer passed on", Duration::from_secs(10), async || hydra_proxy.token_requests_in_flight() == 0)
        .await;
    hydra_proxy.hold_token_answers(Duration::ZERO);
    if let Some(dir) = journal {
        wait_for("a journal entry", Duration::from_secs(5), async || !support::journal_entries(dir).is_empty()).await;
    }
    // The state Secret write is hanging; the process dies with the rotated token.
    tokio::time::sleep(Duration::from_millis(300)).await;
    operator.signal(libc::SIGKILL).unwrap();
    drop(operator);
    let entry = journal.map(|dir| {
        let [file] = support::journal_entries(dir).try_into().unwrap();
        assert_eq!(mode(&dir.join("wgtwo-journal-v1")), 0o700, "the journal directory is private");
        assert_eq!(mode(&file), 0o600, "the journal entry is private");
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(&file).unwrap()).unwrap()
    });
    assert_eq!(env.live_refresh_token(grant).await.unwrap(), presented, "the kill landed before the state write");
    Killed { presented, entry }
}

fn logs_of(env: &Env) -> String {
    let mut all = String::new();
    for file in std::fs::read_dir(env.dir.path()).unwrap() {
        let path = file.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("operator-") {
            all.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    all
}

fn restart(env: &mut Env, journal: Option<&Path>) -> ChildGuard {
    match journal {
        Some(dir) => env.start_operator_with(&[SINGLE_REPLICA, "--journal-dir", dir.to_str().unwrap()]).0,
        None => env.start_operator_with(&[SINGLE_REPLICA]).0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_the_answer_and_the_state_write_loses_the_grant_without_the_journal_and_nothing_with_it() {
    let mut env = Env::start(hydra()).await;
    env.create_authorized_grant("bob").await;
    env.create_authorized_grant("alice").await;

    // Without the journal: the restarted operator presents the token Hydra already rotated, and
    // Hydra ends the authorization.
    let killed = kill_between_answer_and_state_write(&mut env, "bob", None).await;
    let operator = restart(&mut env, None);
    env.wait_ready("bob", "False", "InvalidGrant", Duration::from_secs(30)).await;
    assert!(!env.active(&killed.presented).await);
    drop(operator);

    // With it: the restart writes the journaled refresh token to the state Secret before anything
    // else and publishes the journaled access token without a token request; the grant refreshes on
    // from there, and the rotated-away token is never presented again.
    let journal = env.dir.path().join("journal");
    let killed = kill_between_answer_and_state_write(&mut env, "alice", Some(&journal)).await;
    let entry = killed.entry.unwrap();
    let rotated = entry["refresh_token"].as_str().unwrap().to_owned();
    let access = entry["access_token"].as_str().unwrap().to_owned();
    assert_eq!(entry["presented_sha256"], sha256_hex(&[&killed.presented]));
    // Written again once the ID token was verified: its claims are published with the replay.
    assert_eq!(entry["phone_number"], "+4799999999");
    assert!(entry["subject"].is_string(), "{}", entry["subject"]);
    let presented_before = env.hydra.recording_proxy().presentations().len();
    let _operator = restart(&mut env, Some(&journal));
    wait_for("the journaled answer published after the restart", Duration::from_secs(30), async || {
        env.status("alice").await.unwrap().refresh_request_handled.as_deref() == Some("kill-alice")
    })
    .await;
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(10)).await;
    assert_eq!(env.secret_value("alice-token", "access_token").await.as_deref(), Some(access.as_str()));
    assert_eq!(env.live_refresh_token("alice").await.as_deref(), Some(rotated.as_str()));
    assert_eq!(env.hydra.recording_proxy().presentations().len(), presented_before, "replay sent no token request");
    env.request_refresh("alice", "after-restart").await;
    wait_for("a refresh after the restart", Duration::from_secs(30), async || {
        env.status("alice").await.unwrap().refresh_request_handled.as_deref() == Some("after-restart")
    })
    .await;
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(10)).await;
    assert_ne!(env.secret_value("alice-token", "access_token").await.as_deref(), Some(access.as_str()));
    // Hydra saw the rotated-away token once (from the killed process) and the journaled one next.
    let presentations = env.hydra.recording_proxy().presentations();
    let count = |token: &str| presentations.iter().filter(|p| p.digest == wgtwo_testenv::sha256_hex(token)).count();
    assert_eq!(count(&killed.presented), 1, "the token Hydra rotated away was presented again");
    assert_eq!(
        presentations.get(presented_before).map(|p| p.digest.clone()),
        Some(wgtwo_testenv::sha256_hex(&rotated)),
        "the journaled token came next"
    );
    assert!(env.live_token_is_active("alice").await, "alice's grant survived the kill");
    assert!(support::journal_entries(&journal).is_empty(), "the replayed entry is removed");
    let logs = logs_of(&env);
    assert!(logs.contains("the rotated refresh token of a killed process is now in the state Secret"), "{logs}");
    for secret in [&killed.presented, &rotated, &access] {
        assert!(!logs.contains(secret.as_str()), "a token from the journal appears in a log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_entry_is_dropped_and_never_overwrites_the_subscribers_new_authorization() {
    let mut env = Env::start(hydra()).await;
    env.create_authorized_grant("carol").await;
    let journal = env.dir.path().join("journal");
    kill_between_answer_and_state_write(&mut env, "carol", Some(&journal)).await;
    assert_eq!(support::journal_entries(&journal).len(), 1);

    // Meanwhile the subscriber authorizes again, and an operator without this pod's journal (another
    // replica) takes the new authorization into use.
    let again = env.authorize("carol").await;
    env.put_secret("carol-authorization", &[("refresh_token", &again)]).await;
    let mut other = restart(&mut env, None);
    let new_lineage = sha256_hex(&[&again]);
    wait_for("the new authorization in use", Duration::from_secs(30), async || {
        env.secret_value("carol-wgtwo-state", "source_sha256").await.as_deref() == Some(new_lineage.as_str())
    })
    .await;
    env.wait_ready("carol", "True", "Refreshed", Duration::from_secs(10)).await;
    other.terminate(Duration::from_secs(10)).unwrap();
    let live = env.live_refresh_token("carol").await.unwrap();

    // The restarted process finds its old entry superseded: dropped, the new lineage untouched.
    let _operator = restart(&mut env, Some(&journal));
    wait_for("the entry dropped", Duration::from_secs(20), async || support::journal_entries(&journal).is_empty())
        .await;
    assert!(logs_of(&env).contains("journal entry superseded; dropped"));
    assert_eq!(env.secret_value("carol-wgtwo-state", "source_sha256").await.as_deref(), Some(new_lineage.as_str()));
    assert_eq!(env.live_refresh_token("carol").await.unwrap(), live);
    env.request_refresh("carol", "after-replay").await;
    wait_for("a refresh after the replay", Duration::from_secs(30), async || {
        env.status("carol").await.unwrap().refresh_request_handled.as_deref() == Some("after-replay")
    })
    .await;
    env.wait_ready("carol", "True", "Refreshed", Duration::from_secs(10)).await;
    assert!(env.live_token_is_active("carol").await, "the new authorization keeps working");
}
