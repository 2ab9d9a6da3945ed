//! Every mode × {added, changed, unchanged, removed}: what is sent, and what
//! the snapshot holds afterwards.

use backflow_core::{Change, Mode, Op};
use backflow_diff::{DiffCounts, StateStore};
use std::collections::BTreeMap;

struct State {
    _dir: tempfile::TempDir,
    store: StateStore,
}

fn state() -> State {
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path(), "s", "256MB").unwrap();
    State { _dir: dir, store }
}

fn key(id: u32) -> String {
    format!(r#"{{"id":{id}}}"#)
}

/// Stages rows (id, value) as the current query result.
fn stage(store: &StateStore, rows: &[(u32, &str)]) {
    let mut stager = store.stager().unwrap();
    for (id, v) in rows {
        let payload = format!(r#"{{"v":"{v}"}}"#);
        stager.push(&key(*id), backflow_core::fingerprint_text(&payload), Some(&payload), None).unwrap();
    }
    stager.finish().unwrap();
}

/// What a run sent: (id, change, op, value).
type Sent = Vec<(u32, Change, Op, String)>;

/// Diffs, "delivers" the whole outbox with success, and returns what was sent.
fn run(store: &StateStore, mode: Mode, full: bool) -> (DiffCounts, Sent) {
    let counts = store.diff(mode, full).unwrap();
    if mode.forgets_removed() {
        store.forget_removed().unwrap();
    }
    let rows = store.outbox_page(0, 1000).unwrap();
    let acks: Vec<u64> = rows.iter().map(|r| r.row_num).collect();
    store.ack("run", &acks).unwrap();
    let sent = rows
        .into_iter()
        .map(|r| {
            let id = r.key.trim_start_matches(r#"{"id":"#).trim_end_matches('}').parse().unwrap();
            let v: serde_json::Value = serde_json::from_str(&r.payload).unwrap();
            (id, r.change, r.op, v["v"].as_str().unwrap().to_string())
        })
        .collect();
    (counts, sent)
}

fn snapshot(store: &StateStore, ids: &[u32]) -> BTreeMap<u32, String> {
    ids.iter()
        .filter_map(|id| {
            let rec = store.lookup(&key(*id)).unwrap();
            rec.delivered.map(|d| (*id, d.payload["v"].as_str().unwrap().to_string()))
        })
        .collect()
}

fn snap(pairs: &[(u32, &str)]) -> BTreeMap<u32, String> {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// First run delivers a=1, b=2, c=3; then a is unchanged, b changed, c
/// removed, d added.
fn second_run(mode: Mode) -> (State, DiffCounts, Sent) {
    let s = state();
    stage(&s.store, &[(1, "a"), (2, "b"), (3, "c")]);
    let (counts, first) = run(&s.store, mode, false);
    assert_eq!((counts.added, counts.changed, counts.removed), (3, 0, 0), "{mode}: first run sees every row as added");
    let first_op = mode.op_for(Change::Added).unwrap();
    assert_eq!(first.iter().map(|r| (r.0, r.2)).collect::<Vec<_>>(), [(1, first_op), (2, first_op), (3, first_op)]);
    stage(&s.store, &[(1, "a"), (2, "B"), (4, "d")]);
    let (counts, sent) = run(&s.store, mode, false);
    assert_eq!(
        (counts.rows, counts.added, counts.changed, counts.removed, counts.unchanged),
        (3, 1, 1, 1, 1),
        "{mode}"
    );
    (s, counts, sent)
}

#[test]
fn upsert_sends_added_and_changed_and_forgets_removed() {
    let (s, counts, sent) = second_run(Mode::Upsert);
    assert_eq!(sent, [(2, Change::Changed, Op::Upsert, "B".into()), (4, Change::Added, Op::Upsert, "d".into())]);
    assert_eq!(counts.forgotten, 1);
    assert_eq!(snapshot(&s.store, &[1, 2, 3, 4]), snap(&[(1, "a"), (2, "B"), (4, "d")]));
}

#[test]
fn create_sends_only_added_and_keeps_the_delivered_payload_of_changed_rows() {
    let (s, _, sent) = second_run(Mode::Create);
    assert_eq!(sent, [(4, Change::Added, Op::Create, "d".into())]);
    assert_eq!(snapshot(&s.store, &[1, 2, 3, 4]), snap(&[(1, "a"), (2, "b"), (4, "d")]));
}

#[test]
fn append_sends_every_change_as_a_new_event() {
    let (s, _, sent) = second_run(Mode::Append);
    assert_eq!(sent, [(2, Change::Changed, Op::Append, "B".into()), (4, Change::Added, Op::Append, "d".into())]);
    assert_eq!(snapshot(&s.store, &[1, 2, 3, 4]), snap(&[(1, "a"), (2, "B"), (4, "d")]));
}

#[test]
fn mirror_deletes_removed_keys_with_their_last_delivered_payload() {
    let (s, counts, sent) = second_run(Mode::Mirror);
    assert_eq!(
        sent,
        [
            (2, Change::Changed, Op::Upsert, "B".into()),
            (4, Change::Added, Op::Upsert, "d".into()),
            (3, Change::Removed, Op::Delete, "c".into()),
        ]
    );
    assert_eq!(counts.forgotten, 0);
    assert_eq!(snapshot(&s.store, &[1, 2, 3, 4]), snap(&[(1, "a"), (2, "B"), (4, "d")]));
}

#[test]
fn delete_mode_deletes_each_listed_key_once() {
    let (s, _, sent) = second_run(Mode::Delete);
    assert_eq!(sent, [(4, Change::Added, Op::Delete, "d".into())]);
    assert_eq!(snapshot(&s.store, &[1, 2, 3, 4]), snap(&[(1, "a"), (2, "b"), (4, "d")]));
    // Listed again unchanged: nothing; removed then listed again: deleted again.
    stage(&s.store, &[(1, "a"), (4, "d")]);
    assert!(run(&s.store, Mode::Delete, false).1.is_empty());
    stage(&s.store, &[(1, "a"), (2, "b"), (4, "d")]);
    assert_eq!(run(&s.store, Mode::Delete, false).1, [(2, Change::Added, Op::Delete, "b".into())]);
}

#[test]
fn unacknowledged_records_are_sent_again_with_the_same_fingerprint() {
    let s = state();
    stage(&s.store, &[(1, "a"), (2, "b")]);
    s.store.diff(Mode::Upsert, false).unwrap();
    let first = s.store.outbox_page(0, 10).unwrap();
    // Only key 1 is acknowledged.
    let r = &first[0];
    s.store.ack("run", &[r.row_num]).unwrap();
    stage(&s.store, &[(1, "a"), (2, "b")]);
    s.store.diff(Mode::Upsert, false).unwrap();
    let again = s.store.outbox_page(0, 10).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].key.as_str(), again[0].fingerprint), (first[1].key.as_str(), first[1].fingerprint));
    assert_eq!(again[0].change, Change::Added);
}

#[test]
fn full_resends_every_row_as_added_and_never_deletes() {
    let s = state();
    stage(&s.store, &[(1, "a"), (2, "b")]);
    run(&s.store, Mode::Mirror, false);
    stage(&s.store, &[(1, "a")]);
    let (counts, sent) = run(&s.store, Mode::Mirror, true);
    assert_eq!(sent, [(1, Change::Added, Op::Upsert, "a".into())]);
    assert_eq!((counts.added, counts.removed), (1, 0));
    // The removed key is still known, so a normal run deletes it then.
    let (_, sent) = run(&s.store, Mode::Mirror, false);
    assert_eq!(sent, [(2, Change::Removed, Op::Delete, "b".into())]);
}

#[test]
fn duplicates_are_counted_with_examples_and_can_be_dropped() {
    let s = state();
    stage(&s.store, &[(1, "a"), (2, "b"), (2, "c"), (3, "x"), (3, "y"), (3, "z")]);
    let dups = s.store.duplicate_keys(5).unwrap();
    assert_eq!((dups.keys, dups.rows), (2, 5));
    assert_eq!(dups.examples, [key(2), key(3)]);
    s.store.drop_duplicate_rows().unwrap();
    assert_eq!(s.store.diff(Mode::Upsert, false).unwrap().rows, 1);
}

#[test]
fn state_survives_closing_and_reopening() {
    // The refusal of a second process is tested end to end (DuckDB's lock
    // is per process).
    let dir = tempfile::tempdir().unwrap();
    drop(StateStore::open(dir.path(), "s", "256MB").unwrap());
    let store = StateStore::open(dir.path(), "s", "256MB").unwrap();
    assert_eq!(store.snapshot_len().unwrap(), 0);
}

#[test]
fn acks_in_any_order_and_with_gaps_fold_exactly_the_acknowledged_records() {
    let s = state();
    let rows: Vec<(u32, &str)> = (1..=10).map(|i| (i, "v")).collect();
    stage(&s.store, &rows);
    s.store.diff(Mode::Upsert, false).unwrap();
    let page = s.store.outbox_page(0, 100).unwrap();
    let row = |i: usize| page[i].row_num;
    // Completions come back out of order; some records fail (2, 6, 9).
    s.store.ack("run", &[row(4), row(0), row(3), row(1)]).unwrap();
    s.store.ack("run", &[row(7), row(6)]).unwrap();
    s.store.ack("run", &[row(9)]).unwrap();
    assert_eq!(s.store.fold_acks().unwrap(), 7);
    // The outbox keeps the query's order: page[i] is id i + 1.
    let delivered: Vec<u32> = (1..=10).filter(|id| s.store.lookup(&key(*id)).unwrap().delivered.is_some()).collect();
    assert_eq!(delivered, [1, 2, 4, 5, 7, 8, 10]);
    assert_eq!(s.store.fold_acks().unwrap(), 0, "the log is empty after a fold");
}

#[test]
fn acknowledgements_survive_a_crash_before_the_fold() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = StateStore::open(dir.path(), "s", "256MB").unwrap();
        stage(&store, &[(1, "a"), (2, "b"), (3, "c")]);
        store.diff(Mode::Mirror, false).unwrap();
        let page = store.outbox_page(0, 10).unwrap();
        store.ack("run", &[page[0].row_num]).unwrap();
        store.ack("run", &[page[2].row_num]).unwrap();
        // The process dies here: no fold, no end of run.
    }
    let store = StateStore::open(dir.path(), "s", "256MB").unwrap();
    assert_eq!(snapshot(&store, &[1, 2, 3]), snap(&[(1, "a"), (3, "c")]));
    stage(&store, &[(1, "a"), (2, "b"), (3, "c")]);
    let (counts, sent) = run(&store, Mode::Mirror, false);
    assert_eq!((counts.unchanged, counts.added), (2, 1));
    assert_eq!(sent, [(2, Change::Added, Op::Upsert, "b".into())]);
}

