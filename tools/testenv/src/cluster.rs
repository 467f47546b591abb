//! A one-node cluster on this machine: the control plane of [`ControlPlane`] with every
//! controller, kube-scheduler, a kubelet on containerd and runc (cgroupfs driver; cgroup v1 allowed
//! with `failCgroupV1: false`; runc at the version containerd pins), pod networking from Debian's CNI plugins (a bridge whose gateway is
//! the host), and kube-proxy, so pods reach the apiserver as in any cluster: through the
//! `kubernetes` Service's ClusterIP. Images are imported, never pulled (no registry is reachable),
//! pinned, and image garbage collection is off.
//!
//! Only one node runs on a machine at a time (a file lock): it owns a bridge, a pod and Service
//! range, iptables chains and the kubepods cgroups. Dropping the cluster stops every container and
//! process it started and removes its mounts, network namespaces, bridge and rules.
//!
//! Needs (Debian 12 packages): containernetworking-plugins, iptables, iproute2; runc is built with
//! containerd (tools/testenv/build.sh containerd).

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams};

use crate::certs::TestCa;
use crate::control_plane::{Credentials, KUBERNETES_SERVICE_IP, NodeAccess, SERVICE_CIDR, kubeconfig_yaml};
use crate::process::{ChildGuard, wait_until};
use crate::{ControlPlane, binaries};

/// The node's name.
pub const NODE_NAME: &str = "wgtwo-node";
/// The host's address on the pod bridge: pods reach the apiserver (through the `kubernetes`
/// Service) and test servers (Hydra) here.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
const POD_CIDR: &str = "10.244.0.0/24";
const BRIDGE: &str = "wgtwo0";
/// The pod sandbox image (catatonit, from tools/image/build.sh test-images).
pub const PAUSE_IMAGE: &str = "localhost/wgtwo-testenv/pause:catatonit";
/// A busybox image for test workloads (tools/image/build.sh test-images).
pub const BUSYBOX_IMAGE: &str = "localhost/wgtwo-testenv/busybox:debian12";
const START_TIMEOUT: Duration = Duration::from_secs(120);
const CNI_BIN: &str = "/usr/lib/cni";
/// kubelet's cgroup root: the pods' cgroups live below it in every hierarchy, apart from anything
/// else on the machine, and the cleanup kills only what is there.
const CGROUP_ROOT: &str = "wgtwo-testenv";

pub struct Cluster {
    // Field order is drop order after Drop::drop has emptied the node: the node's processes, the
    // control plane, the network, then the lock and the dir.
    scheduler: Option<ChildGuard>,
    kube_proxy: Option<ChildGuard>,
    kubelet: Option<ChildGuard>,
    containerd: Option<ChildGuard>,
    /// The control plane's admin credentials and URL (the caller owns the control plane and must
    /// drop it after the cluster: the node is drained through it).
    admin_kubeconfig: PathBuf,
    api_url: String,
    network: Network,
    _lock: File,
    dir: tempfile::TempDir,
    ca: Arc<TestCa>,
}

impl Cluster {
    /// Starts a control plane and the node, imports the test images and every OCI archive in
    /// `images` (e.g. the operator's, from tools/image/build.sh --archive), and returns once the
    /// node is Ready and the `kubernetes` Service is routed. Drop the cluster before the control
    /// plane (declare it first in a struct).
    pub async fn start(images: &[&Path]) -> anyhow::Result<(Self, ControlPlane)> {
        anyhow::ensure!(
            Path::new(CNI_BIN).join("bridge").exists(),
            "{CNI_BIN}/bridge is missing: apt-get install containernetworking-plugins iptables"
        );
        // A fixed path: runs with different TMPDIRs share the bridge and the rules all the same.
        let lock_path = Path::new("/run/wgtwo-testenv-node.lock");
        let lock = File::create(lock_path)?;
        // Waits for another test binary's node to be gone, polling: a blocked flock would hold a
        // thread past a test that gives up.
        loop {
            // SAFETY: flock on a file descriptor we own.
            if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err).context("lock the node");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The node takes over iptables' KUBE-* chains and a bridge: never next to a real kubelet.
        if let Ok(out) = Command::new("pgrep").args(["-a", "-x", "kubelet"]).output()
            && !out.stdout.is_empty()
        {
            bail!(
                "a kubelet already runs on this machine ({}): the test node would take over its network rules",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        clean_leftovers();
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
            if hierarchy.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::create_dir_all(hierarchy.path().join(CGROUP_ROOT));
            }
        }
        let dir = crate::temp_dir("wgtwo-node-")?;
        let network = Network::create()?;
        let ca = Arc::new(TestCa::new("wgtwo-testenv-cluster-ca")?);
        let mut cp = ControlPlane::start_for_node(&NodeAccess { ip: HOST_IP, ca: ca.clone() }).await?;
        cp.start_all_controllers().await?;
        let mut cluster = Self {
            scheduler: None,
            kube_proxy: None,
            kubelet: None,
            containerd: None,
            admin_kubeconfig: cp.admin_kubeconfig().to_owned(),
            api_url: cp.url().to_owned(),
            network,
            _lock: lock,
            dir,
            ca,
        };
        cluster.start_containerd().await?;
        let test_images = cluster.dir.path().join("images");
        crate::image::test_images(&test_images)?;
        cluster.import_image(&test_images.join("pause.tar"))?;
        cluster.import_image(&test_images.join("busybox.tar"))?;
        for image in images {
            cluster.import_image(image)?;
        }
        cluster.start_kubelet().await?;
        cluster.start_kube_proxy().await?;
        cluster.start_scheduler().await?;
        Ok((cluster, cp))
    }

