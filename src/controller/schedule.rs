//! When to refresh: small pure functions, tested without a cluster (as cert-manager's renewal
//! policies are).
//!
//! Default: refresh when a third of the token's lifetime remains, i.e. 20 minutes before expiry for
//! wgtwo's 3600 s tokens. Workloads read the token from a mounted Secret, and kubelet can take a
//! minute or two (its sync period plus its cache's TTL) to show them a new one; a third of the lifetime
//! leaves every mounted token valid for ~18 minutes at worst, and one refresh per 40 minutes costs the
//! identity service little. Up to 10% of the interval is taken off at random (stable per grant and
//! token) so that grants created together do not refresh together.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// Fraction of the lifetime that must remain when the default schedule refreshes.
const DEFAULT_REMAINING: i32 = 3;
/// Share of the refresh interval used to spread refreshes, in per mille.
const JITTER_PER_MILLE: i64 = 100;

/// What the access token currently published looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenTimes {
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

/// Why a refresh happens now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshReason {
    /// No usable token is published yet (or the target Secret was deleted or edited).
    NoToken,
    /// A new refresh token was put into `refreshTokenSecretRef`.
    NewAuthorization,
    /// The `auth.wgtwo.com/refresh-requested-at` annotation changed.
    Requested,
    /// The scheduled time has come.
    Due,
}

impl RefreshReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshReason::NoToken => "no access token is published yet",
            RefreshReason::NewAuthorization => "a new refresh token was provided",
            RefreshReason::Requested => "a refresh was requested by annotation",
            RefreshReason::Due => "the access token is due for refresh",
        }
    }
}

/// Whether a successful refresh gets a Normal Event. Routine ones (the schedule, a grant's first
/// token) are in the status and the metrics: an Event each would be one more apiserver write per
/// refresh (15,000 Events an hour at 10,000 grants). Events mark what a person caused or should
/// see: a requested refresh, a new authorization, the end of a run of failures.
pub fn announce(why: RefreshReason, after_failures: bool) -> bool {
    after_failures || matches!(why, RefreshReason::Requested | RefreshReason::NewAuthorization)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    RefreshNow(RefreshReason),
    /// Nothing to do until this instant.
    WaitUntil(Timestamp),
    /// A refresh is due but the last attempts failed: wait for the backoff (kept in the status, so
    /// it survives restarts) before the next token request.
    BackingOff(Timestamp),
}

/// What the reconciler observed, reduced to what the decision needs.
#[derive(Clone, Copy, Debug)]
pub struct Observed {
    pub now: Timestamp,
    pub token: Option<TokenTimes>,
    pub new_authorization: bool,
    pub refresh_requested: bool,
    pub refresh_before: Option<SignedDuration>,
    /// Stable per grant; spreads refresh times (e.g. a hash of the grant's uid).
    pub jitter_seed: u64,
    /// After failed attempts: no token request before this instant.
    pub retry_not_before: Option<Timestamp>,
}

pub fn decide(o: &Observed) -> Decision {
    if o.new_authorization {
        return Decision::RefreshNow(RefreshReason::NewAuthorization);
    }
    let why = match o.token {
        None => RefreshReason::NoToken,
        Some(_) if o.refresh_requested => RefreshReason::Requested,
        Some(token) => {
            let at = refresh_at(token, o.refresh_before, o.jitter_seed);
            if o.now < at {
                return Decision::WaitUntil(at);
            }
            RefreshReason::Due
        }
    };
    // A new authorization (above) is a fresh start; anything else waits out the backoff.
    match o.retry_not_before {
        Some(at) if o.now < at => Decision::BackingOff(at),
        _ => Decision::RefreshNow(why),
    }
}

/// The delay before attempt `failed_attempts + 1`, after `failed_attempts` failures in a row:
/// `min` doubling up to `max`, with up to a quarter taken off at random (so grants that failed
/// together do not retry together). Computed from the count in the status, so a restart or a new
/// leader continues the backoff instead of starting it over; backon's builders hold their state in
/// an iterator, which a restart would lose.
pub fn backoff_delay(failed_attempts: u32, min: Duration, max: Duration, random: f64) -> Duration {
    let exponent = failed_attempts.saturating_sub(1).min(32);
    let full = min.saturating_mul(2u32.saturating_pow(exponent)).min(max).max(min);
    full.mul_f64(1.0 - 0.25 * random.clamp(0.0, 1.0)).max(min.min(full))
}

