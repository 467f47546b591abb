//! What the controller keeps in memory: per grant, a refresh answer not yet published, the backoff
//! of Kubernetes API errors and which OAuth client the grant uses; and the discovered OAuth
//! clients. Everything is forgotten when its grant goes away (a watch deletion, or absence from a
//! relist), so memory is bounded by the grants that exist. The sizes are exported as gauges.
//!
//! A kept answer holds a rotated refresh token that may exist nowhere else. It is removed only by
//! [`Memory::published`] (after every write succeeded) or with its grant: an early return on any
//! error path leaves it in place, so a failing apiserver cannot make the operator drop it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::OnceCell;

use super::secret_cache::at_least_as_new;
use super::template::TemplateError;
use crate::api::{WgtwoGrant, WgtwoGrantStatus};
use crate::metrics::Metrics;
use crate::oauth::secrets::RefreshToken;
use crate::oauth::{OAuthError, TokenSet, WgtwoClient};

/// A refresh answer not yet fully published.
#[derive(Clone)]
pub struct Pending {
    /// The grant object the answer is for.
    pub uid: String,
    /// sha256 of the refresh token that was presented: a retried state write applies only while
    /// the state Secret still holds that one.
    pub presented_sha256: String,
    pub refresh_token: RefreshToken,
    /// Fingerprint of the user's refresh token the lineage started from.
    pub source: String,
    /// Version of the user's Secret the lineage was checked at.
    pub source_version: Option<String>,
    pub tokens: TokenSet,
    pub refreshed_at: Timestamp,
    /// When the answer arrived: from then until the state Secret is written, a crash loses the
    /// rotated refresh token (unless the server has a rotation grace period).
    pub received: Instant,
    /// The state Secret holds `refresh_token`; what remains is the target Secret and the status.
    pub persisted: bool,
    /// The grant's refresh request (annotation value) when the token request was sent: the one
    /// this answer handles, whatever the grant shows by the time it is published.
    pub request: Option<String>,
}

impl Pending {
    /// What [`super::replay::verdict`] decides on.
    pub fn answer(&self) -> super::replay::Answer<'_> {
        super::replay::Answer {
            uid: &self.uid,
            presented_sha256: &self.presented_sha256,
            refresh_token: self.refresh_token.secret(),
            source: &self.source,
        }
    }
}

/// The last failed token request as this process wrote it to the status; the watch cache can show
/// an older status for a moment after that write.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Failure {
    pub attempts: u32,
    pub failed_at: Timestamp,
    pub next_attempt: Timestamp,
    /// The grant generation it applies to (a spec change starts over).
    pub generation: Option<i64>,
}

#[derive(Default)]
struct GrantMemory {
    /// Boxed: most grants have none, and an inline answer would cost every grant its size.
    pending: Option<Box<Pending>>,
    // Boxed, as the answer: rare, and inline they would cost every grant their size.
    failure: Option<Box<Failure>>,
    api_backoff: Option<Box<ExponentialBackoff>>,
    /// Key of the OAuth client this grant used last.
    /// Shared with the client map: one allocation per client, not per grant.
    client: Option<Arc<str>>,
    /// The status this process last wrote and its resourceVersion, until the grant watch shows it.
    status: Option<Box<(String, WgtwoGrantStatus)>>,
    /// Whether the grant's template passed its check, at the generation it was checked.
    template: Option<Box<TemplateVerdict>>,
    /// Renewal attempts by result (`wgtwo_grant_refresh_total`, in the order of
    /// [`crate::metrics::result::ALL`]): encoded from here at scrape time.
    refreshes: [u32; 3],
    /// A refresh request answered and published whose status write failed: handled all the same,
    /// until the status says so.
    handled: Option<Box<str>>,
    /// A state or target Secret of this grant was deleted since the grant was last read from the
    /// apiserver (or since that sign was last looked at): see `Run::deleted_with_its_secrets`.
    secrets_vanished: bool,
}

/// A template check's outcome and the template's hash it was made for (not the generation: a grant
/// deleted and created again, its deletion hidden by a relist, starts at generation 1 again).
type TemplateVerdict = (String, Result<(), TemplateError>);

