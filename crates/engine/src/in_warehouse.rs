//! The diff of a warehouse that is a DuckDB file, computed inside DuckDB:
//! the file is attached to the sync's state, one statement finds the rows
//! that may have changed (`backflow_diff`'s candidates), and only those are
//! turned into JSON here. Whatever this path cannot decide exactly sends the
//! run back to staging the query row by row, which decides everything.

use crate::config::Sync;
use crate::run::SAMPLES;
use crate::stage::{Converted, Converter};
use backflow_core::{Change, Mapping, Mode};
use backflow_diff::{CandidateColumns, DiffCounts, DiffError, InWarehouse, OutboxWriter, StateStore};
use backflow_source::json::check_supported;
use backflow_source::{RecordBatch, check_distinct};
use duckdb::arrow::array::{Array, AsArray};
use duckdb::arrow::datatypes::{Int64Type, UInt64Type};
use std::path::Path;

/// How the diff inside DuckDB ended.
pub(crate) enum Outcome {
    /// The outbox is written: the counts, and the keys found unchanged
    /// whose row hash is to be recorded (`(key, hash)`).
    Diffed(DiffCounts, Vec<(String, u64)>),
    /// The query must be staged instead, for this reason.
    Staged(String),
}

/// Why the candidates pass stopped.
enum Stop {
    Failed(DiffError),
    Stage(String),
}

impl From<DiffError> for Stop {
    fn from(e: DiffError) -> Stop {
        Stop::Failed(e)
    }
}

/// What the sync's query is turned into.
pub(crate) struct Query<'a> {
    pub sync: &'a Sync,
    pub text: &'a str,
    pub mapping: &'a Mapping,
    pub route_columns: &'a [String],
    /// Whether this is a plan, which shows only its first `SAMPLES` records.
    pub plan: bool,
}

/// Diffs `q` over the warehouse `file` inside the state `store`. The file
/// is attached for the diff only, so its lock is not held while sending.
pub(crate) fn diff(store: &StateStore, file: &Path, q: &Query) -> Result<Outcome, DiffError> {
    if let Err(e) = store.attach_warehouse(file) {
        return Ok(Outcome::Staged(format!("attaching the warehouse: {e}")));
    }
    let outcome = diff_attached(store, q);
    store.detach_warehouse()?;
    outcome
}

fn diff_attached(store: &StateStore, q: &Query) -> Result<Outcome, DiffError> {
    let schema = match store.warehouse_schema(q.text) {
        Ok(schema) => schema,
        Err(e) => return Ok(Outcome::Staged(format!("the query's columns: {e}"))),
    };
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let checked = check_distinct(&names)
        .and_then(|()| schema.fields().iter().try_for_each(|f| check_supported(f.name(), f.data_type())));
    if let Err(e) = checked {
        return Ok(Outcome::Staged(e.to_string()));
    }
    // UHUGEINT crosses Arrow as a signed decimal; the source reads it
    // unsigned.
    if store.warehouse_column_types(q.text).is_ok_and(|types| types.iter().any(|t| t == "UHUGEINT")) {
        return Ok(Outcome::Staged("a UHUGEINT column is read through the source".into()));
    }
    let converter =
        match Converter::new(q.mapping, &names, &q.sync.key_columns(), q.route_columns, q.sync.meta_key().as_deref()) {
            Ok(converter) => converter,
            Err(e) => return Ok(Outcome::Staged(e)),
        };
    let hashed: Vec<String> = converter
        .compiled
        .columns()
        .into_iter()
        .chain(converter.route_index.iter().copied())
        .map(|i| names[i].clone())
        .collect();
    let keys: Vec<(String, String)> = converter
        .key_index
        .iter()
        .zip(&converter.key_names)
        .map(|(&i, json)| (names[i].clone(), json.clone()))
        .collect();
    // Everything else that shapes a request's text seeds the row hash, so
    // that a change to it (a static value read from the environment, a
    // column's type) makes every row a candidate.
    let shape = serde_json::json!({
        "mapping": q.mapping,
        "columns": schema.fields().iter().map(|f| format!("{} {}", f.name(), f.data_type())).collect::<Vec<_>>(),
        "hashed": hashed,
    });
    let request = InWarehouse {
        query: q.text,
        key_columns: &keys,
        hashed_columns: &hashed,
        seed: xxhash_rust::xxh3::xxh3_64(shape.to_string().as_bytes()),
        ordered: store.query_is_ordered(q.text),
    };
    let started = std::time::Instant::now();
    let scan = match store.find_candidates(&request) {
        Ok(scan) => scan,
        Err(e) => return Ok(Outcome::Staged(format!("the candidates query: {e}"))),
    };
    tracing::debug!(elapsed = ?started.elapsed(), ?scan, "candidates found");
    if scan.null_keys > 0 || scan.maybe_duplicates || scan.collided {
        return Ok(Outcome::Staged(format!("{scan:?}")));
    }
    let mode = q.sync.spec.mode;
    // Unconfirmed records of keys the query no longer returns are sent
    // again as they were, outside mirror mode: which keys the query returns
    // is known to staging only.
    if mode.op_for(Change::Removed).is_none() && store.has_pending()? {
        return Ok(Outcome::Staged("unconfirmed deliveries are settled by staging".into()));
    }
    let mut pass = Pass {
        converter,
        columns: names.len(),
        mode,
        outbox: store.outbox_writer()?,
        converted: Converted::new(!q.route_columns.is_empty()),
        counts: DiffCounts { rows: scan.rows, removed: scan.removed, ..DiffCounts::default() },
        refresh: Vec::new(),
        unconfirmed: store.pending_keys()?,
    };
    match store.each_candidate(|batch, at| pass.batch(batch, at)) {
        Ok(()) => {}
        Err(Stop::Failed(e)) => return Err(e),
        Err(Stop::Stage(reason)) => return Ok(Outcome::Staged(reason)),
    }
    let Pass { outbox, mut counts, refresh, .. } = pass;
    let counts_sent = outbox.finish()?;
    tracing::debug!(elapsed = ?started.elapsed(), "candidates rendered");
    let removed_op = mode.op_for(Change::Removed);
    // A plan shows its first few records; removed ones come last.
    let payloads = q.plan.then(|| SAMPLES.saturating_sub(counts_sent));
    let (to_send, unconfirmed_removals) = store.finish_candidates(mode, payloads)?;
    counts.to_send = to_send;
    counts.removed += unconfirmed_removals;
    if removed_op.is_none() {
        counts.forgotten = counts.removed;
    }
    counts.unchanged = counts.rows - counts.added - counts.changed;
    tracing::debug!(elapsed = ?started.elapsed(), "outbox written");
    Ok(Outcome::Diffed(counts, refresh))
}

