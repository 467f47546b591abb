//! The grant controller: refreshes each grant's access token ahead of expiry and publishes it, in an
//! order that survives crashes and lost answers as far as a rotating refresh token allows:
//!
//! 1. the rotated refresh token is written to the operator-owned state Secret **first**;
//! 2. then the access token to the target Secret;
//! 3. then the status.
//!
//! If step 1 fails, the answer is kept in memory and nothing else (in particular no new refresh)
//! happens for that grant until it is written. Every write carries the resourceVersion it was based
//! on (optimistic concurrency).

pub mod inputs;
pub mod lineage;
pub mod schedule;
pub mod status;
pub mod target;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::{StreamExt, TryStreamExt};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use self::lineage::RefreshState;
use self::schedule::{Decision, Observed, RefreshReason};
use self::status::reason;
use crate::api::{ANNOTATION_REFRESH_REQUESTED, WgtwoGrant, WgtwoGrantStatus};
use crate::leader::Leadership;
use crate::metrics::{self, Metrics};
use crate::oauth::secrets::RefreshToken;
use crate::oauth::{ClientConfig, ErrorClass, OAuthError, TokenSet, WgtwoClient};

/// Field manager and Event reporter of the operator.
pub const MANAGER: &str = "wgtwo-operator";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_GRANT: &str = "auth.wgtwo.com/grant";
/// When a refresh was refused for good, how often to look again without any change (the Secret
/// watch reacts to a fix at once; this is only a safety net, and sends no token request).
const PERMANENT_RECHECK: Duration = Duration::from_secs(30 * 60);
/// When an input is missing or in conflict.
const INPUT_RECHECK: Duration = Duration::from_secs(5 * 60);
/// Assumed when a token response has no `expires_in` (wgtwo always sends 3600).
const DEFAULT_LIFETIME: SignedDuration = SignedDuration::from_secs(3600);
/// Time allowed, on top of the request timeout, to persist a refresh answer: a token request is
/// sent only while the Lease is held for at least that much longer.
pub const PERSIST_BUDGET: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct Options {
    /// Watch only this namespace (default: all).
    pub namespace: Option<String>,
    pub ca_bundle_pem: Option<Vec<u8>>,
    pub request_timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            namespace: None,
            ca_bundle_pem: None,
            request_timeout: Duration::from_secs(10),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5 * 60),
        }
    }
}

impl Options {
    /// How long the Lease must still be held for a token request to be sent.
    pub fn lease_margin(&self) -> Duration {
        self.request_timeout + PERSIST_BUDGET
    }
}

/// What the controller shares with the rest of the process.
#[derive(Clone)]
pub struct Shared {
    pub metrics: Metrics,
    pub leadership: Leadership,
    /// Set once the grant watch has listed everything.
    pub synced: Arc<AtomicBool>,
}

impl Default for Shared {
    fn default() -> Self {
        Self { metrics: Metrics::new(), leadership: Leadership::always(), synced: Default::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("could not persist the rotated refresh token ({0}); it is kept in memory and the write is retried")]
    PersistFailed(String),
}

/// A refresh answer not yet fully published.
struct Pending {
    refresh_token: RefreshToken,
    source: String,
    tokens: TokenSet,
    refreshed_at: Timestamp,
    /// When the answer arrived: from then until the state Secret is written, a crash loses the
    /// rotated refresh token (unless the server has a rotation grace period).
    received: std::time::Instant,
}

#[derive(Default)]
struct Memory {
    backoff: Option<ExponentialBackoff>,
    pending: Option<Pending>,
}

pub struct Context {
    client: kube::Client,
    recorder: Recorder,
    options: Options,
    shared: Shared,
    /// Discovered clients by issuer, client id and secret fingerprint.
    oauth: tokio::sync::Mutex<HashMap<String, Arc<WgtwoClient>>>,
    memory: Mutex<HashMap<ObjectRef<WgtwoGrant>, Memory>>,
}

impl Context {
    pub fn new(client: kube::Client, options: Options, shared: Shared) -> Self {
        let recorder = recorder(client.clone());
        Self { client, recorder, options, shared, oauth: Default::default(), memory: Default::default() }
    }

