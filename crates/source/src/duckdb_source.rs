//! The embedded DuckDB warehouse: opened without network access (extensions
//! are never downloaded), queried with a streaming result.

use crate::{RowConsumer, SourceError, check_distinct, json};
use duckdb::{AccessMode, Config, Connection};
use std::path::Path;

/// A DuckDB connection to a database file or an in-memory database.
pub struct DuckDbSource {
    conn: Connection,
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
        Ok(DuckDbSource { conn })
    }

    /// The underlying connection (for tests and tools that prepare data).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Streams `query`'s rows to `consumer`, one Arrow batch at a time.
    pub fn stream(&self, query: &str, consumer: &mut dyn RowConsumer) -> Result<u64, SourceError> {
        let query_err = |e: duckdb::Error| SourceError::Query(e.to_string());
        let mut stmt = self.conn.prepare(query).map_err(query_err)?;
        let batches = stmt.stream_arrow([]).map_err(query_err)?;
        let schema = batches.get_schema();
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        check_distinct(&names)?;
        for field in schema.fields() {
            json::check_supported(field.name(), field.data_type())?;
        }
        consumer.columns(&names).map_err(SourceError::Consumer)?;
        let mut count = 0u64;
        for batch in batches {
            let batch = batch.map_err(query_err)?;
            let columns = batch.columns();
            for row in 0..batch.num_rows() {
                let mut values = Vec::with_capacity(columns.len());
                for (column, name) in columns.iter().zip(&names) {
                    values.push(
                        json::cell(column.as_ref(), row)
                            .map_err(|t| SourceError::UnsupportedType { column: name.clone(), type_name: t })?,
                    );
                }
                consumer.row(values).map_err(SourceError::Consumer)?;
                count += 1;
            }
        }
        Ok(count)
    }
}
