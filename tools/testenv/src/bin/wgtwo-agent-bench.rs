//! The agent benchmark: a real kube-apiserver + etcd, the shipped sidecar example's ServiceAccount
//! and one-Secret Role, and the (release) `wgtwo-operator agent`. Updates the Secret N times and
//! prints how long each update took to reach the disk (from the apiserver's answer to a reader's
//! first sight of it; the watch event can beat the answer, which counts as 0) and the agent's memory
//! and CPU.
//!
//! Where the machine lets it create memory cgroups (as root), each agent runs in one of its own,
//! as kubelet runs a container, and the bench prints the cgroup's usage and working set (usage
//! minus inactive file pages: what `kubectl top` shows and eviction uses) for the first agent and
//! for a second one started from the same binary, whose code is then already in the page cache.
//!
//!   wgtwo-agent-bench --operator target/release/wgtwo-operator [--updates N (1000)] [--interval-ms MS (50)]
//!                     [--cold: drop the page cache first (root), so the first agent reads its binary from disk]

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use wgtwo_testenv::process::{self, ChildGuard};
use wgtwo_testenv::{ControlPlane, string_secret};

/// What the shipped example names.
const NS: &str = "team-a";
const SA: &str = "alice-app";
const SECRET: &str = "alice-token";

struct Args {
    operator: PathBuf,
    updates: usize,
    interval: Duration,
    cold: bool,
}

fn usage() -> &'static str {
    "usage: wgtwo-agent-bench --operator PATH [--updates N (1000)] [--interval-ms MS (50)] [--cold]"
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args { operator: PathBuf::new(), updates: 1000, interval: Duration::from_millis(50), cold: false };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value; {}", usage()));
        match arg.as_str() {
            "--operator" => args.operator = value("--operator")?.into(),
            "--updates" => args.updates = value("--updates")?.parse()?,
            "--interval-ms" => args.interval = Duration::from_millis(value("--interval-ms")?.parse()?),
            "--cold" => args.cold = true,
            other => bail!("unknown argument {other}; {}", usage()),
        }
    }
    anyhow::ensure!(!args.operator.as_os_str().is_empty() && args.updates > 0, "{}", usage());
    Ok(args)
}

/// A `/proc/PID/status` figure in KiB (0 once the process is gone).
fn status_kib(pid: u32, field: &str) -> u64 {
    process::proc_status(pid, field).unwrap_or(0)
}

fn cpu_seconds(pid: u32) -> f64 {
    process::cpu_seconds(pid).unwrap_or(0.0)
}

/// A memory cgroup of one process's own, under this process's (cgroup v1 or v2).
struct MemoryCgroup {
    path: PathBuf,
    /// Open before the fork: the child joins by writing "0" (itself), which needs no allocation.
    procs: File,
    v2: bool,
}

