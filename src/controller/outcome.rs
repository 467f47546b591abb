//! How each outcome of a reconcile shows, in one place for both grant kinds: the Ready condition
//! (status, reason, message), the Event, the metric labels, whether the inputs are remembered as
//! refused, and when the grant is looked at again. Pure: the reconcile does the I/O.

use std::time::Duration;

use jiff::Timestamp;

use super::status::reason;
use crate::metrics;
use crate::oauth::{ErrorClass, OAuthError};

/// Decided again shortly: a write landed whose watch event has not, a cache was behind.
pub const AGAIN_SOON: Duration = Duration::from_millis(200);
/// The Lease is held with too little margin for a token request: after the next renewal.
pub const LEASE_WAIT: Duration = Duration::from_secs(1);
/// Until the Secrets a reconcile waits for are listed (bounded, so shutdown is never held up).
pub const CACHE_WAIT: Duration = Duration::from_secs(1);
/// When an input is missing or in conflict. The Secret watch reacts to a fix at once; this is a
/// safety net (and picks up a conflict that ended with another grant's deletion).
pub const INPUT_RECHECK: Duration = Duration::from_secs(5 * 60);
/// When a refresh was refused for good, how often to look again without any change (no token
/// request is sent with the same inputs).
pub const PERMANENT_RECHECK: Duration = Duration::from_secs(30 * 60);

/// The grant a failure is about, as far as its advice goes.
pub enum Grant<'a> {
    /// A subscriber's grant: refused authorizations are re-authorized.
    Subscriber { name: &'a str, namespace: &'a str, token_secret: &'a str, token_key: &'a str, client_secret: &'a str },
    /// A product grant (client credentials): no subscriber, no re-authorization.
    Product { client_secret: &'a str },
}

/// When a failed grant's token is requested again.
#[derive(Debug, PartialEq, Eq)]
pub enum Retry {
    /// With exponential backoff (kept in the status, so a restart continues it).
    Backoff,
    /// Not with the same inputs: rechecked every [`PERMANENT_RECHECK`] and on any change.
    WhenInputsChange,
}

/// A failed token request as the grant shows it.
#[derive(Debug, PartialEq, Eq)]
pub struct Failed {
    /// The Ready condition's reason, and the `reason` of the error metric.
    pub reason: &'static str,
    /// The Ready condition's status.
    pub ready: bool,
    /// The Warning Event's reason.
    pub event: &'static str,
    /// The Ready condition's and the Event's message.
    pub message: String,
    pub retry: Retry,
    /// The inputs' fingerprint is written to the state Secret, so they are not sent again.
    pub remember_refusal: bool,
}

/// What a failed token request shows. `valid_until`: the published access token's expiry, while
/// it is valid.
pub fn failed(err: &OAuthError, grant: &Grant, valid_until: Option<Timestamp>) -> Failed {
    let still_valid = still_valid(valid_until);
    if err.class() == ErrorClass::Transient {
        // The same words on every retry: the condition and the Event change only when the reason does.
        // A request that reached the server and whose answer was lost may have rotated the token:
        // the retry then is refused, and says so.
        let maybe_rotated = match err.outcome_unknown() {
            true => " The identity service may have acted on it: if the retry is refused (InvalidGrant), re-authorize.",
            false => "",
        };
        return Failed {
            reason: if valid_until.is_some() { reason::RETRYING_REFRESH } else { reason::IDENTITY_SERVICE_UNAVAILABLE },
            ready: valid_until.is_some(),
            event: "RefreshFailed",
            message: format!(
                "Refresh failed: {}. Retrying with backoff; status.nextRefreshTime is the next attempt.{maybe_rotated}{still_valid}",
                sentence(err)
            ),
            retry: Retry::Backoff,
            remember_refusal: false,
        };
    }
    let (why, advice) = match grant {
        Grant::Subscriber { name, namespace, token_secret, token_key, client_secret } => {
            subscriber_advice(err, name, namespace, token_secret, token_key, client_secret)
        }
        Grant::Product { client_secret } => product_advice(err, client_secret),
    };
    Failed {
        reason: why,
        ready: false,
        event: why,
        message: format!("{}. {}.{still_valid}", sentence(err), advice.trim_end_matches('.')),
        retry: Retry::WhenInputsChange,
        // A subscriber's lineage whose token the server refused, or used up without a usable answer.
        remember_refusal: matches!(grant, Grant::Subscriber { .. })
            && matches!(err, OAuthError::Rejected { .. } | OAuthError::AnswerUnusable { .. }),
    }
}

/// The closing sentence of a failure's message: what workloads still have.
pub fn still_valid(valid_until: Option<Timestamp>) -> String {
    match valid_until {
        Some(at) => format!(" The published access token stays valid until {at}."),
        None => " No valid access token is published.".into(),
    }
}

/// The `result` label of a token request's metrics.
pub fn request_result(error: Option<&OAuthError>) -> &'static str {
    match error {
        None => metrics::result::SUCCESS,
        Some(e) if e.class() == ErrorClass::Permanent => metrics::result::REJECTED,
        Some(_) => metrics::result::RETRYABLE_ERROR,
    }
}

