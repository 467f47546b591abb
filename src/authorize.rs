//! `wgtwo-operator authorize`: onboards a subscriber in one command. It runs the authorization code
//! flow (the subscriber logs in with an SMS PIN in a browser), verifies the answer, and writes the
//! refresh-token Secret and the WgtwoGrant that points at it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use tokio::sync::mpsc;
use url::Url;

use crate::api::{
    CLIENT_ID_KEY, CLIENT_SECRET_KEY, ClientSecretRef, DEFAULT_REFRESH_TOKEN_KEY, RefreshTokenSecretRef, TargetSecret,
    WgtwoGrant, WgtwoGrantSpec,
};
use crate::kubeapi::{ValueProblem, kube_message, secret_text};
use crate::oauth::secrets::{AuthorizationCode, ClientSecret};
use crate::oauth::{AuthorizationRequest, CallbackOutcome, ClientConfig, Prompt, WgtwoClient, parse_callback};

/// Field manager of everything `authorize` writes.
pub const FIELD_MANAGER: &str = "wgtwo-operator-authorize";

#[derive(Clone, Debug)]
pub struct AuthorizeOptions {
    pub namespace: String,
    pub grant: String,
    pub client_secret_name: String,
    pub scope: String,
    pub issuer_url: String,
    pub redirect_uri: Url,
    /// Read the redirected URL from stdin instead of listening on the (loopback) redirect URI.
    pub paste: bool,
    pub timeout: Duration,
    pub refresh_token_secret: Option<String>,
    pub target_secret: Option<String>,
    pub prompt: Prompt,
    pub open_browser: bool,
    pub ca_bundle: Option<PathBuf>,
}

impl AuthorizeOptions {
    fn refresh_token_secret(&self) -> String {
        self.refresh_token_secret.clone().unwrap_or_else(|| format!("{}-authorization", self.grant))
    }
    fn target_secret(&self) -> String {
        self.target_secret.clone().unwrap_or_else(|| format!("{}-token", self.grant))
    }
}

/// Runs the whole flow. Progress and the result go to `out`; the URL is printed there too.
pub async fn authorize(
    kube: kube::Client,
    opts: AuthorizeOptions,
    out: &mut (impl Write + Send),
) -> anyhow::Result<()> {
    let listener = if opts.paste {
        None
    } else {
        let addr = loopback_addr(&opts.redirect_uri)?;
        // Bind before printing the URL, so a quick browser never finds the port closed.
        Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} for the redirect URI (is another authorize running? pass --redirect-uri)")
        })?)
    };

    let secrets: Api<Secret> = Api::namespaced(kube.clone(), &opts.namespace);
    let (client_id, client_secret) = read_client(&secrets, &opts.namespace, &opts.client_secret_name).await?;
    let ca_bundle_pem = match &opts.ca_bundle {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("read --ca-bundle {}", path.display()))?),
        None => None,
    };
    let client = WgtwoClient::discover(ClientConfig {
        issuer_url: opts.issuer_url.clone(),
        client_id,
        client_secret,
        redirect_uri: Some(opts.redirect_uri.to_string()),
        timeout: Duration::from_secs(15),
        ca_bundle_pem,
    })
    .await?;

    let mut request = AuthorizationRequest::new(&opts.scope);
    request.prompt = opts.prompt;
    let pending = client.authorization_url(request)?;

    // The grant is checked (schema, conflicts) before anything is written.
    let grant = grant_object(&opts);
    let grants: Api<WgtwoGrant> = Api::namespaced(kube.clone(), &opts.namespace);
    apply_grant(&grants, &grant, true).await?;

    writeln!(out, "Open this URL in a browser and log in as the subscriber:\n\n  {}\n", pending.url)?;
    if opts.open_browser {
        try_open_browser(pending.url.as_str());
    }
    let callback = match listener {
        Some(listener) => {
            writeln!(
                out,
                "Waiting up to {}s for the browser to return to {} ...",
                opts.timeout.as_secs(),
                opts.redirect_uri
            )?;
            out.flush()?;
            wait_for_callback(listener, &opts.redirect_uri, opts.timeout).await?
        }
        None => {
            writeln!(out, "Then paste the full URL the browser was sent to (it starts with {}):", opts.redirect_uri)?;
            out.flush()?;
            read_pasted_callback(opts.timeout).await?
        }
    };
    check_redirect_target(&callback, &opts.redirect_uri)?;
    let code = match parse_callback(&callback, &pending.state).map_err(|e| anyhow!(e))? {
        CallbackOutcome::Code(code) => AuthorizationCode::new(code),
        CallbackOutcome::Denied { error, description } => {
            bail!(
                "the authorization was refused: {error}{}",
                description.map(|d| format!(" ({d})")).unwrap_or_default()
            )
        }
    };

    let tokens = client.exchange_code(code, pending).await?;
    let refresh_token = tokens
        .refresh_token
        .as_ref()
        .context("the identity service issued no refresh token: include offline_access in --scope")?;
    let id_token = tokens.id_token.as_ref().expect("exchange_code verifies the ID token");

    let secret_name = opts.refresh_token_secret();
    write_refresh_token(&secrets, &secret_name, &opts.grant, refresh_token.secret()).await?;
    apply_grant(&grants, &grant, false).await?;

    let who = id_token.phone_number.clone().unwrap_or_else(|| "(no phone_number claim: add the phone scope)".into());
    writeln!(
        out,
        "Authorized {who} (subject {}, scope \"{}\").",
        id_token.subject,
        tokens.scope.as_deref().unwrap_or("")
    )?;
    writeln!(out, "secret/{secret_name} written in namespace {} (the refresh token)", opts.namespace)?;
    writeln!(
        out,
        "wgtwogrant.auth.wgtwo.com/{} applied in namespace {} (access token Secret: {})",
        opts.grant,
        opts.namespace,
        opts.target_secret()
    )?;
    Ok(())
}

