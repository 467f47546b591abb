//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several replicas exactly one
//! sends refresh requests. Rotating refresh tokens make a double refresh fatal to a grant, so the
//! contract is stricter than "probably the leader": a replica may send a token request only while
//! it holds the Lease with enough time left to send it and persist the answer
//! ([`Leadership::may_send`]).
//!
//! Written by hand because the crates that exist (kube-lease-manager, kube-leader-election) report
//! "leader or not" but not *until when*, measured on this process's monotonic clock from before the
//! renewal was sent; that instant is what makes a paused or partitioned ex-leader stop in time.
//!
//! The protocol is client-go's: the holder renews `renewTime` every `renew_period`; another
//! replica takes over once it has seen the same record unchanged for `leaseDurationSeconds` on its
//! own clock (no clock synchronisation needed). Every write carries the resourceVersion it read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica: the pod name plus a random suffix, so a restarted process never mistakes an
    /// old record for its own.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_period: Duration,
}

/// Who may send token requests. Cheap to clone; all clones share the state.
#[derive(Clone, Debug)]
pub struct Leadership {
    held_until: watch::Sender<Held>,
    /// Leading as last announced by the elector (for triggers; decisions use `held_until`).
    leading: watch::Sender<bool>,
    /// Incremented each time this replica acquires the Lease (before it may send anything): what it
    /// knew from an earlier term may have been changed by another leader in between.
    epoch: Arc<AtomicU64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Held {
    /// No election (a single replica by configuration).
    Always,
    /// Held until this instant (in the past when not held).
    Until(Option<Instant>),
    /// Shutting down: never again.
    Stopped,
}

impl Leadership {
    /// Without election: this process always leads (for `--leader-elect=false`).
    pub fn always() -> Self {
        Self {
            held_until: watch::Sender::new(Held::Always),
            leading: watch::Sender::new(true),
            epoch: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Elected: leads only after [`LeaseElector::run`] has acquired the Lease.
    pub fn elected() -> Self {
        Self {
            held_until: watch::Sender::new(Held::Until(None)),
            leading: watch::Sender::new(false),
            epoch: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The current term: changes whenever this replica (re)acquires the Lease.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The term counter itself, for caches that mark what was learnt in which term.
    pub fn epoch_source(&self) -> Arc<AtomicU64> {
        self.epoch.clone()
    }

    /// Whether this replica holds the Lease now.
    pub fn is_leader(&self) -> bool {
        self.may_send(Duration::ZERO)
    }

    /// Whether a token request may be sent now: the Lease is held for at least `margin` more (the
    /// time to send the request and persist the rotated refresh token).
    pub fn may_send(&self, margin: Duration) -> bool {
        match *self.held_until.borrow() {
            Held::Always => true,
            Held::Until(until) => until.is_some_and(|u| u.checked_duration_since(Instant::now()) > Some(margin)),
            Held::Stopped => false,
        }
    }

    /// Stops leading for good (graceful shutdown): no new token request starts after this.
    pub fn stop(&self) {
        self.held_until.send_replace(Held::Stopped);
        self.leading.send_replace(false);
    }

    /// Yields once each time this replica becomes the leader (and at once if it leads already).
    pub fn became_leader(&self) -> impl futures::Stream<Item = ()> + Send + 'static {
        let rx = self.leading.subscribe();
        futures::stream::unfold((rx, true), |(mut rx, first)| async move {
            loop {
                if !first || !*rx.borrow_and_update() {
                    rx.changed().await.ok()?;
                }
                if *rx.borrow_and_update() {
                    return Some(((), (rx, false)));
                }
            }
        })
    }

    /// Records the Lease held until `until`; returns whether that begins a new term.
    fn set_until(&self, until: Instant) -> bool {
        let mut new_term = false;
        self.held_until.send_if_modified(|held| match held {
            Held::Until(u) => {
                // Not held until now: a new term, begun before anyone can see the Lease held.
                if u.is_none_or(|u| u <= Instant::now()) {
                    self.epoch.fetch_add(1, Ordering::SeqCst);
                    new_term = true;
                }
                *u = Some(until);
                true
            }
            _ => false,
        });
        new_term
    }

    fn give_up(&self) {
        self.held_until.send_if_modified(|held| match held {
            Held::Until(u @ Some(_)) => {
                *u = None;
                true
            }
            _ => false,
        });
    }
}

/// The part of a Lease record that changes on every renewal; a follower times how long it has
/// stayed the same.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordVersion {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    resource_version: Option<String>,
}

impl RecordVersion {
    pub fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            holder: spec.and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty()),
            renew_time: spec.and_then(|s| s.renew_time.clone()),
            resource_version: lease.metadata.resource_version.clone(),
        }
    }
}

/// What to do with the Lease as it is now.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// No Lease yet: create it, holding it.
    Create,
    /// Nobody holds it, or its holder stopped renewing: take it over.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds it and renews.
    Follow,
}