fn client_advice(client_secret: &str) -> String {
    format!("Check client_id and client_secret in Secret {client_secret}")
}

fn subscriber_advice(
    err: &OAuthError,
    grant: &str,
    namespace: &str,
    token_secret: &str,
    token_key: &str,
    client_secret: &str,
) -> (&'static str, String) {
    let client = client_advice(client_secret);
    let reauthorize = format!(
        "Re-authorize: put a new refresh token into Secret {token_secret} key {token_key} (wgtwo-operator authorize {grant} -n {namespace})"
    );
    match err.oauth_error() {
        Some("invalid_grant") => (
            reason::INVALID_GRANT,
            format!("The authorization has ended or its refresh token was already used. {reauthorize}"),
        ),
        Some("invalid_client") => (reason::INVALID_CLIENT, format!("The OAuth client was refused. {client}")),
        Some("unauthorized_client") => {
            (reason::UNAUTHORIZED_CLIENT, format!("The client may not use the refresh_token grant. {client}"))
        }
        Some("invalid_scope") => {
            (reason::INVALID_SCOPE, "Fix spec.scope: it must be within the authorized scope".into())
        }
        Some(_) => (reason::REFRESH_REJECTED, reauthorize),
        None if matches!(err, OAuthError::Discovery { .. }) => {
            (reason::DISCOVERY_FAILED, "Check spec.issuerUrl: it must be the identity service's base URL".into())
        }
        None if matches!(err, OAuthError::AnswerUnusable { .. }) => (
            reason::REFRESH_OUTCOME_UNKNOWN,
            format!(
                "The refresh token is used up and its successor was lost with the answer, so it is not sent again (that would be a reuse). {reauthorize}"
            ),
        ),
        None => (reason::REFRESH_REJECTED, "Check spec.issuerUrl and the client Secret".into()),
    }
}

/// Nothing here speaks of subscribers or re-authorization: a product token has neither.
fn product_advice(err: &OAuthError, client_secret: &str) -> (&'static str, String) {
    let client = client_advice(client_secret);
    match err.oauth_error() {
        Some("invalid_client") => (reason::INVALID_CLIENT, format!("The OAuth client was refused. {client}")),
        Some("unauthorized_client") => (
            reason::UNAUTHORIZED_CLIENT,
            format!(
                "The client may not use the client_credentials grant: allow it for the client at the identity service, or use a client that may. {client}"
            ),
        ),
        Some("invalid_scope") => (
            reason::INVALID_SCOPE,
            "Fix spec.scope: the client is not allowed every scope it asks for (unset, the client's default scope is used)".into(),
        ),
        None if matches!(err, OAuthError::Discovery { .. }) => {
            (reason::DISCOVERY_FAILED, "Check spec.issuerUrl: it must be the identity service's base URL".into())
        }
        _ => (reason::TOKEN_REQUEST_REJECTED, format!("Check spec.issuerUrl, spec.scope and the client. {client}")),
    }
}

