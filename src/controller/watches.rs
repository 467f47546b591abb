//! The controller's wiring: the grant watch and the two Secret watches (metadata of every Secret,
//! the operator's own Secrets with data) that feed the caches, the index and the reconcile
//! triggers; the run until shutdown, and the kept answers' last chance at shutdown.

use kube::runtime::controller::Error as ControllerError;

use super::timers::Timers;
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
    // The grants whose change the controller acts on (another object under the name, the spec, the
    // refresh request), decided against the store's copy before the reflector replaces it (kube's
    // predicate_filter would keep three strings and a hash per grant for good), and triggered once
    // the store holds the new copy: an Apply's at once, a (re)list's at its end (until then the
    // store holds the old copies, which a reconcile would read).
    let changed: Arc<std::sync::Mutex<Vec<ObjectRef<WgtwoGrant>>>> = Default::default();
    let (mark, before) = (changed.clone(), store.clone());
    let grant_changes = watcher(grants, watch_config(streaming))
        .default_backoff()
        .map_ok(move |event| {
            match &event {
                watcher::Event::Apply(g) | watcher::Event::InitApply(g)
                    if g.changed_from(before.get(&ObjectRef::from_obj(g)).as_deref()) =>
                {
                    mark.lock().unwrap().push(g.key());
                }
                // A (re)list (again, if one broke off): compared with the same store anew.
                watcher::Event::Init => mark.lock().unwrap().clear(),
                _ => {}
            }
            event
        })
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
        });
    // Every trigger goes through the timers, which hand the Controller only as many grants as it
    // starts (its scheduler would otherwise take one request per grant at a start and keep tables
    // that size for good); no trigger stream of its own.
    let controller = Controller::for_stream(futures::stream::pending(), store.clone())
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
    let (by_meta, timers) = (index, ctx.timers.clone());
    let mut feeds = tokio::task::JoinSet::new();
    // Not a status patch (after a failed refresh it must not bypass the backoff).
    feeds.spawn(feed("WgtwoGrant", grant_changes, timers.clone(), move |event: &watcher::Event<Grant>| match event {
        watcher::Event::Apply(_) | watcher::Event::InitDone => std::mem::take(&mut *changed.lock().unwrap()),
        _ => Vec::new(),
    }));
    feeds.spawn(feed("Secret metadata", secret_changes, timers.clone(), move |secret: &PartialObjectMeta<Secret>| {
        users_of(&by_meta, &secret.namespace(), &secret.name_any())
    }));
    // The operator's own Secrets name their grant in a label.
    feeds.spawn(feed("operator Secret", owned_changes, timers.clone(), |secret: &Secret| {
        grant_of(secret).into_iter().collect()
    }));
    // A standby ignores everything; on becoming the leader it looks at every grant.
    feeds.spawn({
        let (became_leader, store, timers) = (shared.leadership.became_leader(), store.clone(), timers.clone());
        async move {
            became_leader
                .for_each(move |()| {
                    for grant in store.state() {
                        timers.trigger(&grant.namespace().unwrap_or_default(), &grant.name_any());
                    }
                    std::future::ready(())
                })
                .await;
            "leadership"
        }
    });
    // A feed that ends (it should not: watches retry) stops the controller the graceful way, so
    // kept answers still get their writes; then the process fails.
    let stop = shutdown.child_token();
    let started = ctx.timers.clone();
    let controller = controller
        // Changes, next refreshes, rechecks and retries (kept compactly, not in kube's scheduler).
        .reconcile_on(ctx.timers.clone().due())
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| {
            match result {
                // Deleted after it was handed over: no reconcile starts for it.
                Err(ControllerError::ObjectNotFound(grant)) => {
                    started.started(grant.namespace.as_deref().unwrap_or_default(), &grant.name);
                }
                Err(err) => warn!(error = %err, "reconcile failed"),
                Ok(_) => {}
            }
            std::future::ready(())
        });
    let mut controller = std::pin::pin!(controller);
    let ended = tokio::select! {
        () = &mut controller => None,
        ended = feeds.join_next() => {
            error!(watch = ended.as_ref().and_then(|e| e.as_ref().ok()).copied().unwrap_or("a task"), "a watch ended; stopping");
            stop.cancel();
            controller.await;
            ended
        }
    };
    // The controller stopped without a signal: its grant store never became ready (the grant
    // watch's task ended before its first list).
    let on_its_own = ended.is_none() && !shutdown.is_cancelled();
    feeds.abort_all();
    let mut panicked = None;
    while let Some(result) = feeds.join_next().await {
        if let Err(err) = result
            && err.is_panic()
        {
            panicked.get_or_insert(err.into_panic());
        }
    }
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
    match ended {
        Some(Err(err)) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        _ if panicked.is_some() => std::panic::resume_unwind(panicked.expect("just checked")),
        Some(Ok(what)) => anyhow::bail!("the {what} watch ended"),
        Some(Err(err)) => anyhow::bail!("a watch task failed: {err}"),
        None if on_its_own => anyhow::bail!("the controller stopped without a shutdown signal"),
        None => {}
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

/// Drives a watch and hands the grants each item it yields concerns to the timers, to be looked at
/// as soon as the Controller has room. A watch error is logged; the watch retries by itself.
async fn feed<T, S>(
    what: &'static str,
    stream: S,
    timers: Arc<Timers>,
    grants_of: impl Fn(&T) -> Vec<ObjectRef<WgtwoGrant>> + Send + 'static,
) -> &'static str
where
    S: futures::Stream<Item = Result<T, watcher::Error>> + Send + 'static,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(item) => {
                for grant in grants_of(&item) {
                    timers.trigger(grant.namespace.as_deref().unwrap_or_default(), &grant.name);
                }
            }
            Err(err) => warn!(watch = what, error = %err, "watch failed; retrying"),
        }
    }
    what
}

/// The grant an operator-written Secret belongs to, by its label.
fn grant_of<K: Resource<DynamicType = ()>>(secret: &Secret) -> Option<ObjectRef<K>> {
    let name = secret.labels().get(LABEL_GRANT)?;
    Some(ObjectRef::new(name).within(&secret.namespace().unwrap_or_default()))
}

pub(super) fn users_of(index: &SecretIndex, namespace: &Option<String>, secret: &str) -> Vec<ObjectRef<WgtwoGrant>> {
    let ns = namespace.as_deref().unwrap_or_default();
    index.grants_using(ns, secret).into_iter().map(|name| ObjectRef::new(&name).within(ns)).collect()
}
