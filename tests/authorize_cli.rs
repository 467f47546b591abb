//! `wgtwo-operator authorize` end to end: the real binary against a real apiserver and a real
//! Hydra, with the test driver playing the subscriber in the browser.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use url::Url;
use wgtwo_operator::api::WgtwoGrant;
use wgtwo_testenv::{ControlPlane, Hydra, HydraOptions, OAuthClient, Subscriber, free_port};

const NS: &str = "team-a";
const PHONE: &str = "+4799999999";
const PASTE_REDIRECT: &str = "https://example.com/callback";

struct Env {
    cp: ControlPlane,
    hydra: Hydra,
    client: OAuthClient,
    loopback_redirect: String,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

async fn env() -> Env {
    let (cp, hydra) = tokio::join!(ControlPlane::start(), Hydra::start(HydraOptions::default()));
    let (cp, hydra) = (cp.unwrap(), hydra.unwrap());
    let loopback_redirect = format!("http://127.0.0.1:{}/callback", free_port());
    let client = hydra.create_client(&[&loopback_redirect, PASTE_REDIRECT]).await.unwrap();
    cp.create_namespace(NS).await.unwrap();
    let secret = client.kube_secret("wgtwo-client");
    let secrets: Api<Secret> = Api::namespaced(cp.admin_client().await.unwrap(), NS);
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("hydra-ca.pem");
    std::fs::write(&ca_file, hydra.ca_pem()).unwrap();
    Env { cp, hydra, client, loopback_redirect, ca_file, _dir: dir }
}

impl Env {
    fn authorize(&self, redirect: &str, extra: &[&str]) -> Child {
        self.authorize_logging(redirect, extra, None)
    }

    /// Runs authorize with `RUST_LOG` set to `log` (none: the default, warnings only).
    fn authorize_logging(&self, redirect: &str, extra: &[&str], log: Option<&str>) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wgtwo-operator"));
        match log {
            Some(filter) => cmd.env("RUST_LOG", filter),
            None => cmd.env_remove("RUST_LOG"),
        };
        cmd.args(["authorize", "alice", "--namespace", NS, "--no-browser", "--redirect-uri", redirect])
            .args(["--issuer-url", &self.hydra.base_url()])
            .arg("--ca-bundle")
            .arg(&self.ca_file)
            .args(extra)
            .env("KUBECONFIG", self.cp.admin_kubeconfig())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    async fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.cp.admin_client().await.unwrap(), NS)
    }

    async fn grants(&self) -> Api<WgtwoGrant> {
        Api::namespaced(self.cp.admin_client().await.unwrap(), NS)
    }

    async fn refresh_token(&self) -> Option<String> {
        let secret = self.secrets().await.get_opt("alice-authorization").await.unwrap()?;
        Some(String::from_utf8(secret.data.unwrap()["refresh_token"].0.clone()).unwrap())
    }
}

/// Reads the CLI's stdout until the authorization URL appears; returns it and what was read.
async fn read_auth_url(child: &mut Child) -> (Url, String) {
    let stdout = child.stdout.as_mut().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = String::new();
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push_str(&line);
            seen.push('\n');
            if let Some(url) = line.trim().strip_prefix("https://") {
                return Url::parse(&format!("https://{url}")).unwrap();
            }
        }
        panic!("authorize printed no URL:\n{seen}");
    };
    let url = tokio::time::timeout(Duration::from_secs(60), read).await.expect("no URL within 60s");
    (url, seen)
}

struct Outcome {
    success: bool,
    stdout: String,
    stderr: String,
}

