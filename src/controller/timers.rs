//! When each grant is next looked at (its next refresh, a recheck, a retry, a change), kept
//! compactly and fed to the controller as triggers when due, only as fast as it starts reconciles.
//!
//! kube's Controller can requeue by itself, but its scheduler keeps every request twice (a map key
//! and a delay-queue slot), each with the object reference's four strings: about 700 bytes per grant,
//! and every grant here is always scheduled. Its tables also never shrink: every trigger handed to it
//! at once (a start, a relist, a new leadership term: one per grant) would size them for every grant
//! for good. This keeps one shared key and an instant per grant in two indexes (well under 200
//! bytes), and hands the Controller at most `limit` grants whose reconcile has not started yet. A
//! due grant goes through the Controller like any trigger: never two reconciles of one grant at
//! once, one that is running runs again after.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::grant::Grant;
use super::secret_cache::key;
use crate::api::WgtwoGrant;

/// What a reconcile decided about the next look at its grant (kube's [`Action`] does not tell its
/// delay back, and the delay is kept here rather than in kube's scheduler).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Next(Option<Duration>);

impl Next {
    /// Look again after `delay` (or earlier, on a change).
    pub const fn requeue(delay: Duration) -> Self {
        Self(Some(delay))
    }

    /// Only a change (or becoming the leader) makes it look again.
    pub const fn await_change() -> Self {
        Self(None)
    }

    pub fn delay(self) -> Option<Duration> {
        self.0
    }
}

/// `namespace/name` (neither can hold a '/'), shared by both indexes.
type Key = Arc<str>;

#[derive(Default)]
struct State {
    due: BTreeSet<(Instant, Key)>,
    at: HashMap<Key, Instant>,
    /// Grants to look at as soon as the Controller has room (a change, a start, a new term), in
    /// the order they came. Apart from `due`: a reconcile that started before the change must not
    /// replace it with its own next instant.
    ready: VecDeque<Key>,
    /// What `ready` holds.
    queued: HashSet<Key>,
    /// Handed to the Controller, their reconcile not started yet.
    handed: HashSet<Key>,
}

pub struct Timers {
    state: Mutex<State>,
    /// An earlier instant or a ready grant was set, or a handed grant's reconcile started.
    wake: Notify,
    /// At most this many grants handed to the Controller and not started.
    limit: usize,
}

fn key_of(grant: &ObjectRef<WgtwoGrant>) -> String {
    key(grant.namespace.as_deref().unwrap_or_default(), &grant.name)
}

impl Timers {
    /// Timers that hand the Controller at most `limit` grants it has not started (a few times its
    /// concurrency keeps every slot busy).
    pub fn new(limit: usize) -> Self {
        Self { state: Mutex::default(), wake: Notify::new(), limit: limit.max(1) }
    }

    /// Records `next` for the grant (replacing what was set) and returns what the Controller is
    /// told: nothing, the timer triggers it.
    pub fn schedule(&self, grant: &ObjectRef<WgtwoGrant>, next: Next) -> Action {
        // A delay too long for the clock: as good as never (a change still triggers it).
        match next.delay().and_then(|delay| Instant::now().checked_add(delay)) {
            Some(at) => self.set(grant, at),
            None => self.clear(grant),
        }
        Action::await_change()
    }

    pub fn set(&self, grant: &ObjectRef<WgtwoGrant>, at: Instant) {
        let key = key_of(grant);
        let mut state = self.state.lock().unwrap();
        let key: Key = match state.at.get_key_value(key.as_str()) {
            Some((shared, old)) => {
                let (shared, old) = (shared.clone(), *old);
                state.due.remove(&(old, shared.clone()));
                shared
            }
            None => key.into(),
        };
        let first = state.due.first().is_none_or(|(first, _)| at < *first);
        state.due.insert((at, key.clone()));
        state.at.insert(key, at);
        drop(state);
        if first {
            self.wake.notify_one();
        }
    }

