//! The grant's Secrets: reads from the caches, writes with optimistic concurrency (recorded as the
//! process's own copies), the target Secret's template re-applied, and the journal of answers.

use super::*;

impl Run<'_> {
    /// Applies a changed template to the published token without a token request: one GET of the
    /// target Secret (the cache keeps no token), rendered from the operator's own keys.
    pub(super) async fn render_target_again(&self) -> Result<Option<template::TemplateError>, Error> {
        let Some(stored) = self.secrets.get_opt(&self.grant.spec.target_secret).await? else {
            return Ok(None);
        };
        let Some(token) = target::published_token(&stored) else {
            return Ok(None);
        };
        let (shaped, problem) =
            target::shape(target::own_keys(&stored), token.issued_at, self.template.as_ref().map(Option::as_ref));
        // A template that fails with the real values leaves the Secret as it is (what it holds is
        // for the current token): rewriting it would only repeat at every reconcile.
        if problem.is_none() {
            debug!("applying the changed template to the target Secret");
            self.write_target(Some(&stored), shaped).await?;
        }
        Ok(problem)
    }

    pub(super) async fn write_target(
        &self,
        existing: Option<&Secret>,
        shaped: target::Shaped,
    ) -> Result<Secret, kube::Error> {
        let target::Shaped { data, labels, annotations } = shaped;
        self.write_secret(&self.grant.spec.target_secret, existing, data, annotations, labels).await
    }

    /// Creates the Secret, or replaces it based on `existing`'s resourceVersion.
    pub(super) async fn write_secret(
        &self,
        name: &str,
        existing: Option<&Secret>,
        data: BTreeMap<String, k8s_openapi::ByteString>,
        annotations: BTreeMap<String, String>,
        labels: BTreeMap<String, String>,
    ) -> Result<Secret, kube::Error> {
        let version = existing.and_then(|s| s.resource_version());
        let secret = owned_secret(self.grant, name, version, data, annotations, labels);
        let epoch = self.ctx.cache.epoch();
        let written = match existing {
            None => self.secrets.create(&PostParams::default(), &secret).await?,
            Some(_) => self.secrets.replace(name, &PostParams::default(), &secret).await?,
        };
        self.ctx.cache.wrote(&written, epoch);
        Ok(written)
    }

    /// An operator-owned Secret (state or target) of this grant, from the cache.
    pub(super) async fn owned(&self, name: &str) -> Result<Option<Secret>, kube::Error> {
        self.ctx.cache.owned(&self.secrets, &self.ns, name).await
    }

    /// `keys` of one of the grant's input Secrets, from the cache while its version is unchanged.
    pub(super) async fn read(&self, name: &str, keys: &[&str]) -> Result<Option<Secret>, kube::Error> {
        self.ctx.cache.read(&self.secrets, &self.ns, name, keys, true).await
    }

    /// The user's refresh-token Secret: read only when it changed, and not kept (once the state
    /// records its version it is not read again).
    pub(super) async fn read_once(&self, name: &str, key: &str) -> Result<Option<Secret>, kube::Error> {
        self.ctx.cache.read(&self.secrets, &self.ns, name, &[key], false).await
    }

    /// Writes the answer to the journal, if there is one: synchronously, before any await, as the
    /// rotated refresh token exists nowhere else yet. A failure leaves it in memory only, as
    /// without a journal.
    pub(super) fn journal(&self, presented: &RefreshToken, pending: &Pending, what: Journaling) {
        let Some(journal) = &self.ctx.shared.journal else { return };
        let uid = self.grant.uid().unwrap_or_default();
        match journal.write(&journal::Entry::new(&self.key, &uid, presented, pending)) {
            // The crash window that remains: answer received -> journal written.
            Ok(()) if what == Journaling::Answer => {
                info!(journal_us = pending.received.elapsed().as_micros() as u64, "refresh answer journaled")
            }
            Ok(()) => debug!("the ID token's claims journaled with the answer"),
            Err(err) => {
                self.ctx.shared.metrics.journal_write_failed();
                warn!(error = %err, "could not write the refresh answer to the journal; until the state Secret holds it, it is in memory only");
            }
        }
    }

    /// The state Secret holds the answer's refresh token: the journal entry has done its job.
    pub(super) fn unjournal(&self) {
        if let Some(journal) = &self.ctx.shared.journal
            && let Err(err) = journal.remove(&self.key)
        {
            // Harmless: replay finds the state Secret holding the token and drops the entry.
            warn!(error = %err, "could not remove the journal entry of a persisted answer");
        }
    }

    pub(super) fn owns(&self, secret: &Secret) -> bool {
        let uid = self.grant.uid();
        secret.owner_references().iter().any(|o| Some(&o.uid) == uid.as_ref())
    }
}

/// Which write of a refresh answer to the journal.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Journaling {
    /// The answer as parsed: its rotated refresh token is safe from here.
    Answer,
    /// Again with the verified ID token's claims (subject, phone number), so a replay publishes them.
    VerifiedClaims,
}

/// A Secret the operator owns for `grant` (state or target): labelled as the operator's and the
/// grant's, owned by the grant (so it goes with it), at `resource_version` when replacing one.
pub(crate) fn owned_secret<G: Resource<DynamicType = ()>>(
    grant: &G,
    name: &str,
    resource_version: Option<String>,
    data: BTreeMap<String, k8s_openapi::ByteString>,
    annotations: BTreeMap<String, String>,
    mut labels: BTreeMap<String, String>,
) -> Secret {
    labels.extend([(LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned()), (LABEL_GRANT.to_owned(), grant.name_any())]);
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: Some(vec![grant.controller_owner_ref(&()).expect("a grant read from the API has a uid")]),
            resource_version,
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}
