//! Faults a real Hydra cannot be made to produce on demand, from a stub identity service: each is
//! classified (permanent or transient), keeps what the controller needs (Retry-After, whether a
//! rotation may have happened), and never carries a response body into the error.

use std::time::Duration;

use base64::Engine;
use wgtwo_operator::oauth::secrets::{ClientSecret, RefreshToken};
use wgtwo_operator::oauth::{ClientConfig, ErrorClass, OAuthError, WgtwoClient};
use wgtwo_testenv::{Fault, FaultServer};

async fn client(stub: &FaultServer, timeout: Duration) -> WgtwoClient {
    let mut config = ClientConfig::new("stub-client", ClientSecret::new("stub-client-secret".into()));
    config.issuer_url = stub.base_url().to_owned();
    config.timeout = timeout;
    WgtwoClient::discover(config).await.unwrap()
}

async fn refresh_with(fault: Fault, timeout: Duration) -> (OAuthError, FaultServer) {
    let stub = FaultServer::start().await.unwrap();
    let wgtwo = client(&stub, timeout).await;
    stub.push(fault);
    let err = wgtwo.refresh(&RefreshToken::new("stub-refresh-token".into()), None).await.unwrap_err();
    (err, stub)
}

fn status(status: u16, retry_after: Option<&str>, body: &str) -> Fault {
    Fault::Status { status, retry_after: retry_after.map(str::to_owned), body: body.to_owned() }
}

#[tokio::test]
async fn refresh_request_uses_client_secret_basic_and_sends_the_scope() {
    let stub = FaultServer::start().await.unwrap();
    let wgtwo = client(&stub, Duration::from_secs(5)).await;
    let tokens =
        wgtwo.refresh(&RefreshToken::new("stub-refresh-token".into()), Some("phone offline_access")).await.unwrap();
    assert_eq!(tokens.access_token.secret(), "stub-access-0");
    let request = stub.last_token_request().unwrap();
    let basic = request.authorization.unwrap();
    let decoded = base64::engine::general_purpose::STANDARD.decode(basic.strip_prefix("Basic ").unwrap()).unwrap();
    assert_eq!(String::from_utf8(decoded).unwrap(), "stub-client:stub-client-secret");
    let form = |k: &str| request.form.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    assert_eq!(form("grant_type"), Some("refresh_token"));
    assert_eq!(form("refresh_token"), Some("stub-refresh-token"));
    assert_eq!(form("scope"), Some("phone offline_access"));
    assert_eq!(form("client_secret"), None, "the secret travels in the Basic header only");
}

#[tokio::test]
async fn service_unavailable_is_transient_and_may_hide_a_rotation() {
    let (err, _stub) = refresh_with(status(503, None, r#"{"error":"server_error"}"#), Duration::from_secs(5)).await;
    assert!(matches!(err, OAuthError::Status { status: 503, .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::Transient);
    assert!(err.outcome_unknown());
}

#[tokio::test]
async fn bad_gateway_html_page_is_transient_and_not_found_is_permanent() {
    let (err, _stub) = refresh_with(status(502, None, "<html>bad gateway</html>"), Duration::from_secs(5)).await;
    assert_eq!((err.class(), err.to_string().contains("502")), (ErrorClass::Transient, true), "{err}");
    let (err, _stub) = refresh_with(status(404, None, "<html>not found</html>"), Duration::from_secs(5)).await;
    assert_eq!(err.class(), ErrorClass::Permanent, "{err}");
    assert!(!err.to_string().contains("<html>"));
}

#[tokio::test]
async fn too_many_requests_is_transient_and_carries_retry_after_in_seconds_or_as_a_date() {
    let (err, _stub) = refresh_with(status(429, Some("7"), "{}"), Duration::from_secs(5)).await;
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)), "{err}");
    assert_eq!(err.class(), ErrorClass::Transient);
    assert!(!err.outcome_unknown(), "a 429 is a refusal: the token was not used");

    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(60));
    let (err, _stub) = refresh_with(status(429, Some(&date), "{}"), Duration::from_secs(5)).await;
    let wait = err.retry_after().unwrap();
    assert!(wait > Duration::from_secs(55) && wait <= Duration::from_secs(60), "{wait:?}");
}

