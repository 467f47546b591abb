//! The `WgtwoGrant` custom resource: the single source of truth for the CRD in `crds/`.
//!
//! Everything that can be checked without talking to a server is checked by the apiserver through
//! the schema (patterns, lengths, CEL rules), so a bad object is refused at `kubectl apply` time with
//! a message naming the field, instead of turning into a runtime condition later.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The identity service the official wgtwo SDK talks to by default.
pub const DEFAULT_ISSUER_URL: &str = "https://id.wgtwo.com";
/// Set this annotation on a grant (any new value, e.g. the time) to refresh its token now.
pub const ANNOTATION_REFRESH_REQUESTED: &str = "auth.wgtwo.com/refresh-requested-at";
/// Annotations of a grant the operator reads start with this; others are not even cached.
pub const ANNOTATION_PREFIX: &str = "auth.wgtwo.com/";
/// The key of the refresh token in `refreshTokenSecretRef` when none is given.
pub const DEFAULT_REFRESH_TOKEN_KEY: &str = "refresh_token";
/// The keys of the OAuth client in the Secret `clientSecretRef` names.
pub const CLIENT_ID_KEY: &str = "client_id";
pub const CLIENT_SECRET_KEY: &str = "client_secret";

/// A DNS-1123 subdomain: what Kubernetes accepts as a Secret name.
const DNS_SUBDOMAIN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// What Kubernetes accepts as a key of a Secret's data.
const SECRET_KEY: &str = r"^[-._a-zA-Z0-9]+$";
/// RFC 6749 section 3.3: scope tokens of visible ASCII except `"` and `\`, separated by one space.
const SCOPE: &str = r"^[\x21\x23-\x5B\x5D-\x7E]+( [\x21\x23-\x5B\x5D-\x7E]+)*$";
/// A Go-style duration in whole hours, minutes and seconds (`20m`, `1h30m`, `90s`).
const DURATION: &str = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$";

/// Keeps a wgtwo OAuth 2.0 access token alive in a Secret: a subscriber's (refreshed from their
/// authorization) or the product's own (client credentials).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "auth.wgtwo.com",
    version = "v1alpha1",
    kind = "WgtwoGrant",
    plural = "wgtwogrants",
    singular = "wgtwogrant",
    shortname = "wggrant",
    category = "wgtwo",
    namespaced,
    status = "WgtwoGrantStatus",
    doc = "A WgtwoGrant keeps a live wgtwo OAuth 2.0 access token in a Secret of its namespace, renewed ahead of expiry: a subscriber's token, refreshed from their authorization (refreshTokenSecretRef), or the product's own token (clientCredentials).",
    printcolumn = r#"{"name":"Grant Type","type":"string","jsonPath":".status.grantType","description":"refresh_token (a subscriber's token) or client_credentials (the product's own token)"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".status.expiresAt","description":"When the access token in the target Secret expires"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!(has(self.refreshTokenSecretRef) && has(self.clientCredentials))")
    .message("set either refreshTokenSecretRef (a subscriber's token) or clientCredentials (the product's own token), not both"))]
#[x_kube(validation = Rule::new("has(self.refreshTokenSecretRef) || has(self.clientCredentials)")
    .message("set refreshTokenSecretRef (a subscriber's token, from their authorization) or clientCredentials (the product's own token)"))]
#[x_kube(validation = Rule::new("has(self.clientCredentials) == has(oldSelf.clientCredentials)")
    .message("a grant cannot switch between refreshTokenSecretRef and clientCredentials: create a new grant"))]
