//! The wgtwo OAuth 2.0 / OpenID Connect client, on openidconnect-rs (which builds on oauth2-rs):
//! discovery, the authorization URL, code exchange, refresh, client credentials, userinfo and
//! revocation, with ID tokens verified (the official SDK only decodes them).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use jiff::Timestamp;
use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreAuthenticationFlow, CoreClaimName, CoreClaimType, CoreClient,
    CoreClientAuthMethod, CoreGenderClaim, CoreGrantType, CoreIdToken, CoreIdTokenClaims, CoreJsonWebKey,
    CoreJsonWebKeySet, CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreResponseMode,
    CoreResponseType, CoreRevocableToken, CoreSubjectIdentifierType, CoreTokenResponse,
};
use openidconnect::{
    AccessTokenHash, AdditionalProviderMetadata, ClaimsVerificationError, ClientId, DiscoveryError,
    EmptyAdditionalClaims, EndpointMaybeSet, EndpointNotSet, EndpointSet, IssuerUrl, NonceVerifier,
    OAuth2TokenResponse, PkceCodeChallenge, ProviderMetadata, RedirectUrl, RequestTokenError, RevocationUrl, Scope,
    SignatureVerificationError, StandardErrorResponse, TokenResponse, UserInfoClaims, UserInfoError,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, instrument};

use super::authorization::{AuthorizationRequest, PendingAuthorization, Prompt, validate_state};
use super::error::{ErrorClass, OAuthError, classify_status};
use super::http::{HttpClient, HttpFailure};
use super::secrets::{AccessToken, AuthorizationCode, ClientSecret, CsrfToken, Nonce, RefreshToken};
use super::token::{IdTokenInfo, TokenSet};

/// After a failed fetch of the issuer's keys, how long an ID token naming an unknown key fails at
/// once instead of fetching again.
const KEY_FETCH_RETRY: Duration = Duration::from_secs(30);

/// A refresh answer: its tokens, and the response whose ID token is still to be verified.
pub struct RefreshAnswer {
    pub tokens: TokenSet,
    /// `None` without an ID token, once verified, or when the answer was read from its raw body.
    response: Option<CoreTokenResponse>,
}

/// The HTTP client of one token request, keeping the body of a 2xx answer: when the typed parser
/// refuses it, the rotated refresh token in it must not be lost with the parse error.
struct Capture<'h> {
    http: &'h HttpClient,
    body: std::sync::Mutex<Option<Vec<u8>>>,
}

impl<'c> oauth2::AsyncHttpClient<'c> for Capture<'_> {
    type Error = HttpFailure;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<oauth2::HttpResponse, HttpFailure>> + Send + 'c>>;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(async move {
            let response = self.http.send(request).await?;
            if response.status().is_success() {
                *self.body.lock().unwrap() = Some(response.body().clone());
            }
            Ok(response)
        })
    }
}

/// The tokens of a 2xx token answer read as plain JSON (RFC 6749 5.1), for an answer the typed
/// parser refused. `None` without an access token.
fn raw_token_set(body: &[u8], received_at: Timestamp) -> Option<TokenSet> {
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = |key: &str| json.get(key).and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_owned);
    Some(TokenSet {
        access_token: AccessToken::new(text("access_token")?),
        refresh_token: text("refresh_token").map(RefreshToken::new),
        token_type: text("token_type").unwrap_or_else(|| "bearer".into()),
        expires_at: json
            .get("expires_in")
            .and_then(|v| v.as_u64())
            .and_then(|s| received_at.checked_add(jiff::SignedDuration::from_secs(s as i64)).ok()),
        scope: text("scope"),
        id_token: None,
        id_token_error: None,
    })
}

