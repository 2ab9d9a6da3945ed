//! Every DuckDB column type becomes JSON by the documented rule.

use backflow_source::{RowConsumer, SourceError, Warehouse, WarehouseConfig, json};
use serde_json::{Value, json};

#[derive(Default)]
struct Collect {
    columns: Vec<String>,
    rows: Vec<Vec<Value>>,
}

impl RowConsumer for Collect {
    fn columns(&mut self, names: &[String]) -> Result<(), String> {
        self.columns = names.to_vec();
        Ok(())
    }
    fn row(&mut self, values: Vec<Value>) -> Result<(), String> {
        self.rows.push(values);
        Ok(())
    }
}

fn memory() -> Warehouse {
    let config = WarehouseConfig::Duckdb { path: None, init: None };
    Warehouse::open(&config, std::path::Path::new(".")).unwrap()
}

/// The JSON text of the single value `sql_expr`.
fn json_of(sql_expr: &str) -> String {
    let mut c = Collect::default();
    memory().stream(&format!("select {sql_expr} as v"), &mut c).unwrap();
    assert_eq!(c.rows.len(), 1);
    serde_json::to_string(&c.rows[0][0]).unwrap()
}

#[test]
fn integers_keep_every_digit() {
    assert_eq!(json_of("42::TINYINT"), "42");
    assert_eq!(json_of("(-32768)::SMALLINT"), "-32768");
    assert_eq!(json_of("2147483647::INTEGER"), "2147483647");
    assert_eq!(json_of("9223372036854775807::BIGINT"), "9223372036854775807");
    assert_eq!(json_of("255::UTINYINT"), "255");
    assert_eq!(json_of("18446744073709551615::UBIGINT"), "18446744073709551615");
    assert_eq!(json_of("170141183460469231731687303715884105727::HUGEINT"), "170141183460469231731687303715884105727");
    assert_eq!(
        json_of("(-170141183460469231731687303715884105727)::HUGEINT"),
        "-170141183460469231731687303715884105727"
    );
}

#[test]
fn every_integer_type_is_exact_at_both_ends() {
    for (ty, low, high) in [
        ("TINYINT", "-128", "127"),
        ("SMALLINT", "-32768", "32767"),
        ("INTEGER", "-2147483648", "2147483647"),
        ("BIGINT", "-9223372036854775808", "9223372036854775807"),
        ("HUGEINT", "-170141183460469231731687303715884105728", "170141183460469231731687303715884105727"),
        ("UTINYINT", "0", "255"),
        ("USMALLINT", "0", "65535"),
        ("UINTEGER", "0", "4294967295"),
        ("UBIGINT", "0", "18446744073709551615"),
        ("UHUGEINT", "0", "340282366920938463463374607431768211455"),
    ] {
        for value in [low, high] {
            assert_eq!(json_of(&format!("'{value}'::{ty}")), value, "{ty}");
        }
    }
    // Just past the signed range, where a signed reading turns negative.
    assert_eq!(
        json_of("'170141183460469231731687303715884105728'::UHUGEINT"),
        "170141183460469231731687303715884105728"
    );
    // Beside other columns, and NULL.
    let mut c = Collect::default();
    memory().stream("select 1::HUGEINT as h, NULL::UHUGEINT as n, (~0::UHUGEINT) as u", &mut c).unwrap();
    assert_eq!(serde_json::to_string(&c.rows[0]).unwrap(), "[1,null,340282366920938463463374607431768211455]");
    // A query ending in a comment.
    let mut c = Collect::default();
    memory().stream("select (~0::UHUGEINT) as u; -- the largest", &mut c).unwrap();
    assert_eq!(serde_json::to_string(&c.rows[0]).unwrap(), "[340282366920938463463374607431768211455]");
}

#[test]
fn decimals_keep_their_scale_and_precision() {
    assert_eq!(json_of("12.50::DECIMAL(10,2)"), "12.50");
    assert_eq!(json_of("(-0.001)::DECIMAL(4,3)"), "-0.001");
    assert_eq!(
        json_of("12345678901234567890.123456789012345678::DECIMAL(38,18)"),
        "12345678901234567890.123456789012345678"
    );
    assert_eq!(json_of("7::DECIMAL(18,0)"), "7");
}

