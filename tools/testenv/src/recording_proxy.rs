//! A TLS-terminating HTTP proxy in front of Hydra's public endpoint that records every refresh
//! token presented to the token endpoint (as a digest, with when it arrived and what Hydra
//! answered) and every token request (grant type, client, scope, answer), and can hold token
//! answers back.
//!
//! Why: Hydra refuses a refresh token presented a second time only when the two requests do not
//! overlap (its SQLite store lets two concurrent uses both succeed), so "Hydra refused nothing"
//! does not prove "no refresh token was presented twice" once requests are concurrent. The proxy
//! sees every presentation and so proves it directly. Holding answers back widens the window in
//! which a token has been rotated at Hydra but the client has not yet heard of it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// One refresh token presented to the token endpoint.
#[derive(Clone, Debug)]
pub struct Presentation {
    /// sha256 of the refresh token, hex.
    pub digest: String,
    pub arrived: Instant,
    /// When Hydra answered and with which status; `None` while in flight (or if Hydra never did).
    pub answered: Option<(Instant, u16)>,
    /// The `error` and `error_description` of an error answer.
    pub error: Option<String>,
}

/// Presentations of a refresh token that Hydra had already accepted, or that overlapped an earlier
/// presentation of the same token still in flight: each is a refresh token presented twice. A
/// token presented again after Hydra answered an error (nothing was rotated: a 5xx, a 429, an
/// `invalid_client` fixed since) is a legitimate retry.
pub fn reuses(presented: &[Presentation]) -> Vec<String> {
    reuse_pairs(presented).into_iter().map(|(_, _, why)| why).collect()
}

/// [`reuses`] with the indexes of the earlier and the later presentation of each.
pub fn reuse_pairs(presented: &[Presentation]) -> Vec<(usize, usize, String)> {
    let mut found = Vec::new();
    for (j, later) in presented.iter().enumerate() {
        for (i, earlier) in presented[..j].iter().enumerate().filter(|(_, e)| e.digest == later.digest) {
            let why = match earlier.answered {
                Some((at, status)) if at <= later.arrived && !(200..300).contains(&status) => continue,
                Some((at, status)) if at <= later.arrived => format!("after Hydra accepted it ({status})"),
                _ => "while an earlier presentation was in flight".to_owned(),
            };
            found.push((i, j, format!("refresh token sha256:{} presented again {why}", &later.digest[..12])));
        }
    }
    found
}

/// One request to the token endpoint, as the proxy saw it (no secret: the client id only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    pub grant_type: String,
    /// From HTTP Basic authentication (or the form, for clients that post it).
    pub client_id: Option<String>,
    pub scope: Option<String>,
    /// Hydra's answer; `None` while in flight.
    pub status: Option<u16>,
}

#[derive(Default)]
struct Shared {
    presented: Mutex<Vec<Presentation>>,
    requests: Mutex<Vec<TokenRequest>>,
    /// Milliseconds to hold each token answer before passing it on.
    hold_ms: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Requests for the issuer's signing keys (the JWKS), and how to answer them.
    key_set_requests: AtomicUsize,
    key_set_hold_ms: AtomicU64,
    key_set_fails: std::sync::atomic::AtomicBool,
}

/// Hydra's `jwks_uri`.
const KEY_SET_PATH: &str = "/.well-known/jwks.json";

pub struct RecordingProxy {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingProxy {
    /// Serves TLS on `listener` with `cert_pem`/`key_pem` and forwards to `upstream` (an https base
    /// URL) with `client`, which must trust the upstream's CA and not follow redirects.
    pub fn start(
        listener: std::net::TcpListener,
        cert_pem: &str,
        key_pem: &str,
        upstream: url::Url,
        client: reqwest::Client,
    ) -> anyhow::Result<Self> {
        let tls = TlsListener::new(listener, cert_pem, key_pem)?;
        let shared = Arc::new(Shared::default());
        let app = Router::new().fallback(forward).with_state((shared.clone(), Arc::new(Upstream { upstream, client })));
        let task = tokio::spawn(async move {
            let _ = axum::serve(tls, app).await;
        });
        Ok(Self { shared, task })
    }

    /// Every refresh token presented so far, in arrival order.
    pub fn presentations(&self) -> Vec<Presentation> {
        self.shared.presented.lock().unwrap().clone()
    }

    /// Every token request so far, in arrival order.
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Each refresh token presented twice so far (see [`reuses`]).
    pub fn refresh_tokens_presented_twice(&self) -> Vec<String> {
        reuses(&self.presentations())
    }

