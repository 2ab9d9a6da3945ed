//! Occurrences across crashes: what a delivery that never finished leaves
//! for the next run (records possibly delivered), and generations that give
//! every new occurrence of a key a new message id while a re-send keeps its.

use backflow_core::{Change, Mode, Op, message_id};
use backflow_diff::{OutboxRow, StateStore};

fn key(id: u32) -> String {
    format!(r#"{{"id":{id}}}"#)
}

fn open(dir: &tempfile::TempDir) -> StateStore {
    StateStore::open(dir.path(), "s", "256MB").unwrap()
}

/// Stages rows (id, value) and diffs them in `mode`; returns the outbox.
fn diff(store: &StateStore, mode: Mode, rows: &[(u32, &str)]) -> Vec<OutboxRow> {
    let mut stager = store.stager().unwrap();
    for (id, v) in rows {
        let payload = format!(r#"{{"v":"{v}"}}"#);
        stager.push(&key(*id), backflow_core::fingerprint_text(&payload), Some(&payload), None).unwrap();
    }
    stager.finish().unwrap();
    store.diff(mode, false).unwrap();
    if mode.forgets_removed() {
        store.forget_removed().unwrap();
    }
    store.outbox_page(0, 10_000).unwrap()
}

/// Delivers `rows` as a run would: begins the delivery, acknowledges the
/// records for which `acked` holds, and folds (or not: a crash).
fn deliver(store: &StateStore, rows: &[OutboxRow], acked: impl Fn(&OutboxRow) -> bool, fold: bool) {
    store.begin_delivery("run").unwrap();
    let acks: Vec<u64> = rows.iter().filter(|r| acked(r)).map(|r| r.row_num).collect();
    store.ack("run", &acks).unwrap();
    if fold {
        store.fold_acks().unwrap();
    }
}

fn id(row: &OutboxRow) -> String {
    message_id("s", &row.key, row.op, row.fingerprint, row.generation)
}

fn find(rows: &[OutboxRow], id: u32) -> &OutboxRow {
    rows.iter().find(|r| r.key == key(id)).unwrap_or_else(|| panic!("key {id} is not in the outbox: {rows:?}"))
}

fn value(row: &OutboxRow) -> String {
    let v: serde_json::Value = serde_json::from_str(&row.payload).unwrap();
    v["v"].as_str().unwrap().to_string()
}

#[test]
fn records_in_flight_when_the_process_died_are_possibly_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let first = diff(&store, Mode::Mirror, &[(1, "a"), (2, "b"), (3, "c"), (4, "d")]);
    // Key 1 acknowledged; 2, 3 and 4 in flight when the process dies.
    deliver(&store, &first, |r| r.key == key(1), false);
    let in_flight_3 = id(find(&first, 3));
    drop(store);

    let store = open(&dir);
    store.verify().unwrap();
    // 2 leaves the query, 3 is unchanged, 4 changes.
    let next = diff(&store, Mode::Mirror, &[(1, "a"), (3, "c"), (4, "D")]);
    assert_eq!(next.len(), 3, "{next:?}");
    let deleted = find(&next, 2);
    assert_eq!((deleted.change, deleted.op), (Change::Removed, Op::Delete), "a key that may have arrived is deleted");
    assert_eq!(value(deleted), "b", "with the payload that may have been delivered");
    let resent = find(&next, 3);
    assert_eq!(id(resent), in_flight_3, "the same change is sent again under the same id");
    let changed = find(&next, 4);
    assert_eq!(value(changed), "D");
    assert_ne!(changed.generation, find(&first, 4).generation, "a new occurrence");

    // Once those are delivered, nothing is pending and the deleted key is gone.
    deliver(&store, &next, |_| true, true);
    assert!(!store.has_pending().unwrap());
    assert!(diff(&store, Mode::Mirror, &[(1, "a"), (3, "c"), (4, "D")]).is_empty());
    store.verify().unwrap();
}

#[test]
fn an_unconfirmed_record_is_sent_again_even_when_its_row_went_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let first = diff(&store, Mode::Upsert, &[(1, "a")]);
    deliver(&store, &first, |_| true, true);
    // B is sent, its answer never recorded (a timeout, a crash).
    let second = diff(&store, Mode::Upsert, &[(1, "b")]);
    deliver(&store, &second, |_| false, true);
    assert!(store.has_pending().unwrap());
    // The row is A again, which the snapshot holds: the receiver may hold B.
    let third = diff(&store, Mode::Upsert, &[(1, "a")]);
    assert_eq!(third.len(), 1, "sent although equal to the confirmed delivery");
    assert_eq!((third[0].change, value(&third[0])), (Change::Changed, "a".to_string()));
    let ids = [id(&first[0]), id(&second[0]), id(&third[0])];
    assert!(ids[0] != ids[2] && ids[1] != ids[2], "A, B, A again: three occurrences, three ids: {ids:?}");
}

