//! The project file (`backflow.yaml`) and sync files (`syncs/*.yaml`): raw
//! YAML → checked settings. Loading reads files; [`Project::validate`] is pure.

use backflow_core::env::{Env, references};
use backflow_core::{Duration, Mapping, Mode};
use backflow_sink::{Destination, DestinationConfig};
use backflow_source::WarehouseConfig;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The project file's name, in the project directory.
pub const PROJECT_FILE: &str = "backflow.yaml";

/// `backflow.yaml`: named warehouses and where state lives.
///
/// ```yaml
/// warehouses:
///   demo:
///     type: duckdb
///     path: warehouse.duckdb
/// state:
///   dir: .backflow/state
///   memory_limit: 1GB
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectFile {
    /// Warehouses by name; syncs refer to them with `warehouse:`.
    pub warehouses: IndexMap<String, WarehouseConfig>,
    /// Where state lives.
    #[serde(default)]
    pub state: StateConfig,
    /// Folder of sync files, relative to the project (default `syncs`).
    #[serde(default = "syncs_dir")]
    pub syncs_dir: String,
}

/// The embedded state store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Folder for the per-sync state files (default `.backflow/state`).
    #[serde(default = "state_dir")]
    pub dir: String,
    /// Memory the diff may use before it spills to disk (default `1GB`).
    #[serde(default = "memory_limit")]
    pub memory_limit: String,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig { dir: state_dir(), memory_limit: memory_limit() }
    }
}

fn syncs_dir() -> String {
    "syncs".into()
}
fn state_dir() -> String {
    ".backflow/state".into()
}
fn memory_limit() -> String {
    "1GB".into()
}

/// One sync file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncFile {
    /// The sync's name (letters, digits, `_`, `-`); defaults to the file name.
    #[serde(default)]
    pub name: Option<String>,
    /// A warehouse named in `backflow.yaml`.
    pub warehouse: String,
    /// The SQL query; may reference `${VAR}`.
    pub query: String,
    /// The primary-key column, or a list of columns.
    pub primary_key: PrimaryKey,
    /// `upsert`, `create`, `append`, `mirror` or `delete`.
    pub mode: Mode,
    /// Destination field ← source column; dotted names nest. Omitted: every
    /// column under its own name.
    #[serde(default)]
    pub mapping: IndexMap<String, String>,
    /// Fields added to every payload; string values may reference `${VAR}`.
    #[serde(default, rename = "static")]
    pub statics: IndexMap<String, Value>,
    /// What to do with rows whose key is NULL or duplicated: `fail` (default:
    /// the run stops before sending anything) or `skip` (they are left out
    /// and reported).
    #[serde(default)]
    pub invalid_keys: InvalidKeyPolicy,
    /// Where records go.
    pub destination: DestinationConfig,
    /// When `backflow serve` runs the sync.
    #[serde(default)]
    pub schedule: Option<Schedule>,
}

/// One column or several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PrimaryKey {
    /// A single column.
    One(String),
    /// A composite key.
    Many(Vec<String>),
}

impl PrimaryKey {
    /// The columns, in order.
    pub fn columns(&self) -> Vec<String> {
        match self {
            PrimaryKey::One(c) => vec![c.clone()],
            PrimaryKey::Many(cs) => cs.clone(),
        }
    }
}

/// Rows with NULL or duplicate keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InvalidKeyPolicy {
    /// Stop before sending anything.
    #[default]
    Fail,
    /// Leave them out and report them.
    Skip,
}

/// A schedule: a cron expression or a fixed interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Five-field cron expression, e.g. `*/15 * * * *`.
    #[serde(default)]
    pub cron: Option<String>,
    /// Interval, e.g. `15m`.
    #[serde(default)]
    pub every: Option<Duration>,
}

/// A loaded sync.
#[derive(Debug, Clone)]
pub struct Sync {
    /// Its name.
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    /// Its settings as written.
    pub spec: SyncFile,
}

impl Sync {
    /// The key of the metadata object in payloads, when metadata is on.
    pub fn meta_key(&self) -> Option<String> {
        self.spec.destination.metadata.then(|| self.spec.destination.metadata_key.clone())
    }

