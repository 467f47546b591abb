//! Product tokens (clientCredentials grants) end to end: the operator binary against a real
//! kube-apiserver and a real Ory Hydra, every token request counted at a proxy in front of Hydra
//! (not in the operator).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::api::{Api, PostParams};
use support::{Env, NS, metric, scrape};
use wgtwo_operator::api::{ClientCredentials, ClientSecretRef, TargetSecret, WgtwoGrant, WgtwoGrantSpec};
use wgtwo_testenv::recording_proxy::TokenRequest;
use wgtwo_testenv::{HydraOptions, OAuthClient};

const PRODUCT_SCOPE: &str = "a b";

fn hydra_options(ttl: Duration) -> HydraOptions {
    HydraOptions { access_token_ttl: ttl, recording_proxy: true, ..Default::default() }
}

/// A Hydra client of a product: client credentials only, scopes `a b`.
async fn product_client(env: &Env) -> OAuthClient {
    env.hydra.create_client_with(&[], &["client_credentials"], PRODUCT_SCOPE).await.unwrap()
}

async fn put_client_secret(env: &Env, ns: &str, name: &str, client_id: &str, client_secret: &str) {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(env.kube.clone(), ns);
    let secret = wgtwo_testenv::string_secret(name, &[("client_id", client_id), ("client_secret", client_secret)]);
    secrets.create(&PostParams::default(), &secret).await.unwrap();
}

async fn create_product_grant(env: &Env, ns: &str, name: &str, client_secret: &str, scope: Option<&str>) {
    let spec = WgtwoGrantSpec {
        issuer_url: env.hydra.base_url(),
        client_secret_ref: ClientSecretRef { name: client_secret.into() },
        refresh_token_secret_ref: None,
        client_credentials: Some(ClientCredentials {}),
        target: TargetSecret { secret_name: format!("{name}-token"), template: None },
        scope: scope.map(Into::into),
        refresh_before: None,
    };
    let grants: Api<WgtwoGrant> = Api::namespaced(env.kube.clone(), ns);
    grants.create(&PostParams::default(), &WgtwoGrant::new(name, spec)).await.unwrap();
}

/// Client credentials requests Hydra received, as the proxy saw them.
fn product_requests(env: &Env) -> Vec<TokenRequest> {
    let requests = env.hydra.recording_proxy().token_requests();
    requests.into_iter().filter(|r| r.grant_type == "client_credentials").collect()
}

/// Product requests by scope.
fn by_scope(requests: &[TokenRequest]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in requests {
        *counts.entry(r.scope.clone().unwrap_or_default()).or_default() += 1;
    }
    counts
}

/// A key of the grant's target Secret, in any namespace.
async fn target_value(env: &Env, ns: &str, grant: &str, key: &str) -> Option<String> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(env.kube.clone(), ns);
    let secret = secrets.get_opt(&format!("{grant}-token")).await.unwrap()?;
    secret.data?.get(key).map(|v| String::from_utf8(v.0.clone()).unwrap())
}

async fn status(env: &Env, ns: &str, grant: &str) -> wgtwo_operator::api::WgtwoGrantStatus {
    let grants: Api<WgtwoGrant> = Api::namespaced(env.kube.clone(), ns);
    grants.get_status(grant).await.unwrap().status.unwrap_or_default()
}

/// The Ready condition's (status, reason, message).
async fn ready(env: &Env, ns: &str, grant: &str) -> Option<(String, String, String)> {
    let s = status(env, ns, grant).await;
    s.conditions.into_iter().find(|c| c.type_ == "Ready").map(|c| (c.status, c.reason, c.message))
}

