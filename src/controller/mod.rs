//! The grant controller: refreshes each grant's access token ahead of expiry and publishes it, in an
//! order that survives crashes and lost answers as far as a rotating refresh token allows:
//!
//! 1. the rotated refresh token is written to the operator-owned state Secret **first**;
//! 2. then the access token to the target Secret;
//! 3. then the status.
//!
//! If step 1 fails, the answer is kept in memory and nothing else (in particular no new refresh)
//! happens for that grant until it is written, each retry decided afresh by a consistent read.
//! Every write carries the resourceVersion it was based on (optimistic concurrency).
//!
//! Here: the options, the context and one reconcile's dispatch and schedule. Along its seams:
//! [`watches`] (what feeds the caches and triggers reconciles, and shutdown), [`subscriber`] (a
//! subscriber's refresh and the answer's writes), [`client_credentials`] (a product's token),
//! [`reporting`] (status and Events, with [`outcome`] mapping every failure), [`secret_io`] (the
//! grant's Secrets and the journal).

mod client_credentials;
pub mod grant;
pub mod index;
pub mod inputs;
pub mod issuers;
pub mod journal;
pub mod lineage;
pub mod memory;
pub mod outcome;
pub mod product;
pub mod replay;
mod reporting;
pub mod schedule;
pub mod secret_cache;
mod secret_io;
mod series;
pub mod status;
mod subscriber;
pub mod target;
pub mod template;
mod timers;
mod watches;

use secret_io::Journaling;
pub(crate) use secret_io::owned_secret;
use subscriber::{Refused, publish_kept};
pub use watches::{WATCH_TIMEOUT, run};

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
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, instrument, warn};

use self::grant::Grant;
use self::index::SecretIndex;
use self::issuers::AllowedIssuer;
use self::journal::Journal;
use self::lineage::RefreshState;
use self::memory::{Failure, Memory, Pending};
use self::schedule::{Decision, Observed, RefreshReason};
use self::secret_cache::SecretCache;
use self::status::reason;
use self::timers::Next;
use crate::api::{
    DEFAULT_ISSUER_URL, GRANT_TYPE_CLIENT_CREDENTIALS, GRANT_TYPE_REFRESH_TOKEN, WgtwoGrant, WgtwoGrantStatus,
};
use crate::kubeapi::kube_message;
use crate::leader::Leadership;
use crate::metrics::{self, Metrics};
use crate::oauth::secrets::RefreshToken;
use crate::oauth::{ClientConfig, OAuthError, TokenSet, WgtwoClient};

/// Field manager and Event reporter of the operator.
pub const MANAGER: &str = "wgtwo-operator";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_GRANT: &str = "auth.wgtwo.com/grant";
/// Assumed when a token response has no `expires_in` (wgtwo always sends 3600).
const DEFAULT_LIFETIME: SignedDuration = SignedDuration::from_secs(3600);
/// Time allowed, on top of the request timeout, to persist a refresh answer: a token request is
/// sent only while the Lease is held for at least that much longer, and the state Secret write is
/// abandoned (the answer stays in memory, the write is retried) when it takes longer.
pub const PERSIST_BUDGET: Duration = Duration::from_secs(5);

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
    /// Begin (and resume after a lapse) each watch with a streaming list (WatchList) instead of a
    /// paged LIST.
    pub streaming_lists: bool,
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
            streaming_lists: false,
        }
    }
}

impl Options {
    /// How long the Lease must still be held for a token request to be sent.
    pub fn lease_margin(&self) -> Duration {
        self.request_timeout + PERSIST_BUDGET
    }
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
    /// `detail` (for the log) is the apiserver's own message, which an admission webhook may fill
    /// with what it was sent; `public` (for the grant's status and Events) says only what failed.
    #[error("could not persist the rotated refresh token ({detail}); it is kept in memory and the write is retried")]
    PersistFailed { detail: String, public: String },
}

impl Error {
    /// A failed state write, described for the log and for the grant.
    fn persist_failed(err: &kube::Error) -> Self {
        let public = match err {
            kube::Error::Api(status) => format!("the Kubernetes API answered {} {}", status.code, status.reason),
            _ => "the Kubernetes API could not be reached".into(),
        };
        Error::PersistFailed { detail: kube_message(err), public }
    }
}