/// Why the typed parser refused an answer, without a value from it (serde's messages can quote one).
fn unparsed<T>(err: &RequestTokenError<HttpFailure, StandardErrorResponse<T>>) -> String
where
    T: openidconnect::ErrorResponseType + Serialize + std::fmt::Display,
{
    match err {
        RequestTokenError::Parse(e, _) => {
            format!(
                "{:?} error at {}, line {} column {}",
                e.inner().classify(),
                e.path(),
                e.inner().line(),
                e.inner().column()
            )
        }
        _ => "not a JSON token response".into(),
    }
}

/// The identity service the official wgtwo SDK talks to by default.
pub const DEFAULT_ISSUER_URL: &str = crate::api::DEFAULT_ISSUER_URL;

/// How to reach the identity service, and as which client.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Issuer base URL; `https://id.wgtwo.com` by default. A trailing slash is optional.
    pub issuer_url: String,
    pub client_id: String,
    pub client_secret: ClientSecret,
    /// Where the browser returns after login; needed only for the authorization code flow.
    pub redirect_uri: Option<String>,
    /// Bound on each whole HTTP request.
    pub timeout: Duration,
    /// Extra trusted CA certificates (PEM), for an issuer behind a private CA.
    pub ca_bundle_pem: Option<Vec<u8>>,
}

impl ClientConfig {
    pub fn new(client_id: impl Into<String>, client_secret: ClientSecret) -> Self {
        Self {
            issuer_url: DEFAULT_ISSUER_URL.to_owned(),
            client_id: client_id.into(),
            client_secret,
            redirect_uri: None,
            timeout: Duration::from_secs(10),
            ca_bundle_pem: None,
        }
    }
}

/// Discovery metadata beyond what OpenID Connect core defines: Hydra (and so wgtwo) announces its
/// RFC 7009 revocation endpoint.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct RevocationMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revocation_endpoint: Option<String>,
}
impl AdditionalProviderMetadata for RevocationMetadata {}

type Metadata = ProviderMetadata<
    RevocationMetadata,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// The openidconnect client with the endpoints discovery gives: authorization and revocation set;
/// token and userinfo as the issuer announces them.
type Oidc = CoreClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointSet, EndpointMaybeSet, EndpointMaybeSet>;

/// What userinfo says about the subscriber.
#[derive(Clone, Debug, PartialEq)]
pub struct UserInfo {
    pub subject: String,
    pub phone_number: Option<String>,
    pub phone_number_verified: Option<bool>,
}

pub struct WgtwoClient {
    /// Replaced (with new signing keys) when an ID token names a key the client has not seen.
    oidc: RwLock<Arc<Oidc>>,
    /// What discovery said, to rebuild `oidc` with new keys.
    metadata: Metadata,
    settings: OidcSettings,
    /// One fetch of the issuer's keys at a time (per client, so per issuer), and when the last one
    /// failed: the requests that waited for it do not each fetch again.
    key_fetch: tokio::sync::Mutex<Option<std::time::Instant>>,
    http: HttpClient,
    issuer: String,
    client_id: String,
}

/// How this client is set up on top of the discovery document.
#[derive(Clone)]
struct OidcSettings {
    client_id: ClientId,
    client_secret: ClientSecret,
    revocation: RevocationUrl,
    redirect: Option<RedirectUrl>,
}

fn build_oidc(metadata: Metadata, settings: &OidcSettings) -> Oidc {
    let oidc =
        CoreClient::from_provider_metadata(metadata, settings.client_id.clone(), Some(settings.client_secret.clone()))
            .set_revocation_url(settings.revocation.clone());
    match &settings.redirect {
        Some(redirect) => oidc.set_redirect_uri(redirect.clone()),
        None => oidc,
    }
}

/// Why an ID token did not verify.
struct Unverified {
    message: String,
    /// It names (or, without a kid, needs) a signing key the client does not have.
    unknown_key: bool,
}

impl std::fmt::Debug for WgtwoClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgtwoClient").field("issuer", &self.issuer).field("client_id", &self.client_id).finish()
    }
}

