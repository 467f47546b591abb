//! Replaying the journal (see [`super::journal`]) when the process starts, before it leads or
//! reconciles anything: each entry whose grant still exists and whose state Secret still holds the
//! refresh token the entry rotated (or, for an entry that began a lineage, an older lineage) is
//! written to the state Secret with optimistic concurrency; an entry something else superseded is
//! dropped with a log line. Replay sends no token request, so a standby replays its own journal too.
//!
//! The answer of an entry whose token the state Secret holds (written here or already) is handed
//! to the controller, whose first reconcile of the grant publishes its access token as it would
//! have before the kill: no token request, and never over a newer access token (see
//! `publish_kept`).

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::journal::{Entry, Journal};
use super::lineage::{self, RefreshState};
use crate::api::WgtwoGrant;
use crate::kubeapi::kube_message;
use crate::metrics::Metrics;
use crate::oauth::secrets::RefreshToken;

/// What to do with an entry, given what the apiserver holds now.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Write the entry's refresh token to the state Secret: it is the lineage's latest.
    Write,
    /// The state Secret holds it already (the write landed; the process died before the entry
    /// was removed).
    AlreadyPersisted,
    /// Something newer took its place; dropping it loses nothing.
    Superseded(&'static str),
}

/// What the apiserver holds for the entry's grant.
pub struct Seen<'a> {
    /// `None`: no grant of that name.
    pub grant_uid: Option<&'a str>,
    /// The state Secret exists and another object owns it.
    pub state_foreign: bool,
    pub state: Option<&'a RefreshState>,
    /// sha256 of the token in the user's refresh-token Secret; `None` when it cannot be read.
    pub user_token_sha256: Option<&'a str>,
}

/// What the verdict needs of a refresh answer: a journal entry's, or one kept in memory.
pub struct Answer<'a> {
    /// The grant object the answer is for.
    pub uid: &'a str,
    /// sha256 of the refresh token that was presented.
    pub presented_sha256: &'a str,
    /// The rotated refresh token.
    pub refresh_token: &'a str,
    /// sha256 of the user's token the lineage began from.
    pub source: &'a str,
}

impl Entry {
    pub fn answer(&self) -> Answer<'_> {
        Answer {
            uid: &self.uid,
            presented_sha256: &self.presented_sha256,
            refresh_token: &self.refresh_token,
            source: &self.source,
        }
    }
}

/// Whether an answer not yet in the state Secret still belongs there, given what the apiserver
/// holds now (read consistently): the same rule for a journal entry at start and for an answer the
/// live process kept after a failed write, so neither ever puts an older refresh token over a newer.
pub fn verdict(entry: &Answer, seen: &Seen) -> Verdict {
    match seen.grant_uid {
        None => return Verdict::Superseded("the grant is gone"),
        Some(uid) if uid != entry.uid => return Verdict::Superseded("the grant was deleted and created again"),
        Some(_) => {}
    }
    if seen.state_foreign {
        return Verdict::Superseded("the state Secret belongs to another object");
    }
    if seen.state.is_some_and(|s| s.refresh_token.secret() == entry.refresh_token) {
        return Verdict::AlreadyPersisted;
    }
    if seen.user_token_sha256.is_some_and(|sha| sha != entry.source) {
        return Verdict::Superseded("the subscriber authorized again (the refresh-token Secret holds another token)");
    }
    let latest = match seen.state {
        // The same lineage: the state must still hold the token the entry rotated.
        Some(state) if state.source == entry.source => {
            lineage::sha256_hex(&[state.refresh_token.secret()]) == entry.presented_sha256
        }
        // No state, or an older lineage: only an entry that began this lineage from the user's token
        // (first use, re-authorization) follows it.
        _ => entry.presented_sha256 == entry.source,
    };
    match latest {
        true => Verdict::Write,
        false => Verdict::Superseded("the state Secret holds a newer refresh token"),
    }
}

/// How a replay ended, per entry.
#[derive(Default)]
pub struct Replayed {
    pub written: usize,
    pub already_persisted: usize,
    pub superseded: usize,
    /// Left in the journal for the next start (a permanent API error, or shutdown).
    pub kept: usize,
    /// The answers to publish: the state Secret holds their refresh tokens.
    pub answers: Vec<super::KeptAnswer>,
}