pub struct Context {
    client: kube::Client,
    recorder: Recorder,
    options: Options,
    shared: Shared,
    memory: Arc<Memory>,
    /// The per-grant metric series (read from the grant cache and `memory`); the metrics hold it
    /// weakly, so it lives as long as this context.
    _series: Arc<series::Series>,
    /// The grant cache, to tell whether a grant still exists.
    grants: reflector::Store<Grant>,
    cache: Arc<SecretCache>,
    /// Product tokens, shared by the grants with the same issuer, client and scope.
    products: product::ProductTokens,
    /// Which grants read which Secret.
    index: Arc<SecretIndex>,
    /// When each grant is next looked at (fed to the Controller by [`timers::Timers::due`]).
    timers: Arc<timers::Timers>,
}

impl Context {
    /// `client` serves the reconciler's requests: give it timeouts, so no call can hang.
    pub fn new(
        client: kube::Client,
        options: Options,
        shared: Shared,
        grants: reflector::Store<Grant>,
        cache: Arc<SecretCache>,
        index: Arc<SecretIndex>,
    ) -> Self {
        let recorder = recorder(client.clone());
        let memory = Arc::new(Memory::new(shared.metrics.clone()));
        for (key, pending) in std::mem::take(&mut *shared.replayed.lock().unwrap()) {
            memory.keep(&key, pending);
        }
        // Twice the reconciles that may run at once: each slot has its next grant waiting (with
        // no bound on them, still a bound on kube's scheduler; its runner still takes every grant
        // it is handed at once).
        let timers = Arc::new(timers::Timers::new(match options.concurrency {
            0 => 1024,
            n => 2 * usize::from(n),
        }));
        let series = Arc::new(series::Series::new(grants.clone(), memory.clone()));
        let weak: std::sync::Weak<dyn metrics::GrantSeries> = Arc::downgrade(&series) as _;
        shared.metrics.set_grant_series(weak);
        Self {
            client,
            recorder,
            options,
            shared,
            memory,
            _series: series,
            grants,
            cache,
            products: Default::default(),
            timers,
            index,
        }
    }

    fn api_backoff(&self, key: &ObjectRef<WgtwoGrant>) -> Duration {
        self.memory.next_api_backoff(key, self.options.min_backoff, self.options.max_backoff)
    }

    /// Forgets a grant that is gone: its memory (with its refresh counts) and its journal entry.
    fn forget(&self, key: &ObjectRef<WgtwoGrant>) {
        self.memory.forget(key);
        self.timers.clear(key);
        if let Some(journal) = &self.shared.journal
            && let Err(err) = journal.remove(key)
        {
            warn!(namespace = key.namespace.as_deref().unwrap_or_default(), grant = %key.name, error = %err, "could not remove the journal entry of a deleted grant");
        }
    }

