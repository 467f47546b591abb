//! Shared setup for the controller's end-to-end tests: a control plane, a Hydra, a namespace with
//! the OAuth client Secret, subscribers authorized through Hydra, and the operator binary.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use wgtwo_operator::api::{
    ClientSecretRef, RefreshTokenSecretRef, TargetSecret, WgtwoGrant, WgtwoGrantSpec, WgtwoGrantStatus,
};
use wgtwo_operator::oauth::secrets::{AuthorizationCode, ClientSecret};
use wgtwo_operator::oauth::{AuthorizationRequest, CallbackOutcome, ClientConfig, WgtwoClient, parse_callback};
use wgtwo_testenv::process::ChildGuard;
use wgtwo_testenv::{ControlPlane, Hydra, HydraOptions, OAuthClient, Subscriber};

pub const NS: &str = "team-a";
/// Where the shipped manifests install the operator (its ServiceAccount and Lease).
pub const OPERATOR_NS: &str = "wgtwo-system";
pub const OPERATOR_SA: &str = "wgtwo-operator";
pub const REDIRECT: &str = "http://127.0.0.1:8085/callback";

/// Hydra with access tokens living `secs` seconds.
pub fn ttl(secs: u64) -> HydraOptions {
    HydraOptions { access_token_ttl: Duration::from_secs(secs), ..Default::default() }
}

pub struct Env {
    /// The node of a cluster test ([`Env::start_in_cluster`]); dropped before the control plane.
    pub cluster: Option<wgtwo_testenv::Cluster>,
    pub cp: ControlPlane,
    pub hydra: Hydra,
    pub client: OAuthClient,
    pub wgtwo: WgtwoClient,
    pub kube: kube::Client,
    pub ca_file: PathBuf,
    pub dir: tempfile::TempDir,
    /// Credentials of the operator's ServiceAccount, bound to exactly the shipped RBAC.
    pub operator_kubeconfig: PathBuf,
    /// The namespace the operator watches (`--namespace`); `None`: all.
    pub watch_namespace: Option<String>,
    operator_starts: usize,
}

/// Which RBAC of the chart the operator runs with.
pub enum Rbac {
    /// deploy/manifests/wgtwo-operator.yaml as shipped: a ClusterRole.
    Shipped,
    /// The chart rendered with watchNamespace=NS: a Role in NS only.
    WatchNamespace,
}

