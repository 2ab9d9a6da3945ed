//! The embedded DuckDB warehouse: opened without network access (extensions
//! are never downloaded), queried with a streaming result.

use crate::{Message, Outbox, RowConsumer, SourceError, check_distinct, json};
use duckdb::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use duckdb::{AccessMode, Config, Connection};
use std::path::Path;
use std::sync::Mutex;

/// Result batches the query may run ahead of its consumer.
const AHEAD: usize = 8;

/// A DuckDB connection to a database file or an in-memory database.
pub struct DuckDbSource {
    /// Locked by the thread that runs a query (the connection is `Send`,
    /// not `Sync`).
    conn: Mutex<Connection>,
}

impl DuckDbSource {
    /// Opens `file` read-only (or a fresh in-memory database when `None`),
    /// resolves relative file paths in queries against `project_dir`, and runs
    /// `init`.
    pub fn open(file: Option<&Path>, init: Option<&str>, project_dir: &Path) -> Result<DuckDbSource, SourceError> {
        let shown = file.map_or(":memory:".to_string(), |f| f.display().to_string());
        let open_err = |e: duckdb::Error| SourceError::Open { path: shown.clone(), message: e.to_string() };
        let mut config = Config::default().with("autoinstall_known_extensions", "false").map_err(open_err)?;
        if file.is_some() {
            config = config.access_mode(AccessMode::ReadOnly).map_err(open_err)?;
        }
        let conn = match file {
            Some(f) if !f.exists() => {
                return Err(SourceError::Open {
                    path: shown,
                    message: "no such file (check `path` under the warehouse in backflow.yaml)".into(),
                });
            }
            Some(f) => Connection::open_with_flags(f, config),
            None => Connection::open_in_memory_with_flags(config),
        }
        .map_err(open_err)?;
        let search = project_dir.display().to_string().replace('\'', "''");
        conn.execute_batch(&format!("SET file_search_path = '{search}'")).map_err(open_err)?;
        if let Some(sql) = init {
            conn.execute_batch(sql).map_err(|e| SourceError::Init(e.to_string()))?;
        }
        Ok(DuckDbSource { conn: Mutex::new(conn) })
    }

    /// Streams `query`'s rows to `consumer`, one Arrow batch at a time. The
    /// query runs on its own thread, a few batches ahead of the consumer,
    /// so DuckDB's work overlaps the consumer's.
    pub fn stream(&self, query: &str, consumer: &mut dyn RowConsumer) -> Result<u64, SourceError> {
        let conn = &self.conn;
        crate::stream_from_thread(AHEAD, consumer, move |tx| {
            let conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            produce(&conn, query, tx)
        })
    }
}

/// Runs `query` and sends its column names, then its batches. Returns
/// early (quietly) when the consumer has gone.
fn produce(conn: &Connection, query: &str, tx: &Outbox) -> Result<(), SourceError> {
    let query_err = |e: duckdb::Error| SourceError::Query(e.to_string());
    // Asked before the query runs: the connection serves one statement at
    // a time.
    let types = column_types(conn, query);
    let mut stmt = conn.prepare(query).map_err(query_err)?;
    let batches = stmt.stream_arrow([]).map_err(query_err)?;
    let schema = marked(&types, batches.get_schema());
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    check_distinct(&names)?;
    for field in schema.fields() {
        json::check_supported(field.name(), field.data_type())?;
    }
    if tx.send(Ok(Message::Columns(names))).is_err() {
        return Ok(());
    }
    for batch in batches {
        let batch =
            batch.map_err(query_err)?.with_schema(schema.clone()).map_err(|e| SourceError::Query(e.to_string()))?;
        if tx.send(Ok(Message::Batch(batch))).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// The DuckDB type names of the query's columns (none when DuckDB cannot
/// describe it; the query itself then says why).
fn column_types(conn: &Connection, query: &str) -> Vec<String> {
    // On its own lines, so a trailing `-- comment` stays inside.
    conn.prepare(&format!("DESCRIBE SELECT * FROM (\n{}\n)", without_final_semicolon(query)))
        .and_then(|mut stmt| stmt.query_map([], |r| r.get::<_, String>(1))?.collect())
        .unwrap_or_default()
}

/// `query` without a final `;` (and the line comments after it).
fn without_final_semicolon(query: &str) -> &str {
    let query = query.trim_end();
    match query.rfind(';') {
        Some(at) if query[at + 1..].lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with("--")) => {
            &query[..at]
        }
        _ => query,
    }
}

/// `schema` with its UHUGEINT columns marked ([`json::UHUGEINT`]): Arrow
/// carries them as DECIMAL(38, 0) like HUGEINT; `types` are DuckDB's.
fn marked(types: &[String], schema: SchemaRef) -> SchemaRef {
    let wide = |f: &Field| matches!(f.data_type(), DataType::Decimal128(_, 0));
    if types.len() != schema.fields().len() || !types.iter().any(|t| t == "UHUGEINT") {
        return schema;
    }
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .zip(types)
        .map(|(f, t)| {
            let field = f.as_ref().clone();
            if wide(f) && *t == "UHUGEINT" {
                field.with_metadata(std::collections::HashMap::from([(json::UHUGEINT.to_string(), String::new())]))
            } else {
                field
            }
        })
        .collect();
    std::sync::Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}