/// The redirect URI's socket address, which must be on loopback: only the local browser may
/// deliver the code to this process.
fn loopback_addr(redirect: &Url) -> anyhow::Result<std::net::SocketAddr> {
    let ip: Option<std::net::IpAddr> = match redirect.host() {
        Some(url::Host::Domain("localhost")) => Some([127, 0, 0, 1].into()),
        Some(url::Host::Ipv4(ip)) => Some(ip.into()),
        Some(url::Host::Ipv6(ip)) => Some(ip.into()),
        _ => None,
    };
    let Some(ip) = ip.filter(|ip| ip.is_loopback() && redirect.scheme() == "http") else {
        bail!(
            "--redirect-uri {redirect} is not an http:// loopback URI; use --paste for a redirect URI served elsewhere"
        );
    };
    let port = redirect.port().context("--redirect-uri needs an explicit port, e.g. http://127.0.0.1:8085/callback")?;
    Ok((ip, port).into())
}

/// The OAuth client (`client_id`, `client_secret`) from Secret `namespace/name`; errors name the
/// Secret and the missing key.
pub(crate) async fn read_client(
    secrets: &Api<Secret>,
    namespace: &str,
    name: &str,
) -> anyhow::Result<(String, ClientSecret)> {
    let secret = secrets.get_opt(name).await?.with_context(|| {
        format!("Secret {namespace}/{name} not found: create it with the keys {CLIENT_ID_KEY} and {CLIENT_SECRET_KEY}")
    })?;
    let value = |key: &str| -> anyhow::Result<String> {
        secret_text(&secret, key).map_err(|problem| match problem {
            ValueProblem::Missing => anyhow!("Secret {namespace}/{name} has no key {key}"),
            ValueProblem::NotUtf8 => anyhow!("Secret {namespace}/{name} key {key} is not UTF-8"),
            ValueProblem::Empty => anyhow!("Secret {namespace}/{name} key {key} is empty"),
        })
    };
    Ok((value(CLIENT_ID_KEY)?, ClientSecret::new(value(CLIENT_SECRET_KEY)?)))
}

fn grant_object(opts: &AuthorizeOptions) -> WgtwoGrant {
    let mut grant = WgtwoGrant::new(
        &opts.grant,
        WgtwoGrantSpec {
            issuer_url: opts.issuer_url.clone(),
            client_secret_ref: ClientSecretRef { name: opts.client_secret_name.clone() },
            refresh_token_secret_ref: Some(RefreshTokenSecretRef {
                name: opts.refresh_token_secret(),
                key: DEFAULT_REFRESH_TOKEN_KEY.to_owned(),
            }),
            client_credentials: None,
            target: TargetSecret { secret_name: opts.target_secret(), template: None },
            scope: None,
            refresh_before: None,
        },
    );
    grant.metadata.namespace = Some(opts.namespace.clone());
    grant
}

/// Server-side apply without force: if someone else manages a field we set, that is a conflict to
/// report, not to override.
async fn apply_grant(grants: &Api<WgtwoGrant>, grant: &WgtwoGrant, dry_run: bool) -> anyhow::Result<()> {
    let name = grant.metadata.name.as_deref().unwrap_or_default();
    let mut params = PatchParams::apply(FIELD_MANAGER);
    params.dry_run = dry_run;
    grants.patch(name, &params, &Patch::Apply(grant)).await.map_err(|e| match e {
        kube::Error::Api(status) if status.code == 409 => anyhow!(
            "WgtwoGrant {name} exists and another manager owns fields authorize would change: {}",
            status.message
        ),
        kube::Error::Api(status) => anyhow!("WgtwoGrant {name} was refused: {}", status.message),
        other => anyhow!(other).context(format!("apply WgtwoGrant {name}")),
    })?;
    Ok(())
}

