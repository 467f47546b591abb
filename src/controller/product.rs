//! Product tokens (the OAuth 2.0 client credentials grant): one token per identity service, client
//! and scope, shared by every grant that asks for the same one, in any namespace. Sharing gives no
//! grant anything its owner could not get: the key includes the client secret, which the grant's
//! own Secret must hold.
//!
//! Per key, one request at a time (single flight: concurrent reconciles wait for it and then use
//! its answer), and the last failure is shared too, so N grants cost one token request per lifetime
//! and one per backoff step, not N. Nothing rotates, so nothing needs a state Secret: after a
//! restart each grant keeps its published token until its schedule says otherwise.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::lineage::sha256_hex;
use super::schedule::{self, TokenTimes};
use crate::oauth::{ErrorClass, OAuthError, TokenSet};

/// A product token as issued.
#[derive(Clone, Debug)]
pub struct Issued {
    pub tokens: TokenSet,
    pub times: TokenTimes,
}

/// The last failed request of a key, and when the next may be sent.
#[derive(Clone, Debug)]
pub struct SharedFailure {
    pub error: OAuthError,
    /// Failed requests in a row.
    pub attempts: u32,
    pub retry_at: Timestamp,
}

/// What is known for one key.
#[derive(Default)]
pub struct Entry {
    token: Option<Issued>,
    failure: Option<SharedFailure>,
}

/// What a grant needs, reduced to what the decision takes.
#[derive(Clone, Copy, Debug)]
pub struct Want {
    /// The token the grant's target Secret holds.
    pub published: Option<TokenTimes>,
    pub refresh_before: Option<SignedDuration>,
    pub jitter_seed: u64,
    /// A refresh was requested by annotation: a new token, whatever is cached.
    pub forced: bool,
}

#[derive(Clone, Debug)]
pub enum Plan {
    /// A newer token than the grant's, which the grant's own schedule would keep.
    Reuse(Box<Issued>),
    /// The key's last request failed and its backoff has not passed.
    Failed(OAuthError),
    Request,
}

/// Where a grant's new token came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Requested,
    Shared,
}

/// Pure: whether a grant takes the cached token, the shared failure, or sends a request.
pub fn plan(entry: &Entry, want: &Want, now: Timestamp) -> Plan {
    if want.forced {
        return Plan::Request;
    }
    if let Some(token) = &entry.token {
        let newer = want.published.is_none_or(|p| token.times.issued_at > p.issued_at);
        let not_due = now < schedule::refresh_at(token.times, want.refresh_before, want.jitter_seed);
        if newer && not_due {
            return Plan::Reuse(Box::new(token.clone()));
        }
    }
    match &entry.failure {
        Some(f) if now < f.retry_at => Plan::Failed(f.error.clone()),
        _ => Plan::Request,
    }
}

/// How a failed request holds back the key: a refusal for `recheck` (a changed client Secret or
/// scope is another key, so a fix is tried at once), anything else for the backoff.
pub fn retry_at(
    error: &OAuthError,
    attempts: u32,
    (min, max): (Duration, Duration),
    recheck: Duration,
    random: f64,
    now: Timestamp,
) -> Timestamp {
    let delay = match error.class() {
        ErrorClass::Permanent => recheck,
        ErrorClass::Transient => {
            schedule::backoff_delay(attempts, min, max, random).max(error.retry_after().unwrap_or_default())
        }
    };
    now.checked_add(SignedDuration::try_from(delay).unwrap_or(SignedDuration::MAX)).unwrap_or(now)
}

/// The sharing key: issuer (with or without its trailing slash), client id, client secret, scope.
pub fn key(issuer: &str, client_id: &str, client_secret: &str, scope: Option<&str>) -> String {
    sha256_hex(&["client_credentials", issuer.trim_end_matches('/'), client_id, client_secret, scope.unwrap_or("")])
}

type Cell = Arc<tokio::sync::Mutex<Entry>>;

#[derive(Default)]
pub struct ProductTokens {
    entries: Mutex<HashMap<Arc<str>, Cell>>,
}

