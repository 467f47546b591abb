//! `wgtwo-operator agent`: a sidecar that puts one Secret (a grant's target) into a shared volume
//! within a second of every change, instead of kubelet's minute or more (never, for `subPath`
//! mounts and environment variables). It watches exactly that Secret through the API, so it needs
//! `get`, `list` and `watch` on one resourceName and nothing else.
//!
//! Ready (`/readyz`) once the files are written, and while the Secret exists and may be read. A
//! missing Secret or a 403 is an error on stderr and a failing probe, never an exit: the files it
//! wrote stay (the token in them stays valid until `expires_at`), and the watch keeps trying.

pub mod files;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Default mode of the files: owner and group may read (the pod's `fsGroup` makes the group the
/// application's), nobody may write.
pub const DEFAULT_FILE_MODE: u32 = 0o440;

pub struct AgentConfig {
    pub namespace: String,
    pub secret: String,
    pub dir: PathBuf,
    pub file_mode: u32,
    /// `/healthz` and `/readyz`.
    pub probe_address: SocketAddr,
    /// `GET /token`, loopback only.
    pub token_address: Option<SocketAddr>,
    /// How long the apiserver keeps one watch open; the client gives up on a connection that has
    /// been silent for this plus [`SILENCE_MARGIN`].
    pub watch_timeout: Duration,
}

/// The default watch timeout. kube's is 290 s, and a TCP connection that dies silently (a lost
/// peer behind a stateful firewall) is noticed only by the read timeout after it: minutes of a
/// stale file. One watch request per 50 s per agent is cheap for the apiserver (its watch cache
/// answers it).
pub const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(50);
/// How long past the watch timeout a silent connection is given before it counts as dead.
pub const SILENCE_MARGIN: Duration = Duration::from_secs(10);

/// The agent's Kubernetes client: reads time out (a silent watch ends) shortly after the watch
/// timeout, so a dead connection costs at most `watch_timeout + SILENCE_MARGIN`.
pub fn client(mut config: kube::Config, watch_timeout: Duration) -> anyhow::Result<kube::Client> {
    config.read_timeout = Some(watch_timeout + SILENCE_MARGIN);
    config.connect_timeout = Some(SILENCE_MARGIN);
    Ok(kube::Client::try_from(config)?)
}

/// What the agent knows, for the probes and `/token`.
#[derive(Default)]
struct Status {
    /// The keys last written, and the resourceVersion they came from.
    written: Option<(String, BTreeMap<String, String>)>,
    /// Why the agent is not ready (missing Secret, forbidden), for `/readyz` and the log.
    problem: Option<String>,
}

impl Status {
    /// Clears the problem, if any: the Secret is readable and its version on disk.
    fn ready_again(&mut self, what: &str) {
        if self.problem.take().is_some() {
            info!("{what} can be read again; ready");
        }
    }
}

type Shared = Arc<Mutex<Status>>;

/// Runs until SIGTERM/SIGINT.
pub async fn run(client: kube::Client, config: AgentConfig) -> anyhow::Result<()> {
    if let Some(addr) = config.token_address
        && !addr.ip().is_loopback()
    {
        anyhow::bail!(
            "--serve-token {addr}: must be a loopback address (127.0.0.1 or ::1): the token must not leave the pod"
        );
    }
    anyhow::ensure!(
        config.dir.is_dir(),
        "--dir {}: not a directory (mount an emptyDir there, medium: Memory)",
        config.dir.display()
    );
    let status = Shared::default();
    let cancel = CancellationToken::new();
    let probes = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(status.clone());
    let probe_listener = tokio::net::TcpListener::bind(config.probe_address).await?;
    info!(address = %probe_listener.local_addr()?, "serving /healthz and /readyz");
    let mut servers = vec![tokio::spawn(serve(probe_listener, probes, cancel.clone()))];
    if let Some(addr) = config.token_address {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        info!(address = %listener.local_addr()?, "serving GET /token");
        let app = Router::new().route("/token", get(token)).with_state(status.clone());
        servers.push(tokio::spawn(serve(listener, app, cancel.clone())));
    }
    let shutdown = {
        let cancel = cancel.clone();
        async move {
            crate::operator::wait_for_signal().await;
            cancel.cancel();
        }
    };
    tokio::select! {
        () = watch(client, &config, status) => {}
        () = shutdown => info!("shutting down"),
    }
    cancel.cancel();
    for server in servers {
        let _ = server.await;
    }
    Ok(())
}

async fn serve(listener: tokio::net::TcpListener, app: Router, cancel: CancellationToken) {
    let _ = axum::serve(listener, app).with_graceful_shutdown(async move { cancel.cancelled().await }).await;
}

/// Watches the one Secret (a field selector on its name, which RBAC checks against
/// `resourceNames`) and writes every new version. Re-lists after an expired watch or an apiserver
/// restart, so the files end current.
async fn watch(client: kube::Client, config: &AgentConfig, status: Shared) {
    let api: Api<Secret> = Api::namespaced(client, &config.namespace);
    let selector = watcher::Config::default()
        .fields(&format!("metadata.name={}", config.secret))
        .timeout(config.watch_timeout.as_secs().clamp(1, u32::MAX.into()) as u32);
    let mut events = std::pin::pin!(watcher(api, selector).default_backoff());
    let what = format!("Secret {}/{}", config.namespace, config.secret);
    let mut listed = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => {
                // At start, and again when a watch cannot resume (its resourceVersion expired).
                info!("listing {what}");
                listed = false;
            }
            Ok(watcher::Event::InitApply(secret) | watcher::Event::Apply(secret)) => {
                listed = true;
                write(config, &status, &what, &secret);
            }
            Ok(watcher::Event::InitDone) if !listed => report(
                &status,
                format!(
                    "{what} does not exist (yet): is the grant's target.secretName right, and is the grant Ready? Waiting for it"
                ),
            ),
            Ok(watcher::Event::InitDone) => {}
            Ok(watcher::Event::Delete(_)) => report(
                &status,
                format!(
                    "{what} was deleted; the files keep the last token (valid until its expires_at). Waiting for it"
                ),
            ),
            Err(err) => match forbidden(&err) {
                true => report(
                    &status,
                    format!(
                        "forbidden to read {what}: the pod's ServiceAccount needs get, list and watch on secrets with resourceNames [{}] in namespace {} ({err})",
                        config.secret, config.namespace
                    ),
                ),
                // The apiserver is away or the watch broke: the files stay valid; retried with backoff.
                false => warn!(error = %err, "watch of {what} failed; retrying"),
            },
        }
    }
}