/// Replays every entry. Transient API errors are retried (with backoff) until `shutdown`; an entry
/// that fails for good stays in the journal.
pub async fn replay(
    client: &kube::Client,
    journal: &Journal,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> std::io::Result<Replayed> {
    let (entries, unreadable) = journal.entries()?;
    for problem in &unreadable {
        error!(error = %problem, "journal entry not replayed");
        metrics.journal_replayed("kept");
    }
    let mut replayed = Replayed { kept: unreadable.len(), ..Default::default() };
    for entry in &entries {
        let mut delay = Duration::from_millis(200);
        loop {
            if shutdown.is_cancelled() {
                replayed.kept += 1;
                metrics.journal_replayed("kept");
                break;
            }
            match replay_one(client, journal, entry).await {
                Ok(verdict) => {
                    let (counter, result) = match verdict {
                        Verdict::Write => (&mut replayed.written, "written"),
                        Verdict::AlreadyPersisted => (&mut replayed.already_persisted, "already_persisted"),
                        Verdict::Superseded(_) => (&mut replayed.superseded, "superseded"),
                    };
                    *counter += 1;
                    metrics.journal_replayed(result);
                    if !matches!(verdict, Verdict::Superseded(_)) {
                        replayed.answers.push((entry.grant(), entry.pending()));
                    }
                    break;
                }
                Err(err) if transient(&err) => {
                    warn!(namespace = %entry.namespace, grant = %entry.name, error = %kube_message(&err), retry_in = ?delay, "journal replay: Kubernetes API unavailable; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
                Err(err) => {
                    error!(namespace = %entry.namespace, grant = %entry.name, error = %kube_message(&err), "journal replay failed; the entry is kept and replayed at the next start");
                    replayed.kept += 1;
                    metrics.journal_replayed("kept");
                    break;
                }
            }
        }
    }
    Ok(replayed)
}

fn transient(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(status) => status.code == 409 || status.code == 429 || status.code >= 500,
        _ => true,
    }
}

async fn replay_one(client: &kube::Client, journal: &Journal, entry: &Entry) -> Result<Verdict, kube::Error> {
    let grants: Api<WgtwoGrant> = Api::namespaced(client.clone(), &entry.namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &entry.namespace);
    // Listed by name (a consistent read). A grant being deleted counts as gone: its Secrets go
    // with it, and a state Secret written now could outlive their garbage collection.
    let by_name = ListParams::default().fields(&format!("metadata.name={}", entry.name));
    let grant = grants.list(&by_name).await?.items.into_iter().find(|g| g.metadata.deletion_timestamp.is_none());
    let state_name = lineage::state_secret_name(&entry.name);
    let stored = secrets.get_opt(&state_name).await?;
    let state = stored.as_ref().and_then(|s| s.data.as_ref()).and_then(lineage::decode);
    let uid = grant.as_ref().and_then(|g| g.uid());
    let state_foreign =
        stored.as_ref().is_some_and(|s| !s.owner_references().iter().any(|o| Some(&o.uid) == uid.as_ref()));
    let user_token_sha256 = match grant.as_ref().and_then(|g| g.spec.refresh_token_secret_ref.as_ref()) {
        // Read as the controller reads it, so the fingerprints compare.
        Some(r) => super::inputs::user_token(secrets.get_opt(&r.name).await?.as_ref(), &r.name, &r.key)
            .ok()
            .map(|token| lineage::sha256_hex(&[&token])),
        None => None,
    };
    let seen = Seen {
        grant_uid: uid.as_deref(),
        state_foreign,
        state: state.as_ref(),
        user_token_sha256: user_token_sha256.as_deref(),
    };
    let verdict = verdict(&entry.answer(), &seen);
    let (namespace, name) = (entry.namespace.as_str(), entry.name.as_str());
    match &verdict {
        Verdict::Write => {
            let grant = grant.expect("a verdict to write implies the grant");
            // What the identity service said about the phone number, else what the state knew.
            let known_phone = state.as_ref().filter(|s| s.source == entry.source).and_then(|s| s.phone.clone());
            let data = lineage::encode(&RefreshState {
                refresh_token: RefreshToken::new(entry.refresh_token.clone()),
                source: entry.source.clone(),
                source_version: entry.source_version.clone(),
                failed: None,
                phone: entry.phone_number.clone().map(Some).or(known_phone),
            });
            let version = stored.as_ref().and_then(|s| s.resource_version());
            let secret =
                super::owned_secret(&grant, &state_name, version, data, Default::default(), Default::default());
            // A 409 (the Secret changed since it was read) is retried by the caller: decided again.
            match stored {
                None => secrets.create(&PostParams::default(), &secret).await?,
                Some(_) => secrets.replace(&state_name, &PostParams::default(), &secret).await?,
            };
            info!(
                namespace,
                grant = name,
                "journal: the rotated refresh token of a killed process is now in the state Secret"
            );
        }
        Verdict::AlreadyPersisted => {
            info!(namespace, grant = name, "journal: the state Secret already holds the entry's refresh token")
        }
        Verdict::Superseded(why) => info!(namespace, grant = name, reason = why, "journal entry superseded; dropped"),
    }
    if let Err(err) = journal.remove(&entry.grant()) {
        warn!(namespace, grant = name, error = %err, "could not remove a replayed journal entry; it is looked at again at the next start");
    }
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::Timestamp;

    const UID: &str = "uid-1";

    fn sha(token: &str) -> String {
        lineage::sha256_hex(&[token])
    }

    /// An answer that rotated `presented` into `rotated`, in the lineage begun from `user`.
    fn entry(user: &str, presented: &str, rotated: &str) -> Entry {
        Entry {
            namespace: "team-a".into(),
            name: "alice".into(),
            uid: UID.into(),
            presented_sha256: sha(presented),
            refresh_token: rotated.into(),
            source: sha(user),
            source_version: None,
            access_token: "a".into(),
            token_type: "bearer".into(),
            expires_at: None,
            scope: None,
            subject: None,
            phone_number: None,
            refreshed_at: Timestamp::UNIX_EPOCH,
            refresh_request: None,
        }
    }

    fn state(user: &str, token: &str) -> RefreshState {
        RefreshState {
            refresh_token: RefreshToken::new(token.into()),
            source: sha(user),
            source_version: None,
            failed: None,
            phone: None,
        }
    }

    fn seen<'a>(state: Option<&'a RefreshState>, user: Option<&'a str>) -> Seen<'a> {
        Seen { grant_uid: Some(UID), state_foreign: false, state, user_token_sha256: user }
    }

    #[test]
    fn an_entry_that_rotated_the_states_token_is_written() {
        let s = state("u", "r1");
        let user = sha("u");
        assert_eq!(verdict(&entry("u", "r1", "r2").answer(), &seen(Some(&s), Some(&user))), Verdict::Write);
        // The user's Secret unreadable (deleted): the token is still not thrown away.
        assert_eq!(verdict(&entry("u", "r1", "r2").answer(), &seen(Some(&s), None)), Verdict::Write);
    }

    #[test]
    fn an_entry_that_began_the_lineage_is_written_over_no_state_or_an_older_lineage() {
        let user = sha("u2");
        assert_eq!(verdict(&entry("u2", "u2", "r1").answer(), &seen(None, Some(&user))), Verdict::Write);
        let old = state("u1", "old-7");
        assert_eq!(verdict(&entry("u2", "u2", "r1").answer(), &seen(Some(&old), Some(&user))), Verdict::Write);
    }

    #[test]
    fn an_entry_whose_token_the_state_holds_already_is_dropped_as_persisted() {
        let s = state("u", "r2");
        assert_eq!(
            verdict(&entry("u", "r1", "r2").answer(), &seen(Some(&s), Some(&sha("u")))),
            Verdict::AlreadyPersisted
        );
    }

    #[test]
    fn an_entry_the_lineage_moved_past_is_superseded() {
        let s = state("u", "r5");
        let v = verdict(&entry("u", "r1", "r2").answer(), &seen(Some(&s), Some(&sha("u"))));
        assert_eq!(v, Verdict::Superseded("the state Secret holds a newer refresh token"));
        // A non-first entry never applies without a state.
        assert!(matches!(verdict(&entry("u", "r1", "r2").answer(), &seen(None, None)), Verdict::Superseded(_)));
    }

    #[test]
    fn a_re_authorization_supersedes_the_old_lineages_entry_whatever_the_state_holds() {
        // The subscriber authorized again: the user's Secret holds u2; the state may still hold the
        // token the entry rotated (no refresh of the new lineage yet) or the new lineage already.
        let new_user = sha("u2");
        for s in [state("u1", "r1"), state("u2", "n1")] {
            let v = verdict(&entry("u1", "r1", "r2").answer(), &seen(Some(&s), Some(&new_user)));
            assert!(matches!(v, Verdict::Superseded(why) if why.contains("authorized again")), "{v:?}");
        }
    }

    #[test]
    fn an_entry_of_a_deleted_or_recreated_grant_or_a_foreign_state_secret_is_superseded() {
        let s = state("u", "r1");
        let e = entry("u", "r1", "r2");
        let gone = Seen { grant_uid: None, ..seen(Some(&s), None) };
        assert_eq!(verdict(&e.answer(), &gone), Verdict::Superseded("the grant is gone"));
        let recreated = Seen { grant_uid: Some("uid-2"), ..seen(Some(&s), None) };
        assert_eq!(verdict(&e.answer(), &recreated), Verdict::Superseded("the grant was deleted and created again"));
        let foreign = Seen { state_foreign: true, ..seen(Some(&s), None) };
        assert_eq!(verdict(&e.answer(), &foreign), Verdict::Superseded("the state Secret belongs to another object"));
    }
}
