//! The target Secret: what a workload mounts. Only what it needs, never the refresh token.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::schedule::TokenTimes;
use super::template::{ANNOTATION_TEMPLATE_HASH, Template, TemplateError, Values};
use crate::oauth::TokenSet;

pub use crate::api::{
    TARGET_KEY_ACCESS_TOKEN as KEY_ACCESS_TOKEN, TARGET_KEY_EXPIRES_AT as KEY_EXPIRES_AT,
    TARGET_KEY_PHONE_NUMBER as KEY_PHONE_NUMBER, TARGET_KEY_SCOPE as KEY_SCOPE,
    TARGET_KEY_TOKEN_TYPE as KEY_TOKEN_TYPE,
};
/// When the published token was issued (RFC 3339): with `expires_at` it gives the lifetime the
/// schedule needs, also after a restart.
pub const ANNOTATION_REFRESHED_AT: &str = "auth.wgtwo.com/refreshed-at";

/// The data of the target Secret for `tokens`. `previous_phone` is kept when this answer carried no
/// ID token.
pub fn data(tokens: &TokenSet, expires_at: Timestamp, previous_phone: Option<String>) -> BTreeMap<String, ByteString> {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    let mut data = BTreeMap::from([
        (KEY_ACCESS_TOKEN.to_owned(), bytes(tokens.access_token.secret())),
        (KEY_TOKEN_TYPE.to_owned(), bytes(&canonical_token_type(&tokens.token_type))),
        (KEY_EXPIRES_AT.to_owned(), bytes(&expires_at.to_string())),
        (KEY_SCOPE.to_owned(), bytes(tokens.scope.as_deref().unwrap_or(""))),
    ]);
    let phone = tokens.id_token.as_ref().and_then(|id| id.phone_number.clone()).or(previous_phone);
    if let Some(phone) = phone {
        data.insert(KEY_PHONE_NUMBER.to_owned(), bytes(&phone));
    }
    data
}

