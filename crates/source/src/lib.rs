//! Warehouses: run a sync's query and stream its rows, each value already in
//! its JSON form (the type rules live in [`json`]). The source never sees HTTP.
#![deny(missing_docs)]

mod duckdb_source;
pub mod json;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub use duckdb_source::DuckDbSource;

/// A warehouse as named in the project file.
///
/// ```yaml
/// warehouses:
///   demo:
///     type: duckdb
///     path: warehouse.duckdb   # omit for an in-memory database
///     init: |                  # optional SQL run when the connection opens
///       create view customers as select * from read_csv('syncs/data/customers.csv');
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
#[non_exhaustive]
pub enum WarehouseConfig {
    /// An embedded DuckDB database.
    Duckdb {
        /// Database file, relative to the project directory. Omitted (or
        /// `:memory:`): a fresh in-memory database.
        #[serde(default)]
        path: Option<String>,
        /// SQL statements run once when the connection opens, e.g. views over
        /// CSV or Parquet files shipped with the project.
        #[serde(default)]
        init: Option<String>,
    },
}

/// Why a query could not be streamed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The warehouse could not be opened.
    #[error("cannot open DuckDB warehouse {path}: {message}")]
    Open {
        /// The database file, or `:memory:`.
        path: String,
        /// DuckDB's explanation.
        message: String,
    },
    /// The `init` SQL failed.
    #[error("the warehouse's init SQL failed: {0}")]
    Init(String),
    /// The query failed to prepare or run.
    #[error("the query failed: {0}")]
    Query(String),
    /// The query returns two columns with the same name.
    #[error(
        "the query returns the column `{0}` twice; give each column a distinct name (e.g. `select a.id as account_id, u.id as user_id`)"
    )]
    DuplicateColumn(String),
    /// A column's type has no JSON rule.
    #[error(
        "column `{column}` has type {type_name}, which Backflow cannot send as JSON; cast it in the query (e.g. `{column}::VARCHAR`)"
    )]
    UnsupportedType {
        /// The column.
        column: String,
        /// The warehouse's name for its type.
        type_name: String,
    },
    /// The row consumer stopped the stream.
    #[error("{0}")]
    Consumer(String),
}

/// What a stream hands its consumer: first the column names, then each row.
pub trait RowConsumer {
    /// Called once, before any row, with the query's column names.
    fn columns(&mut self, names: &[String]) -> Result<(), String>;
    /// Called for each row, values in column order.
    fn row(&mut self, values: Vec<Value>) -> Result<(), String>;
}

/// A connected warehouse.
pub enum Warehouse {
    /// Embedded DuckDB.
    DuckDb(DuckDbSource),
}

impl Warehouse {
    /// Opens the warehouse; relative paths resolve against `project_dir`.
    pub fn open(config: &WarehouseConfig, project_dir: &Path) -> Result<Warehouse, SourceError> {
        match config {
            WarehouseConfig::Duckdb { path, init } => {
                let file = path.as_deref().filter(|p| *p != ":memory:").map(|p| resolve(project_dir, p));
                Ok(Warehouse::DuckDb(DuckDbSource::open(file.as_deref(), init.as_deref(), project_dir)?))
            }
        }
    }

    /// Runs `query` and streams its rows to `consumer`; returns the row count.
    /// Rows are never all held in memory.
    pub fn stream(&self, query: &str, consumer: &mut dyn RowConsumer) -> Result<u64, SourceError> {
        match self {
            Warehouse::DuckDb(source) => source.stream(query, consumer),
        }
    }
}

fn resolve(dir: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() { p.to_path_buf() } else { dir.join(p) }
}

/// Fails when a name appears twice.
fn check_distinct(names: &[String]) -> Result<(), SourceError> {
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(SourceError::DuplicateColumn(name.clone()));
        }
    }
    Ok(())
}