    /// The grant's template, checked once per template: the check renders it (CPU its author
    /// controls), and a reconcile with nothing to do should not.
    fn template<'g>(
        &self,
        key: &ObjectRef<WgtwoGrant>,
        grant: &'g Grant,
    ) -> Result<Option<template::Template<'g>>, template::TemplateError> {
        let spec = grant.spec.template.as_deref();
        let Some(checked) = template::Template::checked(spec) else { return Ok(None) };
        if let Some(verdict) = self.memory.template_verdict(key, checked.hash()) {
            return verdict.map(|()| Some(checked));
        }
        let compiled = template::compile(spec, &self.options.template_metadata_prefixes);
        self.memory.checked_template(key, checked.hash(), compiled.as_ref().map(|_| ()).map_err(Clone::clone));
        compiled
    }

    /// The Secrets in the operator's scope (every namespace, or `--namespace`), for a LIST.
    /// The cached grant under `key`.
    fn cached(&self, key: &ObjectRef<WgtwoGrant>) -> Option<Arc<Grant>> {
        let name = ObjectRef::<Grant>::new(&key.name);
        self.grants.get(&match &key.namespace {
            Some(ns) => name.within(ns),
            None => name,
        })
    }

    fn owned_secrets(&self) -> Api<Secret> {
        match &self.options.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
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

fn error_policy(grant: Arc<Grant>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.shared.metrics.reconcile_error(match err {
        Error::Kube(_) => reason::KUBERNETES_API,
        Error::PersistFailed { .. } => reason::PERSIST_FAILED,
    });
    let key = grant.key();
    if is_gone(&ctx, &key, &grant) {
        // Deleted while it was reconciled (its error is likely that): remember nothing of it.
        debug!(namespace = grant.namespace().unwrap_or_default(), grant = %grant.name_any(), error = %err, "reconcile error of a deleted grant");
        ctx.forget(&key);
        return Action::await_change();
    }
    let delay = ctx.api_backoff(&key);
    warn!(namespace = grant.namespace().unwrap_or_default(), grant = %grant.name_any(), error = %err, retry_in = ?delay, "reconcile error");
    ctx.timers.schedule(&key, Next::requeue(delay))
}

/// Everything one reconcile works with.
struct Run<'a> {
    grant: &'a Grant,
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
async fn reconcile(grant: Arc<Grant>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = grant.key();
    // Room for the timers to hand the Controller another grant.
    ctx.timers.started(key.namespace.as_deref().unwrap_or_default(), &key.name);
    let next = reconcile_grant(&grant, &ctx, key.clone()).await?;
    Ok(ctx.timers.schedule(&key, next))
}

async fn reconcile_grant(grant: &Grant, ctx: &Context, key: ObjectRef<WgtwoGrant>) -> Result<Next, Error> {
    ctx.shared.metrics.reconciled();
    let ns = grant.namespace().expect("WgtwoGrant is namespaced");
    if grant.meta().deletion_timestamp.is_some() {
        // Being deleted: its Secrets go with it; write nothing that would bring them back.
        ctx.forget(&key);
        return Ok(Next::await_change());
    }
    // Reads come from the Secret caches: wait until they hold everything (bounded, so shutdown is
    // never held up).
    if !ctx.cache.wait_synced(Duration::from_secs(5)).await {
        return Ok(Next::requeue(outcome::CACHE_WAIT));
    }
    let run = Run {
        grant,
        ctx,
        key: key.clone(),
        secrets: Api::namespaced(ctx.client.clone(), &ns),
        grants: Api::namespaced(ctx.client.clone(), &ns),
        ns,
        template: ctx.template(&key, grant),
    };
    let result = run.reconcile().await;
    // Deleted while this reconcile ran: the watch has forgotten it already, and what this
    // reconcile remembered (and would schedule) must go too.
    if is_gone(ctx, &key, grant) {
        ctx.forget(&key);
        return result.map(|_| Next::await_change());
    }
    result
}

/// Whether the grant cache no longer holds this grant object (deleted, or deleted and created again).
/// The cache may lag: see [`Run::deleted_with_its_secrets`].
fn is_gone(ctx: &Context, key: &ObjectRef<WgtwoGrant>, grant: &Grant) -> bool {
    ctx.cached(key).is_none_or(|g| g.uid() != grant.uid())
}

impl Run<'_> {
    fn state_name(&self) -> String {
        lineage::state_secret_name(&self.grant.name_any())
    }

    async fn reconcile(&self) -> Result<Next, Error> {
        // An answer that could not be published goes first: never refresh past it. It stays kept
        // until every write succeeded, whatever fails here.
        if let Some(mut pending) = self.ctx.memory.pending(&self.key) {
            let state = match pending.persisted {
                true => self.owned(&self.state_name()).await?,
                // A write of it failed: it may have landed after all, and another replica or
                // process may have moved the lineage on since. Only a consistent read tells.
                false => match self.confirm_kept(&pending).await? {
                    Some(state) => state,
                    None => return Ok(Next::requeue(outcome::AGAIN_SOON)),
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
            let target = self.owned(&self.grant.spec.target_secret).await?;
            // Holding an answer for them is sign enough that they existed or are about to. A failed
            // read is no sign of a deletion: the answer is written (for a deleted grant, the
            // collector removes what is written; a live grant's rotated token must not wait).
            match self.deleted_with_its_secrets(true, state.as_ref(), target.as_ref()).await {
                Ok(true) => return Ok(Next::await_change()),
                Ok(false) => {}
                Err(err) => {
                    warn!(error = %err, "could not read the grant to tell whether it is being deleted; writing its kept answer")
                }
            }
            let published = target.as_ref().and_then(target::published_token);
            if !publish_kept(&pending, published) {
                // The target holds this answer's token already, or a newer one (a replica refreshed
                // from the persisted token meanwhile): never put an older access token over it.
                debug!("the kept answer is published already or superseded");
                if let Some(times) = published.filter(|t| t.issued_at == pending.refreshed_at) {
                    // Its own token: the target write landed, the status write may not have (and
                    // with it the refresh request it handled, which would be handled again).
                    let problem = self.template.as_ref().err().cloned();
                    let request = pending.request.as_deref();
                    let recorded = self.record_published(&pending.tokens, times, problem, request).await;
                    // Published either way: a failing status write must not hold up the next
                    // refresh. The request it answered counts as handled until the status says so.
                    if let (Err(_), Some(request)) = (&recorded, request) {
                        self.ctx.memory.handled_unrecorded(&self.key, request);
                    }
                    self.ctx.memory.published(&self.key);
                    self.ctx.shared.metrics.token_published(self.grant.spec.grant_type(), metrics::source::REQUESTED);
                    recorded?;
                    return Ok(Next::requeue(outcome::AGAIN_SOON));
                }
                self.ctx.memory.published(&self.key);
                return Ok(Next::requeue(outcome::AGAIN_SOON));
            }
            let (next, _) = self.publish(pending, state.as_ref(), target.as_ref(), None).await?;
            self.ctx.memory.reset_api_backoff(&self.key);
            // This reconcile's view of the grant predates the publish; decide afresh next time.
            return Ok(Next::requeue(until(Timestamp::now(), next)));
        }
        // Only the leader reads, refreshes and writes; becoming the leader triggers a pass.
        if !self.ctx.shared.leadership.is_leader() {
            return Ok(Next::await_change());
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
        if let Some(problem) = self.foreign_input().await? {
            return self.input_problem(problem.reason, problem.message).await;
        }
        let client = self.read(&spec.client_secret, inputs::CLIENT_KEYS).await?;
        let inputs = match inputs::client(client.as_ref(), &spec.client_secret) {
            Ok(inputs) => inputs,
            Err(problem) => return self.input_problem(problem.reason, problem.message).await,
        };
        // None: a product grant (client credentials), which has no state Secret: nothing rotates.
        let token_ref = spec.refresh_token.as_ref();
        let state_secret = match token_ref {
            Some(_) => self.owned(&self.state_name()).await?,
            None => None,
        };
        let target_secret = self.owned(&spec.target_secret).await?;
        let seen_gone = self.ctx.memory.take_secrets_vanished(&self.key);
        let deleted = self.deleted_with_its_secrets(seen_gone, state_secret.as_ref(), target_secret.as_ref()).await;
        if deleted.is_err() && seen_gone {
            // Not known yet: the next reconcile asks again.
            self.ctx.memory.mark_secret_vanished(&self.key);
        }
        if deleted? {
            return Ok(Next::await_change());
        }
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
            return Ok(Next::requeue(outcome::PERMANENT_RECHECK));
        }

        let now = Timestamp::now();
        let published = target_secret.as_ref().and_then(target::published_token);
        // Adopting the first token of a grant is covered by "no token"; a new lineage over a
        // published token is a re-authorization.
        match self.decide(now, published, chosen.adopted && state_secret.is_some()) {
            Decision::WaitUntil(at) => self.keep_until(now, published, target_secret.as_ref(), at).await,
            Decision::BackingOff(at) => {
                debug!(next_attempt = %at, "backing off after failed attempts");
                Ok(Next::requeue(until(now, at)))
            }
            Decision::RefreshNow(why) => {
                self.refresh(&inputs, chosen, fingerprint, why, state_secret, target_secret, published).await
            }
        }
    }

    /// Whether the grant is being deleted (or is gone) although the cached copy does not show it,
    /// asked only when Secrets it keeps are missing and were there before (`seen_gone`, or the
    /// status shows it served): the garbage collector deletes them once the grant is being
    /// deleted, and the Secret watch may show that before the grant watch does. Refreshing then
    /// would bring the Secrets back for a grant being deleted and, without the state, present the
    /// authorization's refresh token again (used long ago: a reuse, which revokes the lineage). A
    /// consistent read of the grant tells; if deleted, it is forgotten as if its watch had shown
    /// the deletion.
    async fn deleted_with_its_secrets(
        &self,
        seen_gone: bool,
        state: Option<&Secret>,
        target: Option<&Secret>,
    ) -> Result<bool, Error> {
        let keeps_state = self.grant.spec.refresh_token.is_some();
        let status = self.current_status();
        if !status::secrets_lost(status.as_ref(), seen_gone, keeps_state, state.is_some(), target.is_some()) {
            return Ok(false);
        }
        let stored = self.grants.get_metadata_opt(&self.grant.name_any()).await?;
        let why = match stored {
            None => "deleted",
            Some(g) if g.metadata.uid != self.grant.uid() => "deleted and created again",
            Some(g) if g.metadata.deletion_timestamp.is_some() => "being deleted",
            // Live: someone else deleted its Secrets; they are written again.
            Some(_) => return Ok(false),
        };
        debug!(
            grant_is = why,
            "its Secrets went with the grant, which its watch had not shown yet: nothing is written"
        );
        self.ctx.forget(&self.key);
        Ok(true)
    }

    /// When to renew the published token (the same schedule for both grant types).
    fn decide(&self, now: Timestamp, published: Option<schedule::TokenTimes>, new_authorization: bool) -> Decision {
        let requested = self.grant.refresh_requested.as_deref();
        // The cached grant may predate our own last status write.
        let handled = self.current_status().and_then(|s| s.refresh_request_handled);
        let unrecorded = self.ctx.memory.handled_request(&self.key, requested, handled.as_deref());
        schedule::decide(&Observed {
            now,
            token: published,
            new_authorization,
            refresh_requested: requested.is_some()
                && requested != handled.as_deref()
                && requested != unrecorded.as_deref(),
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
    ) -> Result<Next, Error> {
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
        // A request answered whose status write failed: recorded with this status.
        let recorded = self.current_status().and_then(|s| s.refresh_request_handled);
        let requested = self.grant.refresh_requested.as_deref();
        let unrecorded = self.ctx.memory.handled_request(&self.key, requested, recorded.as_deref());
        self.set_published(token.expires_at, problem, |s| {
            if unrecorded.is_some() {
                s.refresh_request_handled.clone_from(&unrecorded);
            }
            s.expires_at = Some(Time(token.expires_at));
            s.last_refresh_time = Some(Time(token.issued_at));
            // Whole seconds, as stored: an unrounded time would differ from the stored one and be
            // written again by every reconcile.
            s.next_refresh_time = Some(Time(ceil_seconds(at)));
            s.failed_attempts = None;
            s.last_failure_time = None;
        })
        .await?;
        Ok(Next::requeue(until(now, at)))
    }

    /// The grant's OAuth client, discovered once per issuer, client id and client secret.
    async fn oauth_client(&self, inputs: &inputs::Inputs) -> Result<Arc<WgtwoClient>, OAuthError> {
        let issuer = &self.grant.spec.issuer_url;
        let client_key = lineage::sha256_hex(&[issuer, &inputs.client_id, inputs.client_secret.secret()]);
        let config = self.ctx.client_config(issuer, inputs);
        self.ctx.memory.client(&self.key, client_key, || WgtwoClient::discover(config)).await
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
        request: Option<&str>,
    ) -> Result<Timestamp, Error> {
        let data = target::data(tokens, times.expires_at, phone);
        let (shaped, problem) = target::shape(data, times.issued_at, self.template.as_ref().map(Option::as_ref));
        self.write_target(target, shaped).await?;
        let next = self.record_published(tokens, times, problem, request).await?;
        // Counted once published in full: a retried status write would otherwise count twice.
        self.ctx.shared.metrics.token_published(self.grant.spec.grant_type(), source);
        Ok(next)
    }

    /// The status of a token the target Secret holds, with the refresh request it handled (the
    /// grant's when the token request was sent). Returns when the next refresh is due.
    async fn record_published(
        &self,
        tokens: &TokenSet,
        times: schedule::TokenTimes,
        problem: Option<template::TemplateError>,
        request: Option<&str>,
    ) -> Result<Timestamp, Error> {
        let next = schedule::refresh_at(times, self.refresh_before(), self.jitter_seed());
        let subject = tokens.id_token.as_ref().map(|id| id.subject.clone());
        let handled = request.map(str::to_owned);
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
        Ok(next)
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
