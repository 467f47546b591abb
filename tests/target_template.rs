//! `spec.target.template` end to end, against the real apiserver and Hydra: labels, annotations
//! and rendered keys on the target Secret, kept current at every refresh and on every template
//! change; a broken template is refused at apply time where the schema can, and otherwise is a
//! condition that never stops the token's renewal; no template can emit the refresh token or the
//! client secret.

mod support;

use std::time::{Duration, Instant};

use kube::api::PostParams;
use support::{Env, ttl};
use wgtwo_operator::api::{TargetTemplate, WgtwoGrant};

fn template(labels: &[(&str, &str)], annotations: &[(&str, &str)], data: &[(&str, &str)]) -> TargetTemplate {
    let map = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    TargetTemplate { labels: map(labels), annotations: map(annotations), data: map(data) }
}

async fn target(env: &Env, grant: &str) -> k8s_openapi::api::core::v1::Secret {
    env.secrets().get(&format!("{grant}-token")).await.unwrap()
}

fn text(secret: &k8s_openapi::api::core::v1::Secret, key: &str) -> Option<String> {
    secret.data.as_ref()?.get(key).map(|v| String::from_utf8(v.0.clone()).unwrap())
}

async fn set_template(env: &Env, grant: &str, t: &TargetTemplate) {
    // Replaced as a whole (a merge patch would keep the keys the new template drops).
    let mut grant = env.grants().get(grant).await.unwrap();
    grant.spec.target.template = Some(t.clone());
    env.grants().replace(&grant.metadata.name.clone().unwrap(), &PostParams::default(), &grant).await.unwrap();
}