    /// The payload mapping.
    pub fn mapping(&self, env: &Env) -> Mapping {
        Mapping {
            fields: self.spec.mapping.clone(),
            statics: self.spec.statics.iter().map(|(k, v)| (k.clone(), expand_strings(v, env))).collect(),
        }
    }

    /// The primary-key columns.
    pub fn key_columns(&self) -> Vec<String> {
        self.spec.primary_key.columns()
    }
}

/// Expands `${VAR}` in the strings of a JSON value (missing ones stay as
/// written: validation reports them first).
fn expand_strings(v: &Value, env: &Env) -> Value {
    match v {
        Value::String(s) => Value::String(env.expand(s).unwrap_or_else(|_| s.clone())),
        Value::Array(a) => Value::Array(a.iter().map(|x| expand_strings(x, env)).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, x)| (k.clone(), expand_strings(x, env))).collect()),
        other => other.clone(),
    }
}

/// What [`Project::validate`] checked, for every command to use.
#[derive(Debug, Clone, Default)]
pub struct Checked {
    /// Each sync's destination, its `${VAR}` references resolved and its
    /// URLs, headers, signing secret and limits checked and parsed.
    pub destinations: std::collections::HashMap<String, Destination>,
    /// Each sync's sender: its HTTP client set up (proxy, TLS files read),
    /// its connections kept from one run to the next.
    pub senders: std::collections::HashMap<String, backflow_sink::Sender>,
}

/// A loaded project.
#[derive(Debug, Clone)]
pub struct Project {
    /// The project directory.
    pub dir: PathBuf,
    /// The project file's settings.
    pub file: ProjectFile,
    /// The syncs, in file-name order.
    pub syncs: Vec<Sync>,
}

/// One thing wrong with the configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `file:line:column`, or `file` / `sync NAME` when no position applies.
    pub place: String,
    /// What is wrong and what would be right.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.place, self.message)
    }
}

