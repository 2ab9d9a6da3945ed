//! The per-sync state file: snapshot, runs, rejections, settings; staging of
//! the current query result and the diff against the snapshot.

use crate::DiffError;
use backflow_core::{Change, Mode, Op};
use duckdb::arrow::array::{ArrayBuilder, ArrayRef, Int64Builder, StringBuilder, UInt64Builder};
use duckdb::arrow::record_batch::RecordBatch;
use duckdb::{Appender, Config, Connection, OptionalExt, params};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS snapshot (
    key VARCHAR NOT NULL,
    fingerprint UBIGINT NOT NULL,
    payload VARCHAR NOT NULL,
    route VARCHAR,
    op VARCHAR NOT NULL,
    message_id VARCHAR,
    run_id VARCHAR,
    delivered_at VARCHAR,
    row_hash UBIGINT,
    row_num BIGINT
);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    sync VARCHAR NOT NULL,
    mode VARCHAR NOT NULL,
    full_resync BOOLEAN NOT NULL,
    started_at VARCHAR NOT NULL,
    ended_at VARCHAR,
    status VARCHAR NOT NULL,
    counts VARCHAR NOT NULL,
    message VARCHAR
);
CREATE TABLE IF NOT EXISTS rejections (
    run_id VARCHAR NOT NULL,
    key VARCHAR NOT NULL,
    op VARCHAR NOT NULL,
    message_id VARCHAR NOT NULL,
    status INTEGER,
    reason VARCHAR NOT NULL,
    body VARCHAR NOT NULL,
    failed_at VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (name VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS acked (
    first_row BIGINT NOT NULL,
    last_row BIGINT NOT NULL,
    run_id VARCHAR NOT NULL,
    delivered_at VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS delivered_ranges (
    first_row BIGINT NOT NULL,
    last_row BIGINT NOT NULL,
    delivered_at VARCHAR NOT NULL,
    run_id VARCHAR
);
CREATE TABLE IF NOT EXISTS pending (
    key VARCHAR NOT NULL,
    op VARCHAR NOT NULL,
    fingerprint UBIGINT NOT NULL,
    payload VARCHAR,
    route VARCHAR,
    gen BIGINT NOT NULL,
    run_id VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS retired (key VARCHAR NOT NULL, gen BIGINT NOT NULL);
ALTER TABLE snapshot ADD COLUMN IF NOT EXISTS row_hash UBIGINT;
ALTER TABLE snapshot ADD COLUMN IF NOT EXISTS row_num BIGINT;
ALTER TABLE snapshot ADD COLUMN IF NOT EXISTS gen BIGINT;
ALTER TABLE IF EXISTS outbox ADD COLUMN IF NOT EXISTS row_hash UBIGINT;
ALTER TABLE IF EXISTS outbox ADD COLUMN IF NOT EXISTS gen BIGINT;
ALTER TABLE IF EXISTS outbox ADD COLUMN IF NOT EXISTS message_id VARCHAR;
ALTER TABLE IF EXISTS outbox ADD COLUMN IF NOT EXISTS run_id VARCHAR;
ALTER TABLE IF EXISTS outbox ADD COLUMN IF NOT EXISTS delivered_at VARCHAR;
ALTER TABLE delivered_ranges ADD COLUMN IF NOT EXISTS run_id VARCHAR;
";

/// The outbox's columns: the records to send, numbered from 1 (`row_num`),
/// then the snapshot's delivery columns, empty, so that a delivery
/// acknowledged whole makes the outbox the snapshot without altering its
/// columns (see `outbox_becomes_snapshot`). The payload and fingerprint may
/// be missing until the outbox is complete (a plan's removed records; a
/// payload to stage again).
pub(crate) const OUTBOX_COLUMNS: &str = "row_num BIGINT, key VARCHAR NOT NULL, change VARCHAR NOT NULL,
    op VARCHAR NOT NULL, fingerprint UBIGINT, payload VARCHAR, route VARCHAR, row_hash UBIGINT, gen BIGINT,
    message_id VARCHAR, run_id VARCHAR, delivered_at VARCHAR";

/// The outbox's columns that describe a record to send, in the table's order.
pub(crate) const OUTBOX_RECORD: &str = "row_num, key, change, op, fingerprint, payload, route, row_hash, gen";

/// The state of one sync, opened exclusively.
pub struct StateStore {
    pub(crate) conn: Connection,
    pub(crate) sync: String,
    /// The state file.
    path: std::path::PathBuf,
    /// The sync's run lock, held while the store is open.
    _lock: std::fs::File,
    /// The state database's catalog name (to name its tables while a
    /// warehouse is the default catalog).
    pub(crate) catalog: String,
    /// The rows `backflow_count` has counted.
    pub(crate) counter: crate::warehouse::RowCounter,
    /// Whether the outbox is a temporary table (a plan's).
    pub(crate) outbox_in_memory: bool,
}

/// How the current query result differs from the snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DiffCounts {
    /// Rows staged from the query.
    pub rows: u64,
    /// Keys not in the snapshot (every row with `--full`).
    pub added: u64,
    /// Keys whose fingerprint differs.
    pub changed: u64,
    /// Keys in the snapshot but not in the query.
    pub removed: u64,
    /// Keys whose fingerprint is unchanged.
    pub unchanged: u64,
    /// Records to send.
    pub to_send: u64,
    /// Removed keys dropped from the snapshot without sending anything.
    pub forgotten: u64,
}

/// Duplicate primary keys found in the staged rows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InvalidKeys {
    /// Distinct keys that appear more than once.
    pub keys: u64,
    /// Rows carrying those keys.
    pub rows: u64,
    /// A few of the keys.
    pub examples: Vec<String>,
}

/// One record to send, as computed by [`StateStore::diff`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// 1-based position within the run.
    pub row_num: u64,
    /// Canonical key text.
    pub key: String,
    /// How the row differs.
    pub change: Change,
    /// What to tell the receiver.
    pub op: Op,
    /// Fingerprint of `payload`.
    pub fingerprint: u64,
    /// The payload as JSON text: the current one, or for a removed key the
    /// one last delivered.
    pub payload: String,
    /// The URL's column values as JSON text, when the URL needs any.
    pub route: Option<String>,
    /// The key's generation for this occurrence (see
    /// [`backflow_core::message_id`]).
    pub generation: u64,
}

/// A record the receiver refused, or that could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// Canonical key text.
    pub key: String,
    /// The op that was attempted.
    pub op: Op,
    /// The message id it carried.
    pub message_id: String,
    /// HTTP status, when the receiver answered.
    pub status: Option<u16>,
    /// Why it failed.
    pub reason: String,
    /// The start of the response body.
    pub body: String,
    /// When (RFC 3339, UTC).
    pub at: String,
}