impl ProductTokens {
    /// A token for `want` under `key`: the cached one, the shared failure, or the answer of a request
    /// sent by `request` (while the key's lock is held, so concurrent callers wait and reuse it).
    /// `retry_at` says, for a failed request and the failures in a row, when the next may be sent.
    pub async fn token<R, F>(
        &self,
        key: &str,
        want: &Want,
        retry_at: impl FnOnce(&OAuthError, u32) -> Timestamp,
        request: R,
    ) -> (Result<Issued, OAuthError>, Source)
    where
        R: FnOnce() -> F,
        F: Future<Output = Result<Issued, OAuthError>>,
    {
        let cell = self.cell(key);
        let mut entry = cell.lock().await;
        match plan(&entry, want, Timestamp::now()) {
            Plan::Reuse(token) => (Ok(*token), Source::Shared),
            Plan::Failed(error) => (Err(error), Source::Shared),
            Plan::Request => {
                let answer = request().await;
                match &answer {
                    Ok(issued) => {
                        entry.token = Some(issued.clone());
                        entry.failure = None;
                    }
                    Err(error) => {
                        let attempts = entry.failure.as_ref().map_or(0, |f| f.attempts).saturating_add(1);
                        let retry_at = retry_at(error, attempts);
                        entry.failure = Some(SharedFailure { error: error.clone(), attempts, retry_at });
                    }
                }
                (answer, Source::Requested)
            }
        }
    }

    fn cell(&self, key: &str) -> Cell {
        let mut entries = self.entries.lock().unwrap();
        if let Some(cell) = entries.get(key) {
            return cell.clone();
        }
        // A new key (a new client, secret or scope): drop the keys nothing needs any more, so the
        // map holds what is in use, not every client secret ever seen.
        let now = Timestamp::now();
        entries.retain(|_, cell| Arc::strong_count(cell) > 1 || cell.try_lock().map_or(true, |e| !e.stale(now)));
        let cell = Cell::default();
        entries.insert(key.into(), cell.clone());
        cell
    }
}

