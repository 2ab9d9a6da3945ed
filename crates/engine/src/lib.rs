//! Orchestration: loads a project, and for a sync streams the query into the
//! state store, diffs, and delivers the outbox while committing acks. The
//! binary is a thin shell over [`Engine`].
#![deny(missing_docs)]

pub mod config;
mod in_warehouse;
mod run;
pub mod service;
mod stage;

pub use config::{Checked, ConfigError, ConfigErrors, Project, Sync};
pub use run::{CheckReport, FieldChange, InvalidKeyReport, Plan, RecordDiff, RunReport, TestSend};
pub use service::{ServeOptions, Service};

use backflow_core::env::Env;
use backflow_diff::{DiffError, KeyRecord, RunRecord, StateStore};
use std::path::Path;

/// Why a command could not do its work (exit code 2).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// The warehouse or query failed.
    #[error("sync `{sync}`: {source}")]
    Source {
        /// The sync.
        sync: String,
        /// What failed.
        source: backflow_source::SourceError,
    },
    /// The state store failed, or the sync is already running.
    #[error("{0}")]
    State(#[from] DiffError),
    /// The destination could not be set up.
    #[error("sync `{sync}`: {source}")]
    Sink {
        /// The sync.
        sync: String,
        /// What failed.
        source: backflow_sink::SinkError,
    },
    /// Rows with NULL or duplicate keys, under the `fail` policy.
    #[error("sync `{sync}`: {message}")]
    InvalidKeys {
        /// The sync.
        sync: String,
        /// Counts and examples.
        message: String,
    },
    /// A key given on the command line cannot be read.
    #[error("{0}")]
    Usage(String),
}

/// Something that shows how far a long operation is.
pub trait Progress {
    /// A phase begins (e.g. "reading", "sending"), with its size if known.
    fn phase(&self, _sync: &str, _phase: &str, _total: Option<u64>) {}
    /// `n` more units of the phase are done.
    fn advance(&self, _n: u64) {}
    /// The phase is over.
    fn done(&self) {}
}

/// Shows nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// A loaded project and the environment its `${VAR}` references read.
pub struct Engine {
    /// The project.
    pub project: Project,
    /// Variables for `${VAR}`.
    pub env: Env,
    /// What validation checked (every command uses it).
    checked: config::Checked,
    /// Fired by [`Engine::stop`]: runs in flight drain.
    stopping: tokio_util::sync::CancellationToken,
    /// Fired by [`Engine::abort`]: runs in flight cancel their requests.
    aborting: tokio_util::sync::CancellationToken,
    /// Told about the requests of every run (metrics).
    observer: Option<std::sync::Arc<dyn Observe>>,
}

/// Watches what runs do, for metrics: it hands each run's sender an
/// observer of its requests.
pub trait Observe: Send + std::marker::Sync {
    /// The observer of `sync`'s requests.
    fn requests(&self, sync: &str) -> std::sync::Arc<dyn backflow_sink::Observer>;
}

/// A sync's recent runs, or why they cannot be read.
#[derive(Debug, serde::Serialize)]
pub struct SyncHistory {
    /// The sync.
    pub sync: String,
    /// Newest first.
    pub runs: Vec<RunRecord>,
    /// Set when the state is held by a running process.
    pub running: bool,
}

impl Engine {
    /// Loads and validates the project in `dir`.
    pub fn load(dir: &Path, env: Env) -> Result<Engine, EngineError> {
        let project = Project::load(dir, &env)?;
        let checked = project.validate(&env)?;
        Ok(Engine { project, env, checked, stopping: Default::default(), aborting: Default::default(), observer: None })
    }

    /// This engine, stopping (see [`Engine::stop`] and [`Engine::abort`])
    /// when the given tokens fire: engines reloaded by a service share its
    /// tokens.
    pub fn stopping_on(
        mut self,
        stop: tokio_util::sync::CancellationToken,
        abort: tokio_util::sync::CancellationToken,
    ) -> Engine {
        self.stopping = stop;
        self.aborting = abort;
        self
    }

    /// This engine, telling `observer` about the requests of every run.
    pub fn observed_by(mut self, observer: std::sync::Arc<dyn Observe>) -> Engine {
        self.observer = Some(observer);
        self
    }

    /// Ends runs in flight at once: their requests are cancelled (those
    /// records stay unconfirmed and are sent again, with the same ids, by
    /// the next run), acknowledgements received are committed, and the run
    /// ends `partial`. For a drain that took too long.
    pub fn abort(&self) {
        self.stopping.cancel();
        self.aborting.cancel();
    }

    /// Stops delivery gracefully: runs in flight start no more requests,
    /// those in flight end as they would, their acknowledgements are
    /// committed and the rest stays pending (the run ends `partial`). Runs
    /// started later stop at once the same way.
    pub fn stop(&self) {
        self.stopping.cancel();
    }

