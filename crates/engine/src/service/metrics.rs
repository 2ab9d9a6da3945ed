//! `serve`'s Prometheus metrics (prometheus-client): runs, records,
//! requests, durations, rows read, last success and scheduler lag.

use crate::RunReport;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncLabel {
    sync: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    sync: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RecordLabels {
    sync: String,
    op: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    sync: String,
    class: String,
}

type Histograms = Family<SyncLabel, Histogram, fn() -> Histogram>;

fn request_buckets() -> Histogram {
    // 1 ms to about 33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn run_buckets() -> Histogram {
    // 100 ms to about 7 h.
    Histogram::new(exponential_buckets(0.1, 2.0, 18))
}

/// Every metric `serve` exports.
pub struct Metrics {
    registry: Registry,
    runs: Family<RunLabels, Counter>,
    records: Family<RecordLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Histograms,
    run_seconds: Histograms,
    diff_seconds: Histograms,
    rows: Family<SyncLabel, Counter>,
    last_success: Family<SyncLabel, Gauge<f64, AtomicU64>>,
    failures_in_a_row: Family<SyncLabel, Gauge>,
    lag: Histogram,
    running: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("backflow");
        let m = Metrics {
            runs: Family::default(),
            records: Family::default(),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(request_buckets),
            run_seconds: Family::new_with_constructor(run_buckets),
            diff_seconds: Family::new_with_constructor(run_buckets),
            rows: Family::default(),
            last_success: Family::default(),
            failures_in_a_row: Family::default(),
            lag: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            running: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "runs",
            "Runs ended, by sync and status (succeeded, partial, failed, skipped)",
            m.runs.clone(),
        );
        registry.register(
            "records",
            "Records by sync, op and outcome (delivered, rejected, pending, skipped)",
            m.records.clone(),
        );
        registry.register(
            "requests",
            "HTTP attempts by sync and status class (2xx, 3xx, 4xx, 5xx, error: no answer)",
            m.requests.clone(),
        );
        registry.register("request_duration_seconds", "HTTP attempt latency", m.request_seconds.clone());
        registry.register("run_duration_seconds", "Run duration", m.run_seconds.clone());
        registry.register(
            "diff_duration_seconds",
            "Time to read and diff the query before sending",
            m.diff_seconds.clone(),
        );
        registry.register("rows_read", "Rows read from the warehouse", m.rows.clone());
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the sync's last run that delivered everything",
            m.last_success.clone(),
        );
        registry.register(
            "consecutive_failures",
            "Failed runs in a row (the scheduler backs off)",
            m.failures_in_a_row.clone(),
        );
        registry.register("scheduler_lag_seconds", "How late runs start after their slot", m.lag.clone());
        registry.register("runs_in_flight", "Runs in flight now", m.running.clone());
        Metrics { registry, ..m }
    }
}

fn sync(name: &str) -> SyncLabel {
    SyncLabel { sync: name.to_string() }
}

impl Metrics {
    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    /// A run ended with `status` (`succeeded`, `partial`, `failed`, `skipped`).
    pub fn run_ended(&self, name: &str, status: &str, report: Option<&RunReport>, seconds: f64) {
        self.runs.get_or_create(&RunLabels { sync: name.into(), status: status.into() }).inc();
        if status == "skipped" {
            return;
        }
        self.run_seconds.get_or_create(&sync(name)).observe(seconds);
        let Some(r) = report else { return };
        self.diff_seconds.get_or_create(&sync(name)).observe((r.seconds - r.send_seconds).max(0.0));
        self.rows.get_or_create(&sync(name)).inc_by(r.counts.rows);
        let count = |op: String, outcome: &str, n: u64| {
            if n > 0 {
                self.records.get_or_create(&RecordLabels { sync: name.into(), op, outcome: outcome.into() }).inc_by(n);
            }
        };
        for (op, n) in &r.delivered {
            count(op.to_string(), "delivered", *n);
        }
        for (op, n) in &r.rejected_ops {
            count(op.to_string(), "rejected", *n);
        }
        for (op, n) in &r.pending_ops {
            count(op.to_string(), "pending", *n);
        }
        if r.invalid_keys.skipped {
            count("none".into(), "skipped", r.invalid_keys.null_rows + r.invalid_keys.duplicate_rows);
        }
        if r.complete() {
            let now = chrono::Utc::now();
            self.last_success.get_or_create(&sync(name)).set(now.timestamp_millis() as f64 / 1000.0);
        }
    }

    /// The sync's last success before this process started.
    pub fn seed_success(&self, name: &str, at: Option<chrono::DateTime<chrono::Utc>>) {
        if let Some(at) = at {
            self.last_success.get_or_create(&sync(name)).set(at.timestamp_millis() as f64 / 1000.0);
        }
    }

    /// The sync's failures in a row.
    pub fn failures(&self, name: &str, n: u32) {
        self.failures_in_a_row.get_or_create(&sync(name)).set(n.into());
    }

    /// A run started, `lag` after its slot (None: not a scheduled run).
    pub fn started(&self, lag: Option<Duration>) {
        if let Some(lag) = lag {
            self.lag.observe(lag.as_secs_f64());
        }
        self.running.inc();
    }

    /// A run ended (whatever its outcome).
    pub fn stopped(&self) {
        self.running.dec();
    }

    /// The observer of `name`'s requests.
    pub fn requests(self: &Arc<Self>, name: &str) -> Arc<dyn backflow_sink::Observer> {
        Arc::new(Requests { metrics: self.clone(), sync: name.to_string() })
    }
}

/// Counts one sync's requests.
struct Requests {
    metrics: Arc<Metrics>,
    sync: String,
}

impl backflow_sink::Observer for Requests {
    fn answered(&self, status: Option<u16>, elapsed: Duration) {
        let class = match status {
            Some(s) => format!("{}xx", s / 100),
            None => "error".into(),
        };
        self.metrics.requests.get_or_create(&RequestLabels { sync: self.sync.clone(), class }).inc();
        self.metrics.request_seconds.get_or_create(&sync(&self.sync)).observe(elapsed.as_secs_f64());
    }
}