fn write(config: &AgentConfig, status: &Shared, what: &str, secret: &Secret) {
    let version = secret.resource_version().unwrap_or_default();
    {
        // A re-list after a 403 or an outage brings back the version already on disk: ready again.
        let mut s = status.lock().unwrap();
        if s.written.as_ref().is_some_and(|(v, _)| *v == version) {
            s.ready_again(what);
            return;
        }
    }
    let keys = texts(secret);
    let mut content: BTreeMap<String, Vec<u8>> =
        keys.iter().filter(|(k, _)| !k.starts_with("..")).map(|(k, v)| (k.clone(), v.as_bytes().to_vec())).collect();
    content.insert(files::JSON_FILE.to_owned(), serde_json::to_vec(&keys).expect("strings serialize"));
    match files::write_version(&config.dir, &content, config.file_mode) {
        Ok(dir) => {
            info!(resource_version = %version, files = content.len(), version_dir = %dir, "wrote {what}");
            let mut s = status.lock().unwrap();
            s.written = Some((version, keys));
            s.ready_again(what);
        }
        // Not ready until a write succeeds; the next change (or re-list) tries again.
        Err(err) => report(status, format!("could not write {what} to {}: {err}", config.dir.display())),
    }
}

/// The Secret's keys as text (a target Secret holds only text).
fn texts(secret: &Secret) -> BTreeMap<String, String> {
    let data = secret.data.iter().flatten();
    data.filter_map(|(k, v)| String::from_utf8(v.0.clone()).ok().map(|v| (k.clone(), v))).collect()
}

/// Records a problem (once per distinct message on stderr) and turns the probe to not ready.
fn report(status: &Shared, problem: String) {
    let mut s = status.lock().unwrap();
    if s.problem.as_deref() != Some(problem.as_str()) {
        error!("{problem}");
        s.problem = Some(problem);
    }
}

fn forbidden(err: &watcher::Error) -> bool {
    let kube_err = match err {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            e
        }
        watcher::Error::WatchError(status) => return status.code == 403,
        _ => return false,
    };
    matches!(kube_err, kube::Error::Api(status) if status.code == 403)
}

async fn readyz(State(status): State<Shared>) -> impl IntoResponse {
    let s = status.lock().unwrap();
    match (&s.written, &s.problem) {
        (Some(_), None) => (StatusCode::OK, "ok\n".to_owned()),
        (_, Some(problem)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n")),
        (None, None) => (StatusCode::SERVICE_UNAVAILABLE, "no token written yet\n".to_owned()),
    }
}

/// The token for an application that re-fetches it (say, after a 401). Never cached by a proxy.
async fn token(State(status): State<Shared>) -> impl IntoResponse {
    let s = status.lock().unwrap();
    let Some((_, keys)) = &s.written else {
        return (StatusCode::SERVICE_UNAVAILABLE, NO_STORE_JSON, "{}".to_owned());
    };
    let body = serde_json::json!({
        "access_token": keys.get("access_token"),
        "token_type": keys.get("token_type"),
        "expires_at": keys.get("expires_at"),
    });
    (StatusCode::OK, NO_STORE_JSON, body.to_string())
}

const NO_STORE_JSON: [(header::HeaderName, &str); 2] =
    [(header::CACHE_CONTROL, "no-store"), (header::CONTENT_TYPE, "application/json")];