    /// Whether [`Engine::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    fn store(&self, sync: &str) -> Result<StateStore, EngineError> {
        Ok(StateStore::open(&self.project.state_dir(), sync, &self.project.file.state.memory_limit)?)
    }

    /// Forgets everything delivered for `sync`; returns how many keys were
    /// forgotten. The next run sends every row as added (mirror mode sends no
    /// deletes for keys it no longer knows).
    pub fn reset(&self, sync: &str) -> Result<u64, EngineError> {
        self.project.sync(sync)?;
        Ok(self.store(sync)?.reset()?)
    }

    /// Recent runs of the given syncs (all when empty).
    pub fn history(&self, syncs: &[String], limit: usize) -> Result<Vec<SyncHistory>, EngineError> {
        let mut out = Vec::new();
        for sync in &self.project.syncs {
            if !syncs.is_empty() && !syncs.contains(&sync.name) {
                continue;
            }
            if !StateStore::path(&self.project.state_dir(), &sync.name).exists() {
                out.push(SyncHistory { sync: sync.name.clone(), runs: vec![], running: false });
                continue;
            }
            match self.store(&sync.name) {
                Ok(store) => {
                    out.push(SyncHistory { sync: sync.name.clone(), runs: store.runs(limit)?, running: false })
                }
                Err(EngineError::State(e)) if e.is_busy() => {
                    out.push(SyncHistory { sync: sync.name.clone(), runs: vec![], running: true })
                }
                Err(e) => return Err(e),
            }
        }
        for name in syncs {
            self.project.sync(name)?;
        }
        Ok(out)
    }

    /// The rejections recorded for a run of `sync`.
    pub fn rejections(&self, sync: &str, run_id: &str) -> Result<Vec<backflow_diff::Rejection>, EngineError> {
        Ok(self.store(sync)?.rejections(run_id)?)
    }

    /// What the state knows about one key of `sync`. `key` is a JSON object
    /// (`{"account_id":1,"user_id":2}`), `col=value` pairs separated by
    /// commas, or for a one-column key just the value.
    pub fn inspect(&self, sync: &str, key: &str) -> Result<KeyRecord, EngineError> {
        let columns = self.project.sync(sync)?.key_columns();
        let candidates = key_candidates(&columns, key)?;
        let store = self.store(sync)?;
        let mut first = None;
        for text in candidates {
            let record = store.lookup(&text)?;
            if record.delivered.is_some() || record.last_rejection.is_some() {
                return Ok(record);
            }
            first.get_or_insert(record);
        }
        Ok(first.expect("at least one candidate"))
    }
}

/// Canonical key texts that `given` may mean (a value that reads as a number
/// may be a number or a string key).
fn key_candidates(columns: &[String], given: &str) -> Result<Vec<String>, EngineError> {
    use serde_json::{Map, Value};
    let values: Vec<Vec<Value>> = if let Ok(Value::Object(o)) = serde_json::from_str::<Value>(given) {
        let mut row = Vec::new();
        for c in columns {
            row.push(vec![o.get(c).cloned().ok_or_else(|| {
                EngineError::Usage(format!("key {given} has no value for primary-key column `{c}`"))
            })?]);
        }
        row
    } else {
        let parts: Vec<(String, String)> = if columns.len() == 1 && !given.contains('=') {
            vec![(columns[0].clone(), given.to_string())]
        } else {
            given
                .split(',')
                .map(|p| p.split_once('=').map(|(a, b)| (a.trim().to_string(), b.trim().to_string())))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    EngineError::Usage(format!(
                        "cannot read key `{given}`: write `{}` or a JSON object",
                        columns.iter().map(|c| format!("{c}=VALUE")).collect::<Vec<_>>().join(",")
                    ))
                })?
        };
        let mut row = Vec::new();
        for c in columns {
            let raw = parts.iter().find(|(k, _)| k == c).map(|(_, v)| v).ok_or_else(|| {
                EngineError::Usage(format!("key `{given}` has no value for primary-key column `{c}`"))
            })?;
            let mut options = vec![Value::String(raw.clone())];
            if let Ok(v @ (Value::Number(_) | Value::Bool(_))) = serde_json::from_str::<Value>(raw) {
                options.insert(0, v);
            }
            row.push(options);
        }
        row
    };
    let mut texts = vec![Map::new()];
    for (c, options) in columns.iter().zip(values) {
        texts = texts
            .into_iter()
            .flat_map(|m| {
                options.iter().map(move |v| {
                    let mut m = m.clone();
                    m.insert(c.clone(), v.clone());
                    m
                })
            })
            .collect();
    }
    Ok(texts.into_iter().map(|m| Value::Object(m).to_string()).collect())
}
