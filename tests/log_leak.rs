//! Secrets never reach the logs: a full OAuth flow runs with every crate logging at TRACE (ours,
//! kube, reqwest, hyper, rustls, oauth2), and the captured output is searched for every token and
//! secret value, raw and encoded.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use wgtwo_operator::oauth::secrets::{AuthorizationCode, ClientSecret};
use wgtwo_operator::oauth::{AuthorizationRequest, CallbackOutcome, ClientConfig, WgtwoClient, parse_callback};
use wgtwo_testenv::{Hydra, HydraOptions, Subscriber};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The forms a secret could take in a log line.
fn encodings(secret: &str) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    vec![secret.to_owned(), b64.encode(secret), url::form_urlencoded::byte_serialize(secret.as_bytes()).collect()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_of_a_full_oauth_flow_contain_no_token_or_secret() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("this test binary owns the global subscriber");

    let hydra =
        Hydra::start(HydraOptions { access_token_ttl: Duration::from_secs(60), ..Default::default() }).await.unwrap();
    let registered = hydra.create_client(&["http://127.0.0.1:8085/callback"]).await.unwrap();
    let mut config = ClientConfig::new(&registered.client_id, ClientSecret::new(registered.client_secret.clone()));
    config.issuer_url = hydra.base_url();
    config.redirect_uri = Some("http://127.0.0.1:8085/callback".into());
    config.ca_bundle_pem = Some(hydra.ca_pem().as_bytes().to_vec());
    let wgtwo = WgtwoClient::discover(config).await.unwrap();

    let mut secrets = vec![registered.client_secret.clone()];
    let pending = wgtwo.authorization_url(AuthorizationRequest::new("phone offline_access")).unwrap();
    let callback = hydra.authorize(pending.url.as_str(), &Subscriber::new("alice", "+4799999999")).await.unwrap();
    let CallbackOutcome::Code(code) = parse_callback(&callback.url, &pending.state).unwrap() else { panic!() };
    secrets.push(code.clone());
    let tokens = wgtwo.exchange_code(AuthorizationCode::new(code), pending).await.unwrap();
    tracing::debug!(?tokens, "exchanged (Debug of the token set is logged on purpose)");
    let first_refresh = tokens.refresh_token.clone().unwrap();
    secrets.extend([tokens.access_token.secret().clone(), first_refresh.secret().clone()]);

    let refreshed = wgtwo.refresh(&first_refresh, None).await.unwrap();
    tracing::debug!(?refreshed, "refreshed");
    secrets
        .extend([refreshed.access_token.secret().clone(), refreshed.refresh_token.clone().unwrap().secret().clone()]);
    wgtwo.userinfo(&refreshed.access_token).await.unwrap();
    let cc = wgtwo.client_credentials(Some("phone")).await.unwrap();
    secrets.push(cc.access_token.secret().clone());
    wgtwo.revoke_access_token(&cc.access_token).await.unwrap();
    // Last: on Hydra, reusing a rotated-out refresh token revokes the whole token family.
    let reuse = wgtwo.refresh(&first_refresh, None).await.unwrap_err();
    tracing::warn!(error = %reuse, debug = ?reuse, "reuse refused");
    wgtwo.revoke_refresh_token(refreshed.refresh_token.as_ref().unwrap()).await.unwrap();

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    // The capture really was at trace level across crates.
    for marker in ["TRACE", "refreshed access token", "hyper", "rustls"] {
        assert!(log.contains(marker), "the log has no {marker:?}: the test would prove nothing");
    }
    for secret in &secrets {
        assert!(secret.len() >= 16, "a short value would match by chance");
        for form in encodings(secret) {
            assert!(!log.contains(&form), "a secret appears in the trace log ({} bytes of log)", log.len());
        }
    }
}
