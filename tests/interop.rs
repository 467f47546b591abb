//! Interoperability with OpenID Connect providers that differ from wgtwo's Hydra in what they
//! are allowed to do by the standard.

mod support;

use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use support::{Env, ttl};
use wgtwo_testenv::FaultServer;
use wgtwo_testenv::fault_server::USERINFO_PHONE_NUMBER;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_number_only_userinfo_tells_is_asked_once_per_authorization_and_published() {
    // OpenID Connect Core 5.4 lets a provider return scope-granted claims such as phone_number
    // only from userinfo. Hydra always puts them in the ID token, so a stub provider plays this one
    // (no ID token at all; userinfo has the number).
    let mut env = Env::start(ttl(3600)).await;
    let stub = FaultServer::start().await.unwrap();
    env.create_grant("alice", "rt-alice", |s| s.issuer_url = stub.base_url().to_owned()).await;
    let (mut operator, _) = env.start_operator_with(&["--allowed-issuer", stub.base_url()]);
    env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(30)).await;
    assert_eq!(env.secret_value("alice-token", "phone_number").await.as_deref(), Some(USERINFO_PHONE_NUMBER));
    assert_eq!(stub.userinfo_requests(), 1);

    // Two more refreshes and a restart: the number is remembered with the authorization.
    for (i, restart) in [(1, false), (2, true)] {
        if restart {
            operator.terminate(Duration::from_secs(10)).unwrap();
            operator = env.start_operator_with(&["--allowed-issuer", stub.base_url()]).0;
        }
        let patch =
            serde_json::json!({"metadata": {"annotations": {"auth.wgtwo.com/refresh-requested-at": format!("r{i}")}}});
        env.grants().patch("alice", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while stub.token_requests() < 1 + i {
            assert!(Instant::now() < deadline, "refresh {i} did not happen");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        env.wait_ready("alice", "True", "Refreshed", Duration::from_secs(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.secret_value("alice-token", "phone_number").await.as_deref(), Some(USERINFO_PHONE_NUMBER));
    assert_eq!(stub.token_requests(), 3);
    assert_eq!(stub.userinfo_requests(), 1, "userinfo is asked once per authorization, not per refresh");

    // A new authorization is a new subscriber, maybe with another number: asked again.
    env.put_secret("alice-authorization", &[("refresh_token", "rt-alice-again")]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while stub.userinfo_requests() < 2 {
        assert!(Instant::now() < deadline, "userinfo not asked after re-authorization");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stub.token_requests(), 4);
}
