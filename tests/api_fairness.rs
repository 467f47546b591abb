//! Under API Priority and Fairness the apiserver answers 429 when a client sends more than its
//! priority level admits. The operator's requests are put into a level with a few seats and no
//! queue (every excess request is rejected at once): every grant still converges, with exactly one
//! token request each (a rejected state write keeps its answer, it is not fetched again) and no
//! refresh token presented twice. A fast stub token endpoint stands in for Hydra; correctness of
//! the OAuth exchange is proven against Hydra elsewhere.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use support::{Env, OPERATOR_NS, OPERATOR_SA};
use wgtwo_testenv::HydraOptions;
use wgtwo_testenv::token_server::{RotatingTokenServer, USER_TOKEN_PREFIX};

const GRANTS: usize = 100;
const LEVEL: &str = "wgtwo-starved";

/// A priority level with one share (a few seats) that rejects instead of queueing, and a flow
/// schema that puts every request of the operator's ServiceAccount into it.
fn starved_level() -> String {
    format!(
        r#"apiVersion: flowcontrol.apiserver.k8s.io/v1
kind: PriorityLevelConfiguration
metadata:
  name: {LEVEL}
spec:
  type: Limited
  limited:
    nominalConcurrencyShares: 1
    lendablePercent: 0
    limitResponse:
      type: Reject
---
apiVersion: flowcontrol.apiserver.k8s.io/v1
kind: FlowSchema
metadata:
  name: {LEVEL}
spec:
  priorityLevelConfiguration:
    name: {LEVEL}
  matchingPrecedence: 100
  distinguisherMethod:
    type: ByUser
  rules:
    - subjects:
        - kind: ServiceAccount
          serviceAccount:
            name: {OPERATOR_SA}
            namespace: {OPERATOR_NS}
      resourceRules:
        - verbs: ["*"]
          apiGroups: ["*"]
          resources: ["*"]
          namespaces: ["*"]
          clusterScope: true
      nonResourceRules:
        - verbs: ["*"]
          nonResourceURLs: ["*"]
"#
    )
}

async fn rejected(env: &Env) -> f64 {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = env.kube.request_text(request).await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("apiserver_flowcontrol_rejected_requests_total{"))
        .filter(|l| l.contains(&format!("priority_level=\"{LEVEL}\"")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_api_priority_and_fairness_rejections_every_grant_converges_with_one_token_request_each() {
    let mut env = Env::start(HydraOptions::default()).await;
    let path = env.dir.path().join("starved.yaml");
    std::fs::write(&path, starved_level()).unwrap();
    env.cp.kubectl(&["apply", "-f", path.to_str().unwrap()]).unwrap();
    let stub = RotatingTokenServer::start(3600).await.unwrap();
    futures::stream::iter(0..GRANTS)
        .map(|i| {
            let (env, issuer) = (&env, stub.base_url().to_owned());
            async move {
                env.create_grant(&format!("g{i}"), &format!("{USER_TOKEN_PREFIX}{i}"), |s| s.issuer_url = issuer).await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;

    let (operator, _port) = env.start_operator_with(&["--allowed-issuer", stub.base_url()]);
    let started = Instant::now();
    loop {
        let grants = env.grants().list(&Default::default()).await.unwrap().items;
        let ready = grants
            .iter()
            .filter(|g| {
                g.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        if ready == GRANTS {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "{ready} of {GRANTS} Ready after 180 s; operator log:\n{}",
            operator.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rejections = rejected(&env).await;
    println!(
        "{GRANTS} grants Ready after {:.1} s with {rejections} requests rejected (429) by API Priority and Fairness",
        started.elapsed().as_secs_f64()
    );
    assert!(rejections > 0.0, "the priority level rejected nothing: the test did not exercise 429s");
    assert_eq!(stub.token_requests(), GRANTS, "one token request per grant");
    assert_eq!(stub.reused(), 0, "a refresh token was presented twice");
}
