//! What the controller keeps of each WgtwoGrant: only what reconcile, the Secret index, the metrics
//! and the status need, projected as each object is read from the watch (the whole object lives only
//! while it is deserialized). Strings that repeat across grants (issuer, client Secret, token key,
//! scope) are shared; metadata keeps name, namespace, uid, version, generation, creation and
//! deletion times; of the annotations only the refresh request.
//!
//! kube's Controller and reflector store work with any [`Resource`]: this one has WgtwoGrant's API
//! coordinates and deserializes from a WgtwoGrant, so `Api<Grant>` watches the same objects.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::reflector::ObjectRef;
use serde::Deserialize;

use crate::api::{
    ANNOTATION_REFRESH_REQUESTED, GRANT_TYPE_CLIENT_CREDENTIALS, GRANT_TYPE_REFRESH_TOKEN, TargetTemplate, WgtwoGrant,
    WgtwoGrantStatus,
};

/// A WgtwoGrant as the controller keeps it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "WgtwoGrant")]
pub struct Grant {
    pub metadata: ObjectMeta,
    pub spec: Spec,
    /// The `auth.wgtwo.com/refresh-requested-at` annotation, the only one the controller reads.
    pub refresh_requested: Option<Box<str>>,
    pub status: Option<WgtwoGrantStatus>,
}

/// The spec, as the controller reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub issuer_url: Arc<str>,
    /// `clientSecretRef.name`.
    pub client_secret: Arc<str>,
    /// `refreshTokenSecretRef`: a subscriber's grant; `None`: a product grant (client credentials).
    pub refresh_token: Option<TokenRef>,
    /// `target.secretName`.
    pub target_secret: Box<str>,
    /// `target.template` (rare: boxed, so a grant without one pays a pointer).
    pub template: Option<Box<TargetTemplate>>,
    pub scope: Option<Arc<str>>,
    pub refresh_before: Option<Arc<str>>,
}

/// `refreshTokenSecretRef`.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRef {
    pub name: Box<str>,
    pub key: Arc<str>,
}

impl Spec {
    /// The OAuth 2.0 grant type, as `status.grantType` and the metrics name it.
    pub fn grant_type(&self) -> &'static str {
        match self.refresh_token {
            Some(_) => GRANT_TYPE_REFRESH_TOKEN,
            None => GRANT_TYPE_CLIENT_CREDENTIALS,
        }
    }
}

impl Grant {
    /// The key the controller's memory and journal use (no uid or version).
    pub fn key(&self) -> ObjectRef<WgtwoGrant> {
        let name = ObjectRef::new(self.metadata.name.as_deref().unwrap_or_default());
        match self.metadata.namespace.as_deref() {
            Some(ns) => name.within(ns),
            None => name,
        }
    }

    /// Whether this copy asks for a look that `old` (the cached copy, if any) did not: another
    /// object under the name, a spec change (generation), or a refresh request. A status write
    /// does not (after a failed refresh it must not bypass the backoff).
    pub fn changed_from(&self, old: Option<&Grant>) -> bool {
        old.is_none_or(|old| {
            old.metadata.uid != self.metadata.uid
                || old.metadata.generation != self.metadata.generation
                || old.refresh_requested != self.refresh_requested
        })
    }
}

/// The newer of two copies of a grant: the one a reconcile was dispatched with, and the cache's
/// copy now (the same object, by uid, at an equal or later resourceVersion).
pub fn newest<'a>(dispatched: &'a Grant, now: Option<&'a Grant>) -> &'a Grant {
    fn version(g: &Grant) -> &str {
        g.metadata.resource_version.as_deref().unwrap_or_default()
    }
    match now {
        Some(now)
            if now.metadata.uid == dispatched.metadata.uid
                && super::secret_cache::at_least_as_new(version(now), version(dispatched)) =>
        {
            now
        }
        _ => dispatched,
    }
}

