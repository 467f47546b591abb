//! The grant's status and its Ready condition: machine reasons, human messages that say what to do.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::WgtwoGrantStatus;

pub const READY: &str = "Ready";

/// Machine reasons of the Ready condition (also the `reason` of Events).
pub mod reason {
    pub const REFRESHED: &str = "Refreshed";
    pub const RETRYING_REFRESH: &str = "RetryingRefresh";
    pub const IDENTITY_SERVICE_UNAVAILABLE: &str = "IdentityServiceUnavailable";
    pub const INVALID_GRANT: &str = "InvalidGrant";
    pub const INVALID_CLIENT: &str = "InvalidClient";
    pub const UNAUTHORIZED_CLIENT: &str = "UnauthorizedClient";
    pub const INVALID_SCOPE: &str = "InvalidScope";
    pub const REFRESH_REJECTED: &str = "RefreshRejected";
    /// The identity service accepted a refresh, and its answer could not be read: the refresh
    /// token is used up, its successor unknown.
    pub const REFRESH_OUTCOME_UNKNOWN: &str = "RefreshOutcomeUnknown";
    /// A product token request was refused for a reason other than the client or the scope.
    pub const TOKEN_REQUEST_REJECTED: &str = "TokenRequestRejected";
    pub const DISCOVERY_FAILED: &str = "DiscoveryFailed";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
    pub const TARGET_CONFLICT: &str = "TargetConflict";
    pub const STATE_CONFLICT: &str = "StateConflict";
    pub const ISSUER_NOT_ALLOWED: &str = "IssuerNotAllowed";
    /// An input names a Secret the operator writes (another grant's state or target).
    pub const SECRET_NOT_ALLOWED: &str = "SecretNotAllowed";
    /// The refresh-token Secret is an older grant's: one refresh token starts one lineage.
    pub const REFRESH_TOKEN_IN_USE: &str = "RefreshTokenInUse";
    /// `spec.target.template` cannot be applied (the token is still renewed and published).
    pub const TEMPLATE_INVALID: &str = "TemplateInvalid";
    pub const PERSIST_FAILED: &str = "PersistFailed";
    /// A refresh answer's ID token failed verification (Events only: the tokens were kept).
    pub const ID_TOKEN_NOT_VERIFIED: &str = "IdTokenNotVerified";
    /// A request to the Kubernetes API failed (metrics only).
    pub const KUBERNETES_API: &str = "KubernetesAPIError";
}

