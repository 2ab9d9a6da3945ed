//! The candidate pass over an attached DuckDB warehouse file: which rows it
//! keeps, what it counts, and the outbox written from it.

use backflow_core::{Change, Op};
use backflow_diff::{InWarehouse, Scan, StateStore};
use duckdb::arrow::array::{Array, AsArray};
use duckdb::arrow::datatypes::{Int32Type, UInt64Type};

struct Fixture {
    dir: tempfile::TempDir,
    store: StateStore,
}

fn fixture(table: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let warehouse = dir.path().join("warehouse.duckdb");
    duckdb::Connection::open(&warehouse).unwrap().execute_batch(table).unwrap();
    let store = StateStore::open(&dir.path().join("state"), "s", "256MB").unwrap();
    store.attach_warehouse(&warehouse).unwrap();
    Fixture { dir, store }
}

const KEY: &[(&str, &str)] = &[("id", "\"id\"")];

fn find(store: &StateStore, query: &str) -> Result<Scan, backflow_diff::DiffError> {
    let key_columns: Vec<(String, String)> = KEY.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    let hashed = ["v".to_string()];
    let ordered = store.query_is_ordered(query);
    store.find_candidates(&InWarehouse { query, key_columns: &key_columns, hashed_columns: &hashed, seed: 1, ordered })
}

/// The candidates in the query as (id, change, old fingerprint, row hash),
/// in order.
fn candidates(store: &StateStore) -> Vec<(i32, String, Option<u64>, u64)> {
    let mut out = Vec::new();
    store
        .each_candidate::<backflow_diff::DiffError>(|batch, at| {
            let id = batch.column(0).as_primitive::<Int32Type>();
            let change = batch.column(at.change).as_string::<i32>();
            let old = batch.column(at.old_fingerprint).as_primitive::<UInt64Type>();
            let hash = batch.column(at.row_hash).as_primitive::<UInt64Type>();
            assert_eq!(batch.column(at.key).as_string::<i32>().value(0), format!("{{\"id\":{}}}", id.value(0)));
            for i in 0..batch.num_rows() {
                let old = (!old.is_null(i)).then(|| old.value(i));
                out.push((id.value(i), change.value(i).to_string(), old, hash.value(i)));
            }
            Ok(())
        })
        .unwrap();
    out
}

/// Writes the outbox for the candidates (fingerprint = id), acks it all.
fn deliver(store: &StateStore, removed: Option<Op>) -> u64 {
    let mut outbox = store.outbox_writer().unwrap();
    for (id, change, _, hash) in candidates(store) {
        let change = if change == "added" { Change::Added } else { Change::Changed };
        let key = format!("{{\"id\":{id}}}");
        outbox.push(&key, change, Op::Upsert, id as u64, &format!("{{\"id\":{id}}}"), None, hash, 0).unwrap();
    }
    outbox.finish().unwrap();
    let mode = if removed == Some(Op::Delete) { backflow_core::Mode::Mirror } else { backflow_core::Mode::Upsert };
    let (n, _) = store.finish_candidates(mode, None).unwrap();
    let acks: Vec<u64> = (1..=n).collect();
    store.ack("run", &acks).unwrap();
    store.fold_acks().unwrap();
    n
}

#[test]
fn only_rows_that_may_differ_are_candidates() {
    let f = fixture("create table t as select range::INTEGER as id, 'v' || range as v, range as other from range(5)");
    let q = "select * from t order by id desc -- trailing comment";
    let scan = find(&f.store, q).unwrap();
    assert_eq!((scan.rows, scan.present, scan.removed, scan.maybe_duplicates, scan.collided), (5, 5, 0, false, false));
    let first = candidates(&f.store);
    assert_eq!(first.iter().map(|c| c.0).collect::<Vec<_>>(), [4, 3, 2, 1, 0], "in query order");
    assert!(first.iter().all(|c| c.1 == "added" && c.2.is_none()));
    assert_eq!(deliver(&f.store, Some(Op::Delete)), 5);

    // Nothing differs; an unhashed column's change is no candidate either.
    f.store.detach_warehouse().unwrap();
    duckdb::Connection::open(f.dir.path().join("warehouse.duckdb"))
        .unwrap()
        .execute_batch("update t set other = 99; update t set v = 'changed' where id = 2; delete from t where id = 3")
        .unwrap();
    f.store.attach_warehouse(&f.dir.path().join("warehouse.duckdb")).unwrap();
    let scan = find(&f.store, q).unwrap();
    assert_eq!((scan.rows, scan.present, scan.removed), (4, 1, 1));
    let changed = candidates(&f.store);
    assert_eq!(changed.len(), 1);
    assert_eq!(
        (changed[0].0, changed[0].1.as_str(), changed[0].2),
        (2, "changed", Some(2)),
        "with its old fingerprint"
    );
    assert_eq!(deliver(&f.store, Some(Op::Delete)), 2, "the change and the removal");
    assert_eq!(f.store.snapshot_len().unwrap(), 4);
    assert_eq!(find(&f.store, q).unwrap().present + f.store.snapshot_len().unwrap(), 4);
}

