//! The authorization request a subscriber's browser is sent with, and what must be remembered
//! until the callback comes back.

use std::str::FromStr;

use url::Url;

use super::secrets::{CsrfToken, Nonce, PkceCodeVerifier};

/// The SDK's rule: a caller-chosen state shorter than this is refused.
pub const MIN_STATE_LEN: usize = 8;

/// OpenID Connect `prompt`, with the values the wgtwo SDK offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prompt {
    /// No `prompt` parameter: the server decides.
    #[default]
    Default,
    Login,
    Consent,
    LoginConsent,
    /// Fail instead of showing any page (`login_required` / `consent_required`).
    None,
}

impl FromStr for Prompt {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_whitespace().collect::<Vec<_>>().as_slice() {
            [] | ["default"] => Ok(Prompt::Default),
            ["login"] => Ok(Prompt::Login),
            ["consent"] => Ok(Prompt::Consent),
            ["login", "consent"] | ["consent", "login"] => Ok(Prompt::LoginConsent),
            ["none"] => Ok(Prompt::None),
            _ => Err(format!("unknown prompt {s:?}: use login, consent, \"login consent\", none or default")),
        }
    }
}

/// What to ask the subscriber for.
#[derive(Clone, Debug)]
pub struct AuthorizationRequest {
    /// Scopes, passed through untouched (`openid` is always added).
    pub scope: Vec<String>,
    /// CSRF state; random when `None`. At least [`MIN_STATE_LEN`] characters.
    pub state: Option<String>,
    /// ID-token nonce; random when `None`.
    pub nonce: Option<String>,
    pub prompt: Prompt,
    /// PKCE S256 (RFC 7636); on by default.
    pub pkce: bool,
}

impl AuthorizationRequest {
    pub fn new(scope: &str) -> Self {
        Self {
            scope: scope.split_whitespace().map(str::to_owned).collect(),
            state: None,
            nonce: None,
            prompt: Prompt::Default,
            pkce: true,
        }
    }
}

/// An authorization in flight: the URL for the browser and the values to check the callback and
/// the ID token against. Dropped after the code exchange.
#[derive(Debug)]
pub struct PendingAuthorization {
    pub url: Url,
    pub state: CsrfToken,
    pub nonce: Nonce,
    pub(crate) pkce_verifier: Option<PkceCodeVerifier>,
}

pub fn validate_state(state: &str) -> Result<(), String> {
    if state.chars().count() < MIN_STATE_LEN {
        return Err(format!("state must be at least {MIN_STATE_LEN} characters"));
    }
    Ok(())
}

/// What came back to the redirect URI.
#[derive(Debug, PartialEq, Eq)]
pub enum CallbackOutcome {
    Code(String),
    /// The server or the subscriber refused: `error` and `error_description`.
    Denied {
        error: String,
        description: Option<String>,
    },
}

/// Checks a callback URL (`…?code=…&state=…` or `…?error=…&state=…`) against the expected state.
/// Pure, so every malformed callback is tested without a browser.
pub fn parse_callback(callback: &Url, expected_state: &CsrfToken) -> Result<CallbackOutcome, String> {
    let param = |name: &str| callback.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned());
    // An error redirect still carries the state; check it first so a forged error is not trusted.
    match param("state") {
        None => return Err("the callback has no state parameter".into()),
        Some(state) if !constant_time_eq(state.as_bytes(), expected_state.secret().as_bytes()) => {
            return Err("the callback's state does not match the request (possible CSRF); start again".into());
        }
        Some(_) => {}
    }
    if let Some(error) = param("error") {
        return Ok(CallbackOutcome::Denied { error, description: param("error_description") });
    }
    match param("code") {
        Some(code) if !code.is_empty() => Ok(CallbackOutcome::Code(code)),
        _ => Err("the callback has neither a code nor an error".into()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_accepts_the_sdk_values() {
        assert_eq!("".parse::<Prompt>().unwrap(), Prompt::Default);
        assert_eq!("default".parse::<Prompt>().unwrap(), Prompt::Default);
        assert_eq!("login".parse::<Prompt>().unwrap(), Prompt::Login);
        assert_eq!("consent".parse::<Prompt>().unwrap(), Prompt::Consent);
        assert_eq!("login consent".parse::<Prompt>().unwrap(), Prompt::LoginConsent);
        assert_eq!("none".parse::<Prompt>().unwrap(), Prompt::None);
        assert!("select_account".parse::<Prompt>().is_err());
    }

    #[test]
    fn state_shorter_than_eight_characters_is_refused() {
        assert!(validate_state("1234567").is_err());
        assert!(validate_state("12345678").is_ok());
    }

    fn url(query: &str) -> Url {
        Url::parse(&format!("http://127.0.0.1:8085/callback?{query}")).unwrap()
    }

    #[test]
    fn callback_with_matching_state_yields_the_code() {
        let state = CsrfToken::new("expected-state".into());
        assert_eq!(
            parse_callback(&url("code=abc&state=expected-state"), &state),
            Ok(CallbackOutcome::Code("abc".into()))
        );
    }

    #[test]
    fn callback_with_another_state_is_refused_even_when_it_carries_an_error() {
        let state = CsrfToken::new("expected-state".into());
        assert!(parse_callback(&url("code=abc&state=forged-state"), &state).unwrap_err().contains("does not match"));
        assert!(parse_callback(&url("error=access_denied&state=forged"), &state).is_err());
        assert!(parse_callback(&url("code=abc"), &state).unwrap_err().contains("no state"));
    }

    #[test]
    fn callback_with_an_error_reports_it() {
        let state = CsrfToken::new("expected-state".into());
        let outcome = parse_callback(&url("error=access_denied&error_description=no+PIN&state=expected-state"), &state);
        assert_eq!(
            outcome,
            Ok(CallbackOutcome::Denied { error: "access_denied".into(), description: Some("no PIN".into()) })
        );
    }

    #[test]
    fn callback_without_code_or_error_is_refused() {
        let state = CsrfToken::new("expected-state".into());
        assert!(parse_callback(&url("state=expected-state"), &state).is_err());
        assert!(parse_callback(&url("code=&state=expected-state"), &state).is_err());
    }
}
