//! What the controller knows about Secrets without a request per reconcile:
//!
//! - `meta`: every other Secret in scope, from a metadata-only watch: its resourceVersion and
//!   controller owner, nothing else (no data, no managedFields).
//! - `owned`: the Secrets labelled as managed by the operator (state and target), from a watch with
//!   data, kept as the few keys the controller uses; own writes are recorded at once, so a reconcile
//!   right after a write never builds on the watch's older copy.
//! - `values`: the keys read from other Secrets (client, refresh token), fetched with a GET only
//!   when the Secret's resourceVersion differs from the one they were read at.
//!
//! Written by hand rather than with kube's reflector stores: those keep every object whole (about
//! 1 KiB per Secret even as metadata), where this keeps about 100 bytes per Secret and the data of
//! the operator's own Secrets only.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio::sync::Notify;

use super::{lineage, target};

/// `namespace/name`.
pub type Key = String;

pub fn key(namespace: &str, name: &str) -> Key {
    format!("{namespace}/{name}")
}

fn key_of(meta: &ObjectMeta) -> Key {
    key(meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default())
}

/// Keys of the operator's own Secrets that the controller reads back.
const OWNED_KEYS: &[&str] = &[
    lineage::KEY_REFRESH_TOKEN,
    lineage::KEY_SOURCE,
    lineage::KEY_SOURCE_VERSION,
    lineage::KEY_FAILED,
    lineage::KEY_PHONE_NUMBER,
    lineage::KEY_PHONE_SOURCE,
    target::KEY_ACCESS_TOKEN,
    target::KEY_EXPIRES_AT,
];
const OWNED_ANNOTATIONS: &[&str] = &[target::ANNOTATION_REFRESHED_AT, super::template::ANNOTATION_TEMPLATE_HASH];
/// Secrets per page of [`SecretCache::confirm_owned`]'s LIST: a few hundred KiB of JSON at a time.
const LIST_PAGE: u32 = 500;
/// How long after a failed LIST of the operator's Secrets another is tried (in the same term).
const LIST_RETRY: Duration = Duration::from_secs(30);
/// Keys whose value the controller never reads back, only whether it is set: kept as one byte.
const PRESENCE_ONLY: &[&str] = &[target::KEY_ACCESS_TOKEN];

#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    pub resource_version: Box<str>,
    /// uid of the controller owner.
    pub owner: Option<Box<str>>,
    /// The controller owner is a WgtwoGrant: a state or target Secret (labels can be removed;
    /// this cannot, short of replacing the owner references).
    pub grant_owned: bool,
}

/// A Secret as far as the controller needs it: metadata and some keys.
#[derive(Clone, Debug)]
struct Kept {
    meta: Meta,
    /// The leadership term in which this process wrote (or consistently read) this copy; 0: neither.
    /// Within that term the copy is the latest, as long as it is the one kept; after it, another
    /// leader may have written meanwhile (and a dead watch not have shown it).
    own: u64,
    annotations: Vec<(&'static str, Box<str>)>,
    data: Vec<(Name, Box<[u8]>)>,
}

/// A key of a Secret's data: one of the operator's own (most, shared) or another's.
type Name = Cow<'static, str>;

/// The static copy of a key the controller reads, when it is one.
fn name(key: &str) -> Name {
    OWNED_KEYS
        .iter()
        .chain(super::inputs::CLIENT_KEYS)
        .find(|k| **k == key)
        .map_or_else(|| Cow::Owned(key.to_owned()), |k| Cow::Borrowed(*k))
}

impl Kept {
    fn from_secret(metadata: &ObjectMeta, data: Option<&BTreeMap<String, ByteString>>, keys: &[&str]) -> Self {
        let data = data
            .into_iter()
            .flatten()
            .filter(|(k, _)| keys.contains(&k.as_str()))
            .map(|(k, v)| {
                let value: Box<[u8]> = match PRESENCE_ONLY.contains(&k.as_str()) {
                    true if v.0.is_empty() => Box::default(),
                    true => Box::new(*b"*"),
                    false => v.0.as_slice().into(),
                };
                (name(k), value)
            })
            .collect();
        let annotations = metadata
            .annotations
            .iter()
            .flatten()
            .filter_map(|(k, v)| Some((*OWNED_ANNOTATIONS.iter().find(|a| **a == k)?, v.as_str().into())))
            .collect();
        Self { meta: meta_of(metadata), own: 0, annotations, data }
    }

