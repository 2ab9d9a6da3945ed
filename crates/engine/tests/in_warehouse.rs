//! A warehouse that is a DuckDB file is diffed inside DuckDB; what it sends
//! must be exactly what staging the query row by row sends.

mod support;

use serde_json::Value;
use support::Scenario;

/// A table of many types, a mapping that nests and leaves a column out,
/// and a URL parameter read from a column.
const SYNC: &str = "warehouse: wh\nquery: select * from wide\nprimary_key: id\nmode: mirror\n\
    mapping:\n  name: name\n  score.value: score\n  score.ratio: ratio\n  tags: tags\n  info: info\n  \
    at: seen_at\n  day: day\n  price: price\n\
    destination:\n  url: \"{URL}/hook\"\n  query_params: {region: region}\n";

const TABLE: &str = "create table wide (id BIGINT, name VARCHAR, score INTEGER, ratio DOUBLE, tags VARCHAR[],
    info STRUCT(a INTEGER, b VARCHAR), seen_at TIMESTAMP, day DATE, price DECIMAL(10, 2), region VARCHAR, note VARCHAR);
    insert into wide values
      (1, 'plain', 1, 0.5, ['a', 'b'], {'a': 1, 'b': 'x'}, '2024-01-02 03:04:05', '2024-01-02', 1.50, 'eu', 'n'),
      (2, 'quote \" and \\ and é€😀', NULL, -1e300, [], NULL, NULL, NULL, NULL, 'us & co', NULL),
      (3, 'tab\tnewline\ncontrol' || chr(31), -7, 'NaN', [NULL], {'a': NULL, 'b': NULL}, '1970-01-01', '0001-01-01', -0.01, NULL, 'n'),
      (4, NULL, 2147483647, 'Infinity', ['z'], {'a': 2, 'b': ''}, '2262-04-11 23:47:16', '9999-12-31', 99999999.99, 'eu', 'n');";

const EDITS: &str = "update wide set score = score + 1 where id = 1;
    update wide set note = 'only an unmapped column' where id = 3;
    update wide set region = 'ap' where id = 4;
    delete from wide where id = 2;
    insert into wide values (5, 'new', 5, 5.5, ['n'], {'a': 5, 'b': 'five'}, '2025-05-05 05:05:05.123456', '2025-05-05', 5.05, 'eu', 'n');";

/// What the receiver got in one run, per key: the target (path and query)
/// and the body without its run id and row number (the query has no
/// `ORDER BY`, so the order of its rows is DuckDB's).
fn received(s: &Scenario) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = s
        .receiver
        .requests()
        .iter()
        .map(|r| {
            let mut body = r.json();
            let meta = body["_meta"].as_object_mut().unwrap();
            meta.remove("run_id");
            meta.remove("row_num");
            (r.target.clone(), body.to_string())
        })
        .collect();
    out.sort();
    out
}

fn run(s: &Scenario) -> (bool, Vec<(String, String)>) {
    s.receiver.clear();
    let report = s.run();
    assert!(report.complete(), "{report:?}");
    (report.in_warehouse, received(s))
}

#[test]
fn the_diff_inside_duckdb_sends_exactly_what_staging_sends() {
    let inside = Scenario::new(SYNC);
    let staged = Scenario::new(SYNC);
    staged.stage_queries(true);
    for s in [&inside, &staged] {
        s.sql(TABLE);
    }
    let (in_warehouse, first) = run(&inside);
    assert!(in_warehouse, "a DuckDB file without init SQL is diffed inside DuckDB");
    assert_eq!((false, first.clone()), run(&staged));
    assert_eq!(first.len(), 4);
    let body: Value = serde_json::from_str(&first.iter().find(|(t, _)| t.contains("region=us")).unwrap().1).unwrap();
    assert_eq!(body["name"], "quote \" and \\ and é€😀");
    assert!(first.iter().any(|(t, _)| t == "/hook?region=us%20%26%20co"), "{first:?}");

    for s in [&inside, &staged] {
        s.sql(EDITS);
    }
    let (in_warehouse, second) = run(&inside);
    assert!(in_warehouse);
    assert_eq!((false, second.clone()), run(&staged));
    let mut changes: Vec<(String, String)> = second
        .iter()
        .map(|(_, b)| {
            let meta = serde_json::from_str::<Value>(b).unwrap()["_meta"].clone();
            (meta["key"]["id"].to_string(), meta["change"].as_str().unwrap().to_string())
        })
        .collect();
    changes.sort();
    assert_eq!(
        changes,
        [
            ("1".into(), "changed".into()),
            ("2".into(), "removed".into()),
            ("4".into(), "changed".into()),
            ("5".into(), "added".into())
        ]
        .into_iter()
        .collect::<Vec<(String, String)>>(),
        "an unmapped column's change (id 3) sends nothing"
    );
    assert_eq!(run(&inside), (true, vec![]));
    assert_eq!(run(&staged), (false, vec![]));
}