/// Writes the refresh token into the user-owned input Secret. A Secret owned by something else (an
/// operator's target, say) is refused rather than overwritten.
async fn write_refresh_token(secrets: &Api<Secret>, name: &str, grant: &str, token: &str) -> anyhow::Result<()> {
    if let Some(existing) = secrets.get_opt(name).await? {
        if existing.metadata.owner_references.is_some_and(|o| !o.is_empty()) {
            bail!("Secret {name} is owned by another object; pass --refresh-token-secret with another name");
        }
        if existing.type_.as_deref().is_some_and(|t| t != "Opaque") {
            bail!(
                "Secret {name} has type {:?}, not Opaque; pass --refresh-token-secret with another name",
                existing.type_
            );
        }
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([("auth.wgtwo.com/grant".to_owned(), grant.to_owned())])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(DEFAULT_REFRESH_TOKEN_KEY.to_owned(), ByteString(token.as_bytes().to_vec()))])),
        ..Default::default()
    };
    // Forced: re-authorizing means replacing the refresh token, whoever wrote the previous one.
    secrets
        .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&secret))
        .await
        .map_err(|e| anyhow!("write Secret {name}: {}", kube_message(&e)))?;
    Ok(())
}

/// Serves the redirect URI on loopback until the first request to its path arrives.
async fn wait_for_callback(
    listener: tokio::net::TcpListener,
    redirect: &Url,
    timeout: Duration,
) -> anyhow::Result<Url> {
    let (tx, mut rx) = mpsc::channel::<Url>(1);
    let base = redirect.clone();
    let app = axum::Router::new().route(
        redirect.path(),
        axum::routing::get(move |uri: axum::http::Uri| {
            let tx = tx.clone();
            let base = base.clone();
            async move {
                let mut url = base;
                url.set_query(uri.query());
                let _ = tx.send(url).await;
                axum::response::Html(
                    "<!doctype html><title>wgtwo-operator</title><p>Authorization received. You can close this window and return to the terminal.</p>",
                )
            }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let received = tokio::time::timeout(timeout, rx.recv()).await;
    // Let the browser's response go out before the server stops.
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.abort();
    match received {
        Ok(Some(url)) => Ok(url),
        Ok(None) => bail!("the callback server stopped unexpectedly"),
        Err(_) => bail!("timed out after {}s waiting for the browser to return to {redirect}", timeout.as_secs()),
    }
}

async fn read_pasted_callback(timeout: Duration) -> anyhow::Result<Url> {
    let line = tokio::time::timeout(
        timeout,
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).map(|_| line)
        }),
    )
    .await
    .map_err(|_| anyhow!("timed out after {}s waiting for the pasted URL", timeout.as_secs()))???;
    let line = line.trim();
    if line.is_empty() {
        bail!("no URL was pasted");
    }
    Url::parse(line).map_err(|e| anyhow!("the pasted text is not a URL ({e})"))
}

/// The callback must come back to the redirect URI we registered, not to some other page.
fn check_redirect_target(callback: &Url, redirect: &Url) -> anyhow::Result<()> {
    let same = callback.scheme() == redirect.scheme()
        && callback.host_str() == redirect.host_str()
        && callback.port_or_known_default() == redirect.port_or_known_default()
        && callback.path() == redirect.path();
    if !same {
        bail!("the URL does not start with the redirect URI {redirect}");
    }
    Ok(())
}

/// Best effort: a headless machine has no browser, and the URL is printed anyway.
fn try_open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") { "open" } else { "xdg-open" };
    let _ = std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_redirect_uris_are_accepted_and_others_refused() {
        let ok = |s: &str| loopback_addr(&Url::parse(s).unwrap());
        assert_eq!(ok("http://127.0.0.1:8085/callback").unwrap().port(), 8085);
        assert!(ok("http://localhost:9000/cb").unwrap().ip().is_loopback());
        assert!(ok("http://[::1]:9000/cb").unwrap().ip().is_loopback());
        assert!(ok("https://example.com/callback").unwrap_err().to_string().contains("--paste"));
        assert!(ok("http://10.0.0.1:8085/callback").is_err());
        assert!(ok("http://127.0.0.1/callback").unwrap_err().to_string().contains("port"));
    }

    #[test]
    fn callback_to_another_page_is_refused() {
        let redirect = Url::parse("https://example.com/callback").unwrap();
        assert!(
            check_redirect_target(&Url::parse("https://example.com/callback?code=x&state=y").unwrap(), &redirect)
                .is_ok()
        );
        assert!(
            check_redirect_target(&Url::parse("https://evil.example/callback?code=x").unwrap(), &redirect).is_err()
        );
        assert!(check_redirect_target(&Url::parse("https://example.com/other?code=x").unwrap(), &redirect).is_err());
    }
}