impl WgtwoClient {
    /// Reads the issuer's discovery document (endpoints and signing keys) and builds the client.
    #[instrument(skip_all, fields(issuer = %config.issuer_url, client_id = %config.client_id))]
    pub async fn discover(config: ClientConfig) -> Result<Self, OAuthError> {
        let http = HttpClient::new(config.timeout, config.ca_bundle_pem.as_deref())?;
        let metadata = discover_metadata(&http, &config.issuer_url).await?;
        let issuer = metadata.issuer().to_string();
        // wgtwo documents /oauth2/revoke; use it when discovery does not announce the endpoint.
        let revocation = match &metadata.additional_metadata().revocation_endpoint {
            Some(url) => url.clone(),
            None => format!("{}/oauth2/revoke", issuer.trim_end_matches('/')),
        };
        let revocation = RevocationUrl::new(revocation).map_err(|e| OAuthError::Discovery {
            issuer: issuer.clone(),
            message: format!("revocation_endpoint: {e}"),
            class: ErrorClass::Permanent,
        })?;
        let redirect = match config.redirect_uri {
            Some(redirect) => {
                Some(RedirectUrl::new(redirect).map_err(|e| OAuthError::Invalid(format!("redirect URI: {e}")))?)
            }
            None => None,
        };
        let settings = OidcSettings {
            client_id: ClientId::new(config.client_id.clone()),
            client_secret: config.client_secret,
            revocation,
            redirect,
        };
        let oidc = RwLock::new(Arc::new(build_oidc(metadata.clone(), &settings)));
        debug!(%issuer, "discovered issuer");
        Ok(Self {
            oidc,
            metadata,
            settings,
            key_fetch: tokio::sync::Mutex::new(None),
            http,
            issuer,
            client_id: config.client_id,
        })
    }

