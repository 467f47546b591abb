//! Prometheus metrics. The per-grant series (readiness, expiry, refresh counts) are encoded at
//! scrape time from the grant cache and the controller's memory ([`GrantSeries`]), a chunk of
//! grants at a time: no metric object is kept per grant, and a scrape never holds every series at
//! once. Readiness and expiry come from each grant's status as the watch caches it, so every
//! replica (leader or standby) exports the same values, a restart loses nothing, and a deleted
//! grant's series go with it. Counters and the histogram count what this replica did.

use std::fmt::Write as _;
use std::ops::Range;
use std::sync::{Arc, RwLock, Weak};

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// `result` label values of `wgtwo_grant_refresh_total`.
pub mod result {
    pub const SUCCESS: &str = "success";
    /// Failed for now (network, 5xx, 429, timeouts): retried with backoff.
    pub const RETRYABLE_ERROR: &str = "retryable_error";
    /// Refused for good (invalid_grant, invalid_client, ...): needs a person.
    pub const REJECTED: &str = "rejected";
    /// In the order of [`super::GrantSample::refreshes`].
    pub const ALL: [&str; 3] = [SUCCESS, RETRYABLE_ERROR, REJECTED];

    /// The index of `result` in [`ALL`].
    pub fn index(result: &str) -> usize {
        ALL.iter().position(|r| *r == result).expect("a known result")
    }
}

/// One grant's per-grant series, as a scrape encodes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GrantSample<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// The Ready condition is True.
    pub ready: bool,
    /// When the published access token expires (Unix seconds), if one is.
    pub expires_at: Option<i64>,
    /// Token requests (or shared product answers) this process counted, by [`result::ALL`].
    pub refreshes: [u32; 3],
}

/// Where a scrape reads the per-grant series (the controller: its grant cache and memory).
pub trait GrantSeries: Send + Sync {
    /// The grants now, in a fixed order, for one scrape.
    fn snapshot(&self) -> Box<dyn GrantSnapshot>;
}