/// The candidates pass: renders each candidate row and writes the records
/// to send.
struct Pass<'a> {
    converter: Converter,
    /// The query's columns, which come first in a candidate batch.
    columns: usize,
    mode: Mode,
    outbox: OutboxWriter<'a>,
    converted: Converted,
    counts: DiffCounts,
    refresh: Vec<(String, u64)>,
    /// Keys with an unconfirmed delivery: sent again even when unchanged.
    unconfirmed: std::collections::HashSet<String>,
}

impl Pass<'_> {
    fn batch(&mut self, batch: &RecordBatch, at: &CandidateColumns) -> Result<(), Stop> {
        let query_columns = batch
            .project(&(0..self.columns).collect::<Vec<_>>())
            .map_err(|e| Stop::Stage(format!("candidate columns: {e}")))?;
        self.converted.clear();
        self.converter.convert_batch(&query_columns, &mut self.converted).map_err(Stop::Stage)?;
        let sql_key = batch.column(at.key).as_string::<i32>();
        let change = batch.column(at.change).as_string::<i32>();
        let row_hash = batch.column(at.row_hash).as_primitive::<UInt64Type>();
        let old_fingerprint = batch.column(at.old_fingerprint).as_primitive::<UInt64Type>();
        let generation = batch.column(at.generation).as_primitive::<Int64Type>();
        for (i, (key, payload, route)) in self.converted.rows().enumerate() {
            // The join matched keys by the text DuckDB wrote; a key it
            // writes otherwise than Backflow would not have matched.
            if self.converted.null_key[i] || sql_key.is_null(i) || sql_key.value(i) != key {
                return Err(Stop::Stage(format!("key {key} is written {} by DuckDB", sql_key.value(i))));
            }
            let fingerprint = self.converted.fingerprint[i];
            let change = if change.value(i) == "added" { Change::Added } else { Change::Changed };
            if change == Change::Changed && old_fingerprint.value(i) == fingerprint && !self.unconfirmed.contains(key) {
                self.refresh.push((key.to_string(), row_hash.value(i)));
                continue;
            }
            match change {
                Change::Added => self.counts.added += 1,
                _ => self.counts.changed += 1,
            }
            if let Some(op) = self.mode.op_for(change) {
                let prior = generation.value(i) as u64;
                self.outbox.push(key, change, op, fingerprint, payload, route, row_hash.value(i), prior)?;
            }
        }
        Ok(())
    }
}