#[test]
fn only_a_query_with_a_top_level_order_by_is_ordered() {
    let f = fixture("create table t (id INTEGER, v VARCHAR)");
    for (query, ordered) in [
        ("select * from t", false),
        ("from t", false),
        ("select * from (select * from t order by id)", false),
        ("select * from t order by id;", true),
        ("with x as (select * from t) select * from x order by 1 -- comment", true),
        ("select * from t union all select * from t order by 1", true),
        ("not sql at all", true),
    ] {
        assert_eq!(f.store.query_is_ordered(query), ordered, "{query}");
    }
}

#[test]
fn null_and_repeated_keys_are_reported() {
    let f = fixture("create table t (id INTEGER, v VARCHAR); insert into t values (1, 'a'), (1, 'b'), (NULL, 'c')");
    let scan = find(&f.store, "select * from t").unwrap();
    assert_eq!((scan.rows, scan.null_keys, scan.maybe_duplicates), (3, 1, true));
    let scan = find(&f.store, "select * from t where id is not null and v = 'a'").unwrap();
    assert_eq!((scan.rows, scan.null_keys, scan.maybe_duplicates), (1, 0, false));
    let f = fixture("create table t as select range::INTEGER as id, 'v' as v from range(3)");
    find(&f.store, "select * from t").unwrap();
    deliver(&f.store, None);
    // Keys both known: the matched rows outnumber the snapshot's keys.
    let scan = find(&f.store, "select * from t union all select * from t where id = 1").unwrap();
    assert_eq!((scan.rows, scan.present, scan.maybe_duplicates), (4, 0, true));
    let scan = find(&f.store, "select * from t union all select 7, 'new' union all select 7, 'new'").unwrap();
    assert_eq!((scan.rows, scan.present, scan.maybe_duplicates), (5, 2, true));
    assert!(!find(&f.store, "select * from t where id <> 1 union all select 7, 'new'").unwrap().maybe_duplicates);
}

#[test]
fn row_hashes_of_unchanged_rows_can_be_recorded() {
    let f = fixture("create table t as select range::INTEGER as id, 'v' || range as v from range(3)");
    find(&f.store, "select * from t").unwrap();
    deliver(&f.store, None);
    // A row hash that differs (as in state written by staging, which has
    // none) makes the row a candidate until the right one is recorded.
    let rows: Vec<(String, u64)> = (0..3).map(|id| (format!("{{\"id\":{id}}}"), 0)).collect();
    f.store.refresh_row_hashes(&rows).unwrap();
    find(&f.store, "select * from t").unwrap();
    let found = candidates(&f.store);
    assert_eq!(found.len(), 3);
    let fresh: Vec<(String, u64)> = found.iter().map(|c| (format!("{{\"id\":{}}}", c.0), c.3)).collect();
    f.store.refresh_row_hashes(&fresh).unwrap();
    assert_eq!(find(&f.store, "select * from t").unwrap().present, 0);
}

#[test]
fn state_files_keep_payload_text_uncompressed() {
    let f = fixture("create table t as select range::INTEGER as id, 'v' || range as v from range(200000)");
    find(&f.store, "select * from t").unwrap();
    deliver(&f.store, None);
    let Fixture { dir, store } = f;
    drop(store);
    let conn = duckdb::Connection::open(dir.path().join("state/s.duckdb")).unwrap();
    let methods: Vec<String> = conn
        .prepare("SELECT DISTINCT compression FROM pragma_storage_info('snapshot') WHERE column_name = 'payload'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(!methods.is_empty());
    assert!(methods.iter().all(|m| !m.contains("FSST")), "{methods:?}");
}