#[x_kube(validation = Rule::new(
    "self.target.secretName != self.clientSecretRef.name && (!has(self.refreshTokenSecretRef) || self.target.secretName != self.refreshTokenSecretRef.name)"
).message("target.secretName must differ from clientSecretRef.name and refreshTokenSecretRef.name: the operator writes the target and must never overwrite its inputs"))]
#[serde(rename_all = "camelCase")]
pub struct WgtwoGrantSpec {
    /// Base URL of the wgtwo identity service (an OpenID Connect issuer). Must be https, except for
    /// localhost when testing against a local server.
    #[serde(default = "default_issuer_url")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new(
        "isURL(self) && !self.contains('?') && !self.contains('#') && (url(self).getScheme() == 'https' || (url(self).getScheme() == 'http' && url(self).getHostname() in ['localhost', '127.0.0.1', '::1']))"
    ).message("issuerUrl must be an absolute https:// URL without query or fragment (http:// is allowed only for localhost)"))]
    pub issuer_url: String,

    /// The Secret in this namespace holding the OAuth client, under the keys `client_id` and
    /// `client_secret`.
    pub client_secret_ref: ClientSecretRef,

    /// For a subscriber's token: the Secret key in this namespace holding the refresh token of a
    /// completed authorization. The operator reads it and never writes it; put a new refresh token
    /// here to re-authorize. Exactly one of refreshTokenSecretRef and clientCredentials is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token_secret_ref: Option<RefreshTokenSecretRef>,

    /// For the product's own token: the OAuth 2.0 client credentials grant, which authenticates the
    /// product and no subscriber. Grants with the same issuer, client and scope share one token (one
    /// token request per lifetime for all of them). Set it to `{}`. Exactly one of
    /// refreshTokenSecretRef and clientCredentials is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_credentials: Option<ClientCredentials>,

    /// The Secret the operator creates, owns and keeps updated with the live access token.
    pub target: TargetSecret,

    /// Space-separated scopes to request. With refreshTokenSecretRef it narrows the authorized
    /// scope (for example `phone offline_access`; unset: the authorized scope is kept). With
    /// clientCredentials it is the scope of the product's token (unset: the client's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096), regex(pattern = SCOPE))]
    pub scope: Option<String>,

    /// How much validity must remain on the access token when the operator refreshes it, as a
    /// duration in hours, minutes and seconds (for example `20m` or `1h30m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 32), regex(pattern = DURATION))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("refreshBefore must be a positive duration such as 20m"))]
    pub refresh_before: Option<String>,
}

/// A Secret in the grant's namespace holding an OAuth client.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientSecretRef {
    /// Name of the Secret; it must have the keys `client_id` and `client_secret`.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub name: String,
}

/// Options of the client credentials grant (none yet: the object says which grant is used).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ClientCredentials {}

/// Which OAuth 2.0 grant a WgtwoGrant gets its token with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GrantType<'a> {
    /// A subscriber's token, refreshed with the refresh token of their authorization.
    RefreshToken(&'a RefreshTokenSecretRef),
    /// The product's own token.
    ClientCredentials,
}

impl GrantType<'_> {
    /// The OAuth 2.0 `grant_type` (RFC 6749), as `status.grantType` and the metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            GrantType::RefreshToken(_) => GRANT_TYPE_REFRESH_TOKEN,
            GrantType::ClientCredentials => GRANT_TYPE_CLIENT_CREDENTIALS,
        }
    }
}

pub const GRANT_TYPE_REFRESH_TOKEN: &str = "refresh_token";
pub const GRANT_TYPE_CLIENT_CREDENTIALS: &str = "client_credentials";

impl WgtwoGrantSpec {
    /// The grant's type. The apiserver admits exactly one of the two fields; a spec with both (only
    /// possible without the CRD's validation) is treated as a subscriber's.
    pub fn grant_type(&self) -> GrantType<'_> {
        match &self.refresh_token_secret_ref {
            Some(r) => GrantType::RefreshToken(r),
            None => GrantType::ClientCredentials,
        }
    }
}

/// A key of a Secret in the grant's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefreshTokenSecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub name: String,
    /// Key within the Secret that holds the refresh token.
    #[serde(default = "default_refresh_token_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = SECRET_KEY))]
    pub key: String,
}

/// Where the live access token is published.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetSecret {
    /// Name of the Secret in this namespace that the operator creates and owns. It holds
    /// `access_token`, `token_type`, `expires_at`, `scope` and, for a subscriber's token when known,
    /// `phone_number`; never the refresh token. An existing Secret not owned by this grant is never
    /// overwritten.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub secret_name: String,

    /// Shapes the target Secret for its consumers: labels and annotations to put on it, and extra
    /// keys rendered from the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TargetTemplate>,
}

/// Labels, annotations and extra keys of the target Secret. The operator's own keys and metadata
/// cannot be replaced, and a template sees only the token's public parts: never the refresh token
/// or the client secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetTemplate {
    /// Labels for the target Secret (for example for a tool that selects Secrets by label). The
    /// operator's own labels (`app.kubernetes.io/managed-by`, `auth.wgtwo.com/*`) cannot be set.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "template_labels_schema")]
    pub labels: BTreeMap<String, String>,
    /// Annotations for the target Secret (for example `reloader.stakater.com/match: "true"`).
    /// `auth.wgtwo.com/*` annotations are the operator's own and cannot be set.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "template_annotations_schema")]
    pub annotations: BTreeMap<String, String>,
    /// Extra keys of the target Secret, each a MiniJinja (Jinja2) template rendered at every
    /// renewal, for example `authorization: "Bearer {{ access_token }}"`. Variables:
    /// `access_token`, `token_type`, `expires_at` (RFC 3339), `expires_at_unix`, `scope` and
    /// `phone_number` (empty when unknown or for a product token); filters such as `tojson` build
    /// JSON files. The keys the operator writes itself (and `token.json`, the agent's file) cannot
    /// be used.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "template_data_schema")]
    pub data: BTreeMap<String, String>,
}