type ClientCell = Arc<OnceCell<Arc<WgtwoClient>>>;

pub struct Memory {
    grants: Mutex<HashMap<ObjectRef<WgtwoGrant>, GrantMemory>>,
    /// Discovered clients by issuer, client id and client secret fingerprint. A cell per key:
    /// discovery of one issuer never waits for another's.
    clients: Mutex<HashMap<Arc<str>, ClientCell>>,
    /// Grants whose kept answer is not in the state Secret yet (a set, so the gauge needs no scan).
    unpersisted: Mutex<HashSet<ObjectRef<WgtwoGrant>>>,
    metrics: Metrics,
}

impl Memory {
    pub fn new(metrics: Metrics) -> Self {
        Self { grants: Default::default(), clients: Default::default(), unpersisted: Default::default(), metrics }
    }

    /// The answer kept for this grant, if any (a copy: it stays kept until published).
    pub fn pending(&self, key: &ObjectRef<WgtwoGrant>) -> Option<Pending> {
        self.grants.lock().unwrap().get(key).and_then(|m| m.pending.as_deref().cloned())
    }

    /// Keeps an answer; called as soon as it arrives, before any await.
    pub fn keep(&self, key: &ObjectRef<WgtwoGrant>, pending: Pending) {
        let mut grants = self.grants.lock().unwrap();
        let persisted = pending.persisted;
        grants.entry(slim(key)).or_default().pending = Some(Box::new(pending));
        self.mark(key, !persisted);
        self.update_gauges(&grants);
    }

    /// The state Secret holds the kept answer's refresh token.
    pub fn persisted(&self, key: &ObjectRef<WgtwoGrant>) {
        let mut grants = self.grants.lock().unwrap();
        if let Some(p) = grants.get_mut(key).and_then(|m| m.pending.as_mut()) {
            p.persisted = true;
        }
        self.mark(key, false);
        self.update_gauges(&grants);
    }

    /// The kept answer will never be published (something newer took its place): forget it.
    pub fn superseded(&self, key: &ObjectRef<WgtwoGrant>) {
        let mut grants = self.grants.lock().unwrap();
        if let Some(m) = grants.get_mut(key) {
            m.pending = None;
        }
        self.mark(key, false);
        self.update_gauges(&grants);
    }

    /// The kept answer is fully published (state, target, status): forget it, and any failure.
    pub fn published(&self, key: &ObjectRef<WgtwoGrant>) {
        let mut grants = self.grants.lock().unwrap();
        if let Some(m) = grants.get_mut(key) {
            m.pending = None;
            m.failure = None;
        }
        self.mark(key, false);
        self.update_gauges(&grants);
    }

    /// Remembers that refresh request `request` was answered (its status write failed).
    pub fn handled_unrecorded(&self, key: &ObjectRef<WgtwoGrant>, request: &str) {
        let mut grants = self.grants.lock().unwrap();
        grants.entry(slim(key)).or_default().handled = Some(request.into());
    }

    /// The refresh request answered whose status write failed, while it is still the grant's
    /// request (`requested`) and the status's `refreshRequestHandled` (`recorded`) does not show
    /// it; else it is forgotten (a newer request, or the status caught up).
    pub fn handled_request(
        &self,
        key: &ObjectRef<WgtwoGrant>,
        requested: Option<&str>,
        recorded: Option<&str>,
    ) -> Option<String> {
        let mut grants = self.grants.lock().unwrap();
        let memory = grants.get_mut(key)?;
        let handled = memory.handled.as_deref()?;
        if Some(handled) == recorded || Some(handled) != requested {
            memory.handled = None;
            return None;
        }
        Some(handled.to_owned())
    }

    /// Remembers that a state or target Secret of this grant was deleted.
    pub fn mark_secret_vanished(&self, key: &ObjectRef<WgtwoGrant>) {
        self.grants.lock().unwrap().entry(slim(key)).or_default().secrets_vanished = true;
    }

    /// Whether a Secret of this grant was deleted since the last call, which clears it: a deletion
    /// seen while the grant is being read from the apiserver is kept for the next reconcile.
    pub fn take_secrets_vanished(&self, key: &ObjectRef<WgtwoGrant>) -> bool {
        self.grants.lock().unwrap().get_mut(key).is_some_and(|m| std::mem::take(&mut m.secrets_vanished))
    }

