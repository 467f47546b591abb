//! A fast in-memory identity service for the scale benchmark: discovery, and a token endpoint that
//! rotates refresh tokens the way Hydra does (a used refresh token is refused with `invalid_grant`).
//! Correctness is proven against Hydra elsewhere; this only has to be fast and to count. It also
//! counts reuses, so a benchmark run that presented a rotated token again says so.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

/// Refresh tokens with this prefix are accepted once without having been issued here: they are the
/// subscribers' authorizations the benchmark puts into Secrets.
pub const USER_TOKEN_PREFIX: &str = "bench-user-";

#[derive(Default)]
struct Shared {
    /// Issued and not yet used.
    live: Mutex<HashSet<String>>,
    /// Used once already (user tokens and rotated ones).
    used: Mutex<HashSet<String>>,
    requests: AtomicUsize,
    reused: AtomicUsize,
    /// The user token each issued refresh token descends from.
    roots: Mutex<HashMap<String, String>>,
    /// The user tokens of the lineages a reuse ended.
    ended: Mutex<Vec<String>>,
    serial: AtomicU64,
    expires_in: u64,
}

pub struct RotatingTokenServer {
    base: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    ca_pem: Option<String>,
}

impl RotatingTokenServer {
    /// Serves on loopback (plain HTTP); access tokens live `expires_in` seconds.
    pub async fn start(expires_in: u64) -> anyhow::Result<Self> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST, expires_in).await
    }

    /// Serves HTTPS on `ip` (e.g. [`crate::cluster::HOST_IP`], for an operator in a pod: a grant's
    /// issuer may be plain http only on loopback) with a certificate of its own CA ([`Self::ca_pem`]).
    pub async fn start_tls_on(ip: std::net::Ipv4Addr, expires_in: u64) -> anyhow::Result<Self> {
        let ca = crate::certs::TestCa::new("wgtwo-testenv-token-server-ca")?;
        let serving = ca.server("token-server", &[&ip.to_string()])?;
        let listener = std::net::TcpListener::bind((ip, 0))?;
        let base = format!("https://{}", listener.local_addr()?);
        let tls = crate::recording_proxy::TlsListener::new(listener, &serving.cert_pem, &serving.key_pem)?;
        let (shared, app) = Self::app(&base, expires_in);
        let task = tokio::spawn(async move {
            let _ = axum::serve(tls, app).await;
        });
        Ok(Self { base, shared, task, ca_pem: Some(ca.pem()) })
    }

    /// The CA of a [`Self::start_tls_on`] server.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    fn app(base: &str, expires_in: u64) -> (Arc<Shared>, axum::Router) {
        let shared = Arc::new(Shared { expires_in, ..Default::default() });
        let app = crate::fault_server::discovery_routes(base, &format!("{base}/oauth2/token"))
            // Known to have no phone number, so the operator does not ask after every refresh.
            .route("/userinfo", get(|| async { axum::Json(json!({"sub": "bench"})) }))
            .route("/oauth2/token", post(token))
            .with_state(shared.clone());
        (shared, app)
    }

    async fn start_on(ip: std::net::Ipv4Addr, expires_in: u64) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (shared, app) = Self::app(&base, expires_in);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { base, shared, task, ca_pem: None })
    }

    /// The issuer base URL (no trailing slash).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn token_requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Refresh tokens presented again after they were used: each is a grant a real identity
    /// service would have ended.
    pub fn reused(&self) -> usize {
        self.shared.reused.load(Ordering::SeqCst)
    }

    /// The user tokens (`USER_TOKEN_PREFIX…`) of the lineages a reuse ended, in order.
    pub fn ended_lineages(&self) -> Vec<String> {
        self.shared.ended.lock().unwrap().clone()
    }
}

impl Drop for RotatingTokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn invalid_grant() -> Response {
    (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "invalid_grant"}))).into_response()
}

async fn token(State(shared): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if field("grant_type").as_deref() != Some("refresh_token") {
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "unsupported_grant_type"}))).into_response();
    }
    let Some(presented) = field("refresh_token") else { return invalid_grant() };
    let known = shared.live.lock().unwrap().remove(&presented);
    let first_use = shared.used.lock().unwrap().insert(presented.clone());
    let accepted = known || (first_use && presented.starts_with(USER_TOKEN_PREFIX));
    if !accepted {
        if !first_use {
            shared.reused.fetch_add(1, Ordering::SeqCst);
            let root = shared.roots.lock().unwrap().get(&presented).cloned().unwrap_or(presented);
            shared.ended.lock().unwrap().push(root);
        }
        return invalid_grant();
    }
    let n = shared.serial.fetch_add(1, Ordering::SeqCst);
    // As long as Hydra's opaque tokens, so the memory a token takes is realistic.
    let refresh = format!("ory_rt_bench{n:020}{}", "r".repeat(55));
    let access = format!("ory_at_bench{n:020}{}", "a".repeat(55));
    shared.live.lock().unwrap().insert(refresh.clone());
    let mut roots = shared.roots.lock().unwrap();
    let root = roots.get(&presented).cloned().unwrap_or(presented);
    roots.insert(refresh.clone(), root);
    drop(roots);
    axum::Json(json!({
        "access_token": access,
        "refresh_token": refresh,
        "token_type": "bearer",
        "expires_in": shared.expires_in,
        // wgtwo gives the phone number in the ID token (scope openid); this stub signs none, so it
        // grants no `phone` and the operator knows there is no number without asking userinfo. The
        // Kubernetes writes per refresh are the same as with wgtwo's ID token.
        "scope": "offline_access",
    }))
    .into_response()
}