async fn finish(child: Child, earlier_stdout: String) -> Outcome {
    let out =
        tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await.expect("authorize hung").unwrap();
    Outcome {
        success: out.status.success(),
        stdout: earlier_stdout + &String::from_utf8_lossy(&out.stdout),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn paste(child: &mut Child, callback: &str) {
    let stdin = child.stdin.as_mut().unwrap();
    stdin.write_all(format!("{callback}\n").as_bytes()).await.unwrap();
    stdin.flush().await.unwrap();
}

/// A failure is one line naming the reason, and nothing was written.
async fn assert_failed_cleanly(env: &Env, outcome: &Outcome, reason: &str) {
    assert!(!outcome.success, "authorize succeeded:\n{}", outcome.stdout);
    let stderr = outcome.stderr.trim();
    assert_eq!(stderr.lines().count(), 1, "not one line:\n{stderr}");
    assert!(stderr.starts_with("wgtwo-operator: authorize: "), "{stderr}");
    assert!(stderr.contains(reason), "{stderr:?} does not mention {reason:?}");
    assert!(env.secrets().await.get_opt("alice-authorization").await.unwrap().is_none());
    assert!(env.grants().await.get_opt("alice").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_flow_writes_the_refresh_token_secret_and_the_grant_and_reauthorizing_replaces_the_token() {
    let env = env().await;
    let mut child = env.authorize(&env.loopback_redirect, &[]);
    let (url, seen) = read_auth_url(&mut child).await;
    let callback = env.hydra.authorize(url.as_str(), &Subscriber::new("alice", PHONE)).await.unwrap();
    assert!(callback.url.as_str().starts_with(&env.loopback_redirect), "{}", callback.url);
    // The browser follows the final redirect to the CLI's loopback listener.
    let page = reqwest::get(callback.url.clone()).await.unwrap();
    assert!(page.status().is_success());
    assert!(page.text().await.unwrap().contains("Authorization received"));
    let outcome = finish(child, seen).await;
    assert!(outcome.success, "stdout:\n{}\nstderr:\n{}", outcome.stdout, outcome.stderr);
    assert!(outcome.stdout.contains(&format!("Authorized {PHONE} (subject alice")), "{}", outcome.stdout);
    assert!(outcome.stdout.contains("secret/alice-authorization"), "{}", outcome.stdout);
    assert!(outcome.stdout.contains("wgtwogrant.auth.wgtwo.com/alice"), "{}", outcome.stdout);

    let first = env.refresh_token().await.expect("refresh-token Secret");
    assert_eq!(env.hydra.introspect(&first).await.unwrap()["active"], true);
    let grant = env.grants().await.get("alice").await.unwrap();
    assert_eq!(grant.spec.issuer_url, env.hydra.base_url());
    assert_eq!(grant.spec.client_secret_ref.name, "wgtwo-client");
    assert_eq!(grant.spec.refresh_token_secret_ref.as_ref().unwrap().name, "alice-authorization");
    assert_eq!(grant.spec.refresh_token_secret_ref.as_ref().unwrap().key, "refresh_token");
    assert_eq!(grant.spec.target.secret_name, "alice-token");
    let secrets_in_output = [env.client.client_secret.as_str(), first.as_str()];
    for secret in secrets_in_output {
        assert!(!outcome.stdout.contains(secret) && !outcome.stderr.contains(secret), "a secret was printed");
    }

    // Again: the same grant (idempotent apply), a new refresh token in the same Secret.
    let mut child = env.authorize(&env.loopback_redirect, &[]);
    let (url, seen) = read_auth_url(&mut child).await;
    let callback = env.hydra.authorize(url.as_str(), &Subscriber::new("alice", PHONE)).await.unwrap();
    reqwest::get(callback.url).await.unwrap();
    let outcome = finish(child, seen).await;
    assert!(outcome.success, "{}", outcome.stderr);
    let second = env.refresh_token().await.unwrap();
    assert_ne!(first, second);
    assert_eq!(env.grants().await.get("alice").await.unwrap().spec, grant.spec);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paste_flow_reads_the_redirected_url_from_stdin() {
    let env = env().await;
    let mut child = env.authorize(PASTE_REDIRECT, &["--paste", "--prompt", "login consent"]);
    let (url, seen) = read_auth_url(&mut child).await;
    assert!(url.query_pairs().any(|(k, v)| k == "prompt" && v == "login consent"), "{url}");
    let callback = env.hydra.authorize(url.as_str(), &Subscriber::new("bob", "+4798888888")).await.unwrap();
    assert!(callback.url.as_str().starts_with(PASTE_REDIRECT));
    paste(&mut child, callback.url.as_str()).await;
    let outcome = finish(child, seen).await;
    assert!(outcome.success, "{}", outcome.stderr);
    assert!(outcome.stdout.contains("Authorized +4798888888 (subject bob"), "{}", outcome.stdout);
    assert!(env.refresh_token().await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_exits_non_zero_with_one_line_and_writes_nothing() {
    let env = env().await;

    // A callback whose state was tampered with.
    let mut child = env.authorize(PASTE_REDIRECT, &["--paste"]);
    let (url, seen) = read_auth_url(&mut child).await;
    let callback = env.hydra.authorize(url.as_str(), &Subscriber::new("alice", PHONE)).await.unwrap();
    let mut forged = callback.url.clone();
    let pairs: Vec<(String, String)> = forged
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "state" { "forged-state-value".to_owned() } else { v.into_owned() };
            (k.into_owned(), v)
        })
        .collect();
    forged.query_pairs_mut().clear().extend_pairs(pairs);
    paste(&mut child, forged.as_str()).await;
    assert_failed_cleanly(&env, &finish(child, seen).await, "state does not match").await;

    // The subscriber refuses to log in.
    let mut child = env.authorize(PASTE_REDIRECT, &["--paste"]);
    let (url, seen) = read_auth_url(&mut child).await;
    let callback = env.hydra.deny(url.as_str()).await.unwrap();
    paste(&mut child, callback.url.as_str()).await;
    assert_failed_cleanly(&env, &finish(child, seen).await, "access_denied").await;

    // A code the server never issued.
    let mut child = env.authorize(PASTE_REDIRECT, &["--paste"]);
    let (url, seen) = read_auth_url(&mut child).await;
    let state = url.query_pairs().find(|(k, _)| k == "state").unwrap().1.into_owned();
    paste(&mut child, &format!("{PASTE_REDIRECT}?code=never-issued&state={state}")).await;
    assert_failed_cleanly(&env, &finish(child, seen).await, "invalid_grant").await;

    // A URL that is not the redirect URI.
    let mut child = env.authorize(PASTE_REDIRECT, &["--paste"]);
    let (_, seen) = read_auth_url(&mut child).await;
    paste(&mut child, "https://elsewhere.example/callback?code=x&state=y").await;
    assert_failed_cleanly(&env, &finish(child, seen).await, "does not start with the redirect URI").await;

    // Nobody comes back.
    let mut child = env.authorize(&env.loopback_redirect, &["--timeout", "2s"]);
    let (_, seen) = read_auth_url(&mut child).await;
    assert_failed_cleanly(&env, &finish(child, seen).await, "timed out after 2s").await;

    // The client Secret is missing.
    let child = env.authorize(PASTE_REDIRECT, &["--paste", "--client-secret", "no-such-client"]);
    let outcome = finish(child, String::new()).await;
    assert_failed_cleanly(&env, &outcome, "Secret team-a/no-such-client not found").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_level_output_of_authorize_carries_no_secret() {
    let env = env().await;
    let mut child = env.authorize_logging(PASTE_REDIRECT, &["--paste"], Some("trace"));
    let (url, seen) = read_auth_url(&mut child).await;
    let callback = env.hydra.authorize(url.as_str(), &Subscriber::new("alice", PHONE)).await.unwrap();
    let code = callback.code().unwrap();
    paste(&mut child, callback.url.as_str()).await;
    let outcome = finish(child, seen).await;
    assert!(outcome.success, "{}", outcome.stderr.lines().last().unwrap_or_default());
    assert!(outcome.stderr.contains("TRACE"), "RUST_LOG=trace produced no trace output");
    let refresh_token = env.refresh_token().await.unwrap();
    let b64 = |s: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s);
    let output = format!("{}{}", outcome.stdout, outcome.stderr);
    for secret in [env.client.client_secret.clone(), refresh_token, code] {
        assert!(!output.contains(&secret), "a secret appears in authorize's trace output");
        assert!(!output.contains(&b64(&secret)), "a base64 secret appears in authorize's trace output");
    }
}
