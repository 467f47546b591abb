//! The target Secret's template (`spec.target.template`): labels, annotations and extra keys
//! rendered from the token with MiniJinja, a well-kept Jinja2 engine (no home-made template
//! language). Pure: [`compile`] checks a template before any token is requested, [`Template::render`]
//! fills it at every renewal.
//!
//! What a template can see is only what the target Secret holds anyway (the access token and its
//! public details): the refresh token and the client secret are never in its context, there is no
//! loader, no environment access, and rendering runs on bounded fuel and output.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};

use crate::api::{
    LABEL_VALUE, RESERVED_TARGET_KEYS, TEMPLATE_MAX_ANNOTATION_VALUE, TEMPLATE_MAX_DATA_VALUE, TEMPLATE_MAX_ENTRIES,
    TargetTemplate,
};

/// On the target Secret: the hash of the template its labels, annotations and keys were rendered
/// from, so a changed template is applied without a token request.
pub const ANNOTATION_TEMPLATE_HASH: &str = "auth.wgtwo.com/template-hash";
/// The variables a template may use.
pub const VARIABLES: &[&str] =
    &["access_token", "token_type", "expires_at", "expires_at_unix", "scope", "phone_number"];
/// Instructions one key may run: far more than any credentials file needs, and a loop over
/// `range(1000000)` stops at once instead of holding a reconcile.
const FUEL: u64 = 50_000;
/// Largest rendered value, and all rendered values together (a Secret holds at most 1 MiB).
const MAX_RENDERED: usize = 64 * 1024;
const MAX_RENDERED_TOTAL: usize = 512 * 1024;

/// Why a template cannot be used; the message names the field and never holds a token.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(pub String);

/// A template that passed [`compile`].
#[derive(Debug)]
pub struct Template<'a> {
    spec: &'a TargetTemplate,
    hash: String,
}

/// The values a template is rendered with.
#[derive(Clone, Copy, Debug)]
pub struct Values<'a> {
    pub access_token: &'a str,
    pub token_type: &'a str,
    pub expires_at: Timestamp,
    pub scope: &'a str,
    /// Empty when unknown, and for a product token.
    pub phone_number: &'a str,
}

/// Checks a template as far as it can be without a token: limits, keys and values Kubernetes would
/// refuse, the operator's own names, syntax, unknown variables, and a render with placeholder values
/// (type errors, loops out of fuel). `None`: the grant has no template.
pub fn compile(spec: Option<&TargetTemplate>) -> Result<Option<Template<'_>>, TemplateError> {
    let Some(spec) = spec.filter(|t| !(t.labels.is_empty() && t.annotations.is_empty() && t.data.is_empty())) else {
        return Ok(None);
    };
    let fail = |field: &str, what: String| Err(TemplateError(format!("spec.target.template.{field}: {what}")));
    for (field, map) in [("labels", &spec.labels), ("annotations", &spec.annotations), ("data", &spec.data)] {
        if map.len() as u64 > TEMPLATE_MAX_ENTRIES {
            return fail(field, format!("at most {TEMPLATE_MAX_ENTRIES} entries"));
        }
    }
    for (key, value) in &spec.labels {
        if let Some(problem) = metadata_key_problem(key) {
            return fail(&format!("labels[{key}]"), problem);
        }
        if !is_label_value(value) {
            return fail(&format!("labels[{key}]"), format!("{value:?} is not a label value ({LABEL_VALUE})"));
        }
    }
    for (key, value) in &spec.annotations {
        if let Some(problem) = metadata_key_problem(key) {
            return fail(&format!("annotations[{key}]"), problem);
        }
        if value.len() as u64 > TEMPLATE_MAX_ANNOTATION_VALUE {
            return fail(&format!("annotations[{key}]"), format!("longer than {TEMPLATE_MAX_ANNOTATION_VALUE} bytes"));
        }
    }
    let env = environment();
    let globals: Vec<String> = env.globals().map(|(name, _)| name.to_owned()).collect();
    for (key, source) in &spec.data {
        let field = format!("data[{key}]");
        if !is_secret_key(key) {
            return fail(&field, "not a Secret key (letters, digits, '-', '_' and '.', at most 253)".into());
        }
        if RESERVED_TARGET_KEYS.contains(&key.as_str()) {
            return fail(&field, format!("{key} is written by the operator (or the agent) and cannot be templated"));
        }
        if source.len() as u64 > TEMPLATE_MAX_DATA_VALUE {
            return fail(&field, format!("longer than {TEMPLATE_MAX_DATA_VALUE} bytes"));
        }
        let template = env.template_from_named_str(key, source).map_err(|e| described(&field, &e))?;
        let mut unknown: Vec<String> = template
            .undeclared_variables(false)
            .into_iter()
            .filter(|v| !VARIABLES.contains(&v.as_str()) && !globals.contains(v))
            .collect();
        unknown.sort();
        if !unknown.is_empty() {
            return fail(
                &field,
                format!("unknown variable {}; a template can use {}", unknown.join(", "), VARIABLES.join(", ")),
            );
        }
    }
    let template = Template { spec, hash: hash(spec) };
    // Placeholders of the real values' shapes: what fails here would fail at every renewal.
    let placeholder = Values {
        access_token: "ory_at_placeholder",
        token_type: "Bearer",
        expires_at: Timestamp::UNIX_EPOCH,
        scope: "phone offline_access",
        phone_number: "+4700000000",
    };
    template.render_with(&placeholder, true)?;
    Ok(Some(template))
}