impl From<WgtwoGrant> for Grant {
    fn from(grant: WgtwoGrant) -> Self {
        let WgtwoGrant { metadata, spec, status } = grant;
        let refresh_requested =
            metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_REFRESH_REQUESTED)).map(|v| v.as_str().into());
        let metadata = ObjectMeta {
            name: metadata.name,
            namespace: metadata.namespace,
            uid: metadata.uid,
            resource_version: metadata.resource_version,
            generation: metadata.generation,
            // Of grants naming one refresh-token Secret, the oldest uses it.
            creation_timestamp: metadata.creation_timestamp,
            deletion_timestamp: metadata.deletion_timestamp,
            ..Default::default()
        };
        let spec = Spec {
            issuer_url: intern(&spec.issuer_url),
            client_secret: intern(&spec.client_secret_ref.name),
            refresh_token: spec
                .refresh_token_secret_ref
                .map(|r| TokenRef { name: r.name.into_boxed_str(), key: intern(&r.key) }),
            target_secret: spec.target.secret_name.into_boxed_str(),
            template: spec.target.template.map(Box::new),
            scope: spec.scope.as_deref().map(intern),
            refresh_before: spec.refresh_before.as_deref().map(intern),
        };
        Self { metadata, spec, refresh_requested, status }
    }
}

impl Resource for Grant {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        WgtwoGrant::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        WgtwoGrant::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        WgtwoGrant::version(dt)
    }
    fn api_version(dt: &()) -> Cow<'_, str> {
        WgtwoGrant::api_version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        WgtwoGrant::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Strings many grants share, one allocation each. Written by hand: an interner that drops what
/// nobody uses any more is a few lines, and the crates for it keep every string for good.
static INTERNED: Mutex<Interned> = Mutex::new(Interned { set: None, prune_at: 64 });

struct Interned {
    set: Option<HashSet<Arc<str>>>,
    /// Size at which strings only the set still holds are dropped (then twice the size left).
    prune_at: usize,
}

