//! Ory Hydra is real: a full authorization code flow with a verified ID token, token lifetimes as
//! configured, and refresh-token rotation with reuse rejected as `invalid_grant`.

use std::time::Duration;

use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreErrorResponseType, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce, OAuth2TokenResponse, RedirectUrl,
    RequestTokenError, Scope, TokenResponse,
};
use wgtwo_testenv::{Hydra, HydraOptions, Subscriber};

const REDIRECT: &str = "http://127.0.0.1:8085/callback";

fn http_client(hydra: &Hydra) -> reqwest::Client {
    // No redirects: the token endpoint must answer directly (and it avoids SSRF via redirects).
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(hydra.ca_pem().as_bytes()).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_code_flow_yields_verified_id_token_and_rotating_refresh_token() {
    let options = HydraOptions { access_token_ttl: Duration::from_secs(15), ..Default::default() };
    let hydra = Hydra::start(options).await.unwrap();
    let registered = hydra.create_client(&[REDIRECT]).await.unwrap();
    let http = http_client(&hydra);

    let metadata =
        CoreProviderMetadata::discover_async(IssuerUrl::new(hydra.issuer_url()).unwrap(), &http).await.unwrap();
    let oidc = CoreClient::from_provider_metadata(
        metadata,
        ClientId::new(registered.client_id.clone()),
        Some(ClientSecret::new(registered.client_secret.clone())),
    )
    .set_redirect_uri(RedirectUrl::new(REDIRECT.to_owned()).unwrap());

    let (auth_url, state, nonce) = oidc
        .authorize_url(CoreAuthenticationFlow::AuthorizationCode, CsrfToken::new_random, Nonce::new_random)
        .add_scope(Scope::new("phone".into()))
        .add_scope(Scope::new("offline_access".into()))
        .url();
    let callback = hydra.authorize(auth_url.as_str(), &Subscriber::new("alice", "+4799999999")).await.unwrap();
    assert!(callback.url.as_str().starts_with(REDIRECT), "{}", callback.url);
    assert_eq!(callback.state().as_deref(), Some(state.secret().as_str()));
    let code = callback.code().expect("callback carries a code");

    let tokens = oidc.exchange_code(AuthorizationCode::new(code)).unwrap().request_async(&http).await.unwrap();
    assert!(!tokens.access_token().secret().is_empty());
    let lifetime = tokens.expires_in().expect("expires_in");
    assert!(lifetime <= Duration::from_secs(15) && lifetime >= Duration::from_secs(10), "{lifetime:?}");
    let scopes: Vec<String> = tokens.scopes().unwrap().iter().map(|s| s.to_string()).collect();
    for scope in ["openid", "phone", "offline_access"] {
        assert!(scopes.iter().any(|s| s == scope), "{scopes:?}");
    }

    // Signature (JWKS from discovery), issuer, audience, expiry and nonce are all checked here.
    let id_token = tokens.id_token().expect("scope openid yields an ID token");
    let claims = id_token.claims(&oidc.id_token_verifier(), &nonce).unwrap();
    assert_eq!(claims.subject().as_str(), "alice");
    assert_eq!(claims.nonce().map(|n| n.secret()), Some(nonce.secret()));
    assert_eq!(claims.phone_number().map(|p| p.as_str()), Some("+4799999999"));
    assert_eq!(claims.phone_number_verified(), Some(true));
    assert_eq!(claims.issuer().as_str(), hydra.issuer_url());

    let introspected = hydra.introspect(tokens.access_token().secret()).await.unwrap();
    assert_eq!(introspected["active"], true);
    assert_eq!(introspected["sub"], "alice");

    // One refresh rotates the refresh token...
    let first = tokens.refresh_token().expect("offline_access yields a refresh token").clone();
    let refreshed = oidc.exchange_refresh_token(&first).unwrap().request_async(&http).await.unwrap();
    let second = refreshed.refresh_token().expect("a rotated refresh token");
    assert_ne!(second.secret(), first.secret());
    assert_ne!(refreshed.access_token().secret(), tokens.access_token().secret());

    // ...and presenting the old one again is refused as invalid_grant.
    match oidc.exchange_refresh_token(&first).unwrap().request_async(&http).await {
        Err(RequestTokenError::ServerResponse(resp)) => {
            assert_eq!(*resp.error(), CoreErrorResponseType::InvalidGrant, "{resp:?}");
        }
        other => panic!("reusing a rotated refresh token must fail with invalid_grant, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_who_refuses_login_sends_access_denied_to_the_callback() {
    let hydra = Hydra::start(HydraOptions::default()).await.unwrap();
    let registered = hydra.create_client(&[REDIRECT]).await.unwrap();
    let metadata =
        CoreProviderMetadata::discover_async(IssuerUrl::new(hydra.issuer_url()).unwrap(), &http_client(&hydra))
            .await
            .unwrap();
    let oidc = CoreClient::from_provider_metadata(metadata, ClientId::new(registered.client_id), None)
        .set_redirect_uri(RedirectUrl::new(REDIRECT.to_owned()).unwrap());
    let (auth_url, state, _nonce) =
        oidc.authorize_url(CoreAuthenticationFlow::AuthorizationCode, CsrfToken::new_random, Nonce::new_random).url();

    let callback = hydra.deny(auth_url.as_str()).await.unwrap();
    assert_eq!(callback.error().as_deref(), Some("access_denied"));
    assert_eq!(callback.state().as_deref(), Some(state.secret().as_str()));
    assert_eq!(callback.code(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_hydra_kills_its_process() {
    let mut hydra = Hydra::start(HydraOptions::default()).await.unwrap();
    let pid = hydra.process().pid();
    drop(hydra);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "hydra {pid} outlived its guard");
}
