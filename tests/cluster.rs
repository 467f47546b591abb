//! The operator as users run it: the image built from the repository's Dockerfile
//! (tools/image/build.sh), the chart installed with helm on a one-node cluster (kubelet on
//! containerd and runc, kube-scheduler, kube-proxy, every controller; wgtwo_testenv::Cluster), and
//! Hydra behind the recording proxy on the pods' gateway. Pods reach the apiserver through the
//! `kubernetes` Service, as in any cluster. One node runs at a time (the tests take turns).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use support::*;
use wgtwo_testenv::HydraOptions;
use wgtwo_testenv::image::OPERATOR_IMAGE;

const RELEASE: &str = "wgtwo-operator";
const CA_CONFIG_MAP: &str = "wgtwo-test-issuer-ca";

/// Hydra issuing access tokens that live `secs` seconds, no rotation grace period.
fn short_lived(secs: u64) -> HydraOptions {
    HydraOptions { access_token_ttl: Duration::from_secs(secs), ..Default::default() }
}

/// `helm install` of deploy/chart/wgtwo-operator as is, with only the image, the allowed issuer and
/// the test issuer's CA bundle set (plus `set`), and `--wait` for the rollout.
async fn helm_install(env: &Env, set: &[&str]) {
    helm_install_trusting(env, set, "").await
}

/// [`helm_install`], the CA bundle also trusting `extra_ca_pem`.
async fn helm_install_trusting(env: &Env, set: &[&str], extra_ca_pem: &str) {
    let namespaces: Api<Namespace> = Api::all(env.kube.clone());
    if namespaces.get_opt(OPERATOR_NS).await.unwrap().is_none() {
        env.cp.create_namespace(OPERATOR_NS).await.unwrap();
    }
    let ca = ConfigMap {
        metadata: ObjectMeta { name: Some(CA_CONFIG_MAP.into()), ..Default::default() },
        data: Some([("ca.crt".to_owned(), format!("{}{extra_ca_pem}", env.hydra.ca_pem()))].into()),
        ..Default::default()
    };
    let _ = Api::<ConfigMap>::namespaced(env.kube.clone(), OPERATOR_NS).create(&PostParams::default(), &ca).await;
    helm(env, "install", set);
}

fn helm(env: &Env, verb: &str, set: &[&str]) {
    let (repository, tag) = OPERATOR_IMAGE.rsplit_once(':').unwrap();
    let chart = wgtwo_testenv::repo_root().join("deploy/chart/wgtwo-operator");
    let mut cmd = std::process::Command::new(wgtwo_testenv::binaries::path("helm"));
    cmd.arg(verb)
        .arg(RELEASE)
        .arg(&chart)
        .arg(format!("--kubeconfig={}", env.cp.admin_kubeconfig().display()))
        .args(["--namespace", OPERATOR_NS, "--wait", "--timeout", "180s"])
        .args(["--set", &format!("image.repository={repository}"), "--set", &format!("image.tag={tag}")])
        .args(["--set", &format!("operator.allowedIssuers[0]={}", env.hydra.base_url())])
        .args(["--set", &format!("operator.caBundle.configMapName={CA_CONFIG_MAP}")]);
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "helm {verb}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Subscribers authorize first, then the grants are created: Hydra's SQLite store refuses a login
/// flow that overlaps a refresh ("Unable to serialize access due to a concurrent update").
async fn create_authorized_grants(env: &Env, names: &[&str]) {
    let mut tokens = Vec::new();
    for name in names {
        tokens.push(env.authorize(name).await);
    }
    for (name, token) in names.iter().zip(tokens) {
        env.create_grant(name, &token, |_| {}).await;
    }
}

/// The operator's pods.
async fn operator_pods(env: &Env) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(env.kube.clone(), OPERATOR_NS);
    let selector = format!("app.kubernetes.io/name={RELEASE}");
    pods.list(&ListParams::default().labels(&selector)).await.unwrap().items
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The container id of the pod's `operator` container.
fn operator_container_id(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == "operator"))
        .and_then(|c| c.container_id.clone())
        .expect("operator container id")
}

async fn lease_holder(env: &Env) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(env.kube.clone(), OPERATOR_NS);
    leases.get_opt(RELEASE).await.unwrap()?.spec?.holder_identity
}

