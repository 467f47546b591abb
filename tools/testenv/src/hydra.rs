//! Ory Hydra (the server behind id.wgtwo.com) on loopback with an in-memory SQLite store, its public
//! endpoints over TLS (as wgtwo's are) with a test CA that clients must be given, plus a
//! driver that plays the subscriber: it walks the authorization code flow through Hydra's public
//! endpoints and accepts the login and consent through Hydra's admin API, the way wgtwo's login
//! app does after the SMS PIN check.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use rand::Rng;
use serde_json::{Value, json};
use url::Url;

use crate::certs::TestCa;
use crate::process::{ChildGuard, wait_until};
use crate::recording_proxy::RecordingProxy;
use crate::{binaries, free_port};

/// Token lifetimes and other knobs of a Hydra instance.
#[derive(Clone, Debug)]
pub struct HydraOptions {
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    pub id_token_ttl: Duration,
    /// Keep the store in an SQLite file instead of memory, so [`Hydra::stop`] and
    /// [`Hydra::restart`] lose nothing.
    pub persistent: bool,
    /// `oauth2.grant.refresh_token.rotation_grace_period`: how long a used refresh token stays
    /// valid (Hydra's default, and wgtwo's as far as we know: zero).
    pub refresh_token_grace_period: Duration,
    /// Put a [`RecordingProxy`] in front of the public endpoint (Hydra's issuer and public URLs name
    /// the proxy), so a test can see every refresh token presented and hold answers back.
    pub recording_proxy: bool,
    /// The address the public endpoint (or its recording proxy) listens on and is named by:
    /// loopback, or [`crate::cluster::HOST_IP`] for an operator in a pod.
    pub public_ip: std::net::Ipv4Addr,
}

impl Default for HydraOptions {
    /// What id.wgtwo.com issues: one-hour access tokens.
    fn default() -> Self {
        Self {
            access_token_ttl: Duration::from_secs(3600),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            id_token_ttl: Duration::from_secs(3600),
            persistent: false,
            refresh_token_grace_period: Duration::ZERO,
            recording_proxy: false,
            public_ip: std::net::Ipv4Addr::LOCALHOST,
        }
    }
}

/// An OAuth client registered in Hydra.
#[derive(Clone, Debug)]
pub struct OAuthClient {
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uris: Vec<String>,
}

impl OAuthClient {
    /// The Secret a WgtwoGrant's `clientSecretRef` names: keys `client_id` and `client_secret`.
    pub fn kube_secret(&self, name: &str) -> k8s_openapi::api::core::v1::Secret {
        crate::string_secret(name, &[("client_id", &self.client_id), ("client_secret", &self.client_secret)])
    }
}

/// The person completing the SMS login: their user id and phone number.
#[derive(Clone, Debug)]
pub struct Subscriber {
    pub subject: String,
    pub phone_number: String,
}

impl Subscriber {
    pub fn new(subject: &str, phone_number: &str) -> Self {
        Self { subject: subject.to_owned(), phone_number: phone_number.to_owned() }
    }
}

/// Where Hydra finally redirected the browser: the client's redirect URI with `code` and `state`,
/// or with `error` and `error_description`.
#[derive(Clone, Debug)]
pub struct Callback {
    pub url: Url,
}

impl Callback {
    fn param(&self, name: &str) -> Option<String> {
        self.url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
    }
    pub fn code(&self) -> Option<String> {
        self.param("code")
    }
    pub fn state(&self) -> Option<String> {
        self.param("state")
    }
    pub fn error(&self) -> Option<String> {
        self.param("error")
    }
}

pub struct Hydra {
    child: Option<ChildGuard>,
    config: std::path::PathBuf,
    starts: usize,
    public: Url,
    admin: Url,
    ca_pem: String,
    http: reqwest::Client,
    proxy: Option<RecordingProxy>,
    _dir: tempfile::TempDir,
}

