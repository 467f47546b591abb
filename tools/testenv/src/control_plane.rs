//! etcd + kube-apiserver with RBAC authorization, the repo's CRDs installed, and clients for an
//! admin (system:masters) and for ServiceAccounts (TokenRequest tokens, subject to RBAC).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::certs::{CertKey, TestCa, signing_key};
use crate::process::{ChildGuard, wait_until};
use crate::{binaries, free_port};

const START_TIMEOUT: Duration = Duration::from_secs(90);

pub struct ControlPlane {
    // Field order is drop order: the controller manager and the apiserver stop before etcd, and
    // the dir goes last.
    controller_manager: Option<ChildGuard>,
    apiserver: ChildGuard,
    etcd: ChildGuard,
    url: String,
    ca_pem: String,
    admin_kubeconfig: PathBuf,
    /// The apiserver's flags, to start it again ([`ControlPlane::restart_apiserver`]).
    api_args: Vec<String>,
    api_starts: usize,
    dir: tempfile::TempDir,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver on free loopback ports and installs the repo's `crds/`.
    pub async fn start() -> anyhow::Result<Self> {
        let cp = Self::start_bare().await?;
        cp.install_crds(&crate::repo_root().join("crds")).await?;
        Ok(cp)
    }

    /// Starts etcd and kube-apiserver without installing any CRD.
    pub async fn start_bare() -> anyhow::Result<Self> {
        Self::start_with(None).await
    }

    /// Starts etcd and kube-apiserver for a node ([`crate::Cluster`]): the apiserver listens on
    /// `node`'s address (the pods' gateway) and publishes it as the `kubernetes` Service's endpoint,
    /// authorizes kubelets (Node,RBAC) and reaches them with a client certificate. The repo's CRDs
    /// are not installed (the chart installs them).
    pub(crate) async fn start_for_node(node: &NodeAccess) -> anyhow::Result<Self> {
        Self::start_with(Some(node)).await
    }