#[test]
fn records_follow_the_query_order_by() {
    let s = Scenario::new(&SYNC.replace("select * from wide", "select * from wide order by id desc"));
    s.sql(TABLE);
    s.receiver.clear();
    assert!(s.run().in_warehouse);
    let mut order: Vec<(u64, u64)> = s
        .receiver
        .bodies()
        .iter()
        .map(|b| (b["_meta"]["row_num"].as_u64().unwrap(), b["_meta"]["key"]["id"].as_u64().unwrap()))
        .collect();
    order.sort();
    assert_eq!(order, [(1, 4), (2, 3), (3, 2), (4, 1)]);
}

#[test]
fn state_written_by_staging_is_taken_over_without_sending_again() {
    let s = Scenario::new(SYNC);
    s.sql(TABLE);
    s.stage_queries(true);
    let (_, first) = run(&s);
    assert_eq!(first.len(), 4);
    s.stage_queries(false);
    // The staged run recorded no row hashes: every row is a candidate once,
    // found unchanged by its fingerprint, and its row hash recorded.
    let report = s.run();
    assert!(report.in_warehouse);
    assert_eq!((report.counts.unchanged, report.counts.to_send), (4, 0));
    assert_eq!(run(&s), (true, vec![]));
    s.sql("update wide set name = 'changed' where id = 1");
    let (in_warehouse, sent) = run(&s);
    assert!(in_warehouse);
    assert_eq!(sent.len(), 1);
}

#[test]
fn keys_duckdb_writes_otherwise_than_backflow_are_staged() {
    let s = Scenario::new(
        "warehouse: wh\nquery: select * from keyed\nprimary_key: code\nmode: mirror\n\
         destination:\n  url: \"{URL}/hook\"\n",
    );
    // DuckDB escapes control characters with upper-case hex digits, JSON
    // text written by Backflow with lower-case ones.
    s.sql("create table keyed as select 'k' || chr(31) as code, 1 as v union all select 'plain', 2");
    let (in_warehouse, sent) = run(&s);
    assert!(!in_warehouse);
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().any(|(_, b)| b.contains(r#""key":{"code":"k\u001f"}"#)), "{sent:?}");
    assert_eq!(run(&s), (false, vec![]), "nothing is sent again");
    s.sql("delete from keyed where v = 1");
    let (in_warehouse, sent) = run(&s);
    assert!(in_warehouse, "without such keys the diff runs inside DuckDB again");
    assert_eq!(sent.len(), 1);
}

#[test]
fn duplicate_and_null_keys_are_left_to_staging_which_reports_them() {
    let s = Scenario::new(SYNC);
    s.sql(TABLE);
    let plan = s.plan();
    assert!(plan.in_warehouse);
    s.sql("insert into wide select * from wide where id = 1");
    let err = s.engine().plan("s", false, &backflow_engine::NoProgress).unwrap_err().to_string();
    assert!(err.contains("1 key(s) appear more than once"), "{err}");
    s.sql("delete from wide where id = 1; insert into wide (id) values (NULL)");
    let err = s.engine().plan("s", false, &backflow_engine::NoProgress).unwrap_err().to_string();
    assert!(err.contains("NULL in the primary key"), "{err}");
}

#[test]
fn a_plan_shows_removed_records_with_their_last_payload() {
    let s = Scenario::new(SYNC);
    s.sql(TABLE);
    s.run();
    s.sql("delete from wide where id in (1, 4)");
    let plan = s.plan();
    assert!(plan.in_warehouse);
    assert_eq!((plan.counts.removed, plan.counts.to_send), (2, 2));
    let names: Vec<&Value> = plan.samples.iter().map(|b| &b["name"]).collect();
    assert_eq!(names, [&Value::from("plain"), &Value::Null], "the payloads last delivered, by key");
    assert!(plan.samples.iter().all(|b| b["_meta"]["op"] == "delete"));
    assert_eq!(s.run().delivered_total(), 2);
}
