//! When each grant is next looked at (its next refresh, a recheck, a retry), kept compactly and fed
//! to the controller as triggers when due.
//!
//! kube's Controller can requeue by itself, but its scheduler keeps every request twice (a map key
//! and a delay-queue slot), each with the object reference's four strings: about 700 bytes per grant,
//! and every grant here is always scheduled. This keeps one shared key and an instant per grant in
//! two indexes (well under 200 bytes). A due grant goes through the Controller like any trigger:
//! never two reconciles of one grant at once, one that is running runs again after.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::grant::Grant;
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
}

#[derive(Default)]
pub struct Timers {
    state: Mutex<State>,
    /// An earlier instant than the one the stream sleeps until was set.
    earlier: Notify,
}

fn key_of(grant: &ObjectRef<WgtwoGrant>) -> String {
    format!("{}/{}", grant.namespace.as_deref().unwrap_or_default(), grant.name)
}

impl Timers {
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
            self.earlier.notify_one();
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
    pub fn retain(&self, alive: &std::collections::HashSet<ObjectRef<WgtwoGrant>>) {
        let alive: std::collections::HashSet<String> = alive.iter().map(key_of).collect();
        let mut state = self.state.lock().unwrap();
        state.due.retain(|(_, key)| alive.contains(&**key));
        state.at.retain(|key, _| alive.contains(&**key));
        state.at.shrink_to_fit();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().unwrap().at.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the grants due at `now`, earliest first; else when the next one is due.
    fn take_due(&self, now: Instant) -> Result<Vec<ObjectRef<Grant>>, Option<Instant>> {
        let mut state = self.state.lock().unwrap();
        let mut out = Vec::new();
        while let Some((at, _)) = state.due.first()
            && *at <= now
        {
            let (_, key) = state.due.pop_first().expect("just seen");
            state.at.remove(&key);
            let (namespace, name) = key.split_once('/').expect("keys are namespace/name");
            out.push(ObjectRef::new(name).within(namespace));
        }
        match out.is_empty() {
            true => Err(state.due.first().map(|(at, _)| *at)),
            false => Ok(out),
        }
    }

    /// The grants as they come due, for `Controller::reconcile_on`. Runs until dropped.
    pub fn due(self: Arc<Self>) -> impl Stream<Item = ObjectRef<Grant>> + Send + 'static {
        futures::stream::unfold(self, |timers| async move {
            loop {
                // `set` wakes it with `notify_one`, whose permit waits for this if nobody waits yet.
                let earlier = timers.earlier.notified();
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
        let timers = Arc::new(Timers::default());
        let mut due = Box::pin(timers.clone().due());
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
        let timers = Arc::new(Timers::default());
        let mut due = Box::pin(timers.clone().due());
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
        let timers = Timers::default();
        assert_eq!(timers.schedule(&grant("a"), Next::requeue(Duration::from_secs(60))), Action::await_change());
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.schedule(&grant("a"), Next::await_change()), Action::await_change());
        assert!(timers.is_empty());
        timers.schedule(&grant("a"), Next::requeue(Duration::MAX));
        assert!(timers.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_relist_drops_the_timers_of_grants_it_no_longer_shows() {
        let timers = Timers::default();
        for name in ["kept", "deleted"] {
            timers.schedule(&grant(name), Next::requeue(Duration::from_secs(60)));
        }
        timers.retain(&[grant("kept")].into_iter().collect());
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.take_due(Instant::now() + Duration::from_secs(61)).unwrap()[0].name, "kept");
    }
}