    async fn start_with(node: Option<&NodeAccess>) -> anyhow::Result<Self> {
        let dir = crate::temp_dir("wgtwo-kube-")?;
        let ca = match node {
            Some(n) => n.ca.clone(),
            None => std::sync::Arc::new(TestCa::new("wgtwo-testenv-kube-ca")?),
        };
        let ca_pem = ca.pem();
        let ip = node.map_or("127.0.0.1".to_owned(), |n| n.ip.to_string());
        let serving = match node {
            // The names pods use: the `kubernetes` Service's ClusterIP and DNS names.
            Some(_) => ca.server(
                "kube-apiserver",
                &[
                    &ip,
                    KUBERNETES_SERVICE_IP,
                    "kubernetes",
                    "kubernetes.default",
                    "kubernetes.default.svc",
                    "kubernetes.default.svc.cluster.local",
                ],
            )?,
            None => ca.loopback_server("kube-apiserver")?,
        };
        let admin = ca.client("testenv-admin", &["system:masters"])?;
        let service_account = signing_key()?;
        let kubelet_client = ca.client("kube-apiserver-kubelet-client", &["system:masters"])?;
        let files = [
            ("ca.crt", &ca_pem),
            ("apiserver.crt", &serving.cert_pem),
            ("apiserver.key", &serving.key_pem),
            ("service-account.key", &service_account.key_pem),
            ("service-account.pub", &service_account.cert_pem),
            ("kubelet-client.crt", &kubelet_client.cert_pem),
            ("kubelet-client.key", &kubelet_client.key_pem),
        ];
        for (name, pem) in files {
            std::fs::write(dir.path().join(name), pem)?;
        }

        let (client_port, peer_port) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd_cmd = Command::new(binaries::path("etcd"));
        etcd_cmd
            .arg("--name=testenv")
            .arg(format!("--data-dir={}", dir.path().join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=testenv={peer_url}"))
            // Throwaway data: skip fsync so a 2-core machine is not bound by disk flushes.
            .arg("--unsafe-no-fsync")
            // The 2 GiB default is too small for the 100,000-grant benchmark's history between
            // compactions; a limit, not an allocation.
            .arg("--quota-backend-bytes=8589934592")
            .arg("--log-level=warn");
        let mut etcd = ChildGuard::spawn("etcd", etcd_cmd, &dir.path().join("etcd.log"))?;
        let http = reqwest::Client::new();
        let health = format!("{etcd_url}/health");
        wait_until(&mut etcd, START_TIMEOUT, "etcd", || async {
            matches!(http.get(&health).send().await, Ok(r) if r.status().is_success())
        })
        .await?;

        let port = free_port();
        let url = format!("https://{ip}:{port}");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let mut api_args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={ip}"),
            format!("--advertise-address={ip}"),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", path("certs")),
            format!("--tls-cert-file={}", path("apiserver.crt")),
            format!("--tls-private-key-file={}", path("apiserver.key")),
            format!("--client-ca-file={}", path("ca.crt")),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", path("service-account.pub")),
            format!("--service-account-signing-key-file={}", path("service-account.key")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--v=1".into(),
        ];
        match node {
            Some(_) => api_args.extend([
                "--authorization-mode=Node,RBAC".into(),
                format!("--kubelet-client-certificate={}", path("kubelet-client.crt")),
                format!("--kubelet-client-key={}", path("kubelet-client.key")),
                format!("--kubelet-certificate-authority={}", path("ca.crt")),
                // The node's name resolves nowhere; its InternalIP is the pods' gateway.
                "--kubelet-preferred-address-types=InternalIP".into(),
            ]),
            None => api_args.extend([
                "--authorization-mode=RBAC".into(),
                // No kubelet or network here: nothing should publish the apiserver's (loopback) endpoint.
                "--endpoint-reconciler-type=none".into(),
            ]),
        }
        let mut api_cmd = Command::new(binaries::path("kube-apiserver"));
        api_cmd.args(&api_args);
        let mut apiserver = ChildGuard::spawn("kube-apiserver", api_cmd, &dir.path().join("kube-apiserver.log"))?;

        let admin_kubeconfig = dir.path().join("admin.kubeconfig");
        std::fs::write(&admin_kubeconfig, kubeconfig_yaml(&url, &ca_pem, Credentials::ClientCert(&admin)))?;

        // /readyz includes the RBAC bootstrap roles, so RBAC is enforceable once it answers 200.
        let admin_http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?)
            .identity(reqwest::Identity::from_pem(format!("{}{}", admin.cert_pem, admin.key_pem).as_bytes())?)
            .build()?;
        let readyz = format!("{url}/readyz");
        wait_until(&mut apiserver, START_TIMEOUT, "kube-apiserver", || async {
            matches!(admin_http.get(&readyz).send().await, Ok(r) if r.status().is_success())
        })
        .await?;

        Ok(Self {
            controller_manager: None,
            apiserver,
            etcd,
            url,
            ca_pem,
            admin_kubeconfig,
            api_args,
            api_starts: 1,
            dir,
        })
    }

    /// Stops kube-apiserver (SIGTERM), waits `down_for`, and starts it again on the same port with
    /// the same flags; etcd keeps every object. Returns once it is ready again.
    pub async fn restart_apiserver(&mut self, down_for: Duration) -> anyhow::Result<()> {
        // Blocking (it waits for the process): off the async workers.
        tokio::task::block_in_place(|| self.apiserver.terminate(Duration::from_secs(20)))?;
        tokio::time::sleep(down_for).await;
        self.api_starts += 1;
        let mut cmd = Command::new(binaries::path("kube-apiserver"));
        cmd.args(&self.api_args);
        let log = self.dir.path().join(format!("kube-apiserver-{}.log", self.api_starts));
        self.apiserver = ChildGuard::spawn("kube-apiserver", cmd, &log)?;
        let admin = self.admin_client().await?;
        wait_until(&mut self.apiserver, START_TIMEOUT, "kube-apiserver after a restart", || async {
            admin.list_api_groups().await.is_ok()
        })
        .await
    }

    /// Starts kube-controller-manager with only the garbage collector (which deletes objects whose
    /// owners are gone, as in a real cluster), and waits until it has synced its informers.
    pub async fn start_garbage_collector(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(binaries::path("kube-controller-manager"));
        cmd.arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
            .arg("--controllers=garbagecollector")
            .arg("--leader-elect=false")
            // No serving: nothing here scrapes or probes it.
            .arg("--secure-port=0")
            .arg("--v=2");
        let log = self.dir.path().join("kube-controller-manager.log");
        let mut child = ChildGuard::spawn("kube-controller-manager", cmd, &log)?;
        wait_until(&mut child, START_TIMEOUT, "kube-controller-manager's garbage collector", || async {
            std::fs::read_to_string(&log).is_ok_and(|l| {
                l.contains("synced garbage collector") || l.contains("All resource monitors have synced")
            })
        })
        .await?;
        self.controller_manager = Some(child);
        Ok(())
    }

    /// Starts kube-controller-manager with every controller a cluster runs by default (Deployments,
    /// ReplicaSets, the disruption controller behind PodDisruptionBudgets, ServiceAccounts, the
    /// `kube-root-ca.crt` ConfigMaps, EndpointSlices, node lifecycle, garbage collection), and waits
    /// until `default` has its ServiceAccount and CA ConfigMap, which every pod needs.
    pub(crate) async fn start_all_controllers(&mut self) -> anyhow::Result<()> {
        let dir = self.dir.path();
        let mut cmd = Command::new(binaries::path("kube-controller-manager"));
        cmd.arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
            .arg("--controllers=*")
            .arg(format!("--root-ca-file={}", dir.join("ca.crt").display()))
            .arg(format!("--service-account-private-key-file={}", dir.join("service-account.key").display()))
            .arg("--leader-elect=false")
            .arg("--secure-port=0")
            .arg("--v=1");
        let log = dir.join("kube-controller-manager.log");
        let mut child = ChildGuard::spawn("kube-controller-manager", cmd, &log)?;
        let admin = self.admin_client().await?;
        wait_until(&mut child, START_TIMEOUT, "kube-controller-manager", || async {
            let sa = Api::<ServiceAccount>::namespaced(admin.clone(), "default").get_opt("default").await;
            let ca = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(admin.clone(), "default")
                .get_opt("kube-root-ca.crt")
                .await;
            matches!((sa, ca), (Ok(Some(_)), Ok(Some(_))))
        })
        .await?;
        self.controller_manager = Some(child);
        Ok(())
    }

    /// The apiserver's URL (`https://127.0.0.1:PORT`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The CA of the apiserver's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A kubeconfig file with admin (system:masters) credentials, for kubectl or the operator.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The directory holding this control plane's data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client that bypasses RBAC (group system:masters).
    pub async fn admin_client(&self) -> anyhow::Result<kube::Client> {
        client_from_kubeconfig(&self.admin_kubeconfig).await
    }

    /// Creates a namespace and returns its name.
    pub async fn create_namespace(&self, name: &str) -> anyhow::Result<String> {
        let ns = Namespace {
            metadata: ObjectMeta { name: Some(name.to_owned()), ..Default::default() },
            ..Default::default()
        };
        Api::<Namespace>::all(self.admin_client().await?).create(&PostParams::default(), &ns).await?;
        Ok(name.to_owned())
    }

    /// Creates (or reuses) a ServiceAccount and returns a client that authenticates as it with a
    /// TokenRequest token, plus a kubeconfig file with the same credentials. Its rights are exactly
    /// what RBAC grants it.
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> anyhow::Result<(kube::Client, PathBuf)> {
        let admin = self.admin_client().await?;
        let sas = Api::<ServiceAccount>::namespaced(admin, namespace);
        let sa = ServiceAccount {
            metadata: ObjectMeta { name: Some(name.to_owned()), ..Default::default() },
            ..Default::default()
        };
        sas.patch(name, &PatchParams::apply("wgtwo-testenv").force(), &Patch::Apply(&sa)).await?;
        let request = TokenRequest {
            spec: Some(TokenRequestSpec { expiration_seconds: Some(3600 * 6), ..Default::default() }),
            ..Default::default()
        };
        let token = sas
            .create_token_request(name, &PostParams::default(), &request)
            .await?
            .status
            .context("TokenRequest returned no status")?
            .token
            .context("TokenRequest returned no token")?;
        let path = self.dir.path().join(format!("sa-{namespace}-{name}.kubeconfig"));
        std::fs::write(&path, kubeconfig_yaml(&self.url, &self.ca_pem, Credentials::Token(&token)))?;
        Ok((client_from_kubeconfig(&path).await?, path))
    }

    /// Gives the ServiceAccount `namespace/service_account` exactly `rules` in its namespace (a Role
    /// and a RoleBinding named `role`).
    pub async fn grant_service_account(
        &self,
        namespace: &str,
        service_account: &str,
        role: &str,
        rules: Vec<PolicyRule>,
    ) -> anyhow::Result<()> {
        let admin = self.admin_client().await?;
        let meta = ObjectMeta { name: Some(role.to_owned()), ..Default::default() };
        let role_object = Role { metadata: meta.clone(), rules: Some(rules) };
        Api::<Role>::namespaced(admin.clone(), namespace).create(&PostParams::default(), &role_object).await?;
        let binding = RoleBinding {
            metadata: meta,
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Role".into(),
                name: role.to_owned(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: service_account.to_owned(),
                namespace: Some(namespace.to_owned()),
                ..Default::default()
            }]),
        };
        Api::<RoleBinding>::namespaced(admin, namespace).create(&PostParams::default(), &binding).await?;
        Ok(())
    }

    /// Server-side applies every CRD in `dir` and waits until each is Established.
    pub async fn install_crds(&self, dir: &Path) -> anyhow::Result<()> {
        let crds = Api::<CustomResourceDefinition>::all(self.admin_client().await?);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                let crd: CustomResourceDefinition =
                    serde::Deserialize::deserialize(doc).with_context(|| format!("parse {}", path.display()))?;
                let name = crd.metadata.name.clone().context("CRD without a name")?;
                crds.patch(&name, &PatchParams::apply("wgtwo-testenv").force(), &Patch::Apply(&crd)).await?;
                names.push(name);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for name in names {
            loop {
                let crd = crds.get(&name).await?;
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "CRD {name} not Established after 30s");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Runs the testenv's kubectl against this control plane as admin and returns its stdout.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(binaries::path("kubectl"))
            .arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Last lines of the apiserver's log, for failure messages.
    pub fn apiserver_log_tail(&self, lines: usize) -> String {
        self.apiserver.log_tail(lines)
    }

    /// The pids of the server processes, so tests can prove they are gone after drop.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.etcd.pid(), self.apiserver.pid()];
        pids.extend(self.controller_manager.as_ref().map(ChildGuard::pid));
        pids
    }
}

