//! `wgtwo-operator run`: the controller plus what production needs around it (leader election,
//! metrics and probes, graceful shutdown), wired in the order that keeps refresh tokens safe.
//!
//! With `--journal-dir`, the journal of a killed predecessor is replayed first, before this
//! process campaigns for the Lease or reconciles anything.
//!
//! Shutdown on SIGTERM/SIGINT: no token request starts any more; in-flight reconciles finish,
//! including the persistence of a rotated refresh token, and failed state writes are retried for up
//! to `--shutdown-timeout` (the Lease is renewed meanwhile); then the Lease is released so a standby
//! takes over at once, unless a rotated refresh token could not be persisted (the standby would
//! present its predecessor: it waits for the Lease to expire instead); the HTTP server stops last
//! and the process exits 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::controller::journal::Journal;
use crate::controller::{self, Options, Shared, replay};
use crate::leader::{Leadership, LeaseConfig, LeaseElector};
use crate::server::{self, Probes};

pub struct RunConfig {
    pub controller: Options,
    /// Bound on every Kubernetes API request other than watches (reads and writes alike).
    pub kube_api_timeout: Duration,
    /// Requests per second of the reconciler to the Kubernetes API (0: unlimited).
    pub kube_api_qps: u32,
    pub metrics_address: SocketAddr,
    /// `None`: no election (exactly one replica must run).
    pub election: Option<Election>,
    /// The write-ahead journal of refresh answers (`--journal-dir`); `None`: none.
    pub journal_dir: Option<std::path::PathBuf>,
}

pub struct Election {
    /// Default: the namespace of the pod (or the kubeconfig's).
    pub namespace: Option<String>,
    pub lease_name: String,
    pub lease_duration: Duration,
    pub renew_period: Duration,
}

impl Election {
    /// The Lease must outlast a renewal round plus the margin a token request needs, or the
    /// leader could never send one.
    pub fn validate(&self, options: &Options) -> anyhow::Result<()> {
        let needed = options.lease_margin() + self.renew_period;
        if self.lease_duration <= needed {
            bail!(
                "--lease-duration ({}s) must be longer than --request-timeout ({}s) + {}s to persist an answer + --lease-renew-period ({}s)",
                self.lease_duration.as_secs_f64(),
                options.request_timeout.as_secs_f64(),
                controller::PERSIST_BUDGET.as_secs(),
                self.renew_period.as_secs_f64()
            );
        }
        Ok(())
    }
}

/// The operator's Kubernetes clients, from one kubeconfig.
pub struct Clients {
    /// Long-lived watches: each ends after [`controller::WATCH_TIMEOUT`], and a silent connection
    /// is given up shortly after.
    pub watch: kube::Client,
    /// The reconciler's reads and writes: every request bounded in time, and at most `qps` per
    /// second when set.
    pub api: kube::Client,
    /// Leader election: bounded in time, never queued behind the reconciler's requests.
    pub lease: kube::Client,
}

/// Bounds every request but watches in time, so a hung apiserver connection can never hold a
/// rotated refresh token, a Lease renewal or a status write indefinitely. kube's default stack
/// already retries 429 (API Priority and Fairness), 503 and 504 with backoff and Retry-After.
pub fn clients(config: &kube::Config, api_timeout: Duration, qps: u32) -> anyhow::Result<Clients> {
    // The apiserver ends each watch after WATCH_TIMEOUT; a connection silent for longer than that
    // plus a margin is dead (a peer lost behind a stateful firewall, a hung apiserver) and is made
    // again, so a dead watch cannot leave the caches stale for more than a minute.
    let mut watch = config.clone();
    watch.read_timeout = Some(controller::WATCH_TIMEOUT + crate::agent::SILENCE_MARGIN);
    watch.connect_timeout = Some(api_timeout);
    watch.reset_reader_on_write = true;
    let watch = kube::Client::try_from(watch)?;
    let mut bounded = config.clone();
    bounded.connect_timeout = Some(api_timeout);
    bounded.read_timeout = Some(api_timeout);
    bounded.write_timeout = Some(api_timeout);
    // Count the read timeout from when a request was sent, not from when its pooled connection
    // went idle.
    bounded.reset_reader_on_write = true;
    let lease = kube::Client::try_from(bounded.clone())?;
    let builder = kube::client::ClientBuilder::try_from(bounded)?;
    let api = match qps {
        0 => builder.build(),
        qps => builder.with_layer(&tower::limit::RateLimitLayer::new(qps.into(), Duration::from_secs(1))).build(),
    };
    Ok(Clients { watch, api, lease })
}

