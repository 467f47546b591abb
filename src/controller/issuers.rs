//! Which identity services the operator may send credentials to.
//!
//! Whoever may create a `WgtwoGrant` chooses its `issuerUrl` and the Secrets it names; the
//! operator, which can read every Secret it serves, then POSTs one as a refresh token and another as
//! Basic auth to that issuer. Without a limit, a user who may create grants but not read Secrets
//! could have any Secret of the namespace sent to a server of their own (a confused deputy). So the
//! operator talks only to issuers its administrator allowed, and checks that before reading a Secret
//! or sending anything.

use url::Url;

/// An allowed issuer, compared by scheme, host, port and path (trailing slash ignored).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedIssuer(Url);

impl AllowedIssuer {
    pub fn parse(s: &str) -> Result<Self, String> {
        let url = Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        if !matches!(url.scheme(), "https" | "http") || url.host().is_none() {
            return Err(format!("{s:?} must be an http(s) URL with a host"));
        }
        if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() || url.password().is_some() {
            return Err(format!("{s:?} must have no query, fragment or user info"));
        }
        Ok(Self(url))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str().trim_end_matches('/')
    }
}

/// Whether `issuer` (a grant's `spec.issuerUrl`) is one of `allowed`. Anything that does not parse
/// cleanly is not allowed.
pub fn is_allowed(issuer: &str, allowed: &[AllowedIssuer]) -> bool {
    let Ok(url) = Url::parse(issuer) else { return false };
    if !url.username().is_empty() || url.password().is_some() || url.query().is_some() || url.fragment().is_some() {
        return false;
    }
    allowed.iter().any(|a| {
        let a = &a.0;
        a.scheme() == url.scheme()
            && a.host() == url.host()
            && a.port_or_known_default() == url.port_or_known_default()
            && a.path().trim_end_matches('/') == url.path().trim_end_matches('/')
    })
}

/// The condition message for a grant whose issuer is not allowed.
pub fn not_allowed_message(issuer: &str, allowed: &[AllowedIssuer]) -> String {
    let list: Vec<&str> = allowed.iter().map(AllowedIssuer::as_str).collect();
    format!(
        "spec.issuerUrl {issuer} is not an identity service this operator may send credentials to (allowed: {}). No Secret was read and nothing was sent. Use an allowed issuer, or ask the operator's administrator to add it (--allowed-issuer, chart value operator.allowedIssuers)",
        list.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wgtwo() -> Vec<AllowedIssuer> {
        vec![AllowedIssuer::parse("https://id.wgtwo.com").unwrap()]
    }

    #[test]
    fn the_allowed_issuer_matches_with_or_without_slash_case_or_default_port() {
        for ok in ["https://id.wgtwo.com", "https://id.wgtwo.com/", "https://ID.wgtwo.com", "https://id.wgtwo.com:443/"]
        {
            assert!(is_allowed(ok, &wgtwo()), "{ok}");
        }
    }

    #[test]
    fn look_alike_issuers_are_refused() {
        for bad in [
            "https://id.wgtwo.com.evil.example",
            "https://evil.example/id.wgtwo.com",
            "https://id.wgtwo.com@evil.example",
            "https://user@id.wgtwo.com",
            "http://id.wgtwo.com",
            "https://id.wgtwo.com:8443",
            "https://id.wgtwo.com/other",
            "https://id.wgtwo.com/?x=1",
            "https://wgtwo.com",
            "not a url",
            "",
        ] {
            assert!(!is_allowed(bad, &wgtwo()), "{bad}");
        }
        assert!(!is_allowed("https://id.wgtwo.com", &[]), "an empty list allows nothing");
    }

    #[test]
    fn a_path_prefix_issuer_matches_only_its_own_path() {
        let allowed = vec![AllowedIssuer::parse("http://127.0.0.1:4444/tenant/").unwrap()];
        assert!(is_allowed("http://127.0.0.1:4444/tenant", &allowed));
        assert!(!is_allowed("http://127.0.0.1:4444/tenant/x", &allowed));
        assert!(!is_allowed("http://127.0.0.1:4445/tenant", &allowed));
    }

    #[test]
    fn bad_allowlist_entries_are_refused_at_startup_with_the_value() {
        for bad in ["id.wgtwo.com", "ftp://id.wgtwo.com", "https://id.wgtwo.com?x", "https://u:p@id.wgtwo.com"] {
            let err = AllowedIssuer::parse(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn the_message_lists_what_is_allowed_and_says_nothing_was_sent() {
        let message = not_allowed_message("https://evil.example", &wgtwo());
        assert!(message.contains("allowed: https://id.wgtwo.com)"), "{message}");
        assert!(message.contains("nothing was sent"));
    }
}
