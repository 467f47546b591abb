//! The scale benchmark: a real kube-apiserver + etcd, a fast rotating token endpoint, N grants, and
//! the (release) operator. Prints time to all Ready against a baseline that does only the
//! unavoidable writes, token requests, the apiserver's own request counts by verb and resource,
//! the operator's RSS and CPU, and what a no-op pass, a refresh of every grant, a restart and a
//! failover cost.
//!
//!   wgtwo-bench --operator target/release/wgtwo-operator [--grants N] [--concurrency C]
//!               [--clients K] [--soak SECONDS --token-lifetime SECONDS [--soak-only]] [--no-baseline] [--check]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use wgtwo_testenv::process::{ChildGuard, cpu_seconds, proc_status};
use wgtwo_testenv::token_server::{RotatingTokenServer, USER_TOKEN_PREFIX};
use wgtwo_testenv::{ControlPlane, Hydra, HydraOptions, Subscriber, string_secret};

const NS: &str = "bench";
const BASELINE_NS: &str = "baseline";
const OPERATOR_NS: &str = "wgtwo-system";
const OPERATOR_SA: &str = "wgtwo-operator";
const REFRESH_ANNOTATION: &str = "auth.wgtwo.com/refresh-requested-at";
const HYDRA_REDIRECT: &str = "https://example.com/callback";

struct Args {
    operator: PathBuf,
    grants: usize,
    concurrency: usize,
    clients: usize,
    soak: Duration,
    token_lifetime: u64,
    baseline: bool,
    check: bool,
    soak_only: bool,
    hydra: bool,
    /// Passed on to every operator started (e.g. `--streaming-lists`).
    operator_args: Vec<String>,
}

fn usage() -> &'static str {
    "usage: wgtwo-bench --operator PATH [--grants N (1000)] [--concurrency C (operator default)] [--clients K (10)] [--soak SECONDS (0) --token-lifetime SECONDS (3600) [--soak-only]] [--no-baseline] [--check: exit 1 if a request or token count target is missed] [--hydra: a real Ory Hydra instead of the stub, for a small N] [--operator-arg ARG (repeatable: passed to the operator)]"
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args {
        operator: PathBuf::new(),
        grants: 1000,
        concurrency: 16,
        clients: 10,
        soak: Duration::ZERO,
        token_lifetime: 3600,
        baseline: true,
        check: false,
        soak_only: false,
        hydra: false,
        operator_args: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value; {}", usage()));
        match arg.as_str() {
            "--operator" => args.operator = value("--operator")?.into(),
            "--grants" => args.grants = value("--grants")?.parse()?,
            "--concurrency" => args.concurrency = value("--concurrency")?.parse()?,
            "--clients" => args.clients = value("--clients")?.parse()?,
            "--soak" => args.soak = Duration::from_secs(value("--soak")?.parse()?),
            "--token-lifetime" => args.token_lifetime = value("--token-lifetime")?.parse()?,
            "--no-baseline" => args.baseline = false,
            "--check" => args.check = true,
            "--soak-only" => args.soak_only = true,
            "--hydra" => args.hydra = true,
            "--operator-arg" => args.operator_args.push(value("--operator-arg")?),
            other => bail!("unknown argument {other}; {}", usage()),
        }
    }
    anyhow::ensure!(!args.operator.as_os_str().is_empty(), "{}", usage());
    anyhow::ensure!(args.grants > 0 && args.clients > 0 && args.concurrency > 0, "{}", usage());
    if args.hydra {
        // One OAuth client registered at Hydra.
        args.clients = 1;
    }
    Ok(args)
}

fn grant_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("auth.wgtwo.com", "v1alpha1", "WgtwoGrant"))
}

fn grants(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &grant_resource())
}

fn grant(name: &str, issuer: &str, client_secret: &str) -> DynamicObject {
    let mut object = DynamicObject::new(name, &grant_resource());
    object.data = json!({"spec": {
        "issuerUrl": issuer,
        "clientSecretRef": {"name": client_secret},
        "refreshTokenSecretRef": {"name": format!("{name}-authorization"), "key": "refresh_token"},
        "target": {"secretName": format!("{name}-token")},
    }});
    object
}

/// Runs `f` for 0..n with `concurrency` at once.
async fn for_each<F, Fut>(n: usize, concurrency: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    futures::stream::iter(0..n).map(f).buffer_unordered(concurrency).try_collect::<Vec<()>>().await?;
    Ok(())
}

