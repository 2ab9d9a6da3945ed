//! Reference measurements for `bench/scale.sh`, run in the same session as
//! Backflow's own figures so that the script can print ratios:
//!
//! - `diff DB_FILE OLD NEW`: the hand-written DuckDB diff of two tables
//!   keyed by `id` (full outer join on the key, comparing row hashes),
//!   materialising the changed rows;
//! - `pg-stream URL QUERY`: Backflow's Postgres source alone, streaming the
//!   query's rows (each turned into JSON values) into a consumer that counts
//!   them.
//!
//! - `sql DB_FILE SQL`: runs SQL against a DuckDB file (to build the data).
//!
//! Each measurement prints one JSON line.

use backflow_source::{PostgresSource, RowConsumer};

/// The allocator of the `backflow` binary, so the source is measured as it
/// runs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use serde_json::{Value, json};
use std::time::Instant;

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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["diff", file, old, new] => {
            let conn = duckdb::Connection::open(file).expect("open the warehouse file");
            let mut stmt = conn
                .prepare("SELECT column_name FROM duckdb_columns() WHERE table_name = ? AND column_name <> 'id'")
                .expect("columns");
            let columns: Vec<String> =
                stmt.query_map([old], |r| r.get(0)).expect("columns").collect::<Result<_, _>>().expect("columns");
            let started = Instant::now();
            let hashed = |t: &str| format!("SELECT id, hash({}) AS h FROM {t}", columns.join(", "));
            conn.execute_batch(&format!(
                "CREATE TEMP TABLE changes AS
                 SELECT coalesce(n.id, o.id) AS id,
                        CASE WHEN o.id IS NULL THEN 'added' WHEN n.id IS NULL THEN 'removed' ELSE 'changed' END AS change
                 FROM ({}) o FULL OUTER JOIN ({}) n ON o.id = n.id
                 WHERE o.id IS NULL OR n.id IS NULL OR o.h <> n.h",
                hashed(old),
                hashed(new)
            ))
            .expect("the reference diff");
            let changes: i64 = conn.query_row("SELECT count(*) FROM changes", [], |r| r.get(0)).expect("count");
            println!("{}", json!({"seconds": started.elapsed().as_secs_f64(), "changes": changes}));
        }
        ["sql", file, sql] => {
            duckdb::Connection::open(file).and_then(|c| c.execute_batch(sql)).expect("the SQL runs");
        }
        ["pg-stream", url, query] => {
            let source = PostgresSource::open(url, None, None, None).expect("a Postgres URL");
            let started = Instant::now();
            let mut count = Count(0);
            source.stream(query, &mut count).expect("the query streams");
            println!("{}", json!({"seconds": started.elapsed().as_secs_f64(), "rows": count.0}));
        }
        _ => {
            eprintln!("usage: bench_reference diff DB_FILE OLD NEW | pg-stream URL QUERY | sql DB_FILE SQL");
            std::process::exit(2);
        }
    }
}