impl Hydra {
    pub async fn start(options: HydraOptions) -> anyhow::Result<Self> {
        let dir = crate::temp_dir("wgtwo-hydra-")?;
        let (public_port, admin_port) = (free_port(), free_port());
        let ip = options.public_ip;
        let proxy_listener = if options.recording_proxy { Some(std::net::TcpListener::bind((ip, 0))?) } else { None };
        let public_port_seen = match &proxy_listener {
            Some(listener) => listener.local_addr()?.port(),
            None => public_port,
        };
        let public = Url::parse(&format!("https://{ip}:{public_port_seen}/"))?;
        // The admin API stays plain http on loopback: only the test driver talks to it.
        let admin = Url::parse(&format!("http://127.0.0.1:{admin_port}/"))?;
        let ca = TestCa::new("wgtwo-testenv-hydra-ca")?;
        let serving =
            if ip.is_loopback() { ca.loopback_server("hydra")? } else { ca.server("hydra", &[&ip.to_string()])? };
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert, &serving.cert_pem)?;
        std::fs::write(&key, &serving.key_pem)?;
        let dsn = if options.persistent {
            format!("sqlite://{}?_fk=true&mode=rwc", dir.path().join("hydra.sqlite").display())
        } else {
            "memory".to_owned()
        };
        let config = dir.path().join("hydra.yaml");
        std::fs::write(&config, config_yaml(&dsn, &public, public_port, admin_port, (&cert, &key), &options))?;
        if options.persistent {
            let out = Command::new(binaries::path("hydra"))
                .args(["migrate", "sql", "--read-from-env", "--yes", "--config"])
                .arg(&config)
                .output()?;
            anyhow::ensure!(out.status.success(), "hydra migrate: {}", String::from_utf8_lossy(&out.stderr));
        }
        let ca_pem = ca.pem();
        let http = client_trusting(&ca_pem, false)?;
        let proxy = match proxy_listener {
            Some(listener) => {
                let upstream = Url::parse(&format!("https://127.0.0.1:{public_port}/"))?;
                let forwarding = client_trusting(&ca_pem, false)?;
                Some(RecordingProxy::start(listener, &serving.cert_pem, &serving.key_pem, upstream, forwarding)?)
            }
            None => None,
        };
        let mut hydra = Self { child: None, config, starts: 0, public, admin, ca_pem, http, proxy, _dir: dir };
        hydra.restart().await?;
        Ok(hydra)
    }

    /// Starts the server (again, after [`Hydra::stop`]) and waits until it is ready. Only a
    /// persistent Hydra keeps its clients and tokens across a restart.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "hydra is already running");
        // A start that exits before it is ready (seen once in CI, exit status 1 with no error
        // logged) is tried again: each try keeps its own log.
        for tries_left in (0..3).rev() {
            self.starts += 1;
            let mut cmd = Command::new(binaries::path("hydra"));
            // --dev relaxes checks meant for public deployments.
            cmd.args(["serve", "all", "--dev", "--sqa-opt-out", "--config"]).arg(&self.config);
            let log = self._dir.path().join(format!("hydra-{}.log", self.starts));
            let mut child = ChildGuard::spawn("hydra", cmd, &log)?;
            let ready = [self.admin.join("health/ready")?, self.public.join("health/ready")?];
            let http = &self.http;
            let started = wait_until(&mut child, Duration::from_secs(60), "hydra", || async {
                for url in &ready {
                    if !matches!(http.get(url.clone()).send().await, Ok(r) if r.status().is_success()) {
                        return false;
                    }
                }
                true
            })
            .await;
            match started {
                Ok(()) => {
                    self.child = Some(child);
                    return Ok(());
                }
                Err(err) if tries_left > 0 && child.check_running().is_err() => {
                    eprintln!("testenv: {err:#}\ntestenv: starting hydra again");
                }
                Err(err) => return Err(err),
            }
        }
        unreachable!("the last try returns")
    }

    /// Stops the server (SIGTERM): clients get connection refused until [`Hydra::restart`].
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.terminate(Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// Token endpoint requests served so far (all starts), counted from Hydra's own request log.
    pub fn token_requests(&self) -> usize {
        (1..=self.starts)
            .map(|n| std::fs::read_to_string(self._dir.path().join(format!("hydra-{n}.log"))).unwrap_or_default())
            .map(|log| {
                log.lines()
                    .filter(|l| l.contains("msg=started handling request") && l.contains("path:/oauth2/token "))
                    .count()
            })
            .sum()
    }

    /// The CA certificate (PEM) that the public endpoint's certificate chains to.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The issuer, with the trailing slash that id.wgtwo.com also has (`https://127.0.0.1:PORT/`).
    pub fn issuer_url(&self) -> String {
        self.public.to_string()
    }

    /// The public base URL without the trailing slash, as a user would write `issuerUrl`.
    pub fn base_url(&self) -> String {
        self.public.as_str().trim_end_matches('/').to_owned()
    }

    pub fn token_url(&self) -> String {
        self.public.join("oauth2/token").expect("static path").to_string()
    }

    pub fn admin_url(&self) -> &Url {
        &self.admin
    }

    /// The proxy in front of the public endpoint; only with [`HydraOptions::recording_proxy`].
    pub fn recording_proxy(&self) -> &RecordingProxy {
        self.proxy.as_ref().expect("started with HydraOptions::recording_proxy")
    }

    /// The running server process.
    pub fn process(&mut self) -> &mut ChildGuard {
        self.child.as_mut().expect("hydra is running")
    }

    /// Registers a confidential client (client_secret_basic) for the authorization code, refresh
    /// token and client credentials grants with the scopes wgtwo uses.
    pub async fn create_client(&self, redirect_uris: &[&str]) -> anyhow::Result<OAuthClient> {
        self.create_client_with_grant_types(
            redirect_uris,
            &["authorization_code", "refresh_token", "client_credentials"],
        )
        .await
    }

    /// Like `create_client`, allowed only these grant types.
    pub async fn create_client_with_grant_types(
        &self,
        redirect_uris: &[&str],
        grant_types: &[&str],
    ) -> anyhow::Result<OAuthClient> {
        self.create_client_with(redirect_uris, grant_types, "openid phone offline_access").await
    }

    /// Like `create_client`, allowed only these grant types and these (space-separated) scopes.
    pub async fn create_client_with(
        &self,
        redirect_uris: &[&str],
        grant_types: &[&str],
        scope: &str,
    ) -> anyhow::Result<OAuthClient> {
        let body = json!({
            "client_name": "wgtwo-operator-test",
            "grant_types": grant_types,
            "response_types": ["code"],
            "scope": scope,
            "redirect_uris": redirect_uris,
            "token_endpoint_auth_method": "client_secret_basic",
        });
        let created: Value = self.admin_json(reqwest::Method::POST, "admin/clients", &[], Some(body)).await?;
        Ok(OAuthClient {
            client_id: created["client_id"].as_str().context("no client_id")?.to_owned(),
            client_secret: created["client_secret"].as_str().context("no client_secret")?.to_owned(),
            redirect_uris: redirect_uris.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// Rotates the ID-token signing key: adds a new key to the `hydra.openid.id-token` set (admin
    /// API), which Hydra signs new ID tokens with from then on. Returns its key ID.
    pub async fn rotate_id_token_signing_key(&self) -> anyhow::Result<String> {
        let kid = format!("rotated-{}", rand::rng().random::<u32>());
        let body = json!({"alg": "RS256", "use": "sig", "kid": kid});
        self.admin_json(reqwest::Method::POST, "admin/keys/hydra.openid.id-token", &[], Some(body)).await?;
        Ok(kid)
    }

    /// Hydra's token introspection (admin API): `{"active": bool, "sub": …, "exp": …, …}`.
    pub async fn introspect(&self, token: &str) -> anyhow::Result<Value> {
        let url = self.admin.join("admin/oauth2/introspect")?;
        let resp = self.http.post(url).form(&[("token", token)]).send().await?;
        let status = resp.status();
        anyhow::ensure!(status.is_success(), "introspection failed: {status}");
        Ok(resp.json().await?)
    }

    /// Plays `who` through the authorization URL `auth_url` (built by the client under test):
    /// logs in, consents to every requested scope, and returns the final redirect to the client.
    /// The ID token gets `phone_number` and `phone_number_verified`, as wgtwo's does.
    pub async fn authorize(&self, auth_url: &str, who: &Subscriber) -> anyhow::Result<Callback> {
        // A browser: its own cookie jar, redirects followed by hand so each hop can be inspected.
        let browser = client_trusting(&self.ca_pem, true)?;
        let mut at = Url::parse(auth_url).context("authorization URL")?;
        for _ in 0..10 {
            let location = redirect_location(&browser, &at).await?;
            let param = |name: &str| location.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned());
            at = if let Some(challenge) = param("login_challenge") {
                let body = json!({"subject": who.subject, "remember": false, "acr": "sms"});
                self.accept("login", &challenge, body).await?
            } else if let Some(challenge) = param("consent_challenge") {
                let request: Value = self
                    .admin_json(
                        reqwest::Method::GET,
                        "admin/oauth2/auth/requests/consent",
                        &[("consent_challenge", &challenge)],
                        None,
                    )
                    .await?;
                let body = json!({
                    "grant_scope": request["requested_scope"],
                    "grant_access_token_audience": request["requested_access_token_audience"],
                    "remember": false,
                    "session": {"id_token": {"phone_number": who.phone_number, "phone_number_verified": true}},
                });
                self.accept("consent", &challenge, body).await?
            } else if location.origin() == self.public.origin() {
                location
            } else {
                return Ok(Callback { url: location });
            };
        }
        bail!("authorization flow did not reach the client's redirect URI in 10 hops")
    }

    /// Like [`Hydra::authorize`], but the subscriber refuses to log in (wrong PIN, closed the page):
    /// the callback carries `error=access_denied`.
    pub async fn deny(&self, auth_url: &str) -> anyhow::Result<Callback> {
        let browser = client_trusting(&self.ca_pem, true)?;
        let location = redirect_location(&browser, &Url::parse(auth_url)?).await?;
        let challenge = location
            .query_pairs()
            .find(|(k, _)| k == "login_challenge")
            .map(|(_, v)| v.into_owned())
            .context("no login challenge")?;
        let body = json!({"error": "access_denied", "error_description": "The subscriber did not log in"});
        let next: Value = self
            .admin_json(
                reqwest::Method::PUT,
                "admin/oauth2/auth/requests/login/reject",
                &[("login_challenge", &challenge)],
                Some(body),
            )
            .await?;
        let next = Url::parse(next["redirect_to"].as_str().context("no redirect_to")?)?;
        Ok(Callback { url: redirect_location(&browser, &next).await? })
    }

    async fn accept(&self, kind: &str, challenge: &str, body: Value) -> anyhow::Result<Url> {
        let path = format!("admin/oauth2/auth/requests/{kind}/accept");
        let key = format!("{kind}_challenge");
        let accepted: Value =
            self.admin_json(reqwest::Method::PUT, &path, &[(key.as_str(), challenge)], Some(body)).await?;
        Ok(Url::parse(accepted["redirect_to"].as_str().context("no redirect_to")?)?)
    }

    async fn admin_json(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self.http.request(method, self.admin.join(path)?).query(query);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        anyhow::ensure!(status.is_success(), "hydra admin {path}: {status}: {text}");
        Ok(serde_json::from_str(&text)?)
    }
}

/// An HTTP client that trusts Hydra's CA and does not follow redirects; with `cookies` it keeps a
/// cookie jar, as a browser does.
fn client_trusting(ca_pem: &str, cookies: bool) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes())?)
        .cookie_store(cookies)
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// GETs `url` and returns where it redirects, or fails with the body if it does not.
async fn redirect_location(browser: &reqwest::Client, url: &Url) -> anyhow::Result<Url> {
    let resp = browser.get(url.clone()).send().await?;
    let status = resp.status();
    match resp.headers().get(reqwest::header::LOCATION) {
        Some(loc) if status.is_redirection() => Ok(url.join(loc.to_str()?)?),
        _ => bail!("expected a redirect from {}, got {status}: {}", url.path(), resp.text().await.unwrap_or_default()),
    }
}

