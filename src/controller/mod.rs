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

pub mod index;
pub mod inputs;
pub mod issuers;
pub mod journal;
pub mod lineage;
pub mod memory;
pub mod product;
pub mod replay;
pub mod schedule;
pub mod secret_cache;
pub mod status;
pub mod target;
pub mod template;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::{Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, instrument, warn};

use self::index::SecretIndex;
use self::issuers::AllowedIssuer;
use self::journal::Journal;
use self::lineage::RefreshState;
use self::memory::{Failure, Memory, Pending};
use self::schedule::{Decision, Observed, RefreshReason};
use self::secret_cache::SecretCache;
use self::status::reason;
use crate::api::{
    ANNOTATION_REFRESH_REQUESTED, DEFAULT_ISSUER_URL, GRANT_TYPE_CLIENT_CREDENTIALS, GRANT_TYPE_REFRESH_TOKEN,
    GrantType, RefreshTokenSecretRef, WgtwoGrant, WgtwoGrantStatus,
};
use crate::kubeapi::kube_message;
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
/// sent only while the Lease is held for at least that much longer, and the state Secret write is
/// abandoned (the answer stays in memory, the write is retried) when it takes longer.
pub const PERSIST_BUDGET: Duration = Duration::from_secs(5);

/// How long the apiserver keeps one watch open (kube's default is 290 s): with the watch client's
/// read timeout just above it, a watch connection that died silently is noticed within a minute.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(50);

fn watch_config() -> watcher::Config {
    watcher::Config::default().timeout(WATCH_TIMEOUT.as_secs() as u32)
}

/// Default of `--concurrency`; see the README for the measurement behind it.
pub const DEFAULT_CONCURRENCY: u16 = 16;
/// Default of `--kube-api-qps`: above what 16 reconciles send at full speed against the benchmark's
/// apiserver (docs/benchmarks.md), so it only stops a runaway loop from flooding the apiserver.
pub const DEFAULT_KUBE_API_QPS: u32 = 2000;

#[derive(Clone, Debug)]
pub struct Options {
    /// Watch only this namespace (default: all).
    pub namespace: Option<String>,
    pub ca_bundle_pem: Option<Vec<u8>>,
    pub request_timeout: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// The identity services credentials may be sent to (see [`issuers`]).
    pub allowed_issuers: Vec<AllowedIssuer>,
    /// Reconciles running at once (0: unbounded). Bounds the refresh answers waiting for their
    /// state write, and so what a crash can lose.
    pub concurrency: u16,
    /// The label and annotation prefixes a target template may set (see [`template::compile`]).
    pub template_metadata_prefixes: Vec<String>,
    /// After shutdown begins, how long kept answers whose state write failed are retried (until
    /// the pod's termination grace period would end).
    pub shutdown_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            namespace: None,
            ca_bundle_pem: None,
            request_timeout: Duration::from_secs(10),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(5 * 60),
            allowed_issuers: vec![AllowedIssuer::parse(DEFAULT_ISSUER_URL).expect("the default issuer is a URL")],
            concurrency: DEFAULT_CONCURRENCY,
            template_metadata_prefixes: template::DEFAULT_METADATA_PREFIXES.iter().map(|p| p.to_string()).collect(),
            shutdown_timeout: Duration::from_secs(25),
        }
    }
}

impl Options {
    /// How long the Lease must still be held for a token request to be sent.
    pub fn lease_margin(&self) -> Duration {
        self.request_timeout + PERSIST_BUDGET
    }
}

/// Which write of a refresh answer to the journal.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Journaling {
    /// The answer as parsed: its rotated refresh token is safe from here.
    Answer,
    /// Again with the verified ID token's claims (subject, phone number), so a replay publishes them.
    VerifiedClaims,
}

/// A refresh answer the controller is to publish, by grant.
pub type KeptAnswer = (ObjectRef<WgtwoGrant>, Pending);

/// What the controller shares with the rest of the process.
#[derive(Clone)]
pub struct Shared {
    pub metrics: Metrics,
    pub leadership: Leadership,
    /// Set once the grant watch has listed everything.
    pub synced: Arc<AtomicBool>,
    /// Where each refresh answer is written before anything else (`--journal-dir`).
    pub journal: Option<Arc<Journal>>,
    /// Answers the journal replay wrote to (or found in) the state Secrets, to be published by
    /// the first reconcile of their grants; taken once by the controller.
    pub replayed: Arc<std::sync::Mutex<Vec<KeptAnswer>>>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            metrics: Metrics::new(),
            leadership: Leadership::always(),
            synced: Default::default(),
            journal: None,
            replayed: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("could not persist the rotated refresh token ({0}); it is kept in memory and the write is retried")]
    PersistFailed(String),
}

pub struct Context {
    client: kube::Client,
    recorder: Recorder,
    options: Options,
    shared: Shared,
    memory: Memory,
    /// The grant cache, to tell whether a grant still exists.
    grants: reflector::Store<WgtwoGrant>,
    cache: Arc<SecretCache>,
    /// Product tokens, shared by the grants with the same issuer, client and scope.
    products: product::ProductTokens,
    /// Which grants read which Secret.
    index: Arc<SecretIndex>,
}

impl Context {
    /// `client` serves the reconciler's requests: give it timeouts, so no call can hang.
    pub fn new(
        client: kube::Client,
        options: Options,
        shared: Shared,
        grants: reflector::Store<WgtwoGrant>,
        cache: Arc<SecretCache>,
        index: Arc<SecretIndex>,
    ) -> Self {
        let recorder = recorder(client.clone());
        let memory = Memory::new(shared.metrics.clone());
        for (key, pending) in std::mem::take(&mut *shared.replayed.lock().unwrap()) {
            memory.keep(&key, pending);
        }
        Self { client, recorder, options, shared, memory, grants, cache, products: Default::default(), index }
    }

    fn api_backoff(&self, key: &ObjectRef<WgtwoGrant>) -> Duration {
        self.memory.next_api_backoff(key, self.options.min_backoff, self.options.max_backoff)
    }

    /// Forgets a grant that is gone: its memory, its metric series and its journal entry.
    fn forget(&self, key: &ObjectRef<WgtwoGrant>) {
        self.memory.forget(key);
        self.shared.metrics.forget_grant(key.namespace.as_deref().unwrap_or_default(), &key.name);
        if let Some(journal) = &self.shared.journal
            && let Err(err) = journal.remove(key)
        {
            warn!(namespace = key.namespace.as_deref().unwrap_or_default(), grant = %key.name, error = %err, "could not remove the journal entry of a deleted grant");
        }
    }

    /// The grant's template, checked once per generation: the check renders it (CPU its author
    /// controls), and a reconcile with nothing to do should not.
    fn template<'g>(
        &self,
        key: &ObjectRef<WgtwoGrant>,
        grant: &'g WgtwoGrant,
    ) -> Result<Option<template::Template<'g>>, template::TemplateError> {
        let spec = grant.spec.target.template.as_ref();
        let generation = grant.metadata.generation;
        if let Some(verdict) = self.memory.template_verdict(key, generation) {
            return verdict.map(|()| template::Template::checked(spec));
        }
        let compiled = template::compile(spec, &self.options.template_metadata_prefixes);
        if !compiled.as_ref().is_ok_and(Option::is_none) {
            self.memory.checked_template(key, generation, compiled.as_ref().map(|_| ()).map_err(Clone::clone));
        }
        compiled
    }

    fn client_config(&self, issuer: &str, inputs: &inputs::Inputs) -> ClientConfig {
        let mut config = ClientConfig::new(&inputs.client_id, inputs.client_secret.clone());
        config.issuer_url = issuer.to_owned();
        config.timeout = self.options.request_timeout;
        config.ca_bundle_pem = self.options.ca_bundle_pem.clone();
        config
    }
}

/// The Event recorder of the operator, naming this pod as the reporting instance.
pub fn recorder(client: kube::Client) -> Recorder {
    Recorder::new(client, Reporter { controller: MANAGER.into(), instance: crate::kubeapi::pod_name() })
}

