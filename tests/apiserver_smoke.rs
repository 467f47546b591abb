//! The CRD against a real kube-apiserver (RBAC on): what it accepts, what it refuses and how it
//! names the field, what kubectl shows, and that RBAC is really enforced for ServiceAccounts.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::PolicyRule;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use wgtwo_operator::api::WgtwoGrant;
use wgtwo_testenv::ControlPlane;

fn grant_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("auth.wgtwo.com", "v1alpha1", "WgtwoGrant"), "wgtwogrants")
}

fn grant(name: &str, spec: Value) -> DynamicObject {
    let mut obj = DynamicObject::new(name, &grant_resource());
    obj.data = json!({ "spec": spec });
    obj
}

fn valid_spec() -> Value {
    json!({
        "clientSecretRef": {"name": "wgtwo-client"},
        "refreshTokenSecretRef": {"name": "alice-authorization"},
        "target": {"secretName": "alice-token"},
        "scope": "phone offline_access",
        "refreshBefore": "20m",
    })
}

/// `valid_spec()` with `edit` applied to it.
fn spec_with(edit: impl FnOnce(&mut Value)) -> Value {
    let mut spec = valid_spec();
    edit(&mut spec);
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_grant_is_accepted_and_read_back_with_server_side_defaults() {
    let cp = ControlPlane::start().await.unwrap();
    let ns = cp.create_namespace("team-a").await.unwrap();
    let client = cp.admin_client().await.unwrap();
    let dynamic: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &grant_resource());
    // No issuerUrl and no refresh-token key: the apiserver fills in the schema defaults.
    let spec = spec_with(|s| {
        s.as_object_mut().unwrap().remove("refreshBefore");
    });
    dynamic.create(&PostParams::default(), &grant("alice", spec)).await.unwrap();

    let typed: Api<WgtwoGrant> = Api::namespaced(client, &ns);
    let read = typed.get("alice").await.unwrap();
    assert_eq!(read.spec.issuer_url, "https://id.wgtwo.com");
    assert_eq!(read.spec.refresh_token_secret_ref.as_ref().unwrap().key, "refresh_token");
    assert_eq!(read.spec.target.secret_name, "alice-token");
    assert_eq!(read.spec.scope.as_deref(), Some("phone offline_access"));
    assert_eq!(read.spec.refresh_before, None);
    assert_eq!(typed.list(&ListParams::default()).await.unwrap().items.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grants_are_rejected_by_the_apiserver_with_the_field_named() {
    let cp = ControlPlane::start().await.unwrap();
    let ns = cp.create_namespace("team-a").await.unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(cp.admin_client().await.unwrap(), &ns, &grant_resource());

    let cases: Vec<(&str, Value, &str)> = vec![
        ("missing-target", spec_with(|s| drop(s.as_object_mut().unwrap().remove("target"))), "spec.target"),
        (
            "missing-client",
            spec_with(|s| drop(s.as_object_mut().unwrap().remove("clientSecretRef"))),
            "spec.clientSecretRef",
        ),
        ("words-duration", spec_with(|s| s["refreshBefore"] = json!("20 minutes")), "spec.refreshBefore"),
        ("days-duration", spec_with(|s| s["refreshBefore"] = json!("1d")), "spec.refreshBefore"),
        ("zero-duration", spec_with(|s| s["refreshBefore"] = json!("0s")), "spec.refreshBefore"),
        ("plain-http", spec_with(|s| s["issuerUrl"] = json!("http://id.wgtwo.com")), "spec.issuerUrl"),
        ("ftp-url", spec_with(|s| s["issuerUrl"] = json!("ftp://id.wgtwo.com")), "spec.issuerUrl"),
        ("not-a-url", spec_with(|s| s["issuerUrl"] = json!("id.wgtwo.com")), "spec.issuerUrl"),
        ("query-url", spec_with(|s| s["issuerUrl"] = json!("https://id.wgtwo.com/?a=b")), "spec.issuerUrl"),
        ("bad-secret-name", spec_with(|s| s["target"]["secretName"] = json!("Alice_Token")), "spec.target.secretName"),
        (
            "bad-key",
            spec_with(|s| s["refreshTokenSecretRef"]["key"] = json!("refresh token")),
            "spec.refreshTokenSecretRef.key",
        ),
        ("bad-scope", spec_with(|s| s["scope"] = json!("phone  offline_access")), "spec.scope"),
        (
            "target-is-input",
            spec_with(|s| s["target"]["secretName"] = json!("alice-authorization")),
            "target.secretName must differ",
        ),
        (
            "both-grant-types",
            spec_with(|s| s["clientCredentials"] = json!({})),
            "set either refreshTokenSecretRef (a subscriber's token) or clientCredentials (the product's own token), not both",
        ),
        (
            "no-grant-type",
            spec_with(|s| drop(s.as_object_mut().unwrap().remove("refreshTokenSecretRef"))),
            "set refreshTokenSecretRef (a subscriber's token, from their authorization) or clientCredentials (the product's own token)",
        ),
        (
            "product-target-is-client",
            product_spec(|s| s["target"]["secretName"] = json!("wgtwo-client")),
            "target.secretName must differ",
        ),
    ];
    let mut failures = Vec::new();
    for (name, spec, expected) in cases {
        match api.create(&PostParams::default(), &grant(name, spec)).await {
            Ok(_) => failures.push(format!("{name}: accepted")),
            Err(kube::Error::Api(status)) => {
                if status.code != 422 || !status.message.contains(expected) {
                    failures.push(format!("{name}: {} {:?} does not name {expected:?}", status.code, status.message));
                }
            }
            Err(other) => failures.push(format!("{name}: unexpected error {other}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // http is allowed for a local test server only.
    let local = spec_with(|s| s["issuerUrl"] = json!("http://127.0.0.1:4444"));
    api.create(&PostParams::default(), &grant("loopback-http", local)).await.unwrap();
}

/// A product grant: `valid_spec()` with clientCredentials in place of refreshTokenSecretRef.
fn product_spec(edit: impl FnOnce(&mut Value)) -> Value {
    spec_with(|s| {
        s.as_object_mut().unwrap().remove("refreshTokenSecretRef");
        s["clientCredentials"] = json!({});
        edit(s);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_product_grant_is_accepted_and_no_grant_can_switch_between_grant_types() {
    let cp = ControlPlane::start().await.unwrap();
    let ns = cp.create_namespace("team-a").await.unwrap();
    let client = cp.admin_client().await.unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &grant_resource());
    api.create(&PostParams::default(), &grant("product", product_spec(|_| {}))).await.unwrap();
    api.create(&PostParams::default(), &grant("subscriber", valid_spec())).await.unwrap();
    let typed: Api<WgtwoGrant> = Api::namespaced(client, &ns);
    let product = typed.get("product").await.unwrap();
    assert_eq!(product.spec.grant_type(), wgtwo_operator::api::GrantType::ClientCredentials);
    assert_eq!(product.spec.refresh_token_secret_ref, None);

    // Switching would leave a subscriber's live refresh token behind, or start a new kind of token
    // under an old name: refused both ways, saying what to do.
    let switch = |name: &str, spec: Value| {
        let api = api.clone();
        let name = name.to_owned();
        async move {
            let patch = kube::api::Patch::Merge(json!({ "spec": spec }));
            api.patch(&name, &kube::api::PatchParams::default(), &patch).await.unwrap_err()
        }
    };
    let to_subscriber = json!({"clientCredentials": null, "refreshTokenSecretRef": {"name": "alice-authorization"}});
    let to_product = json!({"clientCredentials": {}, "refreshTokenSecretRef": null});
    for (name, spec) in [("product", to_subscriber), ("subscriber", to_product)] {
        let err = switch(name, spec).await;
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 422 && s.message.contains("cannot switch between refreshTokenSecretRef and clientCredentials: create a new grant")),
            "{name}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_shows_the_printer_columns_and_explains_every_field() {
    let cp = ControlPlane::start().await.unwrap();
    let ns = cp.create_namespace("team-a").await.unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(cp.admin_client().await.unwrap(), &ns, &grant_resource());
    api.create(&PostParams::default(), &grant("alice", valid_spec())).await.unwrap();

    let table = cp.kubectl(&["get", "wgtwogrants", "-n", &ns]).unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "GRANT", "TYPE", "READY", "REASON", "EXPIRES", "AGE"], "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with("alice"), "{table}");
    // The short name and category work too.
    assert!(cp.kubectl(&["get", "wggrant", "-n", &ns]).unwrap().contains("alice"));
    assert!(cp.kubectl(&["get", "wgtwo", "-n", &ns]).unwrap().contains("alice"));

    let explain = cp.kubectl(&["explain", "wgtwogrant.spec.refreshBefore"]).unwrap();
    assert!(explain.contains("How much validity must remain"), "{explain}");
    let explain = cp.kubectl(&["explain", "wgtwogrant.spec.clientCredentials"]).unwrap();
    assert!(explain.contains("client credentials grant"), "{explain}");
    let explain = cp.kubectl(&["explain", "wgtwogrant.status.grantType"]).unwrap();
    assert!(explain.contains("client_credentials"), "{explain}");
    let explain = cp.kubectl(&["explain", "wgtwogrant.status.conditions"]).unwrap();
    assert!(explain.contains("Ready"), "{explain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_has_exactly_the_rights_rbac_grants_it() {
    let cp = ControlPlane::start().await.unwrap();
    let ns = cp.create_namespace("team-a").await.unwrap();
    let (sa_client, kubeconfig) = cp.service_account_client(&ns, "reader").await.unwrap();
    assert!(kubeconfig.exists());
    let grants: Api<WgtwoGrant> = Api::namespaced(sa_client.clone(), &ns);

    let forbidden = grants.list(&ListParams::default()).await.unwrap_err();
    assert!(matches!(&forbidden, kube::Error::Api(s) if s.code == 403), "{forbidden}");

    let rules = vec![PolicyRule {
        api_groups: Some(vec!["auth.wgtwo.com".into()]),
        resources: Some(vec!["wgtwogrants".into()]),
        verbs: vec!["get".into(), "list".into()],
        ..Default::default()
    }];
    cp.grant_service_account(&ns, "reader", "grant-reader", rules).await.unwrap();

    // RBAC changes reach the authorizer through an informer; allow it a moment.
    let mut listed = None;
    for _ in 0..50 {
        if let Ok(list) = grants.list(&ListParams::default()).await {
            listed = Some(list);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(listed.is_some(), "the bound Role never took effect");
    // Secrets were not granted, so they stay out of reach.
    let secrets = Api::<Secret>::namespaced(sa_client, &ns).list(&ListParams::default()).await.unwrap_err();
    assert!(matches!(&secrets, kube::Error::Api(s) if s.code == 403), "{secrets}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_control_plane_kills_its_processes() {
    let cp = ControlPlane::start().await.unwrap();
    let pids = cp.pids();
    let dir = cp.dir().to_owned();
    drop(cp);
    for pid in pids {
        // /proc/PID vanishes once the child is killed and reaped.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process {pid} outlived its guard");
    }
    assert!(!dir.exists() || std::env::var_os("WGTWO_TESTENV_KEEP").is_some(), "{} left behind", dir.display());
}