// ---------------------------------------------------------------- apiserver request counts

/// `apiserver_request_total` summed by (verb, resource/subresource).
type Requests = BTreeMap<(String, String), f64>;

async fn apiserver_requests(admin: &kube::Client) -> anyhow::Result<Requests> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = admin.request_text(request).await?;
    let mut out = Requests::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let (labels, value) = line.rsplit_once(' ').context("metric line")?;
        let label = |name: &str| {
            labels
                .split(&format!("{name}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default()
                .to_owned()
        };
        let (verb, resource, sub) = (label("verb"), label("resource"), label("subresource"));
        if resource.is_empty() {
            continue; // /metrics, /healthz and discovery
        }
        let what = if sub.is_empty() { resource } else { format!("{resource}/{sub}") };
        *out.entry((verb, what)).or_default() += value.parse::<f64>()?;
    }
    Ok(out)
}

fn delta(after: &Requests, before: &Requests) -> Requests {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// Prints the requests of a phase, minus the benchmark's own (`own`: (verb, resource) -> count).
fn print_requests(title: &str, requests: &Requests, own: &[((&str, &str), f64)], per: f64, per_what: &str) -> Requests {
    let mut requests = requests.clone();
    for ((verb, resource), n) in own {
        if let Some(v) = requests.get_mut(&((*verb).to_owned(), (*resource).to_owned())) {
            *v -= n;
        }
    }
    requests.retain(|_, v| *v > 0.0);
    let total: f64 = requests.values().sum();
    println!("    apiserver requests by the operator, {title}: {total:.0} ({:.2} per {per_what})", total / per);
    for ((verb, resource), n) in &requests {
        println!("      {verb:<7} {resource:<28} {n:>8.0}  ({:.2} per {per_what})", n / per);
    }
    requests
}

fn count(requests: &Requests, verb: &str, resource: &str) -> f64 {
    requests.get(&(verb.to_owned(), resource.to_owned())).copied().unwrap_or(0.0)
}

/// Requests other than leader election.
fn without_leases(requests: &Requests) -> Requests {
    requests.iter().filter(|((_, r), _)| r != "leases").map(|(k, v)| (k.clone(), *v)).collect()
}

fn writes(requests: &Requests) -> f64 {
    without_leases(requests)
        .iter()
        .filter(|((verb, _), _)| !matches!(verb.as_str(), "GET" | "LIST" | "WATCH"))
        .map(|(_, v)| v)
        .sum()
}

/// The structural targets (request and token counts), which hold at any N and on any machine.
#[derive(Default)]
struct Checks(Vec<(String, bool)>);

impl Checks {
    fn check(&mut self, what: impl Into<String>, ok: bool) {
        self.0.push((what.into(), ok));
    }

    fn report(&self) -> bool {
        println!("\n==> targets that hold at any scale");
        for (what, ok) in &self.0 {
            println!("    [{}] {what}", if *ok { "ok" } else { "MISSED" });
        }
        self.0.iter().all(|(_, ok)| *ok)
    }
}

// ---------------------------------------------------------------- the identity service

/// The fast stub (default), or a real Ory Hydra (`--hydra`, for a small N: every subscriber
/// authorizes through Hydra's login and consent with `wgtwo-operator authorize`).
enum Issuer {
    Stub(RotatingTokenServer),
    Hydra { hydra: Box<Hydra>, ca_file: PathBuf },
}

impl Issuer {
    fn base_url(&self) -> String {
        match self {
            Issuer::Stub(s) => s.base_url().to_owned(),
            Issuer::Hydra { hydra, .. } => hydra.base_url(),
        }
    }

    fn token_requests(&self) -> usize {
        match self {
            Issuer::Stub(s) => s.token_requests(),
            Issuer::Hydra { hydra, .. } => hydra.token_requests(),
        }
    }

    /// Refresh tokens presented again. Hydra refuses them (the grant then never gets Ready, which
    /// the benchmark reports); only the stub counts them.
    fn reused(&self) -> usize {
        match self {
            Issuer::Stub(s) => s.reused(),
            Issuer::Hydra { .. } => 0,
        }
    }
}

/// Grant `g{i}` authorized at Hydra by a simulated subscriber through `wgtwo-operator authorize
/// --paste`, which writes its refresh-token Secret and the grant.
async fn authorize_at_hydra(
    operator: &Path,
    kubeconfig: &Path,
    hydra: &Hydra,
    ca_file: &Path,
    i: usize,
) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut child = Command::new(operator)
        .args(["authorize", &format!("g{i}"), "-n", NS, "--paste", "--no-browser", "--client-secret", "client-0"])
        .args(["--redirect-uri", HYDRA_REDIRECT, "--issuer-url", &hydra.base_url()])
        .arg("--ca-bundle")
        .arg(ca_file)
        .env("KUBECONFIG", kubeconfig)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start wgtwo-operator authorize")?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let url = loop {
        let mut line = String::new();
        anyhow::ensure!(stdout.read_line(&mut line)? > 0, "authorize printed no URL");
        if line.trim().starts_with("https://") {
            break line.trim().to_owned();
        }
    };
    let callback = hydra.authorize(&url, &Subscriber::new(&format!("subscriber-{i}"), "+4799999999")).await?;
    writeln!(child.stdin.as_mut().context("stdin")?, "{}", callback.url)?;
    std::io::copy(&mut stdout, &mut std::io::sink())?;
    anyhow::ensure!(child.wait()?.success(), "authorize g{i} failed");
    Ok(())
}