/// The Service IP range; its first address is the `kubernetes` Service's ClusterIP.
pub const SERVICE_CIDR: &str = "10.0.0.0/24";
pub(crate) const KUBERNETES_SERVICE_IP: &str = "10.0.0.1";

/// What a control plane for a node needs: the address pods reach the host at, and the CA that signs
/// every certificate of the cluster (the kubelet's too).
pub(crate) struct NodeAccess {
    pub ip: std::net::Ipv4Addr,
    pub ca: std::sync::Arc<TestCa>,
}

pub(crate) enum Credentials<'a> {
    ClientCert(&'a CertKey),
    Token(&'a str),
}

pub(crate) fn kubeconfig_yaml(server: &str, ca_pem: &str, creds: Credentials<'_>) -> String {
    let user = match creds {
        Credentials::ClientCert(pair) => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            B64.encode(&pair.cert_pem),
            B64.encode(&pair.key_pem)
        ),
        Credentials::Token(token) => format!("    token: {token}\n"),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testenv\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: testenv\n  user:\n{user}contexts:\n- name: testenv\n  context:\n    cluster: testenv\n    user: testenv\ncurrent-context: testenv\n",
        ca = B64.encode(ca_pem)
    )
}

/// A `kube::Client` from a kubeconfig file, as the operator would build one.
pub async fn client_from_kubeconfig(path: &Path) -> anyhow::Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}
