//! Diffing a DuckDB warehouse file inside the state's own DuckDB.
//!
//! When the warehouse is a DuckDB file, its rows need not be streamed out
//! and staged one by one: the file is attached (read-only) to the state's
//! connection, and one statement hashes each row's sent columns (its
//! *row hash*), joins the rows with the snapshot on a hash of the key text,
//! and keeps only the rows that may differ from what was delivered — the
//! *candidates*: keys not in the snapshot, keys whose row hash differs (or
//! was never recorded), and snapshot keys the query no longer returns.
//!
//! The caller renders only the candidates to JSON, fingerprints them exactly
//! as staged rows are fingerprinted, and writes the records to send with an
//! [`OutboxWriter`]; a candidate whose fingerprint equals the delivered one is
//! not a change (its row hash is refreshed instead). Anything this cannot
//! decide exactly — a key seen twice, a NULL key, two keys whose hashes
//! meet — is reported, and the caller stages the query the ordinary way.

use crate::store::{OUTBOX_COLUMNS, OUTBOX_RECORD, append_columns};
use crate::{DiffError, StateStore};
use backflow_core::{Change, Mode, Op};
use duckdb::arrow::array::{ArrayBuilder, ArrayRef, Int64Builder, StringBuilder, UInt64Builder};
use duckdb::arrow::datatypes::SchemaRef;
use duckdb::arrow::record_batch::RecordBatch;
use duckdb::core::{DataChunkHandle, LogicalTypeHandle, LogicalTypeId};
use duckdb::vscalar::{ScalarFunctionSignature, VScalar};
use duckdb::vtab::arrow::WritableVector;
use duckdb::{Connection, params};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The alias of the attached warehouse in the state's connection.
const WAREHOUSE: &str = "backflow_warehouse";

/// The rows `backflow_count` has seen.
pub(crate) type RowCounter = Arc<AtomicU64>;

/// `backflow_count(flag)`: counts the rows it is called for, and returns
/// NULL. Volatile and given a value of each row, so that DuckDB calls it
/// for every row: the candidates pass counts the query's rows on the way,
/// without a pass of its own.
struct CountFunction;

impl VScalar for CountFunction {
    type State = RowCounter;

    fn invoke(
        counter: &RowCounter,
        input: &mut DataChunkHandle,
        output: &mut dyn WritableVector,
    ) -> Result<(), Box<dyn std::error::Error>> {
        counter.fetch_add(input.len() as u64, Ordering::Relaxed);
        let mut out = output.flat_vector();
        for row in 0..input.len() {
            out.set_null(row);
        }
        Ok(())
    }

    fn signatures() -> Vec<ScalarFunctionSignature> {
        vec![ScalarFunctionSignature::exact(
            vec![LogicalTypeHandle::from(LogicalTypeId::Boolean)],
            LogicalTypeHandle::from(LogicalTypeId::Boolean),
        )]
    }

    fn volatile() -> bool {
        true
    }
}

/// Registers `backflow_count` on the state's connection.
pub(crate) fn register_counter(conn: &Connection) -> Result<RowCounter, DiffError> {
    let counter = RowCounter::default();
    conn.register_scalar_function_with_state::<CountFunction>("backflow_count", &counter)?;
    Ok(counter)
}

/// The query to diff inside DuckDB.
pub struct InWarehouse<'a> {
    /// The sync's query, as written for the warehouse.
    pub query: &'a str,
    /// The primary-key columns, with their names as JSON strings (as the
    /// key text writes them).
    pub key_columns: &'a [(String, String)],
    /// The columns whose values the request carries (payload and URL), in
    /// a fixed order: their hash is the row hash.
    pub hashed_columns: &'a [String],
    /// Hashed with them: a digest of everything else that shapes a
    /// request (mapping, column types).
    pub seed: u64,
    /// Whether the rows' order is kept (see [`StateStore::query_is_ordered`]).
    pub ordered: bool,
}

/// What the candidate pass found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scan {
    /// Rows the query returned.
    pub rows: u64,
    /// Rows whose key has a NULL.
    pub null_keys: u64,
    /// Whether some key may appear twice: two new rows share a key hash,
    /// or more rows matched the snapshot than snapshot keys were matched.
    pub maybe_duplicates: bool,
    /// Whether a key hash joined two different key texts.
    pub collided: bool,
    /// Candidate rows that are in the query (added or possibly changed).
    pub present: u64,
    /// Snapshot keys the query no longer returns.
    pub removed: u64,
}