pub async fn run(kube_config: kube::Config, config: RunConfig) -> anyhow::Result<()> {
    let Clients { watch: watch_client, api: client, lease: lease_client } =
        clients(&kube_config, config.kube_api_timeout, config.kube_api_qps)?;
    let leadership = match &config.election {
        Some(e) => {
            e.validate(&config.controller)?;
            Leadership::elected()
        }
        None => Leadership::always(),
    };
    let journal = match &config.journal_dir {
        Some(dir) => Some(Arc::new(Journal::open(dir).with_context(|| format!("--journal-dir {}", dir.display()))?)),
        None => None,
    };
    let shared = Shared { leadership: leadership.clone(), journal: journal.clone(), ..Default::default() };

    let shutdown = CancellationToken::new();
    let serving = CancellationToken::new();
    let probes =
        Probes { metrics: shared.metrics.clone(), leadership: leadership.clone(), synced: shared.synced.clone() };
    let server = server::serve(config.metrics_address, probes, serving.clone())
        .await
        .with_context(|| format!("--metrics-bind-address {}", config.metrics_address))?;
    let server = tokio::spawn(server);

    let signals = shutdown.clone();
    let stop_leading = leadership.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutting down: no new refreshes; finishing those in flight");
        stop_leading.stop();
        signals.cancel();
    });

    // Before campaigning or reconciling: what a killed predecessor in this pod could not persist.
    if let Some(journal) = &journal {
        let replayed = replay::replay(&client, journal, &shared.metrics, &shutdown)
            .await
            .with_context(|| format!("reading the journal in {}", journal.dir().display()))?;
        info!(
            written = replayed.written,
            already_persisted = replayed.already_persisted,
            superseded = replayed.superseded,
            kept = replayed.kept,
            "journal replayed"
        );
        *shared.replayed.lock().unwrap() = replayed.answers;
    }

    let elector_stop = CancellationToken::new();
    let release_lease = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let elector = match config.election {
        Some(e) => {
            let lease = LeaseConfig {
                namespace: e.namespace.unwrap_or_else(|| client.default_namespace().to_owned()),
                name: e.lease_name,
                identity: identity(),
                lease_duration: e.lease_duration,
                renew_period: e.renew_period,
            };
            info!(lease = %lease.name, namespace = %lease.namespace, identity = %lease.identity, "campaigning for the leader Lease");
            let elector = LeaseElector::new(
                lease_client.clone(),
                lease,
                leadership.clone(),
                Some(controller::recorder(lease_client.clone())),
            );
            Some(tokio::spawn(elector.run(elector_stop.clone(), release_lease.clone())))
        }
        None => None,
    };

    let result = controller::run(watch_client, client, config.controller, shared, shutdown).await;
    // In-flight work is done: hand the Lease over, then stop serving. Not while a rotated refresh
    // token is held only here: the standby would present its predecessor at once. It then takes
    // over when the Lease expires.
    if matches!(result, Ok(0)) {
        release_lease.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    elector_stop.cancel();
    if let Some(elector) = elector {
        let _ = elector.await;
    }
    leadership.stop();
    serving.cancel();
    let _ = server.await;
    result.map(|_| ())
}

/// This replica's name in the Lease: the pod name plus a random suffix.
fn identity() -> String {
    let host = crate::kubeapi::pod_name().unwrap_or_else(|| "wgtwo-operator".to_owned());
    let suffix: u32 = rand_suffix();
    format!("{host}_{suffix:08x}")
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded randomly per process: enough to tell incarnations apart.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() as u32
}

pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