impl Template<'_> {
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.spec.labels
    }

    pub fn annotations(&self) -> &BTreeMap<String, String> {
        &self.spec.annotations
    }

    /// The extra keys for these values. An error names the key, the kind of error and its line,
    /// never a value (the values include the access token).
    pub fn render(&self, values: &Values) -> Result<BTreeMap<String, ByteString>, TemplateError> {
        self.render_with(values, false)
    }

    fn render_with(&self, values: &Values, placeholders: bool) -> Result<BTreeMap<String, ByteString>, TemplateError> {
        let env = environment();
        let context = Value::from(BTreeMap::from([
            ("access_token", Value::from(values.access_token)),
            ("token_type", Value::from(values.token_type)),
            ("expires_at", Value::from(values.expires_at.to_string())),
            ("expires_at_unix", Value::from(values.expires_at.as_second())),
            ("scope", Value::from(values.scope)),
            ("phone_number", Value::from(values.phone_number)),
        ]));
        let mut total = 0;
        let mut out = BTreeMap::new();
        for (key, source) in &self.spec.data {
            let field = format!("data[{key}]");
            let rendered = env.render_named_str(key, source, context.clone()).map_err(|e| match placeholders {
                true => described(&field, &e),
                false => located(&field, &e),
            })?;
            if rendered.len() > MAX_RENDERED {
                return Err(TemplateError(format!(
                    "spec.target.template.{field}: renders more than {} KiB",
                    MAX_RENDERED / 1024
                )));
            }
            total += rendered.len();
            if total > MAX_RENDERED_TOTAL {
                return Err(TemplateError(format!(
                    "spec.target.template.data: renders more than {} KiB in all",
                    MAX_RENDERED_TOTAL / 1024
                )));
            }
            out.insert(key.clone(), ByteString(rendered.into_bytes()));
        }
        Ok(out)
    }
}

/// The hash a target Secret records (`ANNOTATION_TEMPLATE_HASH`) for a grant's template.
fn hash(spec: &TargetTemplate) -> String {
    let json = serde_json::to_string(spec).expect("a template serializes");
    super::lineage::sha256_hex(&[&json])[..16].to_owned()
}

/// The same engine for checking and rendering: undefined variables are errors (a typo must not
/// render as empty), nothing is escaped (`tojson` quotes where JSON needs it), no loader (a
/// template cannot include anything), and every render runs on bounded fuel.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_fuel(Some(FUEL));
    env.set_recursion_limit(32);
    env
}

