//! The target Secret's template (`spec.target.template`): labels, annotations and extra keys
//! rendered from the token with MiniJinja, a well-kept Jinja2 engine (no home-made template
//! language). Pure: [`compile`] checks a template before any token is requested, [`Template::render`]
//! fills it at every renewal.
//!
//! What a template can see is only what the target Secret holds anyway (the access token and its
//! public details): the refresh token and the client secret are never in its context, there is no
//! loader, no environment access, and rendering runs on bounded fuel and output.
//!
//! The access token and the phone number are **opaque** ([`OPAQUE`]): the template engine never
//! sees them. It renders markers in their place, which are replaced by the real values (through
//! the encoding filters `tojson` and `b64encode`, if applied) after rendering. So nothing a template
//! does can depend on a token's value (no comparison, indexing, length or branch sees it), and
//! nothing observable of a grant (its status, Events, timing of writes) can reveal a bit of it to
//! a grant author who may not read Secrets. A template that slices or changes a marker fails the
//! same way for every token, so already at [`compile`], before any token request.

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
/// The variables a template can only write out, whole or through [`ENCODINGS`]: secret or personal.
/// (The others are public: the grant's status shows the expiry and scope.)
pub const OPAQUE: &[&str] = &["access_token", "phone_number"];
/// The filters an opaque value may pass through.
pub const ENCODINGS: &[&str] = &["tojson", "b64encode"];
/// Counted per opaque value written out when checking the output limits, whatever its real length,
/// so that the check does not depend on a token either (wgtwo's access tokens are about 100 bytes).
const OPAQUE_BUDGET: usize = 2048;
/// Marker delimiters (Unicode private use characters): `OPEN name CLOSE` stands for a variable,
/// `OPEN =encoding SEP content CLOSE` for `content` through an encoding filter.
const OPEN: char = '\u{E000}';
const CLOSE: char = '\u{E001}';
const SEP: char = '\u{E002}';
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

/// The label and annotation prefixes a template may set by default (`--template-metadata-prefix`):
/// Kubernetes' recommended labels and Reloader's match annotation. Keys without a prefix are always
/// allowed. Not, for example, the annotations of kubernetes-replicator or Reflector: those copy a
/// Secret into other namespaces, where the grant's author might read the token.
pub const DEFAULT_METADATA_PREFIXES: &[&str] = &["app.kubernetes.io", "reloader.stakater.com"];