impl Entry {
    /// Nothing left to share: no valid token, no failure still holding back requests.
    fn stale(&self, now: Timestamp) -> bool {
        self.token.as_ref().is_none_or(|t| t.times.expires_at <= now)
            && self.failure.as_ref().is_none_or(|f| f.retry_at <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::secrets::AccessToken;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn issued(issued_at: i64, lifetime: i64) -> Issued {
        Issued {
            tokens: TokenSet {
                access_token: AccessToken::new(format!("at-{issued_at}")),
                refresh_token: None,
                token_type: "bearer".into(),
                expires_at: Some(at(issued_at + lifetime)),
                scope: Some("a b".into()),
                id_token: None,
                id_token_error: None,
            },
            times: TokenTimes { issued_at: at(issued_at), expires_at: at(issued_at + lifetime) },
        }
    }

    fn want(published: Option<&Issued>) -> Want {
        Want { published: published.map(|p| p.times), refresh_before: None, jitter_seed: 0, forced: false }
    }

    fn entry(token: Option<Issued>, failure: Option<SharedFailure>) -> Entry {
        Entry { token, failure }
    }

    #[test]
    fn a_grant_takes_a_newer_cached_token_that_its_own_schedule_would_keep() {
        let cached = issued(600, 3600);
        let e = entry(Some(cached.clone()), None);
        // A new grant, and a grant whose own token is older: both take the cached one.
        assert!(matches!(plan(&e, &want(None), at(700)), Plan::Reuse(t) if t.times == cached.times));
        assert!(matches!(plan(&e, &want(Some(&issued(0, 3600))), at(2400)), Plan::Reuse(_)));
        // The grant already has it and it is due: a new request.
        assert!(matches!(plan(&e, &want(Some(&cached)), at(600 + 2400)), Plan::Request));
        // The cached token is itself due by this grant's schedule: a new request.
        assert!(matches!(plan(&e, &want(Some(&issued(0, 3600))), at(600 + 2400)), Plan::Request));
        // A larger refreshBefore makes the same token due earlier for this grant.
        let mut early = want(None);
        early.refresh_before = Some(SignedDuration::from_mins(50));
        assert!(matches!(plan(&e, &early, at(600 + 11 * 60)), Plan::Request));
        // A requested refresh always asks for a new token.
        let mut forced = want(Some(&issued(0, 3600)));
        forced.forced = true;
        assert!(matches!(plan(&e, &forced, at(700)), Plan::Request));
    }

    #[test]
    fn a_failure_is_shared_until_its_retry_time_and_a_valid_cached_token_goes_first() {
        let error = OAuthError::Status { operation: "client credentials", status: 503, retry_after: None };
        let failure = SharedFailure { error, attempts: 1, retry_at: at(10) };
        let failed = entry(None, Some(failure.clone()));
        assert!(matches!(plan(&failed, &want(None), at(5)), Plan::Failed(_)));
        assert!(matches!(plan(&failed, &want(None), at(10)), Plan::Request));
        let mut forced = want(None);
        forced.forced = true;
        assert!(matches!(plan(&failed, &forced, at(5)), Plan::Request), "a requested refresh tries again");
        let both = entry(Some(issued(0, 3600)), Some(failure));
        assert!(matches!(plan(&both, &want(None), at(5)), Plan::Reuse(_)));
    }

    #[test]
    fn a_refusal_holds_the_key_for_the_recheck_and_a_transient_failure_for_the_backoff() {
        let backoff = (Duration::from_secs(1), Duration::from_secs(300));
        let recheck = Duration::from_secs(1800);
        let refused =
            OAuthError::Rejected { operation: "client credentials", error: "invalid_client".into(), description: None };
        assert_eq!(retry_at(&refused, 1, backoff, recheck, 0.0, at(0)), at(1800));
        let unavailable = OAuthError::Status { operation: "client credentials", status: 503, retry_after: None };
        assert_eq!(retry_at(&unavailable, 1, backoff, recheck, 0.0, at(0)), at(1));
        assert_eq!(retry_at(&unavailable, 4, backoff, recheck, 0.0, at(0)), at(8));
        let throttled = OAuthError::Status {
            operation: "client credentials",
            status: 429,
            retry_after: Some(Duration::from_secs(60)),
        };
        assert_eq!(retry_at(&throttled, 1, backoff, recheck, 0.0, at(0)), at(60), "Retry-After is honoured");
    }

    #[test]
    fn the_key_separates_clients_secrets_and_scopes_and_ignores_a_trailing_slash() {
        let k = |issuer: &str, secret: &str, scope: Option<&str>| key(issuer, "id", secret, scope);
        let base = k("https://id.wgtwo.com", "s", Some("a b"));
        assert_eq!(base, k("https://id.wgtwo.com/", "s", Some("a b")));
        assert_ne!(base, k("https://id.wgtwo.com", "s2", Some("a b")), "a changed client secret is a new key");
        assert_ne!(base, k("https://id.wgtwo.com", "s", Some("a")));
        assert_ne!(base, k("https://id.wgtwo.com", "s", None));
        assert_ne!(base, key("https://id.wgtwo.com", "id2", "s", Some("a b")));
    }

    #[tokio::test]
    async fn concurrent_callers_of_one_key_share_one_request() {
        let tokens = Arc::new(ProductTokens::default());
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let now = Timestamp::now().as_second() - 1_700_000_000;
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (tokens, requests) = (tokens.clone(), requests.clone());
            tasks.push(tokio::spawn(async move {
                let never = |_: &OAuthError, _| Timestamp::now();
                let request = || async {
                    requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(issued(now, 3600))
                };
                tokens.token("k", &want(None), never, request).await
            }));
        }
        let mut sources = Vec::new();
        for task in tasks {
            let (answer, source) = task.await.unwrap();
            assert!(answer.is_ok());
            sources.push(source);
        }
        assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(sources.iter().filter(|s| **s == Source::Requested).count(), 1);
        // Another key is another request.
        let other = tokens.token("k2", &want(None), |_, _| Timestamp::now(), || async { Ok(issued(now, 3600)) }).await;
        assert_eq!(other.1, Source::Requested);
        assert_eq!(tokens.entries.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_failed_request_is_shared_and_keys_nothing_needs_are_dropped() {
        let tokens = ProductTokens::default();
        let refused =
            OAuthError::Rejected { operation: "client credentials", error: "invalid_client".into(), description: None };
        let later = |_: &OAuthError, _| Timestamp::now() + SignedDuration::from_secs(60);
        let (first, source) = tokens.token("bad", &want(None), later, || async { Err(refused.clone()) }).await;
        assert!(first.is_err() && source == Source::Requested);
        let (second, source) = tokens
            .token("bad", &want(None), later, || async { panic!("no second request while the refusal holds") })
            .await;
        assert_eq!(second.unwrap_err().oauth_error(), Some("invalid_client"));
        assert_eq!(source, Source::Shared);
        // An expired token and a lapsed failure keep nothing: a new key drops them.
        let past = |_: &OAuthError, _| Timestamp::now() - SignedDuration::from_secs(1);
        let _ = tokens.token("lapsed", &want(None), past, || async { Err(refused.clone()) }).await;
        let _ = tokens.token("expired", &want(None), past, || async { Ok(issued(-7200, 3600)) }).await;
        let now = Timestamp::now().as_second() - 1_700_000_000;
        let _ = tokens.token("new", &want(None), past, || async { Ok(issued(now, 3600)) }).await;
        let mut kept: Vec<String> = tokens.entries.lock().unwrap().keys().map(|k| k.to_string()).collect();
        kept.sort();
        assert_eq!(kept, ["bad", "new"]);
    }
}
