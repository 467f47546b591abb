//! What a grant shows: its status (the Ready condition and the refresh bookkeeping, built on this
//! process's own last write when the cache lags it) and its Events; failures as
//! [`super::outcome`] maps them.

use super::*;

impl Run<'_> {
    /// The rotated refresh token is held only in memory (and the journal): the status says so, as
    /// the grant would not survive a restart without the journal. Best effort: the apiserver that
    /// refused the write may refuse this too.
    pub(super) async fn report_persist_failure(&self, failure: &Error, target: Option<&Secret>) {
        let Error::PersistFailed { public, .. } = failure else { return };
        let valid_until =
            target.and_then(target::published_token).map(|t| t.expires_at).filter(|at| *at > Timestamp::now());
        let still_valid = outcome::still_valid(valid_until);
        let message = format!(
            "The rotated refresh token could not be written to Secret {} ({public}); it is kept in memory and the write is retried. Until it is written, a restart of the operator without its journal ends this grant.{still_valid}",
            self.state_name()
        );
        let why = reason::PERSIST_FAILED;
        let changed = status::previous_ready(self.current_status().as_ref()).is_none_or(|c| c.reason != why);
        if changed {
            self.event(EventType::Warning, why, message.clone()).await;
        }
        if let Err(err) = self.set_ready(valid_until.is_some(), why, message, |_| {}).await {
            debug!(error = %err, "could not report the failed state write in the status");
        }
    }

    /// A failed token request (or, for a product grant, the shared failure of its key), shown as
    /// [`outcome::failed`] says. `refused` is a subscriber's lineage: a refusal is remembered in its
    /// state Secret.
    pub(super) async fn refresh_failed(
        &self,
        err: OAuthError,
        refused: Option<Refused<'_>>,
        published: Option<schedule::TokenTimes>,
    ) -> Result<Next, Error> {
        let now = Timestamp::now();
        let valid_until = published.map(|t| t.expires_at).filter(|at| *at > now);
        let spec = &self.grant.spec;
        let name = self.grant.name_any();
        let client_secret = &*spec.client_secret;
        let grant = match spec.refresh_token.as_ref() {
            Some(token) => outcome::Grant::Subscriber {
                name: &name,
                namespace: &self.ns,
                token_secret: &token.name,
                token_key: &token.key,
                client_secret,
            },
            None => outcome::Grant::Product { client_secret },
        };
        let shown = outcome::failed(&err, &grant, valid_until);
        let attempts = self.failed_attempts().saturating_add(1);
        let failed_at = Time(whole_seconds(now));
        self.ctx.shared.metrics.reconcile_error(shown.reason);
        if shown.retry == outcome::Retry::WhenInputsChange {
            if let Some(Refused { chosen, fingerprint, state }) = refused
                && shown.remember_refusal
            {
                // Remember that these inputs were refused, so they are not sent again.
                let data = lineage::encode(&RefreshState {
                    refresh_token: chosen.refresh_token,
                    source: chosen.source,
                    source_version: chosen.source_version,
                    failed: Some(fingerprint),
                    phone: None,
                });
                self.write_secret(&self.state_name(), state, data, BTreeMap::new(), BTreeMap::new()).await?;
            }
            warn!(reason = shown.reason, error = %err, "refresh refused; waiting for a fix");
            self.event(EventType::Warning, shown.event, shown.message.clone()).await;
            self.set_ready(shown.ready, shown.reason, shown.message, |s| {
                s.failed_attempts = Some(attempts);
                s.last_failure_time = Some(failed_at.clone());
            })
            .await?;
            return Ok(Next::requeue(outcome::PERMANENT_RECHECK));
        }
        // The backoff lives in the status (attempts, next attempt), so a restart continues it.
        let random = (self.jitter_seed() ^ u64::from(attempts).wrapping_mul(0x9E37_79B9_7F4A_7C15)) % 1000;
        let delay = schedule::backoff_delay(
            attempts,
            self.ctx.options.min_backoff,
            self.ctx.options.max_backoff,
            random as f64 / 1000.0,
        )
        .max(err.retry_after().unwrap_or_default());
        let next_attempt = ceil_seconds(now + SignedDuration::try_from(delay).unwrap_or(SignedDuration::MAX));
        warn!(error = %err, attempts, next_attempt = %next_attempt, "refresh failed");
        self.event(EventType::Warning, shown.event, shown.message.clone()).await;
        self.set_ready(shown.ready, shown.reason, shown.message, |s| {
            s.failed_attempts = Some(attempts);
            s.last_failure_time = Some(failed_at.clone());
            s.next_refresh_time = Some(Time(next_attempt));
        })
        .await?;
        let generation = self.grant.metadata.generation;
        self.ctx.memory.failed(&self.key, Failure { attempts, failed_at: failed_at.0, next_attempt, generation });
        Ok(Next::requeue(until(Timestamp::now(), next_attempt)))
    }

    /// The backoff after failed attempts: the status keeps it across restarts and leaders; this
    /// process's own last write covers the moment the cached status is older than that write.
    pub(super) fn retry_not_before(&self) -> Option<Timestamp> {
        let stored = status::retry_not_before(self.current_status().as_ref(), self.grant.metadata.generation);
        stored.max(self.own_failure().map(|f| f.next_attempt))
    }

    /// Failed token requests in a row, by the same two sources.
    pub(super) fn failed_attempts(&self) -> u32 {
        let stored = self.current_status().and_then(|s| s.failed_attempts).unwrap_or(0);
        stored.max(self.own_failure().map_or(0, |f| f.attempts))
    }

    /// This process's last recorded failure, unless the status shows a refresh since (e.g. by
    /// another leader).
    pub(super) fn own_failure(&self) -> Option<Failure> {
        let refreshed = self.current_status().and_then(|s| s.last_refresh_time).map(|t| t.0);
        self.ctx
            .memory
            .failure(&self.key, self.grant.metadata.generation)
            .filter(|f| refreshed.is_none_or(|r| r < f.failed_at))
    }

    /// The status of a grant whose target holds a valid token: Ready, unless its template cannot be
    /// applied (the token is renewed all the same: a template mistake must not cut workloads off).
    pub(super) async fn set_published(
        &self,
        expires_at: Timestamp,
        problem: Option<template::TemplateError>,
        edit: impl Fn(&mut WgtwoGrantStatus),
    ) -> Result<(), Error> {
        let Some(problem) = problem else {
            return self.set_ready(true, reason::REFRESHED, self.valid_message(expires_at), edit).await;
        };
        let message = format!(
            "{problem}. The template's keys, labels and annotations are not applied until it is fixed; the access token is still renewed: Secret {} holds one valid until {expires_at} under access_token",
            self.grant.spec.target_secret
        );
        let why = reason::TEMPLATE_INVALID;
        self.ctx.shared.metrics.reconcile_error(why);
        let changed = status::previous_ready(self.current_status().as_ref())
            .is_none_or(|c| c.reason != why || c.message != message);
        if changed {
            warn!(problem = %problem, "the target Secret's template cannot be applied");
            self.event(EventType::Warning, why, message.clone()).await;
        }
        self.set_ready(false, why, message, edit).await
    }

    pub(super) async fn input_problem(&self, why: &'static str, message: String) -> Result<Next, Error> {
        self.ctx.shared.metrics.reconcile_error(why);
        let changed = status::previous_ready(self.current_status().as_ref())
            .is_none_or(|c| c.reason != why || c.message != message);
        if changed {
            self.event(EventType::Warning, why, message.clone()).await;
        }
        self.set_ready(false, why, message, |_| {}).await?;
        Ok(Next::requeue(outcome::INPUT_RECHECK))
    }

    /// Patches the status (server-side apply) unless nothing would change.
    pub(super) async fn set_ready(
        &self,
        ready: bool,
        why: &str,
        message: String,
        edit: impl Fn(&mut WgtwoGrantStatus),
    ) -> Result<(), Error> {
        let now = Timestamp::now();
        let next_from = |current: Option<&WgtwoGrantStatus>| {
            let previous = status::previous_ready(current);
            let condition =
                status::ready_condition(previous, ready, why, message.clone(), self.grant.metadata.generation, now);
            let mut next = status::with_ready(current, condition);
            next.observed_generation = self.grant.metadata.generation;
            next.grant_type = Some(self.grant.spec.grant_type().to_owned());
            edit(&mut next);
            next
        };
        // The cached grant may predate our own last status write: build on that write then, or the
        // apply would drop fields only a refresh knows (subject, scope) or restore stale ones.
        let current = self.current_status();
        let next = next_from(current.as_ref());
        if Some(&next) == current.as_ref() {
            return Ok(());
        }
        let patch = serde_json::json!({
            "apiVersion": WgtwoGrant::api_version(&()),
            "kind": WgtwoGrant::kind(&()),
            "status": next,
        });
        let written = self
            .grants
            .patch_status(&self.grant.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch))
            .await?;
        if let Some(version) = written.resource_version() {
            self.ctx.memory.wrote_status(&self.key, version, written.status.unwrap_or(next));
        }
        Ok(())
    }

    /// The grant's status as stored: this process's own last write while the cache has not caught
    /// up with it, else the cached one as it is now. Not this reconcile's copy of the grant: that
    /// is from when it was dispatched, and the watch may have delivered (and the memory dropped) a
    /// newer status since, e.g. the one that records a refresh request as handled.
    pub(super) fn current_status(&self) -> Option<WgtwoGrantStatus> {
        status_now(&self.ctx.memory, &self.key, self.grant, || self.ctx.cached(&self.key))
    }

    pub(super) fn valid_message(&self, expires_at: Timestamp) -> String {
        format!("Secret {} holds an access token valid until {expires_at}", self.grant.spec.target_secret)
    }

    pub(super) async fn event(&self, type_: EventType, why: &str, note: String) {
        let reference = self.grant.object_ref(&());
        let result = match type_ {
            // A success, at most once per refresh (`schedule::announce`): created directly. kube's
            // Recorder keeps the last Event of every grant for six minutes to count repeats (at
            // 10,000 grants refreshing together: tens of MiB) and scans that cache on every publish.
            EventType::Normal => {
                let event = normal_event(&reference, why, note);
                let events: Api<K8sEvent> = Api::namespaced(self.ctx.client.clone(), &self.ns);
                events.create(&PostParams::default(), &event).await.map(|_| ())
            }
            // Failures repeat with every retry: the Recorder counts them in one Event (series).
            EventType::Warning => {
                let event =
                    Event { type_, reason: why.to_owned(), note: Some(note), action: ACTION.into(), secondary: None };
                self.ctx.recorder.publish(&event, &reference).await
            }
        };
        if let Err(err) = result {
            warn!(error = %err, "could not publish an Event");
        }
    }
}

