//! `plan` and `run`: stage the query, diff against the snapshot, and (for a
//! run) deliver the outbox, committing each acknowledged record.

use crate::config::{InvalidKeyPolicy, Sync};
use crate::stage::{EXAMPLES, HASH_SET_LIMIT, Staging};
use crate::{Engine, EngineError, Progress, in_warehouse};
use backflow_core::{Mapping, Mode, Op, Record, message_id};
use backflow_diff::{DiffCounts, HashSet64, OutboxRow, Rejection, RunRecord, StateStore, now};
use backflow_sink::send::redact_url;
use backflow_sink::{Batch, Delivery, Destination, Driver, MetaContext, Outcome, Sender, Settled};
use backflow_source::{Warehouse, WarehouseConfig};
use serde::Serialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Records read from the outbox at a time: the first page is small, so
/// sending starts at once; pages then double up to [`PAGE_MAX`] records
/// or [`PAGE_BYTES`] of payloads (each page is a query, so larger pages
/// cost less per record; a few pages wait in memory at a time).
const PAGE_FIRST: usize = 1_024;
const PAGE_MAX: usize = 65_536;
const PAGE_BYTES: usize = 32 << 20;
/// Acks are committed as soon as the first arrive, then when this many are
/// waiting or [`ACK_INTERVAL`] after the last commit: a crash re-sends at
/// most what was acknowledged since (with the same ids), and a run killed
/// again and again still makes progress.
const ACK_BATCH: usize = 250_000;
const ACK_INTERVAL: Duration = Duration::from_millis(250);
/// Payloads shown by `plan`.
pub(crate) const SAMPLES: u64 = 3;
/// Setting under which the mapping last run with is stored.
const MAPPING_SETTING: &str = "mapping";

/// Rows left out or refused because of their primary key.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InvalidKeyReport {
    /// Rows whose key has a NULL.
    pub null_rows: u64,
    /// A few of them (row number and key).
    pub null_examples: Vec<String>,
    /// Distinct keys that appear more than once.
    pub duplicate_keys: u64,
    /// Rows carrying those keys.
    pub duplicate_rows: u64,
    /// A few of those keys.
    pub duplicate_examples: Vec<String>,
    /// Whether the rows were skipped (policy `skip`).
    pub skipped: bool,
}

impl InvalidKeyReport {
    fn any(&self) -> bool {
        self.null_rows > 0 || self.duplicate_keys > 0
    }

    fn describe(&self, key_columns: &[String]) -> String {
        let mut parts = Vec::new();
        if self.null_rows > 0 {
            parts.push(format!(
                "{} row(s) have a NULL in the primary key ({}), e.g. {}",
                self.null_rows,
                key_columns.join(", "),
                self.null_examples.join("; ")
            ));
        }
        if self.duplicate_keys > 0 {
            parts.push(format!(
                "{} key(s) appear more than once ({} rows), e.g. {}",
                self.duplicate_keys,
                self.duplicate_rows,
                self.duplicate_examples.join(", ")
            ));
        }
        parts.join("; ")
    }
}

/// What a run would send, computed without sending or committing anything.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The sync.
    pub sync: String,
    /// Its mode.
    pub mode: Mode,
    /// Whether this is a `--full` plan.
    pub full: bool,
    /// Changes found.
    pub counts: DiffCounts,
    /// Whether the diff ran inside the warehouse's DuckDB (otherwise the
    /// query was staged row by row).
    pub in_warehouse: bool,
    /// Records per op.
    pub ops: BTreeMap<Op, u64>,
    /// Rows with invalid keys.
    pub invalid_keys: InvalidKeyReport,
    /// Whether the mapping differs from the one last delivered with (every
    /// row whose payload it changes is re-sent).
    pub mapping_changed: bool,
    /// The first few request bodies, exactly as they would be sent (the run
    /// id is a placeholder).
    pub samples: Vec<Value>,
    /// With `plan --diff`: the first changed and removed records, field by
    /// field (old → new; for removals, what goes away).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub diff: Vec<RecordDiff>,
}

/// How one record differs from what was delivered.
#[derive(Debug, Clone, Serialize)]
pub struct RecordDiff {
    /// The record's key.
    pub key: Value,
    /// `changed` or `removed`.
    pub change: backflow_core::Change,
    /// What the receiver is told.
    pub op: Op,
    /// The fields that differ (dotted paths for nested objects); for a
    /// removal, every field delivered, with `new` null.
    pub fields: Vec<FieldChange>,
}

/// One field's old and new value.
#[derive(Debug, Clone, Serialize)]
pub struct FieldChange {
    /// The field (`address.city` for nested objects).
    pub field: String,
    /// As last delivered (null: absent).
    pub old: Value,
    /// As it would be sent (null: absent).
    pub new: Value,
}