    fn has(&self, keys: &[&str]) -> bool {
        keys.iter().all(|k| self.data.iter().any(|(have, _)| &**have == *k))
    }

    /// A Secret with what is kept (for the pure functions that read Secrets).
    fn to_secret(&self, namespace: &str, name: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                resource_version: Some(self.meta.resource_version.to_string()),
                owner_references: self.meta.owner.as_ref().map(|uid| {
                    vec![OwnerReference { uid: uid.to_string(), controller: Some(true), ..Default::default() }]
                }),
                annotations: (!self.annotations.is_empty())
                    .then(|| self.annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            data: Some(self.data.iter().map(|(k, v)| (k.to_string(), ByteString(v.to_vec()))).collect()),
            ..Default::default()
        }
    }
}

/// Labelled as the operator's own (what the owned watch selects).
fn is_managed(metadata: &ObjectMeta) -> bool {
    metadata.labels.as_ref().and_then(|l| l.get(super::LABEL_MANAGED_BY)).is_some_and(|v| v == super::MANAGER)
}

fn meta_of(metadata: &ObjectMeta) -> Meta {
    let controller = metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true));
    Meta {
        resource_version: metadata.resource_version.as_deref().unwrap_or_default().into(),
        owner: controller.map(|o| o.uid.as_str().into()),
        grant_owned: controller.is_some_and(|o| o.kind == "WgtwoGrant" && o.api_version.starts_with("auth.wgtwo.com/")),
    }
}

/// Whether a copy at resourceVersion `have` is at least as new as `seen` (what a watch shows).
/// resourceVersions are etcd revisions in every apiserver; one that does not parse as a number
/// only counts when equal.
pub fn at_least_as_new(have: &str, seen: &str) -> bool {
    have == seen || matches!((have.parse::<u64>(), seen.parse::<u64>()), (Ok(h), Ok(s)) if h > s)
}

/// A copy of a Secret at a resourceVersion.
trait Versioned {
    fn version(&self) -> &str;
    /// Another copy at the same version arrived (e.g. the watch event of an own write).
    fn same_version(&mut self, _other: Self)
    where
        Self: Sized,
    {
    }
}

impl Versioned for Meta {
    fn version(&self) -> &str {
        &self.resource_version
    }
}

impl Versioned for Kept {
    fn version(&self) -> &str {
        &self.meta.resource_version
    }

    fn same_version(&mut self, other: Self) {
        self.own = self.own.max(other.own);
    }
}

/// A map fed by a watch, with the relist semantics of kube's watcher: objects not listed again
/// are dropped at `InitDone`. A copy only replaces an older one, so a lagging watch event never
/// undoes an own write.
struct Watched<V> {
    map: RwLock<HashMap<Key, V>>,
    relisted: Mutex<Option<HashSet<Key>>>,
    synced: AtomicBool,
}

impl<V> Default for Watched<V> {
    fn default() -> Self {
        Self { map: Default::default(), relisted: Default::default(), synced: AtomicBool::new(false) }
    }
}