/// Where the bookkeeping columns of a candidate batch are (the query's
/// columns come first, in query order).
#[derive(Debug, Clone, Copy)]
pub struct CandidateColumns {
    /// The key text as DuckDB wrote it (`VARCHAR`).
    pub key: usize,
    /// `added` or `changed`.
    pub change: usize,
    /// The row hash (`UBIGINT`).
    pub row_hash: usize,
    /// The fingerprint last delivered, for a changed key (`UBIGINT`).
    pub old_fingerprint: usize,
    /// The key's generation so far (`BIGINT`; 0 for a key never
    /// delivered).
    pub generation: usize,
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The query without a trailing `;`.
fn statement(query: &str) -> &str {
    query.trim_end().trim_end_matches(';')
}

/// The query as a subquery: newlines keep a trailing `-- comment` inside.
fn subquery(query: &str) -> String {
    format!("(\n{}\n)", statement(query))
}

impl StateStore {
    /// Attaches the warehouse file, read-only, to the state's connection.
    pub fn attach_warehouse(&self, file: &Path) -> Result<(), DiffError> {
        let path = literal(&file.display().to_string());
        self.conn.execute_batch(&format!("ATTACH IF NOT EXISTS {path} AS {WAREHOUSE} (READ_ONLY)"))?;
        Ok(())
    }

    /// Detaches the warehouse, dropping any candidates left.
    pub fn detach_warehouse(&self) -> Result<(), DiffError> {
        self.conn.execute_batch(&format!("DROP TABLE IF EXISTS candidates; DETACH DATABASE IF EXISTS {WAREHOUSE}"))?;
        Ok(())
    }

    /// Runs `f` with the attached warehouse as the default catalog, so the
    /// query's unqualified names are the warehouse's.
    fn in_warehouse<T>(&self, f: impl FnOnce() -> Result<T, DiffError>) -> Result<T, DiffError> {
        self.conn.execute_batch(&format!("USE {WAREHOUSE}"))?;
        let result = f();
        self.conn.execute_batch(&format!("USE {}", ident(&self.catalog)))?;
        result
    }

    /// Whether the query's result has an order: DuckDB's parse tree of the
    /// query has a top-level `ORDER BY` (or the query is not one DuckDB can
    /// show the tree of). Keeping the order of an unordered query would
    /// cost a single-threaded pass over every row.
    pub fn query_is_ordered(&self, query: &str) -> bool {
        let tree: Option<String> =
            self.conn.query_row("SELECT json_serialize_sql(?)", [statement(query)], |r| r.get(0)).ok();
        let Some(tree) = tree.and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()) else { return true };
        if tree["error"] == true {
            return true;
        }
        let modifiers = &tree["statements"][0]["node"]["modifiers"];
        modifiers.as_array().is_none_or(|m| m.iter().any(|m| m["type"] == "ORDER_MODIFIER"))
    }

    /// The query's result columns and types, without running it.
    pub fn warehouse_schema(&self, query: &str) -> Result<SchemaRef, DiffError> {
        self.in_warehouse(|| {
            let mut stmt = self.conn.prepare(&format!("SELECT * FROM {} LIMIT 0", subquery(query)))?;
            Ok(stmt.query_arrow([])?.get_schema())
        })
    }

    /// The DuckDB type names of the query's result columns, without
    /// running it.
    pub fn warehouse_column_types(&self, query: &str) -> Result<Vec<String>, DiffError> {
        self.in_warehouse(|| {
            let mut stmt = self.conn.prepare(&format!("DESCRIBE SELECT * FROM {}", subquery(query)))?;
            let types = stmt.query_map([], |r| r.get::<_, String>(1))?.collect::<Result<Vec<_>, _>>()?;
            Ok(types)
        })
    }