impl MemoryCgroup {
    /// `None` where the machine does not let this process create one (not root, no memory controller).
    fn create(name: &str) -> Option<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let v1 = own.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_owned()));
        let (base, v2) = match v1 {
            Some(path) => (PathBuf::from("/sys/fs/cgroup/memory").join(path.trim_start_matches('/')), false),
            None => {
                let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
                (PathBuf::from("/sys/fs/cgroup").join(path.trim_start_matches('/')), true)
            }
        };
        let path = base.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir(&path).ok()?;
        let usage = if v2 { "memory.current" } else { "memory.usage_in_bytes" };
        let procs = std::fs::OpenOptions::new().write(true).open(path.join("cgroup.procs"));
        match (path.join(usage).exists(), procs) {
            (true, Ok(procs)) => Some(Self { path, procs, v2 }),
            _ => {
                let _ = std::fs::remove_dir(&path);
                None
            }
        }
    }

    /// Makes `cmd`'s process join this cgroup before it runs.
    fn enter(&self, cmd: &mut std::process::Command) {
        let fd = self.procs.as_raw_fd();
        // SAFETY: write(2) is async-signal-safe, and the fd stays open in the forked child.
        unsafe {
            cmd.pre_exec(move || match libc::write(fd, b"0".as_ptr().cast(), 1) {
                1 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            });
        }
    }

    /// (usage, working set) in KiB, as kubelet computes them.
    fn usage_kib(&self) -> (u64, u64) {
        let read = |name: &str| std::fs::read_to_string(self.path.join(name)).unwrap_or_default();
        let (usage, inactive) = match self.v2 {
            true => (read("memory.current"), "inactive_file"),
            false => (read("memory.usage_in_bytes"), "total_inactive_file"),
        };
        let usage: u64 = usage.trim().parse().unwrap_or(0);
        let stat = read("memory.stat");
        let inactive: u64 =
            stat.lines().find_map(|l| l.strip_prefix(inactive)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0);
        (usage / 1024, usage.saturating_sub(inactive) / 1024)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Empty by now (its process was stopped first).
        let _ = std::fs::remove_dir(&self.path);
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn put(secrets: &Api<Secret>, n: usize) -> anyhow::Result<()> {
    let token = format!("token-{n}");
    let secret = string_secret(
        SECRET,
        &[("access_token", &token), ("token_type", "Bearer"), ("expires_at", "2030-01-01T00:00:00Z"), ("scope", "s")],
    );
    secrets.patch(SECRET, &PatchParams::apply("agent-bench").force(), &Patch::Apply(&secret)).await?;
    Ok(())
}

/// The version in the current file set (resolved once through `..data`), if any.
fn on_disk(dir: &Path) -> Option<usize> {
    let version = std::fs::read_link(dir.join("..data")).ok()?;
    let token = std::fs::read_to_string(dir.join(version).join("access_token")).ok()?;
    token.strip_prefix("token-")?.parse().ok()
}

async fn wait_ready(agent: &mut ChildGuard, probe_port: u16) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        agent.check_running()?;
        let url = format!("http://127.0.0.1:{probe_port}/readyz");
        if reqwest::get(url).await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "the agent was not ready after 30 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    println!("==> wgtwo-agent-bench: {} updates, one every {} ms", args.updates, args.interval.as_millis());
    let cp = ControlPlane::start().await?;
    cp.create_namespace(NS).await?;
    let example = wgtwo_testenv::repo_root().join("deploy/chart/wgtwo-operator/examples/agent-sidecar.yaml");
    cp.kubectl(&["apply", "--server-side", "-f", example.to_str().unwrap()])?;
    let (_, kubeconfig) = cp.service_account_client(NS, SA).await?;
    let secrets: Api<Secret> = Api::namespaced(cp.admin_client().await?, NS);
    put(&secrets, 0).await?;

    if args.cold {
        let _ = Command::new("sync").status();
        std::fs::write("/proc/sys/vm/drop_caches", "3").context("--cold: dropping the page cache needs root")?;
    }
    let dir = tempfile::tempdir()?;
    let cgroups = [MemoryCgroup::create("wgtwo-agent-bench-1"), MemoryCgroup::create("wgtwo-agent-bench-2")];
    let start = |n: usize, dir: &Path| -> anyhow::Result<(ChildGuard, u16)> {
        let probe_port = wgtwo_testenv::free_port();
        let mut cmd = Command::new(&args.operator);
        cmd.args(["agent", "--secret", SECRET, "--dir"])
            .arg(dir)
            .args(["--probe-bind-address", &format!("127.0.0.1:{probe_port}")])
            .args(["--serve-token", &format!("127.0.0.1:{}", wgtwo_testenv::free_port())])
            .env("POD_NAMESPACE", NS)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "warn");
        if let Some(cgroup) = &cgroups[n] {
            cgroup.enter(&mut cmd);
        }
        let log = cp.dir().join(format!("agent-{n}.log"));
        Ok((ChildGuard::spawn("wgtwo-operator agent", cmd, &log)?, probe_port))
    };
    let started = Instant::now();
    let (mut agent, probe_port) = start(0, dir.path())?;
    let pid = agent.pid();
    wait_ready(&mut agent, probe_port).await?;
    println!("    ready (first token on disk) {:.0} ms after start", ms(started.elapsed()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle_rss, cpu_before) = (status_kib(pid, "VmRSS:"), cpu_seconds(pid));
    println!(
        "    idle: RSS {:.1} MiB ({:.1} MiB heap and stacks, {:.1} MiB mapped binary and libraries, shared with every process of the same file)",
        mib(idle_rss),
        mib(status_kib(pid, "RssAnon:")),
        mib(status_kib(pid, "RssFile:"))
    );
    // A second agent from the same binary, as in another pod on the same node.
    let second_dir = tempfile::tempdir()?;
    let (mut second, second_port) = start(1, second_dir.path())?;
    wait_ready(&mut second, second_port).await?;

    // A reader polls the files (every 200 µs) and notes the first sight of each version.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<HashMap<usize, Instant>>> = Default::default();
    let reader = {
        let (stop, seen, dir) = (stop.clone(), seen.clone(), dir.path().to_owned());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(n) = on_disk(&dir) {
                    seen.lock().unwrap().entry(n).or_insert_with(Instant::now);
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let mut written = HashMap::new();
    let updating = Instant::now();
    for n in 1..=args.updates {
        put(&secrets, n).await?;
        written.insert(n, Instant::now());
        tokio::time::sleep(args.interval).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.lock().unwrap().contains_key(&args.updates) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = updating.elapsed();
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("the reader thread");
    let (rss, peak, cpu) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"), cpu_seconds(pid) - cpu_before);

    let seen = seen.lock().unwrap();
    // A version replaced before the reader's next look was never seen; the next one was.
    let missed = (1..=args.updates).filter(|n| !seen.contains_key(n)).count();
    let mut latencies: Vec<Duration> =
        written.iter().filter_map(|(n, at)| Some(seen.get(n)?.saturating_duration_since(*at))).collect();
    latencies.sort();
    anyhow::ensure!(!latencies.is_empty(), "no update reached the disk:\n{}", agent.log_tail(20));
    let at = |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1];
    println!(
        "    {} updates on disk after p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({missed} replaced before the reader looked)",
        latencies.len(),
        ms(at(0.5)),
        ms(at(0.99)),
        ms(at(1.0))
    );
    println!(
        "    agent: RSS {:.1} MiB after the updates, peak {:.1} MiB; CPU {:.2} s for {} updates in {:.1} s",
        mib(rss),
        mib(peak),
        cpu,
        args.updates,
        took.as_secs_f64()
    );
    let memory = |n: usize, what: &str| {
        if let Some(cgroup) = &cgroups[n] {
            let (usage, working_set) = cgroup.usage_kib();
            println!(
                "    {what}: cgroup working set {:.1} MiB (usage {:.1} MiB, the rest reclaimable page cache)",
                mib(working_set),
                mib(usage)
            );
        }
    };
    let cache = if args.cold { "read its binary from disk" } else { "binary possibly cached already" };
    memory(0, &format!("first agent ({cache})"));
    memory(1, "second agent (binary in the page cache)");
    if cgroups.iter().any(Option::is_none) {
        println!("    (no memory cgroup figures: this process may not create memory cgroups)");
    }
    agent.terminate(Duration::from_secs(5))?;
    second.terminate(Duration::from_secs(5))?;
    anyhow::ensure!(at(1.0) < Duration::from_secs(1), "an update took {:?} to reach the disk", at(1.0));
    Ok(())
}
