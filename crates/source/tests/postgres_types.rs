//! Every Postgres type Backflow reads, and every way a connection or query
//! goes wrong, against a real server (a fresh database per test).

use backflow_source::{PostgresSource, RowConsumer, SourceError};
use backflow_testkit::postgres::{RefusingPostgres, TestDatabase};
use serde_json::{Value, json};
use std::time::Duration;

#[derive(Default)]
struct Collect {
    columns: Vec<String>,
    rows: Vec<Vec<Value>>,
    stop_after: Option<usize>,
}

impl RowConsumer for Collect {
    fn columns(&mut self, names: &[String]) -> Result<(), String> {
        self.columns = names.to_vec();
        Ok(())
    }

    fn row(&mut self, values: Vec<Value>) -> Result<(), String> {
        self.rows.push(values);
        match self.stop_after {
            Some(n) if self.rows.len() >= n => Err("enough".into()),
            _ => Ok(()),
        }
    }
}

fn stream(url: &str, sql: &str) -> Result<Collect, SourceError> {
    let mut out = Collect::default();
    PostgresSource::open(url, None, None, None)?.stream(sql, &mut out)?;
    Ok(out)
}

/// The one row of `sql` as an object of column → value.
fn row(db: &TestDatabase, sql: &str) -> serde_json::Map<String, Value> {
    let out = stream(&db.url, sql).unwrap();
    assert_eq!(out.rows.len(), 1);
    out.columns.into_iter().zip(out.rows.into_iter().next().unwrap()).collect()
}