    /// Holds each token answer this long after Hydra gave it (zero: pass on at once).
    pub fn hold_token_answers(&self, hold: Duration) {
        self.shared.hold_ms.store(hold.as_millis() as u64, Ordering::SeqCst);
    }

    /// Holds each answer to a request for the signing keys this long (zero: at once).
    pub fn hold_key_set(&self, hold: Duration) {
        self.shared.key_set_hold_ms.store(hold.as_millis() as u64, Ordering::SeqCst);
    }

    /// Answers requests for the signing keys with a 503 (after any hold) while `fail` is set.
    pub fn fail_key_set(&self, fail: bool) {
        self.shared.key_set_fails.store(fail, Ordering::SeqCst);
    }

    /// Requests for the signing keys so far.
    pub fn key_set_requests(&self) -> usize {
        self.shared.key_set_requests.load(Ordering::SeqCst)
    }

    /// Token requests sent on to Hydra whose answer has not yet been passed back.
    pub fn token_requests_in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// The most token requests in flight at once so far.
    pub fn max_token_requests_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Upstream {
    upstream: url::Url,
    client: reqwest::Client,
}

/// Decrements the in-flight count also when the client goes away mid-request (axum drops the
/// handler future then).
struct InFlight(Arc<Shared>);

impl InFlight {
    fn enter(shared: &Arc<Shared>) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn forward(State((shared, up)): State<(Arc<Shared>, Arc<Upstream>)>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return (StatusCode::BAD_REQUEST, "body too large").into_response();
    };
    let is_token = parts.uri.path() == "/oauth2/token";
    if parts.uri.path() == KEY_SET_PATH {
        shared.key_set_requests.fetch_add(1, Ordering::SeqCst);
        let hold = shared.key_set_hold_ms.load(Ordering::SeqCst);
        if hold > 0 {
            tokio::time::sleep(Duration::from_millis(hold)).await;
        }
        if shared.key_set_fails.load(Ordering::SeqCst) {
            return (StatusCode::SERVICE_UNAVAILABLE, "key set unavailable (test)").into_response();
        }
    }
    let _in_flight = is_token.then(|| InFlight::enter(&shared));
    let request = is_token.then(|| {
        let mut requests = shared.requests.lock().unwrap();
        requests.push(token_request(&parts.headers, &body));
        requests.len() - 1
    });
    let presentation = is_token.then(|| refresh_token_in(&body)).flatten().map(|token| {
        let digest = crate::sha256_hex(&token);
        let mut presented = shared.presented.lock().unwrap();
        presented.push(Presentation { digest, arrived: Instant::now(), answered: None, error: None });
        presented.len() - 1
    });
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let url = match up.upstream.join(path_and_query.trim_start_matches('/')) {
        Ok(url) => url,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    let sent = up.client.request(parts.method, url).headers(headers).body(body).send().await;
    let answer = match sent {
        Ok(answer) => answer,
        Err(e) => {
            // What the client sees: the proxy's own 502.
            if let Some(i) = request {
                shared.requests.lock().unwrap()[i].status = Some(StatusCode::BAD_GATEWAY.as_u16());
            }
            return (StatusCode::BAD_GATEWAY, format!("upstream: {e}")).into_response();
        }
    };
    let status = answer.status();
    let answered = Instant::now();
    let mut headers = answer.headers().clone();
    let body: Bytes = match answer.bytes().await {
        Ok(body) => body,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("upstream body: {e}")).into_response(),
    };
    if let Some(i) = request {
        shared.requests.lock().unwrap()[i].status = Some(status.as_u16());
    }
    if let Some(i) = presentation {
        let error = (!status.is_success()).then(|| error_in(&body));
        let mut presented = shared.presented.lock().unwrap();
        presented[i].answered = Some((answered, status.as_u16()));
        presented[i].error = error;
    }
    let hold = shared.hold_ms.load(Ordering::SeqCst);
    if is_token && hold > 0 {
        tokio::time::sleep(Duration::from_millis(hold)).await;
    }
    strip_hop_by_hop(&mut headers);
    headers.remove(header::CONTENT_LENGTH);
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn refresh_token_in(form: &[u8]) -> Option<String> {
    let pairs: HashMap<String, String> = url::form_urlencoded::parse(form).into_owned().collect();
    (pairs.get("grant_type").map(String::as_str) == Some("refresh_token"))
        .then(|| pairs.get("refresh_token").cloned())
        .flatten()
}

fn token_request(headers: &HeaderMap, form: &[u8]) -> TokenRequest {
    let pairs: HashMap<String, String> = url::form_urlencoded::parse(form).into_owned().collect();
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64.trim()).ok())
        .and_then(|raw| String::from_utf8(raw).ok())
        // RFC 6749 2.3.1: the id is form-encoded before it is joined with the secret.
        .and_then(|pair| pair.split_once(':').map(|(id, _)| id.to_owned()))
        .and_then(|id| url::form_urlencoded::parse(format!("x={id}").as_bytes()).next().map(|(_, v)| v.into_owned()));
    TokenRequest {
        grant_type: pairs.get("grant_type").cloned().unwrap_or_default(),
        client_id: basic.or_else(|| pairs.get("client_id").cloned()),
        scope: pairs.get("scope").cloned(),
        status: None,
    }
}

/// An OAuth error answer's `error: error_description` (never a token: error answers carry none).
fn error_in(body: &[u8]) -> String {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let field = |name: &str| json.get(name).and_then(|v| v.as_str()).unwrap_or("").to_owned();
    format!("{}: {}", field("error"), field("error_description"))
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in [header::CONNECTION, header::TRANSFER_ENCODING, header::TE, header::TRAILER, header::UPGRADE] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}

/// Completes the TLS handshake before axum sees the connection. Handshakes run one at a time;
/// that is fine for a test proxy, and a stuck one gives up after a few seconds.
/// A TLS listener for axum (rustls, one certificate).
pub(crate) struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
}