#[tokio::test]
async fn slow_answer_times_out_as_transient_with_unknown_outcome() {
    let (err, stub) = refresh_with(Fault::Delay(Duration::from_secs(3)), Duration::from_secs(1)).await;
    assert!(matches!(err, OAuthError::Transport { sent: true, .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::Transient);
    assert!(err.outcome_unknown(), "the server may have rotated the token before we gave up");
    assert_eq!(stub.token_requests(), 1);
}

/// Issue 23, item 5: a 2xx answer to a refresh means the server rotated the token. One whose body
/// cannot be read at all must never lead to the old token being sent again (a reuse): it is
/// permanent, not retried.
#[tokio::test]
async fn an_unreadable_success_answer_to_a_refresh_is_permanent_with_unknown_outcome_and_never_quoted() {
    let leaky = r#"{"access_token": "leaky-token-in-a-broken-body", "token_type": "#;
    let (err, _stub) = refresh_with(Fault::Malformed(leaky.into()), Duration::from_secs(5)).await;
    assert!(matches!(err, OAuthError::AnswerUnusable { .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::Permanent, "the old token must not be sent again");
    assert!(err.outcome_unknown());
    assert!(!format!("{err} {err:?}").contains("leaky-token"), "{err:?}");
}

/// Review of issue 23: a 2xx answer whose body breaks off was a transport error (transient), so
/// the used-up token was sent again.
#[tokio::test]
async fn a_success_answer_that_breaks_off_is_permanent_with_unknown_outcome() {
    let (err, stub) = refresh_with(Fault::BrokenBody, Duration::from_secs(5)).await;
    assert!(matches!(err, OAuthError::AnswerUnusable { .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::Permanent);
    assert!(err.outcome_unknown());
    assert!(!format!("{err} {err:?}").contains("stub-access-cut"), "{err:?}");
    assert_eq!(stub.token_requests(), 1);
}

/// Issue 23, item 5: openidconnect parses the ID token while deserialising the answer, so an ID
/// token it cannot parse (an unexpected `alg`, a claim of another type) failed the whole answer,
/// and the rotated refresh token in it was lost. The tokens are now read from the raw body.
#[tokio::test]
async fn a_success_answer_the_typed_parser_refuses_keeps_its_rotated_refresh_token() {
    let body = serde_json::json!({
        "access_token": "stub-access-raw",
        "refresh_token": "stub-refresh-raw",
        "token_type": "bearer",
        "expires_in": 3600,
        "scope": "phone offline_access",
        // Not a JWS: refused by the typed parser.
        "id_token": "not-a-jwt",
    });
    let stub = FaultServer::start().await.unwrap();
    let wgtwo = client(&stub, Duration::from_secs(5)).await;
    stub.push(Fault::Malformed(body.to_string()));
    let mut journaled = None;
    let answer = wgtwo
        .refresh_then(&RefreshToken::new("stub-refresh-token".into()), None, |tokens| {
            journaled = tokens.refresh_token.as_ref().map(|t| t.secret().clone())
        })
        .await
        .unwrap();
    assert_eq!(journaled.as_deref(), Some("stub-refresh-raw"), "handed to the caller before anything else");
    let tokens = answer.tokens;
    assert_eq!(tokens.access_token.secret(), "stub-access-raw");
    assert_eq!(tokens.scope.as_deref(), Some("phone offline_access"));
    assert!(tokens.expires_at.is_some());
    assert!(tokens.id_token.is_none());
    let problem = tokens.id_token_error.unwrap();
    assert!(problem.contains("could not be read in full"), "{problem}");
    assert!(!problem.contains("not-a-jwt") && !problem.contains("stub-"), "{problem}");
    assert_eq!(stub.token_requests(), 1);
}

#[tokio::test]
async fn oauth_error_answers_keep_the_code_and_description_and_are_permanent() {
    for (status_code, code) in
        [(400, "invalid_grant"), (401, "invalid_client"), (400, "unauthorized_client"), (400, "invalid_scope")]
    {
        let body = format!(r#"{{"error":"{code}","error_description":"explained by the server"}}"#);
        let (err, _stub) = refresh_with(status(status_code, None, &body), Duration::from_secs(5)).await;
        assert_eq!(err.oauth_error(), Some(code), "{err}");
        assert_eq!(err.class(), ErrorClass::Permanent, "{code}");
        assert!(!err.outcome_unknown());
        assert!(err.to_string().contains("explained by the server"), "{err}");
    }
}

#[tokio::test]
async fn unreachable_token_endpoint_is_transient_and_the_request_was_never_sent() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let stub =
        FaultServer::start_with_token_endpoint(Some(format!("http://127.0.0.1:{port}/oauth2/token"))).await.unwrap();
    let wgtwo = client(&stub, Duration::from_secs(5)).await;
    let err = wgtwo.refresh(&RefreshToken::new("stub-refresh-token".into()), None).await.unwrap_err();
    assert!(matches!(err, OAuthError::Transport { sent: false, .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::Transient);
    assert!(!err.outcome_unknown(), "a refused connection cannot have used the token");
}