/// The Ready condition, keeping `lastTransitionTime` when the status did not change.
pub fn ready_condition(
    previous: Option<&Condition>,
    ready: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ready { "True" } else { "False" };
    let last_transition_time = match previous {
        Some(prev) if prev.status == status => prev.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        type_: READY.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

pub fn previous_ready(status: Option<&WgtwoGrantStatus>) -> Option<&Condition> {
    status?.conditions.iter().find(|c| c.type_ == READY)
}

/// While transient failures are being retried, the next attempt recorded in the status (so that a
/// restart or a new leader keeps the backoff). Not after a spec change: that is a fresh start.
pub fn retry_not_before(status: Option<&WgtwoGrantStatus>, generation: Option<i64>) -> Option<Timestamp> {
    let status = status?;
    let retrying = previous_ready(Some(status))
        .is_some_and(|c| c.reason == reason::RETRYING_REFRESH || c.reason == reason::IDENTITY_SERVICE_UNAVAILABLE);
    let same_spec = status.observed_generation == generation;
    (retrying && same_spec && status.failed_attempts.unwrap_or(0) > 0)
        .then(|| status.next_refresh_time.as_ref().map(|t| t.0))
        .flatten()
}

/// Whether a grant has lost a Secret it keeps (the target, or the state of a subscriber's grant)
/// by all signs: it was served (its status records a published token), or `seen_gone` (this
/// process saw one of them deleted, or holds an answer for them). Kubernetes' garbage collector
/// deletes them once the grant is being deleted, which the grant watch may show after the Secret
/// watch (watches of different resources are not ordered), so it is the sign to read the grant
/// itself. A grant with neither sign is new (or never got that far): nothing to read.
pub fn secrets_lost(
    status: Option<&WgtwoGrantStatus>,
    seen_gone: bool,
    keeps_state: bool,
    has_state: bool,
    has_target: bool,
) -> bool {
    let served = status.is_some_and(|s| s.last_refresh_time.is_some());
    let missing = !has_target || (keeps_state && !has_state);
    (served || seen_gone) && missing
}

/// The status with `condition` as its Ready condition (other conditions kept).
pub fn with_ready(status: Option<&WgtwoGrantStatus>, condition: Condition) -> WgtwoGrantStatus {
    let mut next = status.cloned().unwrap_or_default();
    next.conditions.retain(|c| c.type_ != READY);
    next.conditions.push(condition);
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let t1 = Timestamp::from_second(1_700_000_100).unwrap();
        let first = ready_condition(None, true, reason::REFRESHED, "ok".into(), Some(1), t0);
        let same = ready_condition(Some(&first), true, reason::RETRYING_REFRESH, "retrying".into(), Some(1), t1);
        assert_eq!(same.last_transition_time, Time(t0));
        let flipped = ready_condition(Some(&same), false, reason::INVALID_GRANT, "re-authorize".into(), Some(1), t1);
        assert_eq!(flipped.last_transition_time, Time(t1));
        assert_eq!(flipped.status, "False");
    }

    #[test]
    fn secrets_count_as_lost_once_the_grant_was_served_or_one_was_seen_gone_and_state_only_where_one_is_kept() {
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let served = WgtwoGrantStatus { last_refresh_time: Some(Time(t0)), ..Default::default() };
        let never = WgtwoGrantStatus::default();
        // (status, seen gone, keeps state, has state, has target)
        assert!(secrets_lost(Some(&served), false, true, true, false));
        assert!(secrets_lost(Some(&served), false, true, false, true));
        assert!(secrets_lost(Some(&served), false, false, false, false));
        assert!(!secrets_lost(Some(&served), false, true, true, true));
        assert!(!secrets_lost(Some(&served), false, false, false, true), "a product grant keeps no state");
        assert!(!secrets_lost(Some(&never), false, true, false, false), "a new grant has nothing yet");
        assert!(!secrets_lost(None, false, true, false, false));
        // Never served (e.g. refused at its first attempt, the refusal kept in its state Secret),
        // but its state Secret was seen deleted.
        assert!(secrets_lost(Some(&never), true, true, false, false));
        assert!(secrets_lost(None, true, false, false, false));
        assert!(!secrets_lost(None, true, true, true, true), "nothing is missing (written again since)");
    }

    #[test]
    fn with_ready_replaces_only_the_ready_condition() {
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let mut status = WgtwoGrantStatus::default();
        status
            .conditions
            .push(Condition { type_: "Other".into(), ..ready_condition(None, true, "X", "x".into(), None, t0) });
        status.conditions.push(ready_condition(None, false, "Y", "y".into(), None, t0));
        let next = with_ready(Some(&status), ready_condition(None, true, "Z", "z".into(), None, t0));
        assert_eq!(next.conditions.len(), 2);
        assert!(next.conditions.iter().any(|c| c.type_ == "Other"));
        assert_eq!(previous_ready(Some(&next)).unwrap().reason, "Z");
    }

    #[test]
    fn the_backoff_in_the_status_applies_only_while_retrying_the_same_spec() {
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let next = Timestamp::from_second(1_700_000_060).unwrap();
        let retrying = |why: &str| WgtwoGrantStatus {
            conditions: vec![ready_condition(None, true, why, "m".into(), Some(2), t0)],
            failed_attempts: Some(3),
            next_refresh_time: Some(Time(next)),
            observed_generation: Some(2),
            ..Default::default()
        };
        assert_eq!(retry_not_before(Some(&retrying(reason::RETRYING_REFRESH)), Some(2)), Some(next));
        assert_eq!(retry_not_before(Some(&retrying(reason::IDENTITY_SERVICE_UNAVAILABLE)), Some(2)), Some(next));
        assert_eq!(retry_not_before(Some(&retrying(reason::REFRESHED)), Some(2)), None);
        assert_eq!(retry_not_before(Some(&retrying(reason::RETRYING_REFRESH)), Some(3)), None, "spec changed");
        let mut no_count = retrying(reason::RETRYING_REFRESH);
        no_count.failed_attempts = None;
        assert_eq!(retry_not_before(Some(&no_count), Some(2)), None);
        assert_eq!(retry_not_before(None, Some(2)), None);
    }
}