/// `value`'s leaves by dotted path (arrays are leaves).
fn leaves(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                leaves(&path, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// The fields whose values differ between `old` and `new`.
fn field_changes(old: &Value, new: &Value) -> Vec<FieldChange> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    leaves("", old, &mut a);
    leaves("", new, &mut b);
    let fields: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    fields
        .into_iter()
        .filter_map(|f| {
            let (o, n) = (a.get(f).cloned().unwrap_or(Value::Null), b.get(f).cloned().unwrap_or(Value::Null));
            (o != n).then(|| FieldChange { field: f.clone(), old: o, new: n })
        })
        .collect()
}

/// How a run went.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The sync.
    pub sync: String,
    /// The run's id.
    pub run_id: String,
    /// The sync's mode.
    pub mode: Mode,
    /// Whether it was a `--full` run.
    pub full: bool,
    /// `succeeded` (everything delivered) or `partial`.
    pub status: String,
    /// Changes found.
    pub counts: DiffCounts,
    /// Whether the diff ran inside the warehouse's DuckDB.
    pub in_warehouse: bool,
    /// Rows with invalid keys (skipped under policy `skip`).
    pub invalid_keys: InvalidKeyReport,
    /// Whether the mapping changed since the last delivery.
    pub mapping_changed: bool,
    /// Records acknowledged, per op.
    pub delivered: BTreeMap<Op, u64>,
    /// Records refused by the receiver (record-level statuses such as 400,
    /// 413 or 422).
    pub rejected: u64,
    /// The same, per op.
    pub rejected_ops: BTreeMap<Op, u64>,
    /// Records not delivered that may succeed later (retryable failures,
    /// and records not attempted after the run stopped early).
    pub pending: u64,
    /// The same, per op.
    pub pending_ops: BTreeMap<Op, u64>,
    /// Why the run stopped before the end of the outbox, if it did.
    pub stopped_early: Option<String>,
    /// The first few failures, with reasons.
    pub failures: Vec<Rejection>,
    /// Seconds the run took.
    pub seconds: f64,
    /// Seconds spent sending (after the diff).
    pub send_seconds: f64,
}

impl RunReport {
    /// Whether every record to send was delivered.
    pub fn complete(&self) -> bool {
        self.rejected == 0 && self.pending == 0 && !(self.invalid_keys.skipped && self.invalid_keys.any())
    }

    /// Records delivered in all.
    pub fn delivered_total(&self) -> u64 {
        self.delivered.values().sum()
    }
}

/// The staged and diffed state of one sync, shared by plan and run.
struct Prepared<'a> {
    sync: &'a Sync,
    store: StateStore,
    counts: DiffCounts,
    invalid: InvalidKeyReport,
    mapping_changed: bool,
    mapping_text: String,
    /// Keys found unchanged whose row hash a run records.
    refresh: Vec<(String, u64)>,
    in_warehouse: bool,
}