/// Decides the next step. `observed` is the record version this replica saw last and when it
/// first saw it (on this process's clock).
pub fn decide(
    lease: Option<&Lease>,
    identity: &str,
    observed: Option<&(RecordVersion, Instant)>,
    now: Instant,
) -> Step {
    let Some(lease) = lease else { return Step::Create };
    let current = RecordVersion::of(lease);
    let Some(holder) = current.holder.as_deref() else { return Step::Acquire };
    if holder == identity {
        return Step::Renew;
    }
    let duration = lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_duration_seconds)
        .map(|s| Duration::from_secs(s.max(1) as u64))
        .unwrap_or(Duration::from_secs(15));
    match observed {
        Some((seen, since)) if *seen == current && now.duration_since(*since) >= duration => Step::Acquire,
        _ => Step::Follow,
    }
}

pub struct LeaseElector {
    api: Api<Lease>,
    config: LeaseConfig,
    leadership: Leadership,
    recorder: Option<Recorder>,
}

impl LeaseElector {
    pub fn new(client: kube::Client, config: LeaseConfig, leadership: Leadership, recorder: Option<Recorder>) -> Self {
        Self { api: Api::namespaced(client, &config.namespace), config, leadership, recorder }
    }

    /// Campaigns and renews until `cancel`, then releases the Lease if held and `release` is set
    /// (so a standby takes over at once instead of after the lease duration).
    pub async fn run(self, cancel: CancellationToken, release: Arc<std::sync::atomic::AtomicBool>) {
        let mut observed: Option<(RecordVersion, Instant)> = None;
        let mut was_leader = false;
        // Our own record of the Lease, kept after `Leadership::stop` so it can be released.
        let mut held_until: Option<Instant> = None;
        loop {
            let sent = Instant::now();
            let mut new_term = false;
            match self.tick(&mut observed).await {
                Ok(true) => {
                    held_until = Some(sent + self.config.lease_duration);
                    new_term = self.leadership.set_until(sent + self.config.lease_duration);
                }
                Ok(false) => held_until = None,
                Err(err) => warn!(error = %err, lease = %self.config.name, "leader election: Lease request failed"),
            }
            let leader = self.leadership.is_leader();
            // A new term counts as becoming the leader even when no sample saw the last one lapse
            // (a renewal that hung past the Lease's end, then succeeded): reconciles in the gap
            // found no leader and wait for this pass.
            if leader != was_leader || (leader && new_term) {
                self.leadership.leading.send_replace(leader);
                if leader != was_leader {
                    self.announce(leader).await;
                }
                was_leader = leader;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(self.config.renew_period) => {}
            }
        }
        self.leadership.stop();
        if held_until.is_some_and(|u| u > Instant::now()) && !release.load(Ordering::SeqCst) {
            warn!(lease = %self.config.name, "not releasing the Lease: a rotated refresh token is held only by this process; a standby takes over when the Lease expires");
            return;
        }
        if held_until.is_some_and(|u| u > Instant::now()) {
            match self.release().await {
                Ok(()) => info!(lease = %self.config.name, "released the Lease"),
                Err(err) => warn!(error = %err, "could not release the Lease; a standby takes over when it expires"),
            }
        }
    }