/// Runs `steps` in `mode` on a fresh state (each a query result of key 1
/// with a value, or none), delivering each run whole; returns the message
/// ids sent.
fn ids_of_steps(mode: Mode, steps: &[Option<&str>]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let mut ids = Vec::new();
    for step in steps {
        let rows = match step {
            Some(v) => diff(&store, mode, &[(1, v)]),
            None => diff(&store, mode, &[]),
        };
        ids.extend(rows.iter().map(id));
        deliver(&store, &rows, |_| true, true);
    }
    ids
}

fn distinct(ids: &[String]) -> usize {
    ids.iter().collect::<std::collections::HashSet<_>>().len()
}

#[test]
fn a_value_that_changes_back_is_a_new_occurrence() {
    let ids = ids_of_steps(Mode::Upsert, &[Some("a"), Some("b"), Some("a"), Some("b")]);
    assert_eq!((ids.len(), distinct(&ids)), (4, 4), "{ids:?}");
}

#[test]
fn a_key_deleted_listed_again_and_deleted_again_gets_new_ids() {
    // Delete mode: the query lists keys to delete, each once.
    let ids = ids_of_steps(Mode::Delete, &[Some("x"), None, Some("x")]);
    assert_eq!((ids.len(), distinct(&ids)), (2, 2), "the second delete of the key is a new occurrence: {ids:?}");
    // Mirror mode: added, deleted, added again as it was, deleted again.
    let ids = ids_of_steps(Mode::Mirror, &[Some("x"), None, Some("x"), None]);
    assert_eq!((ids.len(), distinct(&ids)), (4, 4), "{ids:?}");
}

#[test]
fn a_retried_change_keeps_its_id_and_reset_starts_new_occurrences() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let first = diff(&store, Mode::Mirror, &[(1, "a"), (2, "b")]);
    // Key 2 refused or failing: not acknowledged.
    deliver(&store, &first, |r| r.key == key(1), true);
    let retry = diff(&store, Mode::Mirror, &[(1, "a"), (2, "b")]);
    assert_eq!(retry.len(), 1);
    assert_eq!(id(&retry[0]), id(find(&first, 2)), "a retry next run keeps the id");
    deliver(&store, &retry, |_| true, true);
    store.reset().unwrap();
    let again = diff(&store, Mode::Mirror, &[(1, "a"), (2, "b")]);
    assert_eq!(again.len(), 2);
    assert_ne!(id(find(&again, 1)), id(find(&first, 1)), "after a reset, sending again is a new occurrence");
    store.verify().unwrap();
}

#[test]
fn a_delivery_that_never_began_leaves_nothing_pending() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    // The diff was written, and the process died before sending.
    diff(&store, Mode::Mirror, &[(1, "a")]);
    drop(store);
    let store = open(&dir);
    assert!(!store.has_pending().unwrap());
    // A key that left the query before any delivery is not deleted.
    assert!(diff(&store, Mode::Mirror, &[]).is_empty());
}

#[test]
fn an_unconfirmed_delete_of_an_unconfirmed_record_is_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    // A new row is sent, never acknowledged.
    let first = diff(&store, Mode::Mirror, &[(1, "a")]);
    deliver(&store, &first, |_| false, true);
    // It leaves the query: its delete is sent, never acknowledged either.
    let second = diff(&store, Mode::Mirror, &[]);
    assert_eq!((second.len(), second[0].op), (1, Op::Delete));
    deliver(&store, &second, |_| false, true);
    // The receiver may still hold the row: the delete goes again, as it was.
    let third = diff(&store, Mode::Mirror, &[]);
    assert_eq!(third.len(), 1, "the delete is sent again");
    assert_eq!((third[0].op, value(&third[0])), (Op::Delete, "a".to_string()));
    assert_eq!(id(&third[0]), id(&second[0]), "under the same id");
    deliver(&store, &third, |_| true, true);
    assert!(diff(&store, Mode::Mirror, &[]).is_empty());
    store.verify().unwrap();
}

