//! The refresh-token lineage. The user's Secret (`refreshTokenSecretRef`) holds where a lineage
//! starts; every refresh rotates the token, and the live one is kept in a Secret the operator owns
//! (the state Secret). The state records a fingerprint of the user's token it started from, so a
//! new value there (re-authorization) is adopted, while re-applying the old value is not mistaken
//! for one.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use sha2::{Digest, Sha256};

use crate::oauth::secrets::RefreshToken;

pub const KEY_REFRESH_TOKEN: &str = "refresh_token";
pub const KEY_SOURCE: &str = "source_sha256";
pub const KEY_FAILED: &str = "failed_sha256";
/// The resourceVersion of the user's Secret when the lineage was last checked against it: while the
/// Secret is at that version it need not be read again (also not after a restart).
pub const KEY_SOURCE_VERSION: &str = "source_resource_version";
pub const KEY_PHONE_NUMBER: &str = "phone_number";
/// The lineage (`source`) for which the phone number is known, so it is asked for once per
/// authorization, not on every refresh.
pub const KEY_PHONE_SOURCE: &str = "phone_source_sha256";

/// What the state Secret holds.
#[derive(Clone, Debug)]
pub struct RefreshState {
    pub refresh_token: RefreshToken,
    /// sha256 (hex) of the user-provided refresh token this lineage started from.
    pub source: String,
    /// See [`KEY_SOURCE_VERSION`].
    pub source_version: Option<String>,
    /// sha256 (hex) of the inputs of a request the server refused for good (`invalid_grant`, …):
    /// the same inputs are not sent again.
    pub failed: Option<String>,
    /// What the identity service said about the subscriber's phone number for this lineage:
    /// `None` while unknown, `Some(None)` when it has none.
    pub phone: Option<Option<String>>,
}

