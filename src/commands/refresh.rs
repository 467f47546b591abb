//! `wgtwo-operator refresh NAME -n NS`: asks the operator for a refresh now (the refresh-requested
//! annotation, as `cmctl renew` does for certificates), waits until it is handled and says how it
//! went.

use std::time::Duration;

use anyhow::{anyhow, bail};
use jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};

use super::{api_error, get_grant, relative};
use crate::api::{ANNOTATION_REFRESH_REQUESTED, WgtwoGrant, WgtwoGrantStatus};
use crate::controller::status::{READY, reason};

/// How a requested refresh went, as far as the status tells.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The request was handled: the new token's expiry, the next refresh, and a template problem
    /// if the status carries one (the token was published all the same).
    Refreshed {
        expires_at: Option<Timestamp>,
        next: Option<Timestamp>,
        note: Option<String>,
    },
    /// A token request failed after the refresh was requested (or an input problem stopped it).
    Failed {
        reason: String,
        message: String,
    },
    Waiting,
}

/// Ready reasons under which the operator sends no token request until someone fixes the cause:
/// a refresh request would wait forever.
const BLOCKING: &[&str] = &[
    reason::INVALID_GRANT,
    reason::INVALID_CLIENT,
    reason::UNAUTHORIZED_CLIENT,
    reason::INVALID_SCOPE,
    reason::REFRESH_REJECTED,
    reason::TOKEN_REQUEST_REJECTED,
    reason::DISCOVERY_FAILED,
    reason::ISSUER_NOT_ALLOWED,
    reason::SECRET_NOT_FOUND,
    reason::SECRET_KEY_MISSING,
    reason::TARGET_CONFLICT,
    reason::STATE_CONFLICT,
];

/// Why a refresh cannot be requested now, if it cannot: the grant is not ready for a reason only
/// a fix can end.
pub fn blocked(status: Option<&WgtwoGrantStatus>) -> Option<(String, String)> {
    let c = status?.conditions.iter().find(|c| c.type_ == READY)?;
    (c.status == "False" && BLOCKING.contains(&c.reason.as_str())).then(|| (c.reason.clone(), c.message.clone()))
}

/// What the status says about the request `requested` made at `requested_at`.
pub fn outcome(status: Option<&WgtwoGrantStatus>, requested: &str, requested_at: Timestamp) -> Outcome {
    let Some(status) = status else { return Outcome::Waiting };
    let ready = status.conditions.iter().find(|c| c.type_ == READY);
    if status.refresh_request_handled.as_deref() == Some(requested) {
        let note = ready.filter(|c| c.status != "True").map(|c| format!("{}: {}", c.reason, c.message));
        return Outcome::Refreshed {
            expires_at: status.expires_at.as_ref().map(|t| t.0),
            next: status.next_refresh_time.as_ref().map(|t| t.0),
            note,
        };
    }
    // The status keeps whole seconds.
    let since = Timestamp::from_second(requested_at.as_second()).unwrap_or(requested_at);
    let failed_since = status.last_failure_time.as_ref().is_some_and(|t| t.0 >= since);
    let blocked_since = ready.is_some_and(|c| {
        c.status == "False" && BLOCKING.contains(&c.reason.as_str()) && c.last_transition_time.0 >= since
    });
    match ready {
        Some(c) if failed_since || blocked_since => {
            Outcome::Failed { reason: c.reason.clone(), message: c.message.clone() }
        }
        _ => Outcome::Waiting,
    }
}