/// A field of /proc/PID/status, as the process itself sees it.
fn proc_status_line(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// The mount options of `/` in the process's own mount namespace.
fn root_mount_options(pid: u32) -> String {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    info.lines()
        .rfind(|l| l.split_whitespace().nth(4) == Some("/"))
        .and_then(|l| l.split_whitespace().nth(5))
        .expect("a root mount")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_chart_runs_two_ready_replicas_one_leader_unprivileged_and_grants_become_ready() {
    let env = Env::start_in_cluster(short_lived(3600)).await;
    let started = Instant::now();
    helm_install(&env, &[]).await;
    println!("helm install --wait: {:.1}s", started.elapsed().as_secs_f64());

    let pods = operator_pods(&env).await;
    assert_eq!(pods.len(), 2, "two replicas");
    assert!(pods.iter().all(is_ready), "both replicas Ready");
    let names: Vec<String> = pods.iter().filter_map(|p| p.metadata.name.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let holder = loop {
        // The holder identity is the pod's name and a per-process suffix.
        if let Some(h) = lease_holder(&env).await.filter(|h| names.iter().any(|n| h.starts_with(&format!("{n}_")))) {
            break h;
        }
        assert!(Instant::now() < deadline, "no replica holds the Lease: {:?}", lease_holder(&env).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("leader: {holder}");

    create_authorized_grants(&env, &["alice", "bob"]).await;
    for name in ["alice", "bob"] {
        env.wait_ready(name, "True", "Refreshed", Duration::from_secs(60)).await;
        assert!(env.live_token_is_active(name).await, "{name}'s access token is active at Hydra");
    }

    // As the container's own process sees itself (not the pod spec: what the runtime made of it).
    let cluster = env.cluster.as_ref().unwrap();
    for pod in &pods {
        let pid = cluster.container_pid(&operator_container_id(pod)).unwrap();
        let name = pod.metadata.name.as_deref().unwrap();
        let uids = proc_status_line(pid, "Uid");
        assert!(uids.split_whitespace().all(|u| u == "65532"), "{name}: Uid {uids}");
        let gids = proc_status_line(pid, "Gid");
        assert!(gids.split_whitespace().all(|g| g == "65532"), "{name}: Gid {gids}");
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(proc_status_line(pid, set), "0000000000000000", "{name}: {set}");
        }
        assert_eq!(proc_status_line(pid, "NoNewPrivs"), "1", "{name}: no privilege escalation");
        // 2: a seccomp filter is in force (the runtime's default profile, RuntimeDefault).
        assert_eq!(proc_status_line(pid, "Seccomp"), "2", "{name}: seccomp");
        let root = root_mount_options(pid);
        assert!(root.split(',').any(|o| o == "ro"), "{name}: root filesystem mounted {root}");
    }

    let deployment: Deployment = Api::namespaced(env.kube.clone(), OPERATOR_NS).get(RELEASE).await.unwrap();
    let ready = deployment.status.and_then(|s| s.ready_replicas);
    assert_eq!(ready, Some(2));
    assert!(env.hydra.recording_proxy().refresh_tokens_presented_twice().is_empty());
}

/// The `container`'s log lines with the runtime's timestamps (RFC 3339, nanoseconds), through the
/// apiserver and kubelet as `kubectl logs --timestamps` reads them.
async fn timestamped_log(env: &Env, namespace: &str, pod: &str, container: &str) -> Vec<(jiff::Timestamp, String)> {
    let pods: Api<Pod> = Api::namespaced(env.kube.clone(), namespace);
    let params = kube::api::LogParams { container: Some(container.into()), timestamps: true, ..Default::default() };
    let text = pods.logs(pod, &params).await.unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(ts, line)| Some((ts.parse().ok()?, line.to_owned())))
        .collect()
}

/// Waits until the pod is Running with every container started.
async fn wait_running(env: &Env, namespace: &str, pod: &str, within: Duration) {
    let pods: Api<Pod> = Api::namespaced(env.kube.clone(), namespace);
    let deadline = Instant::now() + within;
    loop {
        let p = pods.get(pod).await.unwrap();
        let phase = p.status.as_ref().and_then(|s| s.phase.clone());
        if phase.as_deref() == Some("Running") && is_ready(&p) {
            return;
        }
        assert!(Instant::now() < deadline, "{namespace}/{pod} not Running and Ready within {within:?}: {:?}", p.status);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The first 16 hex digits of the token's sha256: what the test workloads print instead of it.
fn short_hash(token: &str) -> String {
    wgtwo_testenv::sha256_hex(token)[..16].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_mounting_the_target_secret_sees_each_refreshed_token_within_kubelets_sync_period() {
    let env = Env::start_in_cluster(short_lived(3600)).await;
    helm_install(&env, &[]).await;
    create_authorized_grants(&env, &["alice"]).await;
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(60)).await;

    // A workload as the README tells users to write one: the Secret as a volume (never a subPath
    // or an env var), the token read per use. It prints a hash of the token whenever it changes.
    let reader: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "token-reader"},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532},
            "containers": [{
                "name": "reader",
                "image": wgtwo_testenv::cluster::BUSYBOX_IMAGE,
                "command": ["sh", "-c", "last=; while true; do h=$(sha256sum /var/run/token/access_token | cut -c1-16); if [ \"$h\" != \"$last\" ]; then echo \"token $h\"; last=$h; fi; usleep 100000; done"],
                "volumeMounts": [{"name": "token", "mountPath": "/var/run/token", "readOnly": true}],
            }],
            "volumes": [{"name": "token", "secret": {"secretName": "alice-token"}}],
        },
    }))
    .unwrap();
    Api::<Pod>::namespaced(env.kube.clone(), NS).create(&PostParams::default(), &reader).await.unwrap();
    wait_running(&env, NS, "token-reader", Duration::from_secs(60)).await;

    let mut delays = Vec::new();
    for round in 1..=3 {
        let before = env.secret_value("alice-token", "access_token").await.unwrap();
        env.request_refresh("alice", &format!("volume-{round}")).await;
        // When the Secret holds the new token (polled every 100 ms).
        let deadline = Instant::now() + Duration::from_secs(30);
        let (written, token) = loop {
            let now = env.secret_value("alice-token", "access_token").await.unwrap();
            if now != before {
                break (jiff::Timestamp::now(), now);
            }
            assert!(Instant::now() < deadline, "round {round}: the target Secret was not refreshed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let wanted = format!("token {}", short_hash(&token));
        let deadline = Instant::now() + Duration::from_secs(180);
        let seen = loop {
            let log = timestamped_log(&env, NS, "token-reader", "reader").await;
            if let Some((at, _)) = log.iter().find(|(_, line)| *line == wanted) {
                break *at;
            }
            assert!(Instant::now() < deadline, "round {round}: the pod's file did not show the new token in 180 s");
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let delay = seen.duration_since(written).as_secs_f64();
        println!(
            "round {round}: the Secret volume showed the refreshed token {delay:.1}s after the Secret was written"
        );
        delays.push(delay);
    }
    let max = delays.iter().copied().fold(0.0, f64::max);
    println!(
        "Secret volume delay over {} refreshes (kubelet syncFrequency 1m, Watch strategy): min {:.1}s, max {max:.1}s",
        delays.len(),
        delays.iter().copied().fold(f64::MAX, f64::min)
    );
    // kubelet updates a Secret volume when it syncs the pod: within syncFrequency (1 m) plus jitter.
    assert!(max < 120.0, "a Secret volume took {max:.1}s to show a refreshed token");
}

/// deploy/chart/wgtwo-operator/examples/agent-sidecar.yaml as a user applies it: only the images
/// substituted (its namespace, team-a, and Secret, alice-token, are the tests' own).
fn agent_example() -> std::path::PathBuf {
    let root = wgtwo_testenv::repo_root();
    let text = std::fs::read_to_string(root.join("deploy/chart/wgtwo-operator/examples/agent-sidecar.yaml")).unwrap();
    assert!(text.contains("namespace: team-a") && text.contains("alice-token"), "the example's names changed");
    // An image left unreplaced would be pulled from a registry: never.
    assert!(
        text.contains("REGISTRY/wgtwo-operator:0.1.0") && text.contains("busybox:1.36"),
        "the example's images changed"
    );
    let text = text
        .replace("REGISTRY/wgtwo-operator:0.1.0", OPERATOR_IMAGE)
        .replace("busybox:1.36", wgtwo_testenv::cluster::BUSYBOX_IMAGE);
    let path = std::env::temp_dir().join(format!("agent-example-{}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

fn container_status<'a>(pod: &'a Pod, name: &str) -> Option<&'a k8s_openapi::api::core::v1::ContainerStatus> {
    let status = pod.status.as_ref()?;
    status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .find(|c| c.name == name)
}

/// The example's one pod (waits for the Deployment to make it).
async fn app_pod(env: &Env) -> Pod {
    let pods: Api<Pod> = Api::namespaced(env.kube.clone(), NS);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut list = pods.list(&ListParams::default().labels("app=alice-app")).await.unwrap().items;
        assert!(list.len() <= 1, "more than one alice-app pod");
        if let Some(pod) = list.pop() {
            return pod;
        }
        assert!(Instant::now() < deadline, "the alice-app Deployment made no pod");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agent_example_starts_the_application_only_with_the_token_on_disk_and_keeps_it_active() {
    let env = Env::start_in_cluster(short_lived(3600)).await;
    helm_install(&env, &[]).await;
    let refresh_token = env.authorize("alice").await;

    // Applied before the grant exists: the sidecar waits for the Secret, the application must not
    // start meanwhile.
    let example = agent_example();
    env.cp.kubectl(&["apply", "-f", example.to_str().unwrap()]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pod = app_pod(&env).await;
        if container_status(&pod, "wgtwo-agent").is_some_and(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        {
            break;
        }
        assert!(Instant::now() < deadline, "the agent sidecar did not start: {:?}", pod.status);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let pod = app_pod(&env).await;
    let app_running =
        container_status(&pod, "app").is_some_and(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
    assert!(!app_running, "the application started without a token: {:?}", pod.status);

    env.create_grant("alice", &refresh_token, |_| {}).await;
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(60)).await;
    let secret_created = env.secrets().get("alice-token").await.unwrap().metadata.creation_timestamp.unwrap().0;
    let pod_name = app_pod(&env).await.metadata.name.unwrap();
    wait_running(&env, NS, &pod_name, Duration::from_secs(60)).await;
    let pod = app_pod(&env).await;
    let app = container_status(&pod, "app").unwrap();
    let started = app.state.as_ref().and_then(|s| s.running.as_ref()).and_then(|r| r.started_at.clone()).unwrap().0;
    assert!(
        started >= secret_created,
        "the application started ({started}) before the token existed ({secret_created})"
    );
    let log = timestamped_log(&env, NS, &pod_name, "app").await;
    let first = log.first().map(|(_, l)| l.clone()).unwrap_or_default();
    let size: usize = first.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(size > 0, "the application's first read found no token: {first:?}");

    // The token the application reads (the sidecar's emptyDir, as mounted into the pod) over
    // several refreshes: introspected at Hydra every 100 ms.
    let uid = pod.metadata.uid.clone().unwrap();
    let cluster = env.cluster.as_ref().unwrap();
    let file =
        cluster.dir().join(format!("kubelet/root/pods/{uid}/volumes/kubernetes.io~empty-dir/wgtwo-token/access_token"));
    let mut inactive_since: Option<Instant> = None;
    let mut windows: Vec<f64> = Vec::new();
    let mut samples = 0;
    let mut seen = std::collections::BTreeSet::new();
    for round in 1..=4 {
        env.request_refresh("alice", &format!("agent-{round}")).await;
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            let token = std::fs::read_to_string(&file).unwrap_or_default();
            let active = !token.is_empty() && env.active(token.trim()).await;
            samples += 1;
            if !token.is_empty() {
                seen.insert(short_hash(&token));
            }
            match (active, inactive_since) {
                (false, None) => inactive_since = Some(Instant::now()),
                (true, Some(since)) => {
                    windows.push(since.elapsed().as_secs_f64());
                    inactive_since = None;
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        env.wait_refresh_handled("alice", &format!("agent-{round}"), Duration::from_secs(10)).await;
    }
    if let Some(since) = inactive_since {
        windows.push(since.elapsed().as_secs_f64());
    }
    let max = windows.iter().copied().fold(0.0, f64::max);
    println!(
        "agent example: 4 refreshes, {samples} samples of the application's token, {} windows inactive at Hydra, longest {max:.2}s",
        windows.len()
    );
    assert!(max <= 1.0, "the application's token was inactive for {max:.2}s");
    assert!(seen.len() >= 5, "the application read {} tokens over 4 refreshes", seen.len());

    // The grant goes (and with it, by garbage collection, its target Secret): the sidecar turns not
    // ready, nothing restarts.
    env.grants().delete("alice", &Default::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pod = app_pod(&env).await;
        let agent_ready = container_status(&pod, "wgtwo-agent").is_some_and(|c| c.ready);
        if !agent_ready && !is_ready(&pod) {
            assert_eq!(pod.metadata.uid.as_deref(), Some(uid.as_str()), "the same pod");
            for c in ["wgtwo-agent", "app"] {
                assert_eq!(container_status(&pod, c).unwrap().restart_count, 0, "{c} restarted");
            }
            break;
        }
        assert!(Instant::now() < deadline, "the sidecar stayed ready without its Secret");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The log of the pod's operator container: the current one, or the last terminated one (which
/// kubelet keeps), e.g. for the grants whose token request was in flight when it died.
async fn operator_log(pods: &Api<Pod>, pod: &str, previous: bool) -> kube::Result<String> {
    pods.logs(pod, &kube::api::LogParams { container: Some("operator".into()), previous, ..Default::default() }).await
}

/// The running operator container of the only operator pod: (pod name, container id, restarts).
async fn single_operator(env: &Env) -> Option<(String, String, i32)> {
    let pods = operator_pods(env).await;
    let [pod] = pods.as_slice() else { return None };
    let status = container_status(pod, "operator")?;
    status.state.as_ref()?.running.as_ref()?;
    Some((pod.metadata.name.clone()?, status.container_id.clone()?, status.restart_count))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_operator_containers_restart_in_their_pod_and_replay_the_journal_from_the_empty_dir() {
    let kills_wanted: usize = std::env::var("WGTWO_CLUSTER_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let env = Env::start_in_cluster(short_lived(6)).await;
    // One replica without leader election, so each restarted container leads at once (failover
    // between pods has its own test); the journal on its memory-backed emptyDir, as the chart sets.
    helm_install(&env, &["replicaCount=1", "leaderElection.enabled=false"]).await;
    let names: Vec<String> = (0..5).map(|i| format!("grant-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    create_authorized_grants(&env, &refs).await;
    for name in &names {
        env.wait_ready(name, "True", "Refreshed", Duration::from_secs(60)).await;
    }
    let cluster = env.cluster.as_ref().unwrap();
    let pods: Api<Pod> = Api::namespaced(env.kube.clone(), OPERATOR_NS);
    let started = Instant::now();
    let mut in_flight_at_a_kill = std::collections::BTreeSet::new();
    let mut pod_name = String::new();
    let mut replayed = 0;
    for kill in 1..=kills_wanted {
        // Wait for a running container, let it work a random while, then kill it as the OOM killer
        // or a crash would: SIGKILL to its process, through the runtime.
        let deadline = Instant::now() + Duration::from_secs(60);
        // (kubelet reports the kill, then the restart: wait for the container of this round.)
        let (pod, container) = loop {
            match single_operator(&env).await {
                Some((pod, container, restarts)) if restarts as usize == kill - 1 => break (pod, container),
                Some((_, _, restarts)) => assert!((restarts as usize) < kill, "restarted without a kill"),
                None => {}
            }
            assert!(Instant::now() < deadline, "kill {kill}: the operator container was not restarted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if kill > 1 {
            assert_eq!(pod, pod_name, "restarted in the same pod");
            // The previous container's log: which grants had a token request in flight when it died.
            let previous = operator_log(&pods, &pod, true).await.unwrap();
            in_flight_at_a_kill.extend(support::requests_in_flight_at_end(&previous));
            let current = operator_log(&pods, &pod, false).await.unwrap_or_default();
            replayed += current
                .lines()
                .filter(|l| l.contains("journal: the rotated refresh token of a killed process"))
                .count();
        }
        pod_name = pod;
        let pause = rand::Rng::random_range(&mut rand::rng(), 500..3000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        cluster.kill_container(&container, "SIGKILL").unwrap();
    }
    // The last restart: every grant that was not lost to a request in flight refreshes again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while single_operator(&env).await.is_none_or(|(_, _, r)| (r as usize) < kills_wanted) {
        assert!(Instant::now() < deadline, "the operator container did not come back after the last kill");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    in_flight_at_a_kill
        .extend(support::requests_in_flight_at_end(&operator_log(&pods, &pod_name, true).await.unwrap()));
    tokio::time::sleep(Duration::from_secs(15)).await;
    let mut lost = Vec::new();
    for name in &names {
        let live = env.live_refresh_token(name).await.unwrap_or_default();
        if !env.active(&live).await {
            lost.push(name.clone());
        }
    }
    let twice = env.hydra.recording_proxy().refresh_tokens_presented_twice();
    println!(
        "cluster kill loop: {kills_wanted} SIGKILLs of the operator container over {:.0}s, {} of {} grants lost {lost:?}, token request in flight at a kill for {in_flight_at_a_kill:?}, {} answers replayed from the journal, {} refresh tokens presented twice",
        started.elapsed().as_secs_f64(),
        lost.len(),
        names.len(),
        replayed,
        twice.len()
    );
    let unexplained: Vec<_> = lost.iter().filter(|g| !in_flight_at_a_kill.contains(*g)).collect();
    assert!(unexplained.is_empty(), "grants lost with no request in flight at a kill: {unexplained:?}");
    assert!(twice.is_empty(), "a refresh token was presented twice: {twice:?}");
    for name in names.iter().filter(|n| !lost.contains(n)) {
        env.wait_ready(name, "True", "Refreshed", Duration::from_secs(30)).await;
    }
}

/// Lease holders sampled over time: (when, holder pod name).
type LeaseSamples = std::sync::Arc<std::sync::Mutex<Vec<(Instant, Option<String>)>>>;

/// Samples the Lease holder every 200 ms in the background: (time, holder pod name).
fn watch_leader(env: &Env) -> (tokio::task::JoinHandle<()>, LeaseSamples) {
    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let leases: Api<Lease> = Api::namespaced(env.kube.clone(), OPERATOR_NS);
    let out = samples.clone();
    let task = tokio::spawn(async move {
        loop {
            let holder = leases
                .get_opt(RELEASE)
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.holder_identity)
                .and_then(|h| h.rsplit_once('_').map(|(pod, _)| pod.to_owned()));
            out.lock().unwrap().push((Instant::now(), holder));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (task, samples)
}

/// How long after `since` the Lease first named a holder other than `old`.
fn handover_after(samples: &[(Instant, Option<String>)], since: Instant, old: &str) -> Option<f64> {
    samples
        .iter()
        .find(|(at, holder)| *at >= since && holder.as_deref().is_some_and(|h| h != old))
        .map(|(at, _)| at.duration_since(since).as_secs_f64())
}

/// Each change of the Lease holder after `since`: (seconds after `since`, new holder).
fn lease_moves(samples: &[(Instant, Option<String>)], since: Instant) -> Vec<(f64, String)> {
    let mut moves = Vec::new();
    let mut last: Option<&str> = None;
    for (at, holder) in samples {
        let Some(holder) = holder.as_deref() else { continue };
        if last.is_some_and(|l| l != holder) && *at >= since {
            moves.push(((at.duration_since(since).as_secs_f64() * 10.0).round() / 10.0, holder.to_owned()));
        }
        last = Some(holder);
    }
    moves
}

async fn wait_all_refreshed_after(env: &Env, names: &[String], after: jiff::Timestamp, within: Duration) {
    let deadline = Instant::now() + within;
    for name in names {
        loop {
            let status = env.status(name).await.unwrap_or_default();
            let last = status.last_refresh_time.map(|t| t.0).unwrap_or_default();
            if last > after {
                break;
            }
            assert!(Instant::now() < deadline, "{name}: no refresh within {within:?} (last {last})");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        env.wait_ready(name, "True", "Refreshed", Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_update_and_a_drain_through_the_eviction_api_hand_over_without_presenting_a_token_twice() {
    // Tokens living 6 s: the grants refresh all the time, so a handover meets refreshes in flight.
    let env = Env::start_in_cluster(short_lived(6)).await;
    helm_install(&env, &[]).await;
    let names: Vec<String> = (0..5).map(|i| format!("grant-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    create_authorized_grants(&env, &refs).await;
    for name in &names {
        env.wait_ready(name, "True", "Refreshed", Duration::from_secs(60)).await;
    }
    let (sampler, samples) = watch_leader(&env);
    // The README's bound: the lease duration plus one renew period (a stopping leader releases the
    // Lease, so a rolling update or an eviction is normally over within one renew period).
    let bound = Duration::from_secs(33);

    // 1. helm upgrade with a changed flag: a rolling update (maxSurge 1, maxUnavailable 0).
    let leader = lease_holder(&env).await.unwrap();
    let upgrade_started = Instant::now();
    let upgraded_at = jiff::Timestamp::now();
    helm(&env, "upgrade", &["operator.concurrency=8"]);
    println!("helm upgrade --wait: {:.1}s", upgrade_started.elapsed().as_secs_f64());
    // The new pods run the new flag, and only they remain (helm may return just before the old
    // ReplicaSet's last pod is marked for deletion).
    let deadline = Instant::now() + Duration::from_secs(30);
    let pods = loop {
        let live: Vec<Pod> =
            operator_pods(&env).await.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
        let new_flag = |p: &Pod| {
            let args = p.spec.as_ref().unwrap().containers[0].args.clone().unwrap_or_default();
            args.contains(&"--concurrency=8".to_owned())
        };
        if live.len() == 2 && live.iter().all(new_flag) {
            break live;
        }
        assert!(Instant::now() < deadline, "not two replicas with the new flag after the rolling update");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The old pods stop one at a time (each within its grace period): wait until a new pod leads,
    // then report every move of the Lease.
    let new_pods: Vec<String> = pods.iter().filter_map(|p| p.metadata.name.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !lease_holder(&env).await.is_some_and(|h| new_pods.iter().any(|p| h.starts_with(&format!("{p}_")))) {
        assert!(Instant::now() < deadline, "no new pod leads 90 s after the rolling update");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let moves = lease_moves(&samples.lock().unwrap(), upgrade_started);
    println!("rolling update: the Lease moved at {moves:?} (s after helm upgrade began, new holder)");
    let old = leader.rsplit_once('_').unwrap().0.to_owned();
    assert!(moves.iter().any(|(_, h)| *h != old), "the Lease never moved");
    wait_all_refreshed_after(&env, &names, upgraded_at, bound + Duration::from_secs(10)).await;

    // 2. Drain: cordon, then evict the operator's pods as kubectl drain does (Eviction API).
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(env.kube.clone());
    let cordon = serde_json::json!({"spec": {"unschedulable": true}});
    nodes
        .patch(wgtwo_testenv::cluster::NODE_NAME, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&cordon))
        .await
        .unwrap();
    // kube's client retries a 429 by default (honouring Retry-After, 15 times): the PDB's refusal
    // must come back as is, as to kubectl drain.
    let mut config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(env.cp.admin_kubeconfig()).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    config.default_retry = false;
    let pod_api: Api<Pod> = Api::namespaced(kube::Client::try_from(config).unwrap(), OPERATOR_NS);
    let leader = lease_holder(&env).await.unwrap().rsplit_once('_').unwrap().0.to_owned();
    let standby = operator_pods(&env)
        .await
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.metadata.name)
        .find(|n| *n != leader)
        .unwrap();
    let evicted_at = Instant::now();
    let drained_at = jiff::Timestamp::now();
    pod_api.evict(&leader, &Default::default()).await.expect("the first eviction is allowed");
    // Its replacement cannot be scheduled on the cordoned node: the PDB (minAvailable 1) refuses
    // the second eviction.
    match pod_api.evict(&standby, &Default::default()).await {
        Err(kube::Error::Api(e)) if e.code == 429 => {}
        other => panic!("the PodDisruptionBudget let the last replica be evicted: {other:?}"),
    }
    let deadline = Instant::now() + bound;
    let drain_handover = loop {
        if let Some(s) = handover_after(&samples.lock().unwrap(), evicted_at, &leader) {
            break s;
        }
        assert!(Instant::now() < deadline, "no new leader within {bound:?} of the eviction");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("drain: the Lease moved from the evicted leader {drain_handover:.1}s after its eviction");
    wait_all_refreshed_after(&env, &names, drained_at, bound + Duration::from_secs(10)).await;
    // Uncordon: the replacement runs, and now the other pod may go too.
    let uncordon = serde_json::json!({"spec": {"unschedulable": false}});
    nodes
        .patch(
            wgtwo_testenv::cluster::NODE_NAME,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&uncordon),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let pods = operator_pods(&env).await;
        let ready = pods.iter().filter(|p| is_ready(p) && p.metadata.deletion_timestamp.is_none()).count();
        if ready == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the evicted replica's replacement did not become Ready");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = pod_api.evict(&standby, &Default::default()).await {
        assert!(Instant::now() < deadline, "the second eviction stayed refused with two replicas Ready: {e}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let second_at = jiff::Timestamp::now();
    wait_all_refreshed_after(&env, &names, second_at, bound + Duration::from_secs(10)).await;
    sampler.abort();

    let twice = env.hydra.recording_proxy().refresh_tokens_presented_twice();
    assert!(twice.is_empty(), "a refresh token was presented twice: {twice:?}");
    for name in &names {
        assert!(env.live_token_is_active(name).await, "{name}: its live refresh token is inactive");
    }
}

/// Runs `kubectl wgtwo ARGS` through the documented plugin symlink to the operator's binary.
fn kubectl_wgtwo(env: &Env, args: &[&str]) -> String {
    let bin = env.dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let link = bin.join("kubectl-wgtwo");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_wgtwo-operator"), &link).unwrap();
    }
    let out = std::process::Command::new(wgtwo_testenv::binaries::path("kubectl"))
        .arg("wgtwo")
        .args(args)
        .env("KUBECONFIG", env.cp.admin_kubeconfig())
        .env("RUST_LOG", "warn")
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "kubectl wgtwo {}: {text}{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_wgtwo_status_and_refresh_work_with_the_operator_running_in_the_cluster() {
    let env = Env::start_in_cluster(short_lived(3600)).await;
    helm_install(&env, &[]).await;
    create_authorized_grants(&env, &["alice", "bob"]).await;
    for name in ["alice", "bob"] {
        env.wait_ready(name, "True", "Refreshed", Duration::from_secs(60)).await;
    }
    let status = tokio::task::block_in_place(|| kubectl_wgtwo(&env, &["status", "-n", NS]));
    println!("{status}");
    for name in ["alice", "bob"] {
        let line = status
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} missing:\n{status}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&fields[..4], [name, "refresh_token", "True", "Refreshed"], "{status}");
    }
    // refresh asks the operator in the pod (an annotation) and waits for its answer.
    let before = env.secret_value("alice-token", "access_token").await.unwrap();
    let out = tokio::task::block_in_place(|| kubectl_wgtwo(&env, &["refresh", "alice", "-n", NS]));
    assert!(out.contains("alice-token is valid until"), "{out}");
    let after = env.secret_value("alice-token", "access_token").await.unwrap();
    assert_ne!(before, after, "refresh gave a new access token");
    assert!(env.active(&after).await, "the new access token is active at Hydra");
}

/// The operator container's restarts and the reason its last run ended.
fn last_termination(pod: &Pod) -> (i32, Option<String>) {
    let Some(status) = container_status(pod, "operator") else { return (0, None) };
    let reason = status.last_state.as_ref().and_then(|s| s.terminated.as_ref()).and_then(|t| t.reason.clone());
    (status.restart_count, reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_outgrowing_its_memory_limit_is_oom_killed_and_then_holds_all_grants_at_the_charts_default_limit() {
    use wgtwo_testenv::token_server::{RotatingTokenServer, USER_TOKEN_PREFIX};
    // CI: WGTWO_CLUSTER_GRANTS (default 10,000: the count the README states the chart's default
    // memory limit for).
    let count: usize = std::env::var("WGTWO_CLUSTER_GRANTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let env = Env::start_in_cluster(short_lived(3600)).await;
    // A fast rotating token endpoint (correctness against Hydra is the other tests'); it ends a
    // lineage whose refresh token is presented twice, so a lost grant shows as InvalidGrant.
    let stub = RotatingTokenServer::start_tls_on(wgtwo_testenv::cluster::HOST_IP, 3600).await.unwrap();
    let issuer = stub.base_url().to_owned();
    helm_install_trusting(
        &env,
        &[
            "replicaCount=1",
            "leaderElection.enabled=false",
            "resources.requests.memory=48Mi",
            "resources.limits.memory=48Mi",
            &format!("operator.allowedIssuers[1]={issuer}"),
        ],
        stub.ca_pem().unwrap(),
    )
    .await;
    let pod = operator_pods(&env).await.pop().unwrap();
    let pod_name = pod.metadata.name.clone().unwrap();
    let uid = pod.metadata.uid.clone().unwrap();
    env.put_clients(4).await;
    let created = Instant::now();
    env.create_grants_at(&issuer, count, 4, |i| format!("g-{i}"), |i| format!("{USER_TOKEN_PREFIX}{i}")).await;
    println!("{count} grants created in {:.0}s", created.elapsed().as_secs_f64());

    // At 48 MiB the operator cannot hold them: the kernel kills it, kubelet restarts it in the pod.
    let pods: Api<Pod> = Api::namespaced(env.kube.clone(), OPERATOR_NS);
    let mut in_flight = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut seen_restarts = 0;
    let oom_kills = loop {
        let pod = pods.get(&pod_name).await.unwrap();
        let (restarts, reason) = last_termination(&pod);
        if restarts > seen_restarts {
            seen_restarts = restarts;
            in_flight.extend(support::requests_in_flight_at_end(
                &operator_log(&pods, &pod_name, true).await.unwrap_or_default(),
            ));
        }
        if reason.as_deref() == Some("OOMKilled") && restarts >= 2 {
            break restarts;
        }
        assert!(Instant::now() < deadline, "no OOM kill at 48 MiB with {count} grants: {:?}", pod.status);
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("48 MiB limit: OOMKilled and restarted {oom_kills} times in pod {pod_name}");

    // Resize the pod in place to the chart's default limit: the same pod (and its journal) goes on.
    let defaults: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(wgtwo_testenv::repo_root().join("deploy/chart/wgtwo-operator/values.yaml")).unwrap(),
    )
    .unwrap();
    let limit = defaults["resources"]["limits"]["memory"].as_str().unwrap().to_owned();
    let resize = serde_json::json!({"spec": {"containers": [{"name": "operator", "resources": {
        "requests": {"memory": limit}, "limits": {"memory": limit}}}]}});
    let params = kube::api::PatchParams::default();
    let patch = kube::api::Patch::Strategic(&resize);
    let resized_at = Instant::now();
    pods.patch_subresource("resize", &pod_name, &params, &patch).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut ready = 0;
    let grants = env.grants();
    let kills_before = seen_restarts;
    loop {
        let pod = pods.get(&pod_name).await.unwrap();
        assert_eq!(pod.metadata.uid.as_deref(), Some(uid.as_str()), "the same pod");
        let (restarts, reason) = last_termination(&pod);
        if restarts > seen_restarts {
            seen_restarts = restarts;
            in_flight.extend(support::requests_in_flight_at_end(
                &operator_log(&pods, &pod_name, true).await.unwrap_or_default(),
            ));
            println!("restart {restarts} after the resize ({reason:?})");
        }
        let list = grants.list(&ListParams::default()).await.unwrap().items;
        let now_ready = list
            .iter()
            .filter(|g| {
                g.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        let invalid: Vec<String> = list
            .iter()
            .filter(|g| g.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.reason == "InvalidGrant")))
            .filter_map(|g| g.metadata.name.clone())
            .collect();
        if now_ready + invalid.len() == count {
            let unexplained: Vec<_> = invalid.iter().filter(|g| !in_flight.contains(*g)).collect();
            println!(
                "limit {limit}: {now_ready} of {count} grants Ready {:.0}s after the resize; {} lost {invalid:?}, in flight at a kill {}; restarts after the resize {}",
                resized_at.elapsed().as_secs_f64(),
                invalid.len(),
                in_flight.len(),
                seen_restarts - kills_before
            );
            assert!(unexplained.is_empty(), "grants lost with no request in flight at a kill: {unexplained:?}");
            break;
        }
        if now_ready != ready {
            ready = now_ready;
        }
        assert!(Instant::now() < deadline, "{ready} of {count} grants Ready 600 s after the resize to {limit}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // The chart's default limit holds them: no kill since (one that came before the resize took
    // effect, while the container was already starting, is allowed).
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (restarts, reason) = last_termination(&pods.get(&pod_name).await.unwrap());
    assert!(restarts <= kills_before + 1, "killed again at {limit}: {restarts} restarts, last {reason:?}");
    assert_eq!(stub.reused(), 0, "a refresh token was presented twice");
}
