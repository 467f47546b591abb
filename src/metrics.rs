//! Prometheus metrics. Per-grant gauges come from each grant's status as cached by the watch, so
//! every replica (leader or standby) exports the same values, a restart loses nothing, and the
//! series of a deleted grant disappear with it. Counters and the histogram count what this
//! replica did.

use std::collections::HashSet;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::api::WgtwoGrant;
use crate::controller::status;

/// `result` label values of `wgtwo_grant_refresh_total`.
pub mod result {
    pub const SUCCESS: &str = "success";
    /// Failed for now (network, 5xx, 429, timeouts): retried with backoff.
    pub const RETRYABLE_ERROR: &str = "retryable_error";
    /// Refused for good (invalid_grant, invalid_client, ...): needs a person.
    pub const REJECTED: &str = "rejected";
}

/// `source` label values of `wgtwo_operator_tokens_published_total`.
pub mod source {
    /// From a token request sent for this grant.
    pub const REQUESTED: &str = "requested";
    /// A product token another grant with the same issuer, client and scope requested.
    pub const SHARED: &str = "shared";
}

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    refresh_total: IntCounterVec,
    refresh_duration: HistogramVec,
    token_requests: IntCounterVec,
    tokens_published: IntCounterVec,
    expiration: IntGaugeVec,
    ready: IntGaugeVec,
    reconcile_errors: IntCounterVec,
    leader: IntGauge,
    unpersisted: IntGauge,
    unpersisted_peak: IntGauge,
    reconciles: IntCounter,
    grants_in_memory: IntGauge,
    clients_cached: IntGauge,
    journal_write_errors: IntCounter,
    journal_replayed: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let refresh_total = IntCounterVec::new(
            Opts::new(
                "wgtwo_grant_refresh_total",
                "Attempts to renew a grant's token, by grant and result: a token request for a subscriber's grant; for a product grant also a token (or a failure) shared from another grant's request.",
            ),
            &["namespace", "name", "result"],
        )
        .unwrap();
        let refresh_duration = HistogramVec::new(
            HistogramOpts::new(
                "wgtwo_grant_refresh_duration_seconds",
                "Duration of token refresh requests to the identity service.",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0]),
            &["result"],
        )
        .unwrap();
        let token_requests = IntCounterVec::new(
            Opts::new(
                "wgtwo_operator_token_requests_total",
                "Token requests sent to the identity service, by grant type (refresh_token: a subscriber's refresh; client_credentials: a product token, one for all grants sharing it) and result.",
            ),
            &["grant_type", "result"],
        )
        .unwrap();
        let tokens_published = IntCounterVec::new(
            Opts::new(
                "wgtwo_operator_tokens_published_total",
                "New access tokens written to target Secrets, by grant type and source (requested: from this grant's own request; shared: a product token another grant requested).",
            ),
            &["grant_type", "source"],
        )
        .unwrap();
        let expiration = IntGaugeVec::new(
            Opts::new(
                "wgtwo_grant_access_token_expiration_timestamp_seconds",
                "When the access token published for the grant expires (Unix time).",
            ),
            &["namespace", "name"],
        )
        .unwrap();
        let ready = IntGaugeVec::new(
            Opts::new("wgtwo_grant_ready", "1 when the grant's Ready condition is True, else 0."),
            &["namespace", "name"],
        )
        .unwrap();
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "wgtwo_grant_reconcile_errors_total",
                "Reconciles that ended in an error, by reason (the Ready condition's reason).",
            ),
            &["reason"],
        )
        .unwrap();
        let leader =
            IntGauge::new("wgtwo_operator_leader", "1 when this replica holds the leader Lease, else 0.").unwrap();
        let unpersisted = IntGauge::new(
            "wgtwo_operator_unpersisted_refresh_tokens",
            "Rotated refresh tokens held only in this process's memory because the state Secret write has not succeeded yet: each is a grant lost if the process dies now.",
        )
        .unwrap();
        let unpersisted_peak = IntGauge::new(
            "wgtwo_operator_unpersisted_refresh_tokens_peak",
            "The most rotated refresh tokens held only in memory at once since this process started: what a crash at the worst moment would have lost (bounded by --concurrency).",
        )
        .unwrap();
        let reconciles =
            IntCounter::new("wgtwo_operator_reconciles_total", "Reconciles run (on the leader and on a standby).")
                .unwrap();
        let grants_in_memory =
            IntGauge::new("wgtwo_operator_grants_in_memory", "Grants the controller keeps per-grant memory for.")
                .unwrap();
        let clients_cached = IntGauge::new(
            "wgtwo_operator_oauth_clients_cached",
            "Discovered OAuth clients cached (one per issuer, client id and client secret in use).",
        )
        .unwrap();
        let journal_write_errors = IntCounter::new(
            "wgtwo_operator_journal_write_errors_total",
            "Refresh answers that could not be written to the journal (--journal-dir): each was in memory only until its state Secret write.",
        )
        .unwrap();
        let journal_replayed = IntCounterVec::new(
            Opts::new(
                "wgtwo_operator_journal_replayed_total",
                "Journal entries looked at on start, by result: written (to the state Secret: a grant a kill would have lost), already_persisted, superseded (dropped), kept (a permanent error; replayed at the next start).",
            ),
            &["result"],
        )
        .unwrap();
        for c in [
            Box::new(refresh_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(refresh_duration.clone()),
            Box::new(token_requests.clone()),
            Box::new(tokens_published.clone()),
            Box::new(expiration.clone()),
            Box::new(ready.clone()),
            Box::new(reconcile_errors.clone()),
            Box::new(leader.clone()),
            Box::new(unpersisted.clone()),
            Box::new(unpersisted_peak.clone()),
            Box::new(reconciles.clone()),
            Box::new(grants_in_memory.clone()),
            Box::new(clients_cached.clone()),
            Box::new(journal_write_errors.clone()),
            Box::new(journal_replayed.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // The standard process_* series (memory, CPU, open files, start time) that dashboards and
        // alerts expect from any exporter.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("metric names are unique");
        Self {
            registry,
            refresh_total,
            refresh_duration,
            token_requests,
            tokens_published,
            expiration,
            ready,
            reconcile_errors,
            leader,
            unpersisted,
            unpersisted_peak,
            reconciles,
            grants_in_memory,
            clients_cached,
            journal_write_errors,
            journal_replayed,
        }
    }

    /// A refresh answer could not be written to the journal.
    pub fn journal_write_failed(&self) {
        self.journal_write_errors.inc();
    }

    /// A journal entry was replayed on start (`written`, `already_persisted`, `superseded`, `kept`).
    pub fn journal_replayed(&self, result: &str) {
        self.journal_replayed.with_label_values(&[result]).inc();
    }

    /// How an attempt to renew a grant's token ended.
    pub fn grant_refresh(&self, namespace: &str, name: &str, result: &str) {
        self.refresh_total.with_label_values(&[namespace, name, result]).inc();
    }

    /// One token request sent to the identity service and how it ended.
    pub fn token_request(&self, grant_type: &str, result: &str, seconds: f64) {
        self.token_requests.with_label_values(&[grant_type, result]).inc();
        self.refresh_duration.with_label_values(&[result]).observe(seconds);
    }

    /// A new access token written to a grant's target Secret.
    pub fn token_published(&self, grant_type: &str, source: &str) {
        self.tokens_published.with_label_values(&[grant_type, source]).inc();
    }

    pub fn reconcile_error(&self, reason: &str) {
        self.reconcile_errors.with_label_values(&[reason]).inc();
    }

    pub fn reconciled(&self) {
        self.reconciles.inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(leader as i64);
    }

    /// Sizes of the controller's memory (see `controller::memory`).
    pub fn set_memory(&self, grants: usize, clients: usize, unpersisted: usize) {
        self.grants_in_memory.set(grants as i64);
        self.clients_cached.set(clients as i64);
        self.unpersisted.set(unpersisted as i64);
        if unpersisted as i64 > self.unpersisted_peak.get() {
            self.unpersisted_peak.set(unpersisted as i64);
        }
    }

    /// Updates the grant's gauges from its status.
    pub fn observe_grant(&self, grant: &WgtwoGrant) {
        let (Some(ns), Some(name)) = (grant.metadata.namespace.as_deref(), grant.metadata.name.as_deref()) else {
            return;
        };
        let status = grant.status.as_ref();
        let ready = status::previous_ready(status).is_some_and(|c| c.status == "True");
        self.ready.with_label_values(&[ns, name]).set(ready as i64);
        match status.and_then(|s| s.expires_at.as_ref()) {
            Some(t) => self.expiration.with_label_values(&[ns, name]).set(t.0.as_second()),
            None => {
                let _ = self.expiration.remove_label_values(&[ns, name]);
            }
        }
    }

    /// Removes every series of a deleted grant.
    pub fn forget_grant(&self, namespace: &str, name: &str) {
        let _ = self.ready.remove_label_values(&[namespace, name]);
        let _ = self.expiration.remove_label_values(&[namespace, name]);
        for result in [result::SUCCESS, result::RETRYABLE_ERROR, result::REJECTED] {
            let _ = self.refresh_total.remove_label_values(&[namespace, name, result]);
        }
    }

    /// Keeps only the series of these grants (after a relist, which may hide deletions).
    pub fn retain_grants(&self, alive: &HashSet<(String, String)>) {
        use prometheus::core::Collector;
        let mut gone = HashSet::new();
        // Only the per-grant families: gathering the registry would also read /proc.
        let families = [self.refresh_total.collect(), self.expiration.collect(), self.ready.collect()].concat();
        for family in families {
            for metric in family.get_metric() {
                let label = |n: &str| metric.get_label().iter().find(|l| l.name() == n).map(|l| l.value().to_owned());
                if let (Some(ns), Some(name)) = (label("namespace"), label("name")) {
                    let key = (ns, name);
                    if !alive.contains(&key) {
                        gone.insert(key);
                    }
                }
            }
        }
        for (ns, name) in gone {
            self.forget_grant(&ns, &name);
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("encoding to memory");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::WgtwoGrantStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn grant(ns: &str, name: &str, ready: &str, expires: Option<i64>) -> WgtwoGrant {
        let mut g: WgtwoGrant = serde_json::from_value(serde_json::json!({
            "apiVersion": "auth.wgtwo.com/v1alpha1", "kind": "WgtwoGrant",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clientSecretRef": {"name": "c"}, "refreshTokenSecretRef": {"name": "r", "key": "k"},
                     "target": {"secretName": "t"}}
        }))
        .unwrap();
        g.status = Some(WgtwoGrantStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: ready.into(),
                reason: "Refreshed".into(),
                message: String::new(),
                last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
                observed_generation: None,
            }],
            expires_at: expires.map(|s| Time(jiff::Timestamp::from_second(s).unwrap())),
            ..Default::default()
        });
        g
    }

    #[test]
    fn grant_gauges_follow_the_status_and_vanish_with_the_grant() {
        let m = Metrics::new();
        m.observe_grant(&grant("a", "g1", "True", Some(1_900_000_000)));
        m.observe_grant(&grant("a", "g2", "False", None));
        m.grant_refresh("a", "g1", result::SUCCESS);
        m.token_request("refresh_token", result::SUCCESS, 0.2);
        let text = m.encode();
        assert!(text.contains(r#"wgtwo_grant_ready{name="g1",namespace="a"} 1"#), "{text}");
        assert!(text.contains(r#"wgtwo_grant_ready{name="g2",namespace="a"} 0"#), "{text}");
        assert!(
            text.contains(
                r#"wgtwo_grant_access_token_expiration_timestamp_seconds{name="g1",namespace="a"} 1900000000"#
            ),
            "{text}"
        );
        assert!(!text.contains(r#"expiration_timestamp_seconds{name="g2""#), "no token, no series: {text}");
        assert!(text.contains(r#"wgtwo_grant_refresh_total{name="g1",namespace="a",result="success"} 1"#));

        m.forget_grant("a", "g1");
        let text = m.encode();
        assert!(!text.contains(r#"name="g1""#), "deleted grant's series remain: {text}");
        assert!(text.contains(r#"name="g2""#));
        // The histogram and the request counter have no per-grant labels, so they keep counting.
        assert!(text.contains("wgtwo_grant_refresh_duration_seconds_count{result=\"success\"} 1"), "{text}");
        assert!(text.contains(r#"wgtwo_operator_token_requests_total{grant_type="refresh_token",result="success"} 1"#));
    }

    #[test]
    fn a_relist_prunes_the_series_of_grants_deleted_meanwhile() {
        let m = Metrics::new();
        m.observe_grant(&grant("a", "gone", "True", Some(1)));
        m.observe_grant(&grant("a", "kept", "True", Some(1)));
        m.retain_grants(&HashSet::from([("a".to_owned(), "kept".to_owned())]));
        let text = m.encode();
        assert!(!text.contains(r#"name="gone""#), "{text}");
        assert!(text.contains(r#"name="kept""#), "{text}");
    }
}