/// Runs the controller until `shutdown`; then no reconcile starts and in-flight ones (including
/// the persistence of a rotated refresh token) finish, and answers whose state write failed are
/// retried for up to `options.shutdown_timeout`. Returns how many rotated refresh tokens are still
/// held only by this process (the Lease must then not be released: a standby would present their
/// predecessors). `watch_client` serves the long-lived watches; `api_client` every other request
/// (it should have timeouts).
pub async fn run(
    watch_client: kube::Client,
    api_client: kube::Client,
    options: Options,
    shared: Shared,
    shutdown: CancellationToken,
) -> anyhow::Result<usize> {
    let shutdown_timeout = options.shutdown_timeout;
    // Api<PartialObjectMeta<_>> asks for metadata only: nobody's Secret data is sent for it.
    let (grants, secrets, secrets_meta): (Api<WgtwoGrant>, Api<Secret>, Api<PartialObjectMeta<Secret>>) =
        match &options.namespace {
            Some(ns) => (
                Api::namespaced(watch_client.clone(), ns),
                Api::namespaced(watch_client.clone(), ns),
                Api::namespaced(watch_client, ns),
            ),
            None => (Api::all(watch_client.clone()), Api::all(watch_client.clone()), Api::all(watch_client)),
        };
    let allowed: Vec<&str> = options.allowed_issuers.iter().map(AllowedIssuer::as_str).collect();
    info!(allowed_issuers = ?allowed, "credentials are sent only to these identity services");
    let concurrency = options.concurrency;
    let (store, writer) = reflector::store();
    let cache = SecretCache::new(shared.leadership.epoch_source());
    let index = Arc::new(SecretIndex::default());
    let ctx = Arc::new(Context::new(api_client, options, shared.clone(), store.clone(), cache.clone(), index.clone()));
    let watch_ctx = ctx.clone();
    let metrics = shared.metrics.clone();
    let reader = store.clone();
    // Ready once the grants and both Secret watches have listed everything. Set here rather than by
    // Store::wait_until_ready, whose waker the Controller's own wait displaces.
    let grants_synced = Arc::new(AtomicBool::new(false));
    let mark_synced = {
        let (synced, grants_synced, cache) = (shared.synced.clone(), grants_synced.clone(), cache.clone());
        move || {
            if grants_synced.load(Ordering::Acquire) && cache.is_synced() && !synced.swap(true, Ordering::AcqRel) {
                info!("grant and Secret watches synced");
            }
        }
    };
    let grant_index = index.clone();
    let grants_done = mark_synced.clone();
    let grant_changes = watcher(grants, watch_config())
        .default_backoff()
        .modify(secret_cache::strip_grant)
        .reflect(writer)
        // Per-grant gauges follow every status change, including our own writes.
        .inspect_ok(move |event| match event {
            watcher::Event::Apply(g) | watcher::Event::InitApply(g) => {
                metrics.observe_grant(g);
                grant_index.upsert(g);
                watch_ctx.memory.own_status(&ObjectRef::from_obj(g), g.resource_version().as_deref());
            }
            watcher::Event::Delete(g) => {
                watch_ctx.forget(&ObjectRef::from_obj(g));
                grant_index.remove(g);
            }
            watcher::Event::InitDone => {
                let alive = reader.state();
                metrics
                    .retain_grants(&alive.iter().map(|g| (g.namespace().unwrap_or_default(), g.name_any())).collect());
                let alive_keys: HashSet<_> = alive.iter().map(|g| ObjectRef::from_obj(&**g)).collect();
                watch_ctx.memory.retain(&alive_keys);
                if let Some(journal) = &watch_ctx.shared.journal
                    && let Err(err) = journal.retain(&alive_keys)
                {
                    warn!(error = %err, "could not drop the journal entries of deleted grants");
                }
                grant_index.rebuild(alive.iter().map(|g| &**g));
                grants_synced.store(true, Ordering::Release);
                grants_done();
            }
            watcher::Event::Init => {}
        })
        .applied_objects()
        // Spec and (the operator's own) annotation changes only: a status patch after a failed
        // refresh must not bypass the backoff.
        .predicate_filter(predicates::generation.combine(predicates::annotations), Default::default());
    let controller = Controller::for_stream(grant_changes, store.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency));
    // Every Secret as metadata only (no data, no managedFields): whether it exists, its version
    // and owner. The operator never caches the data of anyone's Secrets.
    let (meta_cache, meta_done) = (cache.clone(), mark_synced.clone());
    let secret_changes = watcher(secrets_meta, watch_config())
        .default_backoff()
        .modify(secret_cache::strip)
        .inspect_ok(move |event| {
            meta_cache.apply_meta(event);
            if matches!(event, watcher::Event::InitDone) {
                meta_done();
            }
        })
        .touched_objects()
        // The operator's own Secrets come through the owned watch below.
        .try_filter(|s| {
            let managed = s.labels().get(LABEL_MANAGED_BY).is_some_and(|v| v == MANAGER);
            std::future::ready(!managed)
        });
    // The operator's own Secrets (state and target) with their data, kept as the few keys it reads.
    let (owned_cache, owned_done) = (cache.clone(), mark_synced);
    let own_writes = cache.clone();
    let owned_changes = watcher(secrets, watch_config().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}")))
        .default_backoff()
        .modify(secret_cache::strip)
        .inspect_ok(move |event| {
            owned_cache.apply_owned(event);
            if matches!(event, watcher::Event::InitDone) {
                owned_done();
            }
        })
        .touched_objects()
        // What the operator itself just wrote needs no second look.
        .try_filter(move |s| std::future::ready(!own_writes.is_own_write(s)));
    let by_meta = index;
    controller
        .watches_stream(secret_changes, move |secret| users_of(&by_meta, &secret.namespace(), &secret.name_any()))
        // The operator's own Secrets name their grant in a label.
        .watches_stream(owned_changes, |secret| {
            let grant = secret.labels().get(LABEL_GRANT).cloned();
            grant.map(|name| ObjectRef::new(&name).within(&secret.namespace().unwrap_or_default()))
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
    persist_kept(&ctx, tokio::time::Instant::now() + shutdown_timeout).await;
    let lost = ctx.memory.unpersisted();
    if !lost.is_empty() && ctx.shared.journal.is_some() {
        error!(grants = ?lost, "stopped with rotated refresh tokens that could not be persisted; the journal keeps them, and a restart in this pod writes them to the state Secrets");
    } else if !lost.is_empty() {
        error!(grants = ?lost, "stopped with rotated refresh tokens that could not be persisted; these grants need re-authorization unless the identity service has a rotation grace period");
    }
    info!("controller stopped");
    Ok(lost.len())
}

/// At shutdown: retries the state writes of kept answers (each decided afresh by
/// [`Run::confirm_kept`]) until none is left or `deadline`.
async fn persist_kept(ctx: &Arc<Context>, deadline: tokio::time::Instant) {
    let mut delay = Duration::from_millis(200);
    loop {
        let keys = ctx.memory.unpersisted_keys();
        if keys.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(grants = keys.len(), "shutdown: the time for persisting kept refresh answers is up");
            return;
        }
        info!(grants = keys.len(), "shutdown: retrying the state writes of kept refresh answers");
        for key in keys {
            let result = match ctx.grants.get(&key) {
                Some(grant) => tokio::time::timeout_at(deadline, reconcile(grant, ctx.clone())).await,
                None => {
                    ctx.forget(&key);
                    continue;
                }
            };
            if let Ok(Err(err)) = result {
                debug!(grant = %key.name, error = %err, "shutdown: state write still failing");
            }
        }
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + delay)).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Whether a kept answer still goes to the target Secret. Once its refresh token is persisted,
/// a target token issued at or after it is this answer's (the write landed, its reply was lost) or
/// a later refresh's from that persisted token.
fn publish_kept(pending: &Pending, published: Option<schedule::TokenTimes>) -> bool {
    !pending.persisted || published.is_none_or(|t| t.issued_at < pending.refreshed_at)
}

