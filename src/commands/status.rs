//! `wgtwo-operator status [NAME] [-n NS | -A]`: one line per grant, like `cmctl status`.

use std::fmt::Write as _;

use jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use super::{api_error, get_grant, relative};
use crate::api::WgtwoGrant;
use crate::controller::status::READY;

/// Where to look.
pub enum Scope {
    Namespace(String),
    AllNamespaces,
}

/// Prints the grants' status table (and, for one grant, its Ready message).
pub async fn run(
    client: kube::Client,
    scope: Scope,
    name: Option<&str>,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let grants = match (&scope, name) {
        (Scope::Namespace(ns), Some(name)) => vec![get_grant(&Api::namespaced(client, ns), ns, name).await?],
        (Scope::AllNamespaces, Some(_)) => anyhow::bail!("name a grant together with -n NAMESPACE, not -A"),
        (Scope::Namespace(ns), None) => {
            let api: Api<WgtwoGrant> = Api::namespaced(client, ns);
            api.list(&ListParams::default())
                .await
                .map_err(|e| api_error(&format!("list WgtwoGrants in {ns}"), e))?
                .items
        }
        (Scope::AllNamespaces, None) => {
            let api: Api<WgtwoGrant> = Api::all(client);
            api.list(&ListParams::default())
                .await
                .map_err(|e| api_error("list WgtwoGrants in all namespaces", e))?
                .items
        }
    };
    if grants.is_empty() {
        match &scope {
            Scope::Namespace(ns) => writeln!(out, "No WgtwoGrants in namespace {ns}.")?,
            Scope::AllNamespaces => writeln!(out, "No WgtwoGrants.")?,
        }
        return Ok(());
    }
    let all = matches!(scope, Scope::AllNamespaces);
    write!(out, "{}", table(&grants, Timestamp::now(), all))?;
    if let [grant] = grants.as_slice()
        && name.is_some()
        && let Some(c) = ready(grant)
    {
        writeln!(out, "\n{}: {}", c.reason, c.message)?;
    }
    Ok(())
}

fn ready(grant: &WgtwoGrant) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    grant.status.as_ref()?.conditions.iter().find(|c| c.type_ == READY)
}

/// The table: NAME, TYPE, READY, REASON, EXPIRES, NEXT REFRESH (and NAMESPACE first with `all`),
/// aligned like kubectl's. A grant the operator has not looked at yet shows `-`.
pub fn table(grants: &[WgtwoGrant], now: Timestamp, all: bool) -> String {
    let mut rows =
        vec![["NAMESPACE", "NAME", "TYPE", "READY", "REASON", "EXPIRES", "NEXT REFRESH"].map(String::from).to_vec()];
    for g in grants {
        let status = g.status.as_ref();
        let condition = ready(g);
        let when = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
            t.map(|t| relative(t.0, now)).unwrap_or_else(|| "-".into())
        };
        let stale = status.and_then(|s| s.observed_generation).is_some_and(|o| Some(o) < g.metadata.generation);
        let reason = condition.map(|c| c.reason.clone()).unwrap_or_else(|| "-".into());
        rows.push(vec![
            g.namespace().unwrap_or_default(),
            g.name_any(),
            g.spec.grant_type().as_str().to_owned(),
            condition.map(|c| c.status.clone()).unwrap_or_else(|| "-".into()),
            // The status describes an older spec: say so rather than pass it off as current.
            if stale { format!("{reason} (spec changed since)") } else { reason },
            when(status.and_then(|s| s.expires_at.as_ref())),
            when(status.and_then(|s| s.next_refresh_time.as_ref())),
        ]);
    }
    let skip = usize::from(!all);
    let widths: Vec<usize> = (0..7).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = (skip..7).map(|i| format!("{:<w$}", row[i], w = widths[i])).collect();
        let _ = writeln!(out, "{}", cells.join("   ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::WgtwoGrantStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn grant(name: &str, json: serde_json::Value) -> WgtwoGrant {
        let mut g: WgtwoGrant = serde_json::from_value(serde_json::json!({
            "apiVersion": "auth.wgtwo.com/v1alpha1", "kind": "WgtwoGrant",
            "metadata": {"name": name, "namespace": "team-a", "generation": 1},
            "spec": json,
        }))
        .unwrap();
        g.status = None;
        g
    }

    #[test]
    fn one_aligned_line_per_grant_with_type_ready_reason_expiry_and_next_refresh() {
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let at = |s: i64| Some(Time(Timestamp::from_second(1_700_000_000 + s).unwrap()));
        let mut alice = grant(
            "alice",
            serde_json::json!({"clientSecretRef": {"name": "c"}, "refreshTokenSecretRef": {"name": "r"}, "target": {"secretName": "t"}}),
        );
        alice.status = Some(WgtwoGrantStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "Refreshed".into(),
                message: "ok".into(),
                last_transition_time: Time(now),
                observed_generation: Some(1),
            }],
            expires_at: at(3600),
            next_refresh_time: at(2400),
            observed_generation: Some(1),
            ..Default::default()
        });
        let mut product = grant(
            "product",
            serde_json::json!({"clientSecretRef": {"name": "c"}, "clientCredentials": {}, "target": {"secretName": "p"}}),
        );
        product.metadata.generation = Some(2);
        product.status = Some(WgtwoGrantStatus { observed_generation: Some(1), ..Default::default() });
        let new = grant(
            "new",
            serde_json::json!({"clientSecretRef": {"name": "c"}, "clientCredentials": {}, "target": {"secretName": "n"}}),
        );
        let text = table(&[alice, product, new], now, false);
        assert_eq!(
            text,
            "NAME      TYPE                 READY   REASON                   EXPIRES   NEXT REFRESH\n\
             alice     refresh_token        True    Refreshed                in 1h0m   in 40m\n\
             product   client_credentials   -       - (spec changed since)   -         -\n\
             new       client_credentials   -       -                        -         -\n"
        );
        let all = table(
            &[grant(
                "x",
                serde_json::json!({"clientSecretRef": {"name": "c"}, "clientCredentials": {}, "target": {"secretName": "n"}}),
            )],
            now,
            true,
        );
        assert!(all.starts_with("NAMESPACE   NAME"), "{all}");
        assert!(all.contains("team-a      x"), "{all}");
    }
}