#[test]
fn acks_logged_one_per_record_by_earlier_versions_are_folded_and_ids_derived() {
    let dir = tempfile::tempdir().unwrap();
    let row_num = {
        let store = StateStore::open(dir.path(), "s", "256MB").unwrap();
        stage(&store, &[(1, "a"), (2, "b")]);
        store.diff(Mode::Mirror, false).unwrap();
        store.outbox_page(0, 10).unwrap()[1].row_num
    };
    {
        let conn = duckdb::Connection::open(StateStore::path(dir.path(), "s")).unwrap();
        conn.execute_batch(&format!(
            "CREATE TABLE acks (row_num BIGINT NOT NULL, message_id VARCHAR NOT NULL, run_id VARCHAR NOT NULL,
                 delivered_at VARCHAR NOT NULL);
             INSERT INTO acks VALUES ({row_num}, 'stored-id', 'r', 't');
             DROP TABLE acked;"
        ))
        .unwrap();
    }
    let store = StateStore::open(dir.path(), "s", "256MB").unwrap();
    assert_eq!(snapshot(&store, &[1, 2]), snap(&[(2, "b")]));
    let delivered = store.lookup(&key(2)).unwrap().delivered.unwrap();
    let fingerprint = backflow_core::fingerprint_text(r#"{"v":"b"}"#);
    assert_eq!(delivered.message_id, backflow_core::message_id("s", &key(2), Op::Upsert, fingerprint, 1));
}

