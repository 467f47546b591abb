//! Errors of the OAuth client, and the pure decisions the controller takes from them: is a failure
//! permanent (stop, ask for re-authorization or a fixed Secret) or transient (back off, retry), when
//! may it retry, and could the server have acted on a request whose answer was lost.

use std::time::{Duration, SystemTime};

/// What to do about a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retrying the same request will fail the same way: a person must act.
    Permanent,
    /// Retry later, with backoff.
    Transient,
}

/// A failure of a call to the identity service. Messages never carry a token or a secret: the
/// server's `error_description` is kept, a response body never is.
#[derive(Clone, Debug, thiserror::Error)]
pub enum OAuthError {
    /// The server answered with an OAuth error (RFC 6749 section 5.2).
    #[error("{operation}: the identity service answered `{error}`{}", describe(.description))]
    /// Only 4xx answers land here: a 5xx is a `Status` error whatever its body.
    Rejected { operation: &'static str, error: String, description: Option<String> },
    /// The server answered with an HTTP error that is not an OAuth error.
    #[error("{operation}: the identity service answered HTTP {status}{}", retry_hint(.retry_after))]
    Status { operation: &'static str, status: u16, retry_after: Option<Duration> },
    /// The request did not complete: connect failure, TLS failure, timeout, reset.
    #[error("{operation}: {message}")]
    Transport { operation: &'static str, message: String, sent: bool },
    /// The server answered 2xx with a body we cannot use.
    #[error("{operation}: malformed response from the identity service: {message}")]
    Malformed { operation: &'static str, message: String },
    /// A 2xx answer to a refresh without an access token in it: the server accepted (so rotated)
    /// the refresh token, and the answer that held its successor cannot be read. Sending the old
    /// token again would be a reuse.
    #[error(
        "{operation}: the identity service accepted the refresh token, and its answer could not be read ({message})"
    )]
    AnswerUnusable { operation: &'static str, message: String },
    /// An ID token failed verification (signature, issuer, audience, expiry, nonce, at_hash).
    #[error("{operation}: ID token rejected: {message}")]
    IdToken { operation: &'static str, message: String },
    /// Discovery failed or the issuer's metadata is unusable.
    #[error("discovery of {issuer}: {message}")]
    Discovery { issuer: String, message: String, class: ErrorClass },
    /// The caller asked for something invalid (a short state, a bad URL): a bug or bad input.
    #[error("{0}")]
    Invalid(String),
}

fn describe(description: &Option<String>) -> String {
    description.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
}

fn retry_hint(retry_after: &Option<Duration>) -> String {
    retry_after.map(|d| format!(" (retry after {}s)", d.as_secs())).unwrap_or_default()
}

impl OAuthError {
    pub fn class(&self) -> ErrorClass {
        match self {
            OAuthError::Rejected { error, description, .. } => classify_rejection(error, description.as_deref()),
            OAuthError::Status { status, .. } => classify_status(*status),
            OAuthError::Transport { .. } | OAuthError::Malformed { .. } => ErrorClass::Transient,
            OAuthError::IdToken { .. } | OAuthError::Invalid(_) | OAuthError::AnswerUnusable { .. } => {
                ErrorClass::Permanent
            }
            OAuthError::Discovery { class, .. } => *class,
        }
    }

    /// The OAuth `error` code, when the server sent one.
    pub fn oauth_error(&self) -> Option<&str> {
        match self {
            OAuthError::Rejected { error, .. } => Some(error),
            _ => None,
        }
    }

    /// How long the server asked us to wait (`Retry-After`), if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            OAuthError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// True when the server may have processed the request although we got no usable answer: a
    /// refresh may then have rotated the refresh token, and retrying with the old one would be seen
    /// as token reuse. False only when the request provably never reached the server, or the server
    /// answered and refused it.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            OAuthError::Transport { sent, .. } => *sent,
            OAuthError::Malformed { .. } | OAuthError::AnswerUnusable { .. } => true,
            // A 5xx may come from a proxy after the server acted; 429 and 408 are refusals.
            OAuthError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// Classifies a 4xx OAuth error answer. Hydra (fosite) answers `invalid_request` with "... Please
/// retry the request." when concurrent requests raced on the same refresh token (for example one
/// from a process killed mid-request): the token may still be valid, so this one is retried. A
/// retry after the other request won is a reuse and ends as `invalid_grant`, which is permanent.
pub fn classify_rejection(error: &str, description: Option<&str>) -> ErrorClass {
    let asks_for_retry = description.is_some_and(|d| d.to_ascii_lowercase().contains("retry the request"));
    if error == "invalid_request" && asks_for_retry {
        return ErrorClass::Transient;
    }
    classify_oauth_error(error)
}

/// Classifies the OAuth error code of a 4xx answer (RFC 6749 section 5.2, RFC 6750, OpenID Connect).
pub fn classify_oauth_error(error: &str) -> ErrorClass {
    match error {
        "invalid_grant"
        | "invalid_client"
        | "unauthorized_client"
        | "invalid_scope"
        | "unsupported_grant_type"
        | "invalid_request"
        | "access_denied"
        | "invalid_token"
        | "insufficient_scope" => ErrorClass::Permanent,
        "temporarily_unavailable" | "server_error" | "slow_down" => ErrorClass::Transient,
        // An unknown code on a 4xx: the server refused this request, and will refuse it again.
        _ => ErrorClass::Permanent,
    }
}

/// Classifies an HTTP status without an OAuth error body.
pub fn classify_status(status: u16) -> ErrorClass {
    match status {
        408 | 425 | 429 => ErrorClass::Transient,
        500..=599 => ErrorClass::Transient,
        _ => ErrorClass::Permanent,
    }
}

/// Parses `Retry-After` (RFC 9110 section 10.2.3): delay-seconds or an HTTP-date. A date in the
/// past means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_and_client_errors_are_permanent() {
        for code in
            ["invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope", "unsupported_grant_type"]
        {
            assert_eq!(classify_oauth_error(code), ErrorClass::Permanent, "{code}");
        }
    }

    #[test]
    fn server_side_oauth_errors_are_transient() {
        for code in ["temporarily_unavailable", "server_error", "slow_down"] {
            assert_eq!(classify_oauth_error(code), ErrorClass::Transient, "{code}");
        }
    }

    #[test]
    fn hydra_asking_to_retry_after_a_concurrent_refresh_is_transient() {
        // fosite v0.49.0, handler/oauth2/flow_refresh.go: ErrInvalidRequest with these hints.
        let request = "The request is missing a required parameter, includes an invalid parameter value, includes a parameter more than once, or is otherwise malformed.";
        for hint in [
            "Failed to refresh token because of multiple concurrent requests using the same token. Please retry the request.",
            "Failed to refresh token. Please retry the request.",
        ] {
            let description = format!("{request} {hint}");
            assert_eq!(classify_rejection("invalid_request", Some(&description)), ErrorClass::Transient);
        }
        assert_eq!(classify_rejection("invalid_request", Some(request)), ErrorClass::Permanent);
        assert_eq!(classify_rejection("invalid_request", None), ErrorClass::Permanent);
        assert_eq!(classify_rejection("invalid_grant", Some("Please retry the request.")), ErrorClass::Permanent);
    }

    #[test]
    fn unknown_oauth_error_on_a_4xx_is_permanent() {
        assert_eq!(classify_oauth_error("vendor_refusal"), ErrorClass::Permanent);
    }

    #[test]
    fn server_errors_throttling_and_timeouts_are_transient_other_4xx_permanent() {
        for status in [408, 425, 429, 500, 502, 503, 504, 599] {
            assert_eq!(classify_status(status), ErrorClass::Transient, "{status}");
        }
        for status in [400, 401, 403, 404, 405, 410] {
            assert_eq!(classify_status(status), ErrorClass::Permanent, "{status}");
        }
    }

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(90)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn only_answers_that_may_hide_a_rotation_are_outcome_unknown() {
        let op = "refresh";
        let sent = OAuthError::Transport { operation: op, message: "timed out".into(), sent: true };
        let unsent = OAuthError::Transport { operation: op, message: "connection refused".into(), sent: false };
        let malformed = OAuthError::Malformed { operation: op, message: "expected value".into() };
        let unavailable = OAuthError::Status { operation: op, status: 503, retry_after: None };
        let throttled = OAuthError::Status { operation: op, status: 429, retry_after: None };
        let rejected = OAuthError::Rejected { operation: op, error: "invalid_grant".into(), description: None };
        assert!(sent.outcome_unknown() && malformed.outcome_unknown() && unavailable.outcome_unknown());
        assert!(!unsent.outcome_unknown() && !throttled.outcome_unknown() && !rejected.outcome_unknown());
    }

    #[test]
    fn messages_name_the_operation_and_the_oauth_error() {
        let err = OAuthError::Rejected {
            operation: "refresh",
            error: "invalid_grant".into(),
            description: Some("The refresh token has been used".into()),
        };
        assert_eq!(
            err.to_string(),
            "refresh: the identity service answered `invalid_grant`: The refresh token has been used"
        );
        let err = OAuthError::Status { operation: "refresh", status: 429, retry_after: Some(Duration::from_secs(7)) };
        assert_eq!(err.to_string(), "refresh: the identity service answered HTTP 429 (retry after 7s)");
        assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(err.class(), ErrorClass::Transient);
    }
}
