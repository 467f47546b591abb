//! What one scrape of the per-grant metric families costs at N grants, three ways over the same
//! grants: this operator's encoder (`wgtwo_operator::metrics`, chunked, from the controller's own
//! state), a `prometheus-client` Collector (the Prometheus project's Rust client; its text encoder
//! writes the whole exposition into one String), and the `prometheus` crate with one child per
//! grant and series (what the operator did before). Prints time and heap per scrape, and the heap
//! the metrics hold between scrapes.
//!
//! `cargo bench --bench scrape -- 10000 100000`

use std::alloc::{GlobalAlloc, Layout, System};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use wgtwo_operator::metrics::{GrantSample, GrantSeries, GrantSnapshot, Metrics};

/// Counts live heap bytes and their peak: written here because the figure wanted is the peak
/// during one call in this process, which allocator statistics crates do not reset per call.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Relaxed) + bytes;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, size) };
        if !q.is_null() {
            match size >= layout.size() {
                true => grew(size - layout.size()),
                false => {
                    LIVE.fetch_sub(layout.size() - size, Relaxed);
                }
            }
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One grant's values, as the controller's cache would hold them.
#[derive(Clone, Debug)]
struct Grant {
    namespace: String,
    name: String,
    ready: bool,
    expires_at: i64,
    refreshes: [u32; 3],
}

fn grants(n: usize) -> Arc<Vec<Grant>> {
    Arc::new(
        (0..n)
            .map(|i| Grant {
                namespace: format!("team-{}", i % 50),
                name: format!("subscriber-{i}"),
                ready: i % 97 != 0,
                expires_at: 1_800_000_000 + i as i64,
                refreshes: [1 + (i % 5) as u32, (i % 13 == 0) as u32, 0],
            })
            .collect(),
    )
}

struct Source(Arc<Vec<Grant>>);

impl GrantSeries for Source {
    fn snapshot(&self) -> Box<dyn GrantSnapshot> {
        Box::new(Source(self.0.clone()))
    }
}

impl GrantSnapshot for Source {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn visit(&self, range: Range<usize>, _refreshes: bool, each: &mut dyn FnMut(GrantSample<'_>)) {
        for g in &self.0[range] {
            each(GrantSample {
                namespace: &g.namespace,
                name: &g.name,
                ready: g.ready,
                expires_at: Some(g.expires_at),
                refreshes: g.refreshes,
            });
        }
    }
}

/// The same families through prometheus-client, from the same data at scrape time.
#[derive(Debug)]
struct Collector(Arc<Vec<Grant>>);

const RESULTS: [&str; 3] = ["success", "retryable_error", "rejected"];

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let help = "When the access token published for the grant expires (Unix time).";
        let mut family = encoder.encode_descriptor(
            "wgtwo_grant_access_token_expiration_timestamp_seconds",
            help,
            None,
            MetricType::Gauge,
        )?;
        for g in self.0.iter() {
            let labels = [("name", g.name.as_str()), ("namespace", g.namespace.as_str())];
            ConstGauge::new(g.expires_at).encode(family.encode_family(&labels)?)?;
        }
        let help = "1 when the grant's Ready condition is True, else 0.";
        let mut family = encoder.encode_descriptor("wgtwo_grant_ready", help, None, MetricType::Gauge)?;
        for g in self.0.iter() {
            let labels = [("name", g.name.as_str()), ("namespace", g.namespace.as_str())];
            ConstGauge::new(g.ready as i64).encode(family.encode_family(&labels)?)?;
        }
        let help = "Attempts to renew a grant's token, by grant and result.";
        let mut family = encoder.encode_descriptor("wgtwo_grant_refresh", help, None, MetricType::Counter)?;
        for g in self.0.iter() {
            for (result, count) in RESULTS.iter().zip(g.refreshes).filter(|(_, c)| *c > 0) {
                let labels = [("name", g.name.as_str()), ("namespace", g.namespace.as_str()), ("result", result)];
                let counter = prometheus_client::metrics::counter::ConstCounter::new(u64::from(count));
                counter.encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Runs `scrape` 5 times; returns the median time, the most heap above the level before it, and
/// the exposition's size.
fn measure(mut scrape: impl FnMut() -> usize) -> (Duration, usize, usize) {
    let mut times = Vec::new();
    let (mut heap, mut size) = (0, 0);
    for _ in 0..5 {
        let before = LIVE.load(Relaxed);
        PEAK.store(before, Relaxed);
        let started = Instant::now();
        size = std::hint::black_box(scrape());
        times.push(started.elapsed());
        heap = heap.max(PEAK.load(Relaxed) - before);
    }
    times.sort();
    (times[2], heap, size)
}

fn held(build: impl FnOnce() -> Box<dyn std::any::Any>) -> (Box<dyn std::any::Any>, usize) {
    let before = LIVE.load(Relaxed);
    let kept = build();
    (kept, LIVE.load(Relaxed).saturating_sub(before))
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn row(what: &str, held: usize, (time, heap, size): (Duration, usize, usize)) {
    println!(
        "  {what:<44} {:>8.1} ms {:>9.2} MiB {:>9.2} MiB {:>8.1} MiB",
        time.as_secs_f64() * 1000.0,
        mib(heap),
        mib(size),
        mib(held)
    );
}

fn main() {
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![10_000] } else { sizes };
    for n in sizes {
        let data = grants(n);
        println!("\n==> one scrape of the per-grant families at {n} grants (median of 5)");
        println!("  {:<44} {:>11} {:>13} {:>13} {:>12}", "", "time", "heap (peak)", "exposition", "held");

        // This operator: chunks are written out as they are encoded (as the server streams them).
        let (metrics, kept) = held(|| {
            let metrics = Metrics::new();
            let source: Arc<dyn GrantSeries> = Arc::new(Source(data.clone()));
            metrics.set_grant_series(Arc::downgrade(&source));
            Box::new((metrics, source))
        });
        let (metrics, _) = metrics.downcast_ref::<(Metrics, Arc<dyn GrantSeries>)>().unwrap();
        row("wgtwo-operator (chunked, streamed)", kept, measure(|| metrics.encode_chunks().map(|c| c.len()).sum()));

        let (registry, kept) = held(|| {
            let mut registry = prometheus_client::registry::Registry::default();
            registry.register_collector(Box::new(Collector(data.clone())));
            Box::new(registry)
        });
        let registry = registry.downcast_ref::<prometheus_client::registry::Registry>().unwrap();
        row(
            "prometheus-client Collector (one String)",
            kept,
            measure(|| {
                let mut out = String::new();
                prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
                out.len()
            }),
        );

        let (registry, kept) = held(|| {
            let registry = prometheus::Registry::new();
            let opts = |name: &str| prometheus::Opts::new(name, "help");
            let expires = prometheus::IntGaugeVec::new(
                opts("wgtwo_grant_access_token_expiration_timestamp_seconds"),
                &["name", "namespace"],
            )
            .unwrap();
            let ready = prometheus::IntGaugeVec::new(opts("wgtwo_grant_ready"), &["name", "namespace"]).unwrap();
            let refresh =
                prometheus::IntCounterVec::new(opts("wgtwo_grant_refresh_total"), &["name", "namespace", "result"])
                    .unwrap();
            for g in data.iter() {
                expires.with_label_values(&[g.name.as_str(), g.namespace.as_str()]).set(g.expires_at);
                ready.with_label_values(&[g.name.as_str(), g.namespace.as_str()]).set(g.ready as i64);
                for (result, count) in RESULTS.iter().zip(g.refreshes).filter(|(_, c)| *c > 0) {
                    refresh
                        .with_label_values(&[g.name.as_str(), g.namespace.as_str(), result])
                        .inc_by(u64::from(count));
                }
            }
            registry.register(Box::new(expires)).unwrap();
            registry.register(Box::new(ready)).unwrap();
            registry.register(Box::new(refresh)).unwrap();
            Box::new(registry)
        });
        let registry = registry.downcast_ref::<prometheus::Registry>().unwrap();
        row(
            "prometheus crate, a child per series",
            kept,
            measure(|| {
                use prometheus::Encoder;
                let mut out = Vec::new();
                prometheus::TextEncoder::new().encode(&registry.gather(), &mut out).unwrap();
                out.len()
            }),
        );
    }
}