/// The instant to refresh a token.
///
/// `refresh_before` (default: a third of the lifetime) is clamped so that a refresh never comes
/// sooner than a tenth of the lifetime (at least 1 s) after the token was issued: a `refreshBefore`
/// as long as the lifetime would otherwise mean refreshing in a loop.
pub fn refresh_at(token: TokenTimes, refresh_before: Option<SignedDuration>, jitter_seed: u64) -> Timestamp {
    let lifetime = token.expires_at.duration_since(token.issued_at);
    if lifetime <= SignedDuration::ZERO {
        return token.issued_at;
    }
    let min_interval = (lifetime / 10).max(SignedDuration::from_secs(1)).min(lifetime);
    let before =
        refresh_before.unwrap_or(lifetime / DEFAULT_REMAINING).clamp(SignedDuration::ZERO, lifetime - min_interval);
    let interval = lifetime - before;
    let jitter_nanos = interval.as_nanos() * i128::from((jitter_seed % 1000) as i64 * JITTER_PER_MILLE) / 1_000_000;
    let jitter = SignedDuration::from_nanos(jitter_nanos as i64);
    token.expires_at - before - jitter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refreshes_a_person_caused_or_that_end_failures_are_announced() {
        assert!(!announce(RefreshReason::Due, false));
        assert!(!announce(RefreshReason::NoToken, false));
        assert!(announce(RefreshReason::Requested, false));
        assert!(announce(RefreshReason::NewAuthorization, false));
        assert!(announce(RefreshReason::Due, true));
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }
    fn hour_token() -> TokenTimes {
        TokenTimes { issued_at: t(0), expires_at: t(3600) }
    }
    fn secs(s: i64) -> SignedDuration {
        SignedDuration::from_secs(s)
    }
    fn observed(now: i64) -> Observed {
        Observed {
            now: t(now),
            token: Some(hour_token()),
            new_authorization: false,
            refresh_requested: false,
            refresh_before: None,
            jitter_seed: 0,
            retry_not_before: None,
        }
    }

    #[test]
    fn default_refreshes_an_hour_token_twenty_minutes_before_expiry() {
        assert_eq!(refresh_at(hour_token(), None, 0), t(2400));
    }

    #[test]
    fn refresh_before_is_honoured() {
        assert_eq!(refresh_at(hour_token(), Some(secs(5 * 60)), 0), t(3300));
        assert_eq!(refresh_at(hour_token(), Some(secs(50 * 60)), 0), t(600));
    }

    #[test]
    fn refresh_before_longer_than_the_lifetime_still_waits_a_tenth_of_it() {
        assert_eq!(refresh_at(hour_token(), Some(secs(2 * 3600)), 0), t(360));
        let short = TokenTimes { issued_at: t(0), expires_at: t(5) };
        assert_eq!(refresh_at(short, Some(secs(20 * 60)), 0), t(1), "at least one second");
    }

    #[test]
    fn jitter_only_moves_the_refresh_earlier_by_at_most_a_tenth_of_the_interval() {
        for seed in [1, 250, 999, 123_456_789] {
            let at = refresh_at(hour_token(), None, seed);
            assert!(at <= t(2400) && at >= t(2400 - 240), "{seed}: {at}");
        }
        assert_eq!(refresh_at(hour_token(), None, 999), refresh_at(hour_token(), None, 999), "stable");
        assert_ne!(refresh_at(hour_token(), None, 1), refresh_at(hour_token(), None, 500), "spread");
    }

    #[test]
    fn expired_or_zero_lifetime_tokens_are_refreshed_at_once() {
        let broken = TokenTimes { issued_at: t(10), expires_at: t(10) };
        assert_eq!(refresh_at(broken, None, 0), t(10));
    }

    #[test]
    fn a_valid_token_is_not_refreshed_before_its_time() {
        assert_eq!(decide(&observed(0)), Decision::WaitUntil(t(2400)));
        assert_eq!(decide(&observed(2399)), Decision::WaitUntil(t(2400)));
        assert_eq!(decide(&observed(2400)), Decision::RefreshNow(RefreshReason::Due));
        assert_eq!(decide(&observed(9999)), Decision::RefreshNow(RefreshReason::Due));
    }

    #[test]
    fn missing_token_new_authorization_and_requests_refresh_at_once() {
        let mut o = observed(0);
        o.token = None;
        assert_eq!(decide(&o), Decision::RefreshNow(RefreshReason::NoToken));
        let mut o = observed(0);
        o.refresh_requested = true;
        assert_eq!(decide(&o), Decision::RefreshNow(RefreshReason::Requested));
        let mut o = observed(0);
        o.new_authorization = true;
        o.refresh_requested = true;
        assert_eq!(decide(&o), Decision::RefreshNow(RefreshReason::NewAuthorization));
    }

    #[test]
    fn after_failures_a_due_refresh_waits_for_the_backoff_but_a_new_authorization_does_not() {
        let mut o = observed(2400);
        o.retry_not_before = Some(t(2410));
        assert_eq!(decide(&o), Decision::BackingOff(t(2410)));
        o.refresh_requested = true;
        assert_eq!(decide(&o), Decision::BackingOff(t(2410)), "a requested refresh waits too");
        o.token = None;
        assert_eq!(decide(&o), Decision::BackingOff(t(2410)));
        o.new_authorization = true;
        assert_eq!(decide(&o), Decision::RefreshNow(RefreshReason::NewAuthorization));
        let mut o = observed(2410);
        o.retry_not_before = Some(t(2410));
        assert_eq!(decide(&o), Decision::RefreshNow(RefreshReason::Due), "the backoff is over");
        let mut o = observed(0);
        o.retry_not_before = Some(t(10));
        assert_eq!(decide(&o), Decision::WaitUntil(t(2400)), "not due: the schedule, not the backoff");
    }

    #[test]
    fn backoff_doubles_from_min_to_max_and_jitter_only_shortens_it() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(300));
        let d = |n, r| backoff_delay(n, min, max, r);
        assert_eq!(d(1, 0.0), Duration::from_secs(1));
        assert_eq!(d(2, 0.0), Duration::from_secs(2));
        assert_eq!(d(5, 0.0), Duration::from_secs(16));
        assert_eq!(d(9, 0.0), Duration::from_secs(256));
        assert_eq!(d(10, 0.0), max);
        assert_eq!(d(u32::MAX, 0.0), max, "no overflow");
        assert_eq!(d(0, 0.0), min);
        assert_eq!(d(10, 1.0), Duration::from_secs(225));
        assert_eq!(d(1, 1.0), min, "never below min");
    }
}
