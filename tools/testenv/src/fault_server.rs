//! A small stub identity service for faults a real Hydra cannot be made to produce on demand: 5xx,
//! 429 with Retry-After, a slow answer, a malformed or broken-off body; and for a provider that, unlike Hydra,
//! issues no ID token and tells the phone number only from userinfo. It serves a minimal discovery document so
//! the client under test takes its normal path, and counts token requests.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

/// One answer of the token endpoint.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Any status with a body and optional Retry-After.
    Status { status: u16, retry_after: Option<String>, body: String },
    /// Wait this long, then answer with a valid token response.
    Delay(Duration),
    /// 200 with a body that is not a token response.
    Malformed(String),
    /// 200, and the body breaks off after its first bytes (the connection is dropped mid-answer).
    BrokenBody,
}

/// What the client sent to the token endpoint.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub authorization: Option<String>,
    pub form: Vec<(String, String)>,
}

#[derive(Default)]
struct Shared {
    faults: Mutex<VecDeque<Fault>>,
    token_requests: AtomicUsize,
    userinfo_requests: AtomicUsize,
    last: Mutex<Option<TokenRequest>>,
}

/// The phone number the stub's userinfo endpoint returns.
pub const USERINFO_PHONE_NUMBER: &str = "+4712345678";

pub struct FaultServer {
    base: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultServer {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_token_endpoint(None).await
    }

    /// Like `start`, but discovery announces `token_endpoint` (e.g. a closed port).
    pub async fn start_with_token_endpoint(token_endpoint: Option<String>) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Shared::default());
        let token_endpoint = token_endpoint.unwrap_or_else(|| format!("{base}/oauth2/token"));
        let app = discovery_routes(&base, &token_endpoint)
            .route("/oauth2/token", post(token))
            .route("/userinfo", get(userinfo))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { base, shared, task })
    }

    /// The issuer base URL (no trailing slash).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Queues answers for the next token requests; after them, requests succeed.
    pub fn push(&self, fault: Fault) {
        self.shared.faults.lock().unwrap().push_back(fault);
    }

    pub fn token_requests(&self) -> usize {
        self.shared.token_requests.load(Ordering::SeqCst)
    }

    pub fn userinfo_requests(&self) -> usize {
        self.shared.userinfo_requests.load(Ordering::SeqCst)
    }

    /// The last token request received.
    pub fn last_token_request(&self) -> Option<TokenRequest> {
        self.shared.last.lock().unwrap().clone()
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A minimal OpenID Connect discovery document (and an empty key set) for a stub issuer at `base`.
pub(crate) fn discovery_routes<S: Clone + Send + Sync + 'static>(base: &str, token_endpoint: &str) -> Router<S> {
    let discovery = json!({
        "issuer": format!("{base}/"),
        "authorization_endpoint": format!("{base}/oauth2/auth"),
        "token_endpoint": token_endpoint,
        "userinfo_endpoint": format!("{base}/userinfo"),
        "revocation_endpoint": format!("{base}/oauth2/revoke"),
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    });
    Router::new()
        .route("/.well-known/openid-configuration", get(move || async move { axum::Json(discovery) }))
        .route("/.well-known/jwks.json", get(|| async { axum::Json(json!({"keys": []})) }))
}

async fn userinfo(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    shared.userinfo_requests.fetch_add(1, Ordering::SeqCst);
    let bearer = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !bearer.starts_with("Bearer stub-access-") {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    axum::Json(json!({"sub": "stub-subject", "phone_number": USERINFO_PHONE_NUMBER, "phone_number_verified": true}))
        .into_response()
}

async fn token(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let n = shared.token_requests.fetch_add(1, Ordering::SeqCst);
    *shared.last.lock().unwrap() = Some(TokenRequest {
        authorization: headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned),
        form: url::form_urlencoded::parse(&body).into_owned().collect(),
    });
    let fault = shared.faults.lock().unwrap().pop_front();
    let ok = || {
        axum::Json(json!({
            "access_token": format!("stub-access-{n}"),
            "refresh_token": format!("stub-refresh-{n}"),
            "token_type": "bearer",
            "expires_in": 3600,
            "scope": "phone offline_access",
        }))
        .into_response()
    };
    match fault {
        None => ok(),
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            ok()
        }
        Some(Fault::Malformed(body)) => {
            ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Some(Fault::BrokenBody) => {
            let chunks: Vec<Result<&'static str, std::io::Error>> =
                vec![Ok(r#"{"access_token": "stub-access-cut", "refresh_tok"#), Err(std::io::Error::other("cut"))];
            // The error only after the head and the first bytes went out.
            let chunks = futures::StreamExt::then(futures::stream::iter(chunks), |chunk| async move {
                if chunk.is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                chunk
            });
            let body = axum::body::Body::from_stream(chunks);
            ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Some(Fault::Status { status, retry_after, body }) => {
            let mut headers = HeaderMap::new();
            headers.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if let Some(value) = retry_after {
                headers.insert(axum::http::header::RETRY_AFTER, HeaderValue::from_str(&value).unwrap());
            }
            (StatusCode::from_u16(status).unwrap(), headers, body).into_response()
        }
    }
}