// ---------------------------------------------------------------- the operator process

struct Operator {
    process: ChildGuard,
    port: u16,
    started: Instant,
    samples: Arc<Mutex<Samples>>,
    sampler: tokio::task::JoinHandle<()>,
}

#[derive(Default, Clone)]
struct Samples {
    rss_kib: u64,
    peak_rss_kib: u64,
    cpu_seconds: f64,
}

async fn scrape(port: u16) -> Option<String> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    reqwest::get(url).await.ok()?.text().await.ok()
}

/// The value of an unlabelled metric (or the sum over its series).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{')))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

struct Bench {
    args: Args,
    cp: ControlPlane,
    tokens: Issuer,
    operator_kubeconfig: PathBuf,
    dir: tempfile::TempDir,
    starts: usize,
}

impl Bench {
    fn start_operator(&mut self) -> anyhow::Result<Operator> {
        self.starts += 1;
        let port = wgtwo_testenv::free_port();
        // WGTWO_BENCH_WRAP (e.g. "perf record -g -o /tmp/perf.data --") profiles the first operator;
        // its RSS and CPU figures are then the wrapper's.
        let wrap = std::env::var("WGTWO_BENCH_WRAP").ok().filter(|_| self.starts == 1);
        let mut words: Vec<String> = wrap.iter().flat_map(|w| w.split_whitespace().map(str::to_owned)).collect();
        words.push(self.args.operator.display().to_string());
        let mut cmd = Command::new(&words[0]);
        cmd.args(&words[1..]);
        cmd.args(["run", "--namespace", NS, "--concurrency", &self.args.concurrency.to_string()])
            .args(["--metrics-bind-address", &format!("127.0.0.1:{port}")])
            .args(["--allowed-issuer", &self.tokens.base_url()])
            .args(["--leader-election-namespace", OPERATOR_NS])
            .env("POD_NAME", format!("operator-{}", self.starts))
            .env("KUBECONFIG", &self.operator_kubeconfig)
            .args(&self.args.operator_args)
            .env("RUST_LOG", "info");
        if let Issuer::Hydra { ca_file, .. } = &self.tokens {
            cmd.arg("--ca-bundle").arg(ca_file);
        }
        let log = self.dir.path().join(format!("operator-{}.log", self.starts));
        let process = ChildGuard::spawn("wgtwo-operator", cmd, &log)?;
        let pid = process.pid();
        let samples = Arc::new(Mutex::new(Samples::default()));
        let into = samples.clone();
        let sampler = tokio::spawn(async move {
            let mut tick = 0u64;
            loop {
                let (rss, peak, cpu) = (proc_status(pid, "VmRSS:"), proc_status(pid, "VmHWM:"), cpu_seconds(pid));
                // Scraped every 10 s, as Prometheus would be: a scrape costs the operator memory and
                // CPU per grant, which the figures must include. (The phases read the operator's own
                // high-water mark of unpersisted answers at their end.)
                if tick.is_multiple_of(100) {
                    let _ = scrape(port).await;
                }
                {
                    let mut s = into.lock().unwrap();
                    if let Some(rss) = rss {
                        s.rss_kib = rss;
                    }
                    s.peak_rss_kib = s.peak_rss_kib.max(peak.unwrap_or(0));
                    s.cpu_seconds = cpu.unwrap_or(s.cpu_seconds);
                }
                tick += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(Operator { process, port, started: Instant::now(), samples, sampler })
    }
}

impl Operator {
    fn samples(&self) -> Samples {
        self.samples.lock().unwrap().clone()
    }

    async fn metrics(&self) -> String {
        scrape(self.port).await.unwrap_or_default()
    }

    async fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        check: impl Fn(&str) -> bool,
    ) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + within;
        loop {
            self.process.check_running()?;
            if check(&self.metrics().await) {
                return Ok(self.started.elapsed());
            }
            anyhow::ensure!(Instant::now() < deadline, "{what}: not within {within:?}");
            // A scrape costs the operator series per grant.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn ready(&mut self) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            self.process.check_running()?;
            let url = format!("http://127.0.0.1:{}/readyz", self.port);
            if reqwest::get(url).await.is_ok_and(|r| r.status().is_success()) {
                return Ok(self.started.elapsed());
            }
            anyhow::ensure!(Instant::now() < deadline, "operator not ready within 120 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stop(mut self) -> anyhow::Result<Samples> {
        let samples = self.samples();
        self.sampler.abort();
        self.process.terminate(Duration::from_secs(30))?;
        Ok(samples)
    }
}

/// One scrape of the operator's /metrics: how long it took, its size, and how far the operator's
/// RSS rose above its level before it (sampled every millisecond).
async fn scrape_cost(op: &Operator) -> (Duration, usize, u64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let pid = op.process.pid();
    let before = proc_status(pid, "VmRSS:").unwrap_or(0);
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut max = 0;
            while !done.load(Ordering::SeqCst) {
                max = max.max(proc_status(pid, "VmRSS:").unwrap_or(0));
                std::thread::sleep(Duration::from_millis(1));
            }
            max
        })
    };
    let started = Instant::now();
    let body = scrape(op.port).await.unwrap_or_default();
    let took = started.elapsed();
    done.store(true, Ordering::SeqCst);
    let max = sampler.join().unwrap_or(0);
    (took, body.len(), max.saturating_sub(before))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------- the grants as the benchmark sees them

#[derive(Default)]
struct View {
    ready: HashMap<String, bool>,
    handled: HashMap<String, String>,
}

impl View {
    fn ready(&self) -> usize {
        self.ready.values().filter(|r| **r).count()
    }