/// An error found with placeholders only: its detail holds no token and helps the author.
fn described(field: &str, err: &minijinja::Error) -> TemplateError {
    let detail = err.detail().map(|d| format!(": {d}")).unwrap_or_default();
    TemplateError(format!("spec.target.template.{field}: {}{detail}{}", err.kind(), line(err)))
}

/// An error found with the real values: kind and line only, since a detail may quote a value.
fn located(field: &str, err: &minijinja::Error) -> TemplateError {
    TemplateError(format!("spec.target.template.{field}: {}{}", err.kind(), line(err)))
}

fn line(err: &minijinja::Error) -> String {
    err.line().map(|l| format!(" (line {l})")).unwrap_or_default()
}

/// Why `key` cannot be a label or annotation key of the target Secret, if it cannot: Kubernetes'
/// qualified names (an optional DNS subdomain prefix and `/`, a name of at most 63 characters), and
/// not one of the operator's own.
fn metadata_key_problem(key: &str) -> Option<String> {
    if key.starts_with(crate::api::ANNOTATION_PREFIX) || key == super::LABEL_MANAGED_BY {
        return Some(format!("{key} is the operator's own"));
    }
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    let prefix_ok = prefix.is_none_or(is_dns_subdomain);
    (!(name_ok && prefix_ok))
        .then(|| format!("{key:?} is not a qualified name such as example.com/team (name part at most 63 characters)"))
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && v.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric()))
}