async fn wait_for<F: std::future::Future<Output = bool>>(what: &str, timeout: Duration, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_annotations_and_rendered_keys_follow_every_refresh_and_template_change_and_never_hold_secrets() {
    // 12 s tokens: a refresh about every 8 s.
    let mut env = Env::start(ttl(12)).await;
    let refresh_token = env.authorize("alice").await;
    let t = template(
        &[("app.kubernetes.io/part-of", "team-a")],
        &[("reloader.stakater.com/match", "true")],
        &[
            ("authorization", "{{ token_type }} {{ access_token }}"),
            (
                "credentials.json",
                r#"{"access_token": {{ access_token | tojson }}, "expires_at": {{ expires_at_unix }}}"#,
            ),
            // Everything a template can reach at all.
            ("context", "{{ debug() }}"),
        ],
    );
    env.create_grant("alice", &refresh_token, |spec| spec.target.template = Some(t.clone())).await;
    let _operator = env.start_operator();
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;

    let check = |secret: &k8s_openapi::api::core::v1::Secret| {
        let token = text(secret, "access_token").unwrap();
        assert_eq!(text(secret, "authorization").unwrap(), format!("Bearer {token}"));
        let json: serde_json::Value = serde_json::from_str(&text(secret, "credentials.json").unwrap()).unwrap();
        assert_eq!(json["access_token"], token.as_str());
        let expires: jiff::Timestamp = text(secret, "expires_at").unwrap().parse().unwrap();
        assert_eq!(json["expires_at"], expires.as_second());
        token
    };
    let first = target(&env, "alice").await;
    let first_token = check(&first);
    let labels = first.metadata.labels.clone().unwrap();
    assert_eq!(labels["app.kubernetes.io/part-of"], "team-a");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "wgtwo-operator", "the operator's labels stay");
    assert_eq!(first.metadata.annotations.as_ref().unwrap()["reloader.stakater.com/match"], "true");

    // A refresh re-renders every key with the new token.
    wait_for("a refresh", Duration::from_secs(20), || async {
        text(&target(&env, "alice").await, "access_token").unwrap() != first_token
    })
    .await;
    let refreshed = target(&env, "alice").await;
    let second_token = check(&refreshed);
    assert!(env.active(&second_token).await);

    // Nothing a template reaches holds the refresh token or the client secret.
    let live = env.live_refresh_token("alice").await.unwrap();
    for (key, value) in refreshed.data.as_ref().unwrap() {
        let value = String::from_utf8_lossy(&value.0);
        for secret in [live.as_str(), refresh_token.as_str(), env.client.client_secret.as_str()] {
            assert!(!value.contains(secret), "{key} holds a secret it must not");
        }
    }
    assert!(text(&refreshed, "context").unwrap().contains(&second_token), "debug() shows the context it had");

    // A changed template is applied to the published token without a token request.
    wait_for("a quiet moment", Duration::from_secs(20), || async {
        let s = env.status("alice").await.unwrap();
        let next = s.next_refresh_time.unwrap().0;
        next.duration_since(jiff::Timestamp::now()) > jiff::SignedDuration::from_secs(5)
    })
    .await;
    let requests = env.hydra.token_requests();
    let current = text(&target(&env, "alice").await, "access_token").unwrap();
    let changed = template(&[("tier", "backend")], &[], &[("header", "Authorization: Bearer {{ access_token }}")]);
    set_template(&env, "alice", &changed).await;
    wait_for("the new template applied", Duration::from_secs(3), || async {
        text(&target(&env, "alice").await, "header").is_some()
    })
    .await;
    let applied = target(&env, "alice").await;
    assert_eq!(text(&applied, "access_token").unwrap(), current, "the same token");
    assert_eq!(text(&applied, "header").unwrap(), format!("Authorization: Bearer {current}"));
    assert_eq!(text(&applied, "authorization"), None, "keys the template no longer has are gone");
    let labels = applied.metadata.labels.clone().unwrap();
    assert_eq!(labels.get("tier").map(String::as_str), Some("backend"));
    assert!(!labels.contains_key("app.kubernetes.io/part-of"), "{labels:?}");
    assert!(!applied.metadata.annotations.as_ref().unwrap().contains_key("reloader.stakater.com/match"));
    assert_eq!(env.hydra.token_requests(), requests, "no token request to apply a template");
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_template_is_refused_at_apply_time_or_is_a_condition_while_the_token_is_still_renewed() {
    let mut env = Env::start(ttl(3600)).await;
    let refresh_token = env.authorize("bob").await;

    // What the schema can check is refused by the apiserver, naming the field.
    let mut refused = Vec::new();
    for (i, bad) in [
        template(&[], &[], &[("access_token", "{{ access_token }}")]),
        template(&[], &[], &[("token.json", "{}")]),
        template(&[("team", "not a label value")], &[], &[]),
        template(&[("app.kubernetes.io/managed-by", "me")], &[], &[]),
        template(&[], &[("auth.wgtwo.com/refreshed-at", "x")], &[]),
        template(&[], &[], &[("bad/key", "x")]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut grant: WgtwoGrant = serde_json::from_value(serde_json::json!({
            "apiVersion": "auth.wgtwo.com/v1alpha1", "kind": "WgtwoGrant",
            "metadata": {"name": format!("bad-{i}")},
            "spec": {"clientSecretRef": {"name": "wgtwo-client"}, "refreshTokenSecretRef": {"name": "x"},
                     "target": {"secretName": "t"}}
        }))
        .unwrap();
        grant.spec.target.template = Some(bad);
        let err = env.grants().create(&PostParams::default(), &grant).await.unwrap_err().to_string();
        assert!(err.contains("spec.target.template"), "{err}");
        refused.push(err);
    }
    assert!(refused[0].contains("cannot be templated"), "{}", refused[0]);
    assert!(refused[2].contains("label values"), "{}", refused[2]);

    // What only a template engine can check is a condition; the token is renewed all the same.
    let broken = template(&[("team", "b")], &[], &[("authorization", "Bearer {{ refresh_token }}")]);
    env.create_grant("bob", &refresh_token, |spec| spec.target.template = Some(broken.clone())).await;
    let (_operator, port) = env.start_operator_with(&[]);
    env.wait_ready("bob", "False", "TemplateInvalid", Duration::from_secs(30)).await;
    let status = env.status("bob").await.unwrap();
    let message = status.conditions[0].message.clone();
    assert!(message.contains("spec.target.template.data[authorization]: unknown variable refresh_token"), "{message}");
    assert!(message.contains("still renewed"), "{message}");
    assert!(status.expires_at.is_some());
    let published = target(&env, "bob").await;
    let token = text(&published, "access_token").unwrap();
    assert!(env.active(&token).await, "the token is published under its standard key");
    assert_eq!(text(&published, "authorization"), None);
    assert!(!published.metadata.labels.unwrap().contains_key("team"), "nothing of a broken template");
    let events = env.events("bob").await;
    assert!(events.iter().any(|(reason, _)| reason == "TemplateInvalid"), "{events:?}");

    // No hot loop: nothing more is requested or written while nothing changes.
    let requests = env.hydra.token_requests();
    let before = support::metric(&support::scrape(port).await, "wgtwo_operator_reconciles_total", &[]);
    let version = published.metadata.resource_version.clone();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = support::metric(&support::scrape(port).await, "wgtwo_operator_reconciles_total", &[]);
    assert!(after - before <= 1.0, "{before} -> {after} reconciles in 4 s with nothing changing");
    assert_eq!(env.hydra.token_requests(), requests);
    assert_eq!(target(&env, "bob").await.metadata.resource_version, version);

    // Fixed: applied to the same token, Ready again, without a token request.
    let fixed = template(&[("team", "b")], &[], &[("authorization", "Bearer {{ access_token }}")]);
    set_template(&env, "bob", &fixed).await;
    env.wait_ready("bob", "True", "Refreshed", Duration::from_secs(10)).await;
    let applied = target(&env, "bob").await;
    assert_eq!(text(&applied, "authorization").unwrap(), format!("Bearer {token}"));
    assert_eq!(applied.metadata.labels.unwrap()["team"], "b");
    assert_eq!(env.hydra.token_requests(), requests);
}

/// The attack of issue 23: one template that fails for some tokens and not for others turns each
/// grant's status into an oracle on its token (a character per edit, for an author who may not read
/// Secrets). The template engine never sees the token, so every grant ends the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_with_one_template_and_different_tokens_get_identical_status_and_events() {
    const GRANTS: usize = 10;
    let mut env = Env::start(ttl(3600)).await;
    // Splits Hydra's random tokens (base64url after `ory_at_`) 38:26: on a template engine that sees
    // the token, all ten grants would end alike only by a chance of 1 in 190.
    let oracle =
        template(&[], &[], &[("probe", "{% if access_token[9] < 'a' %}{{ access_token | int }}{% endif %}ok")]);
    let names: Vec<String> = (0..GRANTS).map(|i| format!("g{i}")).collect();
    for name in &names {
        let refresh_token = env.authorize(name).await;
        env.create_grant(name, &refresh_token, |spec| spec.target.template = Some(oracle.clone())).await;
    }
    // And an annotation that would have a replicator copy the target into another namespace.
    let replicate = template(&[], &[("replicator.v1.mittwald.de/replicate-to", "mallory")], &[]);
    let refresh_token = env.authorize("copied").await;
    env.create_grant("copied", &refresh_token, |spec| spec.target.template = Some(replicate.clone())).await;
    // One reconcile at a time: Hydra on SQLite answers some concurrent token requests with a 500,
    // whose retry Events would differ between grants for reasons unrelated to templates.
    let (_operator, _) = env.start_operator_with(&["--concurrency", "1"]);

    for name in &names {
        let deadline = Instant::now() + Duration::from_secs(60);
        while env.status(name).await.and_then(|s| s.expires_at).is_none() {
            assert!(Instant::now() < deadline, "{name} got no token");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The Events of the last reconciles are written after their status.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut seen = Vec::new();
    for name in &names {
        let status = env.status(name).await.unwrap();
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap().clone();
        let token = text(&target(&env, name).await, "access_token").unwrap();
        let own = |s: &str| {
            s.replace(&format!("{name}-token"), "TARGET")
                .replace(&status.expires_at.as_ref().unwrap().0.to_string(), "EXPIRY")
        };
        let mut events: Vec<String> =
            env.events(name).await.into_iter().map(|(reason, note)| format!("{reason}: {}", own(&note))).collect();
        events.sort();
        seen.push((name.clone(), token, ready.status, ready.reason, own(&ready.message), events));
    }
    let tokens: std::collections::BTreeSet<_> = seen.iter().map(|s| &s.1).collect();
    assert_eq!(tokens.len(), GRANTS, "each grant has its own token");
    for s in &seen[1..] {
        assert_eq!(
            (&s.2, &s.3, &s.4, &s.5),
            (&seen[0].2, &seen[0].3, &seen[0].4, &seen[0].5),
            "{} differs from {}",
            s.0,
            seen[0].0
        );
    }
    assert_eq!((seen[0].2.as_str(), seen[0].3.as_str()), ("True", "Refreshed"), "{seen:?}");
    for (name, token, ..) in &seen {
        assert_eq!(text(&target(&env, name).await, "probe").as_deref(), Some("ok"), "{name}");
        assert!(env.active(token).await);
    }

    env.wait_ready("copied", "False", "TemplateInvalid", Duration::from_secs(30)).await;
    let message = env.status("copied").await.unwrap().conditions[0].message.clone();
    assert!(
        message.contains(
            "annotations[replicator.v1.mittwald.de/replicate-to]: the prefix replicator.v1.mittwald.de is not allowed"
        ),
        "{message}"
    );
    let copied = target(&env, "copied").await;
    assert!(
        !copied.metadata.annotations.unwrap_or_default().contains_key("replicator.v1.mittwald.de/replicate-to"),
        "the refused annotation is not written"
    );
}