/// A Secret the operator owns for `grant` (state or target): labelled as the operator's and the
/// grant's, owned by the grant (so it goes with it), at `resource_version` when replacing one.
pub(crate) fn owned_secret(
    grant: &WgtwoGrant,
    name: &str,
    resource_version: Option<String>,
    data: BTreeMap<String, k8s_openapi::ByteString>,
    annotations: BTreeMap<String, String>,
    mut labels: BTreeMap<String, String>,
) -> Secret {
    labels.extend([(LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned()), (LABEL_GRANT.to_owned(), grant.name_any())]);
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: Some(vec![grant.controller_owner_ref(&()).expect("a grant read from the API has a uid")]),
            resource_version,
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

fn users_of(index: &SecretIndex, namespace: &Option<String>, secret: &str) -> Vec<ObjectRef<WgtwoGrant>> {
    let ns = namespace.as_deref().unwrap_or_default();
    index.grants_using(ns, secret).into_iter().map(|name| ObjectRef::new(&name).within(ns)).collect()
}

fn error_policy(grant: Arc<WgtwoGrant>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.shared.metrics.reconcile_error(match err {
        Error::Kube(_) => reason::KUBERNETES_API,
        Error::PersistFailed(_) => reason::PERSIST_FAILED,
    });
    let key = ObjectRef::from_obj(&*grant);
    if is_gone(&ctx, &key, &grant) {
        // Deleted while it was reconciled (its error is likely that): remember nothing of it.
        debug!(namespace = grant.namespace().unwrap_or_default(), grant = %grant.name_any(), error = %err, "reconcile error of a deleted grant");
        ctx.forget(&key);
        return Action::await_change();
    }
    let delay = ctx.api_backoff(&key);
    warn!(namespace = grant.namespace().unwrap_or_default(), grant = %grant.name_any(), error = %err, retry_in = ?delay, "reconcile error");
    Action::requeue(delay)
}

/// Everything one reconcile works with.
struct Run<'a> {
    grant: &'a WgtwoGrant,
    ctx: &'a Context,
    key: ObjectRef<WgtwoGrant>,
    /// The grant's namespace, where every Secret it names lives.
    ns: String,
    secrets: Api<Secret>,
    grants: Api<WgtwoGrant>,
    /// The target Secret's template, checked before anything is requested.
    template: Result<Option<template::Template<'a>>, template::TemplateError>,
}