#[test]
fn every_common_type_maps_to_json_by_the_documented_rules() {
    let Some(db) = TestDatabase::create() else { return };
    db.execute(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
         CREATE TABLE typed (id positive, feeling mood, tags text[]);
         INSERT INTO typed VALUES (5, 'happy', ARRAY['a', NULL, 'c']);",
    );
    let got = row(
        &db,
        r#"select
            1::int2 as i2, -2::int4 as i4, 9223372036854775807::int8 as i8, 26::oid as oid,
            123456789012345678901234567890.123456789::numeric as big, 12.50::numeric(10, 2) as money,
            -0.001::numeric as small, 'NaN'::numeric as nnan, 'Infinity'::numeric as ninf,
            1.5::float4 as f4, 0.1::float8 as f8, 'NaN'::float8 as fnan, '-Infinity'::float4 as fninf,
            1e300::float8 as fbig, 1e-7::float8 as ftiny,
            'héllo ☃'::text as t, 'v'::varchar(10) as vc, 'ab'::char(4) as ch, 'x'::"char" as c1, 'n'::name as nm,
            true as yes, false as no,
            '2024-01-31'::date as d, 'infinity'::date as dinf, '-infinity'::date as dninf,
            '13:45:00'::time as tm, '13:45:00.5'::time as tmf, '13:45:00+02'::timetz as tz, '08:00:00-05:30'::timetz as tz2,
            '2024-01-31 13:45:00.123456'::timestamp as ts, '2024-01-31 13:45:00'::timestamp as ts0,
            '2024-01-31 13:45:00+02'::timestamptz as tstz, 'infinity'::timestamp as tsinf, '-infinity'::timestamptz as tstzninf,
            '1 year 2 months 3 days 04:05:06.5'::interval as iv, '-3 days'::interval as ivneg, '0'::interval as ivzero,
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid as u,
            '{"a": 1.10, "b": [true, null], "c": "x"}'::json as js, '{"b": 2, "a": 1.10}'::jsonb as jsb,
            '\xdeadbeef'::bytea as bytes, ''::bytea as empty,
            ARRAY[1, NULL, 3]::int4[] as ints, ARRAY[[1, 2], [3, 4]] as matrix, '{}'::int4[] as none,
            ARRAY['2024-01-01'::date, 'infinity'] as dates, ARRAY[1.50, 'NaN']::numeric[] as nums,
            ARRAY['{"k": 1}'::jsonb] as docs, ARRAY['happy'::mood, 'sad'] as moods,
            'happy'::mood as feeling, 7::positive as pos,
            NULL::int4 as nothing, NULL::text as nothing_text, NULL::int4[] as nothing_array"#,
    );
    // Parsed from text so that numbers keep every digit, as on the wire.
    let expected: Value = serde_json::from_str(
        r#"{
        "i2": 1, "i4": -2, "i8": 9223372036854775807, "oid": 26,
        "big": 123456789012345678901234567890.123456789, "money": 12.50,
        "small": -0.001, "nnan": "NaN", "ninf": "Infinity",
        "f4": 1.5, "f8": 0.1, "fnan": "NaN", "fninf": "-Infinity",
        "fbig": 1e300, "ftiny": 1e-7,
        "t": "héllo ☃", "vc": "v", "ch": "ab  ", "c1": "x", "nm": "n",
        "yes": true, "no": false,
        "d": "2024-01-31", "dinf": "infinity", "dninf": "-infinity",
        "tm": "13:45:00", "tmf": "13:45:00.500000", "tz": "13:45:00+02:00", "tz2": "08:00:00-05:30",
        "ts": "2024-01-31T13:45:00.123456", "ts0": "2024-01-31T13:45:00",
        "tstz": "2024-01-31T11:45:00Z", "tsinf": "infinity", "tstzninf": "-infinity",
        "iv": "P1Y2M3DT4H5M6.5S", "ivneg": "P-3D", "ivzero": "PT0S",
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "js": {"a": 1.10, "b": [true, null], "c": "x"}, "jsb": {"a": 1.10, "b": 2},
        "bytes": "3q2+7w==", "empty": "",
        "ints": [1, null, 3], "matrix": [[1, 2], [3, 4]], "none": [],
        "dates": ["2024-01-01", "infinity"], "nums": [1.50, "NaN"],
        "docs": [{"k": 1}], "moods": ["happy", "sad"],
        "feeling": "happy", "pos": 7,
        "nothing": null, "nothing_text": null, "nothing_array": null
    }"#,
    )
    .unwrap();
    for (column, want) in expected.as_object().unwrap() {
        assert_eq!(got.get(column), Some(want), "column {column}");
    }
    // Numbers keep their exact digits and scale on the wire.
    assert_eq!(got["big"].to_string(), "123456789012345678901234567890.123456789");
    assert_eq!(got["money"].to_string(), "12.50");
    assert_eq!(got["js"].to_string(), r#"{"a":1.10,"b":[true,null],"c":"x"}"#);
    assert_eq!(got.len(), expected.as_object().unwrap().len());

    // Table columns of domain, enum and array types.
    let typed = row(&db, "select * from typed");
    assert_eq!(Value::Object(typed), json!({"id": 5, "feeling": "happy", "tags": ["a", null, "c"]}));
}