    async fn admin_client(&self) -> anyhow::Result<kube::Client> {
        crate::control_plane::client_from_kubeconfig(&self.admin_kubeconfig).await
    }

    /// Runs `ctr` in containerd's `k8s.io` namespace (the one the CRI plugin uses).
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(binaries::path("ctr"))
            .arg(format!("--address={}", self.containerd_socket().display()))
            .arg("--namespace=k8s.io")
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "ctr {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Imports an OCI archive and pins its images, so no garbage collection ever removes them.
    pub fn import_image(&self, archive: &Path) -> anyhow::Result<()> {
        let archive = archive.to_str().context("archive path")?;
        self.ctr(&["images", "import", "--digests", "--snapshotter=overlayfs", archive])?;
        let listed = self.ctr(&["images", "list", "--quiet"])?;
        for image in listed.lines().filter(|l| l.starts_with("localhost/")) {
            self.ctr(&["images", "label", image, "io.cri-containerd.pinned=pinned"])?;
        }
        Ok(())
    }

    /// The host pid of a running container's first process (its id as in a pod's status, with or
    /// without the `containerd://` prefix).
    pub fn container_pid(&self, container_id: &str) -> anyhow::Result<u32> {
        let id = container_id.trim_start_matches("containerd://");
        let out = self.ctr(&["tasks", "list"])?;
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|pid| pid.parse().ok())
            .with_context(|| format!("no running task {id}"))
    }

    /// Sends `signal` to a container's first process through the runtime, as an OOM kill or a
    /// crash would end it: kubelet sees the container exit and restarts it in the same pod.
    pub fn kill_container(&self, container_id: &str, signal: &str) -> anyhow::Result<()> {
        let id = container_id.trim_start_matches("containerd://");
        self.ctr(&["tasks", "kill", "--signal", signal, id]).map(drop)
    }

    /// Where a pod's `emptyDir` volume is on the node (a memory-backed one is a tmpfs mounted there).
    pub fn empty_dir(&self, pod_uid: &str, volume: &str) -> PathBuf {
        self.dir.path().join("kubelet/root/pods").join(pod_uid).join("volumes/kubernetes.io~empty-dir").join(volume)
    }

    /// Where kubelet has the runtime write a pod's container logs: one `<restart count>.log` per
    /// container run, kept until the container is garbage collected (the API serves only the
    /// current and the previous run).
    pub fn container_logs(&self, namespace: &str, pod: &str, pod_uid: &str, container: &str) -> PathBuf {
        self.dir.path().join("kubelet/pod-logs").join(format!("{namespace}_{pod}_{pod_uid}")).join(container)
    }

    /// The directory holding the node's logs and state.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn containerd_socket(&self) -> PathBuf {
        self.dir.path().join("containerd/containerd.sock")
    }

    async fn start_containerd(&mut self) -> anyhow::Result<()> {
        let base = self.dir.path().join("containerd");
        std::fs::create_dir_all(base.join("cni"))?;
        std::fs::write(
            base.join("cni/10-wgtwo.conflist"),
            serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "wgtwo-testenv",
                "plugins": [{
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": true,
                    "isDefaultGateway": true,
                    // Nothing leaves the machine: no masquerade (and Network drops forwarding out).
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR, "gateway": HOST_IP.to_string()}]],
                        "dataDir": base.join("cni-ipam").display().to_string(),
                    },
                }],
            })
            .to_string(),
        )?;
        let config = format!(
            r#"version = 3
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
  # Root here lacks CAP_SYS_RESOURCE (a sandboxed VM), so no process may lower its oom_score_adj
  # below containerd's; kubelet's -998 for sandboxes would fail every pod. As on rootless nodes.
  restrict_oom_score_adj = true
  # The pods' network namespaces under the node's own dir, not the host's /var/run/netns.
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{cni_conf}"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{pause}"
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
"#,
            root = base.join("root").display(),
            state = base.join("state").display(),
            socket = self.containerd_socket().display(),
            runc = binaries::path("runc").display(),
            cni_bin = CNI_BIN,
            cni_conf = base.join("cni").display(),
            pause = PAUSE_IMAGE,
        );
        std::fs::write(base.join("config.toml"), config)?;
        let containerd = binaries::path("containerd");
        let bin_dir = containerd.parent().context("containerd dir")?;
        let mut cmd = Command::new(&containerd);
        cmd.arg(format!("--config={}", base.join("config.toml").display()))
            // The runc shim is found on PATH.
            .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default()));
        let mut child = ChildGuard::spawn("containerd", cmd, &self.dir.path().join("containerd.log"))?;
        let socket = self.containerd_socket();
        let ctr = binaries::path("ctr");
        wait_until(&mut child, START_TIMEOUT, "containerd", || async {
            socket.exists()
                && Command::new(&ctr)
                    .arg(format!("--address={}", socket.display()))
                    .args(["version"])
                    .output()
                    .is_ok_and(|o| o.status.success())
        })
        .await?;
        self.containerd = Some(child);
        Ok(())
    }

    async fn start_kubelet(&mut self) -> anyhow::Result<()> {
        let dir = self.dir.path().join("kubelet");
        std::fs::create_dir_all(&dir)?;
        let serving = self.ca.server("kubelet", &[&HOST_IP.to_string(), NODE_NAME])?;
        std::fs::write(dir.join("ca.crt"), self.ca.pem())?;
        std::fs::write(dir.join("kubelet.crt"), &serving.cert_pem)?;
        std::fs::write(dir.join("kubelet.key"), &serving.key_pem)?;
        let kubeconfig = self.component_kubeconfig(&dir, &format!("system:node:{NODE_NAME}"), &["system:nodes"])?;
        let port = crate::free_port();
        let config = format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 is what this machine has; kubelet 1.35+ refuses it unless told.
failCgroupV1: false
# No systemd here.
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup_root}
containerRuntimeEndpoint: unix://{socket}
address: {host_ip}
port: {port}
readOnlyPort: 0
healthzPort: 0
tlsCertFile: {dir}/kubelet.crt
tlsPrivateKeyFile: {dir}/kubelet.key
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {dir}/ca.crt}}
authorization:
  mode: Webhook