/// Checks a template as far as it can be without a token: limits, keys and values Kubernetes would
/// refuse, the operator's own names, label and annotation prefixes outside `prefixes`, syntax,
/// unknown variables, and a render with placeholder values (type errors, loops out of fuel, opaque
/// values taken apart). `None`: the grant has no template.
pub fn compile<'a>(
    spec: Option<&'a TargetTemplate>,
    prefixes: &[String],
) -> Result<Option<Template<'a>>, TemplateError> {
    let Some(spec) = spec.filter(|t| !(t.labels.is_empty() && t.annotations.is_empty() && t.data.is_empty())) else {
        return Ok(None);
    };
    let fail = |field: &str, what: String| Err(TemplateError(format!("spec.target.template.{field}: {what}")));
    for (field, map) in [("labels", &spec.labels), ("annotations", &spec.annotations), ("data", &spec.data)] {
        if map.len() as u64 > TEMPLATE_MAX_ENTRIES {
            return fail(field, format!("at most {TEMPLATE_MAX_ENTRIES} entries"));
        }
    }
    for (field, map) in [("labels", &spec.labels), ("annotations", &spec.annotations)] {
        for key in map.keys() {
            if let Some(problem) = prefix_problem(key, prefixes) {
                return fail(&format!("{field}[{key}]"), problem);
            }
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

impl<'a> Template<'a> {
    /// A template that passed [`compile`] before, at the same generation of its grant.
    pub fn checked(spec: Option<&'a TargetTemplate>) -> Option<Self> {
        let spec = spec.filter(|t| !(t.labels.is_empty() && t.annotations.is_empty() && t.data.is_empty()))?;
        Some(Template { spec, hash: hash(spec) })
    }
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

    fn render_with<'v>(
        &self,
        values: &Values<'v>,
        placeholders: bool,
    ) -> Result<BTreeMap<String, ByteString>, TemplateError> {
        let env = environment();
        // The opaque values are markers here: what the engine computes cannot depend on them.
        let context = Value::from(BTreeMap::from([
            ("access_token", Value::from(marker("access_token"))),
            ("token_type", Value::from(values.token_type)),
            ("expires_at", Value::from(values.expires_at.to_string())),
            ("expires_at_unix", Value::from(values.expires_at.as_second())),
            ("scope", Value::from(values.scope)),
            ("phone_number", Value::from(marker("phone_number"))),
        ]));
        let opaque = |name: &str| -> &'v str {
            match name {
                "access_token" => values.access_token,
                _ => values.phone_number,
            }
        };
        let mut total = 0;
        let mut out = BTreeMap::new();
        for (key, source) in &self.spec.data {
            let field = format!("data[{key}]");
            let structure = env.render_named_str(key, source, context.clone()).map_err(|e| match placeholders {
                true => described(&field, &e),
                false => located(&field, &e),
            })?;
            let parts = parse(&structure).ok_or_else(|| {
                TemplateError(format!(
                    "spec.target.template.{field}: {} can only be written out whole, or through {} (not one through the other); they cannot be sliced, compared, measured or changed",
                    OPAQUE.join(" and "),
                    ENCODINGS.join(" or ")
                ))
            })?;
            // Limits on the structure, each opaque value counted at its budget: the same for every token.
            let size = measure(&parts);
            if size > MAX_RENDERED {
                return Err(TemplateError(format!(
                    "spec.target.template.{field}: renders more than {} KiB (each {} counted as {} KiB)",
                    MAX_RENDERED / 1024,
                    OPAQUE.join(" or "),
                    OPAQUE_BUDGET / 1024
                )));
            }
            total += size;
            if total > MAX_RENDERED_TOTAL {
                return Err(TemplateError(format!(
                    "spec.target.template.data: renders more than {} KiB in all",
                    MAX_RENDERED_TOTAL / 1024
                )));
            }
            let rendered = resolve(&parts, &opaque);
            out.insert(key.clone(), ByteString(rendered.into_bytes()));
        }
        Ok(out)
    }
}

fn marker(name: &str) -> String {
    format!("{OPEN}{name}{CLOSE}")
}

/// `content` through an encoding filter, to be applied when the markers in it are replaced.
fn encoded(encoding: &str, content: &str) -> String {
    format!("{OPEN}={encoding}{SEP}{content}{CLOSE}")
}

/// `tojson`: as MiniJinja's own, deferred for a string holding opaque values. In a structure
/// (a map, a list), each opaque value is escaped as a JSON string's content where it stands; an
/// encoding in a structure is refused at [`parse`] (as a nested one).
fn tojson(value: &Value, indent: Option<Value>, args: minijinja::value::Kwargs) -> Result<Value, minijinja::Error> {
    if let Some(s) = value.as_str()
        && s.contains(OPEN)
    {
        return Ok(Value::from_safe_string(format!("\"{}\"", encoded("tojson", s))));
    }
    let json = minijinja::filters::tojson(value, indent, args)?;
    let Some(text) = json.as_str().filter(|t| t.contains(OPEN)) else { return Ok(json) };
    // Malformed markers are left for `parse` to refuse.
    let Some(parts) = parse(text) else { return Ok(json) };
    let escaped = parts
        .iter()
        .map(|part| match part {
            Part::Value(name) => encoded("tojson", &marker(name)),
            // Base64 needs no escaping in JSON; a string through tojson is in quotes already.
            other => unparse(std::slice::from_ref(other)),
        })
        .collect();
    Ok(Value::from_safe_string(escaped))
}

/// The structure the parts were parsed from.
fn unparse(parts: &[Part]) -> String {
    parts
        .iter()
        .map(|part| match part {
            Part::Text(text) => (*text).to_owned(),
            Part::Value(name) => marker(name),
            Part::Encoded(encoding, inner) => encoded(encoding, &unparse(inner)),
        })
        .collect()
}

