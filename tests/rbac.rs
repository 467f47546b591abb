//! The shipped RBAC is least privilege: the operator's ServiceAccount may do exactly what the
//! operator needs (every end-to-end test runs the operator as that account), nothing else; and
//! scoped to one namespace it cannot read Secrets anywhere else.

mod support;

use std::time::Duration;

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, PostParams};
use support::{Env, NS, OPERATOR_NS, OPERATOR_SA, Rbac};
use wgtwo_testenv::{ControlPlane, HydraOptions, repo_root};

async fn allowed(
    client: &kube::Client,
    verb: &str,
    group: &str,
    resource: &str,
    ns: Option<&str>,
    name: Option<&str>,
) -> bool {
    let (resource, subresource) = resource.split_once('/').map_or((resource, None), |(r, s)| (r, Some(s.to_owned())));
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource,
                namespace: ns.map(Into::into),
                name: name.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    reviews.create(&PostParams::default(), &review).await.unwrap().status.unwrap().allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_account_may_do_what_the_operator_needs_and_nothing_more() {
    let cp = ControlPlane::start().await.unwrap();
    cp.create_namespace(NS).await.unwrap();
    let manifests = repo_root().join("deploy/manifests/wgtwo-operator.yaml");
    cp.kubectl(&["apply", "--server-side", "-f", manifests.to_str().unwrap()]).unwrap();
    let (sa, _) = cp.service_account_client(OPERATOR_NS, OPERATOR_SA).await.unwrap();
    let grants = "auth.wgtwo.com";
    let events = "events.k8s.io";
    let leases = "coordination.k8s.io";
    let ns = Some(NS);
    let own = Some(OPERATOR_NS);
    #[rustfmt::skip]
    let needed = [
        ("get", grants, "wgtwogrants", ns, None),
        ("list", grants, "wgtwogrants", None, None),
        ("watch", grants, "wgtwogrants", None, None),
        ("patch", grants, "wgtwogrants/status", ns, None),
        ("get", "", "secrets", ns, None),
        ("list", "", "secrets", None, None),
        ("watch", "", "secrets", None, None),
        ("create", "", "secrets", ns, None),
        ("update", "", "secrets", ns, None),
        ("create", events, "events", ns, None),
        ("patch", events, "events", ns, None),
        ("create", leases, "leases", own, None),
        ("get", leases, "leases", own, Some("wgtwo-operator")),
        ("update", leases, "leases", own, Some("wgtwo-operator")),
    ];
    #[rustfmt::skip]
    let not_needed = [
        // Grants and their status come from the watch cache and the operator's own writes.
        ("get", grants, "wgtwogrants/status", ns, None),
        ("create", grants, "wgtwogrants", ns, None),
        ("update", grants, "wgtwogrants", ns, None),
        ("patch", grants, "wgtwogrants", ns, None),
        ("delete", grants, "wgtwogrants", ns, None),
        ("delete", "", "secrets", ns, None),
        ("patch", "", "secrets", ns, None),
        ("deletecollection", "", "secrets", ns, None),
        ("get", "", "configmaps", ns, None),
        ("list", "", "pods", None, None),
        ("create", "", "serviceaccounts/token", ns, None),
        ("delete", events, "events", ns, None),
        ("create", leases, "leases", ns, None),
        ("update", leases, "leases", own, Some("another-controllers-lease")),
        ("delete", leases, "leases", own, Some("wgtwo-operator")),
        ("update", "apiextensions.k8s.io", "customresourcedefinitions", None, None),
        ("create", "rbac.authorization.k8s.io", "clusterrolebindings", None, None),
    ];
    let mut wrong = Vec::new();
    for (verb, group, resource, ns, name) in needed {
        if !allowed(&sa, verb, group, resource, ns, name).await {
            wrong.push(format!("denied but needed: {verb} {group}/{resource} in {ns:?} {name:?}"));
        }
    }
    for (verb, group, resource, ns, name) in not_needed {
        if allowed(&sa, verb, group, resource, ns, name).await {
            wrong.push(format!("allowed but not needed: {verb} {group}/{resource} in {ns:?} {name:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_to_one_namespace_it_refreshes_there_and_cannot_read_secrets_elsewhere() {
    let mut env = Env::start_with(HydraOptions::default(), Rbac::WatchNamespace).await;
    let other = "team-b";
    env.cp.create_namespace(other).await.unwrap();
    let theirs: Api<Secret> = Api::namespaced(env.kube.clone(), other);
    theirs.create(&PostParams::default(), &env.client.kube_secret("their-client")).await.unwrap();

    let sa = wgtwo_testenv::control_plane::client_from_kubeconfig(&env.operator_kubeconfig).await.unwrap();
    let elsewhere: Api<Secret> = Api::namespaced(sa.clone(), other);
    for result in [
        elsewhere.get("their-client").await.map(drop),
        elsewhere.list(&ListParams::default()).await.map(drop),
        Api::<Secret>::all(sa.clone()).list(&ListParams::default()).await.map(drop),
    ] {
        assert!(matches!(result, Err(kube::Error::Api(ref s)) if s.code == 403), "{result:?}");
    }
    let here: Api<Secret> = Api::namespaced(sa, NS);
    here.get("wgtwo-client").await.expect("the operator reads the Secrets of its namespace");

    // And the operator, with only this access, does its job.
    env.create_authorized_grant("alice").await;
    let _operator = env.start_operator();
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;
    assert!(env.secret_value("alice-token", "access_token").await.is_some());
}
