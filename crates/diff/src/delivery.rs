//! The durable record of deliveries: acknowledgements, unconfirmed
//! deliveries (records sent whose answer was never recorded), the
//! generation of every key, and their fold into the snapshot. The contract
//! is in the crate's docs ("Durability contract").

use crate::DiffError;
use crate::store::{StateStore, now};
use crate::warehouse::literal;
use backflow_core::{Change, Mode, Op};
use duckdb::{Connection, params};

/// The setting that names the run whose delivery of the outbox began
/// ([`StateStore::begin_delivery`]).
const DELIVERY: &str = "delivering";

/// Which occurrence tables hold rows, so that a fold touches only those.
#[derive(Debug, Clone, Copy)]
struct Occurrences {
    pending: bool,
    retired: bool,
}

impl Occurrences {
    /// Settles the occurrence tables for delivered records — `delivered`
    /// selects their `key, change, gen`: their unconfirmed deliveries are
    /// confirmed (dropped), a key delivered again leaves the retired keys,
    /// and a delivered removal retires the key with its generation.
    fn settle(self, conn: &Connection, delivered: &str) -> Result<(), duckdb::Error> {
        if self.pending {
            conn.execute_batch(&format!("DELETE FROM pending WHERE key IN (SELECT key FROM ({delivered}))"))?;
        }
        if self.retired {
            conn.execute_batch(&format!("DELETE FROM retired WHERE key IN (SELECT key FROM ({delivered}))"))?;
        }
        conn.execute_batch(&format!(
            "INSERT INTO retired SELECT key, max(coalesce(gen, 1)) FROM ({delivered}) WHERE change = 'removed' GROUP BY key"
        ))
    }
}

impl StateStore {
    /// Whether any delivery is unconfirmed: records sent (or about to be)
    /// whose acknowledgement was never recorded — a crash, a timeout, a
    /// failed or rejected attempt. They are taken as *possibly delivered*.
    pub fn has_pending(&self) -> Result<bool, DiffError> {
        Ok(self.count("SELECT count(*) FROM (SELECT 1 FROM pending LIMIT 1)")? > 0)
    }

    /// The keys with an unconfirmed delivery.
    pub fn pending_keys(&self) -> Result<std::collections::HashSet<String>, DiffError> {
        let mut stmt = self.conn.prepare("SELECT key FROM pending")?;
        let keys = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<_, _>>()?;
        Ok(keys)
    }