#[test]
fn floats_are_shortest_and_non_finite_values_are_named() {
    assert_eq!(json_of("0.1::FLOAT"), "0.1");
    assert_eq!(json_of("0.1::DOUBLE"), "0.1");
    assert_eq!(json_of("1e300::DOUBLE"), serde_json::to_string(&json!(1e300)).unwrap());
    assert_eq!(json_of("'nan'::DOUBLE"), r#""NaN""#);
    assert_eq!(json_of("'inf'::DOUBLE"), r#""Infinity""#);
    assert_eq!(json_of("'-inf'::FLOAT"), r#""-Infinity""#);
}

#[test]
fn text_like_types_are_strings() {
    assert_eq!(json_of("'héllo \"q\"'::VARCHAR"), r#""héllo \"q\"""#);
    assert_eq!(json_of("true"), "true");
    assert_eq!(json_of("'6f1d2c3a-8b4e-4f6a-9d1c-5e7b3a2f8c91'::UUID"), r#""6f1d2c3a-8b4e-4f6a-9d1c-5e7b3a2f8c91""#);
    assert_eq!(json_of("'\\xDE\\xAD'::BLOB"), r#""3q0=""#);
    assert_eq!(json_of("'101'::BIT::VARCHAR"), r#""101""#);
    assert_eq!(json_of("1.5e-7::DOUBLE"), "1.5e-7");
    let mut c = Collect::default();
    memory().stream("select 'sad'::ENUM('sad', 'ok', 'happy') as mood", &mut c).unwrap();
    assert_eq!(c.rows[0][0], json!("sad"));
}

#[test]
fn dates_and_times_are_iso_8601() {
    assert_eq!(json_of("DATE '2024-01-31'"), r#""2024-01-31""#);
    assert_eq!(json_of("TIME '13:45:00'"), r#""13:45:00""#);
    assert_eq!(json_of("TIME '13:45:00.25'"), r#""13:45:00.250000""#);
    assert_eq!(json_of("TIMESTAMP '2024-01-31 13:45:00'"), r#""2024-01-31T13:45:00""#);
    assert_eq!(json_of("TIMESTAMP '2024-01-31 13:45:00.123456'"), r#""2024-01-31T13:45:00.123456""#);
    assert_eq!(json_of("'2024-01-31 13:45:00'::TIMESTAMP_S"), r#""2024-01-31T13:45:00""#);
    assert_eq!(json_of("'2024-01-31 13:45:00.5'::TIMESTAMP_MS"), r#""2024-01-31T13:45:00.500""#);
    assert_eq!(json_of("'2024-01-31 13:45:00.000000001'::TIMESTAMP_NS"), r#""2024-01-31T13:45:00.000000001""#);
    assert_eq!(json_of("'2024-01-31 13:45:00+02'::TIMESTAMPTZ"), r#""2024-01-31T11:45:00Z""#);
    assert_eq!(json_of("'infinity'::DATE"), r#""infinity""#);
    assert_eq!(json_of("'-infinity'::TIMESTAMP"), r#""-infinity""#);
    assert_eq!(json_of("INTERVAL '1 year 2 months 3 days 04:05:06.5'"), r#""P1Y2M3DT4H5M6.5S""#);
    assert_eq!(json_of("INTERVAL '0 seconds'"), r#""PT0S""#);
}

#[test]
fn nested_types_become_arrays_and_objects() {
    assert_eq!(json_of("[1, 2, NULL]"), "[1,2,null]");
    assert_eq!(json_of("[1, 2, 3]::INTEGER[3]"), "[1,2,3]");
    assert_eq!(json_of("{'b': 1, 'a': [true]}"), r#"{"b":1,"a":[true]}"#);
    assert_eq!(json_of("MAP {'k': 1.5::DECIMAL(3,1)}"), r#"{"k":1.5}"#);
    assert_eq!(json_of("MAP {2: 'two'}"), r#"{"2":"two"}"#);
    assert_eq!(json_of("[{'x': DATE '2024-01-01'}]"), r#"[{"x":"2024-01-01"}]"#);
    assert_eq!(json_of("union_value(num := 2)::UNION(num INTEGER, str VARCHAR)"), "2");
    assert_eq!(json_of("NULL"), "null");
    assert_eq!(json_of("NULL::INTEGER[]"), "null");
}

/// Compares, cell by cell, the JSON text written straight from a batch
/// (the staging path) with the serialized JSON value.
struct SameText(u64);

impl RowConsumer for SameText {
    fn columns(&mut self, _: &[String]) -> Result<(), String> {
        Ok(())
    }
    fn row(&mut self, _: Vec<Value>) -> Result<(), String> {
        unreachable!("DuckDB hands over batches")
    }
    fn batch(&mut self, batch: &backflow_source::RecordBatch) -> Result<(), String> {
        for (column, field) in batch.columns().iter().zip(batch.schema().fields()) {
            for i in 0..batch.num_rows() {
                let mut written = Vec::new();
                json::write_cell(column.as_ref(), i, &mut written)?;
                let value = json::cell(column.as_ref(), i)?;
                assert_eq!(String::from_utf8(written).unwrap(), value.to_string(), "column {}", field.name());
                self.0 += 1;
            }
        }
        Ok(())
    }
}

#[test]
fn json_written_from_batches_is_the_json_of_the_values() {
    let mut c = SameText(0);
    memory().stream("select * from test_all_types()", &mut c).unwrap();
    memory()
        .stream(
            r#"select * from (values
                 (12.50::decimal(10, 2), -0.05::decimal(4, 2), 7::decimal(18, 0), 123456789012345678901234567.1::decimal(38, 1),
                  'quote " backslash \ newline
 tab	 é ☃ 🦆', date '2024-01-31', 'infinity'::date, '-infinity'::date, true, (-128)::tinyint, 18446744073709551615::ubigint),
                 (null, null, null, null, null, null, null, null, null, null, null))"#,
            &mut c,
        )
        .unwrap();
    assert!(c.0 > 100, "{} cells compared", c.0);
}

#[test]
fn every_type_of_test_all_types_streams() {
    let mut c = Collect::default();
    let n = memory().stream("select * from test_all_types()", &mut c).unwrap();
    assert_eq!(n, 3);
    assert!(c.columns.len() > 40, "{:?}", c.columns);
    let nulls = &c.rows[2];
    assert!(nulls.iter().all(Value::is_null), "the third row is all NULL: {nulls:?}");
}

#[test]
fn rows_stream_in_batches_without_materializing() {
    struct Count(u64);
    impl RowConsumer for Count {
        fn columns(&mut self, _: &[String]) -> Result<(), String> {
            Ok(())
        }
        fn row(&mut self, _: Vec<Value>) -> Result<(), String> {
            self.0 += 1;
            Ok(())
        }
    }
    let mut c = Count(0);
    assert_eq!(memory().stream("select range as id from range(100000)", &mut c).unwrap(), 100_000);
    assert_eq!(c.0, 100_000);
}

#[test]
fn bad_queries_and_files_are_clear_errors() {
    let mut c = Collect::default();
    let err = memory().stream("select a, a from (select 1 as a)", &mut c).unwrap_err();
    assert!(matches!(err, SourceError::DuplicateColumn(ref n) if n == "a"), "{err}");
    let err = memory().stream("select * from nowhere", &mut c).unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");
    let missing = WarehouseConfig::Duckdb { path: Some("no/such.duckdb".into()), init: None };
    let err = Warehouse::open(&missing, std::path::Path::new("/tmp")).err().unwrap();
    assert!(err.to_string().contains("no such file"), "{err}");
}

#[test]
fn queries_read_csv_files_relative_to_the_project() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("people.csv"), "id,name\n1,Ada\n2,Linus\n").unwrap();
    let config = WarehouseConfig::Duckdb {
        path: None,
        init: Some("create view people as select * from read_csv('people.csv')".into()),
    };
    let mut c = Collect::default();
    Warehouse::open(&config, dir.path()).unwrap().stream("select * from people order by id", &mut c).unwrap();
    assert_eq!(c.rows, [vec![json!(1), json!("Ada")], vec![json!(2), json!("Linus")]]);
}