    /// The openidconnect client with the newest signing keys.
    fn oidc(&self) -> Arc<Oidc> {
        self.oidc.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The issuer as its discovery document names it (wgtwo's ends with a slash).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Builds the URL to send the subscriber's browser to. `openid` is always requested (this is an
    /// OpenID Connect flow: the ID token tells who authorized), and PKCE S256 protects the code.
    pub fn authorization_url(&self, request: AuthorizationRequest) -> Result<PendingAuthorization, OAuthError> {
        if self.oidc().redirect_uri().is_none() {
            return Err(OAuthError::Invalid("the authorization code flow needs a redirect URI".into()));
        }
        let state = match request.state {
            Some(state) => {
                validate_state(&state).map_err(OAuthError::Invalid)?;
                CsrfToken::new(state)
            }
            None => CsrfToken::new_random(),
        };
        let nonce = request.nonce.map(Nonce::new).unwrap_or_else(Nonce::new_random);
        let (state_for_url, nonce_for_url) = (state.clone(), nonce.clone());
        let oidc = self.oidc();
        let mut builder = oidc
            .authorize_url(CoreAuthenticationFlow::AuthorizationCode, move || state_for_url, move || nonce_for_url)
            .add_scopes(request.scope.into_iter().filter(|s| s != "openid").map(Scope::new));
        builder = match request.prompt {
            Prompt::Default => builder,
            Prompt::Login => builder.add_prompt(CoreAuthPrompt::Login),
            Prompt::Consent => builder.add_prompt(CoreAuthPrompt::Consent),
            Prompt::LoginConsent => builder.add_prompt(CoreAuthPrompt::Login).add_prompt(CoreAuthPrompt::Consent),
            Prompt::None => builder.add_prompt(CoreAuthPrompt::None),
        };
        let pkce_verifier = if request.pkce {
            let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
            builder = builder.set_pkce_challenge(challenge);
            Some(verifier)
        } else {
            None
        };
        let (url, _, _) = builder.url();
        Ok(PendingAuthorization { url, state, nonce, pkce_verifier })
    }

    /// Exchanges the code from the callback for tokens. The ID token must be present and valid,
    /// with the nonce of `pending`, and its `at_hash` must match the access token.
    #[instrument(skip_all, fields(issuer = %self.issuer))]
    pub async fn exchange_code(
        &self,
        code: AuthorizationCode,
        pending: PendingAuthorization,
    ) -> Result<TokenSet, OAuthError> {
        const OP: &str = "code exchange";
        let oidc = self.oidc();
        let mut request = oidc.exchange_code(code).map_err(|e| OAuthError::Invalid(format!("{OP}: {e}")))?;
        if let Some(verifier) = pending.pkce_verifier {
            request = request.set_pkce_verifier(verifier);
        }
        let response = request.request_async(&self.http).await.map_err(|e| request_error(OP, e))?;
        let mut tokens = token_set(&response, Timestamp::now());
        let id_token = self.verify_id_token(OP, &response, &pending.nonce).await?;
        tokens.id_token = Some(id_token.ok_or_else(|| OAuthError::IdToken {
            operation: OP,
            message: "the response has no ID token although openid was requested".into(),
        })?);
        debug!(scope = tokens.scope.as_deref().unwrap_or(""), "exchanged authorization code");
        Ok(tokens)
    }

    /// Refreshes with `refresh_token`, optionally narrowing the scope. The answer is returned even
    /// when its ID token fails verification (then `id_token_error` says why): by then the server has
    /// rotated the refresh token, and the new one must not be dropped.
    pub async fn refresh(&self, refresh_token: &RefreshToken, scope: Option<&str>) -> Result<TokenSet, OAuthError> {
        let mut answer = self.refresh_then(refresh_token, scope, |_| {}).await?;
        self.verify_refreshed(&mut answer).await;
        Ok(answer.tokens)
    }

    /// The token request of [`Self::refresh`], calling `answered` with the answer's tokens as soon
    /// as they are there, before anything else (no await in between), so that a caller can put the
    /// rotated refresh token somewhere safe first. The ID token is not verified yet (that may fetch
    /// the issuer's keys): [`Self::verify_refreshed`] does it, once the token is safe.
    ///
    /// A 2xx answer that the typed parser refuses (openidconnect parses the ID token's header while
    /// deserialising: an unexpected `alg` or claim type fails the whole answer) still rotated the
    /// refresh token at the server: its tokens are then read from the raw body, with the problem in
    /// `id_token_error`. Only when the raw body has no access token is it
    /// [`OAuthError::AnswerUnusable`]: the presented token is used up, and must not be sent again.
    #[instrument(skip_all, fields(issuer = %self.issuer))]
    pub async fn refresh_then(
        &self,
        refresh_token: &RefreshToken,
        scope: Option<&str>,
        answered: impl FnOnce(&TokenSet),
    ) -> Result<RefreshAnswer, OAuthError> {
        const OP: &str = "refresh";
        let oidc = self.oidc();
        let mut request =
            oidc.exchange_refresh_token(refresh_token).map_err(|e| OAuthError::Invalid(format!("{OP}: {e}")))?;
        if let Some(scope) = scope {
            request = request.add_scopes(scope.split_whitespace().map(|s| Scope::new(s.to_owned())));
        }
        let capture = Capture { http: &self.http, body: Default::default() };
        let result = request.request_async(&capture).await;
        let received = Timestamp::now();
        let answer = match result {
            Ok(response) => {
                let tokens = token_set(&response, received);
                let response = response.id_token().is_some().then_some(response);
                RefreshAnswer { tokens, response }
            }
            Err(err @ (RequestTokenError::Parse(..) | RequestTokenError::Other(_))) => {
                let Some(body) = capture.body.lock().unwrap().take() else {
                    // Not a 2xx answer (e.g. an error body of an unexpected shape).
                    return Err(request_error(OP, err));
                };
                let problem = unparsed(&err);
                let Some(mut tokens) = raw_token_set(&body, received) else {
                    return Err(OAuthError::AnswerUnusable { operation: OP, message: problem });
                };
                tokens.id_token_error = Some(format!(
                    "the answer could not be read in full ({problem}); its tokens were read from it as sent"
                ));
                RefreshAnswer { tokens, response: None }
            }
            Err(RequestTokenError::Request(lost @ HttpFailure::BodyLost { .. })) => {
                return Err(OAuthError::AnswerUnusable { operation: OP, message: lost.to_string() });
            }
            Err(err) => return Err(request_error(OP, err)),
        };
        answered(&answer.tokens);
        debug!(rotated = answer.tokens.refresh_token.is_some(), "refreshed access token");
        Ok(answer)
    }

    /// Verifies the ID token of a refresh answer (see [`Self::refresh_then`]), fetching the issuer's
    /// keys again if it names an unknown one: sets `tokens.id_token`, or `id_token_error`.
    pub async fn verify_refreshed(&self, answer: &mut RefreshAnswer) {
        let Some(response) = answer.response.take() else { return };
        // A refreshed ID token carries no new nonce to check (OpenID Connect Core 12.2).
        match self.verify_id_token("refresh", &response, |_: Option<&Nonce>| Ok(())).await {
            Ok(id_token) => answer.tokens.id_token = id_token,
            Err(err) => answer.tokens.id_token_error = Some(err.to_string()),
        }
    }

    /// The client credentials grant (no user involved).
    #[instrument(skip_all, fields(issuer = %self.issuer))]
    pub async fn client_credentials(&self, scope: Option<&str>) -> Result<TokenSet, OAuthError> {
        const OP: &str = "client credentials";
        let oidc = self.oidc();
        let mut request = oidc.exchange_client_credentials().map_err(|e| OAuthError::Invalid(format!("{OP}: {e}")))?;
        if let Some(scope) = scope {
            request = request.add_scopes(scope.split_whitespace().map(|s| Scope::new(s.to_owned())));
        }
        let response = request.request_async(&self.http).await.map_err(|e| request_error(OP, e))?;
        Ok(token_set(&response, Timestamp::now()))
    }

    /// Who the access token belongs to, from the userinfo endpoint.
    #[instrument(skip_all, fields(issuer = %self.issuer))]
    pub async fn userinfo(&self, access_token: &AccessToken) -> Result<UserInfo, OAuthError> {
        const OP: &str = "userinfo";
        let oidc = self.oidc();
        let request =
            oidc.user_info(access_token.clone(), None).map_err(|e| OAuthError::Invalid(format!("{OP}: {e}")))?;
        let claims: UserInfoClaims<EmptyAdditionalClaims, CoreGenderClaim> =
            request.request_async(&self.http).await.map_err(|e| match e {
                UserInfoError::Request(failure) => failure.into_oauth(OP),
                UserInfoError::Response(status, _, _) => {
                    OAuthError::Status { operation: OP, status: status.as_u16(), retry_after: None }
                }
                UserInfoError::ClaimsVerification(e) => OAuthError::IdToken { operation: OP, message: e.to_string() },
                other => OAuthError::Malformed { operation: OP, message: other.to_string() },
            })?;
        Ok(UserInfo {
            subject: claims.subject().to_string(),
            phone_number: claims.phone_number().map(|p| p.to_string()),
            phone_number_verified: claims.phone_number_verified(),
        })
    }

    /// Revokes a refresh token (RFC 7009), which on Hydra also ends its access tokens.
    #[instrument(skip_all, fields(issuer = %self.issuer))]
    pub async fn revoke_refresh_token(&self, token: &RefreshToken) -> Result<(), OAuthError> {
        self.revoke(CoreRevocableToken::from(token.clone())).await
    }

    /// Revokes an access token (RFC 7009).
    #[instrument(skip_all, fields(issuer = %self.issuer))]
    pub async fn revoke_access_token(&self, token: &AccessToken) -> Result<(), OAuthError> {
        self.revoke(CoreRevocableToken::from(token.clone())).await
    }

    async fn revoke(&self, token: CoreRevocableToken) -> Result<(), OAuthError> {
        const OP: &str = "revoke";
        let oidc = self.oidc();
        let request = oidc.revoke_token(token).map_err(|e| OAuthError::Invalid(format!("{OP}: {e}")))?;
        request.request_async(&self.http).await.map_err(|e| request_error(OP, e))
    }

    /// Verifies the response's ID token if it has one: signature against the issuer's JWKS, issuer,
    /// audience, expiry, the nonce rule given, and `at_hash` against the access token. An ID token
    /// signed with a key the client has not seen means the issuer rotated its keys: they are
    /// fetched again (once, and only on an answer from the issuer itself) and the token verified
    /// with them, as OpenID Connect Core 10.1.1 expects of a client.
    async fn verify_id_token<N: NonceVerifier + Copy>(
        &self,
        operation: &'static str,
        response: &CoreTokenResponse,
        nonce: N,
    ) -> Result<Option<IdTokenInfo>, OAuthError> {
        let Some(id_token) = response.id_token() else { return Ok(None) };
        let fail = |message: String| OAuthError::IdToken { operation, message };
        match verify(&self.oidc(), id_token, response, nonce) {
            Err(Unverified { unknown_key: true, .. }) => {}
            other => return other.map(Some).map_err(|e| fail(e.message)),
        }
        let mut last_failure = self.key_fetch.lock().await;
        // Another request may have fetched them meanwhile.
        if let Ok(info) = verify(&self.oidc(), id_token, response, nonce) {
            return Ok(Some(info));
        }
        // ... or failed to: then so would this one, and every request behind it would wait for
        // its own fetch in turn.
        if let Some(failed) = *last_failure
            && failed.elapsed() < KEY_FETCH_RETRY
        {
            return Err(fail(format!(
                "signed with an unknown key, and fetching the issuer's keys again failed {}s ago (tried again after {}s)",
                failed.elapsed().as_secs(),
                KEY_FETCH_RETRY.as_secs()
            )));
        }
        let keys = CoreJsonWebKeySet::fetch_async(self.metadata.jwks_uri(), &self.http).await.map_err(|e| {
            *last_failure = Some(std::time::Instant::now());
            fail(format!(
                "signed with an unknown key, and fetching the issuer's keys again failed: {}",
                discovery_error(&self.issuer, e)
            ))
        })?;
        *last_failure = None;
        debug!(keys = keys.keys().len(), "fetched the issuer's signing keys again");
        let oidc = Arc::new(build_oidc(self.metadata.clone().set_jwks(keys), &self.settings));
        *self.oidc.write().unwrap_or_else(|e| e.into_inner()) = oidc.clone();
        verify(&oidc, id_token, response, nonce).map(Some).map_err(|e| fail(e.message))
    }
}

fn verify(
    oidc: &Oidc,
    id_token: &CoreIdToken,
    response: &CoreTokenResponse,
    nonce: impl NonceVerifier,
) -> Result<IdTokenInfo, Unverified> {
    let fail = |message: String| Unverified { message, unknown_key: false };
    let verifier = oidc.id_token_verifier();
    let claims: &CoreIdTokenClaims = id_token.claims(&verifier, nonce).map_err(|e| Unverified {
        unknown_key: matches!(
            e,
            ClaimsVerificationError::SignatureVerification(SignatureVerificationError::NoMatchingKey)
        ),
        message: with_sources(&e),
    })?;
    if let Some(expected) = claims.access_token_hash() {
        let alg = id_token.signing_alg().map_err(|e| fail(e.to_string()))?;
        let key = id_token.signing_key(&verifier).map_err(|e| fail(e.to_string()))?;
        let actual = AccessTokenHash::from_token(response.access_token(), alg, key).map_err(|e| fail(e.to_string()))?;
        if actual != *expected {
            return Err(fail("at_hash does not match the access token".into()));
        }
    }
    Ok(IdTokenInfo {
        subject: claims.subject().to_string(),
        phone_number: claims.phone_number().map(|p| p.to_string()),
        phone_number_verified: claims.phone_number_verified(),
        nonce: claims.nonce().map(|n| n.secret().clone()),
        expires_at: Timestamp::from_second(claims.expiration().timestamp()).ok(),
    })
}

/// An error with its causes: "Signature verification failed: No matching key found".
fn with_sources(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

/// The fields of a token response that we keep, with `expires_in` turned into an instant.
fn token_set(response: &CoreTokenResponse, received_at: Timestamp) -> TokenSet {
    TokenSet {
        access_token: response.access_token().clone(),
        refresh_token: response.refresh_token().cloned(),
        token_type: response.token_type().as_ref().to_owned(),
        expires_at: response.expires_in().and_then(|d| received_at.checked_add(d).ok()),
        scope: response.scopes().map(|s| s.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")),
        id_token: None,
        id_token_error: None,
    }
}

/// Maps oauth2-rs's error to ours, keeping the OAuth error code and description but never the
/// response body (a half-parsed success body could hold a token).
fn request_error<T>(
    operation: &'static str,
    err: RequestTokenError<HttpFailure, StandardErrorResponse<T>>,
) -> OAuthError
where
    T: openidconnect::ErrorResponseType + Serialize + std::fmt::Display,
{
    match err {
        RequestTokenError::ServerResponse(resp) => OAuthError::Rejected {
            operation,
            error: serde_json::to_value(resp.error())
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_else(|| "unknown_error".into()),
            description: resp.error_description().cloned(),
        },
        RequestTokenError::Request(failure) => failure.into_oauth(operation),
        RequestTokenError::Parse(e, _body) => OAuthError::Malformed { operation, message: e.to_string() },
        RequestTokenError::Other(message) => OAuthError::Malformed { operation, message },
    }
}

/// Discovery, tolerant of the trailing slash: wgtwo's issuer is `https://id.wgtwo.com/` while
/// users (and the SDK) write `https://id.wgtwo.com`. The exact issuer string the server announces
/// is the one ID tokens are checked against.
async fn discover_metadata(http: &HttpClient, issuer_url: &str) -> Result<Metadata, OAuthError> {
    let trimmed = issuer_url.trim_end_matches('/');
    let candidates = if issuer_url.ends_with('/') {
        [issuer_url.to_owned(), trimmed.to_owned()]
    } else {
        [format!("{trimmed}/"), trimmed.to_owned()]
    };
    let mut last = None;
    for candidate in candidates {
        let url = IssuerUrl::new(candidate.clone()).map_err(|e| OAuthError::Invalid(format!("issuer URL: {e}")))?;
        match Metadata::discover_async(url, http).await {
            Ok(metadata) => return Ok(metadata),
            // The announced issuer differs from this spelling: try the other one.
            Err(DiscoveryError::Validation(message)) => {
                last = Some(OAuthError::Discovery { issuer: candidate, message, class: ErrorClass::Permanent })
            }
            Err(err) => return Err(discovery_error(&candidate, err)),
        }
    }
    Err(last.expect("two candidates were tried"))
}

fn discovery_error(issuer: &str, err: DiscoveryError<HttpFailure>) -> OAuthError {
    let (message, class) = match err {
        DiscoveryError::Request(HttpFailure::Status { status, .. }) => {
            (format!("HTTP {status}"), classify_status(status))
        }
        DiscoveryError::Request(HttpFailure::Transport { message, .. }) => (message, ErrorClass::Transient),
        DiscoveryError::Response(status, _, _) => (format!("HTTP {status}"), classify_status(status.as_u16())),
        // Not an OpenID Connect discovery document: a wrong issuer URL, or a proxy's error page.
        DiscoveryError::Parse(e) => (format!("not an OpenID Connect discovery document: {e}"), ErrorClass::Permanent),
        other => (other.to_string(), ErrorClass::Permanent),
    };
    OAuthError::Discovery { issuer: issuer.to_owned(), message, class }
}
