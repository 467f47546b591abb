//! The commands people run against grants, like cert-manager's `cmctl`: `status`, `refresh` and
//! `revoke`. They run with the caller's own Kubernetes rights (never the operator's), and also as a
//! kubectl plugin (`kubectl wgtwo …` through a `kubectl-wgtwo` symlink).

pub mod refresh;
pub mod revoke;
pub mod status;

use anyhow::anyhow;
use jiff::{SignedDuration, Timestamp};

use crate::api::WgtwoGrant;
use crate::kubeapi::kube_message;

/// An API error as the command's error: the apiserver's own message (it names the user, verb and
/// resource of a 403), after what was being done.
pub(crate) fn api_error(doing: &str, err: kube::Error) -> anyhow::Error {
    match &err {
        kube::Error::Api(status) if status.code == 403 => {
            anyhow!("{doing}: forbidden: {} (ask for the RBAC rule it names)", status.message)
        }
        _ => anyhow!("{doing}: {}", kube_message(&err)),
    }
}

/// The grant, or an error that says it does not exist.
pub(crate) async fn get_grant(api: &kube::Api<WgtwoGrant>, namespace: &str, name: &str) -> anyhow::Result<WgtwoGrant> {
    api.get_opt(name)
        .await
        .map_err(|e| api_error(&format!("read WgtwoGrant {namespace}/{name}"), e))?
        .ok_or_else(|| anyhow!("WgtwoGrant {name} not found in namespace {namespace}"))
}

/// `at` relative to `now`, compactly: `in 39m`, `3m12s ago`.
pub fn relative(at: Timestamp, now: Timestamp) -> String {
    let d = at.duration_since(now);
    let compact = |d: SignedDuration| {
        let s = d.as_secs().unsigned_abs();
        match s {
            0..60 => format!("{s}s"),
            60..3600 => {
                format!("{}m{}", s / 60, if s.is_multiple_of(60) { String::new() } else { format!("{}s", s % 60) })
            }
            _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        }
    };
    if d.is_negative() { format!("{} ago", compact(d)) } else { format!("in {}", compact(d)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times_are_compact_both_ways() {
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let at = |s: i64| Timestamp::from_second(1_700_000_000 + s).unwrap();
        assert_eq!(relative(at(45), now), "in 45s");
        assert_eq!(relative(at(39 * 60), now), "in 39m");
        assert_eq!(relative(at(-(3 * 60 + 12)), now), "3m12s ago");
        assert_eq!(relative(at(2 * 3600 + 5 * 60), now), "in 2h5m");
    }
}
