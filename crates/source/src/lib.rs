//! Warehouses: run a sync's query and stream its rows, each value already in
//! its JSON form (the type rules live in [`json`]). The source never sees HTTP.
#![deny(missing_docs)]

mod duckdb_source;
pub mod json;
mod postgres;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{SyncSender, sync_channel};

pub use duckdb::arrow::record_batch::RecordBatch;
pub use duckdb_source::DuckDbSource;
pub use postgres::{PostgresSource, redact_url};

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// A Postgres (or Postgres-compatible) server, queried over one
    /// connection per run with rows streamed as they arrive.
    ///
    /// ```yaml
    /// warehouses:
    ///   analytics:
    ///     type: postgres
    ///     url: ${DATABASE_URL}          # the default; libpq parameters such as sslmode work
    ///     ssl_mode: verify-full         # optional: disable, allow, prefer, require, verify-ca, verify-full
    ///     ssl_root_cert: certs/ca.pem   # optional, relative to the project directory
    ///     query_timeout: 10m            # optional: the server cancels a longer query
    /// ```
    Postgres {
        /// Connection URL, `postgres://user:password@host:5432/database`.
        /// `${VAR}` references are resolved from the environment; the
        /// default reads `DATABASE_URL`.
        #[serde(default = "default_postgres_url")]
        url: String,
        /// TLS mode, overriding the URL's `sslmode`.
        #[serde(default)]
        ssl_mode: Option<String>,
        /// CA certificate file for `verify-ca` / `verify-full`.
        #[serde(default)]
        ssl_root_cert: Option<String>,
        /// Longest a query may run (the session's `statement_timeout`).
        #[serde(default)]
        query_timeout: Option<backflow_core::duration::Duration>,
    },
}

fn default_postgres_url() -> String {
    "${DATABASE_URL}".into()
}

impl WarehouseConfig {
    /// The database file of a DuckDB warehouse that is just a file (no
    /// `init` SQL), resolved against `project_dir`: such a warehouse can be
    /// attached, read-only, to another DuckDB database.
    pub fn duckdb_file(&self, project_dir: &Path) -> Option<PathBuf> {
        match self {
            WarehouseConfig::Duckdb { path: Some(path), init: None } if path != ":memory:" => {
                Some(resolve(project_dir, path))
            }
            _ => None,
        }
    }

    /// The same warehouse with `${VAR}` references in its connection
    /// settings resolved by `expand` (which names the variable on failure).
    pub fn expanded<E>(&self, expand: impl Fn(&str) -> Result<String, E>) -> Result<WarehouseConfig, E> {
        Ok(match self {
            WarehouseConfig::Postgres { url, ssl_mode, ssl_root_cert, query_timeout } => WarehouseConfig::Postgres {
                url: expand(url)?,
                ssl_mode: ssl_mode.as_deref().map(&expand).transpose()?,
                ssl_root_cert: ssl_root_cert.as_deref().map(&expand).transpose()?,
                query_timeout: *query_timeout,
            },
            other => other.clone(),
        })
    }
}