/// `b64encode`: standard base64 of a string's UTF-8 bytes (e.g. for HTTP Basic credentials),
/// deferred for a string holding opaque values.
fn b64encode(value: &Value) -> Result<Value, minijinja::Error> {
    let Some(s) = value.as_str() else {
        return Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, "b64encode takes a string"));
    };
    Ok(Value::from(match s.contains(OPEN) {
        true => encoded("b64encode", s),
        false => base64_standard(s),
    }))
}

fn base64_standard(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

/// JSON string contents, escaped as MiniJinja's `tojson` escapes them (also safe in HTML).
fn json_inner(s: &str) -> String {
    let quoted = serde_json::to_string(s).expect("a string serializes");
    quoted[1..quoted.len() - 1]
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\'', "\\u0027")
}

/// A rendered structure: text, opaque values, and encodings of text and values (not of other
/// encodings: each would multiply the output, 6x per `tojson` of a JSON string, so a chain of them
/// could grow without bound past every limit checked on the structure).
#[derive(Debug, PartialEq)]
enum Part<'s> {
    Text(&'s str),
    Value(&'s str),
    Encoded(&'s str, Vec<Part<'s>>),
}

/// Parses a rendered structure; `None` when the template took a marker apart (sliced, changed or
/// reordered it) or nested encodings, which it does for any value alike.
fn parse(structure: &str) -> Option<Vec<Part<'_>>> {
    let mut rest = structure;
    let parts = parse_until(&mut rest, false)?;
    rest.is_empty().then_some(parts)
}

/// Parses up to an unmatched `CLOSE` (consumed) when `nested`, else to the end.
fn parse_until<'s>(rest: &mut &'s str, nested: bool) -> Option<Vec<Part<'s>>> {
    let mut parts = Vec::new();
    loop {
        let Some(at) = rest.find([OPEN, CLOSE, SEP]) else {
            if nested {
                return None;
            }
            parts.push(Part::Text(rest));
            *rest = "";
            return Some(parts);
        };
        parts.push(Part::Text(&rest[..at]));
        let delimiter = rest[at..].chars().next().expect("found a delimiter");
        *rest = &rest[at + delimiter.len_utf8()..];
        match delimiter {
            CLOSE if nested => return Some(parts),
            OPEN => match rest.strip_prefix('=') {
                Some(_) if nested => return None,
                Some(after) => {
                    let (encoding, content) = after.split_once(SEP)?;
                    if !ENCODINGS.contains(&encoding) {
                        return None;
                    }
                    *rest = content;
                    parts.push(Part::Encoded(encoding, parse_until(rest, true)?));
                }
                None => {
                    let (name, after) = rest.split_once(CLOSE)?;
                    if !OPAQUE.contains(&name) {
                        return None;
                    }
                    parts.push(Part::Value(name));
                    *rest = after;
                }
            },
            _ => return None,
        }
    }
}

/// The output with the values in place of their markers.
fn resolve<'v>(parts: &[Part], value: &dyn Fn(&str) -> &'v str) -> String {
    let mut out = String::new();
    for part in parts {
        match part {
            Part::Text(text) => out.push_str(text),
            Part::Value(name) => out.push_str(value(name)),
            Part::Encoded(encoding, inner) => {
                let inner = resolve(inner, value);
                out.push_str(&match *encoding {
                    "tojson" => json_inner(&inner),
                    _ => base64_standard(&inner),
                });
            }
        }
    }
    out
}