async fn wait_reason(env: &Env, ns: &str, grant: &str, want: (&str, &str), timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let now = ready(env, ns, grant).await;
        if let Some((s, r, message)) = &now
            && (s.as_str(), r.as_str()) == want
        {
            return message.clone();
        }
        assert!(Instant::now() < deadline, "{ns}/{grant}: Ready is {now:?}, wanted {want:?} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_product_grant_publishes_an_active_token_with_its_scope_and_replaces_it_before_expiry() {
    let mut env = Env::start(hydra_options(Duration::from_secs(10))).await;
    let client = product_client(&env).await;
    put_client_secret(&env, NS, "product-client", &client.client_id, &client.client_secret).await;
    create_product_grant(&env, NS, "product", "product-client", Some(PRODUCT_SCOPE)).await;
    let _operator = env.start_operator();
    wait_reason(&env, NS, "product", ("True", "Refreshed"), Duration::from_secs(30)).await;

    let secret = env.secrets().get("product-token").await.unwrap();
    let keys: Vec<&str> = secret.data.as_ref().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["access_token", "expires_at", "scope", "token_type"], "no phone_number, no refresh token");
    assert_eq!(env.secret_value("product-token", "scope").await.as_deref(), Some(PRODUCT_SCOPE));
    assert_eq!(env.secret_value("product-token", "token_type").await.as_deref(), Some("Bearer"));
    assert!(env.secrets().get_opt("product-wgtwo-state").await.unwrap().is_none(), "nothing rotates: no state");
    let s = status(&env, NS, "product").await;
    assert_eq!(s.grant_type.as_deref(), Some("client_credentials"));
    assert_eq!((s.scope.as_deref(), s.subject.as_deref()), (Some(PRODUCT_SCOPE), None));

    // Over several 10 s lifetimes: at every sample the published token has not expired, and each
    // new token is active at Hydra, for the product's client and scope, before the last expires.
    let mut tokens: Vec<(String, Timestamp)> = Vec::new();
    let end = Instant::now() + Duration::from_secs(32);
    while Instant::now() < end {
        let token = env.secret_value("product-token", "access_token").await.unwrap();
        let expires: Timestamp = env.secret_value("product-token", "expires_at").await.unwrap().parse().unwrap();
        let now = Timestamp::now();
        assert!(expires > now, "the published token expired at {expires} (now {now})");
        if tokens.last().is_none_or(|(last, _)| *last != token) {
            if let Some((_, previous_expiry)) = tokens.last() {
                assert!(now < *previous_expiry, "replaced only after the previous token expired");
            }
            let introspected = env.hydra.introspect(&token).await.unwrap();
            assert_eq!(introspected["active"], true, "{introspected}");
            assert_eq!(introspected["scope"], PRODUCT_SCOPE);
            assert_eq!(introspected["client_id"], client.client_id.as_str());
            tokens.push((token, expires));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(tokens.len() >= 4, "{} tokens in 32 s of 10 s lifetimes", tokens.len());
    let requests = product_requests(&env);
    assert_eq!(requests.len(), tokens.len(), "one request per token: {requests:?}");
    assert!(requests.iter().all(|r| r.scope.as_deref() == Some(PRODUCT_SCOPE) && r.status == Some(200)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_with_the_same_client_and_scope_share_one_token_request_per_lifetime_across_namespaces() {
    let mut env = Env::start(hydra_options(Duration::from_secs(15))).await;
    env.watch_namespace = None;
    env.cp.create_namespace("team-b").await.unwrap();
    let client = product_client(&env).await;
    for ns in [NS, "team-b"] {
        put_client_secret(&env, ns, "product-client", &client.client_id, &client.client_secret).await;
    }
    let shared = [(NS, "p1"), (NS, "p2"), ("team-b", "p3")];
    for (ns, name) in shared {
        create_product_grant(&env, ns, name, "product-client", Some(PRODUCT_SCOPE)).await;
    }
    create_product_grant(&env, NS, "other", "product-client", Some("a")).await;
    // Someone in team-b who knows the client id but not its secret asks for the same scope: the
    // shared token is keyed by the secret too, so they get a refusal, not the token.
    put_client_secret(&env, "team-b", "guessed-client", &client.client_id, "guessed").await;
    create_product_grant(&env, "team-b", "intruder", "guessed-client", Some(PRODUCT_SCOPE)).await;
    let all = [shared[0], shared[1], shared[2], (NS, "other")];
    let (_operator, port) = env.start_operator_with(&[]);

    // Two generations of every grant's token: first issue, then one renewal each.
    let mut first = BTreeMap::new();
    for (ns, name) in all {
        wait_reason(&env, ns, name, ("True", "Refreshed"), Duration::from_secs(30)).await;
        first.insert(name, status(&env, ns, name).await.last_refresh_time.unwrap().0);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut renewed = 0;
        for (ns, name) in all {
            renewed += usize::from(status(&env, ns, name).await.last_refresh_time.unwrap().0 > first[name]);
        }
        if renewed == all.len() {
            break;
        }
        assert!(Instant::now() < deadline, "only {renewed} of 4 grants renewed within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (requests, refused): (Vec<_>, Vec<_>) = product_requests(&env).into_iter().partition(|r| r.status == Some(200));
    let counts = by_scope(&requests);
    println!("client credentials requests over two generations: {counts:?} (4 grants; 3 share `a b`)");
    assert_eq!(counts, BTreeMap::from([("a".to_owned(), 2), (PRODUCT_SCOPE.to_owned(), 2)]), "{requests:?}");
    assert!(requests.iter().all(|r| r.client_id.as_deref() == Some(client.client_id.as_str())));
    assert_eq!(refused.len(), 1, "the intruder's one refused request: {refused:?}");
    wait_reason(&env, "team-b", "intruder", ("False", "InvalidClient"), Duration::from_secs(10)).await;
    assert_eq!(target_value(&env, "team-b", "intruder", "access_token").await, None, "the intruder got a token");

    // The three sharing grants hold the same token, in both namespaces; the other scope its own.
    let mut published = BTreeSet::new();
    for (ns, name) in shared {
        published.insert(target_value(&env, ns, name, "access_token").await.unwrap());
    }
    assert_eq!(published.len(), 1, "the grants sharing a key publish one token");
    let other = target_value(&env, NS, "other", "access_token").await.unwrap();
    assert!(!published.contains(&other));
    assert_eq!(target_value(&env, NS, "other", "scope").await.as_deref(), Some("a"));

    // The metrics show the sharing: requests sent vs tokens published.
    let text = scrape(port).await;
    let sent = metric(&text, "wgtwo_operator_token_requests_total", &[("grant_type", "client_credentials")]);
    let shared_published = metric(
        &text,
        "wgtwo_operator_tokens_published_total",
        &[("grant_type", "client_credentials"), ("source", "shared")],
    );
    let requested_published = metric(
        &text,
        "wgtwo_operator_tokens_published_total",
        &[("grant_type", "client_credentials"), ("source", "requested")],
    );
    assert_eq!((sent, requested_published, shared_published), (5.0, 4.0, 4.0), "{text}");
    assert_eq!(metric(&text, "wgtwo_operator_token_requests_total", &[("grant_type", "refresh_token")]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_valid_product_tokens_are_kept_without_a_token_request() {
    let mut env = Env::start(hydra_options(Duration::from_secs(3600))).await;
    let client = product_client(&env).await;
    put_client_secret(&env, NS, "product-client", &client.client_id, &client.client_secret).await;
    for name in ["p1", "p2"] {
        create_product_grant(&env, NS, name, "product-client", None).await;
    }
    let mut operator = env.start_operator();
    for name in ["p1", "p2"] {
        wait_reason(&env, NS, name, ("True", "Refreshed"), Duration::from_secs(30)).await;
    }
    let before = product_requests(&env).len();
    assert_eq!(before, 1, "two grants, one key: one request");
    let token = env.secret_value("p1-token", "access_token").await;
    tokio::task::block_in_place(|| operator.terminate(Duration::from_secs(10))).unwrap();

    let (_operator, port) = env.start_operator_with(&[]);
    // The new process leads and has looked at both grants (becoming the leader reconciles every
    // grant), then settles.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(port).await;
        if metric(&text, "wgtwo_operator_leader", &[]) == 1.0
            && metric(&text, "wgtwo_operator_reconciles_total", &[]) >= 2.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "the restarted operator did not lead and reconcile both grants");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(product_requests(&env).len(), before, "a restart sent a token request");
    assert_eq!(env.secret_value("p1-token", "access_token").await, token);
    for name in ["p1", "p2"] {
        assert_eq!(ready(&env, NS, name).await.unwrap().1, "Refreshed");
    }
    assert_eq!(metric(&scrape(port).await, "wgtwo_operator_token_requests_total", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_product_requests_get_their_own_reason_and_are_not_repeated() {
    let mut env = Env::start(hydra_options(Duration::from_secs(3600))).await;
    let product = product_client(&env).await;
    // A client of the same identity service that may not use client credentials.
    let subscriber_only = env
        .hydra
        .create_client_with(&[support::REDIRECT], &["authorization_code", "refresh_token"], PRODUCT_SCOPE)
        .await
        .unwrap();
    put_client_secret(&env, NS, "wrong-secret", &product.client_id, "not-the-secret").await;
    put_client_secret(&env, NS, "no-cc", &subscriber_only.client_id, &subscriber_only.client_secret).await;
    put_client_secret(&env, NS, "product-client", &product.client_id, &product.client_secret).await;
    // Two grants with the wrong secret: one key, one request between them.
    create_product_grant(&env, NS, "wrong-1", "wrong-secret", Some(PRODUCT_SCOPE)).await;
    create_product_grant(&env, NS, "wrong-2", "wrong-secret", Some(PRODUCT_SCOPE)).await;
    create_product_grant(&env, NS, "no-grant-type", "no-cc", Some(PRODUCT_SCOPE)).await;
    create_product_grant(&env, NS, "bad-scope", "product-client", Some("a c")).await;
    let _operator = env.start_operator();

    let cases = [
        ("wrong-1", "InvalidClient", "Check client_id and client_secret in Secret wrong-secret"),
        ("wrong-2", "InvalidClient", "Check client_id and client_secret in Secret wrong-secret"),
        ("no-grant-type", "UnauthorizedClient", "may not use the client_credentials grant"),
        ("bad-scope", "InvalidScope", "Fix spec.scope"),
    ];
    for (grant, reason, advice) in cases {
        let message = wait_reason(&env, NS, grant, ("False", reason), Duration::from_secs(30)).await;
        assert!(message.contains(advice), "{grant}: {message}");
        // Nothing about subscribers: a product token has no authorization to renew.
        for subscriber_advice in ["Re-authorize", "wgtwo-operator authorize", "refresh token", "refreshTokenSecretRef"]
        {
            assert!(!message.contains(subscriber_advice), "{grant}: {message}");
        }
        assert!(!message.contains(".."), "{grant}: {message}");
        for secret in [&product.client_secret, &subscriber_only.client_secret] {
            assert!(!message.contains(secret.as_str()), "{grant}: a client secret in the status");
        }
        let events = env.events(grant).await;
        assert!(events.iter().any(|(r, _)| r == reason), "{grant}: {events:?}");
        assert!(events.iter().all(|(r, _)| r != "InvalidGrant"), "{grant}: {events:?}");
    }
    let settled = product_requests(&env);
    // No hot loop: in the next 30 s not one more request.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let requests = product_requests(&env);
    println!("client credentials requests for 4 refused grants over 30 s: {}", requests.len());
    assert_eq!(requests.len(), settled.len(), "refused requests were repeated: {requests:?}");
    assert_eq!(requests.len(), 3, "one per key (the wrong secret's two grants share one): {requests:?}");
    let statuses: BTreeSet<u16> = requests.iter().filter_map(|r| r.status).collect();
    assert!(statuses.iter().all(|s| (400..500).contains(s)), "{requests:?}");
    for (grant, ..) in cases {
        assert_eq!(status(&env, NS, grant).await.grant_type.as_deref(), Some("client_credentials"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_identity_service_is_down_grants_sharing_a_key_back_off_together_and_recover_with_one_request() {
    let options = HydraOptions { persistent: true, ..hydra_options(Duration::from_secs(15)) };
    let mut env = Env::start(options).await;
    let client = product_client(&env).await;
    put_client_secret(&env, NS, "product-client", &client.client_id, &client.client_secret).await;
    let grants = ["p1", "p2", "p3"];
    for name in grants {
        create_product_grant(&env, NS, name, "product-client", Some(PRODUCT_SCOPE)).await;
    }
    let _operator = env.start_operator();
    for name in grants {
        wait_reason(&env, NS, name, ("True", "Refreshed"), Duration::from_secs(30)).await;
    }
    // The identity service goes away (the proxy in front of it answers 502) until every grant's
    // token is due (~10 s into its 15 s lifetime) and failing.
    env.hydra.stop().unwrap();
    let before = product_requests(&env).len();
    let deadline = Instant::now() + Duration::from_secs(25);
    for name in grants {
        while status(&env, NS, name).await.failed_attempts.is_none() {
            assert!(Instant::now() < deadline, "{name}: no failed attempt while the identity service is down");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Backoff 0.5 s doubling to 4 s: in 12 s about 6 attempts for the key, however many grants
    // share it (a request per grant and attempt would be 3 times that).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let during = product_requests(&env)[before..].to_vec();
    println!("client credentials requests for 3 sharing grants in ~12 s of outage: {}", during.len());
    assert!(during.iter().all(|r| r.status == Some(502)), "{during:?}");
    assert!((3..=9).contains(&during.len()), "{} requests: the grants did not share the key's backoff", during.len());
    for name in grants {
        let reason = ready(&env, NS, name).await.unwrap().1;
        assert!(["RetryingRefresh", "IdentityServiceUnavailable"].contains(&reason.as_str()), "{name}: {reason}");
    }

    env.hydra.restart().await.unwrap();
    let restarted = product_requests(&env).len();
    for name in grants {
        wait_reason(&env, NS, name, ("True", "Refreshed"), Duration::from_secs(20)).await;
    }
    let after: Vec<_> = product_requests(&env)[restarted..].to_vec();
    let ok = after.iter().filter(|r| r.status == Some(200)).count();
    assert_eq!(ok, 1, "one successful request serves the three grants: {after:?}");
    for name in grants {
        assert_eq!(status(&env, NS, name).await.failed_attempts, None);
    }
}
