//! `wgtwo-operator agent` against a real kube-apiserver (RBAC on), running as the ServiceAccount of
//! the shipped example (`deploy/chart/wgtwo-operator/examples/agent-sidecar.yaml`) with exactly its Role.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use wgtwo_testenv::ControlPlane;
use wgtwo_testenv::process::ChildGuard;

/// What the shipped example names.
const NS: &str = "team-a";
const SA: &str = "alice-app";
const SECRET: &str = "alice-token";

/// Applies the shipped example (ServiceAccount, one-Secret Role, RoleBinding, Deployment) and
/// returns a kubeconfig of its ServiceAccount.
async fn example_service_account(cp: &ControlPlane) -> PathBuf {
    let example = wgtwo_testenv::repo_root().join("deploy/chart/wgtwo-operator/examples/agent-sidecar.yaml");
    cp.kubectl(&["apply", "--server-side", "-f", example.to_str().unwrap()]).unwrap();
    cp.service_account_client(NS, SA).await.unwrap().1
}

/// A control plane with the example applied: the ServiceAccount's kubeconfig and the admin's
/// Secrets API of its namespace.
async fn example_control_plane() -> (ControlPlane, PathBuf, Api<Secret>) {
    let cp = ControlPlane::start().await.unwrap();
    cp.create_namespace(NS).await.unwrap();
    let kubeconfig = example_service_account(&cp).await;
    let admin = Api::namespaced(cp.admin_client().await.unwrap(), NS);
    (cp, kubeconfig, admin)
}

fn token_data(n: usize) -> Vec<(String, String)> {
    vec![
        ("access_token".into(), format!("token-{n}")),
        ("token_type".into(), "Bearer".into()),
        ("expires_at".into(), format!("2030-01-01T00:00:{:02}Z-{n}", n % 60)),
        ("scope".into(), format!("scope-{n}")),
    ]
}

async fn put(secrets: &Api<Secret>, name: &str, n: usize) {
    let pairs = token_data(n);
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let secret = wgtwo_testenv::string_secret(name, &pairs);
    secrets.patch(name, &PatchParams::apply("agent-test").force(), &Patch::Apply(&secret)).await.unwrap();
}

struct Agent {
    process: ChildGuard,
    probe_port: u16,
    token_port: u16,
    log: PathBuf,
}

fn start_agent(kubeconfig: &Path, secret: &str, dir: &Path, log_dir: &Path) -> Agent {
    start_agent_with(kubeconfig, secret, dir, log_dir, &[])
}

fn start_agent_with(kubeconfig: &Path, secret: &str, dir: &Path, log_dir: &Path, extra: &[&str]) -> Agent {
    let (probe_port, token_port) = (wgtwo_testenv::free_port(), wgtwo_testenv::free_port());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wgtwo-operator"));
    cmd.args(["agent", "--secret", secret, "--dir"])
        .arg(dir)
        .args(["--probe-bind-address", &format!("127.0.0.1:{probe_port}")])
        .args(["--serve-token", &format!("127.0.0.1:{token_port}")])
        .env("POD_NAMESPACE", NS)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .args(extra);
    let log = log_dir.join(format!("agent-{secret}-{probe_port}.log"));
    let process = ChildGuard::spawn("wgtwo-operator agent", cmd, &log).unwrap();
    Agent { process, probe_port, token_port, log }
}

impl Agent {
    async fn readyz(&self) -> (u16, String) {
        support::get(self.probe_port, "/readyz").await
    }

    async fn wait_readyz(&mut self, status: u16, body: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.process.check_running().unwrap();
            if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{}/readyz", self.probe_port)).await {
                let code = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                if code == status && text.contains(body) {
                    return;
                }
                assert!(Instant::now() < deadline, "readyz is {code} {text:?}, wanted {status} {body:?}");
            }
            assert!(Instant::now() < deadline, "no /readyz on port {}", self.probe_port);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn rss_kib(&self) -> u64 {
        wgtwo_testenv::process::proc_status(self.process.pid(), "VmRSS:").unwrap()
    }
}

/// The version number in a file's content (`token-7` → 7).
fn version_of(text: &str) -> Option<usize> {
    text.rsplit('-').next()?.trim_end_matches('Z').parse().ok()
}

