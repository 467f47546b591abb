//! Shared setup for the controller's end-to-end tests: a control plane, a Hydra, a namespace with
//! the OAuth client Secret, subscribers authorized through Hydra, and the operator binary.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use wgtwo_operator::api::{
    ClientSecretRef, RefreshTokenSecretRef, TargetSecret, WgtwoGrant, WgtwoGrantSpec, WgtwoGrantStatus,
};
use wgtwo_operator::oauth::secrets::{AuthorizationCode, ClientSecret};
use wgtwo_operator::oauth::{AuthorizationRequest, CallbackOutcome, ClientConfig, WgtwoClient, parse_callback};
use wgtwo_testenv::process::ChildGuard;
use wgtwo_testenv::{ControlPlane, Hydra, HydraOptions, OAuthClient, Subscriber};

pub const NS: &str = "team-a";
pub const REDIRECT: &str = "http://127.0.0.1:8085/callback";

pub struct Env {
    pub cp: ControlPlane,
    pub hydra: Hydra,
    pub client: OAuthClient,
    pub wgtwo: WgtwoClient,
    pub kube: kube::Client,
    pub ca_file: PathBuf,
    pub dir: tempfile::TempDir,
    operator_starts: usize,
}

impl Env {
    pub async fn start(options: HydraOptions) -> Env {
        let (cp, hydra) = tokio::join!(ControlPlane::start(), Hydra::start(options));
        let (cp, hydra) = (cp.unwrap(), hydra.unwrap());
        let client = hydra.create_client(&[REDIRECT]).await.unwrap();
        cp.create_namespace(NS).await.unwrap();
        let kube = cp.admin_client().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("hydra-ca.pem");
        std::fs::write(&ca_file, hydra.ca_pem()).unwrap();
        let mut config = ClientConfig::new(&client.client_id, ClientSecret::new(client.client_secret.clone()));
        config.issuer_url = hydra.base_url();
        config.redirect_uri = Some(REDIRECT.into());
        config.ca_bundle_pem = Some(hydra.ca_pem().as_bytes().to_vec());
        let wgtwo = WgtwoClient::discover(config).await.unwrap();
        let env = Env { cp, hydra, client, wgtwo, kube, ca_file, dir, operator_starts: 0 };
        env.put_secret(
            "wgtwo-client",
            &[("client_id", &env.client.client_id), ("client_secret", &env.client.client_secret)],
        )
        .await;
        env
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.kube.clone(), NS)
    }

    pub fn grants(&self) -> Api<WgtwoGrant> {
        Api::namespaced(self.kube.clone(), NS)
    }

    /// Creates or replaces a Secret with string data.
    pub async fn put_secret(&self, name: &str, pairs: &[(&str, &str)]) {
        let secret = Secret {
            metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        };
        self.secrets().patch(name, &PatchParams::apply("e2e-test").force(), &Patch::Apply(&secret)).await.unwrap();
    }

    /// A subscriber completes the authorization code flow; returns their refresh token.
    pub async fn authorize(&self, subject: &str) -> String {
        let pending = self.wgtwo.authorization_url(AuthorizationRequest::new("phone offline_access")).unwrap();
        let callback =
            self.hydra.authorize(pending.url.as_str(), &Subscriber::new(subject, "+4799999999")).await.unwrap();
        let CallbackOutcome::Code(code) = parse_callback(&callback.url, &pending.state).unwrap() else { panic!() };
        let tokens = self.wgtwo.exchange_code(AuthorizationCode::new(code), pending).await.unwrap();
        tokens.refresh_token.unwrap().secret().clone()
    }

    /// Stores `refresh_token` in `<name>-authorization` and applies a grant pointing at it.
    pub async fn create_grant(&self, name: &str, refresh_token: &str, edit: impl FnOnce(&mut WgtwoGrantSpec)) {
        self.put_secret(&format!("{name}-authorization"), &[("refresh_token", refresh_token)]).await;
        let mut spec = WgtwoGrantSpec {
            issuer_url: self.hydra.base_url(),
            client_secret_ref: ClientSecretRef { name: "wgtwo-client".into() },
            refresh_token_secret_ref: RefreshTokenSecretRef {
                name: format!("{name}-authorization"),
                key: "refresh_token".into(),
            },
            target: TargetSecret { secret_name: format!("{name}-token") },
            scope: None,
            refresh_before: None,
        };
        edit(&mut spec);
        self.grants().create(&PostParams::default(), &WgtwoGrant::new(name, spec)).await.unwrap();
    }

    /// Starts the operator binary (admin credentials), logging to a file in the env's dir.
    pub fn start_operator(&mut self) -> ChildGuard {
        self.operator_starts += 1;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wgtwo-operator"));
        cmd.args([
            "run",
            "--namespace",
            NS,
            "--min-backoff",
            "500ms",
            "--max-backoff",
            "4s",
            "--request-timeout",
            "3s",
        ])
        .arg("--ca-bundle")
        .arg(&self.ca_file)
        .env("KUBECONFIG", self.cp.admin_kubeconfig())
        .env("RUST_LOG", "info,wgtwo_operator=debug");
        let log = self.dir.path().join(format!("operator-{}.log", self.operator_starts));
        ChildGuard::spawn("wgtwo-operator", cmd, &log).unwrap()
    }

    pub async fn status(&self, name: &str) -> Option<WgtwoGrantStatus> {
        self.grants().get_status(name).await.unwrap().status
    }

    /// The Ready condition's (status, reason), if any.
    pub async fn ready(&self, name: &str) -> Option<(String, String)> {
        let status = self.status(name).await?;
        status.conditions.iter().find(|c| c.type_ == "Ready").map(|c| (c.status.clone(), c.reason.clone()))
    }

    /// Waits until the Ready condition has this status and reason.
    pub async fn wait_ready(&self, name: &str, status: &str, reason: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.ready(name).await;
            if now.as_ref().is_some_and(|(s, r)| s == status && r == reason) {
                return;
            }
            assert!(Instant::now() < deadline, "{name}: Ready is {now:?}, wanted {status}/{reason} within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn secret_value(&self, secret: &str, key: &str) -> Option<String> {
        let s = self.secrets().get_opt(secret).await.unwrap()?;
        s.data.and_then(|d| d.get(key).map(|v| String::from_utf8(v.0.clone()).unwrap()))
    }

    /// The live refresh token the operator keeps for a grant.
    pub async fn live_refresh_token(&self, grant: &str) -> Option<String> {
        self.secret_value(&format!("{grant}-wgtwo-state"), "refresh_token").await
    }

    pub async fn active(&self, token: &str) -> bool {
        self.hydra.introspect(token).await.unwrap()["active"] == true
    }

    /// Events about a grant: (reason, note).
    pub async fn events(&self, grant: &str) -> Vec<(String, String)> {
        use k8s_openapi::api::events::v1::Event;
        let events: Api<Event> = Api::namespaced(self.kube.clone(), NS);
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(grant))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }
}