/// One span per reconcile: every log line names the grant and its namespace.
#[instrument(skip_all, fields(namespace = grant.metadata.namespace.as_deref().unwrap_or(""), grant = grant.metadata.name.as_deref().unwrap_or("")))]
async fn reconcile(grant: Arc<WgtwoGrant>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.shared.metrics.reconciled();
    let key = ObjectRef::from_obj(&*grant);
    let ns = grant.namespace().expect("WgtwoGrant is namespaced");
    if grant.meta().deletion_timestamp.is_some() {
        // Being deleted: its Secrets go with it; write nothing that would bring them back.
        ctx.forget(&key);
        return Ok(Action::await_change());
    }
    // Reads come from the Secret caches: wait until they hold everything (bounded, so shutdown is
    // never held up).
    if !ctx.cache.wait_synced(Duration::from_secs(5)).await {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let run = Run {
        grant: &grant,
        ctx: &ctx,
        key: key.clone(),
        secrets: Api::namespaced(ctx.client.clone(), &ns),
        grants: Api::namespaced(ctx.client.clone(), &ns),
        ns,
        template: ctx.template(&key, &grant),
    };
    let result = run.reconcile().await;
    // Deleted while this reconcile ran: the watch has forgotten it already, and what this
    // reconcile remembered must go too.
    if is_gone(&ctx, &key, &grant) {
        ctx.forget(&key);
    }
    result
}

/// Whether the grant cache no longer holds this grant object (deleted, or deleted and created again).
fn is_gone(ctx: &Context, key: &ObjectRef<WgtwoGrant>, grant: &WgtwoGrant) -> bool {
    ctx.grants.get(key).is_none_or(|g| g.uid() != grant.uid())
}

impl Run<'_> {
    fn state_name(&self) -> String {
        lineage::state_secret_name(&self.grant.name_any())
    }

    async fn reconcile(&self) -> Result<Action, Error> {
        // An answer that could not be published goes first: never refresh past it. It stays kept
        // until every write succeeded, whatever fails here.
        if let Some(mut pending) = self.ctx.memory.pending(&self.key) {
            let state = match pending.persisted {
                true => self.owned(&self.state_name()).await?,
                // A write of it failed: it may have landed after all, and another replica or
                // process may have moved the lineage on since. Only a consistent read tells.
                false => match self.confirm_kept(&pending).await? {
                    Some(state) => state,
                    None => return Ok(Action::requeue(Duration::from_millis(200))),
                },
            };
            if let Some(s) = &state
                && lineage::decode(s.data.as_ref().unwrap_or(&BTreeMap::new()))
                    .is_some_and(|s| s.refresh_token.secret() == pending.refresh_token.secret())
            {
                pending.persisted = true;
                self.ctx.memory.persisted(&self.key);
                self.unjournal();
            }
            let target = self.owned(&self.grant.spec.target.secret_name).await?;
            let published = target.as_ref().and_then(target::published_token);
            if !publish_kept(&pending, published) {
                // The target holds this answer's token already, or a newer one (a replica refreshed
                // from the persisted token meanwhile): never put an older access token over it.
                debug!("the kept answer is published already or superseded");
                self.ctx.memory.published(&self.key);
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
            let (next, _) = self.publish(pending, state.as_ref(), target.as_ref(), None).await?;
            self.ctx.memory.reset_api_backoff(&self.key);
            // This reconcile's view of the grant predates the publish; decide afresh next time.
            return Ok(Action::requeue(until(Timestamp::now(), next)));
        }
        // Only the leader reads, refreshes and writes; becoming the leader triggers a pass.
        if !self.ctx.shared.leadership.is_leader() {
            return Ok(Action::await_change());
        }
        // Before any Secret is read: credentials go only to allowed identity services.
        let allowed = &self.ctx.options.allowed_issuers;
        if !issuers::is_allowed(&self.grant.spec.issuer_url, allowed) {
            let message = issuers::not_allowed_message(&self.grant.spec.issuer_url, allowed);
            return self.input_problem(reason::ISSUER_NOT_ALLOWED, message).await;
        }

        let spec = &self.grant.spec;
        // Before any input is read: never another grant's Secrets, never a refresh token that an
        // older grant's lineage started from.
        if let Some(problem) = self.foreign_input() {
            return self.input_problem(problem.reason, problem.message).await;
        }
        let client = self.read(&spec.client_secret_ref.name, inputs::CLIENT_KEYS).await?;
        let inputs = match inputs::client(client.as_ref(), &spec.client_secret_ref.name) {
            Ok(inputs) => inputs,
            Err(problem) => return self.input_problem(problem.reason, problem.message).await,
        };
        // None: a product grant (client credentials), which has no state Secret: nothing rotates.
        let token_ref = spec.refresh_token_secret_ref.as_ref();
        let state_secret = match token_ref {
            Some(_) => self.owned(&self.state_name()).await?,
            None => None,
        };
        let target_secret = self.owned(&spec.target.secret_name).await?;
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

        let Some(token_ref) = token_ref else {
            return self.reconcile_product(&inputs, target_secret).await;
        };
        // The user's Secret is read only when it changed since the lineage was checked against it.
        let user_version = self.ctx.cache.meta(&self.ns, &token_ref.name).map(|m| m.resource_version.to_string());
        let state = state_secret.as_ref().and_then(|s| s.data.as_ref()).and_then(lineage::decode);
        let mut chosen = if lineage::unchanged(state.as_ref(), user_version.as_deref()) {
            lineage::continued(state.expect("unchanged implies a state"))
        } else {
            let user = self.read_once(&token_ref.name, &token_ref.key).await?;
            match inputs::user_token(user.as_ref(), &token_ref.name, &token_ref.key) {
                Ok(token) => lineage::choose(&token, state),
                Err(problem) => return self.input_problem(problem.reason, problem.message).await,
            }
        };
        chosen.source_version = user_version;
        let fingerprint = self.request_fingerprint(&inputs, &chosen.refresh_token);
        if !chosen.adopted && chosen.failed.as_deref() == Some(fingerprint.as_str()) {
            // Refused for good with exactly these inputs: wait for the user to change one.
            return Ok(Action::requeue(PERMANENT_RECHECK));
        }

        let now = Timestamp::now();
        let published = target_secret.as_ref().and_then(target::published_token);
        // Adopting the first token of a grant is covered by "no token"; a new lineage over a
        // published token is a re-authorization.
        match self.decide(now, published, chosen.adopted && state_secret.is_some()) {
            Decision::WaitUntil(at) => self.keep_until(now, published, target_secret.as_ref(), at).await,
            Decision::BackingOff(at) => {
                debug!(next_attempt = %at, "backing off after failed attempts");
                Ok(Action::requeue(until(now, at)))
            }
            Decision::RefreshNow(why) => {
                self.refresh(&inputs, chosen, fingerprint, why, state_secret, target_secret, published).await
            }
        }
    }

    /// For a kept answer whose state write failed: the state Secret as stored now, if the answer
    /// still belongs in it (or is in it already: its write landed after all); `None` when something
    /// newer took its place (another leader refreshed from what the failed write left, the grant was
    /// recreated, the subscriber authorized again): the answer is dropped, never written over it.
    async fn confirm_kept(&self, pending: &Pending) -> Result<Option<Option<Secret>>, Error> {
        let stored = self.secrets.get_opt(&self.state_name()).await?;
        let state = stored.as_ref().and_then(|s| s.data.as_ref()).and_then(lineage::decode);
        let uid = self.grant.uid();
        let seen = replay::Seen {
            grant_uid: uid.as_deref(),
            state_foreign: stored.as_ref().is_some_and(|s| !self.owns(s)),
            state: state.as_ref(),
            user_token_sha256: None,
        };
        match replay::verdict(&pending.answer(), &seen) {
            replay::Verdict::Write | replay::Verdict::AlreadyPersisted => {
                if let Some(stored) = &stored {
                    self.ctx.cache.wrote(stored);
                }
                Ok(Some(stored))
            }
            replay::Verdict::Superseded(why) => {
                warn!(reason = why, "a kept refresh answer was superseded before it could be written; dropped");
                self.ctx.memory.superseded(&self.key);
                self.unjournal();
                Ok(None)
            }
        }
    }

    /// The rotated refresh token is held only in memory (and the journal): the status says so, as
    /// the grant would not survive a restart without the journal. Best effort: the apiserver that
    /// refused the write may refuse this too.
    async fn report_persist_failure(&self, failure: &Error, target: Option<&Secret>) {
        let valid = target.and_then(target::published_token).filter(|t| t.expires_at > Timestamp::now());
        let still_valid = match valid {
            Some(t) => format!(" The published access token stays valid until {}.", t.expires_at),
            None => " No valid access token is published.".into(),
        };
        let message = format!(
            "The rotated refresh token could not be written to Secret {}: {failure}. Until it is, a restart of the operator without its journal ends this grant.{still_valid}",
            self.state_name()
        );
        let why = reason::PERSIST_FAILED;
        let changed = status::previous_ready(self.current_status().as_ref()).is_none_or(|c| c.reason != why);
        if changed {
            self.event(EventType::Warning, why, message.clone()).await;
        }
        if let Err(err) = self.set_ready(valid.is_some(), why, message, |_| {}).await {
            debug!(error = %err, "could not report the failed state write in the status");
        }
    }

    /// An input that is not this grant's to read: a Secret the operator writes (a grant author who
    /// may not read Secrets would otherwise have the operator present another grant's live refresh
    /// token, forking its lineage), or a refresh-token Secret an older grant uses (two lineages from
    /// one token: the second presentation revokes the first's family).
    fn foreign_input(&self) -> Option<inputs::Problem> {
        let spec = &self.grant.spec;
        let token = spec.refresh_token_secret_ref.as_ref();
        let named = [
            (Some(spec.client_secret_ref.name.as_str()), "clientSecretRef"),
            (token.map(|t| t.name.as_str()), "refreshTokenSecretRef"),
        ];
        for (name, field) in named {
            let Some(name) = name else { continue };
            if self.ctx.cache.is_operators(&self.ns, name) {
                return Some(inputs::Problem {
                    reason: reason::SECRET_NOT_ALLOWED,
                    message: format!(
                        "Secret {name} ({field}) is written by the operator for a grant (its state or target Secret) and cannot be a grant's input: name the Secret that holds the authorization or the OAuth client"
                    ),
                });
            }
        }
        let token = token?;
        let users = self.ctx.index.token_users(&self.ns, &token.name);
        let has_state = |grant: &str| self.ctx.cache.meta(&self.ns, &lineage::state_secret_name(grant)).is_some();
        let user = index::token_user(&users, has_state)?;
        (user != self.grant.name_any()).then(|| inputs::Problem {
            reason: reason::REFRESH_TOKEN_IN_USE,
            message: format!(
                "Secret {} (refreshTokenSecretRef) is the authorization of grant {user} already: one refresh token can start one lineage only (every refresh rotates it, and presenting it twice revokes it). Authorize this grant separately (wgtwo-operator authorize {} -n {}), or delete one of the grants",
                token.name,
                self.grant.name_any(),
                self.ns
            ),
        })
    }

    /// When to renew the published token (the same schedule for both grant types).
    fn decide(&self, now: Timestamp, published: Option<schedule::TokenTimes>, new_authorization: bool) -> Decision {
        let requested = self.grant.annotations().get(ANNOTATION_REFRESH_REQUESTED);
        // The cached grant may predate our own last status write.
        let handled = self.current_status().and_then(|s| s.refresh_request_handled);
        schedule::decide(&Observed {
            now,
            token: published,
            new_authorization,
            refresh_requested: requested.is_some() && requested != handled.as_ref(),
            refresh_before: self.refresh_before(),
            jitter_seed: self.jitter_seed(),
            retry_not_before: self.retry_not_before(),
        })
    }

    /// The published token stays until `at`: the status says so.
    async fn keep_until(
        &self,
        now: Timestamp,
        published: Option<schedule::TokenTimes>,
        target: Option<&Secret>,
        at: Timestamp,
    ) -> Result<Action, Error> {
        let token = published.expect("waiting implies a published token");
        debug!(next = %at, "access token valid; next refresh scheduled");
        let problem = match &self.template {
            // Left as it is: its keys still hold the current token.
            Err(problem) => Some(problem.clone()),
            Ok(template) => {
                let want = template.as_ref().map(|t| t.hash());
                match target.and_then(target::template_hash) == want {
                    true => None,
                    false => self.render_target_again().await?,
                }
            }
        };
        self.set_published(token.expires_at, problem, |s| {
            s.expires_at = Some(Time(token.expires_at));
            s.last_refresh_time = Some(Time(token.issued_at));
            // Whole seconds, as stored: an unrounded time would differ from the stored one and be
            // written again by every reconcile.
            s.next_refresh_time = Some(Time(ceil_seconds(at)));
            s.failed_attempts = None;
            s.last_failure_time = None;
        })
        .await?;
        Ok(Action::requeue(until(now, at)))
    }

    /// A product grant (client credentials): the same schedule, a token shared by every grant with
    /// the same issuer, client and scope, no state Secret.
    async fn reconcile_product(&self, inputs: &inputs::Inputs, target_secret: Option<Secret>) -> Result<Action, Error> {
        let now = Timestamp::now();
        let published = target_secret.as_ref().and_then(target::published_token);
        match self.decide(now, published, false) {
            Decision::WaitUntil(at) => self.keep_until(now, published, target_secret.as_ref(), at).await,
            Decision::BackingOff(at) => {
                debug!(next_attempt = %at, "backing off after failed attempts");
                Ok(Action::requeue(until(now, at)))
            }
            Decision::RefreshNow(why) => self.product_token(inputs, why, target_secret, published).await,
        }
    }

    async fn product_token(
        &self,
        inputs: &inputs::Inputs,
        why: RefreshReason,
        target_secret: Option<Secret>,
        published: Option<schedule::TokenTimes>,
    ) -> Result<Action, Error> {
        let recovering = self.failed_attempts() > 0;
        let spec = &self.grant.spec;
        let client = match self.oauth_client(inputs).await {
            Ok(client) => client,
            Err(err) => return self.refresh_failed(err, None, published).await,
        };
        if !self.ctx.shared.leadership.is_leader() {
            return Ok(Action::await_change());
        }
        let scope = spec.scope.as_deref();
        let key = product::key(&spec.issuer_url, &inputs.client_id, inputs.client_secret.secret(), scope);
        let want = product::Want {
            published,
            refresh_before: self.refresh_before(),
            jitter_seed: self.jitter_seed(),
            // Asked for by a person: a new token, and at once; its retries follow the key's backoff.
            forced: why == RefreshReason::Requested && !recovering,
        };
        let options = &self.ctx.options;
        let metrics = &self.ctx.shared.metrics;
        let retry_at = |err: &OAuthError, attempts: u32| {
            let random = (self.jitter_seed() % 1000) as f64 / 1000.0;
            let backoff = (options.min_backoff, options.max_backoff);
            product::retry_at(err, attempts, backoff, PERMANENT_RECHECK, random, Timestamp::now())
        };
        let request = || async {
            info!(reason = why.as_str(), "requesting a product token (client credentials)");
            let sent = Instant::now();
            let answer = client.client_credentials(scope).await;
            let seconds = sent.elapsed().as_secs_f64();
            metrics.token_request(GRANT_TYPE_CLIENT_CREDENTIALS, request_result(answer.as_ref().err()), seconds);
            answer.map(|tokens| {
                let issued_at = whole_seconds(Timestamp::now());
                let expires_at = whole_seconds(tokens.expires_at.unwrap_or(issued_at + DEFAULT_LIFETIME));
                product::Issued { tokens, times: schedule::TokenTimes { issued_at, expires_at } }
            })
        };
        let (answer, source) = self.ctx.products.token(&key, &want, retry_at, request).await;
        metrics.grant_refresh(&self.ns, &self.grant.name_any(), request_result(answer.as_ref().err()));
        let issued = match answer {
            Ok(issued) => issued,
            Err(err) => return self.refresh_failed(err, None, published).await,
        };
        if source == product::Source::Shared {
            debug!(issued_at = %issued.times.issued_at, "using the product token another grant requested");
        }
        let source = match source {
            product::Source::Requested => metrics::source::REQUESTED,
            product::Source::Shared => metrics::source::SHARED,
        };
        let next = self.publish_token(&issued.tokens, issued.times, None, target_secret.as_ref(), source).await?;
        self.ctx.memory.reset_api_backoff(&self.key);
        if schedule::announce(why, recovering) {
            self.event(EventType::Normal, reason::REFRESHED, format!("Access token renewed: {}", why.as_str())).await;
        }
        Ok(Action::requeue(until(Timestamp::now(), next)))
    }

    /// The grant's OAuth client, discovered once per issuer, client id and client secret.
    async fn oauth_client(&self, inputs: &inputs::Inputs) -> Result<Arc<WgtwoClient>, OAuthError> {
        let issuer = &self.grant.spec.issuer_url;
        let client_key = lineage::sha256_hex(&[issuer, &inputs.client_id, inputs.client_secret.secret()]);
        let config = self.ctx.client_config(issuer, inputs);
        self.ctx.memory.client(&self.key, client_key, || WgtwoClient::discover(config)).await
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
        let recovering = self.failed_attempts() > 0;
        let client = match self.oauth_client(inputs).await {
            Ok(client) => client,
            Err(err) => {
                let refused = Refused { chosen, fingerprint, state: state_secret.as_ref() };
                return self.refresh_failed(err, Some(refused), published).await;
            }
        };
        // A refresh token may be presented once only, so the state it came from must be the latest:
        // a copy this process wrote itself in this leadership term is; any other (a watch event, a
        // copy from before another leader's term, or none at all) may lag a write of the previous
        // leader or process, and is confirmed with a consistent read.
        let epoch = self.ctx.shared.leadership.epoch();
        if !self.ctx.cache.is_own_copy(&self.ns, &self.state_name(), epoch) {
            let stored = self.secrets.get_opt(&self.state_name()).await?;
            let version = |s: &Option<Secret>| s.as_ref().and_then(|s| s.resource_version());
            if version(&stored) != version(&state_secret) {
                debug!("the cached state Secret was behind the stored one; deciding again");
                if let Some(stored) = &stored {
                    self.ctx.cache.wrote(stored);
                }
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
        }
        // Checked after the last await before sending: a replica whose Lease may lapse before the
        // answer is persisted must not present the refresh token (the next leader would too).
        // The term must also be the one the state was confirmed in.
        if !self.ctx.shared.leadership.may_send(self.ctx.options.lease_margin())
            || self.ctx.shared.leadership.epoch() != epoch
        {
            return Ok(if self.ctx.shared.leadership.is_leader() {
                debug!("Lease held with too little margin; refresh deferred");
                Action::requeue(Duration::from_secs(1))
            } else {
                Action::await_change()
            });
        }
        info!(reason = why.as_str(), "refreshing");
        let sent = Instant::now();
        let (uid, presented_sha256) =
            (self.grant.uid().unwrap_or_default(), lineage::sha256_hex(&[chosen.refresh_token.secret()]));
        let pending = |tokens: TokenSet, (received, refreshed_at): (Instant, Timestamp)| Pending {
            uid: uid.clone(),
            presented_sha256: presented_sha256.clone(),
            refresh_token: tokens.refresh_token.clone().unwrap_or_else(|| chosen.refresh_token.clone()),
            source: chosen.source.clone(),
            source_version: chosen.source_version.clone(),
            tokens,
            refreshed_at,
            received,
            persisted: false,
        };
        let mut answered = None;
        let scope = self.grant.spec.scope.as_deref();
        let result = client
            .refresh_then(&chosen.refresh_token, scope, |tokens| {
                // Journaled the moment the answer is parsed, before the ID token is verified.
                let at = (Instant::now(), whole_seconds(Timestamp::now()));
                answered = Some(at);
                self.journal(&chosen.refresh_token, &pending(tokens.clone(), at), Journaling::Answer);
            })
            .await;
        let at = answered.unwrap_or_else(|| (Instant::now(), whole_seconds(Timestamp::now())));
        let received = at.0;
        // Kept before anything else can fail or wait: from here on the rotated refresh token is
        // removed only once the state Secret holds it.
        let answer = result.map(|answer| {
            let pending = pending(answer.tokens.clone(), at);
            self.ctx.memory.keep(&self.key, pending.clone());
            (pending, answer)
        });
        let outcome = request_result(answer.as_ref().err());
        let seconds = received.duration_since(sent).as_secs_f64();
        self.ctx.shared.metrics.token_request(GRANT_TYPE_REFRESH_TOKEN, outcome, seconds);
        self.ctx.shared.metrics.grant_refresh(&self.ns, &self.grant.name_any(), outcome);
        let (pending, answer) = match answer {
            Ok(answer) => answer,
            Err(err) => {
                let refused = Refused { chosen, fingerprint, state: state_secret.as_ref() };
                return self.refresh_failed(err, Some(refused), published).await;
            }
        };
        // The state Secret first; the ID token is verified after (it may fetch the issuer's keys).
        let verify = Verify { client: &client, answer, presented: &chosen.refresh_token };
        let (next, id_token_problem) =
            self.publish(pending, state_secret.as_ref(), target_secret.as_ref(), Some(verify)).await?;
        self.ctx.memory.reset_api_backoff(&self.key);
        if schedule::announce(why, recovering) {
            self.event(EventType::Normal, reason::REFRESHED, format!("Access token refreshed: {}", why.as_str())).await;
        }
        if let Some(problem) = id_token_problem {
            warn!(problem = %problem, "ID token of the refresh answer failed verification");
            let note = format!(
                "The ID token of the refresh answer failed verification ({problem}); the new tokens were kept, and no claim was taken from it"
            );
            self.event(EventType::Warning, reason::ID_TOKEN_NOT_VERIFIED, note).await;
        }
        Ok(Action::requeue(until(Timestamp::now(), next)))
    }

    /// Writes the answer: rotated refresh token first, then the access token, then the status. The
    /// answer stays kept in memory until all three succeeded (a retried write of the same token is
    /// harmless). With `verify` (a fresh answer), its ID token is verified after the state write
    /// (whether or not that succeeded), and a phone number the ID token did not carry is asked from
    /// userinfo, once per authorization. Returns when the next refresh is due, and why the ID token
    /// did not verify, if it did not.
    async fn publish(
        &self,
        mut pending: Pending,
        state: Option<&Secret>,
        target: Option<&Secret>,
        verify: Option<Verify<'_>>,
    ) -> Result<(Timestamp, Option<String>), Error> {
        let known = state
            .and_then(|s| s.data.as_ref())
            .and_then(lineage::decode)
            .filter(|s| s.source == pending.source)
            .and_then(|s| s.phone);
        // A token whose granted scope lacks `phone` carries no phone number: nothing to ask userinfo.
        let not_granted = target::phone_not_granted(pending.tokens.scope.as_deref()).then_some(None);
        let claimed = |p: &Pending| p.tokens.id_token.as_ref().and_then(|id| id.phone_number.clone()).map(Some);
        let written_phone = claimed(&pending).or(known.clone()).or(not_granted.clone());
        let lineage_state = |phone: Option<Option<String>>| RefreshState {
            refresh_token: pending.refresh_token.clone(),
            source: pending.source.clone(),
            source_version: pending.source_version.clone(),
            failed: None,
            phone,
        };
        let mut state = state.cloned();
        let mut persist_failure = None;
        if !pending.persisted {
            // Bounded so that it ends inside the Lease margin the request was sent with.
            let name = self.state_name();
            let data = lineage::encode(&lineage_state(written_phone.clone()));
            let write = self.write_secret(&name, state.as_ref(), data, BTreeMap::new(), BTreeMap::new());
            match tokio::time::timeout(PERSIST_BUDGET, write).await {
                Ok(Ok(written)) => {
                    pending.persisted = true;
                    self.ctx.memory.persisted(&self.key);
                    self.unjournal();
                    state = Some(written);
                    // The crash window of a rotating refresh token: answer received -> state written.
                    info!(
                        persist_ms = pending.received.elapsed().as_millis() as u64,
                        "rotated refresh token persisted"
                    );
                }
                Ok(Err(err)) => persist_failure = Some(Error::PersistFailed(kube_message(&err))),
                Err(_) => {
                    persist_failure = Some(Error::PersistFailed(format!(
                        "no answer from the Kubernetes API within {}s",
                        PERSIST_BUDGET.as_secs()
                    )))
                }
            }
        }
        let client = verify.as_ref().map(|v| v.client);
        if let Some(Verify { client, mut answer, presented }) = verify {
            client.verify_refreshed(&mut answer).await;
            pending.tokens.id_token = answer.tokens.id_token;
            pending.tokens.id_token_error = answer.tokens.id_token_error;
            // A retry of the write (or the journal's replay) publishes the claims too.
            self.ctx.memory.keep(&self.key, pending.clone());
            if !pending.persisted && pending.tokens.id_token.is_some() {
                self.journal(presented, &pending, Journaling::VerifiedClaims);
            }
        }
        if let Some(failure) = persist_failure {
            self.report_persist_failure(&failure, target).await;
            return Err(failure);
        }
        let mut phone = claimed(&pending).or(known).or(not_granted);
        if phone.is_some() && phone != written_phone {
            // Learnt from the ID token after the state write: remembered for this lineage.
            let data = lineage::encode(&lineage_state(phone.clone()));
            match self.write_secret(&self.state_name(), state.as_ref(), data, BTreeMap::new(), BTreeMap::new()).await {
                Ok(written) => state = Some(written),
                Err(err) => warn!(error = %kube_message(&err), "could not remember the phone number"),
            }
        }
        if let (None, Some(client)) = (&phone, client) {
            // A provider may give scope-granted claims only from userinfo (OpenID Connect Core
            // 5.4). Asked after the rotated token is safe, and remembered with the lineage.
            match client.userinfo(&pending.tokens.access_token).await {
                Ok(info) => {
                    phone = Some(info.phone_number);
                    let data = lineage::encode(&lineage_state(phone.clone()));
                    if let Err(err) = self
                        .write_secret(&self.state_name(), state.as_ref(), data, BTreeMap::new(), BTreeMap::new())
                        .await
                    {
                        warn!(error = %kube_message(&err), "could not remember the phone number; userinfo is asked again next time");
                    }
                }
                Err(err) => warn!(error = %err, "userinfo failed; the phone number is asked again at the next refresh"),
            }
        }
        // Whole seconds (rounded down: never later than the server said), as RFC 3339 readers expect.
        let expires_at = whole_seconds(pending.tokens.expires_at.unwrap_or(pending.refreshed_at + DEFAULT_LIFETIME));
        let times = schedule::TokenTimes { issued_at: pending.refreshed_at, expires_at };
        let phone = phone.flatten().or_else(|| target.and_then(target::phone_number));
        let next = self.publish_token(&pending.tokens, times, phone, target, metrics::source::REQUESTED).await?;
        self.ctx.memory.published(&self.key);
        Ok((next, pending.tokens.id_token_error))
    }

    /// Writes the access token to the target Secret, then the status. Returns when the next
    /// refresh is due.
    async fn publish_token(
        &self,
        tokens: &TokenSet,
        times: schedule::TokenTimes,
        phone: Option<String>,
        target: Option<&Secret>,
        source: &str,
    ) -> Result<Timestamp, Error> {
        let data = target::data(tokens, times.expires_at, phone);
        let (shaped, problem) = target::shape(data, times.issued_at, self.template.as_ref().map(Option::as_ref));
        self.write_target(target, shaped).await?;
        let next = schedule::refresh_at(times, self.refresh_before(), self.jitter_seed());
        let subject = tokens.id_token.as_ref().map(|id| id.subject.clone());
        let handled = self.grant.annotations().get(ANNOTATION_REFRESH_REQUESTED).cloned();
        self.set_published(times.expires_at, problem, |s| {
            s.expires_at = Some(Time(times.expires_at));
            s.last_refresh_time = Some(Time(times.issued_at));
            s.next_refresh_time = Some(Time(ceil_seconds(next)));
            s.scope.clone_from(&tokens.scope);
            if subject.is_some() {
                s.subject.clone_from(&subject);
            }
            if handled.is_some() {
                s.refresh_request_handled.clone_from(&handled);
            }
            s.failed_attempts = None;
            s.last_failure_time = None;
        })
        .await?;
        // Counted once published in full: a retried status write would otherwise count twice.
        self.ctx.shared.metrics.token_published(self.grant.spec.grant_type().as_str(), source);
        Ok(next)
    }

    /// A failed token request (or, for a product grant, the shared failure of its key). `refused`
    /// is a subscriber's lineage: a refusal is remembered in its state Secret.
    async fn refresh_failed(
        &self,
        err: OAuthError,
        refused: Option<Refused<'_>>,
        published: Option<schedule::TokenTimes>,
    ) -> Result<Action, Error> {
        let now = Timestamp::now();
        let valid = published.filter(|t| t.expires_at > now);
        let still_valid = valid
            .map(|t| format!(" The published access token stays valid until {}.", t.expires_at))
            .unwrap_or_else(|| " No valid access token is published.".into());
        let attempts = self.failed_attempts().saturating_add(1);
        let failed_at = Time(whole_seconds(now));
        if err.class() == ErrorClass::Permanent {
            let (why, advice) = self.permanent_advice(&err);
            if let Some(Refused { chosen, fingerprint, state }) = refused
                && matches!(err, OAuthError::Rejected { .. } | OAuthError::AnswerUnusable { .. })
            {
                // Remember that these inputs were refused, so they are not sent again.
                let data = lineage::encode(&RefreshState {
                    refresh_token: chosen.refresh_token,
                    source: chosen.source,
                    source_version: chosen.source_version,
                    failed: Some(fingerprint),
                    phone: None,
                });
                self.write_secret(&self.state_name(), state, data, BTreeMap::new(), BTreeMap::new()).await?;
            }
            let message = format!("{}. {}.{still_valid}", sentence(&err), advice.trim_end_matches('.'));
            warn!(reason = why, error = %err, "refresh refused; waiting for a fix");
            self.ctx.shared.metrics.reconcile_error(why);
            self.event(EventType::Warning, why, message.clone()).await;
            self.set_ready(false, why, message, |s| {
                s.failed_attempts = Some(attempts);
                s.last_failure_time = Some(failed_at.clone());
            })
            .await?;
            return Ok(Action::requeue(PERMANENT_RECHECK));
        }
        // The backoff lives in the status (attempts, next attempt), so a restart continues it.
        let random = (self.jitter_seed() ^ u64::from(attempts).wrapping_mul(0x9E37_79B9_7F4A_7C15)) % 1000;
        let delay = schedule::backoff_delay(
            attempts,
            self.ctx.options.min_backoff,
            self.ctx.options.max_backoff,
            random as f64 / 1000.0,
        )
        .max(err.retry_after().unwrap_or_default());
        let next_attempt = ceil_seconds(now + SignedDuration::try_from(delay).unwrap_or(SignedDuration::MAX));
        // The same words on every retry: the condition and the Event change only when the reason does.
        let message = format!(
            "Refresh failed: {}. Retrying with backoff; status.nextRefreshTime is the next attempt.{still_valid}",
            sentence(&err)
        );
        let why = if valid.is_some() { reason::RETRYING_REFRESH } else { reason::IDENTITY_SERVICE_UNAVAILABLE };
        self.ctx.shared.metrics.reconcile_error(why);
        warn!(error = %err, attempts, next_attempt = %next_attempt, "refresh failed");
        self.event(EventType::Warning, "RefreshFailed", message.clone()).await;
        self.set_ready(valid.is_some(), why, message, |s| {
            s.failed_attempts = Some(attempts);
            s.last_failure_time = Some(failed_at.clone());
            s.next_refresh_time = Some(Time(next_attempt));
        })
        .await?;
        let generation = self.grant.metadata.generation;
        self.ctx.memory.failed(&self.key, Failure { attempts, failed_at: failed_at.0, next_attempt, generation });
        Ok(Action::requeue(until(Timestamp::now(), next_attempt)))
    }

    /// The backoff after failed attempts: the status keeps it across restarts and leaders; this
    /// process's own last write covers the moment the cached status is older than that write.
    fn retry_not_before(&self) -> Option<Timestamp> {
        let stored = status::retry_not_before(self.grant.status.as_ref(), self.grant.metadata.generation);
        stored.max(self.own_failure().map(|f| f.next_attempt))
    }

    /// Failed token requests in a row, by the same two sources.
    fn failed_attempts(&self) -> u32 {
        let stored = self.grant.status.as_ref().and_then(|s| s.failed_attempts).unwrap_or(0);
        stored.max(self.own_failure().map_or(0, |f| f.attempts))
    }

    /// This process's last recorded failure, unless the status shows a refresh since (e.g. by
    /// another leader).
    fn own_failure(&self) -> Option<Failure> {
        let refreshed = self.grant.status.as_ref().and_then(|s| s.last_refresh_time.as_ref()).map(|t| t.0);
        self.ctx
            .memory
            .failure(&self.key, self.grant.metadata.generation)
            .filter(|f| refreshed.is_none_or(|r| r < f.failed_at))
    }

    fn permanent_advice(&self, err: &OAuthError) -> (&'static str, String) {
        let spec = &self.grant.spec;
        let client = format!("Check client_id and client_secret in Secret {}", spec.client_secret_ref.name);
        let token_ref = match spec.grant_type() {
            GrantType::RefreshToken(token_ref) => token_ref,
            GrantType::ClientCredentials => return product_advice(err, client),
        };
        let RefreshTokenSecretRef { name, key } = token_ref;
        let reauthorize = format!(
            "Re-authorize: put a new refresh token into Secret {name} key {key} (wgtwo-operator authorize {} -n {})",
            self.grant.name_any(),
            self.grant.namespace().unwrap_or_default()
        );
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
            None if matches!(err, OAuthError::AnswerUnusable { .. }) => (
                reason::REFRESH_OUTCOME_UNKNOWN,
                format!(
                    "The refresh token is used up and its successor was lost with the answer, so it is not sent again (that would be a reuse). {reauthorize}"
                ),
            ),
            None => (reason::REFRESH_REJECTED, "Check spec.issuerUrl and the client Secret".into()),
        }
    }

    /// The status of a grant whose target holds a valid token: Ready, unless its template cannot be
    /// applied (the token is renewed all the same: a template mistake must not cut workloads off).
    async fn set_published(
        &self,
        expires_at: Timestamp,
        problem: Option<template::TemplateError>,
        edit: impl Fn(&mut WgtwoGrantStatus),
    ) -> Result<(), Error> {
        let Some(problem) = problem else {
            return self.set_ready(true, reason::REFRESHED, self.valid_message(expires_at), edit).await;
        };
        let message = format!(
            "{problem}. The template's keys, labels and annotations are not applied until it is fixed; the access token is still renewed: Secret {} holds one valid until {expires_at} under access_token",
            self.grant.spec.target.secret_name
        );
        let why = reason::TEMPLATE_INVALID;
        self.ctx.shared.metrics.reconcile_error(why);
        let changed = status::previous_ready(self.current_status().as_ref())
            .is_none_or(|c| c.reason != why || c.message != message);
        if changed {
            warn!(problem = %problem, "the target Secret's template cannot be applied");
            self.event(EventType::Warning, why, message.clone()).await;
        }
        self.set_ready(false, why, message, edit).await
    }

    /// Applies a changed template to the published token without a token request: one GET of the
    /// target Secret (the cache keeps no token), rendered from the operator's own keys.
    async fn render_target_again(&self) -> Result<Option<template::TemplateError>, Error> {
        let Some(stored) = self.secrets.get_opt(&self.grant.spec.target.secret_name).await? else {
            return Ok(None);
        };
        let Some(token) = target::published_token(&stored) else {
            return Ok(None);
        };
        let (shaped, problem) =
            target::shape(target::own_keys(&stored), token.issued_at, self.template.as_ref().map(Option::as_ref));
        // A template that fails with the real values leaves the Secret as it is (what it holds is
        // for the current token): rewriting it would only repeat at every reconcile.
        if problem.is_none() {
            debug!("applying the changed template to the target Secret");
            self.write_target(Some(&stored), shaped).await?;
        }
        Ok(problem)
    }

    async fn write_target(&self, existing: Option<&Secret>, shaped: target::Shaped) -> Result<Secret, kube::Error> {
        let target::Shaped { data, labels, annotations } = shaped;
        self.write_secret(&self.grant.spec.target.secret_name, existing, data, annotations, labels).await
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
            next.grant_type = Some(self.grant.spec.grant_type().as_str().to_owned());
            edit(&mut next);
            next
        };
        // The cached grant may predate our own last status write: build on that write then, or the
        // apply would drop fields only a refresh knows (subject, scope) or restore stale ones.
        let current = self.current_status();
        let next = next_from(current.as_ref());
        if Some(&next) == current.as_ref() {
            return Ok(());
        }
        let patch = serde_json::json!({
            "apiVersion": WgtwoGrant::api_version(&()),
            "kind": WgtwoGrant::kind(&()),
            "status": next,
        });
        let written = self
            .grants
            .patch_status(&self.grant.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch))
            .await?;
        if let Some(version) = written.resource_version() {
            self.ctx.memory.wrote_status(&self.key, version, written.status.unwrap_or(next));
        }
        Ok(())
    }

    /// The grant's status as stored: the cached one, or this process's own last write when the
    /// cache has not caught up with it yet.
    fn current_status(&self) -> Option<WgtwoGrantStatus> {
        self.ctx
            .memory
            .own_status(&self.key, self.grant.resource_version().as_deref())
            .or_else(|| self.grant.status.clone())
    }

    /// Creates the Secret, or replaces it based on `existing`'s resourceVersion.
    async fn write_secret(
        &self,
        name: &str,
        existing: Option<&Secret>,
        data: BTreeMap<String, k8s_openapi::ByteString>,
        annotations: BTreeMap<String, String>,
        labels: BTreeMap<String, String>,
    ) -> Result<Secret, kube::Error> {
        let version = existing.and_then(|s| s.resource_version());
        let secret = owned_secret(self.grant, name, version, data, annotations, labels);
        let written = match existing {
            None => self.secrets.create(&PostParams::default(), &secret).await?,
            Some(_) => self.secrets.replace(name, &PostParams::default(), &secret).await?,
        };
        self.ctx.cache.wrote(&written);
        Ok(written)
    }

    /// An operator-owned Secret (state or target) of this grant, from the cache.
    async fn owned(&self, name: &str) -> Result<Option<Secret>, kube::Error> {
        self.ctx.cache.owned(&self.secrets, &self.ns, name).await
    }

    /// `keys` of one of the grant's input Secrets, from the cache while its version is unchanged.
    async fn read(&self, name: &str, keys: &[&str]) -> Result<Option<Secret>, kube::Error> {
        self.ctx.cache.read(&self.secrets, &self.ns, name, keys, true).await
    }

    /// The user's refresh-token Secret: read only when it changed, and not kept (once the state
    /// records its version it is not read again).
    async fn read_once(&self, name: &str, key: &str) -> Result<Option<Secret>, kube::Error> {
        self.ctx.cache.read(&self.secrets, &self.ns, name, &[key], false).await
    }

    /// Writes the answer to the journal, if there is one: synchronously, before any await, as the
    /// rotated refresh token exists nowhere else yet. A failure leaves it in memory only, as
    /// without a journal.
    fn journal(&self, presented: &RefreshToken, pending: &Pending, what: Journaling) {
        let Some(journal) = &self.ctx.shared.journal else { return };
        let uid = self.grant.uid().unwrap_or_default();
        match journal.write(&journal::Entry::new(&self.key, &uid, presented, pending)) {
            // The crash window that remains: answer received -> journal written.
            Ok(()) if what == Journaling::Answer => {
                info!(journal_us = pending.received.elapsed().as_micros() as u64, "refresh answer journaled")
            }
            Ok(()) => debug!("the ID token's claims journaled with the answer"),
            Err(err) => {
                self.ctx.shared.metrics.journal_write_failed();
                warn!(error = %err, "could not write the refresh answer to the journal; until the state Secret holds it, it is in memory only");
            }
        }
    }

    /// The state Secret holds the answer's refresh token: the journal entry has done its job.
    fn unjournal(&self) {
        if let Some(journal) = &self.ctx.shared.journal
            && let Err(err) = journal.remove(&self.key)
        {
            // Harmless: replay finds the state Secret holding the token and drops the entry.
            warn!(error = %err, "could not remove the journal entry of a persisted answer");
        }
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
        let reference = self.grant.object_ref(&());
        let result = match type_ {
            // A success, at most once per refresh (`schedule::announce`): created directly. kube's
            // Recorder keeps the last Event of every grant for six minutes to count repeats (at
            // 10,000 grants refreshing together: tens of MiB) and scans that cache on every publish.
            EventType::Normal => {
                let event = normal_event(&reference, why, note);
                let events: Api<K8sEvent> = Api::namespaced(self.ctx.client.clone(), &self.ns);
                events.create(&PostParams::default(), &event).await.map(|_| ())
            }
            // Failures repeat with every retry: the Recorder counts them in one Event (series).
            EventType::Warning => {
                let event =
                    Event { type_, reason: why.to_owned(), note: Some(note), action: ACTION.into(), secondary: None };
                self.ctx.recorder.publish(&event, &reference).await
            }
        };
        if let Err(err) = result {
            warn!(error = %err, "could not publish an Event");
        }
    }
}