/// Why a query could not be streamed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The warehouse could not be opened.
    #[error("cannot open warehouse {path}: {message}")]
    Open {
        /// The database file, `:memory:`, or the connection URL without its password.
        path: String,
        /// DuckDB's explanation.
        message: String,
    },
    /// The warehouse server could not be reached or refused the login.
    #[error("cannot connect to Postgres as {target}: {message}")]
    Connect {
        /// `user@host:port/database` (never the password).
        target: String,
        /// What went wrong and what would fix it.
        message: String,
    },
    /// A value could not be read.
    #[error("column `{column}`: cannot read a value: {reason}")]
    Value {
        /// The column.
        column: String,
        /// What was wrong with it.
        reason: String,
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
        "column `{column}` has type {type_name}, which Backflow cannot send as JSON; cast it in the query (e.g. `{column}::VARCHAR` in DuckDB, `{column}::text` or `to_jsonb({column})` in Postgres)"
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
    /// Called with each Arrow batch by a source that produces them (DuckDB),
    /// instead of [`RowConsumer::row`]; the default hands its rows to `row`.
    /// Consumers that can read columns directly ([`json::ColumnWriter`])
    /// override it.
    fn batch(&mut self, batch: &RecordBatch) -> Result<(), String> {
        for i in 0..batch.num_rows() {
            let values = batch
                .columns()
                .iter()
                .zip(batch.schema().fields())
                .map(|(column, field)| {
                    json::field_cell(field, column.as_ref(), i).map_err(|t| {
                        SourceError::UnsupportedType { column: field.name().clone(), type_name: t }.to_string()
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            self.row(values)?;
        }
        Ok(())
    }
}

/// A connected warehouse.
pub enum Warehouse {
    /// Embedded DuckDB.
    DuckDb(DuckDbSource),
    /// A Postgres server.
    Postgres(Box<PostgresSource>),
}

impl Warehouse {
    /// Opens the warehouse (a Postgres server is connected to when a query
    /// runs); relative paths resolve against `project_dir`. `config` must
    /// have its `${VAR}` references resolved ([`WarehouseConfig::expanded`]).
    pub fn open(config: &WarehouseConfig, project_dir: &Path) -> Result<Warehouse, SourceError> {
        match config {
            WarehouseConfig::Duckdb { path, init } => {
                let file = path.as_deref().filter(|p| *p != ":memory:").map(|p| resolve(project_dir, p));
                Ok(Warehouse::DuckDb(DuckDbSource::open(file.as_deref(), init.as_deref(), project_dir)?))
            }
            WarehouseConfig::Postgres { url, ssl_mode, ssl_root_cert, query_timeout } => {
                let cert = ssl_root_cert.as_deref().map(|c| resolve(project_dir, c));
                Ok(Warehouse::Postgres(Box::new(PostgresSource::open(
                    url,
                    ssl_mode.as_deref(),
                    cert.as_deref(),
                    query_timeout.map(|t| t.get()),
                )?)))
            }
        }
    }

    /// Runs `query` and streams its rows to `consumer`; returns the row count.
    /// Rows are never all held in memory.
    pub fn stream(&self, query: &str, consumer: &mut dyn RowConsumer) -> Result<u64, SourceError> {
        match self {
            Warehouse::DuckDb(source) => source.stream(query, consumer),
            Warehouse::Postgres(source) => source.stream(query, consumer),
        }
    }
}

/// What a source's producer thread hands the consumer.
enum Message {
    Columns(Vec<String>),
    Rows(Vec<Vec<Value>>),
    Batch(RecordBatch),
}

/// The sending end a producer thread writes to.
type Outbox = SyncSender<Result<Message, SourceError>>;

/// Runs `produce` on its own thread, at most `ahead` messages ahead of
/// `consumer`, and hands the consumer what it sends; returns the row count.
/// A producer's error is passed on; a producer whose consumer has gone
/// (its sends fail) should return quietly.
fn stream_from_thread(
    ahead: usize,
    consumer: &mut dyn RowConsumer,
    produce: impl FnOnce(&Outbox) -> Result<(), SourceError> + Send,
) -> Result<u64, SourceError> {
    let (tx, rx) = sync_channel(ahead);
    // Both ends move in: the receiver is dropped when this closure returns
    // (also early, when the consumer fails), which stops the producer before
    // the scope waits for it.
    std::thread::scope(move |scope| {
        scope.spawn(move || {
            if let Err(e) = produce(&tx) {
                let _ = tx.send(Err(e));
            }
        });
        let mut count = 0u64;
        for message in rx {
            match message? {
                Message::Columns(names) => consumer.columns(&names).map_err(SourceError::Consumer)?,
                Message::Rows(rows) => {
                    for row in rows {
                        consumer.row(row).map_err(SourceError::Consumer)?;
                        count += 1;
                    }
                }
                Message::Batch(batch) => {
                    consumer.batch(&batch).map_err(SourceError::Consumer)?;
                    count += batch.num_rows() as u64;
                }
            }
        }
        Ok(count)
    })
}

fn resolve(dir: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() { p.to_path_buf() } else { dir.join(p) }
}

/// Fails when a column name appears twice.
pub fn check_distinct(names: &[String]) -> Result<(), SourceError> {
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(SourceError::DuplicateColumn(name.clone()));
        }
    }
    Ok(())
}