    fn handled(&self, value: &str) -> usize {
        self.handled.values().filter(|h| *h == value).count()
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One watch over the benchmark's grants (started before any measured phase, so it adds no
/// request to one). Dropping the guard stops it: it must stop before the control plane does, or
/// its retries keep the runtime from shutting down.
fn watch_grants(client: kube::Client) -> (Arc<Mutex<View>>, AbortOnDrop) {
    let view = Arc::new(Mutex::new(View::default()));
    let into = view.clone();
    let task = tokio::spawn(async move {
        let stream = watcher(grants(&client, NS), watcher::Config::default().any_semantic()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let (watcher::Event::Apply(g) | watcher::Event::InitApply(g)) = (match event {
                Ok(e) => e,
                Err(_) => continue,
            }) else {
                continue;
            };
            let name = g.metadata.name.clone().unwrap_or_default();
            let status = &g.data["status"];
            let ready = status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            let mut v = into.lock().unwrap();
            v.ready.insert(name.clone(), ready);
            if let Some(h) = status["refreshRequestHandled"].as_str() {
                v.handled.insert(name, h.to_owned());
            }
        }
    });
    (view, AbortOnDrop(task))
}

async fn wait_view(
    view: &Arc<Mutex<View>>,
    what: &str,
    within: Duration,
    done: impl Fn(&View) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !done(&view.lock().unwrap()) {
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------- phases

/// The unavoidable work per grant with a plain client at the same concurrency: create the state and
/// the target Secret, write one status. Returns its wall time.
async fn baseline(admin: &kube::Client, n: usize, concurrency: usize) -> anyhow::Result<Duration> {
    let api = grants(admin, BASELINE_NS);
    for_each(n, 64, |i| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &grant(&format!("g{i}"), "http://127.0.0.1:1", "client-0")).await?;
            Ok(())
        }
    })
    .await?;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), BASELINE_NS);
    let started = Instant::now();
    for_each(n, concurrency, |i| {
        let (api, secrets) = (api.clone(), secrets.clone());
        async move {
            let name = format!("g{i}");
            let refresh = format!("ory_rt_bench{i:020}{}", "r".repeat(55));
            let access = format!("ory_at_bench{i:020}{}", "a".repeat(55));
            let state = string_secret(&format!("{name}-wgtwo-state"), &[("refresh_token", &refresh), ("source_sha256", &"0".repeat(64))]);
            secrets.create(&PostParams::default(), &state).await?;
            let target = string_secret(
                &format!("{name}-token"),
                &[("access_token", &access), ("token_type", "Bearer"), ("expires_at", "2030-01-01T00:00:00Z"), ("scope", "phone offline_access")],
            );
            secrets.create(&PostParams::default(), &target).await?;
            let status = json!({
                "apiVersion": "auth.wgtwo.com/v1alpha1", "kind": "WgtwoGrant",
                "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Refreshed", "message": "baseline",
                    "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}],
                    "expiresAt": "2030-01-01T00:00:00Z", "observedGeneration": 1}
            });
            api.patch_status(&name, &PatchParams::apply("baseline").force(), &Patch::Apply(status)).await?;
            Ok(())
        }
    })
    .await?;
    Ok(started.elapsed())
}