/// Reads one consistent snapshot the way a careful reader does: resolve `..data` once, read the
/// files of that version. `None` when the version was replaced under the reader (read again).
fn snapshot(dir: &Path) -> Option<BTreeMap<String, String>> {
    let version = std::fs::read_link(dir.join("..data")).ok()?;
    let mut files = BTreeMap::new();
    for key in ["access_token", "expires_at", "scope"] {
        files.insert(key.to_owned(), std::fs::read_to_string(dir.join(&version).join(key)).ok()?);
    }
    Some(files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_puts_every_update_on_disk_within_a_second_and_a_reader_never_sees_a_torn_set() {
    let (cp, kubeconfig, secrets) = example_control_plane().await;
    put(&secrets, SECRET, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&kubeconfig, SECRET, dir.path(), cp.dir());
    agent.wait_readyz(200, "ok", Duration::from_secs(20)).await;
    assert_eq!(std::fs::read_to_string(dir.path().join("access_token")).unwrap(), "token-0");

    // A reader loops over the files while the Secret changes 100 times: every snapshot (through
    // `..data`, and token.json) holds one version, and the first sight of each version is timed.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<HashMap<usize, Instant>>> = Default::default();
    let reader = {
        let (stop, seen, dir) = (stop.clone(), seen.clone(), dir.path().to_owned());
        std::thread::spawn(move || {
            let (mut reads, mut torn) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                if let Some(files) = snapshot(&dir) {
                    reads += 1;
                    let versions: Vec<Option<usize>> = files.values().map(|v| version_of(v)).collect();
                    if versions.iter().any(|v| *v != versions[0]) {
                        torn.push(format!("{files:?}"));
                    }
                    if let Some(n) = versions[0] {
                        seen.lock().unwrap().entry(n).or_insert_with(Instant::now);
                    }
                }
                if let Ok(json) = std::fs::read(dir.join("token.json")) {
                    let keys: BTreeMap<String, String> = serde_json::from_slice(&json).unwrap();
                    let versions: Vec<Option<usize>> =
                        ["access_token", "expires_at", "scope"].iter().map(|k| version_of(&keys[*k])).collect();
                    if versions.iter().any(|v| *v != versions[0]) {
                        torn.push(format!("token.json {keys:?}"));
                    }
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            (reads, torn)
        })
    };
    let mut written = HashMap::new();
    for n in 1..=100 {
        put(&secrets, SECRET, n).await;
        written.insert(n, Instant::now());
        tokio::time::sleep(Duration::from_millis(60 + (n as u64 * 37) % 90)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen.lock().unwrap().contains_key(&100) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (reads, torn) = reader.join().unwrap();
    assert!(torn.is_empty(), "{} torn reads, e.g. {}", torn.len(), torn[0]);

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let missing: Vec<usize> = (1..=100).filter(|n| !seen.contains_key(n)).collect();
    assert!(missing.is_empty(), "versions never seen on disk: {missing:?}");
    // From the moment the apiserver acknowledged the write to the first read of it on disk.
    let mut latencies: Vec<Duration> = (1..=100).map(|n| seen[&n].saturating_duration_since(written[&n])).collect();
    latencies.sort();
    let (p50, p99, max) = (latencies[49], latencies[98], latencies[99]);
    println!(
        "agent: 100 updates, on disk after p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {reads} consistent reads, 0 torn; RSS {} KiB",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        agent.rss_kib()
    );
    assert!(max < Duration::from_secs(1), "an update took {max:?} to reach the disk");

    // Modes: files 0440, nobody else; the token endpoint serves the current token.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("access_token")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o440);
    let (code, body) = support::get(agent.token_port, "/token").await;
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, token["access_token"].as_str()), (200, Some("token-100")));
    assert_eq!(token["token_type"], "Bearer");
    assert!(!agent.log().contains("token-"), "a token value in the agent's log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_role_lets_the_agent_read_its_one_secret_and_nothing_else() {
    let (cp, kubeconfig, admin) = example_control_plane().await;
    put(&admin, SECRET, 1).await;
    put(&admin, "other-token", 1).await;
    let client = wgtwo_testenv::control_plane::client_from_kubeconfig(&kubeconfig).await.unwrap();
    let mine: Api<Secret> = Api::namespaced(client.clone(), NS);
    // RBAC changes reach the authorizer through an informer; allow it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while mine.get(SECRET).await.is_err() {
        assert!(Instant::now() < deadline, "the example Role never took effect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let by_name = ListParams::default().fields(&format!("metadata.name={SECRET}"));
    assert_eq!(mine.list(&by_name).await.unwrap().items.len(), 1, "list of the one Secret by name");
    let forbidden = |r: Result<(), kube::Error>, what: &str| match r {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: {other:?}, wanted 403"),
    };
    forbidden(mine.get("other-token").await.map(drop), "get another Secret");
    forbidden(mine.list(&ListParams::default()).await.map(drop), "list every Secret");
    let other = ListParams::default().fields("metadata.name=other-token");
    forbidden(mine.list(&other).await.map(drop), "list another Secret by name");
    let mut secret = mine.get(SECRET).await.unwrap();
    secret.metadata.managed_fields = None;
    forbidden(mine.replace(SECRET, &PostParams::default(), &secret).await.map(drop), "update its Secret");
    forbidden(mine.delete(SECRET, &DeleteParams::default()).await.map(drop), "delete its Secret");
    let new = wgtwo_testenv::string_secret("planted", &[("a", "b")]);
    forbidden(mine.create(&PostParams::default(), &new).await.map(drop), "create a Secret");
    let elsewhere: Api<Secret> = Api::namespaced(client, "default");
    forbidden(elsewhere.get(SECRET).await.map(drop), "the same name in another namespace");

    // And with exactly that, the agent works.
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&kubeconfig, SECRET, dir.path(), cp.dir());
    agent.wait_readyz(200, "ok", Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_forbidden_secret_is_an_error_and_a_failing_probe_not_an_exit_and_it_recovers() {
    let (cp, kubeconfig, admin) = example_control_plane().await;
    let (missing_dir, forbidden_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The Role allows alice-token, which does not exist yet; other-token it does not allow.
    let mut missing = start_agent(&kubeconfig, SECRET, missing_dir.path(), cp.dir());
    let mut forbidden = start_agent(&kubeconfig, "other-token", forbidden_dir.path(), cp.dir());
    missing.wait_readyz(503, "Secret team-a/alice-token does not exist", Duration::from_secs(20)).await;
    forbidden.wait_readyz(503, "forbidden to read Secret team-a/other-token", Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for agent in [&mut missing, &mut forbidden] {
        agent.process.check_running().expect("the agent exited instead of waiting");
    }
    assert!(missing.log().contains("does not exist (yet)"), "{}", missing.log());
    assert!(forbidden.log().contains("needs get, list and watch on secrets with resourceNames [other-token]"));

    put(&admin, SECRET, 7).await;
    missing.wait_readyz(200, "ok", Duration::from_secs(10)).await;
    assert_eq!(std::fs::read_to_string(missing_dir.path().join("access_token")).unwrap(), "token-7");
    // Deleted: the files stay (the token in them is valid until it expires); not ready.
    admin.delete(SECRET, &DeleteParams::default()).await.unwrap();
    missing.wait_readyz(503, "was deleted", Duration::from_secs(10)).await;
    assert_eq!(std::fs::read_to_string(missing_dir.path().join("access_token")).unwrap(), "token-7");
    put(&admin, SECRET, 8).await;
    missing.wait_readyz(200, "ok", Duration::from_secs(10)).await;
    assert_eq!(std::fs::read_to_string(missing_dir.path().join("access_token")).unwrap(), "token-8");
    assert_eq!(missing.readyz().await.0, 200);
}

/// Waits until the agent's file holds `token-{n}`.
async fn wait_file(agent: &Agent, dir: &Path, n: usize, timeout: Duration, what: &str) -> Duration {
    let start = Instant::now();
    let want = format!("token-{n}");
    while std::fs::read_to_string(dir.join("access_token")).unwrap() != want {
        assert!(start.elapsed() < timeout, "{what}: the file never became {want}:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_survives_a_silent_connection_and_an_apiserver_restart_and_its_files_end_current() {
    let (mut cp, kubeconfig, admin) = example_control_plane().await;
    put(&admin, SECRET, 1).await;
    // The agent reaches the apiserver through a proxy that can silence its connections.
    let upstream = cp.url().trim_start_matches("https://").parse().unwrap();
    let proxy = wgtwo_testenv::TcpProxy::start(upstream).await.unwrap();
    let through = cp.dir().join("agent-through-proxy.kubeconfig");
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    std::fs::write(&through, text.replace(cp.url(), &format!("https://127.0.0.1:{}", proxy.port()))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Watches renewed every 3 s; a connection silent for 13 s is dropped.
    let mut agent = start_agent_with(&through, SECRET, dir.path(), cp.dir(), &["--watch-timeout", "3s"]);
    agent.wait_readyz(200, "ok", Duration::from_secs(20)).await;

    // Watches end (the watch timeout) and are renewed: changes keep arriving.
    tokio::time::sleep(Duration::from_secs(7)).await;
    put(&admin, SECRET, 2).await;
    let took = wait_file(&agent, dir.path(), 2, Duration::from_secs(2), "after renewed watches").await;
    println!("after two watch renewals: on disk in {} ms", took.as_millis());

    // Its connection goes silent (no FIN, no RST): the agent drops it and watches again.
    proxy.blackhole_open_connections();
    put(&admin, SECRET, 3).await;
    let took = wait_file(&agent, dir.path(), 3, Duration::from_secs(25), "after a silent connection").await;
    println!("silent connection: the change reached the disk after {:.1} s", took.as_secs_f64());
    assert_eq!(agent.readyz().await.0, 200, "the files stayed valid: still ready");

    cp.restart_apiserver(Duration::from_secs(3)).await.unwrap();
    agent.process.check_running().expect("the agent exited while the apiserver was away");
    assert_eq!(agent.readyz().await.0, 200, "the files stayed valid: still ready");
    // Changed right after the restart: the agent's re-established watch brings it.
    let admin: Api<Secret> = Api::namespaced(cp.admin_client().await.unwrap(), NS);
    put(&admin, SECRET, 4).await;
    wait_file(&agent, dir.path(), 4, Duration::from_secs(30), "after the apiserver restart").await;
    agent.process.check_running().unwrap();
    assert_eq!(agent.readyz().await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_agent_the_workload_file_holds_an_active_token_except_within_a_second_of_each_refresh() {
    let mut env = support::Env::start(support::ttl(8)).await;
    env.create_authorized_grant("alice").await;
    let _operator = env.start_operator();
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;
    let kubeconfig = example_service_account(&env.cp).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&kubeconfig, SECRET, dir.path(), env.dir.path());
    agent.wait_readyz(200, "ok", Duration::from_secs(20)).await;

    // Sample the file the workload reads every ~100 ms over several 8 s lifetimes: the token in it
    // must be active at Hydra, except between a refresh (which revokes it) and the next file.
    let token_in_file = || {
        let json = std::fs::read(dir.path().join("token.json")).unwrap();
        let keys: BTreeMap<String, String> = serde_json::from_slice(&json).unwrap();
        keys["access_token"].clone()
    };
    let (mut samples, mut inactive) = (0, 0);
    let mut tokens = vec![token_in_file()];
    let mut stale_since: Option<Instant> = None;
    let mut stale_windows: Vec<Duration> = Vec::new();
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end || stale_since.is_some() {
        let at = Instant::now();
        let token = token_in_file();
        if *tokens.last().unwrap() != token {
            tokens.push(token.clone());
            if let Some(since) = stale_since.take() {
                stale_windows.push(at - since);
            }
        }
        samples += 1;
        if !env.active(&token).await {
            inactive += 1;
            stale_since.get_or_insert(at);
        }
        assert!(at < end + Duration::from_secs(5), "the file held an inactive token for seconds");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let longest = stale_windows.iter().max().copied().unwrap_or_default();
    println!(
        "agent end to end: {samples} samples, {} tokens in the file, {inactive} inactive samples in {} windows, longest {:.0} ms",
        tokens.len(),
        stale_windows.len(),
        longest.as_secs_f64() * 1e3
    );
    assert!(tokens.len() >= 4, "only {} tokens in 30 s of 8 s lifetimes", tokens.len());
    assert!(longest <= Duration::from_secs(1), "the file held a revoked token for {longest:?}");
}

#[test]
fn the_agent_refuses_to_serve_the_token_beyond_loopback_or_to_write_outside_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    // Never contacted: both mistakes are refused before the agent talks to the apiserver.
    let kubeconfig = tmp.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\nusers: [{name: u, user: {token: x}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wgtwo-operator"))
            .args(["agent", "--secret", SECRET, "--probe-bind-address", "127.0.0.1:0"])
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let dir = tmp.path().to_str().unwrap();
    let (code, stderr) = run(&["--dir", dir, "--serve-token", "0.0.0.0:8090"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--serve-token 0.0.0.0:8090: must be a loopback address"), "{stderr}");
    let file = tmp.path().join("kubeconfig");
    let (code, stderr) = run(&["--dir", file.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("not a directory (mount an emptyDir there"), "{stderr}");
}