/// The target Secret as written: data, labels and annotations beyond the operator's own labels.
#[derive(Debug, Default, PartialEq)]
pub struct Shaped {
    pub data: BTreeMap<String, ByteString>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// The target Secret for the operator's own keys `data` (what [`data`] builds) issued at
/// `issued_at`, with what the grant's template adds. The template is rendered from those keys
/// alone; when it cannot be used, the Secret gets the operator's keys only (never stale rendered
/// keys holding an older token) and the problem is returned.
pub fn shape(
    data: BTreeMap<String, ByteString>,
    issued_at: Timestamp,
    template: Result<Option<&Template>, &TemplateError>,
) -> (Shaped, Option<TemplateError>) {
    let mut shaped = Shaped::default();
    let problem = match template {
        Ok(None) => None,
        Err(problem) => Some(problem.clone()),
        Ok(Some(template)) => {
            let text = |key: &str| data.get(key).and_then(|v| std::str::from_utf8(&v.0).ok()).unwrap_or("");
            let values = Values {
                access_token: text(KEY_ACCESS_TOKEN),
                token_type: text(KEY_TOKEN_TYPE),
                expires_at: text(KEY_EXPIRES_AT).parse().unwrap_or(issued_at),
                scope: text(KEY_SCOPE),
                phone_number: text(KEY_PHONE_NUMBER),
            };
            match template.render(&values) {
                Ok(rendered) => {
                    shaped.data = rendered;
                    shaped.labels = template.labels().clone();
                    shaped.annotations = template.annotations().clone();
                    shaped.annotations.insert(ANNOTATION_TEMPLATE_HASH.to_owned(), template.hash().to_owned());
                    None
                }
                Err(problem) => Some(problem),
            }
        }
    };
    // The operator's keys and annotation last: nothing rendered can replace them.
    shaped.data.extend(data);
    shaped.annotations.insert(ANNOTATION_REFRESHED_AT.to_owned(), issued_at.to_string());
    (shaped, problem)
}

/// The operator's own keys of a stored target Secret (what a re-render starts from).
pub fn own_keys(secret: &Secret) -> BTreeMap<String, ByteString> {
    let own = [KEY_ACCESS_TOKEN, KEY_TOKEN_TYPE, KEY_EXPIRES_AT, KEY_SCOPE, KEY_PHONE_NUMBER];
    secret
        .data
        .iter()
        .flatten()
        .filter(|(k, _)| own.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The template hash a stored target Secret was rendered with (none: rendered without a template).
pub fn template_hash(secret: &Secret) -> Option<&str> {
    secret.metadata.annotations.as_ref()?.get(ANNOTATION_TEMPLATE_HASH).map(String::as_str)
}

/// Whether the identity service said which scope it granted, and `phone` is not in it (then the
/// token carries no phone number). An answer without `scope` granted what was asked (RFC 6749 5.1).
pub fn phone_not_granted(scope: Option<&str>) -> bool {
    scope.is_some_and(|s| !s.split_ascii_whitespace().any(|granted| granted == "phone"))
}

/// `Bearer`, as RFC 6750 writes it in the Authorization header, whatever case the server used.
fn canonical_token_type(t: &str) -> String {
    if t.eq_ignore_ascii_case("bearer") { "Bearer".to_owned() } else { t.to_owned() }
}

/// The times of the published token, if the Secret holds a complete, parseable one.
pub fn published_token(secret: &Secret) -> Option<TokenTimes> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| data.get(key).and_then(|v| std::str::from_utf8(&v.0).ok());
    text(KEY_ACCESS_TOKEN).filter(|t| !t.is_empty())?;
    let expires_at = text(KEY_EXPIRES_AT)?.parse().ok()?;
    let issued_at = secret.metadata.annotations.as_ref()?.get(ANNOTATION_REFRESHED_AT)?.parse().ok()?;
    Some(TokenTimes { issued_at, expires_at })
}

pub fn phone_number(secret: &Secret) -> Option<String> {
    let value = secret.data.as_ref()?.get(KEY_PHONE_NUMBER)?;
    String::from_utf8(value.0.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::IdTokenInfo;
    use crate::oauth::secrets::{AccessToken, RefreshToken};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn tokens(phone: Option<&str>) -> TokenSet {
        TokenSet {
            access_token: AccessToken::new("at".into()),
            refresh_token: Some(RefreshToken::new("rt".into())),
            token_type: "bearer".into(),
            expires_at: None,
            scope: Some("phone offline_access".into()),
            id_token: phone.map(|p| IdTokenInfo {
                subject: "alice".into(),
                phone_number: Some(p.into()),
                phone_number_verified: Some(true),
                nonce: None,
                expires_at: None,
            }),
            id_token_error: None,
        }
    }

    #[test]
    fn target_holds_what_a_workload_needs_and_never_the_refresh_token() {
        let at = Timestamp::from_second(1_700_003_600).unwrap();
        let d = data(&tokens(Some("+4799999999")), at, None);
        let keys: Vec<&str> = d.keys().map(String::as_str).collect();
        assert_eq!(keys, ["access_token", "expires_at", "phone_number", "scope", "token_type"]);
        assert_eq!(d["token_type"].0, b"Bearer");
        assert_eq!(d["expires_at"].0, b"2023-11-14T23:13:20Z");
        assert!(d.values().all(|v| v.0 != b"rt"));
    }

    fn template_spec(data: &[(&str, &str)]) -> crate::api::TargetTemplate {
        crate::api::TargetTemplate {
            labels: BTreeMap::from([("team".to_owned(), "a".to_owned())]),
            annotations: BTreeMap::from([("reloader.stakater.com/match".to_owned(), "true".to_owned())]),
            data: data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn a_template_adds_keys_labels_and_annotations_rendered_from_the_operators_keys() {
        let at = Timestamp::from_second(1_700_003_600).unwrap();
        let issued = Timestamp::from_second(1_700_000_000).unwrap();
        let spec = template_spec(&[("authorization", "Bearer {{ access_token }}"), ("who", "{{ phone_number }}")]);
        let template =
            super::super::template::compile(Some(&spec), &["reloader.stakater.com".into()]).unwrap().unwrap();
        let (shaped, problem) = shape(data(&tokens(Some("+4799999999")), at, None), issued, Ok(Some(&template)));
        assert_eq!(problem, None);
        assert_eq!(shaped.data["authorization"].0, b"Bearer at");
        assert_eq!(shaped.data["who"].0, b"+4799999999");
        assert_eq!(shaped.data["access_token"].0, b"at");
        assert!(shaped.data.values().all(|v| v.0 != b"rt"), "never the refresh token");
        assert_eq!(shaped.labels["team"], "a");
        assert_eq!(shaped.annotations["reloader.stakater.com/match"], "true");
        assert_eq!(shaped.annotations[ANNOTATION_TEMPLATE_HASH], template.hash());
        assert_eq!(shaped.annotations[ANNOTATION_REFRESHED_AT], "2023-11-14T22:13:20Z");
        // Bookkeeping reads the operator's keys only: a re-render starts from them alone.
        let secret = Secret {
            metadata: ObjectMeta { annotations: Some(shaped.annotations.clone()), ..Default::default() },
            data: Some(shaped.data.clone()),
            ..Default::default()
        };
        let own: Vec<String> = own_keys(&secret).into_keys().collect();
        assert_eq!(own, ["access_token", "expires_at", "phone_number", "scope", "token_type"]);
        assert_eq!(published_token(&secret).unwrap().expires_at, at);
        assert_eq!(template_hash(&secret), Some(template.hash()));
    }

    #[test]
    fn a_template_that_fails_leaves_the_operators_keys_only_and_says_why() {
        let at = Timestamp::from_second(1_700_003_600).unwrap();
        let issued = Timestamp::from_second(1_700_000_000).unwrap();
        let problem = TemplateError("spec.target.template.data[x]: syntax error".into());
        let (shaped, got) = shape(data(&tokens(None), at, None), issued, Err(&problem));
        assert_eq!(got, Some(problem));
        let keys: Vec<&str> = shaped.data.keys().map(String::as_str).collect();
        assert_eq!(keys, ["access_token", "expires_at", "scope", "token_type"]);
        assert!(shaped.labels.is_empty());
        assert_eq!(shaped.annotations.keys().collect::<Vec<_>>(), [ANNOTATION_REFRESHED_AT]);
    }

    #[test]
    fn only_a_granted_scope_without_phone_rules_the_phone_number_out() {
        assert!(phone_not_granted(Some("offline_access openid")));
        assert!(!phone_not_granted(Some("phone offline_access")));
        assert!(!phone_not_granted(Some("telephone phone")));
        assert!(!phone_not_granted(None), "no scope in the answer: as asked, maybe with phone");
    }

    #[test]
    fn phone_number_is_kept_when_a_refresh_brings_no_id_token() {
        let at = Timestamp::from_second(1_700_003_600).unwrap();
        let d = data(&tokens(None), at, Some("+4711111111".into()));
        assert_eq!(d["phone_number"].0, b"+4711111111");
        assert!(!data(&tokens(None), at, None).contains_key("phone_number"));
    }

    #[test]
    fn published_token_needs_token_expiry_and_issue_time() {
        let at = Timestamp::from_second(1_700_003_600).unwrap();
        let mut secret = Secret {
            metadata: ObjectMeta {
                annotations: Some(BTreeMap::from([(
                    ANNOTATION_REFRESHED_AT.to_owned(),
                    "2023-11-14T22:13:20Z".to_owned(),
                )])),
                ..Default::default()
            },
            data: Some(data(&tokens(None), at, None)),
            ..Default::default()
        };
        let times = published_token(&secret).unwrap();
        assert_eq!(times.expires_at, at);
        assert_eq!(times.issued_at, Timestamp::from_second(1_700_000_000).unwrap());
        secret.data.as_mut().unwrap().insert(KEY_EXPIRES_AT.into(), ByteString(b"tomorrow".to_vec()));
        assert_eq!(published_token(&secret), None, "an edited Secret is treated as holding no token");
    }
}