    /// Completes a new outbox (either diff's) with what earlier deliveries
    /// left:
    /// - the generation of every record: the key's last one plus one, or,
    ///   for a record equal to its unconfirmed delivery, that delivery's —
    ///   so it is sent again under the same message id;
    /// - in mirror mode, a delete for each key whose unconfirmed delivery
    ///   may have reached the receiver and which the query no longer
    ///   returns, carrying that payload (not in a `full` run, which never
    ///   deletes: they stay unconfirmed for the next run). When the
    ///   unconfirmed delivery went to another URL than the confirmed one
    ///   (the columns the URL is built from changed), the key is deleted at
    ///   both: the receiver may hold either;
    /// - in the other modes, each unconfirmed record whose key the query
    ///   no longer returns, sent again as it was (a change that happened
    ///   reaches the receiver at least once). `staged` names the table of
    ///   the query's keys (the staged diff's); the diff inside DuckDB does
    ///   not know them, and stages instead when such records exist.
    ///
    /// Returns the number of records added.
    pub(crate) fn settle_occurrences(&self, mode: Mode, full: bool, staged: Option<&str>) -> Result<u64, DiffError> {
        if self.has_retired()? {
            self.conn.execute_batch(
                "UPDATE outbox SET gen = r.gen + 1 FROM retired r WHERE outbox.key = r.key AND outbox.change = 'added'",
            )?;
        }
        if !self.has_pending()? {
            return Ok(0);
        }
        // The records to add are found first and appended after: a
        // statement does not read the table it appends to.
        let additions = if mode.op_for(Change::Removed) == Some(Op::Delete) {
            // The payload that may have been delivered last: an unconfirmed
            // upsert's, or an unconfirmed delete's (sent again as it was).
            self.conn.execute_batch(
                "UPDATE outbox SET payload = p.payload, fingerprint = p.fingerprint, route = p.route
                 FROM pending p
                 WHERE outbox.key = p.key AND outbox.change = 'removed' AND outbox.route IS NOT DISTINCT FROM p.route",
            )?;
            // Sent to another URL: a second delete, there; a key only an
            // unconfirmed delivery knows: its delete (not in a full run).
            let only_pending = if full {
                String::new()
            } else {
                "UNION ALL SELECT p.* FROM pending p
                 WHERE p.key NOT IN (SELECT key FROM snapshot) AND p.key NOT IN (SELECT key FROM outbox)"
                    .to_string()
            };
            format!(
                "SELECT key, 'removed' AS change, 'delete' AS op, fingerprint, payload, route, gen FROM (
                     SELECT p.* FROM pending p JOIN outbox o ON o.key = p.key AND o.change = 'removed'
                     WHERE o.route IS DISTINCT FROM p.route AND o.payload IS NOT NULL
                     {only_pending})"
            )
        } else if let Some(staged) = staged {
            format!(
                "SELECT key, CASE WHEN key IN (SELECT key FROM snapshot) THEN 'changed' ELSE 'added' END AS change,
                        op, fingerprint, payload, route, gen
                 FROM pending
                 WHERE key NOT IN (SELECT key FROM outbox) AND key NOT IN (SELECT key FROM {staged})"
            )
        } else {
            "SELECT key, NULL AS change, op, fingerprint, payload, route, gen FROM pending WHERE false".to_string()
        };
        self.conn.execute_batch(&format!("CREATE OR REPLACE TEMP TABLE additions AS {additions}"))?;
        let last = self.count("SELECT coalesce(max(row_num), 0) FROM outbox")?;
        let added = self.conn.execute(
            &format!(
                "INSERT INTO outbox (row_num, key, change, op, fingerprint, payload, route, row_hash, gen)
                 SELECT {last} + row_number() OVER (ORDER BY key, route), key, change, op, fingerprint, payload,
                        route, NULL, gen
                 FROM additions"
            ),
            [],
        )? as u64;
        self.conn.execute_batch("DROP TABLE additions")?;
        // A delete after an unconfirmed delete of the key is the same
        // occurrence (sent again, perhaps to its other URL).
        self.conn.execute_batch(
            "UPDATE outbox SET gen = CASE WHEN p.op = outbox.op
                                               AND (p.fingerprint = outbox.fingerprint OR outbox.op = 'delete')
                                          THEN p.gen
                                          ELSE greatest(outbox.gen, p.gen + 1) END
             FROM pending p WHERE outbox.key = p.key",
        )?;
        Ok(added)
    }

    /// Drops removed keys that the mode forgets (every mode but mirror) from
    /// the snapshot, so a key that comes back counts as added again — with
    /// the next generation, so as a new occurrence. Keys whose only
    /// delivery is unconfirmed and which the query no longer returns are
    /// forgotten too (in mirror mode they are deleted instead).
    pub fn forget_removed(&self) -> Result<u64, DiffError> {
        let pending = self.has_pending()?;
        let mut forgotten = 0;
        self.transaction(|conn| {
            conn.execute_batch(
                "CREATE OR REPLACE TEMP TABLE forgotten AS
                 SELECT s.key, greatest(coalesce(s.gen, 1), coalesce(p.gen, 0)) AS gen
                 FROM snapshot s LEFT JOIN pending p USING (key)
                 WHERE s.key IN (SELECT key FROM diff WHERE change = 'removed' AND op IS NULL)",
            )?;
            if pending {
                conn.execute_batch(
                    "INSERT INTO forgotten SELECT key, gen FROM pending
                     WHERE key NOT IN (SELECT key FROM snapshot) AND key NOT IN (SELECT key FROM outbox)",
                )?;
            }
            forgotten = conn
                .execute("DELETE FROM snapshot WHERE key IN (SELECT key FROM forgotten WHERE key IS NOT NULL)", [])?;
            conn.execute_batch(
                "DELETE FROM pending WHERE key IN (SELECT key FROM forgotten);
                 DELETE FROM retired WHERE key IN (SELECT key FROM forgotten);
                 INSERT INTO retired SELECT key, gen FROM forgotten;
                 DROP TABLE forgotten;",
            )
        })?;
        Ok(forgotten as u64)
    }

    /// Marks the start of the outbox's delivery by `run_id`, durably: from
    /// here on, every record of the outbox that is not acknowledged counts
    /// as possibly delivered (sent, its answer never recorded), and the
    /// next fold keeps it as an unconfirmed delivery — re-sent under the
    /// same message id, or, in mirror mode, deleted if its key leaves the
    /// query. Call before the first request is sent.
    pub fn begin_delivery(&self, run_id: &str) -> Result<(), DiffError> {
        self.set_setting(DELIVERY, run_id)?;
        self.checkpoint()
    }

    /// Records acknowledged records durably: their outbox row numbers are
    /// appended to the ack log as ranges, committed before this returns.
    /// The outbox is a table of the state file, so the log and the outbox
    /// together say what was delivered even if the process dies before the
    /// fold ([`StateStore::fold_acks`]).
    pub fn ack(&self, run_id: &str, row_nums: &[u64]) -> Result<(), DiffError> {
        if row_nums.is_empty() {
            return Ok(());
        }
        fail::fail_point!("diff::ack", |_| Err(DiffError::Store(duckdb::Error::InvalidParameterName(
            "injected failure (diff::ack)".into()
        ))));
        let mut sorted = row_nums.to_vec();
        sorted.sort_unstable();
        let at = now();
        let mut appender = self.conn.appender("acked")?;
        let mut first = sorted[0];
        for pair in sorted.windows(2) {
            if pair[1] != pair[0] + 1 {
                appender.append_row(params![first as i64, pair[0] as i64, run_id, at])?;
                first = pair[1];
            }
        }
        appender.append_row(params![first as i64, sorted[sorted.len() - 1] as i64, run_id, at])?;
        appender.flush()?;
        Ok(())
    }

    /// Folds the ack log into the snapshot in one transaction: a delivered
    /// removal drops the key (its generation is kept, so a key that comes
    /// back is a new occurrence); anything else stores the delivered
    /// payload, fingerprint and generation (its message id is derived from
    /// those when asked for). Once the outbox's delivery began
    /// ([`StateStore::begin_delivery`]), its records not acknowledged become
    /// unconfirmed deliveries in the same transaction, and the outbox is
    /// dropped: what a crashed run may have delivered is known to the next.
    /// The log refers to the current outbox, which is only replaced after a
    /// fold, and holds each row at most once. Returns the number of records
    /// folded.
    pub fn fold_acks(&self) -> Result<u64, DiffError> {
        if self.outbox_in_memory {
            // A plan's outbox is never delivered.
            return Ok(0);
        }
        let delivering = self.setting(DELIVERY)?;
        let outbox_exists = self.has_outbox()?;
        let acked = self.count("SELECT coalesce(sum(last_row - first_row + 1), 0)::BIGINT FROM acked")?;
        if !outbox_exists || (acked == 0 && delivering.is_none()) {
            if delivering.is_some() {
                self.conn.execute("DELETE FROM settings WHERE name = ?", [DELIVERY])?;
            }
            return Ok(0);
        }
        let snapshot_rows = self.count("SELECT count(*) FROM snapshot")?;
        let first = snapshot_rows == 0;
        // Every outbox row acked (the ranges are disjoint), by one run, and
        // fewer snapshot rows to keep than delivered rows to copy.
        let (outbox_rows, replacing): (i64, i64) =
            self.conn.query_row("SELECT count(*), count(*) FILTER (WHERE change <> 'added') FROM outbox", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        let kept = snapshot_rows.saturating_sub(replacing as u64);
        let occurrences = Occurrences { pending: self.has_pending()?, retired: self.has_retired()? };
        if outbox_rows as u64 == acked && kept <= acked && self.count("SELECT count(DISTINCT run_id) FROM acked")? == 1
        {
            self.outbox_becomes_snapshot(occurrences)?;
            return Ok(acked);
        }
        // A range join (DuckDB merges the outbox with the few sorted ranges;
        // an ASOF join cost twice as much).
        let acked_rows = "FROM outbox o JOIN acked a ON o.row_num BETWEEN a.first_row AND a.last_row";
        let unconfirmed = match &delivering {
            Some(run_id) if (outbox_rows as u64) > acked => Some(run_id.clone()),
            _ => None,
        };
        self.transaction(|conn| {
            if acked > 0 {
                if !first {
                    conn.execute_batch(&format!("DELETE FROM snapshot WHERE key IN (SELECT o.key {acked_rows})"))?;
                }
                conn.execute_batch(&format!(
                    "INSERT INTO snapshot (key, fingerprint, payload, route, op, message_id, run_id, delivered_at, row_hash, row_num, gen)
                     SELECT o.key, o.fingerprint, o.payload, o.route, o.op, NULL, a.run_id, a.delivered_at, o.row_hash, NULL, o.gen
                     {acked_rows} WHERE o.change <> 'removed';"
                ))?;
                occurrences.settle(conn, &format!("SELECT o.key, o.change, o.gen {acked_rows}"))?;
            }
            if let Some(run_id) = &unconfirmed {
                // The rows between the acknowledged ranges (row numbers are
                // 1..n), joined by range like the acknowledged ones.
                conn.execute_batch(&format!(
                    "CREATE OR REPLACE TEMP TABLE gaps AS
                     SELECT last_row + 1 AS first_row, next_first - 1 AS last_row FROM (
                         SELECT last_row, lead(first_row) OVER (ORDER BY first_row) AS next_first FROM (
                             SELECT first_row, last_row FROM acked
                             UNION ALL SELECT 0, 0
                             UNION ALL SELECT max(row_num) + 1, max(row_num) + 1 FROM outbox))
                     WHERE next_first - 1 >= last_row + 1;
                     CREATE OR REPLACE TEMP TABLE unconfirmed AS
                     SELECT o.key, o.op, o.fingerprint, o.payload, o.route, coalesce(o.gen, 1) AS gen
                     FROM outbox o JOIN gaps g ON o.row_num BETWEEN g.first_row AND g.last_row
                     -- A key deleted at two URLs keeps the second delete (the
                     -- first goes again from the snapshot, same generation).
                     QUALIFY row_number() OVER (PARTITION BY o.key ORDER BY o.row_num DESC) = 1;
                     DELETE FROM pending WHERE key IN (SELECT key FROM unconfirmed);
                     INSERT INTO pending SELECT key, op, fingerprint, payload, route, gen, {run} FROM unconfirmed;
                     DROP TABLE unconfirmed;
                     DROP TABLE gaps;",
                    run = literal(run_id)
                ))?;
            }
            conn.execute_batch("DELETE FROM acked; DROP TABLE outbox;")?;
            conn.execute("DELETE FROM settings WHERE name = ?", [DELIVERY])?;
            Ok(())
        })?;
        Ok(acked)
    }

    pub(crate) fn has_retired(&self) -> Result<bool, DiffError> {
        Ok(self.count("SELECT count(*) FROM (SELECT 1 FROM retired LIMIT 1)")? > 0)
    }

    /// Whether the state file holds an outbox (a plan's is temporary).
    pub(crate) fn has_outbox(&self) -> Result<bool, DiffError> {
        Ok(self.count(&format!(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'outbox' AND NOT temporary AND database_name = {}",
            literal(&self.catalog)
        ))? > 0)
    }

    /// The fold of a delivery acknowledged whole (every record, by one
    /// run) that replaces most of the snapshot, such as a first delivery:
    /// the outbox becomes the snapshot, with the snapshot rows it does not
    /// replace or remove copied into it, instead of every delivered payload
    /// being copied into the snapshot — payloads are written once per run
    /// instead of twice, which was most of a fold's cost. The outbox was
    /// made with the snapshot's columns, so no column is added (adding them
    /// here, and checking the columns never missing in an outbox, cost most
    /// of what was left). The delivered rows keep their row numbers, and
    /// this run's acknowledged ranges are kept to tell when and by which run
    /// each was delivered (setting them on every row cost as much as the
    /// copy); the kept rows take theirs along and drop their row numbers,
    /// whose ranges go.
    fn outbox_becomes_snapshot(&self, occurrences: Occurrences) -> Result<(), DiffError> {
        self.transaction(|conn| {
            occurrences.settle(conn, "SELECT key, change, gen FROM outbox")?;
            conn.execute("DELETE FROM settings WHERE name = ?", [DELIVERY])?;
            conn.execute_batch(
                "INSERT INTO outbox (key, change, op, fingerprint, payload, route, row_hash, row_num, message_id, run_id, delivered_at, gen)
                 SELECT s.key, 'kept', s.op, s.fingerprint, s.payload, s.route, s.row_hash, NULL, s.message_id,
                        coalesce(s.run_id, r.run_id), coalesce(s.delivered_at, r.delivered_at), s.gen
                 FROM snapshot s
                 LEFT JOIN delivered_ranges r ON s.row_num BETWEEN r.first_row AND r.last_row
                 WHERE NOT EXISTS (SELECT 1 FROM outbox o WHERE o.key = s.key);
                 DELETE FROM outbox WHERE change = 'removed';
                 ALTER TABLE outbox DROP COLUMN change;
                 DROP TABLE snapshot;
                 ALTER TABLE outbox RENAME TO snapshot;
                 DELETE FROM delivered_ranges;
                 INSERT INTO delivered_ranges SELECT first_row, last_row, delivered_at, run_id FROM acked;
                 DELETE FROM acked;",
            )
        })?;
        // An outbox declares its key and op never missing (setting that
        // again costs no scan; an earlier version's outbox did not); its
        // fingerprint and payload may be missing until it is complete, so
        // they are checked here. DuckDB checks new constraints only on a
        // table without changes pending in the transaction.
        self.transaction(|conn| {
            for column in ["key", "op", "fingerprint", "payload"] {
                conn.execute_batch(&format!("ALTER TABLE snapshot ALTER COLUMN {column} SET NOT NULL"))?;
            }
            Ok(())
        })
    }
}