#[test]
fn a_snapshot_from_before_the_ack_log_loses_its_primary_key_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = duckdb::Connection::open(StateStore::path(dir.path(), "s")).unwrap();
        conn.execute_batch(&format!(
            "CREATE TABLE snapshot (key VARCHAR PRIMARY KEY, fingerprint UBIGINT NOT NULL, payload VARCHAR NOT NULL,
                 route VARCHAR, op VARCHAR NOT NULL, message_id VARCHAR NOT NULL, run_id VARCHAR NOT NULL,
                 delivered_at VARCHAR NOT NULL);
             INSERT INTO snapshot VALUES ('{}', {}, '{{\"v\":\"a\"}}', NULL, 'upsert', 'm', 'r', 't');",
            key(1),
            backflow_core::fingerprint_text(r#"{"v":"a"}"#)
        ))
        .unwrap();
    }
    let store = StateStore::open(dir.path(), "s", "256MB").unwrap();
    stage(&store, &[(1, "A"), (2, "b")]);
    let (_, sent) = run(&store, Mode::Mirror, false);
    assert_eq!(sent, [(1, Change::Changed, Op::Upsert, "A".into()), (2, Change::Added, Op::Upsert, "b".into())]);
    assert_eq!(snapshot(&store, &[1, 2]), snap(&[(1, "A"), (2, "b")]));
}