/// An error as the start of a sentence in a message: without the final period the server's
/// description may bring, since the message adds its own.
pub fn sentence(err: &OAuthError) -> String {
    err.to_string().trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscriber() -> Grant<'static> {
        Grant::Subscriber {
            name: "alice",
            namespace: "team-a",
            token_secret: "alice-authorization",
            token_key: "refresh_token",
            client_secret: "wgtwo-client",
        }
    }

    fn rejected(code: &str) -> OAuthError {
        OAuthError::Rejected { operation: "refresh", error: code.into(), description: None }
    }

    /// The whole table: each failure, for each grant kind, to its reason, readiness, retry and
    /// whether the inputs are remembered as refused.
    #[test]
    fn every_failure_maps_to_one_reason_retry_and_memory_for_each_grant_kind() {
        let product = Grant::Product { client_secret: "wgtwo-client" };
        let valid = Some(Timestamp::from_second(1_900_000_000).unwrap());
        let transient = OAuthError::Status { operation: "refresh", status: 503, retry_after: None };
        let unusable = OAuthError::AnswerUnusable { operation: "refresh", message: "no access token".into() };
        let discovery = OAuthError::Discovery {
            issuer: "https://id".into(),
            message: "HTTP 404".into(),
            class: ErrorClass::Permanent,
        };
        type Case<'a> = (&'a OAuthError, &'a Grant<'a>, Option<Timestamp>, &'a str, bool, Retry, bool);
        let cases: [Case; 12] = [
            (&transient, &subscriber(), valid, reason::RETRYING_REFRESH, true, Retry::Backoff, false),
            (&transient, &subscriber(), None, reason::IDENTITY_SERVICE_UNAVAILABLE, false, Retry::Backoff, false),
            (&transient, &product, valid, reason::RETRYING_REFRESH, true, Retry::Backoff, false),
            (
                &rejected("invalid_grant"),
                &subscriber(),
                valid,
                reason::INVALID_GRANT,
                false,
                Retry::WhenInputsChange,
                true,
            ),
            (
                &rejected("invalid_client"),
                &subscriber(),
                None,
                reason::INVALID_CLIENT,
                false,
                Retry::WhenInputsChange,
                true,
            ),
            (
                &rejected("invalid_client"),
                &product,
                None,
                reason::INVALID_CLIENT,
                false,
                Retry::WhenInputsChange,
                false,
            ),
            (
                &rejected("unauthorized_client"),
                &product,
                None,
                reason::UNAUTHORIZED_CLIENT,
                false,
                Retry::WhenInputsChange,
                false,
            ),
            (
                &rejected("invalid_scope"),
                &subscriber(),
                None,
                reason::INVALID_SCOPE,
                false,
                Retry::WhenInputsChange,
                true,
            ),
            (
                &rejected("access_denied"),
                &product,
                None,
                reason::TOKEN_REQUEST_REJECTED,
                false,
                Retry::WhenInputsChange,
                false,
            ),
            (&unusable, &subscriber(), valid, reason::REFRESH_OUTCOME_UNKNOWN, false, Retry::WhenInputsChange, true),
            (&discovery, &subscriber(), None, reason::DISCOVERY_FAILED, false, Retry::WhenInputsChange, false),
            (&discovery, &product, None, reason::DISCOVERY_FAILED, false, Retry::WhenInputsChange, false),
        ];
        for (err, grant, valid_until, why, ready, retry, remember) in cases {
            let f = failed(err, grant, valid_until);
            assert_eq!((f.reason, f.ready, &f.retry, f.remember_refusal), (why, ready, &retry, remember), "{err}");
            assert!(
                f.message.ends_with(if valid_until.is_some() {
                    "stays valid until 2030-03-17T17:46:40Z."
                } else {
                    "No valid access token is published."
                }),
                "{}",
                f.message
            );
        }
    }

    #[test]
    fn a_subscriber_is_told_how_to_re_authorize_and_a_product_grant_never_is() {
        let f = failed(&rejected("invalid_grant"), &subscriber(), None);
        assert!(f.message.contains("wgtwo-operator authorize alice -n team-a"), "{}", f.message);
        assert!(f.message.contains("Secret alice-authorization key refresh_token"), "{}", f.message);
        for code in ["invalid_client", "unauthorized_client", "invalid_scope", "invalid_request"] {
            let f = failed(&rejected(code), &Grant::Product { client_secret: "c" }, None);
            assert!(!f.message.contains("authoriz") || code == "unauthorized_client", "{code}: {}", f.message);
            assert!(!f.message.contains("subscriber") && !f.message.contains("Re-authorize"), "{code}: {}", f.message);
        }
    }
}