#[test]
fn outside_mirror_mode_an_unconfirmed_record_is_sent_again_after_its_key_left() {
    for mode in [Mode::Append, Mode::Upsert, Mode::Create, Mode::Delete] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let first = diff(&store, mode, &[(1, "a"), (2, "b")]);
        // Key 2's record is never acknowledged, and the row leaves the query.
        deliver(&store, &first, |r| r.key == key(1), true);
        let next = diff(&store, mode, &[(1, "a")]);
        assert_eq!(next.len(), 1, "{mode}: {next:?}");
        assert_eq!((next[0].op, value(&next[0])), (first[1].op, "b".to_string()), "{mode}: sent again as it was");
        assert_eq!(id(&next[0]), id(find(&first, 2)), "{mode}: under the same id");
        deliver(&store, &next, |_| true, true);
        assert!(diff(&store, mode, &[(1, "a")]).is_empty(), "{mode}: then forgotten");
        store.verify().unwrap();
    }
}

#[test]
fn a_full_run_sends_no_delete_for_an_unconfirmed_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let first = diff(&store, Mode::Mirror, &[(1, "a"), (2, "b")]);
    deliver(&store, &first, |_| false, true);
    // `--full` never deletes: key 2 stays unconfirmed for the next run.
    let mut stager = store.stager().unwrap();
    let payload = r#"{"v":"a"}"#;
    stager.push(&key(1), backflow_core::fingerprint_text(payload), Some(payload), None).unwrap();
    stager.finish().unwrap();
    store.diff(Mode::Mirror, true).unwrap();
    let full = store.outbox_page(0, 100).unwrap();
    assert_eq!(full.iter().map(|r| (r.key.clone(), r.op)).collect::<Vec<_>>(), [(key(1), Op::Upsert)]);
    deliver(&store, &full, |_| true, true);
    let next = diff(&store, Mode::Mirror, &[(1, "a")]);
    assert_eq!((next.len(), next[0].op, next[0].key.clone()), (1, Op::Delete, key(2)), "deleted by the next run");
}

/// Stages key 1 with value `v` and its URL's column value `org`.
fn stage_routed(store: &StateStore, rows: &[(&str, u32)]) {
    let mut stager = store.stager().unwrap();
    for (v, org) in rows {
        let payload = format!(r#"{{"v":"{v}"}}"#);
        let route = format!(r#"{{"org":{org}}}"#);
        let fingerprint = backflow_core::fingerprint_request(&payload, Some(&route));
        stager.push(&key(1), fingerprint, Some(&payload), Some(&route)).unwrap();
    }
    stager.finish().unwrap();
}

#[test]
fn a_key_whose_unconfirmed_delivery_went_to_another_url_is_deleted_at_both() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let outbox = |rows: &[(&str, u32)]| {
        stage_routed(&store, rows);
        store.diff(Mode::Mirror, false).unwrap();
        store.outbox_page(0, 100).unwrap()
    };
    let routes = |rows: &[OutboxRow]| {
        let mut r: Vec<(Op, String)> = rows.iter().map(|r| (r.op, r.route.clone().unwrap())).collect();
        r.sort();
        r
    };
    // Delivered to org 1; then moved to org 2, unconfirmed.
    let first = outbox(&[("a", 1)]);
    deliver(&store, &first, |_| true, true);
    let moved = outbox(&[("a", 2)]);
    deliver(&store, &moved, |_| false, true);
    // The row leaves the query: the receiver may hold it at either URL.
    let gone = outbox(&[]);
    assert_eq!(routes(&gone), [(Op::Delete, r#"{"org":1}"#.into()), (Op::Delete, r#"{"org":2}"#.into())]);
    let ids: std::collections::HashSet<String> = gone.iter().map(id).collect();
    assert_eq!(ids.len(), 2, "two deletes, two ids");
    // Neither acknowledged: both go again, under the ids they had.
    deliver(&store, &gone, |_| false, true);
    let gone = outbox(&[]);
    assert_eq!(gone.iter().map(id).collect::<std::collections::HashSet<_>>(), ids);
    // Only the delete at org 2 is acknowledged: the one at org 1 goes again.
    deliver(&store, &gone, |r| r.route.as_deref() == Some(r#"{"org":2}"#), true);
    store.verify().unwrap();
    let again = outbox(&[]);
    assert_eq!(routes(&again), [(Op::Delete, r#"{"org":1}"#.into())]);
    assert!(ids.contains(&id(&again[0])), "under the id it had");
    deliver(&store, &again, |_| true, true);
    assert!(outbox(&[]).is_empty());
    store.verify().unwrap();
}