fn is_secret_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= 253 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(data: &[(&str, &str)]) -> TargetTemplate {
        TargetTemplate {
            data: data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    fn values() -> Values<'static> {
        Values {
            access_token: "ory_at_real",
            token_type: "Bearer",
            expires_at: Timestamp::from_second(1_700_003_600).unwrap(),
            scope: "phone offline_access",
            phone_number: "+4799999999",
        }
    }

    fn text(rendered: &BTreeMap<String, ByteString>, key: &str) -> String {
        String::from_utf8(rendered[key].0.clone()).unwrap()
    }

    #[test]
    fn keys_render_from_the_token_and_json_files_quote_with_tojson() {
        let spec = template(&[
            ("authorization", "{{ token_type }} {{ access_token }}"),
            ("credentials.json", r#"{"token": {{ access_token | tojson }}, "expires": {{ expires_at_unix }}}"#),
            ("who", "{{ phone_number }} until {{ expires_at }}"),
        ]);
        let compiled = compile(Some(&spec)).unwrap().unwrap();
        let out = compiled.render(&values()).unwrap();
        assert_eq!(text(&out, "authorization"), "Bearer ory_at_real");
        let json: serde_json::Value = serde_json::from_str(&text(&out, "credentials.json")).unwrap();
        assert_eq!(json, serde_json::json!({"token": "ory_at_real", "expires": 1_700_003_600}));
        assert_eq!(text(&out, "who"), "+4799999999 until 2023-11-14T23:13:20Z");
    }

    #[test]
    fn no_template_or_an_empty_one_is_none() {
        assert!(compile(None).unwrap().is_none());
        assert!(compile(Some(&TargetTemplate::default())).unwrap().is_none());
    }

    #[test]
    fn the_refresh_token_and_client_secret_are_not_variables_and_nothing_else_reaches_them() {
        for source in ["{{ refresh_token }}", "{{ client_secret }}", "{{ client_id }}", "{{ env }}"] {
            let err = compile(Some(&template(&[("x", source)]))).unwrap_err().0;
            assert!(err.contains("unknown variable"), "{source}: {err}");
            assert!(err.contains("spec.target.template.data[x]"), "{err}");
        }
        // What a template can reach at all (the whole context, through debug()) holds only the
        // values it was given.
        let spec = template(&[("all", "{{ debug() }}")]);
        let compiled = compile(Some(&spec)).unwrap().unwrap();
        let out = text(&compiled.render(&values()).unwrap(), "all");
        assert!(out.contains("ory_at_real"), "{out}");
        for name in ["refresh_token", "client_secret"] {
            assert!(!out.contains(name), "{out}");
        }
        // No loader: including another template is an error, not a file read.
        assert!(compile(Some(&template(&[("x", "{% include '/etc/passwd' %}")]))).is_err());
    }

    #[test]
    fn syntax_errors_name_the_key_and_line() {
        let err = compile(Some(&template(&[("auth", "Bearer\n{{ access_token ")]))).unwrap_err().0;
        assert!(err.starts_with("spec.target.template.data[auth]: syntax error"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn reserved_keys_and_operator_metadata_cannot_be_templated() {
        for key in RESERVED_TARGET_KEYS {
            let err = compile(Some(&template(&[(key, "x")]))).unwrap_err().0;
            assert!(err.contains("cannot be templated"), "{err}");
        }
        let mut spec = TargetTemplate::default();
        spec.labels.insert("app.kubernetes.io/managed-by".into(), "me".into());
        assert!(compile(Some(&spec)).unwrap_err().0.contains("operator's own"));
        let mut spec = TargetTemplate::default();
        spec.annotations.insert("auth.wgtwo.com/refreshed-at".into(), "never".into());
        assert!(compile(Some(&spec)).unwrap_err().0.contains("operator's own"));
    }

    #[test]
    fn labels_and_annotations_kubernetes_would_refuse_are_refused_first() {
        let bad_labels = [("team", "a b"), ("team", "-a"), ("Not_A_Prefix/x", "a"), ("a/b/c", "v"), ("", "v")];
        for (key, value) in bad_labels {
            let mut spec = TargetTemplate::default();
            spec.labels.insert(key.into(), value.into());
            assert!(compile(Some(&spec)).is_err(), "{key}={value}");
        }
        let mut spec = TargetTemplate::default();
        spec.labels.insert("example.com/team".into(), "team-a".into());
        spec.labels.insert("tier".into(), String::new());
        spec.annotations.insert("reloader.stakater.com/match".into(), "true".into());
        let compiled = compile(Some(&spec)).unwrap().unwrap();
        assert_eq!(compiled.labels()["example.com/team"], "team-a");
        let mut spec = TargetTemplate::default();
        spec.annotations.insert("x".into(), "y".repeat(TEMPLATE_MAX_ANNOTATION_VALUE as usize + 1));
        assert!(compile(Some(&spec)).is_err());
    }

    #[test]
    fn a_runaway_loop_runs_out_of_fuel_instead_of_holding_the_reconcile() {
        let err = compile(Some(&template(&[("x", "{% for i in range(100000000) %}{{ i }}{% endfor %}")]))).unwrap_err();
        assert!(err.0.contains("data[x]"), "{err}");
        let err = compile(Some(&template(&[("x", "{{ access_token * 5000 }}")]))).unwrap_err();
        assert!(err.0.contains("renders more than"), "{err}");
    }

    #[test]
    fn an_error_with_the_real_values_never_quotes_them() {
        // Passes with the placeholder token, fails with the real one.
        let spec = template(&[(
            "x",
            "{% if access_token == 'ory_at_placeholder' %}ok{% else %}{{ access_token | int }}{% endif %}",
        )]);
        let compiled = compile(Some(&spec)).unwrap().unwrap();
        let err = compiled.render(&values()).unwrap_err().0;
        assert!(err.starts_with("spec.target.template.data[x]: "), "{err}");
        assert!(!err.contains("ory_at_real"), "{err}");
    }

    #[test]
    fn the_hash_changes_with_the_template() {
        let a = template(&[("x", "{{ access_token }}")]);
        let b = template(&[("x", "Bearer {{ access_token }}")]);
        let (ha, hb) = (
            compile(Some(&a)).unwrap().unwrap().hash().to_owned(),
            compile(Some(&b)).unwrap().unwrap().hash().to_owned(),
        );
        assert_ne!(ha, hb);
        assert_eq!(ha, compile(Some(&a)).unwrap().unwrap().hash());
    }
}