impl TlsListener {
    pub(crate) fn new(listener: std::net::TcpListener, cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        listener.set_nonblocking(true)?;
        let tls = TlsListener {
            tcp: tokio::net::TcpListener::from_std(listener)?,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        };
        Ok(tls)
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let handshake = tokio::time::timeout(Duration::from_secs(5), self.acceptor.accept(tcp));
            if let Ok(Ok(tls)) = handshake.await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refresh_grant_presents_a_refresh_token() {
        assert_eq!(refresh_token_in(b"grant_type=refresh_token&refresh_token=a%2Bb").as_deref(), Some("a+b"));
        assert_eq!(refresh_token_in(b"grant_type=authorization_code&code=x&refresh_token=y"), None);
        assert_eq!(refresh_token_in(b"grant_type=refresh_token"), None);
    }

    #[test]
    fn a_token_request_names_its_grant_type_client_and_scope_and_never_the_secret() {
        let mut headers = HeaderMap::new();
        let basic = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "my%20client:s3cret");
        headers.insert(header::AUTHORIZATION, format!("Basic {basic}").parse().unwrap());
        let request = token_request(&headers, b"grant_type=client_credentials&scope=a+b");
        assert_eq!(request.grant_type, "client_credentials");
        assert_eq!(request.client_id.as_deref(), Some("my client"));
        assert_eq!(request.scope.as_deref(), Some("a b"));
        assert!(!format!("{request:?}").contains("s3cret"));
    }

    fn presented(digest: &str, arrived: Instant, answered: Option<(Instant, u16)>) -> Presentation {
        Presentation { digest: format!("{digest:0<64}"), arrived, answered, error: None }
    }

    #[test]
    fn a_token_presented_again_after_acceptance_or_while_in_flight_is_a_reuse_and_a_retry_after_an_error_is_not() {
        let t = Instant::now();
        let s = |n: u64| t + Duration::from_secs(n);
        let distinct = [presented("a", s(0), Some((s(1), 200))), presented("b", s(0), Some((s(1), 200)))];
        assert!(reuses(&distinct).is_empty());
        let retried_after_500 = [presented("a", s(0), Some((s(1), 500))), presented("a", s(2), Some((s(3), 200)))];
        assert!(reuses(&retried_after_500).is_empty());
        let after_success = [presented("a", s(0), Some((s(1), 200))), presented("a", s(2), Some((s(3), 400)))];
        assert_eq!(reuses(&after_success).len(), 1);
        let after_invalid_client = [presented("a", s(0), Some((s(1), 401))), presented("a", s(2), Some((s(3), 200)))];
        assert!(reuses(&after_invalid_client).is_empty());
        let overlapping = [presented("a", s(0), Some((s(2), 200))), presented("a", s(1), Some((s(2), 200)))];
        assert_eq!(reuses(&overlapping).len(), 1);
        let overlapping_a_5xx = [presented("a", s(0), Some((s(2), 500))), presented("a", s(1), Some((s(2), 200)))];
        assert_eq!(reuses(&overlapping_a_5xx).len(), 1);
        let never_answered = [presented("a", s(0), None), presented("a", s(5), Some((s(6), 200)))];
        assert_eq!(reuses(&never_answered).len(), 1);
    }
}