/// A fresh refresh answer, for [`Run::publish`] to verify once its rotated refresh token is safe.
struct Verify<'a> {
    client: &'a WgtwoClient,
    answer: crate::oauth::RefreshAnswer,
    /// The refresh token the answer rotated (for the journal).
    presented: &'a RefreshToken,
}

/// A subscriber's refresh that failed: what it presented, so a refusal can be remembered.
struct Refused<'a> {
    chosen: lineage::Chosen,
    fingerprint: String,
    state: Option<&'a Secret>,
}

/// An error as the start of a sentence in a message: without the final period the server's
/// description may bring, since the message adds its own.
fn sentence(err: &OAuthError) -> String {
    err.to_string().trim_end_matches('.').to_owned()
}

/// The `result` label of a token request's metrics.
fn request_result(error: Option<&OAuthError>) -> &'static str {
    match error {
        None => metrics::result::SUCCESS,
        Some(e) if e.class() == ErrorClass::Permanent => metrics::result::REJECTED,
        Some(_) => metrics::result::RETRYABLE_ERROR,
    }
}

/// Reason and advice for a refused product-token request. Nothing here speaks of subscribers or
/// re-authorization: a product token has neither.
fn product_advice(err: &OAuthError, client: String) -> (&'static str, String) {
    match err.oauth_error() {
        Some("invalid_client") => (reason::INVALID_CLIENT, format!("The OAuth client was refused. {client}")),
        Some("unauthorized_client") => (
            reason::UNAUTHORIZED_CLIENT,
            format!(
                "The client may not use the client_credentials grant: allow it for the client at the identity service, or use a client that may. {client}"
            ),
        ),
        Some("invalid_scope") => (
            reason::INVALID_SCOPE,
            "Fix spec.scope: the client is not allowed every scope it asks for (unset, the client's default scope is used)".into(),
        ),
        None if matches!(err, OAuthError::Discovery { .. }) => {
            (reason::DISCOVERY_FAILED, "Check spec.issuerUrl: it must be the identity service's base URL".into())
        }
        _ => (reason::TOKEN_REQUEST_REJECTED, format!("Check spec.issuerUrl, spec.scope and the client. {client}")),
    }
}

