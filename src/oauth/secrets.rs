//! Secret values as newtypes whose `Debug` prints a redaction, so a log line, an error or a
//! `{:?}` cannot leak them by accident. oauth2-rs already defines exactly these; we use them rather
//! than writing our own, and add none of `Display`, `Serialize` or `Deref<Target = str>`: reading
//! the value takes an explicit `.secret()`.

pub use oauth2::{AccessToken, AuthorizationCode, ClientSecret, CsrfToken, PkceCodeVerifier, RefreshToken};
pub use openidconnect::Nonce;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_of_every_secret_type_is_redacted() {
        let value = "s3cr3t-value-that-must-not-leak";
        let printed = [
            format!("{:?}", AccessToken::new(value.into())),
            format!("{:?}", RefreshToken::new(value.into())),
            format!("{:?}", ClientSecret::new(value.into())),
            format!("{:?}", AuthorizationCode::new(value.into())),
            format!("{:?}", PkceCodeVerifier::new(value.into())),
            format!("{:?}", CsrfToken::new(value.into())),
            format!("{:?}", Nonce::new(value.into())),
        ];
        for line in printed {
            assert!(!line.contains(value), "{line}");
            assert!(line.contains("redacted"), "{line}");
        }
    }
}
