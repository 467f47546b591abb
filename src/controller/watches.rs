//! The controller's wiring: the grant watch and the two Secret watches (metadata of every Secret,
//! the operator's own Secrets with data) that feed the caches, the index and the reconcile
//! triggers; the run until shutdown, and the kept answers' last chance at shutdown.

use super::*;

/// How long the apiserver keeps one watch open (kube's default is 290 s): with the watch client's
/// read timeout just above it, a watch connection that died silently is noticed within a minute.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(50);

pub(super) fn watch_config(streaming_lists: bool) -> watcher::Config {
    let config = watcher::Config::default().timeout(WATCH_TIMEOUT.as_secs() as u32);
    match streaming_lists {
        true => config.streaming_lists(),
        false => config,
    }
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
    // The shutdown deadline counts from the signal, not from when in-flight reconciles finished:
    // the pod's termination grace period does.
    let signalled = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::Instant::now()
        })
    };
    // Api<PartialObjectMeta<_>> asks for metadata only: nobody's Secret data is sent for it.
    let (grants, secrets, secrets_meta): (Api<Grant>, Api<Secret>, Api<PartialObjectMeta<Secret>>) =
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
    let (concurrency, streaming) = (options.concurrency, options.streaming_lists);
    let (store, writer) = reflector::store();
    let cache = SecretCache::new(shared.leadership.epoch_source());
    let index = Arc::new(SecretIndex::default());
    let ctx = Arc::new(Context::new(api_client, options, shared.clone(), store.clone(), cache.clone(), index.clone()));
    let watch_ctx = ctx.clone();
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
    let grant_changes = watcher(grants, watch_config(streaming))
        .default_backoff()
        .reflect(writer)
        .inspect_ok(move |event| match event {
            watcher::Event::Apply(g) => {
                grant_index.upsert(g);
                // The store holds this copy now: a status this process wrote that it shows is
                // forgotten (reconciles read it from the store).
                watch_ctx.memory.own_status(&g.key(), g.resource_version().as_deref());
            }
            // Not in the store until the relist ends (InitDone): the memory stays until then.
            watcher::Event::InitApply(g) => grant_index.upsert(g),
            watcher::Event::Delete(g) => {
                watch_ctx.forget(&g.key());
                grant_index.remove(g);
            }
            watcher::Event::InitDone => {
                let alive = reader.state();
                let alive_keys: HashSet<_> = alive.iter().map(|g| g.key()).collect();
                watch_ctx.memory.retain(&alive_keys);
                watch_ctx.timers.retain(&alive_keys);
                for g in &alive {
                    watch_ctx.memory.own_status(&g.key(), g.resource_version().as_deref());
                }
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
        // Spec changes and refresh requests only: a status patch after a failed refresh must not
        // bypass the backoff.
        .predicate_filter(predicates::generation.combine(refresh_requested), Default::default());
    let controller = Controller::for_stream(grant_changes, store.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency));
    // Every Secret as metadata only (no data, no managedFields): whether it exists, its version
    // and owner. The operator never caches the data of anyone's Secrets.
    let (meta_cache, meta_done) = (cache.clone(), mark_synced.clone());
    let secret_changes = watcher(secrets_meta, watch_config(streaming))
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
    let vanish_ctx = ctx.clone();
    let owned_changes = watcher(secrets, watch_config(streaming).labels(&format!("{LABEL_MANAGED_BY}={MANAGER}")))
        .default_backoff()
        .modify(secret_cache::strip)
        .try_filter_map(move |event| {
            // A change someone else made triggers its grant; what the cache holds already (the
            // operator's own write) needs no second look: decided before the event is applied,
            // which makes it so. A (re)list triggers nothing (at a start every grant is looked at).
            let known = match &event {
                watcher::Event::Apply(s) => owned_cache.is_own_write(s),
                _ => false,
            };
            owned_cache.apply_owned(&event);
            if let watcher::Event::Delete(s) = &event
                && let Some(grant) = grant_of::<WgtwoGrant>(s)
                && vanish_ctx.cached(&grant).is_some()
            {
                // Possibly the garbage collector's work for a grant being deleted, which the grant
                // watch may show later: its next reconcile reads the grant before writing.
                vanish_ctx.memory.mark_secret_vanished(&grant);
            }
            std::future::ready(Ok(match event {
                watcher::Event::Apply(s) if !known => Some(s),
                watcher::Event::Delete(s) => Some(s),
                watcher::Event::InitDone => {
                    owned_done();
                    None
                }
                _ => None,
            }))
        });
    let by_meta = index;
    controller
        .watches_stream(secret_changes, move |secret| users_of(&by_meta, &secret.namespace(), &secret.name_any()))
        // The operator's own Secrets name their grant in a label.
        .watches_stream(owned_changes, |secret| grant_of(&secret))
        // A standby ignores everything; on becoming the leader it looks at every grant.
        .reconcile_all_on(shared.leadership.became_leader())
        // Next refreshes, rechecks and retries (kept compactly, not in kube's scheduler).
        .reconcile_on(ctx.timers.clone().due())
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(err) = result {
                warn!(error = %err, "reconcile failed");
            }
        })
        .await;
    let since = match signalled.is_finished() {
        true => signalled.await.unwrap_or_else(|_| tokio::time::Instant::now()),
        false => {
            signalled.abort();
            tokio::time::Instant::now()
        }
    };
    persist_kept(&ctx, since + shutdown_timeout).await;
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
pub(super) async fn persist_kept(ctx: &Arc<Context>, deadline: tokio::time::Instant) {
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
            let result = match ctx.cached(&key) {
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

/// The grant an operator-written Secret belongs to, by its label.
fn grant_of<K: Resource<DynamicType = ()>>(secret: &Secret) -> Option<ObjectRef<K>> {
    let name = secret.labels().get(LABEL_GRANT)?;
    Some(ObjectRef::new(name).within(&secret.namespace().unwrap_or_default()))
}

/// A predicate: the grant's refresh request (the only annotation the grant cache keeps).
fn refresh_requested(grant: &Grant) -> Option<u64> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    grant.refresh_requested.hash(&mut hasher);
    Some(hasher.finish())
}

pub(super) fn users_of(index: &SecretIndex, namespace: &Option<String>, secret: &str) -> Vec<ObjectRef<Grant>> {
    let ns = namespace.as_deref().unwrap_or_default();
    index.grants_using(ns, secret).into_iter().map(|name| ObjectRef::new(&name).within(ns)).collect()
}