/// Keys of the target Secret that the operator writes itself, and `token.json`, the file the agent
/// adds beside them: no template may use them.
pub const RESERVED_TARGET_KEYS: &[&str] = &[
    TARGET_KEY_ACCESS_TOKEN,
    TARGET_KEY_TOKEN_TYPE,
    TARGET_KEY_EXPIRES_AT,
    TARGET_KEY_SCOPE,
    TARGET_KEY_PHONE_NUMBER,
    TARGET_FILE_TOKEN_JSON,
];
/// The keys of the target Secret the operator writes (part of the API: workloads read them).
pub const TARGET_KEY_ACCESS_TOKEN: &str = "access_token";
pub const TARGET_KEY_TOKEN_TYPE: &str = "token_type";
pub const TARGET_KEY_EXPIRES_AT: &str = "expires_at";
pub const TARGET_KEY_SCOPE: &str = "scope";
pub const TARGET_KEY_PHONE_NUMBER: &str = "phone_number";
/// The file the agent writes beside the target Secret's keys.
pub const TARGET_FILE_TOKEN_JSON: &str = "token.json";
/// Limits of a template, so a grant cannot make the target Secret (or the operator's memory) large.
pub const TEMPLATE_MAX_ENTRIES: u64 = 32;
pub const TEMPLATE_MAX_DATA_VALUE: u64 = 16384;
pub const TEMPLATE_MAX_ANNOTATION_VALUE: u64 = 4096;
/// A label or annotation key: an optional DNS subdomain prefix and a name of at most 63 characters.
pub const QUALIFIED_NAME: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// A label value: at most 63 characters, alphanumeric at both ends.
pub const LABEL_VALUE: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$";

/// A map's schema with CEL rules on its keys and values (schemars cannot put those on a map).
fn template_map_schema(max_value: u64, rules: &[(&str, &str)]) -> schemars::Schema {
    let rules: Vec<serde_json::Value> =
        rules.iter().map(|(rule, message)| serde_json::json!({"rule": rule, "message": message})).collect();
    schemars::json_schema!({
        "type": "object",
        "maxProperties": TEMPLATE_MAX_ENTRIES,
        "additionalProperties": {"type": "string", "maxLength": max_value},
        "x-kubernetes-validations": rules,
    })
}

fn qualified_keys_rule() -> String {
    format!("self.all(k, k.size() <= 317 && k.matches('{}'))", QUALIFIED_NAME.replace('\\', "\\\\"))
}

fn template_labels_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let values = format!("self.all(k, self[k].matches('{}'))", LABEL_VALUE);
    template_map_schema(
        63,
        &[
            (
                &qualified_keys_rule(),
                "label keys must be qualified names such as example.com/team (name part at most 63 characters)",
            ),
            (
                &values,
                "label values must be at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
            ),
            (
                "self.all(k, !k.startsWith('auth.wgtwo.com/') && k != 'app.kubernetes.io/managed-by')",
                "labels app.kubernetes.io/managed-by and auth.wgtwo.com/* are the operator's own",
            ),
        ],
    )
}

fn template_annotations_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    template_map_schema(
        TEMPLATE_MAX_ANNOTATION_VALUE,
        &[
            (
                &qualified_keys_rule(),
                "annotation keys must be qualified names such as example.com/owner (name part at most 63 characters)",
            ),
            ("self.all(k, !k.startsWith('auth.wgtwo.com/'))", "annotations auth.wgtwo.com/* are the operator's own"),
        ],
    )
}

fn template_data_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let reserved: Vec<String> = RESERVED_TARGET_KEYS.iter().map(|k| format!("'{k}'")).collect();
    let reserved_rule = format!("self.all(k, !(k in [{}]))", reserved.join(", "));
    let reserved_message = format!(
        "data keys {} are written by the operator (or the agent) and cannot be templated",
        RESERVED_TARGET_KEYS.join(", ")
    );
    template_map_schema(
        TEMPLATE_MAX_DATA_VALUE,
        &[
            (
                "self.all(k, k.size() <= 253 && k.matches('^[-._a-zA-Z0-9]+$'))",
                "data keys must be Secret keys: letters, digits, '-', '_' and '.', at most 253 characters",
            ),
            (&reserved_rule, &reserved_message),
        ],
    )
}