#[test]
fn delivered_pairs_name_unchanged_rows_and_a_missing_payload_is_detected() {
    use backflow_diff::{key_hash, pair_hash};
    let s = state();
    stage(&s.store, &[(1, "a"), (2, "b")]);
    run(&s.store, Mode::Upsert, false);
    let pairs = s.store.delivered_pairs(10).unwrap().expect("2 keys are under the limit");
    let fingerprint = |v: &str| backflow_core::fingerprint_text(&format!(r#"{{"v":"{v}"}}"#));
    assert!(pairs.contains(&pair_hash(key_hash(&key(1)), fingerprint("a"))));
    assert!(!pairs.contains(&pair_hash(key_hash(&key(1)), fingerprint("changed"))));
    assert_eq!(s.store.delivered_pairs(1).unwrap(), None, "over the limit, no set");

    // An unchanged row staged without its payload is fine; a changed row
    // without one (what a hash collision would cause) is reported.
    let mut stager = s.store.stager().unwrap();
    stager.push(&key(1), fingerprint("a"), None, None).unwrap();
    stager.push(&key(2), fingerprint("changed"), None, None).unwrap();
    stager.finish().unwrap();
    s.store.diff(Mode::Upsert, false).unwrap();
    assert_eq!(s.store.outbox_missing_payloads().unwrap(), 1);
}

#[test]
fn a_first_delivery_acknowledged_whole_becomes_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let times = {
        let store = StateStore::open(dir.path(), "s", "256MB").unwrap();
        stage(&store, &[(1, "a"), (2, "b"), (3, "c")]);
        store.diff(Mode::Mirror, false).unwrap();
        let page = store.outbox_page(0, 10).unwrap();
        // Two ack commits, at different times, in another order than sent.
        store.ack("run-1", &[page[2].row_num]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        store.ack("run-1", &[page[0].row_num, page[1].row_num]).unwrap();
        assert_eq!(store.fold_acks().unwrap(), 3);
        let at = |id| store.lookup(&key(id)).unwrap().delivered.unwrap();
        assert!(at(1).delivered_at == at(2).delivered_at && at(3).delivered_at < at(1).delivered_at);
        assert!([1, 2, 3].iter().all(|id| at(*id).run_id == "run-1"));
        [1, 2, 3].map(|id| at(id).delivered_at)
    };
    // The snapshot keeps its columns and constraints, and later runs diff
    // against it as against any other.
    assert_eq!(
        not_null_snapshot_columns(dir.path()),
        ["fingerprint", "key", "op", "payload"],
        "the run id is kept by range, like the time"
    );
    assert!(!outbox_table_left(dir.path()), "the outbox became the snapshot");
    let store = StateStore::open(dir.path(), "s", "256MB").unwrap();
    assert_eq!(snapshot(&store, &[1, 2, 3]), snap(&[(1, "a"), (2, "b"), (3, "c")]));
    stage(&store, &[(1, "a"), (2, "B")]);
    let (counts, sent) = run(&store, Mode::Mirror, false);
    assert_eq!((counts.unchanged, counts.changed, counts.removed), (1, 1, 1));
    assert_eq!(sent.len(), 2);
    store.fold_acks().unwrap();
    assert_eq!(snapshot(&store, &[1, 2, 3]), snap(&[(1, "a"), (2, "B")]));
    assert_eq!(store.lookup(&key(1)).unwrap().delivered.unwrap().delivered_at, times[0], "kept from the first run");
}

#[test]
fn an_outbox_written_by_an_earlier_version_is_folded_whole_into_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = StateStore::open(dir.path(), "s", "256MB").unwrap();
        stage(&store, &[(1, "a"), (2, "b")]);
        store.diff(Mode::Upsert, false).unwrap();
        store.ack("run-1", &[1, 2]).unwrap();
    }
    {
        // Earlier versions' outboxes lacked the snapshot's delivery columns
        // and declared no column never missing.
        let conn = duckdb::Connection::open(StateStore::path(dir.path(), "s")).unwrap();
        conn.execute_batch(
            "ALTER TABLE outbox ALTER COLUMN key DROP NOT NULL;
             ALTER TABLE outbox ALTER COLUMN change DROP NOT NULL;
             ALTER TABLE outbox ALTER COLUMN op DROP NOT NULL;
             ALTER TABLE outbox DROP COLUMN message_id;
             ALTER TABLE outbox DROP COLUMN run_id;
             ALTER TABLE outbox DROP COLUMN delivered_at;
             ALTER TABLE delivered_ranges DROP COLUMN run_id;",
        )
        .unwrap();
    }
    let store = StateStore::open(dir.path(), "s", "256MB").unwrap();
    assert_eq!(snapshot(&store, &[1, 2]), snap(&[(1, "a"), (2, "b")]));
    assert_eq!(store.lookup(&key(2)).unwrap().delivered.unwrap().run_id, "run-1");
    drop(store);
    assert!(!outbox_table_left(dir.path()), "the outbox became the snapshot");
    assert_eq!(not_null_snapshot_columns(dir.path()), ["fingerprint", "key", "op", "payload"]);
}