    /// One round; `Ok(true)` when this replica holds the Lease after it.
    async fn tick(&self, observed: &mut Option<(RecordVersion, Instant)>) -> Result<bool, kube::Error> {
        let lease = self.api.get_opt(&self.config.name).await?;
        let now = Instant::now();
        if let Some(lease) = &lease {
            let current = RecordVersion::of(lease);
            if observed.as_ref().is_none_or(|(seen, _)| *seen != current) {
                *observed = Some((current, now));
            }
        }
        let step = decide(lease.as_ref(), &self.config.identity, observed.as_ref(), now);
        let result = match step {
            Step::Follow => {
                self.leadership.give_up();
                return Ok(false);
            }
            Step::Create => self.api.create(&PostParams::default(), &self.record(None, true)).await,
            Step::Acquire | Step::Renew => {
                let lease = lease.expect("only Create has no Lease");
                let next = self.record(Some(&lease), step == Step::Acquire);
                self.api.replace(&self.config.name, &PostParams::default(), &next).await
            }
        };
        match result {
            Ok(_) => Ok(true),
            // Someone else wrote first: follow, and time the record from now on.
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.leadership.give_up();
                Ok(false)
            }
            Err(err) => Err(err),
        }
    }

    fn record(&self, current: Option<&Lease>, acquire: bool) -> Lease {
        let now = MicroTime(jiff::Timestamp::now());
        let spec = current.and_then(|l| l.spec.clone()).unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        Lease {
            metadata: ObjectMeta {
                name: Some(self.config.name.clone()),
                resource_version: current.and_then(|l| l.metadata.resource_version.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.config.identity.clone()),
                lease_duration_seconds: Some(self.config.lease_duration.as_secs().max(1) as i32),
                acquire_time: if acquire { Some(now.clone()) } else { spec.acquire_time },
                renew_time: Some(now),
                lease_transitions: Some(if acquire && current.is_some() { transitions + 1 } else { transitions }),
                ..Default::default()
            }),
        }
    }

    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else { return Ok(()) };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        self.api.replace(&self.config.name, &PostParams::default(), &lease).await.map(drop)
    }

    async fn announce(&self, leader: bool) {
        let (reason, note) = if leader {
            info!(identity = %self.config.identity, "became the leader");
            ("LeaderElected", format!("{} became the leader", self.config.identity))
        } else {
            info!(identity = %self.config.identity, "lost the lead; standing by");
            ("LeaderLost", format!("{} stopped leading", self.config.identity))
        };
        let Some(recorder) = &self.recorder else { return };
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("coordination.k8s.io/v1".into()),
            kind: Some("Lease".into()),
            name: Some(self.config.name.clone()),
            namespace: Some(self.config.namespace.clone()),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note),
            action: "LeaderElection".into(),
            secondary: None,
        };
        if let Err(err) = recorder.publish(&event, &reference).await {
            warn!(error = %err, "could not publish an Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, rv: &str) -> Lease {
        Lease {
            metadata: ObjectMeta { resource_version: Some(rv.into()), ..Default::default() },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(Into::into),
                lease_duration_seconds: Some(10),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn no_lease_is_created() {
        assert_eq!(decide(None, "a", None, Instant::now()), Step::Create);
    }

    #[test]
    fn own_lease_is_renewed_and_unheld_lease_is_acquired() {
        let now = Instant::now();
        assert_eq!(decide(Some(&lease(Some("a"), "1")), "a", None, now), Step::Renew);
        assert_eq!(decide(Some(&lease(None, "1")), "a", None, now), Step::Acquire);
        assert_eq!(decide(Some(&lease(Some(""), "1")), "a", None, now), Step::Acquire);
    }

    #[test]
    fn another_holder_is_followed_until_its_record_is_unchanged_for_the_lease_duration() {
        let l = lease(Some("b"), "7");
        let since = Instant::now();
        let seen = (RecordVersion::of(&l), since);
        assert_eq!(decide(Some(&l), "a", Some(&seen), since + Duration::from_secs(9)), Step::Follow);
        assert_eq!(decide(Some(&l), "a", Some(&seen), since + Duration::from_secs(10)), Step::Acquire);
        // A renewal (new resourceVersion) restarts the clock.
        let renewed = lease(Some("b"), "8");
        assert_eq!(decide(Some(&renewed), "a", Some(&seen), since + Duration::from_secs(60)), Step::Follow);
        assert_eq!(decide(Some(&l), "a", None, since + Duration::from_secs(60)), Step::Follow);
    }

    #[test]
    fn token_requests_need_the_lease_with_margin_left() {
        let leadership = Leadership::elected();
        assert!(!leadership.may_send(Duration::ZERO), "not before acquiring");
        leadership.set_until(Instant::now() + Duration::from_secs(10));
        assert!(leadership.may_send(Duration::from_secs(5)));
        assert!(!leadership.may_send(Duration::from_secs(11)), "not with less than the margin left");
        leadership.give_up();
        assert!(!leadership.is_leader());
        leadership.set_until(Instant::now() + Duration::from_secs(10));
        leadership.stop();
        assert!(!leadership.may_send(Duration::ZERO), "never after stop");
        leadership.set_until(Instant::now() + Duration::from_secs(10));
        assert!(!leadership.is_leader(), "stop is final");
    }

    #[test]
    fn each_acquisition_of_the_lease_begins_a_new_term_and_renewals_do_not() {
        let leadership = Leadership::elected();
        let start = leadership.epoch();
        assert!(leadership.set_until(Instant::now() + Duration::from_secs(10)));
        let first = leadership.epoch();
        assert!(first > start);
        assert!(!leadership.set_until(Instant::now() + Duration::from_secs(11)));
        assert_eq!(leadership.epoch(), first, "a renewal is the same term");
        leadership.give_up();
        assert!(leadership.set_until(Instant::now() + Duration::from_secs(10)));
        assert!(leadership.epoch() > first, "won back after losing it: a new term");
        // Lapsed without a give_up (a renewal that hung past the Lease's end, then succeeded):
        // a new term, which the election loop announces as becoming the leader.
        let second = leadership.epoch();
        leadership.set_until(Instant::now() - Duration::from_millis(1));
        assert!(leadership.set_until(Instant::now() + Duration::from_secs(10)));
        assert!(leadership.epoch() > second);
    }

    #[test]
    fn without_election_this_process_leads_until_stopped() {
        let leadership = Leadership::always();
        assert!(leadership.may_send(Duration::from_secs(3600)));
        leadership.stop();
        assert!(!leadership.is_leader());
    }
}