/// One run as recorded in the state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRecord {
    /// The run's id.
    pub run_id: String,
    /// The sync.
    pub sync: String,
    /// The sync's mode at the time.
    pub mode: Mode,
    /// Whether it was a `--full` run.
    pub full: bool,
    /// Start (RFC 3339, UTC).
    pub started_at: String,
    /// End, once finished.
    pub ended_at: Option<String>,
    /// `running`, `succeeded`, `partial` (some records rejected or pending) or `failed`.
    pub status: String,
    /// Counts per change and op, and delivery outcomes.
    pub counts: serde_json::Value,
    /// The error that ended the run, if any.
    pub message: Option<String>,
}

/// What the state knows about one key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyRecord {
    /// Canonical key text.
    pub key: String,
    /// The payload last delivered (JSON text), if it was delivered.
    pub delivered: Option<Delivered>,
    /// The last rejection of this key, if any.
    pub last_rejection: Option<Rejection>,
    /// A delivery that may have reached the receiver but was never
    /// acknowledged (the next run sends it again, or deletes the key).
    pub unconfirmed: Option<Unconfirmed>,
}

/// A record sent (or about to be) whose acknowledgement was never recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Unconfirmed {
    /// The op sent.
    pub op: String,
    /// The payload sent (JSON).
    pub payload: serde_json::Value,
    /// The message id it carried.
    pub message_id: String,
    /// The run that sent it.
    pub run_id: String,
}

/// The last successful delivery of a key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivered {
    /// The payload (JSON).
    pub payload: serde_json::Value,
    /// Its fingerprint (hex).
    pub fingerprint: String,
    /// The op delivered.
    pub op: String,
    /// The message id delivered.
    pub message_id: String,
    /// The run that delivered it.
    pub run_id: String,
    /// When (RFC 3339, UTC).
    pub delivered_at: String,
}

/// Loads the current query result into the state's staging table, in
/// columnar batches.
pub struct Stager<'a> {
    appender: Appender<'a>,
    ord: i64,
    key: StringBuilder,
    fingerprint: UInt64Builder,
    payload: StringBuilder,
    route: StringBuilder,
    ords: Int64Builder,
}

/// A set of 64-bit hashes, which are used as they are (they are already
/// uniformly spread).
pub type HashSet64 = std::collections::HashSet<u64, nohash_hasher::BuildNoHashHasher<u64>>;

/// The 64-bit hash of a key's canonical text.
pub fn key_hash(key: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key.as_bytes())
}

