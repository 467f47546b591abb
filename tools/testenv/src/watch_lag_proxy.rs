//! A TLS-terminating HTTP proxy in front of the kube-apiserver that can deliver the watch events of
//! one resource late: each chunk of such a watch reaches the client `lag` after the apiserver sent
//! it, in order, while every other request and watch passes at once. That is a client whose watch
//! of one resource lags its other watches (a slow connection, events queued behind a burst), which
//! Kubernetes allows: watches of different resources are not ordered with each other.
//!
//! The client's bearer token passes through; the proxy serves its own certificate (see
//! [`WatchLagProxy::ca_pem`]) and trusts the apiserver's CA upstream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use crate::certs::TestCa;
use crate::recording_proxy::{TlsListener, strip_hop_by_hop};

pub struct WatchLagProxy {
    port: u16,
    ca_pem: String,
    lag_ms: Arc<AtomicU64>,
    lagged: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

struct Upstream {
    base: url::Url,
    client: reqwest::Client,
    /// The resource (plural, e.g. `wgtwogrants`) whose watches lag.
    resource: String,
    lag_ms: Arc<AtomicU64>,
    /// Chunks passed on later than they arrived.
    lagged: Arc<AtomicU64>,
}

impl WatchLagProxy {
    /// Proxies to the apiserver at `upstream` (`https://127.0.0.1:PORT`, serving with `upstream_ca_pem`);
    /// watches of `resource` lag by what [`Self::set_lag`] says (nothing at first).
    pub fn start(upstream: &str, upstream_ca_pem: &str, resource: &str) -> anyhow::Result<Self> {
        let ca = TestCa::new("watch-lag-proxy")?;
        let serving = ca.loopback_server("watch-lag-proxy")?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let tls = TlsListener::new(listener, &serving.cert_pem, &serving.key_pem)?;
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(upstream_ca_pem.as_bytes())?)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let (lag_ms, lagged) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let up = Upstream {
            base: url::Url::parse(upstream)?,
            client,
            resource: resource.to_owned(),
            lag_ms: lag_ms.clone(),
            lagged: lagged.clone(),
        };
        let app = Router::new().fallback(forward).with_state(Arc::new(up));
        let task = tokio::spawn(async move {
            let _ = axum::serve(tls, app).await;
        });
        Ok(Self { port, ca_pem: ca.pem(), lag_ms, lagged, task })
    }

    /// From now on, every chunk a watch of the resource receives is passed on `lag` after it arrived
    /// (zero: at once). Chunks already waiting keep the lag they arrived with.
    pub fn set_lag(&self, lag: Duration) {
        self.lag_ms.store(lag.as_millis() as u64, Ordering::SeqCst);
    }

    /// How many watch chunks so far were passed on late (so a test knows its lag took effect).
    pub fn lagged_chunks(&self) -> u64 {
        self.lagged.load(Ordering::SeqCst)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA of the proxy's serving certificate, for the client's kubeconfig.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
}

impl Drop for WatchLagProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a request is a watch of `resource` (`.../<resource>?watch=true`, also `watch=1`).
fn is_watch_of(uri: &axum::http::Uri, resource: &str) -> bool {
    let watching = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .any(|(k, v)| k == "watch" && (v == "true" || v == "1"));
    watching && uri.path().rsplit('/').next() == Some(resource)
}

async fn forward(State(up): State<Arc<Upstream>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 16 << 20).await else {
        return (StatusCode::BAD_REQUEST, "body too large").into_response();
    };
    let lagged = is_watch_of(&parts.uri, &up.resource);
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let url = match up.base.join(path_and_query) {
        Ok(url) => url,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    let answer = match up.client.request(parts.method, url).headers(headers).body(body).send().await {
        Ok(answer) => answer,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("upstream: {e}")).into_response(),
    };
    let status = answer.status();
    let mut headers = answer.headers().clone();
    strip_hop_by_hop(&mut headers);
    headers.remove(header::CONTENT_LENGTH);
    let chunks = answer.bytes_stream();
    let body = match lagged {
        false => Body::from_stream(chunks),
        true => {
            // Each chunk is stamped when it arrives and released once its lag has passed; a reader
            // task keeps receiving meanwhile, so later chunks are not delayed by earlier ones' wait.
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let (lag_ms, lagged) = (up.lag_ms.clone(), up.lagged.clone());
            tokio::spawn(async move {
                let mut chunks = chunks;
                loop {
                    // Ends with the client's body too (the upstream watch is then closed).
                    let chunk = tokio::select! {
                        chunk = chunks.next() => chunk,
                        _ = tx.closed() => None,
                    };
                    let Some(chunk) = chunk else { return };
                    let lag = Duration::from_millis(lag_ms.load(Ordering::SeqCst));
                    if tx.send((Instant::now() + lag, !lag.is_zero(), chunk)).is_err() {
                        return;
                    }
                }
            });
            let released = futures::stream::unfold((rx, lagged), |(mut rx, lagged)| async move {
                let (due, late, chunk) = rx.recv().await?;
                tokio::time::sleep_until(due.into()).await;
                if late {
                    lagged.fetch_add(1, Ordering::SeqCst);
                }
                Some((chunk, (rx, lagged)))
            });
            Body::from_stream(released)
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_watch_of_the_resource_lags() {
        let uri = |s: &str| s.parse::<axum::http::Uri>().unwrap();
        let resource = "wgtwogrants";
        assert!(is_watch_of(&uri("/apis/auth.wgtwo.com/v1/wgtwogrants?watch=true&resourceVersion=5"), resource));
        assert!(is_watch_of(&uri("/apis/auth.wgtwo.com/v1/namespaces/a/wgtwogrants?watch=1"), resource));
        assert!(!is_watch_of(&uri("/apis/auth.wgtwo.com/v1/wgtwogrants?limit=500"), resource));
        assert!(!is_watch_of(&uri("/apis/auth.wgtwo.com/v1/namespaces/a/wgtwogrants/alice"), resource));
        assert!(!is_watch_of(&uri("/api/v1/secrets?watch=true"), resource));
        assert!(!is_watch_of(&uri("/apis/auth.wgtwo.com/v1/wgtwogrants?watch=false"), resource));
    }
}
