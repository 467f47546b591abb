//! Which grants read which Secret (client and refresh-token Secrets), so a Secret event finds its
//! grants by a lookup instead of a scan of every grant (which made each Secret event cost
//! O(grants)). The operator's own Secrets name their grant in a label and need no index.
//!
//! It also tells which grant a refresh-token Secret belongs to when several name it: one refresh
//! token can start one lineage only (each refresh rotates it, and a second presentation is a
//! reuse that revokes the family), so the oldest grant uses it and the others are refused.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use kube::ResourceExt;

use super::grant::Grant;
use super::secret_cache::{Key, key};

#[derive(Default)]
pub struct SecretIndex {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Secret -> grant names (in the Secret's namespace), shared with `secrets`' keys.
    users: HashMap<Key, Vec<Arc<str>>>,
    /// Grant name (`namespace/name`) -> the Secrets it was indexed under.
    secrets: HashMap<Arc<str>, Box<[Key]>>,
    /// Refresh-token Secret -> the grants naming it, by (creation time, name): the first uses it.
    token_users: HashMap<Key, Vec<(i64, Arc<str>)>>,
}

/// The Secrets a grant reads, all in its namespace: the client's, and a subscriber's refresh token.
pub fn secrets_of(grant: &Grant) -> Box<[Key]> {
    let ns = grant.namespace().unwrap_or_default();
    let spec = &grant.spec;
    let client = key(&ns, &spec.client_secret);
    match &spec.refresh_token {
        Some(token) => Box::new([client, key(&ns, &token.name)]),
        None => Box::new([client]),
    }
}

impl SecretIndex {
    /// Indexes a grant as it is now (its spec may have changed).
    pub fn upsert(&self, grant: &Grant) {
        let ns = grant.namespace().unwrap_or_default();
        let grant_key = key(&ns, &grant.name_any());
        let now = secrets_of(grant);
        let mut inner = self.inner.write().unwrap();
        if inner.secrets.get(grant_key.as_str()) == Some(&now) {
            return;
        }
        inner.remove(&grant_key);
        let grant_key: Arc<str> = grant_key.into();
        for secret in &now {
            let users = inner.users.entry(secret.clone()).or_default();
            if !users.contains(&grant_key) {
                // Most Secrets have one user: room for one, not the four a first push makes.
                if users.is_empty() {
                    users.reserve_exact(1);
                }
                users.push(grant_key.clone());
            }
        }
        if let Some(token) = &grant.spec.refresh_token {
            let created = grant.metadata.creation_timestamp.as_ref().map_or(i64::MAX, |t| t.0.as_second());
            let users = inner.token_users.entry(key(&ns, &token.name)).or_default();
            if users.is_empty() {
                users.reserve_exact(1);
            }
            let entry = (created, grant_key.clone());
            let at = users.partition_point(|u| *u < entry);
            users.insert(at, entry);
        }
        inner.secrets.insert(grant_key, now);
    }

    /// The grants (in `namespace`) naming the refresh-token Secret, with their creation times
    /// (whole seconds).
    pub fn token_users(&self, namespace: &str, secret: &str) -> Vec<(i64, String)> {
        let inner = self.inner.read().unwrap();
        let users = inner.token_users.get(&key(namespace, secret)).into_iter().flatten();
        users.map(|(created, g)| (*created, g[namespace.len() + 1..].to_owned())).collect()
    }

    pub fn remove(&self, grant: &Grant) {
        let grant_key = key(&grant.namespace().unwrap_or_default(), &grant.name_any());
        self.inner.write().unwrap().remove(&grant_key);
    }

    /// Rebuilds the index from every grant (after a relist, which may hide deletions).
    pub fn rebuild<'a>(&self, grants: impl IntoIterator<Item = &'a Grant>) {
        *self.inner.write().unwrap() = Inner::default();
        for grant in grants {
            self.upsert(grant);
        }
    }

    /// Names of the grants (in `namespace`) that use the Secret.
    pub fn grants_using(&self, namespace: &str, secret: &str) -> Vec<String> {
        let inner = self.inner.read().unwrap();
        let users = inner.users.get(&key(namespace, secret)).into_iter().flatten();
        // The grant key is `namespace/name`; the namespace is the Secret's.
        users.map(|g| g[namespace.len() + 1..].to_owned()).collect()
    }
}

/// Of the grants naming one refresh-token Secret (`users`, from [`SecretIndex::token_users`]),
/// the one that uses it: the one whose lineage began from the token the Secret holds now
/// (`holds`), whatever the ages; else the oldest (creation times are whole seconds), then by name.
pub fn token_user(users: &[(i64, String)], holds: impl Fn(&str) -> bool) -> Option<&str> {
    users.iter().min_by_key(|(created, name)| (!holds(name), *created, name.as_str())).map(|(_, name)| name.as_str())
}