fn config_yaml(
    dsn: &str,
    public: &Url,
    public_port: u16,
    admin_port: u16,
    tls: (&Path, &Path),
    o: &HydraOptions,
) -> String {
    let secret: String = rand::rng().sample_iter(&rand::distr::Alphanumeric).take(32).map(char::from).collect();
    // The login and consent apps are never fetched: the driver reads the challenge off the redirect.
    format!(
        r#"dsn: "{dsn}"
log:
  level: info
  leak_sensitive_values: false
serve:
  tls:
    cert: {{path: "{cert}"}}
    key: {{path: "{key}"}}
  public: {{host: {public_host}, port: {public_port}, tls: {{enabled: true}}}}
  admin: {{host: 127.0.0.1, port: {admin_port}, tls: {{enabled: false}}}}
urls:
  self: {{issuer: "{public}", public: "{public}"}}
  login: "{public}testenv/login"
  consent: "{public}testenv/consent"
  error: "{public}testenv/error"
secrets:
  system: ["{secret}"]
strategies:
  access_token: opaque
oauth2:
  grant:
    refresh_token:
      rotation_grace_period: {grace}s
ttl:
  access_token: {at}s
  refresh_token: {rt}s
  id_token: {it}s
  auth_code: 600s
  login_consent_request: 600s
"#,
        cert = tls.0.display(),
        key = tls.1.display(),
        // Behind the recording proxy Hydra itself stays on loopback.
        public_host = if o.recording_proxy { std::net::Ipv4Addr::LOCALHOST } else { o.public_ip },
        grace = o.refresh_token_grace_period.as_secs(),
        at = o.access_token_ttl.as_secs(),
        rt = o.refresh_token_ttl.as_secs(),
        it = o.id_token_ttl.as_secs(),
    )
}