/// One 64-bit value for a key (its [`key_hash`]) and a fingerprint.
pub fn pair_hash(key_hash: u64, fingerprint: u64) -> u64 {
    key_hash ^ fingerprint.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Rows per batch appended to the staging table (DuckDB's vector size).
const STAGE_BATCH: usize = 2048;

impl Stager<'_> {
    /// Stages one row: its key text, its fingerprint, the payload and the
    /// URL's column values. The payload may be left out (`None`) for a row
    /// whose key and fingerprint the snapshot already holds
    /// ([`StateStore::delivered_pairs`]): it cannot be a change, and the
    /// payloads of all rows are most of what staging would write.
    pub fn push(
        &mut self,
        key: &str,
        fingerprint: u64,
        payload: Option<&str>,
        route: Option<&str>,
    ) -> Result<(), DiffError> {
        self.ord += 1;
        self.key.append_value(key);
        self.fingerprint.append_value(fingerprint);
        self.payload.append_option(payload);
        self.route.append_option(route);
        self.ords.append_value(self.ord);
        if self.ords.len() >= STAGE_BATCH {
            self.append_batch()?;
        }
        Ok(())
    }

    fn append_batch(&mut self) -> Result<(), DiffError> {
        if self.ords.is_empty() {
            return Ok(());
        }
        append_columns(
            &mut self.appender,
            vec![
                ("key", Arc::new(self.key.finish())),
                ("fingerprint", Arc::new(self.fingerprint.finish())),
                ("payload", Arc::new(self.payload.finish())),
                ("route", Arc::new(self.route.finish())),
                ("ord", Arc::new(self.ords.finish())),
            ],
        )
    }

    /// Flushes what was staged.
    pub fn finish(mut self) -> Result<u64, DiffError> {
        self.append_batch()?;
        self.appender.flush()?;
        Ok(self.ord as u64)
    }
}

/// Appends one batch of named, equal-length columns (the table's, in its
/// order) through `appender`.
pub(crate) fn append_columns(appender: &mut Appender<'_>, columns: Vec<(&str, ArrayRef)>) -> Result<(), DiffError> {
    let batch = RecordBatch::try_from_iter(columns).expect("the columns of one batch are of equal length");
    appender.append_record_batch(batch)?;
    Ok(())
}

/// Earlier versions logged one ack per record with its message id; they
/// become ranges (message ids are derived since), and snapshots may leave
/// message ids, delivery times and run ids out (a first delivery's are
/// kept by range).
fn migrate_ack_log(conn: &Connection) -> Result<(), DiffError> {
    conn.execute_batch(
        "ALTER TABLE snapshot ALTER COLUMN message_id DROP NOT NULL;
         ALTER TABLE snapshot ALTER COLUMN delivered_at DROP NOT NULL;
         ALTER TABLE snapshot ALTER COLUMN run_id DROP NOT NULL;",
    )?;
    migrate_if(
        conn,
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'acks' AND database_name = current_database()",
        "INSERT INTO acked SELECT row_num, row_num, run_id, delivered_at FROM acks;
         DROP TABLE acks;",
    )
}

/// State files written before the ack log kept the snapshot under a primary
/// key, which DuckDB checks too eagerly for a delete and re-insert of the
/// same key in one transaction; the table is rebuilt without it.
fn drop_snapshot_primary_key(conn: &Connection) -> Result<(), DiffError> {
    migrate_if(
        conn,
        "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'snapshot' AND constraint_type = 'PRIMARY KEY'",
        "CREATE TABLE snapshot_unkeyed AS SELECT * FROM snapshot;
         DROP TABLE snapshot;
         ALTER TABLE snapshot_unkeyed RENAME TO snapshot;",
    )
}

/// Runs `statements` in one transaction when `probe` counts anything.
fn migrate_if(conn: &Connection, probe: &str, statements: &str) -> Result<(), DiffError> {
    let found: i64 = conn.query_row(probe, [], |r| r.get(0))?;
    if found > 0 {
        conn.execute_batch(&format!("BEGIN TRANSACTION; {statements} COMMIT;"))?;
    }
    Ok(())
}

/// The current time as RFC 3339 UTC with milliseconds.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl StateStore {
    /// The state file of `sync` under `dir`.
    pub fn path(dir: &Path, sync: &str) -> std::path::PathBuf {
        dir.join(format!("{sync}.duckdb"))
    }

    /// Opens (creating if needed) the state of `sync`, taking its run lock.
    /// `memory_limit` bounds DuckDB's memory for diffs (e.g. `1GB`); larger
    /// diffs spill to `<dir>/tmp`.
    pub fn open(dir: &Path, sync: &str, memory_limit: &str) -> Result<StateStore, DiffError> {
        let path = StateStore::path(dir, sync);
        let open_err =
            |message: String| DiffError::Open { sync: sync.to_string(), path: path.display().to_string(), message };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        // The run lock: an exclusive lock on a file beside the state, which
        // the operating system releases when the process ends, however it
        // ends.
        let lock_path = dir.join(format!("{sync}.lock"));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| open_err(format!("cannot create the lock file {}: {e}", lock_path.display())))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(DiffError::Busy {
                    sync: sync.to_string(),
                    detail: format!("{} is locked", lock_path.display()),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(open_err(format!("cannot lock {}: {e}", lock_path.display())));
            }
        }
        // A file that exists but does not start like a DuckDB database
        // (its header says `DUCK` at byte 8) is damaged; other open
        // failures (permissions, a full disk while replaying the log, a lock
        // held by another program) are reported as they are.
        let damaged_header = match std::fs::File::open(&path) {
            Ok(mut file) => {
                let mut header = [0u8; 12];
                let read = std::io::Read::read(&mut file, &mut header).unwrap_or(0);
                read < header.len() || &header[8..12] != b"DUCK"
            }
            Err(_) => false,
        };
        let config = Config::default()
            .with("autoinstall_known_extensions", "false")
            .and_then(|c| c.max_memory(memory_limit))
            .and_then(|c| c.with("temp_directory", dir.join("tmp").display().to_string()))
            .map_err(|e| open_err(e.to_string()))?;
        let conn = Connection::open_with_flags(&path, config).map_err(|e| {
            if damaged_header {
                DiffError::Damaged { sync: sync.to_string(), path: path.display().to_string(), detail: e.to_string() }
            } else {
                open_err(e.to_string())
            }
        })?;
        // Payload text is written twice per delivered record (outbox,
        // snapshot); FSST compression of it cost more CPU than the delivery
        // itself, so state files trade size for speed. (Set on the open
        // connection: given at open, DuckDB kept compressing.)
        conn.execute_batch("SET disabled_compression_methods = 'fsst,dict_fsst'")?;
        conn.execute_batch(SCHEMA)?;
        drop_snapshot_primary_key(&conn)?;
        migrate_ack_log(&conn)?;
        let catalog = conn.query_row("SELECT current_database()", [], |r| r.get(0))?;
        let counter = crate::warehouse::register_counter(&conn)?;
        let store =
            StateStore { conn, sync: sync.to_string(), path, _lock: lock, catalog, counter, outbox_in_memory: false };
        store.fold_acks()?;
        Ok(store)
    }

    /// Keeps the outbox of later diffs in a temporary table, for a plan:
    /// nothing it computes is kept, and nothing is written to the state file.
    pub fn keep_outbox_in_memory(&mut self) {
        self.outbox_in_memory = true;
    }

    /// How the outbox table is created.
    pub(crate) fn outbox_table(&self) -> &'static str {
        if self.outbox_in_memory { "TEMP TABLE" } else { "TABLE" }
    }

    /// The sync this state belongs to.
    pub fn sync(&self) -> &str {
        &self.sync
    }

    /// Starts staging the current query result (replacing any earlier stage).
    pub fn stager(&self) -> Result<Stager<'_>, DiffError> {
        self.conn.execute_batch(
            "CREATE OR REPLACE TEMP TABLE staged (key VARCHAR, fingerprint UBIGINT, payload VARCHAR, route VARCHAR, ord BIGINT)",
        )?;
        Ok(Stager {
            appender: self.conn.appender("staged")?,
            ord: 0,
            key: StringBuilder::new(),
            fingerprint: UInt64Builder::new(),
            payload: StringBuilder::new(),
            route: StringBuilder::new(),
            ords: Int64Builder::new(),
        })
    }

    /// Keys that appear more than once in the staged rows.
    pub fn duplicate_keys(&self, examples: usize) -> Result<InvalidKeys, DiffError> {
        self.conn.execute_batch(
            "CREATE OR REPLACE TEMP TABLE duplicates AS
             SELECT key, count(*) AS n, min(ord) AS first FROM staged GROUP BY key HAVING count(*) > 1",
        )?;
        let (keys, rows): (i64, Option<i64>) =
            self.conn
                .query_row("SELECT count(*), sum(n)::BIGINT FROM duplicates", [], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let mut stmt = self.conn.prepare("SELECT key FROM duplicates ORDER BY first LIMIT ?")?;
        let examples = stmt.query_map([examples as i64], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
        Ok(InvalidKeys { keys: keys as u64, rows: rows.unwrap_or(0) as u64, examples })
    }

    /// Drops every staged row whose key is duplicated (the explicit
    /// `skip` policy): which of the rows is right cannot be known.
    pub fn drop_duplicate_rows(&self) -> Result<(), DiffError> {
        self.conn.execute_batch("DELETE FROM staged WHERE key IN (SELECT key FROM duplicates)")?;
        Ok(())
    }

    /// Compares the staged rows with the snapshot and builds the outbox of
    /// records to send in `mode`. With `full`, every staged row counts as
    /// added and no key counts as removed (a full re-sync never mass-deletes).
    pub fn diff(&self, mode: Mode, full: bool) -> Result<DiffCounts, DiffError> {
        self.fold_acks()?;
        // A key that may hold an unconfirmed delivery is sent again even
        // when its row equals the confirmed one.
        let unconfirmed = if self.has_pending()? { "OR c.key IN (SELECT key FROM pending)" } else { "" };
        // Only keys and fingerprints take part in the join; payloads are
        // fetched afterwards for the records to send, by row id, so the
        // cost of a diff does not grow with the width of the rows. A key's
        // generation so far: 0 when it was never delivered, 1 for a
        // snapshot row written by an earlier version.
        let changes = if full {
            "SELECT c.key, 'added' AS change, c.ord, c.rowid AS staged_row, NULL::BIGINT AS snapshot_row,
                    CASE WHEN s.key IS NULL THEN 0 ELSE coalesce(s.gen, 1) END AS prior_gen
             FROM staged c LEFT JOIN (SELECT key, gen FROM snapshot) s USING (key)"
                .to_string()
        } else {
            format!(
                "SELECT coalesce(c.key, s.key) AS key,
                    CASE WHEN s.key IS NULL THEN 'added'
                         WHEN c.key IS NULL THEN 'removed'
                         WHEN s.fingerprint <> c.fingerprint {unconfirmed} THEN 'changed' END AS change,
                    c.ord, c.rowid AS staged_row, s.rowid AS snapshot_row,
                    CASE WHEN s.key IS NULL THEN 0 ELSE coalesce(s.gen, 1) END AS prior_gen
             FROM (SELECT rowid, key, fingerprint, ord FROM staged) c
             FULL OUTER JOIN (SELECT rowid, key, fingerprint, gen FROM snapshot) s ON s.key = c.key"
            )
        };
        let mut op_case = String::from("CASE");
        for change in Change::ALL {
            if let Some(op) = mode.op_for(change) {
                op_case.push_str(&format!(" WHEN change = '{change}' THEN '{op}'"));
            }
        }
        op_case.push_str(" END");
        self.conn.execute_batch(&format!(
            "CREATE OR REPLACE TEMP TABLE diff AS
             SELECT key, change, ord, staged_row, snapshot_row, prior_gen, {op_case} AS op FROM ({changes})
             WHERE change IS NOT NULL;
             CREATE OR REPLACE {outbox} outbox ({OUTBOX_COLUMNS});
             INSERT INTO outbox ({OUTBOX_RECORD})
             SELECT row_number() OVER (ORDER BY ord NULLS LAST, key) AS row_num,
                    key, change, op, fingerprint, payload, route, row_hash, prior_gen + 1 AS gen
             FROM (
                 SELECT d.key, d.change, d.op, d.ord, c.fingerprint, c.payload, c.route, NULL::UBIGINT AS row_hash,
                        d.prior_gen
                 FROM diff d
                 JOIN (SELECT rowid AS staged_row, fingerprint, payload, route FROM staged
                       WHERE rowid IN (SELECT staged_row FROM diff WHERE op IS NOT NULL)) c USING (staged_row)
                 WHERE d.op IS NOT NULL
                 UNION ALL
                 SELECT d.key, d.change, d.op, d.ord, s.fingerprint, s.payload, s.route, s.row_hash, d.prior_gen
                 FROM diff d
                 JOIN (SELECT rowid AS snapshot_row, fingerprint, payload, route, row_hash FROM snapshot
                       WHERE rowid IN (SELECT snapshot_row FROM diff WHERE op IS NOT NULL AND staged_row IS NULL)) s
                   USING (snapshot_row)
                 WHERE d.op IS NOT NULL AND d.staged_row IS NULL
             );",
            outbox = self.outbox_table(),
        ))?;
        let mut counts = DiffCounts {
            rows: self.count("SELECT count(*) FROM staged")?,
            to_send: self.count("SELECT count(*) FROM outbox")?,
            ..DiffCounts::default()
        };
        let mut stmt = self.conn.prepare("SELECT change, count(*), count(op) FROM diff GROUP BY change")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))?;
        for row in rows {
            let (change, n, sent) = row?;
            match Change::parse(&change) {
                Some(Change::Added) => counts.added = n as u64,
                Some(Change::Changed) => counts.changed = n as u64,
                Some(Change::Removed) => {
                    counts.removed = n as u64;
                    counts.forgotten = (n - sent) as u64;
                }
                None => {}
            }
        }
        counts.unchanged = counts.rows - counts.added - counts.changed;
        let settled = self.settle_occurrences(mode, full, Some("staged"))?;
        if mode.op_for(Change::Removed) == Some(Op::Delete) {
            counts.removed += settled;
        }
        counts.to_send += settled;
        Ok(counts)
    }

    /// Records to send whose payload was not staged: only possible when the
    /// hash of a changed row's key and fingerprint collided with a
    /// delivered pair, and then the query must be staged again with every
    /// payload.
    pub fn outbox_missing_payloads(&self) -> Result<u64, DiffError> {
        self.count("SELECT count(*) FROM outbox WHERE payload IS NULL")
    }

    /// The pair hashes ([`pair_hash`]) of every key and fingerprint in the
    /// snapshot, for staging to leave out the payloads of unchanged rows;
    /// `None` when the snapshot has more than `limit` keys (the set takes
    /// about 16 bytes per key).
    pub fn delivered_pairs(&self, limit: u64) -> Result<Option<HashSet64>, DiffError> {
        use duckdb::arrow::array::AsArray;
        use duckdb::arrow::datatypes::UInt64Type;
        let n = self.snapshot_len()?;
        if n > limit {
            return Ok(None);
        }
        let mut pairs = HashSet64::with_capacity_and_hasher(n as usize, Default::default());
        // A key with an unconfirmed delivery is staged with its payload: it
        // is sent again whatever its fingerprint.
        let unconfirmed = if self.has_pending()? { "WHERE key NOT IN (SELECT key FROM pending)" } else { "" };
        let mut stmt = self.conn.prepare(&format!("SELECT key, fingerprint FROM snapshot {unconfirmed}"))?;
        for batch in stmt.query_arrow([])? {
            let key = batch.column(0).as_string::<i32>();
            let fingerprint = batch.column(1).as_primitive::<UInt64Type>();
            for i in 0..batch.num_rows() {
                pairs.insert(pair_hash(key_hash(key.value(i)), fingerprint.value(i)));
            }
        }
        Ok(Some(pairs))
    }

    /// The error for a state file that holds what Backflow never writes.
    pub(crate) fn damaged(&self, detail: String) -> DiffError {
        DiffError::Damaged { sync: self.sync.clone(), path: self.path.display().to_string(), detail }
    }

    pub(crate) fn count(&self, sql: &str) -> Result<u64, DiffError> {
        Ok(self.conn.query_row(sql, [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// Records to send with `row_num > after`, in order, at most `limit`
    /// (row numbers are dense, so a page is a range of them). Read as Arrow
    /// columns: a page costs a scan, not a value conversion per cell. The
    /// page is put in order here: an `ORDER BY` made DuckDB sort payloads.
    pub fn outbox_page(&self, after: u64, limit: usize) -> Result<Vec<OutboxRow>, DiffError> {
        use duckdb::arrow::array::{Array, AsArray};
        use duckdb::arrow::datatypes::{Int64Type, UInt64Type};
        let mut stmt = self.conn.prepare(
            "SELECT row_num, key, change, op, fingerprint, payload, route, coalesce(gen, 1) FROM outbox
             WHERE row_num > ? AND row_num <= ?",
        )?;
        let mut out = Vec::with_capacity(limit);
        // Streamed: DuckDB's chunks become Arrow batches as they are read,
        // without first copying the whole page into a materialized result.
        for batch in stmt.stream_arrow(params![after as i64, after as i64 + limit as i64])? {
            let batch = batch?;
            let row_num = batch.column(0).as_primitive::<Int64Type>();
            let key = batch.column(1).as_string::<i32>();
            let change = batch.column(2).as_string::<i32>();
            let op = batch.column(3).as_string::<i32>();
            let fingerprint = batch.column(4).as_primitive::<UInt64Type>();
            let payload = batch.column(5).as_string::<i32>();
            let route = batch.column(6).as_string::<i32>();
            let generation = batch.column(7).as_primitive::<Int64Type>();
            for i in 0..batch.num_rows() {
                out.push(OutboxRow {
                    row_num: row_num.value(i) as u64,
                    key: key.value(i).to_string(),
                    change: Change::parse(change.value(i))
                        .ok_or_else(|| self.damaged(format!("the outbox holds the change `{}`", change.value(i))))?,
                    op: Op::parse(op.value(i))
                        .ok_or_else(|| self.damaged(format!("the outbox holds the op `{}`", op.value(i))))?,
                    fingerprint: fingerprint.value(i),
                    payload: payload.value(i).to_string(),
                    route: (!route.is_null(i)).then(|| route.value(i).to_string()),
                    generation: generation.value(i) as u64,
                });
            }
        }
        out.sort_unstable_by_key(|row| row.row_num);
        Ok(out)
    }

    /// Records to send per op.
    pub fn outbox_ops(&self) -> Result<Vec<(Op, u64)>, DiffError> {
        let mut stmt = self.conn.prepare("SELECT op, count(*) FROM outbox GROUP BY op")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (op, n) = row?;
            let parsed = Op::parse(&op).ok_or_else(|| self.damaged(format!("the outbox holds the op `{op}`")))?;
            out.push((parsed, n as u64));
        }
        Ok(out)
    }

    /// Writes everything committed so far into the state file (DuckDB
    /// would otherwise do it at a later commit, such as the fold's).
    pub fn checkpoint(&self) -> Result<(), DiffError> {
        Ok(self.conn.execute_batch("CHECKPOINT")?)
    }

    /// Records rejected records of a run.
    pub fn reject(&self, run_id: &str, rejections: &[Rejection]) -> Result<(), DiffError> {
        self.transaction(|conn| {
            let mut stmt = conn.prepare("INSERT INTO rejections VALUES (?, ?, ?, ?, ?, ?, ?, ?)")?;
            for r in rejections {
                stmt.execute(params![
                    run_id,
                    r.key,
                    r.op.as_str(),
                    r.message_id,
                    r.status.map(i32::from),
                    r.reason,
                    r.body,
                    r.at
                ])?;
            }
            Ok(())
        })
    }

    pub(crate) fn transaction(
        &self,
        f: impl FnOnce(&Connection) -> Result<(), duckdb::Error>,
    ) -> Result<(), DiffError> {
        self.conn.execute_batch("BEGIN TRANSACTION")?;
        match f(&self.conn) {
            Ok(()) => Ok(self.conn.execute_batch("COMMIT")?),
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e.into())
            }
        }
    }

    /// Records (or updates) a run.
    pub fn save_run(&self, run: &RunRecord) -> Result<(), DiffError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            params![
                run.run_id,
                run.sync,
                run.mode.as_str(),
                run.full,
                run.started_at,
                run.ended_at,
                run.status,
                run.counts.to_string(),
                run.message
            ],
        )?;
        Ok(())
    }

    /// Marks runs still recorded as `running` as `interrupted`: whoever
    /// holds the state now holds the run lock, so those processes are gone.
    pub fn mark_interrupted(&self) -> Result<u64, DiffError> {
        let n = self.conn.execute(
            "UPDATE runs SET status = 'interrupted', ended_at = coalesce(ended_at, ?) WHERE status = 'running'",
            [now()],
        )?;
        Ok(n as u64)
    }

    /// The latest runs, newest first.
    pub fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, DiffError> {
        let mut stmt = self.conn.prepare(
            "SELECT run_id, sync, mode, full_resync, started_at, ended_at, status, counts, message
             FROM runs ORDER BY started_at DESC, run_id DESC LIMIT ?",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            let raw: (String, String) = (r.get(2)?, r.get(7)?);
            let run = RunRecord {
                run_id: r.get(0)?,
                sync: r.get(1)?,
                mode: Mode::Upsert,
                full: r.get(3)?,
                started_at: r.get(4)?,
                ended_at: r.get(5)?,
                status: r.get(6)?,
                counts: serde_json::Value::Null,
                message: r.get(8)?,
            };
            Ok((run, raw))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut run, (mode, counts)) = row?;
            run.mode =
                Mode::parse(&mode).ok_or_else(|| self.damaged(format!("run {} has the mode `{mode}`", run.run_id)))?;
            run.counts = serde_json::from_str(&counts)
                .map_err(|e| self.damaged(format!("the counts of run {} are not JSON ({e})", run.run_id)))?;
            out.push(run);
        }
        Ok(out)
    }

    /// The rejections recorded for a run.
    pub fn rejections(&self, run_id: &str) -> Result<Vec<Rejection>, DiffError> {
        self.query_rejections("WHERE run_id = ? ORDER BY failed_at", run_id)
    }

    fn query_rejections(&self, filter: &str, arg: &str) -> Result<Vec<Rejection>, DiffError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT key, op, message_id, status, reason, body, failed_at FROM rejections {filter}"
        ))?;
        let rows = stmt.query_map([arg], |r| {
            let rejection = Rejection {
                key: r.get(0)?,
                op: Op::Upsert,
                message_id: r.get(2)?,
                status: r.get::<_, Option<i32>>(3)?.map(|s| s as u16),
                reason: r.get(4)?,
                body: r.get(5)?,
                at: r.get(6)?,
            };
            Ok((rejection, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mut rejection, op) = row?;
            rejection.op = Op::parse(&op)
                .ok_or_else(|| self.damaged(format!("a rejection of key {} has the op `{op}`", rejection.key)))?;
            out.push(rejection);
        }
        Ok(out)
    }

    /// What the state knows about `key` (canonical key text).
    pub fn lookup(&self, key: &str) -> Result<KeyRecord, DiffError> {
        self.fold_acks()?;
        let delivered = self
            .conn
            .query_row(
                "SELECT s.payload, s.fingerprint, s.op, s.message_id, coalesce(s.run_id, r.run_id, ''),
                        coalesce(s.delivered_at, r.delivered_at, ''),
                        coalesce(s.gen, 1)
                 FROM snapshot s LEFT JOIN delivered_ranges r ON s.row_num BETWEEN r.first_row AND r.last_row
                 WHERE s.key = ?",
                [key],
                |r| {
                    let fingerprint = r.get::<_, u64>(1)?;
                    let op: String = r.get(2)?;
                    // Stored by earlier versions; derived otherwise.
                    let message_id = match (r.get::<_, Option<String>>(3)?, Op::parse(&op)) {
                        (Some(id), _) => id,
                        (None, Some(parsed)) => {
                            backflow_core::message_id(&self.sync, key, parsed, fingerprint, r.get::<_, i64>(6)? as u64)
                        }
                        (None, None) => String::new(),
                    };
                    Ok(Delivered {
                        payload: serde_json::from_str(&r.get::<_, String>(0)?).map_err(|e| {
                            duckdb::Error::FromSqlConversionFailure(0, duckdb::types::Type::Text, Box::new(e))
                        })?,
                        fingerprint: format!("{fingerprint:016x}"),
                        op,
                        message_id,
                        run_id: r.get(4)?,
                        delivered_at: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(|e| match e {
                duckdb::Error::FromSqlConversionFailure(..) => {
                    self.damaged(format!("the payload delivered for key {key} is not JSON ({e})"))
                }
                other => other.into(),
            })?;
        let last_rejection = self.query_rejections("WHERE key = ? ORDER BY failed_at DESC LIMIT 1", key)?.pop();
        let unconfirmed = self
            .conn
            .query_row("SELECT op, payload, fingerprint, gen, run_id FROM pending WHERE key = ?", [key], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get(4)?,
                ))
            })
            .optional()?
            .map(|(op, payload, fingerprint, generation, run_id)| {
                let message_id = Op::parse(&op)
                    .map(|parsed| backflow_core::message_id(&self.sync, key, parsed, fingerprint, generation as u64))
                    .ok_or_else(|| self.damaged(format!("an unconfirmed delivery of key {key} has the op `{op}`")))?;
                let payload = serde_json::from_str(&payload)
                    .map_err(|e| self.damaged(format!("the unconfirmed payload of key {key} is not JSON ({e})")))?;
                Ok::<_, DiffError>(Unconfirmed { op, payload, message_id, run_id })
            })
            .transpose()?;
        Ok(KeyRecord { key: key.to_string(), delivered, last_rejection, unconfirmed })
    }

    /// Every delivered key with its payload (JSON text), in key order.
    pub fn snapshot_rows(&self) -> Result<Vec<(String, String)>, DiffError> {
        self.fold_acks()?;
        let mut stmt = self.conn.prepare("SELECT key, payload FROM snapshot ORDER BY key")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Checks that the state is consistent: every key at most once in the
    /// snapshot, the unconfirmed deliveries and the retired keys, and never
    /// both delivered and retired; no delivered row without its payload,
    /// fingerprint or op; acknowledged ranges that do not overlap and name
    /// rows of an outbox; runs with known statuses. Reads only.
    pub fn verify(&self) -> Result<(), DiffError> {
        let checks = [
            ("the snapshot holds a key twice", "SELECT count(*) - count(DISTINCT key) FROM snapshot"),
            (
                "a snapshot row lacks its key, payload, fingerprint or op",
                "SELECT count(*) FROM snapshot WHERE key IS NULL OR payload IS NULL OR fingerprint IS NULL OR op IS NULL",
            ),
            ("an unconfirmed delivery is recorded twice", "SELECT count(*) - count(DISTINCT key) FROM pending"),
            ("a retired key is recorded twice", "SELECT count(*) - count(DISTINCT key) FROM retired"),
            (
                "a key is both delivered and retired",
                "SELECT count(*) FROM retired WHERE key IN (SELECT key FROM snapshot)",
            ),
            (
                "acknowledged ranges overlap or run backwards",
                "SELECT count(*) FROM (SELECT first_row, last_row, lag(last_row) OVER (ORDER BY first_row) AS previous
                 FROM acked) WHERE last_row < first_row OR previous >= first_row",
            ),
            (
                "a run has an unknown status",
                "SELECT count(*) FROM runs
                 WHERE status NOT IN ('running', 'succeeded', 'partial', 'failed', 'interrupted')",
            ),
        ];
        for (what, sql) in checks {
            let found = self.count(sql)?;
            if found > 0 {
                return Err(self.damaged(format!("{what} ({found} found)")));
            }
        }
        let outbox = self.has_outbox()?;
        let acked = self.count("SELECT count(*) FROM acked")?;
        if acked > 0
            && (!outbox
                || self.count("SELECT count(*) FROM acked WHERE last_row > (SELECT max(row_num) FROM outbox)")? > 0)
        {
            return Err(self.damaged("acknowledgements name rows no outbox holds".into()));
        }
        Ok(())
    }

    /// Number of keys in the snapshot.
    pub fn snapshot_len(&self) -> Result<u64, DiffError> {
        self.fold_acks()?;
        self.count("SELECT count(*) FROM snapshot")
    }

    /// Forgets every delivered key: the next run sends every row as added.
    pub fn reset(&self) -> Result<u64, DiffError> {
        let n = self.snapshot_len()?;
        // Generations are kept: what is sent again is a new occurrence.
        self.transaction(|conn| {
            conn.execute_batch(
                "CREATE OR REPLACE TEMP TABLE forgotten AS
                 SELECT key, max(gen) AS gen FROM (
                     SELECT key, coalesce(gen, 1) AS gen FROM snapshot UNION ALL SELECT key, gen FROM pending
                 ) GROUP BY key;
                 DELETE FROM retired WHERE key IN (SELECT key FROM forgotten);
                 INSERT INTO retired SELECT key, gen FROM forgotten;
                 DROP TABLE forgotten;
                 DELETE FROM snapshot; DELETE FROM pending; DELETE FROM acked; DELETE FROM delivered_ranges;
                 DELETE FROM settings;",
            )
        })?;
        Ok(n)
    }

    /// A stored setting (e.g. the mapping last delivered with).
    pub fn setting(&self, name: &str) -> Result<Option<String>, DiffError> {
        Ok(self.conn.query_row("SELECT value FROM settings WHERE name = ?", [name], |r| r.get(0)).optional()?)
    }

    /// Stores a setting.
    pub fn set_setting(&self, name: &str, value: &str) -> Result<(), DiffError> {
        self.conn.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", [name, value])?;
        Ok(())
    }
}