#[test]
fn a_type_without_a_rule_is_named_with_its_column() {
    let Some(db) = TestDatabase::create() else { return };
    let err = stream(&db.url, "select 1 as id, point(1, 2) as spot").err().unwrap();
    assert!(matches!(err, SourceError::UnsupportedType { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("`spot`") && text.to_lowercase().contains("point") && text.contains("cast"), "{text}");
}

#[test]
fn rows_stream_in_order_and_a_stopping_consumer_ends_the_query() {
    let Some(db) = TestDatabase::create() else { return };
    let out = stream(&db.url, "select g as id, 'n' || g as name from generate_series(1, 5000) g").unwrap();
    assert_eq!(out.columns, ["id", "name"]);
    assert_eq!(out.rows.len(), 5000);
    assert!(out.rows.iter().enumerate().all(|(i, r)| r[0] == json!(i + 1)));

    // A consumer that stops early stops a huge query without reading it all.
    let mut early = Collect { stop_after: Some(10), ..Collect::default() };
    let source = PostgresSource::open(&db.url, None, None, None).unwrap();
    let started = std::time::Instant::now();
    let err = source.stream("select g from generate_series(1, 20000000) g", &mut early).unwrap_err();
    assert!(matches!(err, SourceError::Consumer(ref m) if m == "enough"), "{err:?}");
    assert_eq!(early.rows.len(), 10);
    assert!(started.elapsed() < Duration::from_secs(30), "the query was read to the end");

    // No rows: the columns still arrive.
    let empty = stream(&db.url, "select 1 as a, 'x' as b where false").unwrap();
    assert_eq!((empty.columns.len(), empty.rows.len()), (2, 0));
}

#[test]
fn connection_failures_say_what_failed_and_how_to_fix_it() {
    let Some(db) = TestDatabase::create() else { return };
    let secret = "s3cret-pw";
    let text = |r: Result<Collect, SourceError>| {
        let e = r.err().expect("an error").to_string();
        assert!(!e.contains(secret), "the password leaked: {e}");
        e
    };

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let unreachable = text(stream(&format!("postgres://bob:{secret}@127.0.0.1:{closed}/x"), "select 1"));
    assert!(unreachable.contains("cannot connect") && unreachable.contains("is the server running"), "{unreachable}");

    let refusing = RefusingPostgres::start("28P01", "password authentication failed for user \"bob\"");
    let wrong = text(stream(&format!("postgres://bob:{secret}@127.0.0.1:{}/x", refusing.port), "select 1"));
    assert!(
        wrong.contains("password authentication failed") && wrong.contains("check the user and password"),
        "{wrong}"
    );

    let server = db.url.rsplit_once('/').unwrap().0.to_string();
    let no_role = text(stream(&server.replace("postgres@", &format!("nobody_here:{secret}@")), "select 1"));
    assert!(no_role.contains("nobody_here") && no_role.contains("check the user"), "{no_role}");

    let no_db = text(stream(&format!("{server}/no_such_database_here"), "select 1"));
    assert!(no_db.contains("no_such_database_here") && no_db.contains("createdb"), "{no_db}");

    let bad_url = PostgresSource::open(&format!("postgres://bob:{secret}@127.0.0.1:notaport/x"), None, None, None);
    let bad_url = bad_url.err().unwrap().to_string();
    assert!(bad_url.contains("postgres://user:password@") && !bad_url.contains(secret), "{bad_url}");

    let bad_tls = PostgresSource::open(&db.url, Some("sometimes"), None, None).err().unwrap().to_string();
    assert!(bad_tls.contains("verify-full"), "{bad_tls}");
}

#[test]
fn query_failures_say_what_failed_and_how_to_fix_it() {
    let Some(db) = TestDatabase::create() else { return };
    let missing = stream(&db.url, "select * from no_such_table").err().unwrap().to_string();
    assert!(missing.contains("no_such_table") && missing.contains("fix the sync's `query`"), "{missing}");

    let syntax = stream(&db.url, "selec 1").err().unwrap().to_string();
    assert!(syntax.contains("syntax error"), "{syntax}");

    let twice = stream(&db.url, "select 1 as id, 2 as id").err().unwrap();
    assert!(matches!(twice, SourceError::DuplicateColumn(ref c) if c == "id"), "{twice:?}");

    let slow = PostgresSource::open(&db.url, None, None, Some(Duration::from_millis(200))).unwrap();
    let timeout = slow.stream("select 1 as x from pg_sleep(10)", &mut Collect::default()).err().unwrap().to_string();
    assert!(timeout.contains("query_timeout"), "{timeout}");

    // A failure in the middle of the rows (division by zero at row 3000).
    let mid = stream(&db.url, "select 1 / (3000 - g) as x from generate_series(1, 5000) g").err().unwrap().to_string();
    assert!(mid.contains("division by zero"), "{mid}");
}