pub fn sha256_hex(parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The state Secret's name: `<grant>-wgtwo-state`, shortened with a hash when that would exceed
/// the 253-character limit of a name.
pub fn state_secret_name(grant: &str) -> String {
    const SUFFIX: &str = "-wgtwo-state";
    if grant.len() + SUFFIX.len() <= 253 {
        return format!("{grant}{SUFFIX}");
    }
    let hash = &sha256_hex(&[grant])[..10];
    let head = grant[..253 - SUFFIX.len() - 11].trim_end_matches(['-', '.']);
    format!("{head}-{hash}{SUFFIX}")
}

pub fn encode(state: &RefreshState) -> BTreeMap<String, ByteString> {
    let mut data = BTreeMap::from([
        (KEY_REFRESH_TOKEN.to_owned(), ByteString(state.refresh_token.secret().as_bytes().to_vec())),
        (KEY_SOURCE.to_owned(), ByteString(state.source.as_bytes().to_vec())),
    ]);
    if let Some(version) = &state.source_version {
        data.insert(KEY_SOURCE_VERSION.to_owned(), ByteString(version.as_bytes().to_vec()));
    }
    if let Some(failed) = &state.failed {
        data.insert(KEY_FAILED.to_owned(), ByteString(failed.as_bytes().to_vec()));
    }
    if let Some(phone) = &state.phone {
        data.insert(KEY_PHONE_SOURCE.to_owned(), ByteString(state.source.as_bytes().to_vec()));
        if let Some(number) = phone {
            data.insert(KEY_PHONE_NUMBER.to_owned(), ByteString(number.as_bytes().to_vec()));
        }
    }
    data
}

pub fn decode(data: &BTreeMap<String, ByteString>) -> Option<RefreshState> {
    let text = |key: &str| data.get(key).and_then(|v| String::from_utf8(v.0.clone()).ok()).filter(|s| !s.is_empty());
    let source = text(KEY_SOURCE)?;
    let phone = (text(KEY_PHONE_SOURCE).as_ref() == Some(&source)).then(|| text(KEY_PHONE_NUMBER));
    Some(RefreshState {
        refresh_token: RefreshToken::new(text(KEY_REFRESH_TOKEN)?),
        source,
        source_version: text(KEY_SOURCE_VERSION),
        failed: text(KEY_FAILED),
        phone,
    })
}

/// Which refresh token to use, given the user's and the state's.
#[derive(Debug)]
pub struct Chosen {
    pub refresh_token: RefreshToken,
    pub source: String,
    /// True when the user's token starts a new lineage (first use or re-authorization).
    pub adopted: bool,
    pub failed: Option<String>,
    /// The version of the user's Secret this choice was made at (recorded with the state).
    pub source_version: Option<String>,
}

/// The state's lineage, when the user's Secret is still at the version it was checked at (its
/// token need not be read).
pub fn unchanged(state: Option<&RefreshState>, user_secret_version: Option<&str>) -> bool {
    state.and_then(|s| s.source_version.as_deref()).is_some_and(|v| Some(v) == user_secret_version)
}

/// Continues the state's lineage without the user's token (see [`unchanged`]).
pub fn continued(state: RefreshState) -> Chosen {
    Chosen {
        refresh_token: state.refresh_token,
        source: state.source,
        adopted: false,
        failed: state.failed,
        source_version: None,
    }
}

pub fn choose(user_token: &str, state: Option<RefreshState>) -> Chosen {
    let source = sha256_hex(&[user_token]);
    match state {
        Some(state) if state.source == source => Chosen {
            refresh_token: state.refresh_token,
            source,
            adopted: false,
            failed: state.failed,
            source_version: None,
        },
        _ => Chosen {
            refresh_token: RefreshToken::new(user_token.to_owned()),
            source,
            adopted: true,
            failed: None,
            source_version: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(token: &str, source_of: &str) -> RefreshState {
        RefreshState {
            refresh_token: RefreshToken::new(token.into()),
            source: sha256_hex(&[source_of]),
            source_version: None,
            failed: None,
            phone: None,
        }
    }

    #[test]
    fn first_use_adopts_the_users_token() {
        let chosen = choose("user-token", None);
        assert!(chosen.adopted);
        assert_eq!(chosen.refresh_token.secret(), "user-token");
    }

    #[test]
    fn the_rotated_token_is_used_while_the_users_token_is_unchanged() {
        let chosen = choose("user-token", Some(state("rotated-3", "user-token")));
        assert!(!chosen.adopted);
        assert_eq!(chosen.refresh_token.secret(), "rotated-3");
    }

    #[test]
    fn a_new_users_token_starts_a_new_lineage() {
        let chosen = choose("new-user-token", Some(state("rotated-3", "user-token")));
        assert!(chosen.adopted);
        assert_eq!(chosen.refresh_token.secret(), "new-user-token");
    }

    #[test]
    fn the_users_secret_is_unchanged_only_at_the_recorded_version() {
        let mut s = state("rotated", "user");
        assert!(!unchanged(Some(&s), Some("7")), "no version recorded: read the Secret");
        s.source_version = Some("7".into());
        assert!(unchanged(Some(&s), Some("7")));
        assert!(!unchanged(Some(&s), Some("8")));
        assert!(!unchanged(Some(&s), None), "the user's Secret is gone");
        assert!(!unchanged(None, Some("7")));
        let back = decode(&encode(&s)).unwrap();
        assert_eq!(back.source_version.as_deref(), Some("7"));
        assert_eq!(continued(back).refresh_token.secret(), "rotated");
    }

    #[test]
    fn state_round_trips_and_incomplete_data_is_rejected() {
        let mut s = state("rotated", "user");
        s.failed = Some("abc".into());
        let back = decode(&encode(&s)).unwrap();
        assert_eq!(back.refresh_token.secret(), "rotated");
        assert_eq!(back.source, s.source);
        assert_eq!(back.failed.as_deref(), Some("abc"));
        let mut data = encode(&s);
        data.remove(KEY_SOURCE);
        assert!(decode(&data).is_none());
    }

    #[test]
    fn the_phone_number_is_known_per_lineage_including_knowing_there_is_none() {
        let mut s = state("rotated", "user");
        assert_eq!(decode(&encode(&s)).unwrap().phone, None, "unknown");
        s.phone = Some(Some("+4799999999".into()));
        assert_eq!(decode(&encode(&s)).unwrap().phone, Some(Some("+4799999999".into())));
        s.phone = Some(None);
        assert_eq!(decode(&encode(&s)).unwrap().phone, Some(None), "asked, and there is none");
        // Known for another lineage (the user re-authorized): unknown for this one.
        let mut data = encode(&RefreshState { phone: Some(Some("+47".into())), ..state("rotated", "user") });
        data.insert(KEY_SOURCE.into(), ByteString(sha256_hex(&["new-user"]).into_bytes()));
        assert_eq!(decode(&data).unwrap().phone, None);
    }

    #[test]
    fn state_names_fit_the_name_limit_and_stay_distinct() {
        assert_eq!(state_secret_name("alice"), "alice-wgtwo-state");
        let long_a = "a".repeat(250);
        let long_b = format!("{}b", "a".repeat(249));
        let (a, b) = (state_secret_name(&long_a), state_secret_name(&long_b));
        assert!(a.len() <= 253 && b.len() <= 253);
        assert_ne!(a, b);
    }

    #[test]
    fn hashing_separates_parts() {
        assert_ne!(sha256_hex(&["ab", "c"]), sha256_hex(&["a", "bc"]));
    }
}