/// Every problem found in a project.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl Project {
    /// Reads `backflow.yaml` and every `*.yaml` / `*.yml` file in the syncs
    /// folder. All problems are collected, not just the first.
    pub fn load(dir: &Path, env: &Env) -> Result<Project, ConfigErrors> {
        let mut errors = Vec::new();
        let project_path = dir.join(PROJECT_FILE);
        let shown = |p: &Path| p.strip_prefix(dir).unwrap_or(p).display().to_string();
        let text = std::fs::read_to_string(&project_path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                place: project_path.display().to_string(),
                message: format!(
                    "cannot read the project file ({e}); run backflow in a project directory or pass --project DIR"
                ),
            }])
        })?;
        let file: ProjectFile = parse_yaml(&shown(&project_path), &text).map_err(|e| ConfigErrors(vec![e]))?;
        let syncs_dir = dir.join(&file.syncs_dir);
        let mut paths: Vec<PathBuf> = match std::fs::read_dir(&syncs_dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect(),
            Err(e) => {
                return Err(ConfigErrors(vec![ConfigError {
                    place: shown(&syncs_dir),
                    message: format!("cannot read the syncs folder ({e})"),
                }]));
            }
        };
        paths.sort();
        let mut syncs: Vec<Sync> = Vec::new();
        for path in paths {
            let place = shown(&path);
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(ConfigError { place, message: format!("cannot read ({e})") });
                    continue;
                }
            };
            match parse_yaml::<SyncFile>(&place, &text) {
                Ok(spec) => {
                    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                    let name = spec.name.clone().unwrap_or(stem);
                    syncs.push(Sync { name, file: path.clone(), spec });
                    env_references(&place, &text, env, &mut errors);
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() { Ok(Project { dir: dir.to_path_buf(), file, syncs }) } else { Err(ConfigErrors(errors)) }
    }

    /// Checks everything that can be checked without network or data: names,
    /// warehouses, modes, mapping, schedule, destination URL and headers,
    /// limits, durations, sizes, and that every `${VAR}` is set. Returns the
    /// checked settings every command then uses, so nothing that passes
    /// here fails later for a reason this could have seen.
    pub fn validate(&self, env: &Env) -> Result<Checked, ConfigErrors> {
        let mut errors = Vec::new();
        let mut checked = Checked::default();
        if !is_memory_size(&self.file.state.memory_limit) {
            errors.push(ConfigError {
                place: PROJECT_FILE.to_string(),
                message: format!(
                    "state.memory_limit: `{}` is not a size; write a number and a unit, e.g. `1GB`, `512MB` or `2GiB`",
                    self.file.state.memory_limit
                ),
            });
        }
        for (i, sync) in self.syncs.iter().enumerate() {
            let place = format!("{} (sync {})", self.shown(&sync.file), sync.name);
            let mut err = |message: String| errors.push(ConfigError { place: place.clone(), message });
            if sync.name.is_empty() || !sync.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                err(format!("name: `{}` must use only letters, digits, `_` and `-` (e.g. `crm_contacts`)", sync.name));
            }
            if let Some(other) = self.syncs[..i].iter().find(|s| s.name == sync.name) {
                err(format!(
                    "name: `{}` is also the name of the sync in {}; names must be unique",
                    sync.name,
                    self.shown(&other.file)
                ));
            }
            if let Some(warehouse) = self.file.warehouses.get(&sync.spec.warehouse)
                && let Err(e) = warehouse.expanded(|text| env.expand(text))
            {
                err(format!("warehouse `{}`: {e}", sync.spec.warehouse));
            }
            if !self.file.warehouses.contains_key(&sync.spec.warehouse) {
                let known: Vec<&str> = self.file.warehouses.keys().map(String::as_str).collect();
                err(format!(
                    "warehouse: `{}` is not defined in {PROJECT_FILE}{} (defined: {})",
                    sync.spec.warehouse,
                    suggestion(&sync.spec.warehouse, &known),
                    known.join(", ")
                ));
            }
            let keys = sync.key_columns();
            if keys.is_empty() || keys.iter().any(String::is_empty) {
                err(
                    "primary_key: name at least one column, e.g. `primary_key: customer_id` or `[account_id, user_id]`"
                        .into(),
                );
            }
            if let Err(e) = sync.mapping(env).validate() {
                err(format!("mapping: {e}"));
            }
            if let Some(s) = &sync.spec.schedule {
                match (&s.cron, &s.every) {
                    (Some(c), None) => {
                        if let Err(e) = croner::Cron::from_str(c) {
                            err(format!(
                                "schedule.cron: `{c}` is not a cron expression ({e}); write e.g. `*/15 * * * *`"
                            ));
                        }
                    }
                    (None, Some(_)) => {}
                    _ => err("schedule: give exactly one of `cron: \"*/15 * * * *\"` or `every: 15m`".into()),
                }
            }
            let destination = &sync.spec.destination;
            if !(1..=MAX_CONCURRENCY).contains(&destination.concurrency) {
                err(format!("destination.concurrency: must be between 1 and {MAX_CONCURRENCY} (e.g. `8`)"));
            }
            for (field, duration) in [
                ("timeout", destination.timeout),
                ("connect_timeout", destination.connect_timeout),
                ("retry.max_backoff", destination.retry.max_backoff),
            ] {
                if duration.get().is_zero() {
                    err(format!("destination.{field}: must be longer than 0 (e.g. `10s`)"));
                }
            }
            if destination.retry.attempts == 0 {
                err("destination.retry.attempts: must be at least 1 (the first attempt counts)".into());
            }
            if destination.circuit_breaker == 0 {
                err("destination.circuit_breaker: must be at least 1 (e.g. `10`)".into());
            }
            if sql_is_empty(&sync.spec.query) {
                err("query: is empty; write the SQL that selects the rows to sync (e.g. `select id, email from customers`)"
                    .into());
            }
            match Destination::new(&sync.spec.destination, env) {
                Ok(destination) => {
                    checked.destinations.insert(sync.name.clone(), destination);
                }
                Err(e) => err(e.to_string()),
            }
            match backflow_sink::Sender::new(&sync.spec.destination, env, &self.dir) {
                Ok(sender) => {
                    checked.senders.insert(sync.name.clone(), sender);
                }
                Err(e) => err(e.to_string()),
            }
            if let Err(e) = env.expand(&sync.spec.query) {
                err(format!("query: {e}"));
            }
        }
        if errors.is_empty() { Ok(checked) } else { Err(ConfigErrors(errors)) }
    }

    /// Whether `sync` reads an embedded warehouse (DuckDB), which needs no
    /// server to run.
    pub fn is_embedded(&self, sync: &Sync) -> bool {
        matches!(self.file.warehouses.get(&sync.spec.warehouse), Some(WarehouseConfig::Duckdb { .. }))
    }

    /// The sync called `name`.
    pub fn sync(&self, name: &str) -> Result<&Sync, ConfigErrors> {
        self.syncs.iter().find(|s| s.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.syncs.iter().map(|s| s.name.as_str()).collect();
            ConfigErrors(vec![ConfigError {
                place: format!("sync {name}"),
                message: format!("no such sync{} (defined: {})", suggestion(name, &known), known.join(", ")),
            }])
        })
    }

    /// The state folder.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join(&self.file.state.dir)
    }

    fn shown(&self, path: &Path) -> String {
        path.strip_prefix(&self.dir).unwrap_or(path).display().to_string()
    }
}