/// The grants of one scrape.
pub trait GrantSnapshot: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Calls `each` with the samples of the grants at `range` (a chunk: the source may hold a
    /// lock meanwhile); their `refreshes` only if `refreshes` (else zero: they are looked up
    /// elsewhere).
    fn visit(&self, range: Range<usize>, refreshes: bool, each: &mut dyn FnMut(GrantSample<'_>));
}

/// Grants encoded per chunk of a scrape: small enough to keep a scrape's transient memory to a few
/// hundred KiB, large enough that a lock per chunk costs nothing.
const CHUNK: usize = 1000;

/// The index in [`GRANT_FAMILIES`] of the only family that needs the refresh counts.
const REFRESH_FAMILY: usize = 2;

/// The per-grant families: (name, help, type).
const GRANT_FAMILIES: [(&str, &str, &str); 3] = [
    (
        "wgtwo_grant_access_token_expiration_timestamp_seconds",
        "When the access token published for the grant expires (Unix time).",
        "gauge",
    ),
    ("wgtwo_grant_ready", "1 when the grant's Ready condition is True, else 0.", "gauge"),
    (
        "wgtwo_grant_refresh_total",
        "Attempts to renew a grant's token, by grant and result: a token request for a subscriber's grant; for a product grant also a token (or a failure) shared from another grant's request.",
        "counter",
    ),
];

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
    /// Set by the controller once it runs; weak, as the controller's memory holds these metrics.
    grant_series: Arc<RwLock<Option<Weak<dyn GrantSeries>>>>,
    refresh_duration: HistogramVec,
    token_requests: IntCounterVec,
    tokens_published: IntCounterVec,
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
            Box::new(refresh_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(token_requests.clone()),
            Box::new(tokens_published.clone()),
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
            grant_series: Default::default(),
            refresh_duration,
            token_requests,
            tokens_published,
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

    /// Where the per-grant series come from from now on.
    pub fn set_grant_series(&self, series: Weak<dyn GrantSeries>) {
        *self.grant_series.write().unwrap() = Some(series);
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

    /// The text exposition format, whole (see [`Self::encode_chunks`]).
    pub fn encode(&self) -> String {
        self.encode_chunks().collect()
    }

    /// The text exposition format in chunks: the registry's families, then the per-grant families
    /// encoded from one snapshot of the grants, [`CHUNK`] grants at a time, as the iterator is read.
    pub fn encode_chunks(&self) -> impl Iterator<Item = String> + Send + 'static {
        let mut head = Vec::new();
        prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut head).expect("encoding to memory");
        let head = String::from_utf8(head).expect("the text format is UTF-8");
        let series = self.grant_series.read().unwrap().as_ref().and_then(Weak::upgrade);
        let snapshot: Arc<dyn GrantSnapshot> = match series {
            Some(series) => Arc::from(series.snapshot()),
            None => Arc::new(NoGrants),
        };
        let chunks = snapshot.len().div_ceil(CHUNK);
        let grants = (0..GRANT_FAMILIES.len()).flat_map(move |family| {
            let snapshot = snapshot.clone();
            (0..chunks).map(move |chunk| {
                let range = chunk * CHUNK..((chunk + 1) * CHUNK).min(snapshot.len());
                let mut out = String::with_capacity(range.len() * 96);
                if chunk == 0 {
                    family_header(&mut out, family);
                }
                let refreshes = family == REFRESH_FAMILY;
                snapshot.visit(range, refreshes, &mut |sample| encode_sample(&mut out, family, &sample));
                out
            })
        });
        std::iter::once(head).chain(grants)
    }
}

struct NoGrants;

impl GrantSnapshot for NoGrants {
    fn len(&self) -> usize {
        0
    }
    fn visit(&self, _: Range<usize>, _: bool, _: &mut dyn FnMut(GrantSample<'_>)) {}
}

/// `# HELP` and `# TYPE` of a per-grant family. The families are written here rather than through
/// the `prometheus` crate, whose collectors build every series of a family in memory per scrape.
fn family_header(out: &mut String, family: usize) {
    let (name, help, kind) = GRANT_FAMILIES[family];
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One grant's lines of a family, with labels in the order the `prometheus` crate writes them.
fn encode_sample(out: &mut String, family: usize, sample: &GrantSample<'_>) {
    let (name, _, _) = GRANT_FAMILIES[family];
    let labels = |out: &mut String| {
        out.push_str(name);
        out.push_str("{name=\"");
        label_value(out, sample.name);
        out.push_str("\",namespace=\"");
        label_value(out, sample.namespace);
        out.push('"');
    };
    match family {
        0 => {
            if let Some(at) = sample.expires_at {
                labels(out);
                let _ = writeln!(out, "}} {at}");
            }
        }
        1 => {
            labels(out);
            let _ = writeln!(out, "}} {}", sample.ready as u8);
        }
        _ => {
            for (result, count) in result::ALL.iter().zip(sample.refreshes) {
                if count > 0 {
                    labels(out);
                    let _ = writeln!(out, ",result=\"{result}\"}} {count}");
                }
            }
        }
    }
}

/// A label value as the text format escapes it.
fn label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Owned samples, as a source would read them.
    #[derive(Clone)]
    struct Owned(String, String, bool, Option<i64>, [u32; 3]);

    struct Source(Mutex<Vec<Owned>>);

    struct Snapshot(Vec<Owned>);

    impl GrantSeries for Source {
        fn snapshot(&self) -> Box<dyn GrantSnapshot> {
            Box::new(Snapshot(self.0.lock().unwrap().clone()))
        }
    }

    impl GrantSnapshot for Snapshot {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn visit(&self, range: Range<usize>, _: bool, each: &mut dyn FnMut(GrantSample<'_>)) {
            for Owned(namespace, name, ready, expires_at, refreshes) in &self.0[range] {
                each(GrantSample { namespace, name, ready: *ready, expires_at: *expires_at, refreshes: *refreshes });
            }
        }
    }

    fn owned(ns: &str, name: &str, ready: bool, expires: Option<i64>, refreshes: [u32; 3]) -> Owned {
        Owned(ns.into(), name.into(), ready, expires, refreshes)
    }

    fn with_source(grants: Vec<Owned>) -> (Metrics, Arc<Source>) {
        let m = Metrics::new();
        let source = Arc::new(Source(Mutex::new(grants)));
        let weak: Weak<dyn GrantSeries> = Arc::downgrade(&(source.clone() as Arc<dyn GrantSeries>));
        m.set_grant_series(weak);
        (m, source)
    }

    #[test]
    fn grant_series_are_read_from_the_source_at_scrape_time_and_vanish_with_the_grant() {
        let (m, source) = with_source(vec![
            owned("a", "g1", true, Some(1_900_000_000), [2, 1, 0]),
            owned("a", "g2", false, None, [0, 0, 0]),
        ]);
        m.token_request("refresh_token", result::SUCCESS, 0.2);
        let text = m.encode();
        assert!(text.contains("wgtwo_grant_ready{name=\"g1\",namespace=\"a\"} 1\n"), "{text}");
        assert!(text.contains("wgtwo_grant_ready{name=\"g2\",namespace=\"a\"} 0\n"), "{text}");
        assert!(
            text.contains(
                "wgtwo_grant_access_token_expiration_timestamp_seconds{name=\"g1\",namespace=\"a\"} 1900000000\n"
            ),
            "{text}"
        );
        assert!(!text.contains("expiration_timestamp_seconds{name=\"g2\""), "no token, no series: {text}");
        assert!(text.contains("wgtwo_grant_refresh_total{name=\"g1\",namespace=\"a\",result=\"success\"} 2\n"));
        assert!(text.contains("wgtwo_grant_refresh_total{name=\"g1\",namespace=\"a\",result=\"retryable_error\"} 1\n"));
        assert!(!text.contains("result=\"rejected\""), "a result never counted has no series: {text}");
        assert!(!text.contains("wgtwo_grant_refresh_total{name=\"g2\""), "{text}");
        assert!(text.contains("# TYPE wgtwo_grant_refresh_total counter\n"), "{text}");
        assert!(text.contains("# TYPE wgtwo_grant_ready gauge\n"), "{text}");

        source.0.lock().unwrap().remove(0);
        let text = m.encode();
        assert!(!text.contains("name=\"g1\""), "deleted grant's series remain: {text}");
        assert!(text.contains("name=\"g2\""));
        // The histogram and the request counter have no per-grant labels, so they keep counting.
        assert!(text.contains("wgtwo_grant_refresh_duration_seconds_count{result=\"success\"} 1"), "{text}");
        assert!(text.contains(r#"wgtwo_operator_token_requests_total{grant_type="refresh_token",result="success"} 1"#));

        drop(source);
        assert!(!m.encode().contains("wgtwo_grant_ready"), "a stopped controller's grants are not reported");
    }

    #[test]
    fn each_family_is_one_block_with_one_header_however_many_chunks_it_takes() {
        let grants: Vec<Owned> =
            (0..2 * CHUNK + 7).map(|i| owned("ns", &format!("g{i}"), true, Some(i as i64), [1, 0, 0])).collect();
        let (m, _source) = with_source(grants);
        let text = m.encode();
        for (name, _, _) in GRANT_FAMILIES {
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1, "{name}");
            let lines: Vec<usize> =
                text.lines().enumerate().filter(|(_, l)| l.starts_with(&format!("{name}{{"))).map(|(i, _)| i).collect();
            assert_eq!(lines.len(), 2 * CHUNK + 7, "{name}");
            assert_eq!(lines.last().unwrap() - lines[0] + 1, lines.len(), "{name}: its lines are not contiguous");
        }
    }

    #[test]
    fn label_values_are_escaped_as_the_text_format_requires() {
        let mut out = String::new();
        label_value(&mut out, "a\\b\"c\nd");
        assert_eq!(out, r#"a\\b\"c\nd"#);
    }
}