/// N grants over `clients` OAuth clients against the stub, with user refresh tokens it accepts once.
async fn create_stub_grants(
    admin: &kube::Client,
    secrets: &Api<Secret>,
    issuer: &str,
    n: usize,
    clients: usize,
) -> anyhow::Result<()> {
    for c in 0..clients {
        let secret = string_secret(
            &format!("client-{c}"),
            &[("client_id", &format!("client-{c}")), ("client_secret", &format!("secret-{c}"))],
        );
        secrets.create(&PostParams::default(), &secret).await?;
    }
    for_each(n, 64, |i| {
        let (secrets, api) = (secrets.clone(), grants(admin, NS));
        async move {
            let name = format!("g{i}");
            let token = format!("{USER_TOKEN_PREFIX}{i}");
            let user = string_secret(&format!("{name}-authorization"), &[("refresh_token", &token)]);
            secrets.create(&PostParams::default(), &user).await?;
            api.create(&PostParams::default(), &grant(&name, issuer, &format!("client-{}", i % clients))).await?;
            Ok(())
        }
    })
    .await
}

async fn annotate_all(admin: &kube::Client, n: usize, key: &str, value: &str) -> anyhow::Result<()> {
    let api = grants(admin, NS);
    for_each(n, 32, |i| {
        let api = api.clone();
        let patch = json!({"metadata": {"annotations": {key: value}}});
        async move {
            api.patch(&format!("g{i}"), &PatchParams::default(), &Patch::Merge(patch)).await?;
            Ok(())
        }
    })
    .await
}

/// What a refresh of every grant cost.
struct Refreshes {
    /// Token requests sent.
    sent: usize,
    /// The operator's apiserver requests (without the benchmark's annotations).
    requests: Requests,
}

/// Requests a refresh of every grant (annotation `value`) and waits until each is handled.
async fn refresh_all(
    bench: &Bench,
    op: &Operator,
    admin: &kube::Client,
    view: &Arc<Mutex<View>>,
    value: &str,
) -> anyhow::Result<Refreshes> {
    let n = bench.args.grants;
    let before = apiserver_requests(admin).await?;
    let (tokens_before, cpu) = (bench.tokens.token_requests(), op.samples().cpu_seconds);
    let started = Instant::now();
    annotate_all(admin, n, REFRESH_ANNOTATION, value).await?;
    wait_view(view, "refresh requests handled", Duration::from_secs(1800), |v| v.handled(value) == n).await?;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = delta(&apiserver_requests(admin).await?, &before);
    let sent = bench.tokens.token_requests() - tokens_before;
    println!(
        "    {n} refreshes in {:.2} s; token requests {sent} ({:.2} per refresh); presented again: {}",
        took.as_secs_f64(),
        sent as f64 / n as f64,
        bench.tokens.reused()
    );
    let requests =
        print_requests("refresh round", &requests, &[(("PATCH", "wgtwogrants"), n as f64)], n as f64, "refresh");
    let s = op.samples();
    println!(
        "    operator CPU for the round: {:.2} s; peak RSS so far {:.1} MiB; max unpersisted {:.0}",
        s.cpu_seconds - cpu,
        mib(s.peak_rss_kib),
        metric(&op.metrics().await, "wgtwo_operator_unpersisted_refresh_tokens_peak")
    );
    Ok(Refreshes { sent, requests })
}