/// The shared copy of `s`.
pub fn intern(s: &str) -> Arc<str> {
    let mut interned = INTERNED.lock().unwrap();
    let Interned { set, prune_at } = &mut *interned;
    let set = set.get_or_insert_with(HashSet::new);
    if let Some(shared) = set.get(s) {
        return shared.clone();
    }
    if set.len() >= *prune_at {
        set.retain(|s| Arc::strong_count(s) > 1);
        *prune_at = (set.len() * 2).max(64);
    }
    let shared: Arc<str> = s.into();
    set.insert(shared.clone());
    shared
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wgtwo_grant(json: serde_json::Value) -> WgtwoGrant {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_grant_keeps_what_the_controller_reads_and_nothing_else() {
        let json = serde_json::json!({
            "apiVersion": "auth.wgtwo.com/v1alpha1", "kind": "WgtwoGrant",
            "metadata": {
                "name": "alice", "namespace": "ns", "uid": "u1", "resourceVersion": "7", "generation": 2,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"team": "a"},
                "annotations": {"auth.wgtwo.com/refresh-requested-at": "now", "other": "x",
                                "kubectl.kubernetes.io/last-applied-configuration": "{...}"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
                "finalizers": ["x"]
            },
            "spec": {"issuerUrl": "https://id.example", "clientSecretRef": {"name": "client"},
                     "refreshTokenSecretRef": {"name": "alice-auth", "key": "refresh_token"},
                     "target": {"secretName": "alice-token"}, "scope": "phone", "refreshBefore": "20m"},
            "status": {"grantType": "refresh_token", "failedAttempts": 1}
        });
        let grant: Grant = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(grant, Grant::from(wgtwo_grant(json)));
        assert_eq!(grant.refresh_requested.as_deref(), Some("now"));
        let m = &grant.metadata;
        assert_eq!(
            (m.name.as_deref(), m.namespace.as_deref(), m.uid.as_deref()),
            (Some("alice"), Some("ns"), Some("u1"))
        );
        assert_eq!((m.resource_version.as_deref(), m.generation), (Some("7"), Some(2)));
        assert!(m.creation_timestamp.is_some());
        assert!(m.labels.is_none() && m.annotations.is_none() && m.managed_fields.is_none() && m.finalizers.is_none());
        assert_eq!(&*grant.spec.issuer_url, "https://id.example");
        assert_eq!(&*grant.spec.client_secret, "client");
        let token = grant.spec.refresh_token.as_ref().unwrap();
        assert_eq!((&*token.name, &*token.key), ("alice-auth", "refresh_token"));
        assert_eq!(&*grant.spec.target_secret, "alice-token");
        assert_eq!((grant.spec.scope.as_deref(), grant.spec.refresh_before.as_deref()), (Some("phone"), Some("20m")));
        assert_eq!(grant.spec.grant_type(), GRANT_TYPE_REFRESH_TOKEN);
        assert_eq!(grant.status.unwrap().failed_attempts, Some(1));
        assert_eq!(Grant::url_path(&(), Some("ns")), WgtwoGrant::url_path(&(), Some("ns")));
    }

    fn copy(uid: &str, version: &str, handled: &str) -> Grant {
        Grant::from(wgtwo_grant(serde_json::json!({
            "apiVersion": "auth.wgtwo.com/v1alpha1", "kind": "WgtwoGrant",
            "metadata": {"name": "alice", "namespace": "ns", "uid": uid, "resourceVersion": version},
            "spec": {"issuerUrl": "https://id.example", "clientSecretRef": {"name": "client"},
                     "target": {"secretName": "alice-token"}},
            "status": {"refreshRequestHandled": handled}
        })))
    }

    fn handled(grant: &Grant) -> &str {
        grant.status.as_ref().unwrap().refresh_request_handled.as_deref().unwrap()
    }

    #[test]
    fn the_newest_copy_is_the_caches_when_it_is_the_same_grant_at_a_later_version() {
        let dispatched = copy("u1", "10", "first");
        // The watch delivered the status that handled the second request after the dispatch.
        assert_eq!(handled(newest(&dispatched, Some(&copy("u1", "12", "second")))), "second");
        assert_eq!(handled(newest(&dispatched, Some(&copy("u1", "10", "same")))), "same");
        // Never an older copy, another grant of the same name, or nothing.
        assert_eq!(handled(newest(&dispatched, Some(&copy("u1", "9", "older")))), "first");
        assert_eq!(handled(newest(&dispatched, Some(&copy("u2", "12", "recreated")))), "first");
        assert_eq!(handled(newest(&dispatched, None)), "first");
    }

    #[test]
    fn a_grant_asks_for_a_look_when_it_is_new_or_its_spec_or_refresh_request_changed_not_its_status() {
        let grant = |uid: &str, generation: i64, request: Option<&str>, handled: &str| {
            let mut g = copy(uid, "10", handled);
            g.metadata.generation = Some(generation);
            g.refresh_requested = request.map(Into::into);
            g
        };
        let cached = grant("u1", 1, None, "x");
        assert!(cached.changed_from(None), "first seen");
        assert!(!grant("u1", 1, None, "y").changed_from(Some(&cached)), "a status write");
        assert!(grant("u1", 2, None, "x").changed_from(Some(&cached)), "a spec change");
        assert!(grant("u1", 1, Some("now"), "x").changed_from(Some(&cached)), "a refresh request");
        assert!(grant("u2", 1, None, "x").changed_from(Some(&cached)), "deleted and created again");
    }

    #[test]
    fn strings_grants_share_are_stored_once_and_dropped_when_unused() {
        let a = intern("https://id.shared.example");
        let b = intern(&String::from("https://id.shared.example"));
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        // Pruned once the set has grown: a string no grant holds does not stay.
        for i in 0..1000 {
            intern(&format!("scope-{i}"));
        }
        let set = INTERNED.lock().unwrap();
        assert!(set.set.as_ref().unwrap().len() < 200, "{}", set.set.as_ref().unwrap().len());
    }
}
