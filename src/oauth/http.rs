//! The HTTP client that oauth2-rs and openidconnect-rs call through. It adds what they drop: the
//! HTTP status and `Retry-After` of a failed answer, and whether a failed request was ever sent.
//! Redirects are never followed (a token endpoint that redirects is misconfigured or hostile).

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use oauth2::{AsyncHttpClient, HttpRequest, HttpResponse};

use super::error::{OAuthError, parse_retry_after};

/// Why an HTTP exchange failed before oauth2-rs could read an answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpFailure {
    /// A non-2xx answer without an OAuth error body, or any 5xx/429.
    #[error("HTTP {status}")]
    Status { status: u16, retry_after: Option<Duration> },
    /// No complete answer. `sent` is false only when the connection was never established.
    #[error("{message}")]
    Transport { message: String, sent: bool },
    /// A 2xx status, and then the body broke off: the server did what was asked (for a refresh:
    /// rotated the token), and its answer is lost.
    #[error("the answer broke off after HTTP {status}: {message}")]
    BodyLost { status: u16, message: String },
}

impl HttpFailure {
    pub(crate) fn into_oauth(self, operation: &'static str) -> OAuthError {
        match self {
            HttpFailure::Status { status, retry_after } => OAuthError::Status { operation, status, retry_after },
            HttpFailure::Transport { message, sent } => OAuthError::Transport { operation, message, sent },
            failure @ HttpFailure::BodyLost { .. } => {
                OAuthError::Transport { operation, message: failure.to_string(), sent: true }
            }
        }
    }
}

pub struct HttpClient {
    inner: reqwest::Client,
}

impl HttpClient {
    /// `timeout` bounds each whole request; `ca_bundle_pem` adds trusted roots (PEM, one or more
    /// certificates) to the built-in web PKI roots.
    pub fn new(timeout: Duration, ca_bundle_pem: Option<&[u8]>) -> Result<Self, OAuthError> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("wgtwo-operator/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_bundle_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| OAuthError::Invalid(format!("CA bundle: {e}")))?;
            if certs.is_empty() {
                return Err(OAuthError::Invalid("CA bundle holds no PEM certificate".into()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let inner = builder.build().map_err(|e| OAuthError::Invalid(format!("HTTP client: {e}")))?;
        Ok(Self { inner })
    }

    pub(crate) async fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpFailure> {
        let request = reqwest::Request::try_from(request).map_err(transport)?;
        let response = self.inner.execute(request).await.map_err(transport)?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(|err| match (status.is_success(), transport(err)) {
            (true, HttpFailure::Transport { message, .. }) => {
                HttpFailure::BodyLost { status: status.as_u16(), message }
            }
            (_, failure) => failure,
        })?;
        let oauth_error_body =
            || serde_json::from_slice::<serde_json::Value>(&body).is_ok_and(|v| v["error"].is_string());
        if status.is_server_error() || status.as_u16() == 429 || (!status.is_success() && !oauth_error_body()) {
            let retry_after = headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            return Err(HttpFailure::Status { status: status.as_u16(), retry_after });
        }
        let mut response = http::Response::builder().status(status);
        if let Some(h) = response.headers_mut() {
            *h = headers;
        }
        response.body(body.to_vec()).map_err(|e| HttpFailure::Transport { message: e.to_string(), sent: true })
    }
}

impl<'c> AsyncHttpClient<'c> for HttpClient {
    type Error = HttpFailure;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpFailure>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.send(request))
    }
}

/// The error and its causes on one line ("error sending request: operation timed out"). reqwest
/// puts the URL in its message; our URLs never carry secrets (those travel in headers and bodies).
fn transport(err: reqwest::Error) -> HttpFailure {
    let sent = !err.is_connect() && !err.is_builder();
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    HttpFailure::Transport { message, sent }
}