/// The largest output the structure can have, each value counted at [`OPAQUE_BUDGET`] through its
/// encoding's worst expansion: the same for every token.
fn measure(parts: &[Part]) -> usize {
    parts
        .iter()
        .map(|part| match part {
            Part::Text(text) => text.len(),
            Part::Value(_) => OPAQUE_BUDGET,
            // `\u003c` for `<`: six bytes for one.
            Part::Encoded("tojson", inner) => measure(inner) * 6,
            Part::Encoded(_, inner) => measure(inner).div_ceil(3) * 4,
        })
        .sum()
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
    env.add_filter("tojson", tojson);
    env.add_filter("b64encode", b64encode);
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

/// Why the operator's owner does not let templates set `key` (its prefix is not allowed), if so.
fn prefix_problem(key: &str, prefixes: &[String]) -> Option<String> {
    let (prefix, _) = key.split_once('/')?;
    if prefixes.iter().any(|p| p == prefix) {
        return None;
    }
    let allowed = match prefixes.is_empty() {
        true => "none (keys without a prefix only)".to_owned(),
        false => prefixes.join(", "),
    };
    Some(format!(
        "the prefix {prefix} is not allowed here; allowed: {allowed}. The operator's owner chooses them (--template-metadata-prefix): annotations such as a replicator's could copy the token where this grant's author could read it"
    ))
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

    fn defaults() -> Vec<String> {
        DEFAULT_METADATA_PREFIXES.iter().map(|p| p.to_string()).collect()
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
        let compiled = compile(Some(&spec), &defaults()).unwrap().unwrap();
        let out = compiled.render(&values()).unwrap();
        assert_eq!(text(&out, "authorization"), "Bearer ory_at_real");
        let json: serde_json::Value = serde_json::from_str(&text(&out, "credentials.json")).unwrap();
        assert_eq!(json, serde_json::json!({"token": "ory_at_real", "expires": 1_700_003_600}));
        assert_eq!(text(&out, "who"), "+4799999999 until 2023-11-14T23:13:20Z");
    }

    #[test]
    fn no_template_or_an_empty_one_is_none() {
        assert!(compile(None, &defaults()).unwrap().is_none());
        assert!(compile(Some(&TargetTemplate::default()), &defaults()).unwrap().is_none());
    }

    #[test]
    fn the_refresh_token_and_client_secret_are_not_variables_and_nothing_else_reaches_them() {
        for source in ["{{ refresh_token }}", "{{ client_secret }}", "{{ client_id }}", "{{ env }}"] {
            let err = compile(Some(&template(&[("x", source)])), &defaults()).unwrap_err().0;
            assert!(err.contains("unknown variable"), "{source}: {err}");
            assert!(err.contains("spec.target.template.data[x]"), "{err}");
        }
        // What a template can reach at all (the whole context, through debug()) holds only the
        // values it was given (the opaque ones as markers, replaced in the output).
        let spec = template(&[("all", "{{ debug() }}")]);
        let compiled = compile(Some(&spec), &defaults()).unwrap().unwrap();
        let out = text(&compiled.render(&values()).unwrap(), "all");
        assert!(out.contains("ory_at_real"), "{out}");
        for name in ["refresh_token", "client_secret"] {
            assert!(!out.contains(name), "{out}");
        }
        // No loader: including another template is an error, not a file read.
        assert!(compile(Some(&template(&[("x", "{% include '/etc/passwd' %}")])), &defaults()).is_err());
    }

    #[test]
    fn syntax_errors_name_the_key_and_line() {
        let err = compile(Some(&template(&[("auth", "Bearer\n{{ access_token ")])), &defaults()).unwrap_err().0;
        assert!(err.starts_with("spec.target.template.data[auth]: syntax error"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn reserved_keys_and_operator_metadata_cannot_be_templated() {
        for key in RESERVED_TARGET_KEYS {
            let err = compile(Some(&template(&[(key, "x")])), &defaults()).unwrap_err().0;
            assert!(err.contains("cannot be templated"), "{err}");
        }
        let mut spec = TargetTemplate::default();
        spec.labels.insert("app.kubernetes.io/managed-by".into(), "me".into());
        assert!(compile(Some(&spec), &defaults()).unwrap_err().0.contains("operator's own"));
        let mut spec = TargetTemplate::default();
        spec.annotations.insert("auth.wgtwo.com/refreshed-at".into(), "never".into());
        assert!(compile(Some(&spec), &defaults()).unwrap_err().0.contains("operator's own"));
    }

    #[test]
    fn labels_and_annotations_kubernetes_would_refuse_are_refused_first() {
        let bad_labels = [("team", "a b"), ("team", "-a"), ("Not_A_Prefix/x", "a"), ("a/b/c", "v"), ("", "v")];
        for (key, value) in bad_labels {
            let mut spec = TargetTemplate::default();
            spec.labels.insert(key.into(), value.into());
            assert!(compile(Some(&spec), &defaults()).is_err(), "{key}={value}");
        }
        let mut spec = TargetTemplate::default();
        spec.labels.insert("example.com/team".into(), "team-a".into());
        spec.labels.insert("tier".into(), String::new());
        spec.annotations.insert("reloader.stakater.com/match".into(), "true".into());
        let compiled = compile(Some(&spec), &["example.com".into(), "reloader.stakater.com".into()]).unwrap().unwrap();
        assert_eq!(compiled.labels()["example.com/team"], "team-a");
        let mut spec = TargetTemplate::default();
        spec.annotations.insert("x".into(), "y".repeat(TEMPLATE_MAX_ANNOTATION_VALUE as usize + 1));
        assert!(compile(Some(&spec), &defaults()).is_err());
    }

    #[test]
    fn labels_and_annotations_only_under_the_prefixes_the_owner_allows() {
        for (field, key) in [
            ("annotations", "replicator.v1.mittwald.de/replicate-to"),
            ("annotations", "reflector.v1.k8s.emberstack.com/reflection-allowed"),
            ("labels", "example.com/team"),
        ] {
            let mut spec = TargetTemplate::default();
            match field {
                "labels" => spec.labels.insert(key.into(), "x".into()),
                _ => spec.annotations.insert(key.into(), "x".into()),
            };
            let err = compile(Some(&spec), &defaults()).unwrap_err().0;
            assert!(err.starts_with(&format!("spec.target.template.{field}[{key}]: the prefix ")), "{err}");
            assert!(err.contains("allowed: app.kubernetes.io, reloader.stakater.com"), "{err}");
            // Allowed once the owner lists the prefix.
            let prefix = key.split_once('/').unwrap().0.to_owned();
            assert!(compile(Some(&spec), &[prefix]).is_ok(), "{key}");
        }
        let mut spec = TargetTemplate::default();
        spec.labels.insert("team".into(), "a".into());
        spec.labels.insert("app.kubernetes.io/part-of".into(), "billing".into());
        assert!(compile(Some(&spec), &defaults()).is_ok());
        spec.labels.remove("app.kubernetes.io/part-of");
        assert!(compile(Some(&spec), &[]).is_ok(), "keys without a prefix are always allowed");
    }

    #[test]
    fn a_runaway_loop_runs_out_of_fuel_instead_of_holding_the_reconcile() {
        let err = compile(Some(&template(&[("x", "{% for i in range(100000000) %}{{ i }}{% endfor %}")])), &defaults())
            .unwrap_err();
        assert!(err.0.contains("data[x]"), "{err}");
        let err = compile(Some(&template(&[("x", "{{ access_token * 5000 }}")])), &defaults()).unwrap_err();
        assert!(err.0.contains("renders more than"), "{err}");
    }

    /// The issue's attack: a template that fails (or renders differently) for some tokens and not
    /// others turns the status into an oracle on the token.
    #[test]
    fn nothing_a_template_computes_depends_on_the_opaque_values() {
        let probes = [
            "{% if access_token[9] == 'K' %}{{ access_token | int }}{% endif %}",
            "{% if 'K' in access_token %}{{ 1 // 0 }}{% endif %}",
            "{% if access_token | length > 40 %}{{ access_token | int }}{% endif %}",
            "{% if access_token < 'ory_at_m' %}{{ x }}{% endif %}",
            "{% if phone_number == '+4799999999' %}{{ phone_number | int }}{% endif %}",
            "{% if phone_number %}known{% else %}{{ 1 // 0 }}{% endif %}",
            "{{ access_token | int }}",
            "{{ access_token[:12] }}",
            "{{ access_token | upper }}",
            "{{ access_token | reverse }}",
            "{{ access_token | replace('o', '0') }}",
        ];
        let mut a = values();
        a.access_token = "ory_at_KKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKK.aaaa";
        let mut b = values();
        b.access_token = "ory_at_zz";
        b.phone_number = "";
        for probe in probes {
            let spec = template(&[("x", probe)]);
            let outcome = |v: &Values| match compile(Some(&spec), &defaults()) {
                Err(e) => Err(e.0),
                Ok(t) => t.unwrap().render(v).map(|_| ()).map_err(|e| e.0),
            };
            assert_eq!(outcome(&a), outcome(&b), "{probe}");
            if let Err(message) = outcome(&a) {
                assert!(!message.contains("KKKK") && !message.contains("zz"), "{probe}: {message}");
            }
        }
        // Taking a value apart fails for every token alike, before any token is requested.
        let err = compile(Some(&template(&[("x", "{{ access_token[:12] }}")])), &defaults()).unwrap_err().0;
        assert!(err.contains("can only be written out whole, or through tojson or b64encode"), "{err}");
        assert!(err.starts_with("spec.target.template.data[x]"), "{err}");
    }

    /// Review of issue 23: each `tojson` of a JSON string multiplies its size (backslashes double),
    /// so a chain of them grew the output exponentially past every limit checked on the markers
    /// (28 of them: about 0.5 GB, on every replica, before the leader check).
    #[test]
    fn an_encoding_of_an_encoding_is_refused_before_it_can_grow() {
        for source in [
            "{{ access_token | tojson | tojson }}",
            "{{ access_token | tojson | tojson | tojson | tojson | tojson | tojson | tojson | tojson }}",
            "{{ (access_token | b64encode) | b64encode }}",
            "{{ (access_token | tojson) | b64encode }}",
        ] {
            let err = compile(Some(&template(&[("x", source)])), &defaults()).unwrap_err().0;
            assert!(err.contains("not one through the other"), "{source}: {err}");
        }
        // Through a structure, each value is escaped once where it stands.
        let spec = template(&[("x", "{{ {'t': access_token, 'p': [phone_number]} | tojson }}")]);
        let mut v = values();
        v.access_token = "a\"b<c";
        let out = compile(Some(&spec), &defaults()).unwrap().unwrap().render(&v).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text(&out, "x")).unwrap();
        assert_eq!(json, serde_json::json!({"t": "a\"b<c", "p": ["+4799999999"]}));
        // The limits count each value at its budget through its encoding's worst expansion.
        let err =
            compile(Some(&template(&[("x", &"{{ access_token | tojson }}".repeat(6))])), &defaults()).unwrap_err();
        assert!(err.0.contains("renders more than 64 KiB"), "{err}");
    }

    #[test]
    fn opaque_values_are_written_out_whole_and_through_the_encoding_filters() {
        let spec = template(&[
            ("basic", "{{ ('wgtwo:' ~ access_token) | b64encode }}"),
            ("plain", "{{ 'plain' | b64encode }}"),
            ("nested", "{{ {'auth': ('Bearer ' ~ access_token) | b64encode, 'phone': phone_number} | tojson }}"),
            ("string", "{{ (access_token ~ '<&>') | tojson }}"),
        ]);
        let out = compile(Some(&spec), &defaults()).unwrap().unwrap().render(&values()).unwrap();
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(text(&out, "basic"), b64("wgtwo:ory_at_real"));
        assert_eq!(text(&out, "plain"), b64("plain"));
        let json: serde_json::Value = serde_json::from_str(&text(&out, "nested")).unwrap();
        assert_eq!(json, serde_json::json!({"auth": b64("Bearer ory_at_real"), "phone": "+4799999999"}));
        assert_eq!(text(&out, "string"), r#""ory_at_real\u003c\u0026\u003e""#);
        let json: serde_json::Value = serde_json::from_str(&text(&out, "string")).unwrap();
        assert_eq!(json, "ory_at_real<&>");
    }

    #[test]
    fn the_hash_changes_with_the_template() {
        let a = template(&[("x", "{{ access_token }}")]);
        let b = template(&[("x", "Bearer {{ access_token }}")]);
        let (ha, hb) = (
            compile(Some(&a), &defaults()).unwrap().unwrap().hash().to_owned(),
            compile(Some(&b), &defaults()).unwrap().unwrap().hash().to_owned(),
        );
        assert_ne!(ha, hb);
        assert_eq!(ha, compile(Some(&a), &defaults()).unwrap().unwrap().hash());
    }
}