    /// Answers kept in memory because they could not be persisted (lost if the process exits).
    fn unpersisted(&self) -> Vec<String> {
        let memory = self.memory.lock().unwrap();
        memory.iter().filter(|(_, m)| m.pending.is_some()).map(|(k, _)| k.to_string()).collect()
    }

    fn take_pending(&self, key: &ObjectRef<WgtwoGrant>) -> Option<Pending> {
        self.memory.lock().unwrap().get_mut(key).and_then(|m| m.pending.take())
    }

    fn keep_pending(&self, key: &ObjectRef<WgtwoGrant>, pending: Pending) {
        self.memory.lock().unwrap().entry(key.clone()).or_default().pending = Some(pending);
    }

    fn next_backoff(&self, key: &ObjectRef<WgtwoGrant>) -> Duration {
        let mut memory = self.memory.lock().unwrap();
        let entry = memory.entry(key.clone()).or_default();
        let backoff = entry.backoff.get_or_insert_with(|| {
            ExponentialBuilder::default()
                .with_min_delay(self.options.min_backoff)
                .with_max_delay(self.options.max_backoff)
                .with_factor(2.0)
                .with_jitter()
                .without_max_times()
                .build()
        });
        backoff.next().unwrap_or(self.options.max_backoff)
    }

    fn reset_backoff(&self, key: &ObjectRef<WgtwoGrant>) {
        if let Some(m) = self.memory.lock().unwrap().get_mut(key) {
            m.backoff = None;
        }
    }

    fn forget(&self, key: &ObjectRef<WgtwoGrant>) {
        let mut memory = self.memory.lock().unwrap();
        // A pending answer is never dropped, even for a grant that went away.
        if memory.get(key).is_some_and(|m| m.pending.is_none()) {
            memory.remove(key);
        }
    }

    async fn oauth_client(&self, issuer: &str, inputs: &inputs::Inputs) -> Result<Arc<WgtwoClient>, OAuthError> {
        let key = lineage::sha256_hex(&[issuer, &inputs.client_id, inputs.client_secret.secret()]);
        let mut clients = self.oauth.lock().await;
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let mut config = ClientConfig::new(&inputs.client_id, inputs.client_secret.clone());
        config.issuer_url = issuer.to_owned();
        config.timeout = self.options.request_timeout;
        config.ca_bundle_pem = self.options.ca_bundle_pem.clone();
        let client = Arc::new(WgtwoClient::discover(config).await?);
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Drops a cached client so the next use rediscovers the issuer (e.g. its signing keys rotated).
    async fn forget_oauth_client(&self, issuer: &str, inputs: &inputs::Inputs) {
        let key = lineage::sha256_hex(&[issuer, &inputs.client_id, inputs.client_secret.secret()]);
        self.oauth.lock().await.remove(&key);
    }
}

/// The Event recorder of the operator, naming this pod as the reporting instance.
pub fn recorder(client: kube::Client) -> Recorder {
    let instance = std::env::var("POD_NAME").ok().or_else(|| std::env::var("HOSTNAME").ok());
    Recorder::new(client, Reporter { controller: MANAGER.into(), instance })
}

/// Runs the controller until `shutdown`; then no reconcile starts and in-flight ones (including
/// the persistence of a rotated refresh token) finish before this returns.
pub async fn run(
    client: kube::Client,
    options: Options,
    shared: Shared,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Secrets as metadata only: the operator never caches the data of anyone's Secrets.
    let (grants, secrets): (Api<WgtwoGrant>, Api<PartialObjectMeta<Secret>>) = match &options.namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let ctx = Arc::new(Context::new(client, options, shared.clone()));
    // Reconcile on spec and annotation changes, not on our own status writes: a status patch after a
    // failed refresh must not bypass the backoff.
    let (store, writer) = reflector::store();
    let metrics = shared.metrics.clone();
    let reader = store.clone();
    // Set here rather than by Store::wait_until_ready, whose waker the Controller's own wait
    // displaces (a second waiter is never woken).
    let synced = shared.synced.clone();
    let grant_changes = watcher(grants, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        // Per-grant gauges follow every status change, including our own writes.
        .inspect_ok(move |event| match event {
            watcher::Event::Apply(g) | watcher::Event::InitApply(g) => metrics.observe_grant(g),
            watcher::Event::Delete(g) => metrics.forget_grant(&g.namespace().unwrap_or_default(), &g.name_any()),
            watcher::Event::InitDone => {
                metrics.retain_grants(
                    &reader.state().iter().map(|g| (g.namespace().unwrap_or_default(), g.name_any())).collect(),
                );
                if !synced.swap(true, Ordering::Relaxed) {
                    info!("grant watch synced");
                }
            }
            watcher::Event::Init => {}
        })
        .applied_objects()
        .predicate_filter(spec_or_annotations, Default::default());
    let controller = Controller::for_stream(grant_changes, store.clone());
    let secret_changes = watcher(secrets, watcher::Config::default()).default_backoff().touched_objects();
    controller
        .watches_stream(secret_changes, move |secret| {
            let (ns, name) = (secret.namespace(), secret.name_any());
            store
                .state()
                .into_iter()
                .filter(|g| g.namespace() == ns && references(g, &name))
                .map(|g| ObjectRef::from_obj(&*g))
                .collect::<Vec<_>>()
        })
        // A standby ignores everything; on becoming the leader it looks at every grant.
        .reconcile_all_on(shared.leadership.became_leader())
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(err) = result {
                warn!(error = %err, "reconcile failed");
            }
        })
        .await;
    let lost = ctx.unpersisted();
    if !lost.is_empty() {
        error!(grants = ?lost, "stopped with rotated refresh tokens that could not be persisted; these grants need re-authorization unless the identity service has a rotation grace period");
    }
    info!("controller stopped");
    Ok(())
}

fn spec_or_annotations(grant: &WgtwoGrant) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (grant.metadata.generation, grant.annotations()).hash(&mut hasher);
    Some(hasher.finish())
}