/// Requests the refresh and waits up to `timeout` for its outcome, printing it.
pub async fn run(
    client: kube::Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let api: Api<WgtwoGrant> = Api::namespaced(client, namespace);
    let grant = get_grant(&api, namespace, name).await?;
    if let Some((why, message)) = blocked(grant.status.as_ref()) {
        bail!(
            "WgtwoGrant {namespace}/{name} is not ready ({why}): {message}. The operator sends no token request until that is fixed, so a refresh cannot be requested"
        );
    }
    let requested_at = Timestamp::now();
    // Nanoseconds: every request is a new value, which is what the operator acts on.
    let requested = requested_at.to_string();
    let patch = serde_json::json!({"metadata": {"annotations": {ANNOTATION_REFRESH_REQUESTED: requested}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| api_error(&format!("annotate WgtwoGrant {namespace}/{name}"), e))?;
    writeln!(
        out,
        "Refresh of {namespace}/{name} requested ({ANNOTATION_REFRESH_REQUESTED}={requested}); waiting up to {}s",
        timeout.as_secs()
    )?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let grant = get_grant(&api, namespace, name).await?;
        match outcome(grant.status.as_ref(), &requested, requested_at) {
            Outcome::Refreshed { expires_at, next, note } => {
                let now = Timestamp::now();
                let at = |t: Option<Timestamp>| {
                    t.map(|t| format!("{t} ({})", relative(t, now))).unwrap_or_else(|| "-".into())
                };
                writeln!(
                    out,
                    "Refreshed: the access token in Secret {} is valid until {}; next refresh {}",
                    grant.spec.target.secret_name,
                    at(expires_at),
                    at(next)
                )?;
                if let Some(note) = note {
                    writeln!(out, "Note: {note}")?;
                }
                return Ok(());
            }
            Outcome::Failed { reason, message } => bail!("refresh of {namespace}/{name} failed ({reason}): {message}"),
            Outcome::Waiting => {}
        }
        if tokio::time::Instant::now() >= deadline {
            let next = grant.status.as_ref().and_then(|s| s.next_refresh_time.as_ref()).map(|t| t.0);
            let retrying = grant.status.as_ref().and_then(|s| s.failed_attempts).is_some();
            return Err(match (retrying, next) {
                (true, Some(next)) => anyhow!(
                    "the refresh was not handled within {}s: the operator is retrying failed refreshes and acts on the request at its next attempt, {next}",
                    timeout.as_secs()
                ),
                _ => anyhow!(
                    "the refresh was not handled within {}s: is the operator running and does it watch namespace {namespace}? (status.refreshRequestHandled is not {requested} yet)",
                    timeout.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn condition(status: &str, reason: &str, at: Timestamp) -> Condition {
        Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: reason.into(),
            message: format!("{reason} message"),
            last_transition_time: Time(at),
            observed_generation: None,
        }
    }

    #[test]
    fn a_refresh_is_done_when_its_value_is_handled_and_failed_when_a_failure_follows_the_request() {
        let asked = Timestamp::from_second(1_700_000_000).unwrap();
        let before = Timestamp::from_second(1_699_999_000).unwrap();
        let mut s = WgtwoGrantStatus {
            conditions: vec![condition("True", "Refreshed", before)],
            last_failure_time: Some(Time(before)),
            refresh_request_handled: Some("older".into()),
            ..Default::default()
        };
        assert_eq!(outcome(Some(&s), "mine", asked), Outcome::Waiting, "old failures are not this request's");
        assert_eq!(outcome(None, "mine", asked), Outcome::Waiting);
        s.conditions = vec![condition("True", "RetryingRefresh", asked)];
        s.last_failure_time = Some(Time(asked));
        assert!(
            matches!(outcome(Some(&s), "mine", asked), Outcome::Failed { reason, .. } if reason == "RetryingRefresh")
        );
        s.refresh_request_handled = Some("mine".into());
        s.conditions = vec![condition("False", "TemplateInvalid", asked)];
        s.expires_at = Some(Time(asked));
        let Outcome::Refreshed { expires_at, note, .. } = outcome(Some(&s), "mine", asked) else { panic!() };
        assert_eq!(expires_at, Some(asked));
        assert!(note.unwrap().starts_with("TemplateInvalid"), "published, with the template problem told");
    }

    #[test]
    fn only_a_not_ready_grant_waiting_for_a_fix_blocks_a_request() {
        let at = Timestamp::from_second(1_700_000_000).unwrap();
        let with = |c: Condition| WgtwoGrantStatus { conditions: vec![c], ..Default::default() };
        assert!(blocked(Some(&with(condition("False", "InvalidGrant", at)))).is_some());
        assert!(blocked(Some(&with(condition("False", "SecretNotFound", at)))).is_some());
        assert!(blocked(Some(&with(condition("False", "IdentityServiceUnavailable", at)))).is_none(), "retried anyway");
        assert!(
            blocked(Some(&with(condition("False", "TemplateInvalid", at)))).is_none(),
            "the token is still renewed"
        );
        assert!(blocked(Some(&with(condition("True", "Refreshed", at)))).is_none());
        assert!(blocked(None).is_none());
    }
}