/// The observed state of a WgtwoGrant.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WgtwoGrantStatus {
    /// The grant's conditions. `Ready` is `True` while the target Secret holds a valid access token;
    /// its reason says why not otherwise, and its message what to do.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// How the token is obtained: `refresh_token` (a subscriber's token) or `client_credentials`
    /// (the product's own token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_type: Option<String>,
    /// When the access token in the target Secret expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When the access token was last refreshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<Time>,
    /// When the operator plans the next refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<Time>,
    /// The scope granted to the current access token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The subject (user id) the authorization belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Token requests that failed in a row since the last success (reset by a success). With
    /// `lastFailureTime` it keeps the backoff across operator restarts and leader changes; while
    /// retrying, `nextRefreshTime` is the next attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_attempts: Option<u32>,
    /// When the last token request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// The value of the `auth.wgtwo.com/refresh-requested-at` annotation that was last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_request_handled: Option<String>,
    /// The metadata.generation of the spec that this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

fn default_issuer_url() -> String {
    DEFAULT_ISSUER_URL.to_owned()
}

fn default_refresh_token_key() -> String {
    DEFAULT_REFRESH_TOKEN_KEY.to_owned()
}

/// The CRD as YAML, exactly as checked in under `crds/`.
pub fn crd_yaml() -> String {
    let yaml = serde_yaml_ng::to_string(&WgtwoGrant::crd()).expect("the CRD always serializes");
    format!("# Generated by `wgtwo-operator crd` from src/api.rs; do not edit.\n---\n{yaml}")
}

/// Where the generated CRD is checked in, relative to the repository root.
pub const CRD_PATH: &str = "crds/wgtwogrants.auth.wgtwo.com.yaml";

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_json() -> serde_json::Value {
        serde_json::json!({
            "clientSecretRef": {"name": "wgtwo-client"},
            "refreshTokenSecretRef": {"name": "alice-authorization"},
            "target": {"secretName": "alice-token"},
        })
    }

    #[test]
    fn omitted_optional_fields_take_the_documented_defaults() {
        let spec: WgtwoGrantSpec = serde_json::from_value(spec_json()).unwrap();
        assert_eq!(spec.issuer_url, "https://id.wgtwo.com");
        assert_eq!(spec.refresh_token_secret_ref.as_ref().unwrap().key, "refresh_token");
        assert_eq!(spec.client_credentials, None);
        assert_eq!(spec.scope, None);
        assert_eq!(spec.refresh_before, None);
    }

    #[test]
    fn the_grant_type_follows_the_field_that_is_set() {
        let subscriber: WgtwoGrantSpec = serde_json::from_value(spec_json()).unwrap();
        assert!(matches!(subscriber.grant_type(), GrantType::RefreshToken(r) if r.name == "alice-authorization"));
        assert_eq!(subscriber.grant_type().as_str(), "refresh_token");
        let mut json = spec_json();
        json.as_object_mut().unwrap().remove("refreshTokenSecretRef");
        json["clientCredentials"] = serde_json::json!({});
        let product: WgtwoGrantSpec = serde_json::from_value(json).unwrap();
        assert_eq!(product.grant_type(), GrantType::ClientCredentials);
        assert_eq!(product.grant_type().as_str(), "client_credentials");
        // `{}` round-trips as `{}`: the field that says which grant is used is never dropped.
        assert_eq!(serde_json::to_value(&product).unwrap()["clientCredentials"], serde_json::json!({}));
    }

    #[test]
    fn every_schema_property_has_a_description() {
        let crd = serde_json::to_value(WgtwoGrant::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut missing = Vec::new();
        walk_properties(&schema["properties"]["spec"], "spec", &mut missing);
        walk_properties(&schema["properties"]["status"], "status", &mut missing);
        assert!(missing.is_empty(), "fields without a description: {missing:?}");
    }

    fn walk_properties(node: &serde_json::Value, path: &str, missing: &mut Vec<String>) {
        if node.get("description").and_then(|d| d.as_str()).is_none_or(str::is_empty) {
            missing.push(path.to_owned());
        }
        if let Some(props) = node.get("properties").and_then(|p| p.as_object()) {
            for (name, child) in props {
                walk_properties(child, &format!("{path}.{name}"), missing);
            }
        }
        if let Some(items) = node.get("items") {
            // Items of a list share the list's description; walk their fields only.
            if let Some(props) = items.get("properties").and_then(|p| p.as_object()) {
                for (name, child) in props {
                    walk_properties(child, &format!("{path}[].{name}"), missing);
                }
            }
        }
    }

    #[test]
    fn the_yaml_starts_with_the_generated_banner_and_names_the_group() {
        let yaml = crd_yaml();
        assert!(yaml.starts_with("# Generated by `wgtwo-operator crd`"));
        assert!(yaml.contains("name: wgtwogrants.auth.wgtwo.com"));
    }
}