impl Inner {
    fn remove(&mut self, grant_key: &str) {
        let Some(old) = self.secrets.remove(grant_key) else { return };
        for secret in old.iter() {
            if let Some(users) = self.users.get_mut(secret) {
                users.retain(|u| &**u != grant_key);
                if users.is_empty() {
                    self.users.remove(secret);
                }
            }
            if let Some(users) = self.token_users.get_mut(secret) {
                users.retain(|(_, u)| &**u != grant_key);
                if users.is_empty() {
                    self.token_users.remove(secret);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClientSecretRef, RefreshTokenSecretRef, TargetSecret, WgtwoGrant, WgtwoGrantSpec};

    fn grant(name: &str, client: &str) -> Grant {
        let mut g = WgtwoGrant::new(
            name,
            WgtwoGrantSpec {
                issuer_url: "https://id.wgtwo.com".into(),
                client_secret_ref: ClientSecretRef { name: client.into() },
                refresh_token_secret_ref: Some(RefreshTokenSecretRef {
                    name: format!("{name}-authorization"),
                    key: "refresh_token".into(),
                }),
                client_credentials: None,
                target: TargetSecret { secret_name: format!("{name}-token"), template: None },
                scope: None,
                refresh_before: None,
            },
        );
        g.metadata.namespace = Some("ns".into());
        g.into()
    }

    #[test]
    fn a_secret_maps_to_exactly_the_grants_that_use_it_as_specs_change_and_grants_go() {
        let index = SecretIndex::default();
        index.upsert(&grant("a", "client"));
        index.upsert(&grant("b", "client"));
        let mut sorted = index.grants_using("ns", "client");
        sorted.sort();
        assert_eq!(sorted, ["a", "b"]);
        assert_eq!(index.grants_using("ns", "a-authorization"), ["a"]);
        assert!(index.grants_using("ns", "a-token").is_empty(), "own Secrets name their grant in a label");
        assert!(index.grants_using("other", "client").is_empty(), "namespaces are separate");
        // A spec change moves the grant.
        index.upsert(&grant("a", "client-2"));
        assert_eq!(index.grants_using("ns", "client"), ["b"]);
        assert_eq!(index.grants_using("ns", "client-2"), ["a"]);
        index.remove(&grant("b", "client"));
        assert!(index.grants_using("ns", "client").is_empty());
        index.rebuild([&grant("c", "client")]);
        assert!(index.grants_using("ns", "a-authorization").is_empty(), "a relist forgets grants not listed");
        assert_eq!(index.grants_using("ns", "client"), ["c"]);
        // A product grant reads only its client Secret.
        let mut product = grant("p", "client");
        product.spec.refresh_token = None;
        index.upsert(&product);
        assert_eq!(index.grants_using("ns", "client"), ["c", "p"]);
        assert!(index.grants_using("ns", "p-authorization").is_empty());
    }

    #[test]
    fn of_grants_naming_one_refresh_token_secret_the_oldest_uses_it_until_it_goes() {
        let at = |grant: &mut Grant, second: i64| {
            grant.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::from_second(second).unwrap(),
            ));
        };
        let shared = |name: &str, second: i64| {
            let mut g = grant(name, "client");
            g.spec.refresh_token.as_mut().unwrap().name = "alice-authorization".into();
            at(&mut g, second);
            g
        };
        let index = SecretIndex::default();
        let user = |secret: &str| {
            let users = index.token_users("ns", secret);
            token_user(&users, |_| false).map(str::to_owned)
        };
        index.upsert(&shared("copy", 20));
        assert_eq!(user("alice-authorization").as_deref(), Some("copy"));
        let (alice, zed) = (shared("alice", 10), shared("zed", 10));
        index.upsert(&zed);
        index.upsert(&alice);
        assert_eq!(user("alice-authorization").as_deref(), Some("alice"), "oldest, then by name");
        index.remove(&alice);
        assert_eq!(user("alice-authorization").as_deref(), Some("zed"));
        // Pointing elsewhere frees it.
        let mut moved = zed.clone();
        moved.spec.refresh_token.as_mut().unwrap().name = "zed-authorization".into();
        index.upsert(&moved);
        assert_eq!(user("alice-authorization").as_deref(), Some("copy"));
        assert_eq!(user("zed-authorization").as_deref(), Some("zed"));
        assert_eq!(user("client"), None, "a client Secret is shared freely");
        index.rebuild([&shared("copy", 20)]);
        assert_eq!(user("zed-authorization"), None);
    }

    #[test]
    fn the_grant_whose_lineage_began_from_the_token_keeps_it_whatever_the_ages() {
        let users = [(10, "copy".to_owned()), (10, "victim".to_owned())];
        assert_eq!(token_user(&users, |g| g == "victim"), Some("victim"), "a copy made in the same second");
        assert_eq!(token_user(&users, |_| false), Some("copy"), "neither began: by name");
        // An older grant edited to name the Secret (its creation time stays) does not take it over.
        let older = [(9, "mallory".to_owned()), (10, "victim".to_owned())];
        assert_eq!(token_user(&older, |g| g == "victim"), Some("victim"));
        assert_eq!(token_user(&older, |_| false), Some("mallory"), "a new authorization: the oldest");
    }
}