    /// Remembers a status this process wrote (at `version`) until the watch shows it.
    pub fn wrote_status(&self, key: &ObjectRef<WgtwoGrant>, version: String, status: WgtwoGrantStatus) {
        let mut grants = self.grants.lock().unwrap();
        grants.entry(slim(key)).or_default().status = Some(Box::new((version, status)));
    }

    /// The status this process last wrote, unless the cached grant (at `cached_version`) shows it
    /// or something newer already (then it is forgotten).
    pub fn own_status(&self, key: &ObjectRef<WgtwoGrant>, cached_version: Option<&str>) -> Option<WgtwoGrantStatus> {
        let mut grants = self.grants.lock().unwrap();
        let memory = grants.get_mut(key)?;
        let (version, status) = memory.status.as_deref()?;
        if cached_version.is_some_and(|cached| at_least_as_new(cached, version)) {
            memory.status = None;
            return None;
        }
        Some(status.clone())
    }

    /// Remembers the outcome of checking the grant's template with hash `hash` (the check renders
    /// it: CPU the grant's author controls, spent once per template, not per reconcile).
    pub fn checked_template(&self, key: &ObjectRef<WgtwoGrant>, hash: &str, verdict: Result<(), TemplateError>) {
        let mut grants = self.grants.lock().unwrap();
        grants.entry(slim(key)).or_default().template = Some(Box::new((hash.to_owned(), verdict)));
    }

    /// The outcome of checking the grant's template, if this one (by `hash`) was checked.
    pub fn template_verdict(&self, key: &ObjectRef<WgtwoGrant>, hash: &str) -> Option<Result<(), TemplateError>> {
        let grants = self.grants.lock().unwrap();
        let (checked, verdict) = grants.get(key)?.template.as_deref()?;
        (checked == hash).then(|| verdict.clone())
    }

    /// An attempt to renew the grant's token ended with `result` (a [`crate::metrics::result`]).
    pub fn count_refresh(&self, key: &ObjectRef<WgtwoGrant>, result: &str) {
        let mut grants = self.grants.lock().unwrap();
        let count = &mut grants.entry(slim(key)).or_default().refreshes[crate::metrics::result::index(result)];
        *count = count.saturating_add(1);
        self.update_gauges(&grants);
    }

    /// The renewal counts of these grants (zero for one never counted), under one lock.
    pub fn refresh_counts(&self, keys: impl Iterator<Item = ObjectRef<WgtwoGrant>>) -> Vec<[u32; 3]> {
        let grants = self.grants.lock().unwrap();
        keys.map(|k| grants.get(&k).map_or([0; 3], |m| m.refreshes)).collect()
    }

    /// A failed token request was recorded in the status.
    pub fn failed(&self, key: &ObjectRef<WgtwoGrant>, failure: Failure) {
        let mut grants = self.grants.lock().unwrap();
        grants.entry(slim(key)).or_default().failure = Some(Box::new(failure));
        self.update_gauges(&grants);
    }

    /// The last failure this process recorded for the grant at `generation`.
    pub fn failure(&self, key: &ObjectRef<WgtwoGrant>, generation: Option<i64>) -> Option<Failure> {
        self.grants
            .lock()
            .unwrap()
            .get(key)
            .and_then(|m| m.failure.as_deref().copied())
            .filter(|f| f.generation == generation)
    }

    /// Grants (`namespace/name`) whose rotated refresh token is held only here (lost if the
    /// process exits).
    pub fn unpersisted(&self) -> Vec<String> {
        let grants = self.grants.lock().unwrap();
        grants
            .iter()
            .filter(|(_, m)| m.pending.as_ref().is_some_and(|p| !p.persisted))
            .map(|(k, _)| format!("{}/{}", k.namespace.as_deref().unwrap_or_default(), k.name))
            .collect()
    }

    /// The grants whose kept answer is not in the state Secret yet.
    pub fn unpersisted_keys(&self) -> Vec<ObjectRef<WgtwoGrant>> {
        self.unpersisted.lock().unwrap().iter().cloned().collect()
    }

