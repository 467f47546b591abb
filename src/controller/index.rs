//! Which grants read which Secret (client and refresh-token Secrets), so a Secret event finds its
//! grants by a lookup instead of a scan of every grant (which made each Secret event cost
//! O(grants)). The operator's own Secrets name their grant in a label and need no index.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use kube::ResourceExt;

use super::secret_cache::{Key, key};
use crate::api::WgtwoGrant;

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
}

/// The Secrets a grant reads, all in its namespace: the client's, and a subscriber's refresh token.
pub fn secrets_of(grant: &WgtwoGrant) -> Box<[Key]> {
    let ns = grant.namespace().unwrap_or_default();
    let spec = &grant.spec;
    let client = key(&ns, &spec.client_secret_ref.name);
    match &spec.refresh_token_secret_ref {
        Some(token) => Box::new([client, key(&ns, &token.name)]),
        None => Box::new([client]),
    }
}

impl SecretIndex {
    /// Indexes a grant as it is now (its spec may have changed).
    pub fn upsert(&self, grant: &WgtwoGrant) {
        let grant_key = key(&grant.namespace().unwrap_or_default(), &grant.name_any());
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
                users.push(grant_key.clone());
            }
        }
        inner.secrets.insert(grant_key, now);
    }

    pub fn remove(&self, grant: &WgtwoGrant) {
        let grant_key = key(&grant.namespace().unwrap_or_default(), &grant.name_any());
        self.inner.write().unwrap().remove(&grant_key);
    }

    /// Rebuilds the index from every grant (after a relist, which may hide deletions).
    pub fn rebuild<'a>(&self, grants: impl IntoIterator<Item = &'a WgtwoGrant>) {
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClientSecretRef, RefreshTokenSecretRef, TargetSecret, WgtwoGrantSpec};

    fn grant(name: &str, client: &str) -> WgtwoGrant {
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
        g
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
        product.spec.refresh_token_secret_ref = None;
        product.spec.client_credentials = Some(Default::default());
        index.upsert(&product);
        assert_eq!(index.grants_using("ns", "client"), ["c", "p"]);
        assert!(index.grants_using("ns", "p-authorization").is_empty());
    }
}