impl<V: Versioned> Watched<V> {
    /// Applies a watch event; returns the keys removed at the end of a relist. Objects `kept`
    /// refuses are not kept (and dropped if they were).
    fn apply<K>(
        &self,
        event: &watcher::Event<K>,
        value: impl Fn(&K) -> V,
        key: impl Fn(&K) -> Key,
        kept: impl Fn(&K) -> bool,
    ) -> Vec<Key> {
        match event {
            watcher::Event::Init => *self.relisted.lock().unwrap() = Some(HashSet::new()),
            watcher::Event::InitApply(o) | watcher::Event::Apply(o) if !kept(o) => {
                self.map.write().unwrap().remove(&key(o));
            }
            watcher::Event::InitApply(o) => {
                let k = key(o);
                if let Some(set) = self.relisted.lock().unwrap().as_mut() {
                    set.insert(k.clone());
                }
                self.upsert(k, value(o));
            }
            watcher::Event::Apply(o) => self.upsert(key(o), value(o)),
            watcher::Event::Delete(o) => {
                self.map.write().unwrap().remove(&key(o));
            }
            watcher::Event::InitDone => {
                let listed = self.relisted.lock().unwrap().take().unwrap_or_default();
                let mut map = self.map.write().unwrap();
                let gone: Vec<Key> = map.keys().filter(|k| !listed.contains(*k)).cloned().collect();
                for k in &gone {
                    map.remove(k);
                }
                map.shrink_to_fit();
                self.synced.store(true, Ordering::Release);
                return gone;
            }
        }
        Vec::new()
    }

    fn upsert(&self, key: Key, value: V) {
        let mut map = self.map.write().unwrap();
        match map.get_mut(&key) {
            Some(have) if have.version() == value.version() => have.same_version(value),
            Some(have) if at_least_as_new(have.version(), value.version()) => {}
            _ => {
                map.insert(key, value);
            }
        }
    }
}

#[derive(Default)]
pub struct SecretCache {
    meta: Watched<Meta>,
    owned: Watched<Kept>,
    /// Keys read from Secrets the operator does not own, at the resourceVersion they were read.
    values: Mutex<HashMap<Key, Kept>>,
    /// One GET at a time per Secret: reconciles of grants sharing a client Secret wait for it.
    reading: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    synced: Notify,
    /// The leadership term (see [`crate::leader::Leadership::epoch`]) own copies are marked with.
    epoch: Arc<AtomicU64>,
    /// The term whose consistent LIST of the operator's Secrets ([`Self::confirm_owned`]) ran.
    listed_in: AtomicU64,
    /// The term and time of the last LIST that failed: tried again after [`LIST_RETRY`].
    list_failed: Mutex<Option<(u64, tokio::time::Instant)>>,
    /// One such LIST at a time.
    listing: tokio::sync::Mutex<()>,
}

impl SecretCache {
    /// A cache whose own copies count within the leadership term `epoch` holds at the time.
    pub fn new(epoch: Arc<AtomicU64>) -> Arc<Self> {
        Arc::new(Self { epoch, ..Default::default() })
    }

    /// Both watches have listed everything once.
    pub fn is_synced(&self) -> bool {
        self.meta.synced.load(Ordering::Acquire) && self.owned.synced.load(Ordering::Acquire)
    }