/// The `action` of the operator's Events.
pub(super) const ACTION: &str = "Refresh";

/// A Normal Event as kube's Recorder writes it (events.k8s.io/v1), without its cache.
pub(super) fn normal_event(
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
    why: &str,
    note: String,
) -> K8sEvent {
    let now = Timestamp::now();
    K8sEvent {
        action: Some(ACTION.into()),
        reason: Some(why.to_owned()),
        event_time: Some(MicroTime(now)),
        regarding: Some(regarding.clone()),
        note: Some(note),
        metadata: ObjectMeta {
            namespace: regarding.namespace.clone(),
            name: Some(format!("{}.{:x}", regarding.name.as_deref().unwrap_or(MANAGER), now.as_nanosecond())),
            ..Default::default()
        },
        reporting_controller: Some(MANAGER.into()),
        reporting_instance: Some(crate::kubeapi::pod_name().unwrap_or_else(|| MANAGER.into())),
        type_: Some("Normal".into()),
        ..Default::default()
    }
}

/// [`Run::current_status`] of a reconcile dispatched with `dispatched`; `cached` reads the cache's
/// copy now.
fn status_now(
    memory: &Memory,
    key: &ObjectRef<WgtwoGrant>,
    dispatched: &Grant,
    cached: impl FnOnce() -> Option<Arc<Grant>>,
) -> Option<WgtwoGrantStatus> {
    // The memory first: it is dropped only once the cache holds the write, so when it is gone the
    // cache's copy now is at least as new.
    let own = memory.own_status(key, dispatched.resource_version().as_deref());
    own.or_else(|| grant::newest(dispatched, cached().as_deref()).status.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn copy(version: &str, handled: &str) -> Grant {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "auth.wgtwo.com/v1alpha1", "kind": "WgtwoGrant",
            "metadata": {"name": "g", "namespace": "ns", "uid": "u1", "resourceVersion": version},
            "spec": {"issuerUrl": "https://id.example", "clientSecretRef": {"name": "client"},
                     "target": {"secretName": "g-token"}},
            "status": {"refreshRequestHandled": handled}
        }))
        .unwrap()
    }

    fn handled(status: Option<WgtwoGrantStatus>) -> Option<String> {
        status.and_then(|s| s.refresh_request_handled)
    }

    #[test]
    fn a_reconcile_dispatched_before_its_last_status_write_showed_sees_that_write() {
        let memory = Memory::new(Metrics::new());
        let key = ObjectRef::new("g").within("ns");
        // A reconcile handled request "second" and wrote the status at version 12; the next one
        // for the grant was dispatched with the cache's copy at 10, from before that write.
        let dispatched = copy("10", "first");
        memory.wrote_status(&key, "12".into(), copy("12", "second").status.unwrap());
        let now = Arc::new(copy("12", "second"));
        assert_eq!(handled(status_now(&memory, &key, &dispatched, || Some(now.clone()))).as_deref(), Some("second"));
        // Then the watch delivers version 12, which drops the memory of the write: the cache's
        // copy now still shows it, not the dispatched one.
        memory.own_status(&key, Some("12"));
        assert_eq!(handled(status_now(&memory, &key, &dispatched, || Some(now.clone()))).as_deref(), Some("second"));
        // A grant deleted from the cache meanwhile: the dispatched copy.
        assert_eq!(handled(status_now(&memory, &key, &dispatched, || None)).as_deref(), Some("first"));
    }
}