    /// Runs the query inside DuckDB and keeps its candidates (see the module
    /// docs) in the temporary table `candidates` (in query order if
    /// `ordered`).
    pub fn find_candidates(&self, q: &InWarehouse) -> Result<Scan, DiffError> {
        let snapshot_len = self.snapshot_len()?;
        let mut key_text = String::from("'{'");
        for (n, (column, json_name)) in q.key_columns.iter().enumerate() {
            let separator = if n > 0 { "," } else { "" };
            key_text.push_str(&format!(
                " || {} || to_json({})::VARCHAR",
                literal(&format!("{separator}{json_name}:")),
                ident(column)
            ));
        }
        key_text.push_str(" || '}'");
        let hashed: Vec<String> = q.hashed_columns.iter().map(|c| ident(c)).collect();
        let row_hash =
            format!("hash({}::UBIGINT{})", q.seed, hashed.iter().map(|c| format!(", {c}")).collect::<String>());
        let snapshot = format!("{}.main.snapshot", ident(&self.catalog));
        // A key with an unconfirmed delivery is a candidate whatever its row
        // hash: it is sent again even when its row equals the confirmed one.
        let snapshot_row_hash = if self.has_pending()? {
            format!(
                "CASE WHEN key IN (SELECT key FROM {}.main.pending) THEN NULL ELSE row_hash END AS row_hash",
                ident(&self.catalog)
            )
        } else {
            "row_hash".to_string()
        };
        // The snapshot is the join's build side: the query's rows, with all
        // their columns, only stream past it.
        let sql = format!(
            "CREATE OR REPLACE TEMP TABLE candidates AS
             SELECT c.* EXCLUDE (__backflow_present),
                    coalesce(c.__backflow_key, s.key) AS __backflow_key_text,
                    CASE WHEN c.__backflow_present IS NULL THEN 'removed'
                         WHEN s.key IS NULL THEN 'added' ELSE 'changed' END AS __backflow_change,
                    s.fingerprint AS __backflow_old_fingerprint,
                    s.rowid AS __backflow_snapshot_row,
                    CASE WHEN s.key IS NULL THEN 0 ELSE coalesce(s.gen, 1) END AS __backflow_prior_gen,
                    coalesce(s.key <> c.__backflow_key, false) AS __backflow_collided
             FROM (
                 SELECT *, CASE WHEN __backflow_key IS NOT NULL THEN hash(__backflow_key) END AS __backflow_kh,
                        true AS __backflow_present, backflow_count(__backflow_row_hash IS NOT NULL) AS __backflow_counted
                 FROM (
                     SELECT q.*, {key_text} AS __backflow_key, {row_hash} AS __backflow_row_hash,
                            {ord} AS __backflow_ord
                     FROM {query} q)) c
             FULL OUTER JOIN (SELECT rowid, hash(key) AS kh, key, {snapshot_row_hash}, fingerprint, gen FROM {snapshot}) s
               ON s.kh = c.__backflow_kh
             WHERE c.__backflow_present IS NULL OR s.key IS NULL
                OR s.row_hash IS DISTINCT FROM c.__backflow_row_hash OR s.key <> c.__backflow_key
             {order}",
            query = subquery(q.query),
            ord = if q.ordered { "row_number() OVER ()" } else { "NULL::BIGINT" },
            order = if q.ordered { "ORDER BY __backflow_ord" } else { "" },
        );
        self.counter.store(0, Ordering::Relaxed);
        self.in_warehouse(|| {
            self.conn.execute_batch("SET disabled_optimizers = 'build_side_probe_side'")?;
            let result = self.conn.execute_batch(&sql);
            self.conn.execute_batch("RESET disabled_optimizers")?;
            Ok(result?)
        })?;
        let rows = self.counter.load(Ordering::Relaxed);
        let (added, removed, changed, null_keys, added_keys, collided): (i64, i64, i64, i64, i64, bool) =
            self.conn.query_row(
                "SELECT count(*) FILTER (__backflow_change = 'added'), count(*) FILTER (__backflow_change = 'removed'),
                        count(*) FILTER (__backflow_change = 'changed'), count(*) FILTER (__backflow_kh IS NULL
                        AND __backflow_change = 'added'),
                        count(DISTINCT __backflow_kh) FILTER (__backflow_change = 'added'),
                        coalesce(bool_or(__backflow_collided), false)
                 FROM candidates",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )?;
        let (added, removed) = (added as u64, removed as u64);
        // Every query row that is not new matched a snapshot key; with no
        // key twice, they are as many as the snapshot keys still there.
        let matched = rows.saturating_sub(added);
        let repeated_new = added_keys as u64 + null_keys as u64 != added;
        Ok(Scan {
            rows,
            null_keys: null_keys as u64,
            maybe_duplicates: repeated_new || matched != snapshot_len - removed,
            collided,
            present: added + changed as u64,
            removed,
        })
    }

    /// Hands the candidates in the query (added or possibly changed) to `f`
    /// in the order of `candidates`, a batch at a time: the query's columns
    /// first, then the bookkeeping columns at `CandidateColumns`. Read a page
    /// at a time, so that `f` may write to the state in between.
    pub fn each_candidate<E: From<DiffError>>(
        &self,
        mut f: impl FnMut(&RecordBatch, &CandidateColumns) -> Result<(), E>,
    ) -> Result<(), E> {
        let total = self.count("SELECT count(*) FROM candidates")?;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT * EXCLUDE (__backflow_key, __backflow_kh, __backflow_snapshot_row, __backflow_collided, __backflow_counted,
                                   __backflow_ord, __backflow_key_text, __backflow_change, __backflow_row_hash,
                                   __backflow_old_fingerprint, __backflow_prior_gen),
                        __backflow_key_text, __backflow_change, __backflow_row_hash, __backflow_old_fingerprint,
                        __backflow_prior_gen
                 FROM candidates WHERE rowid >= ? AND rowid < ? AND __backflow_change <> 'removed'",
            )
            .map_err(DiffError::from)?;
        for start in (0..total).step_by(CANDIDATE_PAGE) {
            let end = start + CANDIDATE_PAGE as u64;
            let page: Vec<RecordBatch> =
                stmt.query_arrow(params![start as i64, end as i64]).map_err(DiffError::from)?.collect();
            for batch in &page {
                let n = batch.num_columns();
                let columns = CandidateColumns {
                    key: n - 5,
                    change: n - 4,
                    row_hash: n - 3,
                    old_fingerprint: n - 2,
                    generation: n - 1,
                };
                f(batch, &columns)?;
            }
        }
        Ok(())
    }