impl Engine {
    /// Stages and diffs `name`; `plan` keeps the outbox in memory.
    fn prepare<'a>(
        &'a self,
        name: &str,
        full: bool,
        plan: bool,
        progress: &dyn Progress,
    ) -> Result<Prepared<'a>, EngineError> {
        self.prepare_rows(name, full, plan, false, progress)
    }

    /// [`Engine::prepare`], of the query's first row only when `first_row`.
    fn prepare_rows<'a>(
        &'a self,
        name: &str,
        full: bool,
        plan: bool,
        first_row: bool,
        progress: &dyn Progress,
    ) -> Result<Prepared<'a>, EngineError> {
        let sync = self.project.sync(name)?;
        let mut store = self.store(name)?;
        if plan {
            store.keep_outbox_in_memory();
        }
        let mut query = self.env.expand(&sync.spec.query).map_err(|e| config_error(name, format!("query: {e}")))?;
        if first_row {
            query = format!("select * from (\n{}\n) as backflow_first_row limit 1", without_terminator(&query));
        }
        let route_columns = self.destination(sync)?.route_columns();
        let mapping = sync.mapping(&self.env);
        let mapping_text = json!({
            "fields": sync.spec.mapping,
            "static": sync.spec.statics,
            "metadata": sync.spec.destination.metadata.then_some(&sync.spec.destination.metadata_key),
        })
        .to_string();
        let mapping_changed =
            store.snapshot_len()? > 0 && store.setting(MAPPING_SETTING)?.is_some_and(|old| old != mapping_text);
        let started = Instant::now();
        // A warehouse that is a DuckDB file is diffed inside DuckDB, unless
        // every row is to be re-rendered anyway (a full run, a new mapping).
        let file =
            if full || mapping_changed { None } else { self.warehouse_config(sync)?.duckdb_file(&self.project.dir) };
        let mut diffed = None;
        if let Some(file) = file {
            progress.phase(name, "diffing", None);
            let q = in_warehouse::Query { sync, text: &query, mapping: &mapping, route_columns: &route_columns, plan };
            let outcome = in_warehouse::diff(&store, &file, &q)?;
            progress.done();
            match outcome {
                in_warehouse::Outcome::Diffed(counts, refresh) => {
                    tracing::debug!(sync = name, elapsed = ?started.elapsed(), "diff computed in DuckDB");
                    diffed = Some((counts, refresh));
                }
                in_warehouse::Outcome::Staged(reason) => {
                    tracing::debug!(sync = name, reason = %self.env.redact(&reason), "the query is staged instead");
                }
            }
        }
        let (counts, invalid, refresh, in_warehouse) = match diffed {
            Some((counts, refresh)) => (counts, InvalidKeyReport::default(), refresh, true),
            None => {
                let (counts, invalid) = self.stage(sync, &store, &query, &mapping, &route_columns, full, progress)?;
                (counts, invalid, Vec::new(), false)
            }
        };
        Ok(Prepared { sync, store, counts, invalid, mapping_changed, mapping_text, refresh, in_warehouse })
    }

    /// Stages the query row by row and diffs it against the snapshot.
    #[allow(clippy::too_many_arguments)]
    fn stage(
        &self,
        sync: &Sync,
        store: &StateStore,
        query: &str,
        mapping: &Mapping,
        route_columns: &[String],
        full: bool,
        progress: &dyn Progress,
    ) -> Result<(DiffCounts, InvalidKeyReport), EngineError> {
        let name = sync.name.as_str();
        let started = Instant::now();
        let warehouse = self.warehouse(sync)?;
        let source_err = |source| EngineError::Source { sync: name.to_string(), source };
        let known = if full { None } else { store.delivered_pairs(HASH_SET_LIMIT as u64)? };
        tracing::debug!(sync = name, elapsed = ?started.elapsed(), pairs = ?known.as_ref().map(|k| k.len()), "snapshot pairs loaded");
        // Staging leaves out the payloads of rows the snapshot already holds;
        // should a pair hash have collided, a record to send lacks its
        // payload, and the query is staged again with every payload.
        let attempt = |known: Option<HashSet64>| -> Result<(DiffCounts, InvalidKeyReport), EngineError> {
            progress.phase(name, "reading", None);
            let mut staging = Staging::new(
                store.stager()?,
                mapping.clone(),
                sync.key_columns(),
                route_columns.to_vec(),
                sync.meta_key(),
                known,
                progress,
            );
            warehouse.stream(query, &mut staging).map_err(source_err)?;
            staging.finish().map_err(|e| source_err(backflow_source::SourceError::Consumer(e)))?;
            progress.done();
            let Staging { stager, null_rows, null_examples, maybe_duplicates, .. } = staging;
            stager.finish()?;
            tracing::debug!(sync = name, elapsed = ?started.elapsed(), "query staged");
            let mut invalid = InvalidKeyReport { null_rows, null_examples, ..InvalidKeyReport::default() };
            if maybe_duplicates {
                let dups = store.duplicate_keys(EXAMPLES)?;
                invalid.duplicate_keys = dups.keys;
                invalid.duplicate_rows = dups.rows;
                invalid.duplicate_examples = dups.examples;
            }
            if invalid.any() {
                match sync.spec.invalid_keys {
                    InvalidKeyPolicy::Fail => {
                        return Err(EngineError::InvalidKeys {
                            sync: name.to_string(),
                            message: format!(
                                "{}. Nothing was sent. Fix the query, or set `invalid_keys: skip` to leave such rows out (they are reported).",
                                invalid.describe(&sync.key_columns())
                            ),
                        });
                    }
                    InvalidKeyPolicy::Skip => {
                        if invalid.duplicate_keys > 0 {
                            store.drop_duplicate_rows()?;
                        }
                        invalid.skipped = true;
                    }
                }
            }
            let counts = store.diff(sync.spec.mode, full)?;
            tracing::debug!(sync = name, elapsed = ?started.elapsed(), "diff computed");
            Ok((counts, invalid))
        };
        let prepared = attempt(known)?;
        if store.outbox_missing_payloads()? > 0 {
            return attempt(None);
        }
        Ok(prepared)
    }

    /// What a run of `name` would send. Sends nothing, commits nothing.
    pub fn plan(&self, name: &str, full: bool, progress: &dyn Progress) -> Result<Plan, EngineError> {
        self.plan_with_diff(name, full, 0, progress)
    }

    /// [`Engine::plan`], with the first `diff` changed or removed records
    /// compared field by field with what was delivered.
    pub fn plan_with_diff(
        &self,
        name: &str,
        full: bool,
        diff: usize,
        progress: &dyn Progress,
    ) -> Result<Plan, EngineError> {
        let p = self.prepare(name, full, true, progress)?;
        let destination = self.destination(p.sync)?;
        let ctx = MetaContext { sync: name.to_string(), mode: p.sync.spec.mode, run_id: "(plan)".into(), test: false };
        let ops = p.store.outbox_ops()?.into_iter().collect();
        let samples = p
            .store
            .outbox_page(0, SAMPLES as usize)?
            .into_iter()
            .map(|row| match destination.request(&[record(name, row)], &ctx) {
                // Shown with `${VAR}` values written back as references.
                Ok(r) if r.body.is_empty() => {
                    json!(self.env.redact(&format!("{} {}", r.method.as_str(), redact_url(&r.url))))
                }
                Ok(r) => {
                    serde_json::from_str(&self.env.redact(&String::from_utf8_lossy(&r.body))).unwrap_or(Value::Null)
                }
                Err(reason) => json!({"error": self.env.redact(&reason)}),
            })
            .collect();
        let diff = if diff > 0 { self.record_diffs(&p, diff)? } else { Vec::new() };
        Ok(Plan {
            sync: name.to_string(),
            mode: p.sync.spec.mode,
            full,
            counts: p.counts,
            in_warehouse: p.in_warehouse,
            ops,
            invalid_keys: p.invalid,
            mapping_changed: p.mapping_changed,
            samples,
            diff,
        })
    }

    /// The first `limit` changed or removed records of a prepared plan,
    /// against the payloads last delivered (values of `${VAR}` written back
    /// as references).
    fn record_diffs(&self, p: &Prepared<'_>, limit: usize) -> Result<Vec<RecordDiff>, EngineError> {
        let redact = |v: Value| serde_json::from_str(&self.env.redact(&v.to_string())).unwrap_or(Value::Null);
        let mut out = Vec::new();
        let mut after = 0;
        while out.len() < limit {
            let page = p.store.outbox_page(after, PAGE_FIRST)?;
            let Some(last) = page.last() else { break };
            after = last.row_num;
            for row in page {
                if row.change == backflow_core::Change::Added {
                    continue;
                }
                let old = p.store.lookup(&row.key)?.delivered.map_or(Value::Null, |d| d.payload);
                let fields = match row.change {
                    backflow_core::Change::Removed => field_changes(&old, &Value::Null),
                    _ => field_changes(&old, &serde_json::from_str(&row.payload).unwrap_or(Value::Null)),
                };
                out.push(RecordDiff {
                    key: serde_json::from_str(&row.key).unwrap_or(Value::String(row.key.clone())),
                    change: row.change,
                    op: row.op,
                    fields: fields
                        .into_iter()
                        .map(|f| FieldChange { field: f.field, old: redact(f.old), new: redact(f.new) })
                        .collect(),
                });
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The sync's warehouse settings, their `${VAR}` references resolved.
    fn warehouse_config(&self, sync: &Sync) -> Result<WarehouseConfig, EngineError> {
        let name = &sync.spec.warehouse;
        self.project.file.warehouses[name]
            .expanded(|text| self.env.expand(text))
            .map_err(|e| config_error(&sync.name, format!("warehouse `{name}`: {e}")))
    }

    /// Opens the sync's warehouse.
    fn warehouse(&self, sync: &Sync) -> Result<Warehouse, EngineError> {
        Warehouse::open(&self.warehouse_config(sync)?, &self.project.dir)
            .map_err(|source| EngineError::Source { sync: sync.name.clone(), source })
    }

    /// The sync's destination as validation checked it.
    fn destination(&self, sync: &Sync) -> Result<Destination, EngineError> {
        checked(&self.checked.destinations, sync)
    }

    /// The sync's sender as validation set it up.
    fn sender(&self, sync: &Sync) -> Result<Sender, EngineError> {
        checked(&self.checked.senders, sync)
    }

    /// Runs `name` once: stage, diff, deliver, commit acks as they come.
    pub async fn run(&self, name: &str, full: bool, progress: &dyn Progress) -> Result<RunReport, EngineError> {
        self.run_as(name, full, &uuid::Uuid::now_v7().to_string(), progress).await
    }

    /// [`Engine::run`] with the run id given (a service answers a trigger
    /// with the id before the run starts).
    pub async fn run_as(
        &self,
        name: &str,
        full: bool,
        run_id: &str,
        progress: &dyn Progress,
    ) -> Result<RunReport, EngineError> {
        use tracing::Instrument;
        let span = tracing::info_span!("run", sync = %name, run_id = %run_id);
        self.run_in_span(name, full, run_id, progress).instrument(span).await
    }

    async fn run_in_span(
        &self,
        name: &str,
        full: bool,
        run_id: &str,
        progress: &dyn Progress,
    ) -> Result<RunReport, EngineError> {
        let started = Instant::now();
        let started_at = now();
        let p = match self.prepare(name, full, false, progress) {
            Ok(p) => p,
            Err(e) => {
                self.record_failure(name, full, run_id, &started_at, &e);
                return Err(e);
            }
        };
        let spec = &p.sync.spec;
        let destination = self.destination(p.sync)?;
        let sender = match &self.observer {
            Some(observer) => self.sender(p.sync)?.observed_by(observer.requests(name)),
            None => self.sender(p.sync)?,
        };
        let run_id = run_id.to_string();
        let mut record_run = RunRecord {
            run_id: run_id.clone(),
            sync: name.to_string(),
            mode: spec.mode,
            full,
            started_at,
            ended_at: None,
            status: "running".into(),
            counts: json!(p.counts),
            message: None,
        };
        p.store.mark_interrupted()?;
        p.store.save_run(&record_run)?;
        p.store.refresh_row_hashes(&p.refresh)?;
        if spec.mode.forgets_removed() {
            p.store.forget_removed()?;
        }
        // From here on every record not acknowledged may have been
        // delivered; the outbox goes to disk now, as part of preparing the
        // run, rather than with the first commit that fills the log.
        p.store.begin_delivery(&run_id)?;
        let to_send: BTreeMap<Op, u64> = p.store.outbox_ops()?.into_iter().collect();
        let ctx = MetaContext { sync: name.to_string(), mode: spec.mode, run_id: run_id.clone(), test: false };
        let mut report = RunReport {
            sync: name.to_string(),
            run_id: run_id.clone(),
            mode: spec.mode,
            full,
            status: String::new(),
            counts: p.counts,
            in_warehouse: p.in_warehouse,
            invalid_keys: p.invalid.clone(),
            mapping_changed: p.mapping_changed,
            delivered: BTreeMap::new(),
            rejected: 0,
            rejected_ops: BTreeMap::new(),
            pending: 0,
            pending_ops: BTreeMap::new(),
            stopped_early: None,
            failures: vec![],
            seconds: 0.0,
            send_seconds: 0.0,
        };
        let sending = Instant::now();
        let outcome = self.deliver(&p, &destination, &sender, &ctx, progress, &mut report).await;
        report.send_seconds = sending.elapsed().as_secs_f64();
        let delivered = report.delivered_total();
        report.pending = p.counts.to_send - delivered - report.rejected;
        for (op, n) in to_send {
            let done =
                report.delivered.get(&op).copied().unwrap_or(0) + report.rejected_ops.get(&op).copied().unwrap_or(0);
            if n > done {
                report.pending_ops.insert(op, n - done);
            }
        }
        report.status = if report.complete() { "succeeded" } else { "partial" }.into();
        report.seconds = started.elapsed().as_secs_f64();
        record_run.ended_at = Some(now());
        record_run.counts = json!({
            "diff": p.counts,
            "invalid_keys": report.invalid_keys,
            "delivered": report.delivered,
            "rejected": report.rejected,
            "pending": report.pending,
        });
        match &outcome {
            Ok(()) => {
                record_run.status = report.status.clone();
                record_run.message = report.stopped_early.clone();
            }
            Err(e) => {
                record_run.status = "failed".into();
                record_run.message = Some(self.env.redact(&e.to_string()));
            }
        }
        let recorded =
            p.store.set_setting(MAPPING_SETTING, &p.mapping_text).and_then(|()| p.store.save_run(&record_run));
        match (outcome, recorded) {
            (Ok(()), Ok(())) => Ok(report),
            (Ok(()), Err(e)) => Err(e.into()),
            // The delivery's error says what went wrong first (recording
            // the run may fail for the same reason, e.g. a full disk).
            (Err(e), recorded) => {
                if let Err(also) = recorded {
                    tracing::warn!(sync = name, error = %also, "the failed run could not be recorded");
                }
                Err(e)
            }
        }
    }

    /// Records a run that failed before sending (bad keys, a failing
    /// query…), so `history` shows it. Nothing is recorded when the state
    /// itself is unavailable (another run holds it) or the sync is unknown.
    fn record_failure(&self, name: &str, full: bool, run_id: &str, started_at: &str, error: &EngineError) {
        if matches!(error, EngineError::State(_) | EngineError::Config(_)) {
            return;
        }
        let Ok(sync) = self.project.sync(name) else { return };
        if let Ok(store) = self.store(name) {
            let record = RunRecord {
                run_id: run_id.to_string(),
                sync: name.to_string(),
                mode: sync.spec.mode,
                full,
                started_at: started_at.to_string(),
                ended_at: Some(now()),
                status: "failed".into(),
                counts: json!({}),
                message: Some(self.env.redact(&error.to_string())),
            };
            if let Err(e) = store.save_run(&record) {
                tracing::warn!(sync = name, error = %e, "could not record the failed run");
            }
        }
    }

    /// Delivers the outbox, committing acks as results come back, and folds
    /// them into the snapshot at the end.
    async fn deliver(
        &self,
        p: &Prepared<'_>,
        destination: &Destination,
        sender: &Sender,
        ctx: &MetaContext,
        progress: &dyn Progress,
        report: &mut RunReport,
    ) -> Result<(), EngineError> {
        let spec = &p.sync.spec.destination;
        // A page holds at least four batches.
        let least = PAGE_FIRST.max(4 * spec.batch_size);
        let mut page_size = least;
        // Three stages, each on its own thread: this one reads outbox pages
        // and commits acks; an encoding thread turns pages into requests
        // (message ids, bodies, signatures); the sink driver's task keeps
        // `concurrency` requests in flight. Requests cross in chunks and
        // results come back in chunks: no stage is woken per request.
        let (pages, page_rx) = tokio::sync::mpsc::channel::<Vec<OutboxRow>>(2);
        let (chunks, chunk_rx) = tokio::sync::mpsc::channel::<Vec<Batch>>(4);
        let (driver, mut results) = Driver::start(
            Delivery {
                destination: destination.clone(),
                sender: sender.clone(),
                ctx: ctx.clone(),
                concurrency: spec.concurrency.max(1),
                breaker: spec.circuit_breaker.max(1),
            },
            chunk_rx,
        );
        let encoder = {
            let (destination, ctx) = (destination.clone(), ctx.clone());
            std::thread::Builder::new()
                .name("backflow-encode".into())
                .spawn(move || encode_pages(page_rx, chunks, &destination, &ctx))
                .map_err(|e| EngineError::Sink {
                    sync: p.sync.name.clone(),
                    source: backflow_sink::SinkError::Client(format!("cannot start the encoding thread: {e}")),
                })?
        };
        let mut pages = Some(pages);
        let mut draining = false;
        let mut aborted = false;
        let mut after = 0;
        let mut acks: Vec<u64> = Vec::new();
        let mut failures: Vec<Rejection> = Vec::new();
        // The first acks are committed at once.
        let mut last_commit: Option<Instant> = None;
        let (mut commits, mut committing) = (0u32, Duration::ZERO);
        progress.phase(&ctx.sync, "sending", Some(p.counts.to_send));
        let looped: Result<(), EngineError> = async {
            loop {
                // Asked to stop before this turn (e.g. while the query was
                // read): no page goes out.
                if !draining && self.stopping.is_cancelled() {
                    driver.drain();
                    draining = true;
                    pages = None;
                }
                let room = async {
                    match &pages {
                        Some(tx) => tx.reserve().await.ok(),
                        None => std::future::pending().await,
                    }
                };
                // Set when every page is handed over, or the encoder stopped
                // (the sending task stopped early: circuit breaker).
                let mut close = false;
                // Acks waiting are committed on time even while no result comes.
                let commit_at = last_commit.map_or_else(tokio::time::Instant::now, |at| (at + ACK_INTERVAL).into());
                tokio::select! {
                    _ = self.aborting.cancelled(), if !aborted => {
                        // Stopping at once: requests in flight are cancelled
                        // (unconfirmed, as after a crash), the rest stays
                        // pending; what was acknowledged is committed.
                        driver.cancel();
                        aborted = true;
                        draining = true;
                        close = true;
                    }
                    _ = self.stopping.cancelled(), if !draining => {
                        // Stopping: requests in flight end, the rest stays pending.
                        driver.drain();
                        draining = true;
                        close = true;
                    }
                    _ = tokio::time::sleep_until(commit_at), if !acks.is_empty() => {}
                    permit = room => match permit {
                        Some(permit) => {
                            let page = p.store.outbox_page(after, page_size)?;
                            page_size = next_page_size(&page, page_size, least);
                            match page.last() {
                                Some(last) => {
                                    after = last.row_num;
                                    permit.send(page);
                                }
                                None => close = true,
                            }
                        }
                        None => close = true,
                    },
                    chunk = results.recv() => {
                        let Some(chunk) = chunk else { break };
                        let chunk: Vec<Settled> = chunk;
                        progress.advance(chunk.iter().map(|(records, _)| records.len() as u64).sum());
                        for (records, outcome) in chunk {
                            for record in records {
                                settle(record, &outcome, report, &mut acks, &mut failures);
                            }
                        }
                    }
                }
                if close {
                    pages = None;
                }
                let due = last_commit.is_none_or(|at| at.elapsed() >= ACK_INTERVAL);
                if acks.len() >= ACK_BATCH || (!acks.is_empty() && due) {
                    let at = Instant::now();
                    p.store.ack(&ctx.run_id, &acks)?;
                    acks.clear();
                    last_commit = Some(Instant::now());
                    commits += 1;
                    committing += at.elapsed();
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = looped {
            // The state cannot be written: nothing more is sent, and the
            // requests in flight are cancelled (their records stay
            // unconfirmed, as after a crash); every task has ended before
            // the error is returned.
            driver.cancel();
            drop(pages);
            drop(results);
            driver.finish().await;
            let _ = encoder.join();
            return Err(e);
        }
        drop(pages);
        let encoded = encoder.join();
        report.stopped_early = driver.finish().await;
        if aborted {
            report.stopped_early =
                Some("stopped: the drain time ran out; requests in flight were cancelled and stay pending".into());
        }
        if encoded.is_err() && report.stopped_early.is_none() {
            report.stopped_early = Some("stopped early: the encoding thread failed; the rest stays pending".into());
        }
        // The reason may quote the receiver (a redirect's Location, a host).
        report.stopped_early = report.stopped_early.take().map(|reason| self.env.redact(&reason));
        p.store.ack(&ctx.run_id, &acks)?;
        tracing::debug!(sync = %ctx.sync, commits, elapsed = ?committing, "acknowledgements committed while sending");
        let folding = Instant::now();
        p.store.fold_acks()?;
        tracing::debug!(sync = %ctx.sync, elapsed = ?folding.elapsed(), "acknowledgements folded into the snapshot");
        // A receiver's answer may echo what was sent (a header, a token).
        for failure in &mut failures {
            failure.reason = self.env.redact(&failure.reason);
            failure.body = self.env.redact(&failure.body);
        }
        p.store.reject(&ctx.run_id, &failures)?;
        progress.done();
        report.failures = failures.into_iter().take(20).collect();
        Ok(())
    }
}

/// The size of the page after `page` (read with `size` records): double,
/// within [`PAGE_MAX`] records and about [`PAGE_BYTES`] of payloads, and
/// never under `least`.
fn next_page_size(page: &[OutboxRow], size: usize, least: usize) -> usize {
    let bytes: usize = page.iter().map(|row| row.payload.len()).sum();
    let by_bytes = PAGE_BYTES.saturating_mul(page.len()).checked_div(bytes).unwrap_or(PAGE_MAX);
    (2 * size).min(PAGE_MAX).min(by_bytes).max(least)
}

/// The encoding stage: outbox pages become requests, built as they are
/// handed on in chunks (never a whole page of requests in memory), until
/// the pages end or the sending task stops. A batch may span pages.
fn encode_pages(
    mut pages: tokio::sync::mpsc::Receiver<Vec<OutboxRow>>,
    chunks: tokio::sync::mpsc::Sender<Vec<Batch>>,
    destination: &Destination,
    ctx: &MetaContext,
) {
    let mut batcher = destination.batcher(ctx);
    let mut chunk = Vec::new();
    let mut in_chunk = 0;
    let hand_on = |batch: Batch, chunk: &mut Vec<Batch>, in_chunk: &mut usize| {
        *in_chunk += batch.records.len();
        chunk.push(batch);
        if chunk.len() >= SEND_CHUNK || *in_chunk >= SEND_CHUNK_RECORDS {
            *in_chunk = 0;
            return chunks.blocking_send(std::mem::take(chunk)).is_ok();
        }
        true
    };
    while let Some(page) = pages.blocking_recv() {
        for row in page {
            if let Some(batch) = batcher.push(record(&ctx.sync, row))
                && !hand_on(batch, &mut chunk, &mut in_chunk)
            {
                return;
            }
        }
        // What is built waits for no further page.
        if !chunk.is_empty() && chunks.blocking_send(std::mem::take(&mut chunk)).is_err() {
            return;
        }
        in_chunk = 0;
    }
    for batch in batcher.finish() {
        if !hand_on(batch, &mut chunk, &mut in_chunk) {
            return;
        }
    }
    if !chunk.is_empty() {
        let _ = chunks.blocking_send(chunk);
    }
}

/// Counts a record's outcome: an ack, or a failure to record.
fn settle(
    record: Record,
    outcome: &Outcome,
    report: &mut RunReport,
    acks: &mut Vec<u64>,
    failures: &mut Vec<Rejection>,
) {
    match outcome {
        Outcome::Delivered { .. } => {
            *report.delivered.entry(record.op).or_insert(0) += 1;
            acks.push(record.row_num);
        }
        // Not judged: the destination refused every request, which the run
        // reports once (it stopped early); the record stays pending.
        Outcome::Failed { destination: true, .. } => {}
        Outcome::Failed { status, reason, body, retryable, attempts, .. } => {
            if !retryable {
                report.rejected += 1;
                *report.rejected_ops.entry(record.op).or_insert(0) += 1;
            }
            let reason = if *attempts > 1 { format!("{reason} (after {attempts} attempts)") } else { reason.clone() };
            failures.push(Rejection {
                key: record.key_text,
                op: record.op,
                message_id: record.message_id,
                status: *status,
                reason,
                body: body.clone(),
                at: now(),
            });
        }
    }
}

/// Requests handed to the sink driver at a time…
const SEND_CHUNK: usize = 64;
/// … or requests carrying this many records (large batches cross a few at
/// a time, so little waits in memory).
const SEND_CHUNK_RECORDS: usize = 4096;

/// What validation made of `sync`'s settings, from one of its maps.
fn checked<T: Clone>(made: &std::collections::HashMap<String, T>, sync: &Sync) -> Result<T, EngineError> {
    made.get(&sync.name)
        .cloned()
        .ok_or_else(|| config_error(&sync.name, "destination: not checked (the project was not validated)".into()))
}

fn config_error(sync: &str, message: String) -> EngineError {
    EngineError::Config(crate::ConfigErrors(vec![crate::ConfigError { place: format!("sync {sync}"), message }]))
}

/// The record of an outbox row, with its message id.
fn record(sync: &str, row: OutboxRow) -> Record {
    let route = match row.route.as_deref().map(serde_json::from_str::<Value>) {
        Some(Ok(Value::Object(m))) => m,
        _ => Map::new(),
    };
    Record {
        message_id: message_id(sync, &row.key, row.op, row.fingerprint, row.generation),
        payload: row.payload,
        route,
        key_text: row.key,
        fingerprint: row.fingerprint,
        change: row.change,
        op: row.op,
        row_num: row.row_num,
    }
}

/// `sql` without what may follow its last clause: white space, `;` and
/// `--` comments on the last lines (it is wrapped in a subquery).
fn without_terminator(sql: &str) -> &str {
    let mut rest = sql.trim_end();
    loop {
        let last_line = rest.rfind('\n').map_or(0, |i| i + 1);
        if let Some(comment) = rest[last_line..].find("--") {
            rest = rest[..last_line + comment].trim_end();
        } else if let Some(stripped) = rest.strip_suffix(';') {
            rest = stripped.trim_end();
        } else {
            return rest;
        }
    }
}

/// What `check --send-test` sent, and the answer.
#[derive(Debug, Clone, Serialize)]
pub struct TestSend {
    /// The sync.
    pub sync: String,
    /// The op of the record sent.
    pub op: Op,
    /// The request line: method and URL (credentials and query removed).
    pub request: String,
    /// The headers sent (credential headers redacted).
    pub headers: Vec<(String, String)>,
    /// The body sent (`${VAR}` values written back as references).
    pub body: String,
    /// Whether the receiver acknowledged it (a 2xx).
    pub delivered: bool,
    /// The answer's status, if one came.
    pub status: Option<u16>,
    /// Why it failed, or the start of the answer's body.
    pub answer: String,
}

impl Engine {
    /// Builds one real request from the first row of `name`'s query, as a
    /// run would (mapping, metadata with `"test": true`, signature,
    /// headers), and sends it. Nothing is committed: the snapshot and the
    /// run log stay as they were.
    pub async fn send_test(&self, name: &str) -> Result<TestSend, EngineError> {
        let (request, op) = {
            let p = self.prepare_rows(name, true, true, true, &crate::NoProgress)?;
            let destination = self.destination(p.sync)?;
            let ctx = MetaContext {
                sync: name.to_string(),
                mode: p.sync.spec.mode,
                run_id: format!("test-{}", uuid::Uuid::now_v7()),
                test: true,
            };
            let row = p.store.outbox_page(0, 1)?.into_iter().next().ok_or_else(|| {
                EngineError::Usage(format!("sync `{name}`: the query returned no row to build a test request from"))
            })?;
            let record = record(name, row);
            let op = record.op;
            let mut request = destination.request(&[record], &ctx).map_err(|reason| EngineError::Sink {
                sync: name.to_string(),
                source: backflow_sink::SinkError::Client(self.env.redact(&reason)),
            })?;
            request.headers.insert("backflow-test", http::HeaderValue::from_static("true"));
            (request, op)
        };
        let sender = self.sender(self.project.sync(name)?)?;
        let outcome = sender.send(&request).await;
        let headers = request
            .headers
            .iter()
            .map(|(n, v)| {
                let shown = if v.is_sensitive() || backflow_core::env::is_credential_header(n.as_str()) {
                    "<redacted>".to_string()
                } else {
                    self.env.redact(&String::from_utf8_lossy(v.as_bytes()))
                };
                (n.as_str().to_string(), shown)
            })
            .collect();
        let (delivered, status, answer) = match outcome {
            Outcome::Delivered { status, .. } => (true, Some(status), String::new()),
            Outcome::Failed { status, reason, body, .. } => {
                (false, status, self.env.redact(&if body.is_empty() { reason } else { format!("{reason}: {body}") }))
            }
        };
        Ok(TestSend {
            sync: name.to_string(),
            op,
            request: format!("{} {}", request.method.as_str(), self.env.redact(&redact_url(&request.url))),
            headers,
            body: self.env.redact(&String::from_utf8_lossy(&request.body)),
            delivered,
            status,
            answer,
        })
    }
}

/// What `check` found: whether the warehouse answers the query with the
/// columns the sync needs, and whether the destination accepts connections.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The sync.
    pub sync: String,
    /// The query's columns, or why the source check failed.
    pub source: Result<Vec<String>, String>,
    /// The address connected to, or why the destination check failed.
    pub destination: Result<String, String>,
}

impl CheckReport {
    /// Whether both ends are reachable.
    pub fn ok(&self) -> bool {
        self.source.is_ok() && self.destination.is_ok()
    }
}

/// Collects column names and checks them like a run would, reading no rows.
struct ColumnCheck<'a> {
    columns: Vec<String>,
    sync: &'a Sync,
    mapping: backflow_core::Mapping,
    route_columns: Vec<String>,
}

impl backflow_source::RowConsumer for ColumnCheck<'_> {
    fn columns(&mut self, names: &[String]) -> Result<(), String> {
        self.columns = names.to_vec();
        crate::stage::positions("primary_key", &self.sync.key_columns(), names)?;
        crate::stage::positions("destination URL", &self.route_columns, names)?;
        crate::stage::compile(&self.mapping, names, self.sync.meta_key().as_deref()).map(|_| ())
    }

    fn row(&mut self, _: Vec<Value>) -> Result<(), String> {
        Ok(())
    }
}

impl Engine {
    /// Reaches the warehouse (the query, with no rows read) and opens a
    /// connection to the destination as a run would (proxy and TLS
    /// included). Sends nothing.
    pub async fn check(&self, name: &str) -> Result<CheckReport, EngineError> {
        let sync = self.project.sync(name)?;
        let destination = self.destination(sync)?;
        let source = (|| {
            let warehouse = self.warehouse(sync).map_err(|e| e.to_string())?;
            let query = self.env.expand(&sync.spec.query).map_err(|e| e.to_string())?;
            let mut check = ColumnCheck {
                columns: vec![],
                sync,
                mapping: sync.mapping(&self.env),
                route_columns: destination.route_columns(),
            };
            warehouse
                .stream(&format!("select * from ({query}) as checked limit 0"), &mut check)
                .map_err(|e| e.to_string())?;
            Ok(check.columns)
        })();
        let url = self.env.expand(&sync.spec.destination.url).unwrap_or_default();
        let destination = self.sender(sync)?.reach(&url).await;
        // A warehouse's error may quote the query with its `${VAR}` values.
        let redact = |e: String| self.env.redact(&e);
        Ok(CheckReport {
            sync: name.to_string(),
            source: source.map_err(redact),
            destination: destination.map_err(redact),
        })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_query_loses_its_terminator_and_trailing_comments_before_it_is_wrapped() {
        assert_eq!(super::without_terminator("select 1 ;\n"), "select 1");
        assert_eq!(super::without_terminator("select 1; -- the end\n-- really\n"), "select 1");
        assert_eq!(super::without_terminator("select '--' as x\nfrom t"), "select '--' as x\nfrom t");
    }
    use super::*;

    fn page(rows: usize, payload_bytes: usize) -> Vec<OutboxRow> {
        (0..rows)
            .map(|i| OutboxRow {
                row_num: i as u64 + 1,
                key: format!("{{\"id\":{i}}}"),
                change: backflow_core::Change::Added,
                op: backflow_core::Op::Upsert,
                fingerprint: 0,
                payload: "x".repeat(payload_bytes),
                route: None,
                generation: 1,
            })
            .collect()
    }

    #[test]
    fn pages_grow_within_a_record_and_a_byte_budget() {
        // Narrow rows: pages double up to the record cap.
        assert_eq!(next_page_size(&page(1024, 100), 1024, 1024), 2048);
        assert_eq!(next_page_size(&page(64, 100), PAGE_MAX, 1024), PAGE_MAX);
        // Wide rows (1 MiB each): about PAGE_BYTES of them, but never
        // fewer than four batches.
        assert_eq!(next_page_size(&page(8, 1 << 20), 1024, 8), PAGE_BYTES >> 20);
        assert_eq!(next_page_size(&page(8, 1 << 20), 1024, 4000), 4000);
        // The last, empty page changes nothing that matters.
        assert_eq!(next_page_size(&[], 1024, 1024), 2048);
    }
}