fn reconciles(text: &str) -> f64 {
    metric(text, "wgtwo_operator_reconciles_total")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let n = args.grants;
    println!(
        "==> wgtwo-bench: {n} grants, --concurrency {}, {} OAuth clients, token lifetime {} s",
        args.concurrency, args.clients, args.token_lifetime
    );
    let cp = ControlPlane::start().await?;
    let manifests = wgtwo_testenv::repo_root().join("deploy/manifests/wgtwo-operator.yaml");
    cp.kubectl(&["apply", "--server-side", "-f", manifests.to_str().unwrap()])?;
    // Only the shipped RBAC, as in a cluster; the Deployment there has no nodes to run on.
    let (_, operator_kubeconfig) = cp.service_account_client(OPERATOR_NS, OPERATOR_SA).await?;
    for ns in [NS, BASELINE_NS] {
        cp.create_namespace(ns).await?;
    }
    let admin = cp.admin_client().await?;
    let dir = tempfile::tempdir()?;
    let tokens = if args.hydra {
        let options = HydraOptions { access_token_ttl: Duration::from_secs(args.token_lifetime), ..Default::default() };
        let hydra = Hydra::start(options).await?;
        let ca_file = dir.path().join("hydra-ca.pem");
        std::fs::write(&ca_file, hydra.ca_pem())?;
        Issuer::Hydra { hydra: Box::new(hydra), ca_file }
    } else {
        Issuer::Stub(RotatingTokenServer::start(args.token_lifetime).await?)
    };
    let mut bench = Bench { args, cp, tokens, operator_kubeconfig, dir, starts: 0 };
    let concurrency = bench.args.concurrency;

    let created = Instant::now();
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NS);
    if let Issuer::Hydra { hydra, ca_file } = &bench.tokens {
        // One OAuth client, as `client-0`; subscribers authorize one after another.
        let client = hydra.create_client(&[HYDRA_REDIRECT]).await?;
        secrets.create(&PostParams::default(), &client.kube_secret("client-0")).await?;
        for i in 0..n {
            authorize_at_hydra(&bench.args.operator, bench.cp.admin_kubeconfig(), hydra, ca_file, i).await?;
        }
    } else {
        create_stub_grants(&admin, &secrets, &bench.tokens.base_url(), n, bench.args.clients).await?;
    }
    println!("    created {n} grants and their Secrets in {:.1} s", created.elapsed().as_secs_f64());

    let baseline_time = if bench.args.baseline {
        let t = baseline(&admin, n, concurrency).await?;
        println!(
            "    baseline (plain client, concurrency {concurrency}: 2 Secret creates + 1 status apply per grant): {:.2} s",
            t.as_secs_f64()
        );
        Some(t)
    } else {
        None
    };

    let (view, _watch) = watch_grants(admin.clone());
    wait_view(&view, "benchmark watch synced", Duration::from_secs(120), |v| v.ready.len() == n).await?;

    println!("\n==> first convergence: operator started after the grants exist");
    let before = apiserver_requests(&admin).await?;
    let tokens_at_start = bench.tokens.token_requests();
    let mut op = bench.start_operator()?;
    let synced = op.ready().await?;
    wait_view(&view, "all grants Ready", Duration::from_secs(1800), |v| v.ready() == n).await?;
    let converged = op.started.elapsed();
    // Let the last writes land before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = apiserver_requests(&admin).await?;
    let s = op.samples();
    let peak_unpersisted = metric(&op.metrics().await, "wgtwo_operator_unpersisted_refresh_tokens_peak");
    let token_requests = bench.tokens.token_requests() - tokens_at_start;
    println!(
        "    synced (readyz) after {:.2} s; all {n} Ready after {:.2} s",
        synced.as_secs_f64(),
        converged.as_secs_f64()
    );
    if let Some(b) = baseline_time {
        println!("    ratio to baseline: {:.2}x", converged.as_secs_f64() / b.as_secs_f64());
    }
    println!(
        "    token requests: {token_requests} ({:.2} per grant), refresh tokens presented again: {}",
        token_requests as f64 / n as f64,
        bench.tokens.reused()
    );
    println!(
        "    operator: peak RSS {:.1} MiB, CPU {:.1} s, max unpersisted answers {:.0}",
        mib(s.peak_rss_kib),
        s.cpu_seconds,
        peak_unpersisted
    );
    let mut checks = Checks::default();
    checks.check(
        format!("first convergence: one token request per grant ({token_requests} for {n})"),
        token_requests == n,
    );
    let first = delta(&after, &before);
    let first = print_requests("first convergence", &first, &[], n as f64, "grant");
    // The user's refresh token is read once (it is nowhere else), the client Secrets once each, and
    // before a refresh token is presented the state Secret is confirmed by a consistent read: a
    // state Secret not in the cache (a new grant's) with a GET, since only a read of it can tell
    // it does not exist.
    let gets = count(&first, "GET", "secrets");
    checks.check(
        format!("first convergence: Secret GETs = user Secrets + absent state Secrets + client Secrets ({gets:.0})"),
        gets <= (2 * n + bench.args.clients) as f64,
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let s = op.samples();
    println!("    steady RSS 10 s after convergence: {:.1} MiB", mib(s.rss_kib));
    let mut costs = Vec::new();
    for _ in 0..5 {
        costs.push(scrape_cost(&op).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    costs.sort_by_key(|c| c.0);
    let transient = costs.iter().map(|c| c.2).max().unwrap_or(0);
    println!(
        "    one scrape of /metrics ({} KiB): {:.0} / {:.0} / {:.0} ms (min / median / max of 5); RSS above the level before it: at most {:.1} MiB",
        costs[0].1 / 1024,
        costs[0].0.as_secs_f64() * 1000.0,
        costs[2].0.as_secs_f64() * 1000.0,
        costs[4].0.as_secs_f64() * 1000.0,
        mib(transient)
    );

    // --soak-only: straight from convergence to the soak (its refreshes would mix into the counts
    // of the other phases).
    let mut op = if bench.args.soak_only {
        op
    } else {
        println!("\n==> no-op pass: a label on every client Secret, so every grant looks again");
        let base = reconciles(&op.metrics().await);
        let before = apiserver_requests(&admin).await?;
        let cpu = op.samples().cpu_seconds;
        for c in 0..bench.args.clients {
            let patch = json!({"metadata": {"labels": {"bench.wgtwo.com/touched": "1"}}});
            secrets.patch(&format!("client-{c}"), &PatchParams::default(), &Patch::Merge(patch)).await?;
        }
        op.wait_for("no-op reconciles", Duration::from_secs(300), |t| reconciles(t) >= base + n as f64).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let noop = delta(&apiserver_requests(&admin).await?, &before);
        let clients = bench.args.clients as f64;
        let noop = print_requests("no-op pass", &noop, &[(("PATCH", "secrets"), clients)], n as f64, "grant");
        // A changed client Secret is read once (its content may have changed), not once per grant.
        let total: f64 = without_leases(&noop).values().sum();
        checks.check(
            format!("no-op pass: one GET per changed client Secret, nothing else ({total:.0})"),
            total <= clients,
        );
        println!("    operator CPU for the pass: {:.2} s", op.samples().cpu_seconds - cpu);

        println!("\n==> refresh of every grant (refresh-requested annotation)");
        let refreshes = refresh_all(&bench, &op, &admin, &view, "bench-1").await?;
        checks.check(format!("refresh: 1 token request each ({} for {n})", refreshes.sent), refreshes.sent == n);
        let w = writes(&refreshes.requests) / n as f64;
        checks.check(format!("refresh: at most 4 writes each ({w:.2})"), w <= 4.0);
        let reads = count(&refreshes.requests, "GET", "secrets") + count(&refreshes.requests, "GET", "wgtwogrants");
        checks.check(format!("refresh: no GET a cache could answer ({reads:.0})"), reads == 0.0);

        println!("\n==> restart with every token valid");
        op.stop()?;
        let before = apiserver_requests(&admin).await?;
        let tokens_before = bench.tokens.token_requests();
        let mut op = bench.start_operator()?;
        let synced = op.ready().await?;
        let passed =
            op.wait_for("a reconcile per grant", Duration::from_secs(300), |t| reconciles(t) >= n as f64).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let restart = delta(&apiserver_requests(&admin).await?, &before);
        let s = op.samples();
        println!(
            "    synced after {:.2} s; every grant reconciled after {:.2} s; token requests {}",
            synced.as_secs_f64(),
            passed.as_secs_f64(),
            bench.tokens.token_requests() - tokens_before
        );
        println!("    peak RSS {:.1} MiB, CPU {:.2} s", mib(s.peak_rss_kib), s.cpu_seconds);
        let restart = print_requests("restart", &restart, &[], n as f64, "grant");
        let restart_tokens = bench.tokens.token_requests() - tokens_before;
        checks.check(format!("restart: 0 token requests ({restart_tokens})"), restart_tokens == 0);
        let gets = count(&restart, "GET", "secrets") + count(&restart, "GET", "wgtwogrants");
        checks.check(
            format!("restart: no per-grant GET ({gets:.0} GETs, {} client Secrets)", bench.args.clients),
            gets <= bench.args.clients as f64,
        );
        checks.check(
            format!("restart: writes only for leadership and its Event ({:.0})", writes(&restart)),
            writes(&restart) <= 1.0,
        );
        checks.check(
            format!("restart: synced within 15 s ({:.2} s)", synced.as_secs_f64()),
            synced < Duration::from_secs(15),
        );

        println!("\n==> failover: a standby takes over from a leader stopped with SIGTERM");
        let mut standby = bench.start_operator()?;
        standby.ready().await?;
        let before = apiserver_requests(&admin).await?;
        let tokens_before = bench.tokens.token_requests();
        let stopped = Instant::now();
        op.stop()?;
        let base = reconciles(&standby.metrics().await);
        let deadline = Instant::now() + Duration::from_secs(300);
        while reconciles(&standby.metrics().await) < base + n as f64 {
            standby.process.check_running()?;
            anyhow::ensure!(Instant::now() < deadline, "standby did not reconcile every grant within 300 s");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let took = stopped.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let failover = delta(&apiserver_requests(&admin).await?, &before);
        println!(
            "    every grant reconciled by the new leader {:.2} s after SIGTERM to the old one; token requests {}",
            took.as_secs_f64(),
            bench.tokens.token_requests() - tokens_before
        );
        let failover = print_requests("failover", &failover, &[], n as f64, "grant");
        let failover_tokens = bench.tokens.token_requests() - tokens_before;
        checks.check(format!("failover: 0 token requests ({failover_tokens})"), failover_tokens == 0);
        let gets = count(&failover, "GET", "secrets") + count(&failover, "GET", "wgtwogrants");
        checks.check(format!("failover: no per-grant GET ({gets:.0})"), gets <= bench.args.clients as f64);
        checks.check(
            format!("failover: every grant looked at within 15 s ({:.2} s)", took.as_secs_f64()),
            took < Duration::from_secs(15),
        );

        // The new leader's first token request for each grant needs its state Secret confirmed
        // (the previous leader wrote it): one LIST for the term, not a GET per grant.
        println!("\n==> refresh of every grant under the new leader");
        let refreshes = refresh_all(&bench, &standby, &admin, &view, "bench-2").await?;
        checks.check(
            format!("refresh under a new leader: 1 token request each ({} for {n})", refreshes.sent),
            refreshes.sent == n,
        );
        let gets = count(&refreshes.requests, "GET", "secrets");
        let lists = count(&refreshes.requests, "LIST", "secrets");
        checks.check(
            format!("refresh under a new leader: state Secrets confirmed by a LIST, no GET ({gets:.0} GETs, {lists:.0} LIST pages)"),
            gets == 0.0 && lists <= (2 * n).div_ceil(500) as f64 + 2.0,
        );
        standby
    };

    if !bench.args.soak.is_zero() {
        println!(
            "\n==> soak: {} s with refreshes running (token lifetime {} s)",
            bench.args.soak.as_secs(),
            bench.args.token_lifetime
        );
        let (tokens_before, started) = (bench.tokens.token_requests(), Instant::now());
        let mut rss = Vec::new();
        while started.elapsed() < bench.args.soak {
            tokio::time::sleep(Duration::from_secs(30)).await;
            op.process.check_running()?;
            let s = op.samples();
            rss.push(mib(s.rss_kib));
            println!(
                "      t={:>4.0}s RSS {:.1} MiB, token requests {}",
                started.elapsed().as_secs_f64(),
                mib(s.rss_kib),
                bench.tokens.token_requests() - tokens_before
            );
        }
        let (lo, hi) = rss.iter().fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        println!(
            "    RSS over the soak: {lo:.1}..{hi:.1} MiB; presented again: {}; all Ready: {}",
            bench.tokens.reused(),
            view.lock().unwrap().ready() == n
        );
    }

    let reused = bench.tokens.reused();
    op.stop()?;
    checks.check(format!("no refresh token presented twice ({reused})"), reused == 0);
    let all = checks.report();
    let check = bench.args.check;
    if !all {
        // The operators' logs say why: kept for a look after the run.
        println!("    operator logs kept in {}", bench.dir.keep().display());
    }
    anyhow::ensure!(all || !check, "a target was missed");
    println!("\n==> done");
    Ok(())
}