    /// The delay before retrying a reconcile that failed on the Kubernetes API.
    pub fn next_api_backoff(&self, key: &ObjectRef<WgtwoGrant>, min: Duration, max: Duration) -> Duration {
        let mut grants = self.grants.lock().unwrap();
        let backoff = grants.entry(slim(key)).or_default().api_backoff.get_or_insert_with(|| {
            Box::new(
                ExponentialBuilder::default()
                    .with_min_delay(min)
                    .with_max_delay(max)
                    .with_factor(2.0)
                    .with_jitter()
                    .without_max_times()
                    .build(),
            )
        });
        let delay = backoff.next().unwrap_or(max);
        self.update_gauges(&grants);
        delay
    }

    pub fn reset_api_backoff(&self, key: &ObjectRef<WgtwoGrant>) {
        if let Some(m) = self.grants.lock().unwrap().get_mut(key) {
            m.api_backoff = None;
        }
    }

    /// The OAuth client for `client_key`, discovering it once however many reconciles ask at the
    /// same time (single flight). A failed discovery is not cached: the next call tries again.
    pub async fn client<F, Fut>(
        &self,
        grant: &ObjectRef<WgtwoGrant>,
        client_key: String,
        discover: F,
    ) -> Result<Arc<WgtwoClient>, OAuthError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<WgtwoClient, OAuthError>>,
    {
        let cell = {
            let mut grants = self.grants.lock().unwrap();
            let mut clients = self.clients.lock().unwrap();
            let shared: Arc<str> = match clients.get_key_value(client_key.as_str()) {
                Some((k, _)) => k.clone(),
                None => client_key.as_str().into(),
            };
            let cell = clients.entry(shared.clone()).or_default().clone();
            let previous = grants.entry(slim(grant)).or_default().client.replace(shared.clone());
            if previous.as_ref().is_some_and(|p| *p != shared) {
                // E.g. the client secret changed: the old client may now be unused.
                release(&mut clients, previous);
            }
            self.update_gauges_with(&grants, &clients);
            cell
        };
        // No lock is held across the network: another issuer's discovery never waits for this one.
        cell.get_or_try_init(|| async { discover().await.map(Arc::new) }).await.cloned()
    }

    /// Forgets a grant that was deleted, and the clients only it used.
    pub fn forget(&self, key: &ObjectRef<WgtwoGrant>) {
        let mut grants = self.grants.lock().unwrap();
        if let Some(memory) = grants.remove(key) {
            self.mark(key, false);
            let mut clients = self.clients.lock().unwrap();
            release(&mut clients, memory.client);
            self.update_gauges_with(&grants, &clients);
        }
    }

    /// Keeps only these grants (after a relist, which may hide deletions).
    pub fn retain(&self, alive: &HashSet<ObjectRef<WgtwoGrant>>) {
        let mut grants = self.grants.lock().unwrap();
        grants.retain(|k, _| alive.contains(k));
        self.unpersisted.lock().unwrap().retain(|k| alive.contains(k));
        let mut clients = self.clients.lock().unwrap();
        prune(&grants, &mut clients);
        self.update_gauges_with(&grants, &clients);
    }

    fn update_gauges(&self, grants: &HashMap<ObjectRef<WgtwoGrant>, GrantMemory>) {
        let clients = self.clients.lock().unwrap();
        self.update_gauges_with(grants, &clients);
    }

    fn update_gauges_with(
        &self,
        grants: &HashMap<ObjectRef<WgtwoGrant>, GrantMemory>,
        clients: &HashMap<Arc<str>, ClientCell>,
    ) {
        let unpersisted = self.unpersisted.lock().unwrap().len();
        self.metrics.set_memory(grants.len(), clients.len(), unpersisted);
    }

    fn mark(&self, key: &ObjectRef<WgtwoGrant>, unpersisted: bool) {
        let mut set = self.unpersisted.lock().unwrap();
        if unpersisted {
            set.insert(slim(key));
        } else {
            set.remove(key);
        }
    }
}