/// The snapshot's columns declared never missing, by name.
fn not_null_snapshot_columns(dir: &std::path::Path) -> Vec<String> {
    let conn = duckdb::Connection::open(StateStore::path(dir, "s")).unwrap();
    conn.prepare(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = 'snapshot' AND NOT is_nullable
         ORDER BY column_name",
    )
    .unwrap()
    .query_map([], |r| r.get(0))
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// Whether the state file still holds an outbox table (a fold that copies
/// leaves it; a fold that turns it into the snapshot does not).
fn outbox_table_left(dir: &std::path::Path) -> bool {
    let conn = duckdb::Connection::open(StateStore::path(dir, "s")).unwrap();
    let n: i64 =
        conn.query_row("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'outbox'", [], |r| r.get(0)).unwrap();
    n == 1
}

#[test]
fn a_delivery_that_replaces_most_of_the_snapshot_becomes_it_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let ack_all = |store: &StateStore, run_id: &str| {
        let rows: Vec<u64> = store.outbox_page(0, 100).unwrap().iter().map(|r| r.row_num).collect();
        store.ack(run_id, &rows).unwrap();
        store.fold_acks().unwrap();
    };
    let first_time = {
        let store = StateStore::open(dir.path(), "s", "256MB").unwrap();
        stage(&store, &[(1, "a"), (2, "b"), (3, "c"), (4, "d")]);
        store.diff(Mode::Mirror, false).unwrap();
        ack_all(&store, "run-1");
        std::thread::sleep(std::time::Duration::from_millis(5));
        // Two changes and a removal replace three of the four rows.
        stage(&store, &[(1, "a"), (2, "B"), (3, "C")]);
        let counts = store.diff(Mode::Mirror, false).unwrap();
        assert_eq!((counts.unchanged, counts.changed, counts.removed), (1, 2, 1));
        ack_all(&store, "run-2");
        assert_eq!(snapshot(&store, &[1, 2, 3, 4]), snap(&[(1, "a"), (2, "B"), (3, "C")]));
        let one = store.lookup(&key(1)).unwrap().delivered.unwrap();
        let two = store.lookup(&key(2)).unwrap().delivered.unwrap();
        assert_eq!((one.run_id.as_str(), two.run_id.as_str()), ("run-1", "run-2"));
        assert!(one.delivered_at < two.delivered_at, "the kept row keeps its own delivery time");
        one.delivered_at
    };
    assert!(!outbox_table_left(dir.path()), "the outbox became the snapshot");

    // One new row beside three kept ones: copied into the snapshot.
    let store = StateStore::open(dir.path(), "s", "256MB").unwrap();
    stage(&store, &[(1, "a"), (2, "B"), (3, "C"), (5, "e")]);
    assert_eq!(store.diff(Mode::Mirror, false).unwrap().added, 1);
    ack_all(&store, "run-3");
    assert_eq!(snapshot(&store, &[1, 2, 3, 4, 5]), snap(&[(1, "a"), (2, "B"), (3, "C"), (5, "e")]));
    assert_eq!(store.lookup(&key(1)).unwrap().delivered.unwrap().delivered_at, first_time);
    assert_eq!(store.lookup(&key(5)).unwrap().delivered.unwrap().run_id, "run-3");
    drop(store);
    assert!(!outbox_table_left(dir.path()), "a small delivery is copied, and its outbox dropped once folded");
}