/// The most requests a destination may keep in flight.
pub const MAX_CONCURRENCY: usize = 10_000;

/// Whether `text` is a size DuckDB reads: a number and a unit (`1GB`,
/// `512 MB`, `2GiB`, `1.5GB`).
fn is_memory_size(text: &str) -> bool {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let units = ["b", "kb", "mb", "gb", "tb", "kib", "mib", "gib", "tib", "bytes"];
    number.parse::<f64>().is_ok_and(|n| n > 0.0) && units.contains(&unit.trim().to_ascii_lowercase().as_str())
}

/// Whether `sql` holds nothing but white space, `;` and comments.
fn sql_is_empty(sql: &str) -> bool {
    let mut rest = sql;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map_or("", |(_, next)| next);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, next)| next);
        } else {
            return rest.is_empty();
        }
    }
}

/// ` (did you mean `x`?)` when a known name is close to `given`.
pub fn suggestion(given: &str, known: &[&str]) -> String {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(given, k), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default()
}

/// Parses YAML, turning errors into `file:line:column: message`, with a
/// suggestion for misspelt keys.
fn parse_yaml<T: serde::de::DeserializeOwned>(place: &str, text: &str) -> Result<T, ConfigError> {
    serde_saphyr::from_str(text).map_err(|e| {
        let location = e.location().filter(|l| l.line() > 0);
        let place = match location {
            Some(l) => format!("{place}:{}:{}", l.line(), l.column()),
            None => place.to_string(),
        };
        ConfigError { place, message: describe(&e) }
    })
}

/// The error's message without position or snippet, plus a suggestion when
/// it is about an unknown key or value.
fn describe(e: &serde_saphyr::Error) -> String {
    let text = e.without_snippet().to_string();
    let first = text.lines().next().unwrap_or_default();
    let message = first.split(" at line ").next().unwrap_or(first).trim().to_string();
    if message.contains("untagged enum PrimaryKey") {
        return "primary_key: write one column (`primary_key: customer_id`) or a list (`primary_key: [account_id, user_id]`)".into();
    }
    for kind in ["unknown field `", "unknown variant `"] {
        if let Some(rest) = message.strip_prefix(kind) {
            let (given, expected) = rest.split_once('`').unwrap_or((rest, ""));
            let list = expected.split_once("expected").map_or("", |(_, l)| l);
            let mut known: Vec<&str> = list.split('`').skip(1).step_by(2).collect();
            if known.is_empty() {
                known = list
                    .trim_start()
                    .trim_start_matches("one of")
                    .split([',', ' '])
                    .map(str::trim)
                    .filter(|w| !w.is_empty() && *w != "or")
                    .collect();
            }
            return format!("{message}{}", suggestion(given, &known));
        }
    }
    message
}

/// Reports every `${VAR}` outside comments that is neither set nor given a
/// fallback, at its exact position.
fn env_references(place: &str, text: &str, env: &Env, errors: &mut Vec<ConfigError>) {
    for (n, line) in text.lines().enumerate() {
        let code = match line.find(" #").or(if line.trim_start().starts_with('#') { Some(0) } else { None }) {
            Some(cut) => &line[..cut],
            None => line,
        };
        for r in references(code) {
            if r.fallback.is_none() && env.get(&r.name).is_none() {
                errors.push(ConfigError {
                    place: format!("{place}:{}:{}", n + 1, r.offset + 1),
                    message: format!(
                        "environment variable {} is not set (referenced as ${{{}}}); export it, or write ${{{}:-fallback}}",
                        r.name, r.name, r.name
                    ),
                });
            }
        }
    }
}