/// The key without the uid and resourceVersion a key from an object carries (ignored by its
/// equality and hash): two strings fewer per grant kept.
fn slim(key: &ObjectRef<WgtwoGrant>) -> ObjectRef<WgtwoGrant> {
    let slim = ObjectRef::new(&key.name);
    match &key.namespace {
        Some(ns) => slim.within(ns),
        None => slim,
    }
}

/// Drops the client a grant stopped using if no other grant uses it (the map's key is then its
/// only other holder).
fn release(clients: &mut HashMap<Arc<str>, ClientCell>, client: Option<Arc<str>>) {
    let Some(client) = client else { return };
    let unused = clients.get_key_value(&*client).is_some_and(|(k, _)| Arc::strong_count(k) == 2);
    if unused {
        clients.remove(&*client);
    }
}

/// Drops the clients no remembered grant uses.
fn prune(grants: &HashMap<ObjectRef<WgtwoGrant>, GrantMemory>, clients: &mut HashMap<Arc<str>, ClientCell>) {
    let used: HashSet<&Arc<str>> = grants.values().filter_map(|m| m.client.as_ref()).collect();
    clients.retain(|k, _| used.contains(k));
}

#[cfg(test)]
impl Pending {
    /// An answer (refresh token `rt`, access token `at`) for unit tests.
    pub fn sample(refreshed_at: Timestamp, persisted: bool) -> Self {
        Self {
            uid: "uid".into(),
            presented_sha256: "presented".into(),
            refresh_token: RefreshToken::new("rt".into()),
            source: "s".into(),
            source_version: None,
            tokens: TokenSet {
                access_token: crate::oauth::secrets::AccessToken::new("at".into()),
                refresh_token: None,
                token_type: "bearer".into(),
                expires_at: None,
                scope: None,
                id_token: None,
                id_token_error: None,
            },
            refreshed_at,
            received: Instant::now(),
            persisted,
            request: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectRef<WgtwoGrant> {
        ObjectRef::new(name).within("ns")
    }

    fn pending() -> Pending {
        Pending::sample(Timestamp::UNIX_EPOCH, false)
    }

    fn gauge(m: &Metrics, name: &str) -> String {
        m.encode().lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_default().to_owned()
    }

    #[test]
    fn a_kept_answer_stays_until_published_and_counts_as_unpersisted_until_written() {
        let metrics = Metrics::new();
        let memory = Memory::new(metrics.clone());
        memory.keep(&key("a"), pending());
        // Reading it (as a retry does) does not remove it.
        assert!(memory.pending(&key("a")).is_some());
        assert!(memory.pending(&key("a")).is_some());
        assert_eq!(memory.unpersisted(), ["ns/a"]);
        assert_eq!(
            gauge(&metrics, "wgtwo_operator_unpersisted_refresh_tokens"),
            "wgtwo_operator_unpersisted_refresh_tokens 1"
        );
        memory.persisted(&key("a"));
        assert!(memory.unpersisted().is_empty());
        assert!(memory.pending(&key("a")).unwrap().persisted, "still kept for the target write");
        assert_eq!(
            gauge(&metrics, "wgtwo_operator_unpersisted_refresh_tokens"),
            "wgtwo_operator_unpersisted_refresh_tokens 0"
        );
        memory.published(&key("a"));
        assert!(memory.pending(&key("a")).is_none());
    }

    #[test]
    fn a_template_verdict_holds_for_the_template_it_was_checked_for() {
        let memory = Memory::new(Metrics::new());
        assert_eq!(memory.template_verdict(&key("a"), "h1"), None);
        memory.checked_template(&key("a"), "h1", Err(TemplateError("bad".into())));
        assert_eq!(memory.template_verdict(&key("a"), "h1"), Some(Err(TemplateError("bad".into()))));
        assert_eq!(memory.template_verdict(&key("a"), "h2"), None, "another template is checked again");
        memory.forget(&key("a"));
        assert_eq!(memory.template_verdict(&key("a"), "h1"), None);
    }

    #[test]
    fn an_answered_request_counts_as_handled_only_while_it_is_the_grants_and_unrecorded() {
        let memory = Memory::new(Metrics::new());
        memory.handled_unrecorded(&key("a"), "A");
        assert_eq!(memory.handled_request(&key("a"), Some("A"), Some("older")).as_deref(), Some("A"));
        // The status caught up: forgotten.
        assert_eq!(memory.handled_request(&key("a"), Some("A"), Some("A")), None);
        assert_eq!(memory.handled_request(&key("a"), Some("A"), Some("older")), None);
        // A newer request: forgotten, never written over the newer one's status.
        memory.handled_unrecorded(&key("a"), "A");
        assert_eq!(memory.handled_request(&key("a"), Some("B"), Some("older")), None);
        assert_eq!(memory.handled_request(&key("a"), Some("A"), Some("older")), None);
    }

    #[test]
    fn a_recorded_failure_applies_to_its_generation_until_a_publish() {
        let memory = Memory::new(Metrics::new());
        let at = Timestamp::from_second(1_700_000_000).unwrap();
        let failure = Failure { attempts: 3, failed_at: at, next_attempt: at, generation: Some(2) };
        memory.failed(&key("a"), failure);
        assert_eq!(memory.failure(&key("a"), Some(2)), Some(failure));
        assert_eq!(memory.failure(&key("a"), Some(3)), None, "a spec change starts over");
        memory.published(&key("a"));
        assert_eq!(memory.failure(&key("a"), Some(2)), None, "a success ends the failures");
    }

    fn fake_client(issuer: &str) -> impl Future<Output = Result<WgtwoClient, OAuthError>> {
        let issuer = issuer.to_owned();
        async move { Err(OAuthError::Invalid(format!("no network in unit tests: {issuer}"))) }
    }

    #[tokio::test]
    async fn deleted_grants_and_the_clients_only_they_used_are_forgotten() {
        let metrics = Metrics::new();
        let memory = Memory::new(metrics.clone());
        for i in 0..100 {
            let k = key(&format!("g{i}"));
            let _ = memory.client(&k, format!("client-{}", i % 10), || fake_client("x")).await;
            memory.next_api_backoff(&k, Duration::from_millis(1), Duration::from_millis(2));
        }
        assert_eq!(gauge(&metrics, "wgtwo_operator_grants_in_memory"), "wgtwo_operator_grants_in_memory 100");
        assert_eq!(gauge(&metrics, "wgtwo_operator_oauth_clients_cached"), "wgtwo_operator_oauth_clients_cached 10");
        // A changed client secret is a new key; the old client goes when nobody uses it.
        let _ = memory.client(&key("g0"), "client-new".into(), || fake_client("x")).await;
        assert_eq!(gauge(&metrics, "wgtwo_operator_oauth_clients_cached"), "wgtwo_operator_oauth_clients_cached 11");
        for i in 1..50 {
            memory.forget(&key(&format!("g{i}")));
        }
        let alive: HashSet<_> = (50..60).map(|i| key(&format!("g{i}"))).collect();
        memory.retain(&alive);
        assert_eq!(gauge(&metrics, "wgtwo_operator_grants_in_memory"), "wgtwo_operator_grants_in_memory 10");
        assert_eq!(gauge(&metrics, "wgtwo_operator_oauth_clients_cached"), "wgtwo_operator_oauth_clients_cached 10");
        memory.retain(&HashSet::new());
        assert_eq!(gauge(&metrics, "wgtwo_operator_grants_in_memory"), "wgtwo_operator_grants_in_memory 0");
        assert_eq!(gauge(&metrics, "wgtwo_operator_oauth_clients_cached"), "wgtwo_operator_oauth_clients_cached 0");
    }

    #[tokio::test]
    async fn a_slow_discovery_does_not_hold_up_another_clients() {
        let memory = Arc::new(Memory::new(Metrics::new()));
        let slow = {
            let memory = memory.clone();
            tokio::spawn(async move {
                memory
                    .client(&key("slow"), "slow".into(), || async {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        fake_client("slow").await
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let other = tokio::time::timeout(
            Duration::from_secs(5),
            memory.client(&key("fast"), "fast".into(), || fake_client("fast")),
        )
        .await;
        assert!(other.is_ok(), "discovery of another issuer waited for the slow one");
        slow.abort();
    }
}