# Images are imported, never pulled: never garbage-collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# A test VM's disk may be fuller than a node's; evict only for memory.
evictionHard:
  memory.available: 100Mi
  nodefs.available: "0%"
  imagefs.available: "0%"
  nodefs.inodesFree: "0%"
failSwapOn: false
resolvConf: ""
podCIDR: {pod_cidr}
serializeImagePulls: false
# Restarts after a crash or kill wait at most 2 s (default: up to 5 min), so the tests can kill a
# container many times; every other restart behaviour is kubelet's own.
crashLoopBackOff:
  maxContainerRestartPeriod: 2s
podLogsDir: {dir}/pod-logs
# The tests read a killed container's whole log (which grants it had a request in flight for);
# kubelet serves only the newest file of a rotated log, and 10,000 grants log more than the 10Mi
# default.
containerLogMaxSize: 500Mi
"#,
            socket = self.containerd_socket().display(),
            host_ip = HOST_IP,
            dir = dir.display(),
            pod_cidr = POD_CIDR,
            cgroup_root = CGROUP_ROOT,
        );
        std::fs::write(dir.join("config.yaml"), config)?;
        let mut cmd = Command::new(binaries::path("kubelet"));
        cmd.arg(format!("--config={}", dir.join("config.yaml").display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", dir.join("root").display()))
            .arg(format!("--cert-dir={}", dir.join("pki").display()))
            .arg(format!("--hostname-override={NODE_NAME}"))
            .arg(format!("--node-ip={HOST_IP}"))
            .arg("--v=2")
            .env("PATH", format!("/usr/sbin:/sbin:{}", std::env::var("PATH").unwrap_or_default()));
        let mut child = ChildGuard::spawn("kubelet", cmd, &self.dir.path().join("kubelet.log"))?;
        let nodes = Api::<Node>::all(self.admin_client().await?);
        wait_until(&mut child, START_TIMEOUT, "the node to be Ready", || async {
            nodes.get_opt(NODE_NAME).await.ok().flatten().is_some_and(|n| {
                n.status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .await?;
        self.kubelet = Some(child);
        Ok(())
    }

    /// Writes `dir/kubeconfig` with a client certificate for `user` in `groups` (the identities the
    /// bootstrap RBAC roles of kubelet, kube-proxy and kube-scheduler are bound to).
    fn component_kubeconfig(&self, dir: &Path, user: &str, groups: &[&str]) -> anyhow::Result<PathBuf> {
        let client = self.ca.client(user, groups)?;
        let path = dir.join("kubeconfig");
        std::fs::write(&path, kubeconfig_yaml(&self.api_url, &self.ca.pem(), Credentials::ClientCert(&client)))?;
        Ok(path)
    }

    async fn start_kube_proxy(&mut self) -> anyhow::Result<()> {
        let dir = self.dir.path().join("kube-proxy");
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = self.component_kubeconfig(&dir, "system:kube-proxy", &[])?;
        let config = format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: {POD_CIDR}
hostnameOverride: {NODE_NAME}
clientConnection:
  kubeconfig: {kubeconfig}
metricsBindAddress: 127.0.0.1:{metrics}
healthzBindAddress: 127.0.0.1:{healthz}
iptables:
  # No NodePorts on 127.0.0.1 (that would set route_localnet, CVE-2020-8558).
  localhostNodePorts: false
conntrack:
  # Leave the machine's conntrack sysctls alone.
  maxPerCore: 0
  min: 0
"#,
            kubeconfig = kubeconfig.display(),
            metrics = crate::free_port(),
            healthz = crate::free_port(),
        );
        std::fs::write(dir.join("config.yaml"), config)?;
        let mut cmd = Command::new(binaries::path("kube-proxy"));
        cmd.arg(format!("--config={}", dir.join("config.yaml").display()))
            .arg("--v=1")
            .env("PATH", format!("/usr/sbin:/sbin:{}", std::env::var("PATH").unwrap_or_default()));
        let mut child = ChildGuard::spawn("kube-proxy", cmd, &self.dir.path().join("kube-proxy.log"))?;
        // Pods reach the apiserver only once the `kubernetes` Service's rule is in place.
        wait_until(&mut child, START_TIMEOUT, "kube-proxy's rule for the kubernetes Service", || async {
            Command::new("iptables")
                .args(["-w", "-t", "nat", "-S", "KUBE-SERVICES"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("{KUBERNETES_SERVICE_IP}/32")))
        })
        .await?;
        self.kube_proxy = Some(child);
        Ok(())
    }

    async fn start_scheduler(&mut self) -> anyhow::Result<()> {
        let dir = self.dir.path().join("kube-scheduler");
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = self.component_kubeconfig(&dir, "system:kube-scheduler", &[])?;
        let mut cmd = Command::new(binaries::path("kube-scheduler"));
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--authentication-kubeconfig={}", kubeconfig.display()))
            .arg(format!("--authorization-kubeconfig={}", kubeconfig.display()))
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", crate::free_port()))
            .arg("--v=1");
        let log = self.dir.path().join("kube-scheduler.log");
        let mut child = ChildGuard::spawn("kube-scheduler", cmd, &log)?;
        wait_until(&mut child, START_TIMEOUT, "kube-scheduler", || async {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Starting Kubernetes Scheduler"))
        })
        .await?;
        self.scheduler = Some(child);
        Ok(())
    }

    /// Deletes every pod and waits (bounded) until kubelet has stopped their containers and torn
    /// down their sandboxes through the runtime, as a drained node does.
    fn drain_all_pods(&self) -> anyhow::Result<()> {
        let kubeconfig = self.admin_kubeconfig.clone();
        // Drop may run on an async worker: the client gets a runtime of its own on its own thread.
        std::thread::scope(|s| s.spawn(|| drain(&kubeconfig)).join().unwrap_or_else(|_| bail!("drain panicked")))
    }

    /// Stops whatever containers are left (kills their processes by cgroup) and the runtime.
    fn stop_runtime(&mut self) {
        if self.containerd.is_some()
            && let Ok(tasks) = self.ctr(&["tasks", "list", "--quiet"])
        {
            for id in tasks.lines() {
                let _ = self.ctr(&["tasks", "kill", "--signal", "SIGKILL", "--all", id]);
            }
        }
        kill_cgroup_processes(CGROUP_ROOT);
        if let Some(mut containerd) = self.containerd.take() {
            let _ = containerd.terminate(Duration::from_secs(10));
        }
        // The shims outlive containerd by design; ours are the ones naming our state dir.
        let _ = Command::new("pkill").arg("-9").arg("-f").arg(self.dir.path().to_string_lossy().as_ref()).status();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.kubelet.is_some()
            && let Err(e) = self.drain_all_pods()
        {
            eprintln!("testenv: draining the node: {e:#}");
        }
        for child in [self.scheduler.take(), self.kube_proxy.take(), self.kubelet.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.terminate(Duration::from_secs(10));
        }
        self.stop_runtime();
        unmount_under(self.dir.path());
        self.network.remove();
        remove_cgroups(CGROUP_ROOT);
    }
}

/// The bridge, the routes and the filter rules of the node's network, removed on drop.
struct Network {
    removed: bool,
}

/// The host settings the node changes: kubelet's CNI bridge turns forwarding on, and kubelet sets
/// its kernel tunables (overcommit, panic on oops, key quotas) unless they already match. What the
/// host had is saved here and put back when the node goes (or by the next run, if one was killed).
const SYSCTLS: [&str; 7] = [
    "net/ipv4/ip_forward",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];
const SYSCTLS_SAVED: &str = "/run/wgtwo-testenv-sysctls";

/// Puts back the host settings saved by [`save_sysctls`], if they were saved.
fn restore_sysctls() {
    let Ok(saved) = std::fs::read_to_string(SYSCTLS_SAVED) else { return };
    for line in saved.lines() {
        if let Some((name, value)) = line.split_once(' ')
            && SYSCTLS.contains(&name)
        {
            let _ = std::fs::write(Path::new("/proc/sys").join(name), value);
        }
    }
    let _ = std::fs::remove_file(SYSCTLS_SAVED);
}

fn save_sysctls() -> std::io::Result<()> {
    let mut saved = String::new();
    for name in SYSCTLS {
        if let Ok(value) = std::fs::read_to_string(Path::new("/proc/sys").join(name)) {
            saved.push_str(&format!("{name} {}\n", value.trim()));
        }
    }
    // Whole or not at all: a run killed mid-write must not leave half the host's settings.
    let partial = format!("{SYSCTLS_SAVED}.partial");
    std::fs::write(&partial, saved)?;
    std::fs::rename(partial, SYSCTLS_SAVED)
}

/// Forwarded traffic from pods may only go to pods; anything else (DNS, the internet) is dropped,
/// so no test traffic leaves the machine.
const FORWARD_RULE: [&str; 8] = ["FORWARD", "-s", POD_CIDR, "!", "-d", POD_CIDR, "-j", "DROP"];

impl Network {
    fn create() -> anyhow::Result<Self> {
        // Leftovers of a run that was killed before it could clean up: only our own route type.
        let _ = run("ip", &["link", "del", BRIDGE]);
        let _ = run("ip", &["route", "del", "unreachable", SERVICE_CIDR]);
        while run("iptables", &[&["-w", "-D"][..], &FORWARD_RULE[..]].concat()).is_ok() {}
        // The ranges must be free on this host: never take over a network it uses.
        for cidr in [SERVICE_CIDR, POD_CIDR] {
            let out = Command::new("ip").args(["route", "show", cidr]).output().context("run ip")?;
            let routes = String::from_utf8_lossy(&out.stdout);
            anyhow::ensure!(
                routes.trim().is_empty(),
                "{cidr} is routed on this host ({}): the test node needs it free",
                routes.trim()
            );
        }
        // A killed run's node left its settings: the host's own are in the file it saved.
        restore_sysctls();
        save_sysctls()?;
        run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        run("ip", &["addr", "add", &format!("{HOST_IP}/24"), "dev", BRIDGE])?;
        run("ip", &["link", "set", BRIDGE, "up"])?;
        // A Service IP is only ever reached through kube-proxy's DNAT; without it (e.g. before its
        // rules exist) a packet must not go to the default route.
        run("ip", &["route", "add", "unreachable", SERVICE_CIDR])?;
        run("iptables", &[&["-w", "-I"][..], &FORWARD_RULE[..]].concat())?;
        Ok(Self { removed: false })
    }

    fn remove(&mut self) {
        if std::mem::replace(&mut self.removed, true) {
            return;
        }
        if let Some(proxy) = binaries::built_path("kube-proxy") {
            // Removes kube-proxy's chains and rules.
            let _ = Command::new(proxy)
                .arg("--cleanup")
                .env("PATH", format!("/usr/sbin:/sbin:{}", std::env::var("PATH").unwrap_or_default()))
                .output();
        }
        let _ = run("iptables", &[&["-w", "-D"][..], &FORWARD_RULE[..]].concat());
        let _ = run("ip", &["route", "del", "unreachable", SERVICE_CIDR]);
        restore_sysctls();
        let _ = run("ip", &["link", "del", BRIDGE]);
        // kubelet's canary chains (kube-proxy --cleanup leaves them).
        for table in ["filter", "nat", "mangle"] {
            let _ = run("iptables", &["-w", "-t", table, "-F", "KUBE-KUBELET-CANARY"]);
            let _ = run("iptables", &["-w", "-t", table, "-X", "KUBE-KUBELET-CANARY"]);
        }
    }
}

/// Deletes every pod and waits (bounded) until they are gone: kubelet has stopped their containers
/// and torn down their sandboxes through the runtime, as on a drained node.
fn drain(kubeconfig: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let client = crate::control_plane::client_from_kubeconfig(kubeconfig).await?;
        // Owners first, or their controllers would make the pods again.
        delete_all::<Deployment>(&client).await?;
        delete_all::<ReplicaSet>(&client).await?;
        delete_all::<StatefulSet>(&client).await?;
        delete_all::<DaemonSet>(&client).await?;
        delete_all::<Pod>(&client).await?;
        let pods = Api::<Pod>::all(client.clone());
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if pods.list(&ListParams::default()).await?.items.is_empty() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!("pods still present 40 s after deletion")
    })
}

impl Drop for Network {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Deletes every object of kind `K` in every namespace, with a 1 s grace period.
async fn delete_all<K>(client: &kube::Client) -> anyhow::Result<()>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    for object in Api::<K>::all(client.clone()).list(&ListParams::default()).await?.items {
        let (Some(ns), Some(name)) = (object.meta().namespace.clone(), object.meta().name.clone()) else { continue };
        let _ = Api::<K>::namespaced(client.clone(), &ns)
            .delete(&name, &DeleteParams { grace_period_seconds: Some(1), ..Default::default() })
            .await;
    }
    Ok(())
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("run {program}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// What a test run that was killed (so never dropped its cluster) left behind: its containers,
/// their shims, and the mounts under its dir. The bridge and rules go in [`Network::create`].
fn clean_leftovers() {
    kill_cgroup_processes(CGROUP_ROOT);
    let _ = Command::new("pkill").args(["-9", "-f", "--", "-address [^ ]*/wgtwo-node-"]).status();
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("wgtwo-node-") {
                unmount_under(&entry.path());
            }
        }
    }
}

/// SIGKILLs every process in the cgroup subtree `name` of the pids hierarchy (kubelet's pods).
fn kill_cgroup_processes(name: &str) {
    fn walk(dir: &Path) {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: plain syscall; the pid is in a cgroup only our node creates.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path());
                }
            }
        }
    }
    walk(&Path::new("/sys/fs/cgroup/pids").join(name));
}

/// Removes the cgroup subtree `name` from every hierarchy, deepest first (its processes are gone;
/// a cgroup directory is removed with rmdir, its files with it). cgroup v1 only, one hierarchy per
/// controller under /sys/fs/cgroup: the node is started on v1 (`failCgroupV1: false`).
fn remove_cgroups(name: &str) {
    fn walk(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    // Killed processes leave their cgroups a moment after the signal.
    for _ in 0..50 {
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for hierarchy in hierarchies.flatten() {
                walk(&hierarchy.path().join(name));
            }
        }
        if !Path::new("/sys/fs/cgroup/pids").join(name).exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Detaches every mount below `dir` (kubelet's volumes, containerd's rootfs and shm mounts),
/// deepest first.
fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let prefix = dir.to_string_lossy().to_string();
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|p| p.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for point in points {
        if let Ok(c) = std::ffi::CString::new(point) {
            // SAFETY: umount2 on a mount point under our own temp dir.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