/// The `action` of the operator's Events.
const ACTION: &str = "Refresh";

/// A Normal Event as kube's Recorder writes it (events.k8s.io/v1), without its cache.
fn normal_event(regarding: &k8s_openapi::api::core::v1::ObjectReference, why: &str, note: String) -> K8sEvent {
    let now = Timestamp::now();
    K8sEvent {
        action: Some(ACTION.into()),
        reason: Some(why.to_owned()),
        event_time: Some(MicroTime(now)),
        regarding: Some(regarding.clone()),
        note: Some(note),
        metadata: ObjectMeta {
            namespace: regarding.namespace.clone(),
            name: Some(format!("{}.{:x}", regarding.name.as_deref().unwrap_or(MANAGER), now.as_nanosecond())),
            ..Default::default()
        },
        reporting_controller: Some(MANAGER.into()),
        reporting_instance: Some(crate::kubeapi::pod_name().unwrap_or_else(|| MANAGER.into())),
        type_: Some("Normal".into()),
        ..Default::default()
    }
}

fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// Rounded up: the status keeps whole seconds, and a next attempt must not come early.
fn ceil_seconds(t: Timestamp) -> Timestamp {
    let down = whole_seconds(t);
    if down == t { t } else { down.checked_add(SignedDuration::from_secs(1)).unwrap_or(down) }
}

fn until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO).max(Duration::from_millis(200))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(issued_at: Timestamp) -> Option<schedule::TokenTimes> {
        Some(schedule::TokenTimes { issued_at, expires_at: issued_at + SignedDuration::from_secs(3600) })
    }

    #[test]
    fn a_persisted_answer_never_replaces_a_target_token_issued_at_or_after_it() {
        let at: Timestamp = "2026-11-26T10:00:00Z".parse().unwrap();
        let second = SignedDuration::from_secs(1);
        assert!(publish_kept(&Pending::sample(at, true), None));
        assert!(publish_kept(&Pending::sample(at, true), target(at - second)));
        assert!(!publish_kept(&Pending::sample(at, true), target(at)), "its own token, already written");
        assert!(!publish_kept(&Pending::sample(at, true), target(at + second)), "a later refresh's token");
        // Not yet persisted: publish() must write the state Secret whatever the target holds.
        assert!(publish_kept(&Pending::sample(at, false), target(at + second)));
    }
}
