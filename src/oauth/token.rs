//! Tokens as the operator keeps them.

use jiff::Timestamp;

use super::secrets::{AccessToken, RefreshToken};

/// The answer of a token request. `Debug` is safe: the token types redact themselves.
#[derive(Clone, Debug)]
pub struct TokenSet {
    pub access_token: AccessToken,
    /// The rotated refresh token, when the server issued one (`offline_access`).
    pub refresh_token: Option<RefreshToken>,
    /// As the server spelled it (`bearer` on wgtwo).
    pub token_type: String,
    /// `expires_in` counted from when the answer arrived.
    pub expires_at: Option<Timestamp>,
    /// The granted scope, space separated, when the server said.
    pub scope: Option<String>,
    /// What the verified ID token says, when there was one.
    pub id_token: Option<IdTokenInfo>,
    /// Why an ID token that came with a refresh answer failed verification.
    pub id_token_error: Option<String>,
}

/// Verified claims of an ID token that the operator uses.
#[derive(Clone, Debug, PartialEq)]
pub struct IdTokenInfo {
    pub subject: String,
    /// E.164, as wgtwo sends it with the `phone` scope.
    pub phone_number: Option<String>,
    pub phone_number_verified: Option<bool>,
    pub nonce: Option<String>,
    pub expires_at: Option<Timestamp>,
}