/// Whether the grant reads or writes the Secret `name` (in its own namespace).
fn references(grant: &WgtwoGrant, name: &str) -> bool {
    let spec = &grant.spec;
    spec.client_secret_ref.name == name
        || spec.refresh_token_secret_ref.name == name
        || spec.target.secret_name == name
        || lineage::state_secret_name(&grant.name_any()) == name
}

fn error_policy(grant: Arc<WgtwoGrant>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.shared.metrics.reconcile_error(match err {
        Error::Kube(_) => reason::KUBERNETES_API,
        Error::PersistFailed(_) => reason::PERSIST_FAILED,
    });
    let delay = ctx.next_backoff(&ObjectRef::from_obj(&*grant));
    warn!(grant = %grant.name_any(), namespace = ?grant.namespace(), error = %err, retry_in = ?delay, "reconcile error");
    Action::requeue(delay)
}

/// Everything one reconcile works with.
struct Run<'a> {
    grant: &'a WgtwoGrant,
    ctx: &'a Context,
    key: ObjectRef<WgtwoGrant>,
    secrets: Api<Secret>,
    grants: Api<WgtwoGrant>,
}

async fn reconcile(grant: Arc<WgtwoGrant>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = ObjectRef::from_obj(&*grant);
    let ns = grant.namespace().expect("WgtwoGrant is namespaced");
    if grant.meta().deletion_timestamp.is_some() {
        ctx.forget(&key);
        return Ok(Action::await_change());
    }
    let run = Run {
        grant: &grant,
        ctx: &ctx,
        key,
        secrets: Api::namespaced(ctx.client.clone(), &ns),
        grants: Api::namespaced(ctx.client.clone(), &ns),
    };
    run.reconcile().await
}