    /// Waits up to `within` for both watches to have listed everything.
    pub async fn wait_synced(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.synced.notified();
            if self.is_synced() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.is_synced();
            }
        }
    }

    pub fn apply_meta(&self, event: &watcher::Event<PartialObjectMeta<Secret>>) {
        // The operator's own Secrets are in `owned` already (with their metadata): not kept twice.
        let gone =
            self.meta.apply(event, |s| meta_of(&s.metadata), |s| key_of(&s.metadata), |s| !is_managed(&s.metadata));
        let mut values = self.values.lock().unwrap();
        match event {
            watcher::Event::Delete(s) => {
                values.remove(&key_of(&s.metadata));
            }
            watcher::Event::InitDone => {
                for k in gone {
                    values.remove(&k);
                }
                self.synced.notify_waiters();
            }
            _ => {}
        }
    }

    pub fn apply_owned(&self, event: &watcher::Event<Secret>) {
        self.owned.apply(
            event,
            |s| Kept::from_secret(&s.metadata, s.data.as_ref(), OWNED_KEYS),
            |s| key_of(&s.metadata),
            |_| true,
        );
        if matches!(event, watcher::Event::InitDone) {
            self.synced.notify_waiters();
        }
    }

    /// Whether the Secret is one the operator writes for a grant (a state or target Secret): by its
    /// label or by its controller owner. Such a Secret is never a grant's input.
    pub fn is_operators(&self, namespace: &str, name: &str) -> bool {
        let key = key(namespace, name);
        self.owned.map.read().unwrap().contains_key(&key)
            || self.meta.map.read().unwrap().get(&key).is_some_and(|m| m.grant_owned)
    }

    /// The lineage source (sha256 of the user's token it began from) a state Secret records, as
    /// the owned watch or this process's last write left it.
    pub fn state_source(&self, namespace: &str, name: &str) -> Option<String> {
        let owned = self.owned.map.read().unwrap();
        let kept = owned.get(&key(namespace, name))?;
        kept.data
            .iter()
            .find(|(k, _)| &**k == lineage::KEY_SOURCE)
            .and_then(|(_, v)| String::from_utf8(v.to_vec()).ok())
    }

    /// Whether this watch event shows exactly what the operator itself last wrote (nothing to do).
    pub fn is_own_write(&self, secret: &Secret) -> bool {
        let key = key_of(&secret.metadata);
        self.owned
            .map
            .read()
            .unwrap()
            .get(&key)
            .is_some_and(|k| Some(&*k.meta.resource_version) == secret.metadata.resource_version.as_deref())
    }

    /// The resourceVersion of the kept copy of an owned Secret if this process wrote it itself (or
    /// read it consistently) in leadership term `epoch`: within that term it is the latest, as long
    /// as it is the copy kept. `None`: no such copy (none kept, a watch copy, an earlier term's).
    pub fn confirmed_version(&self, namespace: &str, name: &str, epoch: u64) -> Option<String> {
        let owned = self.owned.map.read().unwrap();
        let kept = owned.get(&key(namespace, name))?;
        (epoch != 0 && kept.own == epoch).then(|| kept.meta.resource_version.to_string())
    }

    /// Confirms the kept copies of the operator's Secrets with one consistent LIST (by label,
    /// metadata only, paged, one snapshot), once per leadership term `epoch` (read before the
    /// call): a copy kept at the listed version becomes an own copy of the term. Nothing else
    /// changes: a copy at another version, or a Secret not kept (deleted since the snapshot, or not
    /// delivered by the watch yet), still needs its own read, and so does one not listed (only a
    /// read just before the token request tells it does not exist: a previous leader may still
    /// write a kept answer, a relist may drop copies, a relabelled one is in neither watch for a
    /// moment). Instead of a GET per grant before its first token request in a term. A failed LIST
    /// is tried again after [`LIST_RETRY`] (reads fall back to GETs).
    pub async fn confirm_owned(&self, api: &Api<Secret>, epoch: u64) -> Result<(), kube::Error> {
        let _one = self.listing.lock().await;
        // Not for a term that has ended (it waited for another LIST: it could only undo the new
        // term's confirmations), nor again in a term that had its LIST or a failed one lately.
        let failed_lately =
            self.list_failed.lock().unwrap().is_some_and(|(term, at)| term == epoch && at.elapsed() < LIST_RETRY);
        if epoch == 0 || epoch != self.epoch() || self.listed_in.load(Ordering::SeqCst) == epoch || failed_lately {
            return Ok(());
        }
        let selector = format!("{}={}", super::LABEL_MANAGED_BY, super::MANAGER);
        // Metadata only: the versions are what it compares (no refresh token on the wire).
        let mut params = kube::api::ListParams::default().labels(&selector).limit(LIST_PAGE);
        loop {
            let page = match api.list_metadata(&params).await {
                Ok(page) => page,
                Err(err) => {
                    *self.list_failed.lock().unwrap() = Some((epoch, tokio::time::Instant::now()));
                    return Err(err);
                }
            };
            for secret in &page.items {
                self.confirm_listed(&secret.metadata, epoch);
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        self.listed_in.fetch_max(epoch, Ordering::SeqCst);
        Ok(())
    }

    /// A Secret of a consistent LIST in term `epoch`: the copy kept at its version is confirmed.
    fn confirm_listed(&self, metadata: &ObjectMeta, epoch: u64) {
        let listed = metadata.resource_version.as_deref().unwrap_or_default();
        if let Some(kept) = self.owned.map.write().unwrap().get_mut(&key_of(metadata))
            && &*kept.meta.resource_version == listed
        {
            kept.own = kept.own.max(epoch);
        }
    }

    /// The leadership term now: read it before a request whose answer is recorded with [`Self::wrote`].
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Records a Secret the operator just wrote (or read with a consistent GET) by a request sent
    /// in leadership term `epoch` (read before it was sent: an answer that arrives after a new
    /// term began may predate another leader's write).
    pub fn wrote(&self, secret: &Secret, epoch: u64) {
        let key = key_of(&secret.metadata);
        // Only what the owned watch also delivers: a copy of an unlabelled Secret would never be
        // updated by it and stay confirmed at an old version for the rest of the term.
        if !is_managed(&secret.metadata) {
            self.owned.map.write().unwrap().remove(&key);
            return;
        }
        let mut kept = Kept::from_secret(&secret.metadata, secret.data.as_ref(), OWNED_KEYS);
        // Term 0 (a standby before its first Lease) never counts as own.
        kept.own = epoch;
        self.owned.upsert(key, kept);
    }

    /// The metadata of any Secret in scope (`None`: it does not exist).
    pub fn meta(&self, namespace: &str, name: &str) -> Option<Meta> {
        let key = key(namespace, name);
        let owned = self.owned.map.read().unwrap().get(&key).map(|k| k.meta.clone());
        let watched = self.meta.map.read().unwrap().get(&key).cloned();
        match (owned, watched) {
            (Some(o), Some(w)) => Some(if at_least_as_new(&o.resource_version, &w.resource_version) { o } else { w }),
            (o, w) => o.or(w),
        }
    }

    /// An operator-owned Secret (state or target) with the keys the controller reads, as the watch or
    /// the operator's own last write left it; read with a GET only when the metadata watch shows it
    /// unlabelled (at a newer version, or one the owned watch does not deliver). `None`: neither
    /// watch shows it (a write then finds out with a conflict; a token request is preceded by a
    /// consistent read, see [`Self::confirm_owned`]).
    pub async fn owned(&self, api: &Api<Secret>, namespace: &str, name: &str) -> Result<Option<Secret>, kube::Error> {
        let key = key(namespace, name);
        let kept = self.owned.map.read().unwrap().get(&key).cloned();
        let seen = self.meta.map.read().unwrap().get(&key).cloned();
        match (kept, seen) {
            (None, None) => return Ok(None),
            (Some(k), None) => return Ok(Some(k.to_secret(namespace, name))),
            (Some(k), Some(s)) if at_least_as_new(&k.meta.resource_version, &s.resource_version) => {
                return Ok(Some(k.to_secret(namespace, name)));
            }
            _ => {}
        }
        let epoch = self.epoch();
        let Some(secret) = api.get_opt(name).await? else {
            return Ok(None);
        };
        self.wrote(&secret, epoch);
        Ok(Some(Kept::from_secret(&secret.metadata, secret.data.as_ref(), OWNED_KEYS).to_secret(namespace, name)))
    }

    /// `keys` of a Secret the operator does not own: from the cache when it was read at the
    /// resourceVersion the watch shows, else with a GET (kept for the next read when `keep`).
    /// `None`: the Secret does not exist.
    pub async fn read(
        &self,
        api: &Api<Secret>,
        namespace: &str,
        name: &str,
        keys: &[&str],
        keep: bool,
    ) -> Result<Option<Secret>, kube::Error> {
        let key = key(namespace, name);
        if let Some(hit) = self.cached_read(&key, namespace, name, keys) {
            return Ok(hit);
        }
        let lock = self.reading.lock().unwrap().entry(key.clone()).or_default().clone();
        let result = {
            let _one_at_a_time = lock.lock().await;
            match self.cached_read(&key, namespace, name, keys) {
                Some(hit) => Ok(hit),
                None => self.fetch(api, key.clone(), namespace, name, keys, keep).await,
            }
        };
        let mut reading = self.reading.lock().unwrap();
        // Held only by the map and by this call: nobody else waits for it.
        if Arc::strong_count(&lock) == 2 {
            reading.remove(&key);
        }
        result
    }

    /// `Some` when the cache can answer: the Secret does not exist, or its keys were read at the
    /// version the watch shows.
    fn cached_read(&self, key: &Key, namespace: &str, name: &str, keys: &[&str]) -> Option<Option<Secret>> {
        let Some(seen) = self.meta(namespace, name) else {
            return Some(None);
        };
        let values = self.values.lock().unwrap();
        let kept = values.get(key)?;
        (at_least_as_new(&kept.meta.resource_version, &seen.resource_version) && kept.has(keys))
            .then(|| Some(kept.to_secret(namespace, name)))
    }

    async fn fetch(
        &self,
        api: &Api<Secret>,
        key: Key,
        namespace: &str,
        name: &str,
        keys: &[&str],
        keep: bool,
    ) -> Result<Option<Secret>, kube::Error> {
        let Some(secret) = api.get_opt(name).await? else {
            return Ok(None);
        };
        // Keys other grants read from this Secret stay kept, if it did not change.
        let mut wanted: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        if let Some(kept) = self.values.lock().unwrap().get(&key)
            && kept.meta.resource_version.as_ref() == secret.resource_version().as_deref().unwrap_or_default()
        {
            wanted.extend(kept.data.iter().map(|(k, _)| k.to_string()).filter(|k| !keys.contains(&k.as_str())));
        }
        let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
        let kept = Kept::from_secret(&secret.metadata, secret.data.as_ref(), &wanted);
        let out = kept.to_secret(namespace, name);
        if keep {
            self.values.lock().unwrap().insert(key, kept);
        }
        Ok(Some(out))
    }

    #[cfg(test)]
    fn peek_owned(&self, name: &str) -> Option<Secret> {
        self.owned.map.read().unwrap().get(&key("ns", name)).map(|k| k.to_secret("ns", name))
    }

    #[cfg(test)]
    fn sizes(&self) -> (usize, usize, usize) {
        (self.meta.map.read().unwrap().len(), self.owned.map.read().unwrap().len(), self.values.lock().unwrap().len())
    }
}

/// Drops what the controller never reads from a watched object before it is kept or compared:
/// managedFields (often larger than the object) and kubectl's copy of the last applied manifest.
pub fn strip<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str, rv: &str, owner: Option<&str>, data: &[(&str, &str)]) -> Secret {
        let mut s = wgtwo_testenv::string_secret(name, data);
        s.metadata.namespace = Some("ns".into());
        s.metadata.resource_version = Some(rv.into());
        s.metadata.owner_references =
            owner.map(|uid| vec![OwnerReference { uid: uid.into(), controller: Some(true), ..Default::default() }]);
        s
    }

    /// A Secret labelled as the operator's (a state or target Secret).
    fn managed(name: &str, rv: &str, data: &[(&str, &str)]) -> Secret {
        let mut s = secret(name, rv, None, data);
        s.metadata.owner_references = Some(vec![OwnerReference {
            uid: "uid".into(),
            controller: Some(true),
            kind: "WgtwoGrant".into(),
            api_version: "auth.wgtwo.com/v1alpha1".into(),
            ..Default::default()
        }]);
        s.metadata.labels =
            Some([(super::super::LABEL_MANAGED_BY.to_owned(), super::super::MANAGER.to_owned())].into());
        s
    }

    fn meta(s: &Secret) -> PartialObjectMeta<Secret> {
        PartialObjectMeta { types: None, metadata: s.metadata.clone(), _phantom: Default::default() }
    }

    #[test]
    fn newer_means_a_larger_revision_and_unparseable_versions_only_match_exactly() {
        assert!(at_least_as_new("10", "10"));
        assert!(at_least_as_new("11", "10"));
        assert!(!at_least_as_new("9", "10"));
        assert!(at_least_as_new("x", "x"));
        assert!(!at_least_as_new("y", "x"));
    }

    #[test]
    fn an_own_write_wins_over_an_older_watch_event_and_yields_to_a_newer_one() {
        let cache = SecretCache::default();
        let written = managed("g-wgtwo-state", "20", &[("refresh_token", "new")]);
        cache.wrote(&written, 1);
        // The watch delivers the version before our write only now.
        cache.apply_owned(&watcher::Event::Apply(managed("g-wgtwo-state", "15", &[("refresh_token", "old")])));
        let s = cache.peek_owned("g-wgtwo-state").unwrap();
        assert_eq!(s.data.unwrap()["refresh_token"].0, b"new");
        assert!(cache.is_own_write(&written));
        assert!(cache.confirmed_version("ns", "g-wgtwo-state", 1).is_some());
        // The watch delivers our write: still our own copy.
        cache.apply_owned(&watcher::Event::Apply(written.clone()));
        assert!(cache.confirmed_version("ns", "g-wgtwo-state", 1).is_some());
        // Someone else wrote after us.
        cache.apply_owned(&watcher::Event::Apply(managed("g-wgtwo-state", "25", &[("refresh_token", "other")])));
        assert_eq!(cache.peek_owned("g-wgtwo-state").unwrap().data.unwrap()["refresh_token"].0, b"other");
        assert!(!cache.is_own_write(&written));
        assert!(
            cache.confirmed_version("ns", "g-wgtwo-state", 1).is_none(),
            "another writer's copy must be confirmed before use"
        );
    }

    #[test]
    fn an_own_copy_from_an_earlier_leadership_term_is_not_trusted() {
        let epoch = Arc::new(AtomicU64::new(3));
        let cache = SecretCache::new(epoch.clone());
        cache.wrote(&managed("g-wgtwo-state", "20", &[("refresh_token", "mine")]), epoch.load(Ordering::SeqCst));
        assert!(cache.confirmed_version("ns", "g-wgtwo-state", 3).is_some());
        // Lost the Lease and won it back: another leader may have written while this process's
        // watch was dead, so the copy needs a consistent read again.
        epoch.store(4, Ordering::SeqCst);
        assert!(cache.confirmed_version("ns", "g-wgtwo-state", 4).is_none());
        // An answer to a read sent in the old term, arriving in the new one, is not trusted either.
        cache.wrote(&managed("g-wgtwo-state", "21", &[("refresh_token", "mine")]), 3);
        assert!(cache.confirmed_version("ns", "g-wgtwo-state", 4).is_none());
        // Read consistently in the new term: trusted again.
        cache.wrote(&managed("g-wgtwo-state", "21", &[("refresh_token", "mine")]), epoch.load(Ordering::SeqCst));
        assert!(cache.confirmed_version("ns", "g-wgtwo-state", 4).is_some());
    }

    #[test]
    fn a_terms_list_confirms_only_the_copies_kept_at_the_listed_version() {
        let cache = SecretCache::new(Arc::new(AtomicU64::new(2)));
        let state = |name: &str, rv: &str| managed(name, rv, &[("refresh_token", name)]);
        // The watch's copies; one it has not delivered yet; one that went meanwhile.
        cache.apply_owned(&watcher::Event::Apply(state("a-wgtwo-state", "5")));
        cache.apply_owned(&watcher::Event::Apply(state("b-wgtwo-state", "9")));
        cache.apply_owned(&watcher::Event::Apply(state("c-wgtwo-state", "4")));
        assert_eq!(cache.confirmed_version("ns", "a-wgtwo-state", 2), None, "a watch copy needs confirming");
        for listed in [state("a-wgtwo-state", "5"), state("b-wgtwo-state", "7"), state("d-wgtwo-state", "6")] {
            cache.confirm_listed(&listed.metadata, 2);
        }
        cache.apply_owned(&watcher::Event::Delete(state("c-wgtwo-state", "4")));
        cache.confirm_listed(&state("c-wgtwo-state", "4").metadata, 2);
        assert_eq!(
            cache.confirmed_version("ns", "a-wgtwo-state", 2).as_deref(),
            Some("5"),
            "kept at the listed version"
        );
        assert_eq!(cache.confirmed_version("ns", "b-wgtwo-state", 2), None, "newer than the LIST: read it");
        assert_eq!(cache.confirmed_version("ns", "d-wgtwo-state", 2), None, "not kept: read it");
        assert!(cache.peek_owned("d-wgtwo-state").is_none(), "a LIST adds nothing");
        assert!(cache.peek_owned("c-wgtwo-state").is_none(), "a LIST brings nothing deleted back");
        assert_eq!(cache.confirmed_version("ns", "a-wgtwo-state", 3), None, "in the next term, confirmed again");
        // A standby's own write (term 0) is not trusted in its first term.
        cache.wrote(&state("e-wgtwo-state", "11"), 0);
        assert_eq!(cache.confirmed_version("ns", "e-wgtwo-state", 1), None);
        // A LIST of an earlier term that finishes late does not take a newer term's mark away.
        cache.wrote(&state("f-wgtwo-state", "12"), 3);
        cache.confirm_listed(&state("f-wgtwo-state", "12").metadata, 2);
        assert_eq!(cache.confirmed_version("ns", "f-wgtwo-state", 3).as_deref(), Some("12"));
    }

    #[test]
    fn the_operators_own_secrets_are_kept_once_and_an_unlabelled_read_is_not_kept_as_one() {
        let cache = SecretCache::new(Arc::new(AtomicU64::new(1)));
        let state = managed("g-wgtwo-state", "5", &[("refresh_token", "rt")]);
        cache.apply_meta(&watcher::Event::Apply(meta(&state)));
        cache.apply_owned(&watcher::Event::Apply(state.clone()));
        assert_eq!(cache.sizes().0, 0, "the metadata cache leaves it to the owned cache");
        assert_eq!(cache.meta("ns", "g-wgtwo-state").unwrap().resource_version.as_ref(), "5");
        assert!(cache.is_operators("ns", "g-wgtwo-state"));
        // Its label removed: the owned watch drops it, the metadata watch keeps it now.
        let mut unlabelled = state.clone();
        unlabelled.metadata.labels = None;
        unlabelled.metadata.resource_version = Some("6".into());
        cache.apply_owned(&watcher::Event::Delete(state));
        cache.apply_meta(&watcher::Event::Apply(meta(&unlabelled)));
        assert!(cache.is_operators("ns", "g-wgtwo-state"), "still owned by a grant");
        // A consistent read of it is not kept as an own copy: the owned watch would never update it.
        cache.wrote(&unlabelled, 1);
        assert!(cache.peek_owned("g-wgtwo-state").is_none());
        assert_eq!(cache.confirmed_version("ns", "g-wgtwo-state", 1), None);
    }

    #[test]
    fn a_relist_drops_what_is_gone_and_only_keys_the_controller_reads_are_kept() {
        let cache = SecretCache::default();
        let a = secret("a", "1", None, &[("client_id", "id")]);
        let t = secret("t", "2", Some("uid"), &[("access_token", "at"), ("unrelated", "big")]);
        for e in [
            watcher::Event::Init,
            watcher::Event::InitApply(meta(&a)),
            watcher::Event::InitApply(meta(&t)),
            watcher::Event::InitDone,
        ] {
            cache.apply_meta(&e);
        }
        for e in [watcher::Event::Init, watcher::Event::InitApply(t.clone()), watcher::Event::InitDone] {
            cache.apply_owned(&e);
        }
        assert!(cache.is_synced());
        let kept = cache.peek_owned("t").unwrap();
        assert_eq!(kept.data.unwrap().keys().collect::<Vec<_>>(), ["access_token"]);
        assert_eq!(cache.meta("ns", "a").unwrap().owner, None);
        for e in [watcher::Event::Init, watcher::Event::InitApply(meta(&t)), watcher::Event::InitDone] {
            cache.apply_meta(&e);
        }
        assert_eq!(cache.meta("ns", "a"), None, "not listed again: deleted while the watch was down");
        assert_eq!(cache.sizes().0, 1);
    }
}