    /// A writer of a new outbox, replacing the current one.
    pub fn outbox_writer(&self) -> Result<OutboxWriter<'_>, DiffError> {
        self.conn.execute_batch(&format!("CREATE OR REPLACE {} outbox ({OUTBOX_COLUMNS})", self.outbox_table()))?;
        Ok(OutboxWriter { store: self, rows: 0, columns: OutboxColumns::default() })
    }

    /// Completes the outbox after the rows in the query were written: the
    /// snapshot keys the query no longer returns are added (with the payload
    /// last delivered) when `removed_op` sends them, and kept in `diff` for
    /// [`StateStore::forget_removed`] otherwise. With `payloads` (a plan,
    /// which shows only its first few records), only that many removed
    /// records get their payload.
    /// Earlier deliveries are then settled in (generations, and deletes of
    /// keys whose delivery is unconfirmed). Returns the records to send, and
    /// how many of them are such deletes.
    pub fn finish_candidates(&self, mode: Mode, payloads: Option<u64>) -> Result<(u64, u64), DiffError> {
        let removed_op = mode.op_for(Change::Removed);
        let op = removed_op.map_or("NULL".to_string(), |op| literal(op.as_str()));
        let limit = payloads.map_or(String::new(), |n| format!("ORDER BY key LIMIT {n}"));
        // Removed rows are fetched by the row ids the candidates pass saw,
        // checked against their keys: should a checkpoint have moved rows
        // since, they are found by key instead.
        self.conn.execute_batch(&format!(
            "CREATE OR REPLACE TEMP TABLE diff AS
             SELECT __backflow_key_text AS key, 'removed' AS change, {op}::VARCHAR AS op,
                    __backflow_snapshot_row AS snapshot_row
             FROM candidates WHERE __backflow_change = 'removed';
             DROP TABLE candidates;
             CREATE OR REPLACE TEMP TABLE wanted AS SELECT key, snapshot_row FROM diff WHERE op IS NOT NULL {limit};
             CREATE OR REPLACE TEMP TABLE removed_rows AS
             SELECT key, fingerprint, payload, route, row_hash, gen FROM snapshot
             WHERE rowid IN (SELECT snapshot_row FROM wanted);"
        ))?;
        let wanted = self.count("SELECT count(*) FROM wanted")?;
        if self.count("SELECT count(*) FROM removed_rows JOIN wanted USING (key)")? != wanted {
            self.conn.execute_batch(
                "CREATE OR REPLACE TEMP TABLE removed_rows AS
                 SELECT key, fingerprint, payload, route, row_hash, gen FROM snapshot JOIN wanted USING (key)",
            )?;
        }
        // Counted first: a statement does not read the table it appends to.
        let written = self.count("SELECT count(*) FROM outbox")?;
        self.conn.execute_batch(&format!(
            "INSERT INTO outbox ({OUTBOX_RECORD})
             SELECT {written} + row_number() OVER (ORDER BY d.key), d.key, 'removed', d.op,
                    r.fingerprint, r.payload, r.route, r.row_hash, coalesce(r.gen, 1) + 1
             FROM diff d LEFT JOIN (SELECT r.* FROM removed_rows r JOIN wanted USING (key)) r USING (key)
             WHERE d.op IS NOT NULL;
             DROP TABLE removed_rows;
             DROP TABLE wanted;"
        ))?;
        let unconfirmed_removals = self.settle_occurrences(mode, false, None)?;
        Ok((self.count("SELECT count(*) FROM outbox")?, unconfirmed_removals))
    }

    /// Records the row hashes of snapshot rows found unchanged although
    /// their row hash differed (or was never recorded): `(key text, row
    /// hash)` pairs.
    pub fn refresh_row_hashes(&self, rows: &[(String, u64)]) -> Result<(), DiffError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.conn.execute_batch("CREATE OR REPLACE TEMP TABLE refreshed (key VARCHAR, row_hash UBIGINT)")?;
        let mut appender = self.conn.appender("refreshed")?;
        for (key, hash) in rows {
            appender.append_row(params![key, hash])?;
        }
        appender.flush()?;
        drop(appender);
        self.transaction(|conn| {
            conn.execute_batch(
                "UPDATE snapshot SET row_hash = r.row_hash FROM refreshed r WHERE snapshot.key = r.key;
                 DROP TABLE refreshed;",
            )
        })
    }
}