impl Run<'_> {
    fn state_name(&self) -> String {
        lineage::state_secret_name(&self.grant.name_any())
    }

    async fn reconcile(&self) -> Result<Action, Error> {
        // An answer that could not be persisted goes first: never refresh past it.
        if let Some(pending) = self.ctx.take_pending(&self.key) {
            let state = self.secrets.get_opt(&self.state_name()).await?;
            let target = self.secrets.get_opt(&self.grant.spec.target.secret_name).await?;
            let next = self.publish(pending, state.as_ref(), target.as_ref()).await?;
            self.ctx.reset_backoff(&self.key);
            // This reconcile's view of the grant predates the publish; decide afresh next time.
            return Ok(Action::requeue(until(Timestamp::now(), next)));
        }
        // Only the leader reads, refreshes and writes; becoming the leader triggers a pass.
        if !self.ctx.shared.leadership.is_leader() {
            return Ok(Action::await_change());
        }

        let inputs = match inputs::read(&self.secrets, self.grant).await? {
            Ok(inputs) => inputs,
            Err(problem) => return self.input_problem(problem.reason, problem.message).await,
        };
        let state_secret = self.secrets.get_opt(&self.state_name()).await?;
        let target_secret = self.secrets.get_opt(&self.grant.spec.target.secret_name).await?;
        for (secret, what, why) in [
            (&target_secret, reason::TARGET_CONFLICT, "target.secretName"),
            (&state_secret, reason::STATE_CONFLICT, "the operator's state Secret"),
        ] {
            if let Some(s) = secret
                && !self.owns(s)
            {
                let message = format!(
                    "Secret {} ({why}) exists and is not owned by this grant; it is left untouched. Delete or rename it, or choose another target.secretName",
                    s.name_any()
                );
                return self.input_problem(what, message).await;
            }
        }

        let chosen = lineage::choose(
            &inputs.user_refresh_token,
            state_secret.as_ref().and_then(|s| s.data.as_ref()).and_then(lineage::decode),
        );
        let fingerprint = self.request_fingerprint(&inputs, &chosen.refresh_token);
        if !chosen.adopted && chosen.failed.as_deref() == Some(fingerprint.as_str()) {
            // Refused for good with exactly these inputs: wait for the user to change one.
            return Ok(Action::requeue(PERMANENT_RECHECK));
        }

        let now = Timestamp::now();
        let published = target_secret.as_ref().and_then(target::published_token);
        let requested = self.grant.annotations().get(ANNOTATION_REFRESH_REQUESTED).cloned();
        let mut handled = self.grant.status.as_ref().and_then(|s| s.refresh_request_handled.clone());
        if requested.is_some() && requested != handled {
            // The cached grant may predate our own last status write: confirm before refreshing.
            let fresh = self.grants.get_status(&self.grant.name_any()).await?;
            handled = fresh.status.and_then(|s| s.refresh_request_handled);
        }
        let decision = schedule::decide(&Observed {
            now,
            token: published,
            // Adopting the first token of a grant is covered by "no token"; a new lineage over a
            // published token is a re-authorization.
            new_authorization: chosen.adopted && state_secret.is_some(),
            refresh_requested: requested.is_some() && requested != handled,
            refresh_before: self.refresh_before(),
            jitter_seed: self.jitter_seed(),
        });
        match decision {
            Decision::WaitUntil(at) => {
                let token = published.expect("waiting implies a published token");
                debug!(grant = %self.grant.name_any(), next = %at, "access token valid; next refresh scheduled");
                self.set_ready(true, reason::REFRESHED, self.valid_message(token.expires_at), |s| {
                    s.expires_at = Some(Time(token.expires_at));
                    s.last_refresh_time = Some(Time(token.issued_at));
                    s.next_refresh_time = Some(Time(at));
                })
                .await?;
                Ok(Action::requeue(until(now, at)))
            }
            Decision::RefreshNow(why) => {
                self.refresh(&inputs, chosen, fingerprint, why, state_secret, target_secret, published).await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn refresh(
        &self,
        inputs: &inputs::Inputs,
        chosen: lineage::Chosen,
        fingerprint: String,
        why: RefreshReason,
        state_secret: Option<Secret>,
        target_secret: Option<Secret>,
        published: Option<schedule::TokenTimes>,
    ) -> Result<Action, Error> {
        let issuer = &self.grant.spec.issuer_url;
        let result = match self.ctx.oauth_client(issuer, inputs).await {
            // Checked right before sending: a replica whose Lease may lapse before the answer is
            // persisted must not present the refresh token (the next leader would present it too).
            Ok(_) if !self.ctx.shared.leadership.may_send(self.ctx.options.lease_margin()) => {
                return Ok(if self.ctx.shared.leadership.is_leader() {
                    debug!(grant = %self.grant.name_any(), "Lease held with too little margin; refresh deferred");
                    Action::requeue(Duration::from_secs(1))
                } else {
                    Action::await_change()
                });
            }
            Ok(client) => {
                info!(grant = %self.grant.name_any(), namespace = ?self.grant.namespace(), reason = why.as_str(), "refreshing");
                let sent = Instant::now();
                let result = client.refresh(&chosen.refresh_token, self.grant.spec.scope.as_deref()).await;
                let outcome = match &result {
                    Ok(_) => metrics::result::SUCCESS,
                    Err(e) if e.class() == ErrorClass::Permanent => metrics::result::REJECTED,
                    Err(_) => metrics::result::RETRYABLE_ERROR,
                };
                let ns = self.grant.namespace().unwrap_or_default();
                self.ctx.shared.metrics.refresh(&ns, &self.grant.name_any(), outcome, sent.elapsed().as_secs_f64());
                result
            }
            Err(err) => Err(err),
        };
        let tokens = match result {
            Ok(tokens) => tokens,
            Err(err) => {
                return self.refresh_failed(err, chosen, fingerprint, state_secret.as_ref(), published).await;
            }
        };
        if let Some(problem) = &tokens.id_token_error {
            // The tokens are good; only the ID token is not. Rediscover keys next time.
            warn!(grant = %self.grant.name_any(), problem = %problem, "ID token of the refresh answer failed verification");
            self.ctx.forget_oauth_client(issuer, inputs).await;
        }
        let pending = Pending {
            refresh_token: tokens.refresh_token.clone().unwrap_or(chosen.refresh_token),
            source: chosen.source,
            tokens,
            refreshed_at: whole_seconds(Timestamp::now()),
            received: std::time::Instant::now(),
        };
        let next = self.publish(pending, state_secret.as_ref(), target_secret.as_ref()).await?;
        self.ctx.reset_backoff(&self.key);
        self.event(EventType::Normal, reason::REFRESHED, format!("Access token refreshed: {}", why.as_str())).await;
        Ok(Action::requeue(until(Timestamp::now(), next)))
    }

    /// Writes the answer: rotated refresh token first, then the access token, then the status. On
    /// any failure the answer is kept in memory (a retried write of the same token is harmless).
    /// Returns when the next refresh is due.
    async fn publish(
        &self,
        pending: Pending,
        state: Option<&Secret>,
        target: Option<&Secret>,
    ) -> Result<Timestamp, Error> {
        let state_data = lineage::encode(&RefreshState {
            refresh_token: pending.refresh_token.clone(),
            source: pending.source.clone(),
            failed: None,
        });
        if let Err(err) = self.write_secret(&self.state_name(), state, state_data, BTreeMap::new()).await {
            self.ctx.keep_pending(&self.key, pending);
            return Err(Error::PersistFailed(kube_message(&err)));
        }
        debug!(grant = %self.grant.name_any(), elapsed_ms = pending.received.elapsed().as_millis(), "rotated refresh token persisted");
        // Whole seconds (rounded down: never later than the server said), as RFC 3339 readers expect.
        let expires_at = whole_seconds(pending.tokens.expires_at.unwrap_or(pending.refreshed_at + DEFAULT_LIFETIME));
        let data = target::data(&pending.tokens, expires_at, target.and_then(target::phone_number));
        let annotations =
            BTreeMap::from([(target::ANNOTATION_REFRESHED_AT.to_owned(), pending.refreshed_at.to_string())]);
        if let Err(err) = self.write_secret(&self.grant.spec.target.secret_name, target, data, annotations).await {
            self.ctx.keep_pending(&self.key, pending);
            return Err(err.into());
        }
        let times = schedule::TokenTimes { issued_at: pending.refreshed_at, expires_at };
        let next = schedule::refresh_at(times, self.refresh_before(), self.jitter_seed());
        let subject = pending.tokens.id_token.as_ref().map(|id| id.subject.clone());
        let scope = pending.tokens.scope.clone();
        let handled = self.grant.annotations().get(ANNOTATION_REFRESH_REQUESTED).cloned();
        self.set_ready(true, reason::REFRESHED, self.valid_message(expires_at), |s| {
            s.expires_at = Some(Time(expires_at));
            s.last_refresh_time = Some(Time(pending.refreshed_at));
            s.next_refresh_time = Some(Time(next));
            s.scope.clone_from(&scope);
            if subject.is_some() {
                s.subject.clone_from(&subject);
            }
            if handled.is_some() {
                s.refresh_request_handled.clone_from(&handled);
            }
        })
        .await?;
        Ok(next)
    }

    async fn refresh_failed(
        &self,
        err: OAuthError,
        chosen: lineage::Chosen,
        fingerprint: String,
        state: Option<&Secret>,
        published: Option<schedule::TokenTimes>,
    ) -> Result<Action, Error> {
        let now = Timestamp::now();
        let valid = published.filter(|t| t.expires_at > now);
        let still_valid = valid
            .map(|t| format!(" The published access token stays valid until {}.", t.expires_at))
            .unwrap_or_else(|| " No valid access token is published.".into());
        if err.class() == ErrorClass::Permanent {
            let (why, advice) = self.permanent_advice(&err);
            if matches!(err, OAuthError::Rejected { .. }) {
                // Remember that these inputs were refused, so they are not sent again.
                let data = lineage::encode(&RefreshState {
                    refresh_token: chosen.refresh_token,
                    source: chosen.source,
                    failed: Some(fingerprint),
                });
                self.write_secret(&self.state_name(), state, data, BTreeMap::new()).await?;
            }
            let message = format!("{err}. {advice}{still_valid}");
            warn!(grant = %self.grant.name_any(), namespace = ?self.grant.namespace(), reason = why, error = %err, "refresh refused; waiting for a fix");
            self.ctx.shared.metrics.reconcile_error(why);
            self.event(EventType::Warning, why, message.clone()).await;
            self.set_ready(false, why, message, |_| {}).await?;
            return Ok(Action::requeue(PERMANENT_RECHECK));
        }
        let delay = self.ctx.next_backoff(&self.key).max(err.retry_after().unwrap_or_default());
        let message = format!("Refresh failed: {err}; retrying in {}s.{still_valid}", delay.as_secs());
        let why = if valid.is_some() { reason::RETRYING_REFRESH } else { reason::IDENTITY_SERVICE_UNAVAILABLE };
        self.ctx.shared.metrics.reconcile_error(why);
        warn!(grant = %self.grant.name_any(), namespace = ?self.grant.namespace(), error = %err, retry_in = ?delay, "refresh failed");
        self.event(EventType::Warning, "RefreshFailed", message.clone()).await;
        self.set_ready(valid.is_some(), why, message, |_| {}).await?;
        Ok(Action::requeue(delay))
    }

    fn permanent_advice(&self, err: &OAuthError) -> (&'static str, String) {
        let spec = &self.grant.spec;
        let (name, key) = (&spec.refresh_token_secret_ref.name, &spec.refresh_token_secret_ref.key);
        let reauthorize = format!(
            "Re-authorize: put a new refresh token into Secret {name} key {key} (wgtwo-operator authorize {} -n {})",
            self.grant.name_any(),
            self.grant.namespace().unwrap_or_default()
        );
        let client = format!("Check client_id and client_secret in Secret {}", spec.client_secret_ref.name);
        match err.oauth_error() {
            Some("invalid_grant") => (
                reason::INVALID_GRANT,
                format!("The authorization has ended or its refresh token was already used. {reauthorize}"),
            ),
            Some("invalid_client") => (reason::INVALID_CLIENT, format!("The OAuth client was refused. {client}")),
            Some("unauthorized_client") => {
                (reason::UNAUTHORIZED_CLIENT, format!("The client may not use the refresh_token grant. {client}"))
            }
            Some("invalid_scope") => {
                (reason::INVALID_SCOPE, "Fix spec.scope: it must be within the authorized scope".into())
            }
            Some(_) => (reason::REFRESH_REJECTED, reauthorize),
            None if matches!(err, OAuthError::Discovery { .. }) => {
                (reason::DISCOVERY_FAILED, "Check spec.issuerUrl: it must be the identity service's base URL".into())
            }
            None => (reason::REFRESH_REJECTED, "Check spec.issuerUrl and the client Secret".into()),
        }
    }

    async fn input_problem(&self, why: &'static str, message: String) -> Result<Action, Error> {
        self.ctx.shared.metrics.reconcile_error(why);
        let changed =
            status::previous_ready(self.grant.status.as_ref()).is_none_or(|c| c.reason != why || c.message != message);
        if changed {
            self.event(EventType::Warning, why, message.clone()).await;
        }
        self.set_ready(false, why, message, |_| {}).await?;
        Ok(Action::requeue(INPUT_RECHECK))
    }

    /// Patches the status (server-side apply) unless nothing would change.
    async fn set_ready(
        &self,
        ready: bool,
        why: &str,
        message: String,
        edit: impl Fn(&mut WgtwoGrantStatus),
    ) -> Result<(), Error> {
        let now = Timestamp::now();
        let next_from = |current: Option<&WgtwoGrantStatus>| {
            let previous = status::previous_ready(current);
            let condition =
                status::ready_condition(previous, ready, why, message.clone(), self.grant.metadata.generation, now);
            let mut next = status::with_ready(current, condition);
            next.observed_generation = self.grant.metadata.generation;
            edit(&mut next);
            next
        };
        let cached = self.grant.status.as_ref();
        if Some(&next_from(cached)) == cached {
            return Ok(());
        }
        // The cached grant may predate our own last status write (its watch event not seen yet):
        // build on the status as stored, or the apply would drop fields only a refresh knows
        // (subject, scope) or restore stale ones.
        let stored = self.grants.get_status(&self.grant.name_any()).await?.status;
        let next = next_from(stored.as_ref());
        if Some(&next) == stored.as_ref() {
            return Ok(());
        }
        let patch = serde_json::json!({
            "apiVersion": WgtwoGrant::api_version(&()),
            "kind": WgtwoGrant::kind(&()),
            "status": next,
        });
        self.grants
            .patch_status(&self.grant.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch))
            .await?;
        Ok(())
    }

    /// Creates the Secret, or replaces it based on `existing`'s resourceVersion.
    async fn write_secret(
        &self,
        name: &str,
        existing: Option<&Secret>,
        data: BTreeMap<String, k8s_openapi::ByteString>,
        annotations: BTreeMap<String, String>,
    ) -> Result<(), kube::Error> {
        let labels = BTreeMap::from([
            (LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned()),
            (LABEL_GRANT.to_owned(), self.grant.name_any()),
        ]);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(labels),
                annotations: (!annotations.is_empty()).then_some(annotations),
                owner_references: Some(vec![self.owner_reference()]),
                resource_version: existing.and_then(|s| s.resource_version()),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Default::default()
        };
        match existing {
            None => self.secrets.create(&PostParams::default(), &secret).await.map(drop),
            Some(_) => self.secrets.replace(name, &PostParams::default(), &secret).await.map(drop),
        }
    }

    fn owner_reference(&self) -> OwnerReference {
        self.grant.controller_owner_ref(&()).expect("a grant read from the API has a uid")
    }

    fn owns(&self, secret: &Secret) -> bool {
        let uid = self.grant.uid();
        secret.owner_references().iter().any(|o| Some(&o.uid) == uid.as_ref())
    }

    fn request_fingerprint(&self, inputs: &inputs::Inputs, token: &RefreshToken) -> String {
        lineage::sha256_hex(&[
            &self.grant.spec.issuer_url,
            &inputs.client_id,
            inputs.client_secret.secret(),
            token.secret(),
            self.grant.spec.scope.as_deref().unwrap_or(""),
        ])
    }

    fn refresh_before(&self) -> Option<SignedDuration> {
        // The schema admits only `1h2m3s`-style values, which jiff parses.
        self.grant.spec.refresh_before.as_deref().and_then(|s| s.parse().ok())
    }

    fn jitter_seed(&self) -> u64 {
        let uid = self.grant.uid().unwrap_or_default();
        u64::from_str_radix(&lineage::sha256_hex(&[&uid])[..15], 16).unwrap_or(0)
    }

    fn valid_message(&self, expires_at: Timestamp) -> String {
        format!("Secret {} holds an access token valid until {expires_at}", self.grant.spec.target.secret_name)
    }

    async fn event(&self, type_: EventType, why: &str, note: String) {
        let event =
            Event { type_, reason: why.to_owned(), note: Some(note), action: "Refresh".into(), secondary: None };
        if let Err(err) = self.ctx.recorder.publish(&event, &self.grant.object_ref(&())).await {
            warn!(error = %err, "could not publish an Event");
        }
    }
}

fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

fn until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO).max(Duration::from_millis(200))
}

fn kube_message(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}
