//! Small helpers around the Kubernetes API that the commands share.

use k8s_openapi::api::core::v1::Secret;

/// The apiserver's own message for an API error (it names the object and the reason), or the
/// client error.
pub fn kube_message(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

/// This pod's name (the Downward API's `POD_NAME`, else the hostname), to tell replicas apart.
pub fn pod_name() -> Option<String> {
    std::env::var("POD_NAME").ok().or_else(|| std::env::var("HOSTNAME").ok()).filter(|n| !n.is_empty())
}

/// Why a Secret's value cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum ValueProblem {
    Missing,
    NotUtf8,
    Empty,
}

/// The value under `key`, trimmed of surrounding whitespace (a trailing newline from `echo` or a
/// file is common), and non-empty.
pub fn secret_text(secret: &Secret, key: &str) -> Result<String, ValueProblem> {
    let bytes = secret.data.as_ref().and_then(|d| d.get(key)).ok_or(ValueProblem::Missing)?;
    let text = std::str::from_utf8(&bytes.0).map_err(|_| ValueProblem::NotUtf8)?.trim();
    if text.is_empty() {
        return Err(ValueProblem::Empty);
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_text_is_trimmed_and_each_problem_is_told_apart() {
        let mut secret = wgtwo_testenv::string_secret("s", &[("a", " v\n"), ("blank", "  ")]);
        assert_eq!(secret_text(&secret, "a"), Ok("v".into()));
        assert_eq!(secret_text(&secret, "blank"), Err(ValueProblem::Empty));
        assert_eq!(secret_text(&secret, "other"), Err(ValueProblem::Missing));
        secret.data.as_mut().unwrap().insert("bin".into(), k8s_openapi::ByteString(vec![0xff, 0xfe]));
        assert_eq!(secret_text(&secret, "bin"), Err(ValueProblem::NotUtf8));
    }
}