#[derive(Default)]
struct OutboxColumns {
    row_num: Int64Builder,
    key: StringBuilder,
    change: StringBuilder,
    op: StringBuilder,
    fingerprint: UInt64Builder,
    payload: StringBuilder,
    route: StringBuilder,
    row_hash: UInt64Builder,
    generation: Int64Builder,
}

/// Appends records to send to a new outbox, numbered from 1, in columnar
/// batches.
pub struct OutboxWriter<'a> {
    store: &'a StateStore,
    rows: u64,
    columns: OutboxColumns,
}

/// Candidate rows read at a time.
const CANDIDATE_PAGE: usize = 32_768;

/// Records per batch appended to the outbox (each append commits).
const OUTBOX_BATCH: usize = 32_768;

impl OutboxWriter<'_> {
    /// Appends one record to send; `prior_generation` is the key's
    /// generation so far ([`CandidateColumns::generation`]).
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        key: &str,
        change: Change,
        op: Op,
        fingerprint: u64,
        payload: &str,
        route: Option<&str>,
        row_hash: u64,
        prior_generation: u64,
    ) -> Result<(), DiffError> {
        self.rows += 1;
        let c = &mut self.columns;
        c.row_num.append_value(self.rows as i64);
        c.key.append_value(key);
        c.change.append_value(change.as_str());
        c.op.append_value(op.as_str());
        c.fingerprint.append_value(fingerprint);
        c.payload.append_value(payload);
        c.route.append_option(route);
        c.row_hash.append_value(row_hash);
        c.generation.append_value(prior_generation as i64 + 1);
        if self.rows.is_multiple_of(OUTBOX_BATCH as u64) {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiffError> {
        let c = &mut self.columns;
        if c.row_num.is_empty() {
            return Ok(());
        }
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("row_num", Arc::new(c.row_num.finish())),
            ("key", Arc::new(c.key.finish())),
            ("change", Arc::new(c.change.finish())),
            ("op", Arc::new(c.op.finish())),
            ("fingerprint", Arc::new(c.fingerprint.finish())),
            ("payload", Arc::new(c.payload.finish())),
            ("route", Arc::new(c.route.finish())),
            ("row_hash", Arc::new(c.row_hash.finish())),
            ("gen", Arc::new(c.generation.finish())),
        ];
        let mut appender = self.store.conn.appender("outbox")?;
        // The delivery columns stay empty.
        for (name, _) in &columns {
            appender.add_column(name)?;
        }
        append_columns(&mut appender, columns)?;
        appender.flush()?;
        Ok(())
    }

    /// Writes what is left; returns the number of records.
    pub fn finish(mut self) -> Result<u64, DiffError> {
        self.flush()?;
        Ok(self.rows)
    }
}
