//! A client credentials token source that fetches a new token only when the cached one is about to
//! expire, as the SDK's cached token source does (2 minutes by default).

use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::Mutex;

use super::client::WgtwoClient;
use super::error::OAuthError;
use super::secrets::AccessToken;
use super::token::TokenSet;

/// The SDK's margin: a cached token that expires within this is replaced.
pub const DEFAULT_MARGIN: Duration = Duration::from_secs(120);

pub struct CachedTokenSource {
    client: WgtwoClient,
    scope: Option<String>,
    margin: Duration,
    cached: Mutex<Option<TokenSet>>,
}

impl CachedTokenSource {
    pub fn new(client: WgtwoClient, scope: Option<String>, margin: Duration) -> Self {
        Self { client, scope, margin, cached: Mutex::new(None) }
    }

    /// A token valid for at least the margin. Concurrent callers share one fetch.
    pub async fn token(&self) -> Result<AccessToken, OAuthError> {
        let mut cached = self.cached.lock().await;
        if let Some(tokens) = cached.as_ref()
            && !needs_new_token(tokens.expires_at, Timestamp::now(), self.margin)
        {
            return Ok(tokens.access_token.clone());
        }
        let tokens = self.client.client_credentials(self.scope.as_deref()).await?;
        let token = tokens.access_token.clone();
        *cached = Some(tokens);
        Ok(token)
    }
}

/// A token without a known expiry is used once only; otherwise it is replaced within `margin`.
pub fn needs_new_token(expires_at: Option<Timestamp>, now: Timestamp, margin: Duration) -> bool {
    match expires_at {
        None => true,
        Some(at) => now.checked_add(margin).map_or(true, |limit| limit >= at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_replaced_within_the_margin_and_kept_outside_it() {
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let at = |secs: i64| Some(Timestamp::from_second(1_700_000_000 + secs).unwrap());
        assert!(!needs_new_token(at(121), now, DEFAULT_MARGIN));
        assert!(needs_new_token(at(120), now, DEFAULT_MARGIN));
        assert!(needs_new_token(at(-1), now, DEFAULT_MARGIN));
        assert!(needs_new_token(None, now, DEFAULT_MARGIN));
    }
}