    /// The grant is to be looked at as soon as the Controller has room (whatever its timer says;
    /// once looked at, its reconcile sets the next one).
    pub fn trigger(&self, namespace: &str, name: &str) {
        let key: Key = key(namespace, name).into();
        let mut state = self.state.lock().unwrap();
        if state.queued.insert(key.clone()) {
            state.ready.push_back(key);
            drop(state);
            self.wake.notify_one();
        }
    }

    /// A reconcile of the grant started (or the Controller dropped its trigger): room for another.
    pub fn started(&self, namespace: &str, name: &str) {
        if self.state.lock().unwrap().handed.remove(key(namespace, name).as_str()) {
            self.wake.notify_one();
        }
    }

    pub fn clear(&self, grant: &ObjectRef<WgtwoGrant>) {
        let key = key_of(grant);
        let mut state = self.state.lock().unwrap();
        if let Some((shared, at)) = state.at.remove_entry(key.as_str()) {
            state.due.remove(&(at, shared));
        }
        if state.at.is_empty() {
            // Give a table sized for a peak back.
            state.at.shrink_to_fit();
        }
    }

    /// Keeps only the grants in `alive` (after a relist, which may hide deletions).
    pub fn retain(&self, alive: &HashSet<ObjectRef<WgtwoGrant>>) {
        let alive: HashSet<String> = alive.iter().map(key_of).collect();
        let mut state = self.state.lock().unwrap();
        state.due.retain(|(_, key)| alive.contains(&**key));
        state.at.retain(|key, _| alive.contains(&**key));
        state.at.shrink_to_fit();
        state.ready.retain(|key| alive.contains(&**key));
        state.queued.retain(|key| alive.contains(&**key));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().unwrap().at.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the grants to look at now, in the order they came (a change when it came, a timer when
    /// it came due), as many as the Controller has room for; else when the next timer is due
    /// (`None`: when woken). A change for a grant handed already whose reconcile has not started
    /// stays ready until it starts: kube may have read the grant for it already (it runs it again
    /// after). A timer coming due for such a grant is dropped: kube reads the grant after it.
    fn take_due(&self, now: Instant) -> Result<Vec<ObjectRef<Grant>>, Option<Instant>> {
        let mut guard = self.state.lock().unwrap();
        let state = &mut *guard;
        while let Some((at, _)) = state.due.first()
            && *at <= now
        {
            let (_, key) = state.due.pop_first().expect("just seen");
            state.at.remove(&key);
            // `ready` holds every key of `queued`: a key there already stands for this one.
            if !state.handed.contains(&key) && state.queued.insert(key.clone()) {
                state.ready.push_back(key);
            }
        }
        let mut out = Vec::new();
        let mut waiting = Vec::new();
        while state.handed.len() < self.limit
            && let Some(key) = state.ready.pop_front()
        {
            if state.handed.contains(&key) {
                waiting.push(key);
                continue;
            }
            state.queued.remove(&key);
            let (namespace, name) = key.split_once('/').expect("keys are namespace/name");
            out.push(ObjectRef::new(name).within(namespace));
            state.handed.insert(key);
        }
        for key in waiting.into_iter().rev() {
            state.ready.push_front(key);
        }
        if state.ready.is_empty() && state.queued.capacity() > 64 {
            // Give the tables a start or a new term sized for every grant back.
            state.ready.shrink_to_fit();
            state.queued.shrink_to_fit();
        }
        match (out.is_empty(), state.handed.len() < self.limit) {
            (false, _) => Ok(out),
            // Grants waiting in `ready` for their reconcile to start are woken by that start.
            (true, true) => Err(state.due.first().map(|(at, _)| *at)),
            // No room: a start wakes it.
            (true, false) => Err(None),
        }
    }

    /// The grants as they come due, for `Controller::reconcile_on`. Runs until dropped.
    pub fn due(self: Arc<Self>) -> impl Stream<Item = ObjectRef<Grant>> + Send + 'static {
        futures::stream::unfold(self, |timers| async move {
            loop {
                // `set`, `trigger` and `started` wake it with `notify_one`, whose permit waits for
                // this if nobody waits yet.
                let earlier = timers.wake.notified();
                let due = timers.take_due(Instant::now());
                match due {
                    Ok(due) => {
                        drop(earlier);
                        return Some((futures::stream::iter(due), timers));
                    }
                    Err(Some(at)) => {
                        tokio::select! {
                            () = tokio::time::sleep_until(at) => {}
                            () = earlier => {}
                        }
                    }
                    Err(None) => earlier.await,
                }
            }
        })
        .flatten()
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use super::*;

    fn grant(name: &str) -> ObjectRef<WgtwoGrant> {
        ObjectRef::new(name).within("ns")
    }

    async fn next(stream: &mut (impl Stream<Item = ObjectRef<Grant>> + Unpin)) -> (String, Duration) {
        let started = Instant::now();
        let due = stream.next().await.unwrap();
        assert_eq!(due.namespace.as_deref(), Some("ns"));
        (due.name, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn grants_come_due_in_order_and_a_new_instant_replaces_the_old() {
        let (timers, mut due) = with_stream(32);
        let start = Instant::now();
        timers.set(&grant("late"), start + Duration::from_secs(30));
        timers.set(&grant("early"), start + Duration::from_secs(10));
        timers.set(&grant("moved"), start + Duration::from_secs(5));
        // A reconcile decided again: the later instant replaces the earlier one.
        timers.set(&grant("moved"), start + Duration::from_secs(20));
        timers.set(&grant("gone"), start + Duration::from_secs(15));
        timers.clear(&grant("gone"));
        assert_eq!(timers.len(), 3);
        assert_eq!(next(&mut due).await, ("early".into(), Duration::from_secs(10)));
        assert_eq!(next(&mut due).await, ("moved".into(), Duration::from_secs(10)));
        assert_eq!(next(&mut due).await, ("late".into(), Duration::from_secs(10)));
        assert!(timers.is_empty(), "a grant that came due is no longer scheduled");
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_instant_set_while_the_stream_sleeps_wakes_it() {
        let (timers, mut due) = with_stream(32);
        timers.set(&grant("hour"), Instant::now() + Duration::from_secs(3600));
        let setter = {
            let timers = timers.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                timers.schedule(&grant("soon"), Next::requeue(Duration::from_secs(2)));
            })
        };
        assert_eq!(next(&mut due).await, ("soon".into(), Duration::from_secs(3)));
        setter.await.unwrap();
        // Nothing scheduled at all, then one: also woken.
        timers.clear(&grant("hour"));
        let setter = {
            let timers = timers.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                timers.schedule(&grant("later"), Next::requeue(Duration::ZERO));
            })
        };
        assert_eq!(next(&mut due).await, ("later".into(), Duration::from_secs(5)));
        setter.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn await_change_or_an_endless_delay_unschedules_and_the_controller_is_never_told_to_requeue() {
        let timers = Timers::new(32);
        assert_eq!(timers.schedule(&grant("a"), Next::requeue(Duration::from_secs(60))), Action::await_change());
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.schedule(&grant("a"), Next::await_change()), Action::await_change());
        assert!(timers.is_empty());
        timers.schedule(&grant("a"), Next::requeue(Duration::MAX));
        assert!(timers.is_empty());
    }

    /// Timers handing at most `limit` grants not started, and their stream.
    fn with_stream(limit: usize) -> (Arc<Timers>, Pin<Box<impl Stream<Item = ObjectRef<Grant>>>>) {
        let timers = Arc::new(Timers::new(limit));
        let due = Box::pin(timers.clone().due());
        (timers, due)
    }

    /// The next grant the stream hands over within a second, if any.
    async fn handed(stream: &mut (impl Stream<Item = ObjectRef<Grant>> + Unpin)) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(1), stream.next()).await.ok().flatten().map(|g| g.name)
    }

    #[tokio::test(start_paused = true)]
    async fn the_controller_is_handed_at_most_the_limit_of_grants_not_started_and_more_as_they_start() {
        let (timers, mut due) = with_stream(2);
        // A start: every grant triggered at once.
        for name in ["a", "b", "c", "d"] {
            timers.trigger("ns", name);
        }
        assert_eq!(handed(&mut due).await.as_deref(), Some("a"));
        assert_eq!(handed(&mut due).await.as_deref(), Some("b"));
        assert_eq!(handed(&mut due).await, None, "two handed, neither started: no room");
        // A timer coming due waits for room too.
        timers.set(&grant("timed"), Instant::now());
        assert_eq!(handed(&mut due).await, None);
        timers.started("ns", "a");
        assert_eq!(handed(&mut due).await.as_deref(), Some("c"));
        assert_eq!(handed(&mut due).await, None);
        // (The Controller reports one it dropped, deleted before it started, the same way.)
        timers.started("ns", "b");
        timers.started("ns", "c");
        assert_eq!(handed(&mut due).await.as_deref(), Some("d"));
        assert_eq!(handed(&mut due).await.as_deref(), Some("timed"));
        assert_eq!(handed(&mut due).await, None);
        let state = timers.state.lock().unwrap();
        assert!(state.ready.is_empty() && state.queued.is_empty() && state.due.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_during_a_reconcile_is_not_replaced_by_the_next_instant_it_sets() {
        let (timers, mut due) = with_stream(4);
        timers.trigger("ns", "a");
        assert_eq!(handed(&mut due).await.as_deref(), Some("a"));
        timers.started("ns", "a");
        // A change while it runs, then the reconcile ends and sets its next look an hour away.
        timers.trigger("ns", "a");
        timers.schedule(&grant("a"), Next::requeue(Duration::from_secs(3600)));
        assert_eq!(handed(&mut due).await.as_deref(), Some("a"), "the change is looked at now");
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_handed_and_not_started_is_handed_again_only_once_it_starts() {
        let (timers, mut due) = with_stream(4);
        timers.trigger("ns", "a");
        assert_eq!(handed(&mut due).await.as_deref(), Some("a"));
        // A change after kube may have read the grant for it: kept until it starts.
        timers.trigger("ns", "a");
        timers.trigger("ns", "b");
        assert_eq!(handed(&mut due).await.as_deref(), Some("b"), "others are not held up");
        assert_eq!(handed(&mut due).await, None, "a is handed already");
        timers.started("ns", "a");
        assert_eq!(handed(&mut due).await.as_deref(), Some("a"));
        timers.started("ns", "a");
        assert_eq!(handed(&mut due).await, None, "once");
        // Its timer coming due before it starts: kube reads the grant after that, so no second run.
        timers.trigger("ns", "a");
        assert_eq!(handed(&mut due).await.as_deref(), Some("a"));
        timers.set(&grant("a"), Instant::now());
        assert_eq!(handed(&mut due).await, None);
        timers.started("ns", "a");
        assert_eq!(handed(&mut due).await, None, "the timer was covered by the handed run");
    }

    #[tokio::test(start_paused = true)]
    async fn timers_that_came_due_are_handed_in_turn_with_changes_not_after_every_change() {
        let (timers, mut due) = with_stream(1);
        timers.trigger("ns", "first");
        timers.set(&grant("timed"), Instant::now());
        assert_eq!(handed(&mut due).await.as_deref(), Some("first"));
        // A backlog of changes that came after the timer came due.
        for name in ["x", "y"] {
            timers.trigger("ns", name);
        }
        timers.started("ns", "first");
        assert_eq!(handed(&mut due).await.as_deref(), Some("timed"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_comes_due_on_time_while_a_change_waits_for_its_grants_reconcile_to_start() {
        let (timers, mut due) = with_stream(4);
        timers.trigger("ns", "a");
        assert_eq!(handed(&mut due).await.as_deref(), Some("a"));
        timers.trigger("ns", "a");
        let start = Instant::now();
        timers.set(&grant("x"), start + Duration::from_secs(10));
        assert_eq!(tokio::time::timeout(Duration::from_secs(11), due.next()).await.unwrap().unwrap().name, "x");
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_relist_drops_the_timers_of_grants_it_no_longer_shows() {
        let timers = Timers::new(32);
        for name in ["kept", "deleted"] {
            timers.schedule(&grant(name), Next::requeue(Duration::from_secs(60)));
        }
        timers.retain(&[grant("kept")].into_iter().collect());
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.take_due(Instant::now() + Duration::from_secs(61)).unwrap()[0].name, "kept");
    }
}