/// Renders the chart with extra `--set` values (helm built by tools/testenv/build.sh).
pub fn helm_template(set: &[&str]) -> String {
    let root = wgtwo_testenv::repo_root();
    let mut cmd = std::process::Command::new(wgtwo_testenv::binaries::path("helm"));
    cmd.args(["template", "wgtwo-operator"]).arg(root.join("deploy/chart/wgtwo-operator")).args([
        "--namespace",
        OPERATOR_NS,
        "--kube-version",
        "v1.37.2",
    ]);
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The client the tests authorize subscribers with (the operator discovers its own).
async fn test_client(hydra: &Hydra, client: &OAuthClient) -> WgtwoClient {
    let mut config = ClientConfig::new(&client.client_id, ClientSecret::new(client.client_secret.clone()));
    config.issuer_url = hydra.base_url();
    config.redirect_uri = Some(REDIRECT.into());
    config.ca_bundle_pem = Some(hydra.ca_pem().as_bytes().to_vec());
    WgtwoClient::discover(config).await.unwrap()
}

impl Env {
    pub async fn start(options: HydraOptions) -> Env {
        Self::start_with(options, Rbac::Shipped).await
    }

    pub async fn start_with(options: HydraOptions, rbac: Rbac) -> Env {
        let (cp, hydra) = tokio::join!(ControlPlane::start(), Hydra::start(options));
        let (cp, hydra) = (cp.unwrap(), hydra.unwrap());
        cp.create_namespace(NS).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let manifests = match rbac {
            Rbac::Shipped => wgtwo_testenv::repo_root().join("deploy/manifests/wgtwo-operator.yaml"),
            Rbac::WatchNamespace => {
                cp.create_namespace(OPERATOR_NS).await.unwrap();
                let path = dir.path().join("scoped.yaml");
                std::fs::write(&path, helm_template(&[&format!("watchNamespace={NS}")])).unwrap();
                path
            }
        };
        cp.kubectl(&["apply", "--server-side", "--force-conflicts", "-f", manifests.to_str().unwrap()]).unwrap();
        let (_, operator_kubeconfig) = cp.service_account_client(OPERATOR_NS, OPERATOR_SA).await.unwrap();
        Self::assemble(None, cp, hydra, dir, operator_kubeconfig, Some(NS.into())).await
    }

    /// The rest of an Env once its servers run and NS exists: the OAuth client in Hydra and its
    /// Secret, the tests' own client, the admin client.
    async fn assemble(
        cluster: Option<wgtwo_testenv::Cluster>,
        cp: ControlPlane,
        hydra: Hydra,
        dir: tempfile::TempDir,
        operator_kubeconfig: PathBuf,
        watch_namespace: Option<String>,
    ) -> Env {
        let client = hydra.create_client(&[REDIRECT]).await.unwrap();
        let kube = cp.admin_client().await.unwrap();
        let ca_file = dir.path().join("hydra-ca.pem");
        std::fs::write(&ca_file, hydra.ca_pem()).unwrap();
        let wgtwo = test_client(&hydra, &client).await;
        let env = Env {
            cluster,
            cp,
            hydra,
            client,
            wgtwo,
            kube,
            ca_file,
            dir,
            operator_kubeconfig,
            watch_namespace,
            operator_starts: 0,
        };
        env.put_secret(
            "wgtwo-client",
            &[("client_id", &env.client.client_id), ("client_secret", &env.client.client_secret)],
        )
        .await;
        env
    }

    /// A one-node cluster (the operator's image imported) and a Hydra that pods reach, behind the
    /// recording proxy. Nothing of the operator is installed: the tests install the chart.
    pub async fn start_in_cluster(options: HydraOptions) -> Env {
        let image = wgtwo_testenv::image::operator_image().unwrap();
        let options = HydraOptions { recording_proxy: true, public_ip: wgtwo_testenv::cluster::HOST_IP, ..options };
        let images = [image.as_path()];
        let started = Instant::now();
        let cluster = wgtwo_testenv::Cluster::start(&images).await;
        println!(
            "cluster: the node Ready and the kubernetes Service routed in {:.1}s (with any wait for another test's node)",
            started.elapsed().as_secs_f64()
        );
        let (cluster, cp) = cluster.unwrap();
        // Only now: Hydra listens on the node's bridge address, which exists only while this node
        // does (another test's node may hold the lock until then, and removes its bridge on drop).
        let hydra = Hydra::start(options).await;
        // On a failure here the node goes before its control plane (its drain needs the apiserver).
        let ready = match hydra {
            Ok(hydra) => cp.create_namespace(NS).await.map(|_| hydra).map_err(|e| e.to_string()),
            Err(e) => Err(format!("{e:#}")),
        };
        let hydra = match ready {
            Ok(hydra) => hydra,
            Err(e) => {
                drop(cluster);
                drop(cp);
                panic!("starting the cluster's test environment: {e}")
            }
        };
        let operator_kubeconfig = cp.admin_kubeconfig().to_owned();
        Self::assemble(Some(cluster), cp, hydra, tempfile::tempdir().unwrap(), operator_kubeconfig, None).await
    }

    /// Discovers the issuer again for the tests' own client (not the operator's).
    pub async fn rediscover_test_client(&mut self) {
        self.wgtwo = test_client(&self.hydra, &self.client).await;
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.kube.clone(), NS)
    }

    pub fn grants(&self) -> Api<WgtwoGrant> {
        Api::namespaced(self.kube.clone(), NS)
    }

    /// Creates or replaces a Secret with string data.
    pub async fn put_secret(&self, name: &str, pairs: &[(&str, &str)]) {
        let secret = wgtwo_testenv::string_secret(name, pairs);
        self.secrets().patch(name, &PatchParams::apply("e2e-test").force(), &Patch::Apply(&secret)).await.unwrap();
    }

    /// A subscriber completes the authorization code flow; returns their refresh token.
    pub async fn authorize(&self, subject: &str) -> String {
        let pending = self.wgtwo.authorization_url(AuthorizationRequest::new("phone offline_access")).unwrap();
        let callback =
            self.hydra.authorize(pending.url.as_str(), &Subscriber::new(subject, "+4799999999")).await.unwrap();
        let CallbackOutcome::Code(code) = parse_callback(&callback.url, &pending.state).unwrap() else { panic!() };
        let tokens = self.wgtwo.exchange_code(AuthorizationCode::new(code), pending).await.unwrap();
        tokens.refresh_token.unwrap().secret().clone()
    }

    /// A subscriber named `name` authorizes, and a grant `name` with default settings uses it.
    pub async fn create_authorized_grant(&self, name: &str) {
        let token = self.authorize(name).await;
        self.create_grant(name, &token, |_| {}).await;
    }

    /// Stores `refresh_token` in `<name>-authorization` and applies a grant pointing at it.
    pub async fn create_grant(&self, name: &str, refresh_token: &str, edit: impl FnOnce(&mut WgtwoGrantSpec)) {
        self.put_secret(&format!("{name}-authorization"), &[("refresh_token", refresh_token)]).await;
        let mut spec = WgtwoGrantSpec {
            issuer_url: self.hydra.base_url(),
            client_secret_ref: ClientSecretRef { name: "wgtwo-client".into() },
            refresh_token_secret_ref: Some(RefreshTokenSecretRef {
                name: format!("{name}-authorization"),
                key: "refresh_token".into(),
            }),
            client_credentials: None,
            target: TargetSecret { secret_name: format!("{name}-token"), template: None },
            scope: None,
            refresh_before: None,
        };
        edit(&mut spec);
        self.grants().create(&PostParams::default(), &WgtwoGrant::new(name, spec)).await.unwrap();
    }

    /// Starts the operator binary as its ServiceAccount (the shipped RBAC), logging to a file in
    /// the env's dir, with leader election on a Lease in the operator's namespace.
    pub fn start_operator(&mut self) -> ChildGuard {
        self.start_operator_with(&[]).0
    }

    /// Starts the operator with extra `run` flags; returns it and its metrics port.
    pub fn start_operator_with(&mut self, extra: &[&str]) -> (ChildGuard, u16) {
        let kubeconfig = self.operator_kubeconfig.clone();
        self.start_operator_using(extra, &kubeconfig)
    }

    /// A copy of the operator's kubeconfig that reaches the apiserver through `port` on loopback
    /// (e.g. a `TcpProxy`).
    pub fn operator_kubeconfig_through(&self, port: u16) -> PathBuf {
        // TLS passes through: the apiserver's own CA.
        self.operator_kubeconfig_via(&format!("https://127.0.0.1:{port}"), self.cp.ca_pem())
    }

    /// A copy of the operator's kubeconfig that reaches the apiserver at `url`, trusting `ca_pem`
    /// (a TLS-terminating proxy such as `WatchLagProxy`).
    pub fn operator_kubeconfig_via(&self, url: &str, ca_pem: &str) -> PathBuf {
        use base64::Engine;
        let text = std::fs::read_to_string(&self.operator_kubeconfig).unwrap();
        let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
        let via = text.replace(self.cp.url(), url).replace(&b64(self.cp.ca_pem()), &b64(ca_pem));
        assert!(via.contains(url) && via.contains(&b64(ca_pem)), "the kubeconfig names the apiserver and its CA");
        let path = self.dir.path().join(format!("operator-via-{}.kubeconfig", url.rsplit(':').next().unwrap()));
        std::fs::write(&path, via).unwrap();
        path
    }

    /// Like `start_operator_with`, with the credentials (and server) of `kubeconfig`.
    pub fn start_operator_using(&mut self, extra: &[&str], kubeconfig: &std::path::Path) -> (ChildGuard, u16) {
        self.operator_starts += 1;
        let port = wgtwo_testenv::free_port();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wgtwo-operator"));
        cmd.arg("run");
        if let Some(ns) = &self.watch_namespace {
            cmd.args(["--namespace", ns]);
        }
        cmd.args(["--min-backoff", "500ms", "--max-backoff", "4s", "--request-timeout", "3s"])
            .args(["--metrics-bind-address", &format!("127.0.0.1:{port}")])
            .args(["--allowed-issuer", &self.hydra.base_url()])
            // Short enough for failover tests; must exceed 3s + 5s + the renew period.
            .args(["--leader-election-namespace", OPERATOR_NS, "--lease-duration", "12s", "--lease-renew-period", "1s"])
            .args(extra)
            .env("POD_NAME", format!("operator-{}", self.operator_starts))
            .arg("--ca-bundle")
            .arg(&self.ca_file)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,wgtwo_operator=debug");
        let log = self.dir.path().join(format!("operator-{}.log", self.operator_starts));
        (ChildGuard::spawn("wgtwo-operator", cmd, &log).unwrap(), port)
    }

    pub async fn status(&self, name: &str) -> Option<WgtwoGrantStatus> {
        self.grants().get_status(name).await.unwrap().status
    }

    /// The Ready condition's (status, reason), if any.
    pub async fn ready(&self, name: &str) -> Option<(String, String)> {
        let status = self.status(name).await?;
        status.conditions.iter().find(|c| c.type_ == "Ready").map(|c| (c.status.clone(), c.reason.clone()))
    }

    /// Waits until the Ready condition has this status and reason.
    pub async fn wait_ready(&self, name: &str, status: &str, reason: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.ready(name).await;
            if now.as_ref().is_some_and(|(s, r)| s == status && r == reason) {
                return;
            }
            if Instant::now() >= deadline {
                let message = self.status(name).await.and_then(|s| s.conditions.into_iter().next()).map(|c| c.message);
                panic!("{name}: Ready is {now:?}, wanted {status}/{reason} within {timeout:?}; message: {message:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Asks for a refresh of `grant` (the annotation `wgtwo-operator refresh` sets) with `value`.
    pub async fn request_refresh(&self, grant: &str, value: &str) {
        let patch = serde_json::json!({"metadata": {"annotations": {"auth.wgtwo.com/refresh-requested-at": value}}});
        self.grants().patch(grant, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }

    /// Waits until the operator has acted on the refresh request `value` and the grant is Ready.
    pub async fn wait_refresh_handled(&self, grant: &str, value: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while self.status(grant).await.and_then(|s| s.refresh_request_handled).as_deref() != Some(value) {
            assert!(
                Instant::now() < deadline,
                "{grant}: refresh request {value} not handled within {within:?}; Ready: {:?}",
                self.ready(grant).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.wait_ready(grant, "True", "Refreshed", Duration::from_secs(10)).await;
    }

    /// Waits until the grant's live refresh token is another than `from` (`None`: until it has one);
    /// returns it.
    pub async fn wait_live_token_change(&self, grant: &str, from: Option<&str>, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            match self.live_refresh_token(grant).await {
                Some(t) if Some(t.as_str()) != from => return t,
                _ => assert!(
                    Instant::now() < deadline,
                    "{grant}: the live refresh token did not change within {within:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn secret_value(&self, secret: &str, key: &str) -> Option<String> {
        let s = self.secrets().get_opt(secret).await.unwrap()?;
        s.data.and_then(|d| d.get(key).map(|v| String::from_utf8(v.0.clone()).unwrap()))
    }

    /// The live refresh token the operator keeps for a grant.
    pub async fn live_refresh_token(&self, grant: &str) -> Option<String> {
        self.secret_value(&format!("{grant}-wgtwo-state"), "refresh_token").await
    }

    /// Whether the grant's live refresh token is active at Hydra. A token the operator rotates between
    /// the read and the introspection (Hydra revokes it a few ms before the operator writes its
    /// successor) is read again; an inactive token that stays live for 3 s is lost.
    pub async fn live_token_is_active(&self, grant: &str) -> bool {
        'read: loop {
            let live = self.live_refresh_token(grant).await.unwrap_or_default();
            if self.active(&live).await {
                return true;
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if self.live_refresh_token(grant).await.unwrap_or_default() != live {
                    continue 'read;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            return false;
        }
    }

    pub async fn active(&self, token: &str) -> bool {
        self.hydra.introspect(token).await.unwrap()["active"] == true
    }

    /// Events about a grant: (reason, note).
    pub async fn events(&self, grant: &str) -> Vec<(String, String)> {
        use k8s_openapi::api::events::v1::Event;
        let events: Api<Event> = Api::namespaced(self.kube.clone(), NS);
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(grant))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }
}

/// GETs `path` from an operator's metrics port: (status, body).
pub async fn get(port: u16, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://127.0.0.1:{port}{path}")).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Waits until the operator serves /metrics, and returns a scrape.
pub async fn scrape(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await
            && r.status().is_success()
        {
            return r.text().await.unwrap();
        }
        assert!(Instant::now() < deadline, "no /metrics on port {port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sum of the samples of `name` whose labels include all of `labels`.
pub fn metric(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

impl Env {
    /// Waits for a moment when no grant's refresh is due within `ahead` and none happened in the
    /// last second, so a signal to the leader cannot land in the middle of a refresh.
    pub async fn wait_quiet(&self, grants: &[String], ahead: Duration) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = jiff::Timestamp::now();
            let mut quiet = true;
            for g in grants {
                let s = self.status(g).await.unwrap_or_default();
                let next = s.next_refresh_time.map(|t| t.0);
                let last = s.last_refresh_time.map(|t| t.0);
                quiet &= next.is_some_and(|n| n.duration_since(now) > jiff::SignedDuration::try_from(ahead).unwrap())
                    && last.is_some_and(|l| now.duration_since(l) > jiff::SignedDuration::from_secs(1));
            }
            if quiet {
                return;
            }
            assert!(Instant::now() < deadline, "no quiet moment to signal the leader within 60s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The operators' logs, oldest first.
pub fn operator_logs(env: &Env) -> Vec<String> {
    let mut files: Vec<(usize, std::path::PathBuf)> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            let n = name.strip_prefix("operator-")?.strip_suffix(".log")?.parse().ok()?;
            Some((n, p))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, p)| std::fs::read_to_string(p).unwrap_or_default()).collect()
}

/// The grants for which the process that wrote `log` had sent a token request and not yet had its
/// answer when it died (judged by each grant's last token-request line).
pub fn requests_in_flight_at_end(log: &str) -> std::collections::BTreeSet<String> {
    let mut sent = std::collections::BTreeMap::new();
    for line in log.lines() {
        // Logged in the reconcile span: `reconcile{namespace="…" grant="NAME"}`.
        let Some(grant) = line.split(" grant=\"").nth(1).and_then(|rest| rest.split('"').next()) else { continue };
        let outcome = if line.contains(" refreshing ") {
            true
        } else if [
            // An answer on file; its state write; an error answer (nothing rotated), reported.
            "refresh answer journaled",
            "rotated refresh token persisted",
            "refresh failed",
            "refresh refused",
        ]
        .iter()
        .any(|l| line.contains(l))
        {
            false
        } else {
            continue;
        };
        sent.insert(grant.to_owned(), outcome);
    }
    sent.into_iter().filter(|(_, in_flight)| *in_flight).map(|(grant, _)| grant).collect()
}

impl Env {
    /// Stores `clients` OAuth client Secrets (`client-N`, id `client-N`, secret `secret-N`).
    pub async fn put_clients(&self, clients: usize) {
        for c in 0..clients {
            let (id, secret) = (format!("client-{c}"), format!("secret-{c}"));
            self.put_secret(&id, &[("client_id", &id), ("client_secret", &secret)]).await;
        }
    }

    /// Creates `count` grants at `issuer`, 16 at a time: grant `i` is named `name(i)`, starts from
    /// refresh token `token(i)` and uses client Secret `client-{i % clients}`.
    pub async fn create_grants_at(
        &self,
        issuer: &str,
        count: usize,
        clients: usize,
        name: impl Fn(usize) -> String,
        token: impl Fn(usize) -> String,
    ) {
        use futures::StreamExt;
        futures::stream::iter(0..count)
            .map(|i| {
                let (name, token) = (name(i), token(i));
                async move {
                    self.create_grant(&name, &token, |s| {
                        s.issuer_url = issuer.to_owned();
                        s.client_secret_ref.name = format!("client-{}", i % clients);
                    })
                    .await
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
    }
}

/// The entry files of the journal under `--journal-dir` `root` (not its temporary files).
pub fn journal_entries(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(files) = std::fs::read_dir(root.join("wgtwo-journal-v1")) else { return Vec::new() };
    files.map(|f| f.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect()
}
