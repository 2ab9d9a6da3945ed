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

/// The JSON Schema (draft 2020-12) of `backflow.yaml`, from these types and
/// their doc comments: editors validate and complete the file with it.
pub fn project_schema() -> Value {
    let mut schema = schemars::schema_for!(ProjectFile);
    schema.insert("title".into(), "Backflow project file (backflow.yaml)".into());
    schema.to_value()
}

/// The JSON Schema (draft 2020-12) of a sync file (`syncs/*.yaml`).
pub fn sync_schema() -> Value {
    let mut schema = schemars::schema_for!(SyncFile);
    schema.insert("title".into(), "Backflow sync file (syncs/*.yaml)".into());
    schema.to_value()
}

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// How `backflow serve` runs.
    #[serde(default)]
    pub serve: ServeConfig,
    /// Webhooks told when a sync served by `serve` fails, ends partial, is
    /// degraded (see a sync's `degraded_when`) or recovers: once per change.
    #[serde(default)]
    pub alerts: Vec<NotifyConfig>,
    /// Webhooks told when runs of `serve` start and end (`run.started`,
    /// `run.completed`, `run.failed`), for orchestrators.
    #[serde(default)]
    pub events: Vec<NotifyConfig>,
}

/// A webhook for alerts or run events.
///
/// ```yaml
/// alerts:
///   - url: https://hooks.slack.com/services/${SLACK_WEBHOOK_PATH}
///     format: slack
///   - url: https://ops.example.com/backflow
///     signing: {scheme: hmac-sha1, secret: "${ALERT_SECRET}"}
///     syncs: [tag:crm]
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Where to POST; may reference `${VAR}`.
    pub url: String,
    /// `backflow` (default: Backflow's JSON) or `slack` (a Slack-compatible
    /// incoming-webhook body, `{"text": …}`).
    #[serde(default)]
    pub format: NotifyFormat,
    /// Extra headers, e.g. `Authorization: Bearer ${OPS_TOKEN}`.
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    /// Signs each message as deliveries are signed.
    #[serde(default)]
    pub signing: Option<backflow_sink::SigningConfig>,
    /// Only about these syncs: names, globs (`crm_*`) or `tag:NAME`; all
    /// when empty.
    #[serde(default)]
    pub syncs: Vec<String>,
}

/// The body of alert and event messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NotifyFormat {
    /// Backflow's JSON (`{"type": "alert", "event": "sync.failed", …}`).
    #[default]
    Backflow,
    /// `{"text": "…"}`, as Slack, Mattermost and Teams incoming webhooks read.
    Slack,
}

/// When a run that delivered is still reported as degraded (alerts). Each
/// threshold is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DegradedWhen {
    /// More than this share of the records sent were rejected (e.g. `0.05`).
    #[serde(default)]
    pub rejected_share_above: Option<f64>,
    /// The run took longer than this (e.g. `20m`).
    #[serde(default)]
    pub duration_above: Option<Duration>,
    /// Fewer rows were read than this (e.g. `1`: an empty result where rows
    /// were expected).
    #[serde(default)]
    pub rows_below: Option<u64>,
    /// More records than this were left pending.
    #[serde(default)]
    pub pending_above: Option<u64>,
}

/// An alert or event webhook as checked.
#[derive(Debug, Clone)]
pub struct Notifier {
    /// Its place in `backflow.yaml` (`alerts[0]`).
    pub place: String,
    /// The body format.
    pub format: NotifyFormat,
    /// Where and how messages go.
    pub destination: Destination,
    /// Sends them (retrying like deliveries).
    pub sender: backflow_sink::Sender,
    /// The syncs it is about (None: all).
    pub syncs: Option<Vec<String>>,
}

/// `serve:`: the scheduler and its HTTP endpoint.
///
/// ```yaml
/// serve:
///   listen: 127.0.0.1:9464
///   max_concurrent_runs: 2
///   drain_timeout: 30s
///   trigger_token: ${BACKFLOW_TRIGGER_TOKEN}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Address of the status page, `/metrics`, `/healthz`, `/readyz` and
    /// triggers (default `127.0.0.1:9464`; `serve --listen` overrides it).
    #[serde(default = "serve_listen")]
    pub listen: String,
    /// Runs in flight at once, across syncs (default 2). Never two runs of
    /// one sync.
    #[serde(default = "max_concurrent_runs")]
    pub max_concurrent_runs: usize,
    /// After SIGTERM or Ctrl-C, how long runs in flight may finish their
    /// requests before those are cancelled (default `30s`).
    #[serde(default = "drain_timeout")]
    pub drain_timeout: Duration,
    /// After a failed run, wait at least this long before the sync's next
    /// attempt, doubled for each further failure in a row (default `1m`).
    #[serde(default = "failure_backoff")]
    pub failure_backoff: Duration,
    /// The longest wait after failures (default `1h`).
    #[serde(default = "max_failure_backoff")]
    pub max_failure_backoff: Duration,
    /// Bearer token that allows `POST /syncs/{name}/runs`, e.g.
    /// `${BACKFLOW_TRIGGER_TOKEN}`. Without it, triggers are off.
    #[serde(default)]
    pub trigger_token: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: serve_listen(),
            max_concurrent_runs: max_concurrent_runs(),
            drain_timeout: drain_timeout(),
            failure_backoff: failure_backoff(),
            max_failure_backoff: max_failure_backoff(),
            trigger_token: None,
        }
    }
}

fn serve_listen() -> String {
    "127.0.0.1:9464".into()
}
fn max_concurrent_runs() -> usize {
    2
}
fn drain_timeout() -> Duration {
    Duration(std::time::Duration::from_secs(30))
}
fn failure_backoff() -> Duration {
    Duration(std::time::Duration::from_secs(60))
}
fn max_failure_backoff() -> Duration {
    Duration(std::time::Duration::from_secs(3600))
}

/// `serve:` as checked.
#[derive(Clone)]
pub struct ServeSettings {
    /// Where the endpoint listens.
    pub listen: std::net::SocketAddr,
    /// Runs at once.
    pub max_concurrent_runs: usize,
    /// How long a drain may take.
    pub drain_timeout: std::time::Duration,
    /// First wait after a failure.
    pub failure_backoff: std::time::Duration,
    /// Longest wait after failures.
    pub max_failure_backoff: std::time::Duration,
    /// The trigger token, expanded (never printed).
    pub trigger_token: Option<String>,
}

impl fmt::Debug for ServeSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeSettings")
            .field("listen", &self.listen)
            .field("max_concurrent_runs", &self.max_concurrent_runs)
            .field("drain_timeout", &self.drain_timeout)
            .field("trigger_token", &self.trigger_token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl Default for ServeSettings {
    fn default() -> Self {
        let c = ServeConfig::default();
        ServeSettings {
            listen: c.listen.parse().expect("the default address"),
            max_concurrent_runs: c.max_concurrent_runs,
            drain_timeout: c.drain_timeout.get(),
            failure_backoff: c.failure_backoff.get(),
            max_failure_backoff: c.max_failure_backoff.get(),
            trigger_token: None,
        }
    }
}

/// The embedded state store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// Labels to select syncs by (`run tag:crm`, `serve --select tag:crm`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// When `serve` alerts that a run which delivered is degraded.
    #[serde(default)]
    pub degraded_when: Option<DegradedWhen>,
}

/// One column or several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InvalidKeyPolicy {
    /// Stop before sending anything.
    #[default]
    Fail,
    /// Leave them out and report them.
    Skip,
}

/// A schedule: a cron expression or a fixed interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// `serve:` settings.
    pub serve: ServeSettings,
    /// `alerts:` webhooks.
    pub alerts: Vec<Notifier>,
    /// `events:` webhooks.
    pub events: Vec<Notifier>,
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
        checked.serve = self.validate_serve(env, &mut errors);
        checked.alerts = self.notifiers("alerts", &self.file.alerts, env, &mut errors);
        checked.events = self.notifiers("events", &self.file.events, env, &mut errors);
        for (i, sync) in self.syncs.iter().enumerate() {
            let place = format!("{} (sync {})", self.shown(&sync.file), sync.name);
            let mut err = |message: String| errors.push(ConfigError { place: place.clone(), message });
            if sync.name.is_empty() || !sync.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                err(format!("name: `{}` must use only letters, digits, `_` and `-` (e.g. `crm_contacts`)", sync.name));
            }
            for tag in &sync.spec.tags {
                if tag.is_empty() || !tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                    err(format!("tags: `{tag}` must use only letters, digits, `_` and `-` (e.g. `crm`)"));
                }
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

    /// Checks `serve:`.
    fn validate_serve(&self, env: &Env, errors: &mut Vec<ConfigError>) -> ServeSettings {
        let c = &self.file.serve;
        let mut settings = ServeSettings::default();
        let mut err = |message: String| errors.push(ConfigError { place: PROJECT_FILE.to_string(), message });
        match c.listen.parse() {
            Ok(addr) => settings.listen = addr,
            Err(_) => {
                err(format!("serve.listen: `{}` is not an address; write IP:PORT, e.g. `127.0.0.1:9464`", c.listen))
            }
        }
        if c.max_concurrent_runs == 0 || c.max_concurrent_runs > 64 {
            err("serve.max_concurrent_runs: must be between 1 and 64 (e.g. `2`)".into());
        }
        settings.max_concurrent_runs = c.max_concurrent_runs;
        settings.drain_timeout = c.drain_timeout.get();
        settings.failure_backoff = c.failure_backoff.get();
        settings.max_failure_backoff = c.max_failure_backoff.get().max(c.failure_backoff.get());
        if let Some(token) = &c.trigger_token {
            match env.expand(token) {
                Ok(t) if t.trim().chars().count() < 16 => {
                    err("serve.trigger_token: is shorter than 16 characters; set it to a long random secret \
                     (e.g. `openssl rand -hex 24`) in a variable: `${BACKFLOW_TRIGGER_TOKEN}`"
                        .into())
                }
                Ok(t) => settings.trigger_token = Some(t.trim().to_string()),
                Err(e) => err(format!("serve.trigger_token: {e}")),
            }
        }
        settings
    }

    /// Checks `alerts:` or `events:` and sets up their senders (a few
    /// retries, 10 s timeout).
    fn notifiers(&self, field: &str, list: &[NotifyConfig], env: &Env, errors: &mut Vec<ConfigError>) -> Vec<Notifier> {
        let mut out = Vec::new();
        for (i, n) in list.iter().enumerate() {
            let place = format!("{field}[{i}]");
            let mut err =
                |message: String| errors.push(ConfigError { place: format!("{PROJECT_FILE} ({place})"), message });
            let config: DestinationConfig = match serde_json::from_value(serde_json::json!({
                "url": n.url,
                "headers": n.headers,
                "signing": n.signing,
                "timeout": "10s",
                "retry": {"attempts": 3, "backoff": "1s"},
            })) {
                Ok(c) => c,
                Err(e) => {
                    err(e.to_string());
                    continue;
                }
            };
            if config.url.contains('{') && !config.url.contains("${") {
                err("url: must not hold `{column}` placeholders (a message is not a record)".into());
                continue;
            }
            let destination = Destination::new(&config, env);
            let sender = backflow_sink::Sender::new(&config, env, &self.dir);
            let syncs = if n.syncs.is_empty() {
                None
            } else {
                match self.select(&n.syncs) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        err(format!("syncs: {e}"));
                        continue;
                    }
                }
            };
            match (destination, sender) {
                (Ok(destination), Ok(sender)) => {
                    out.push(Notifier { place, format: n.format, destination, sender, syncs })
                }
                (Err(e), _) | (_, Err(e)) => err(e.to_string()),
            }
        }
        out
    }

    /// The syncs that `patterns` select: a name, a glob over names
    /// (`crm_*`) or `tag:NAME`. Each pattern must match; the syncs come in
    /// the patterns' order (those of one pattern in project order), each
    /// once.
    pub fn select(&self, patterns: &[String]) -> Result<Vec<String>, ConfigErrors> {
        let mut chosen: Vec<usize> = Vec::new();
        let mut errors = Vec::new();
        for pattern in patterns {
            let hits: Vec<usize> = if let Some(tag) = pattern.strip_prefix("tag:") {
                self.syncs
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.spec.tags.iter().any(|t| t == tag))
                    .map(|(i, _)| i)
                    .collect()
            } else if pattern.contains(['*', '?', '[']) {
                match globset::Glob::new(pattern) {
                    Ok(glob) => {
                        let glob = glob.compile_matcher();
                        self.syncs.iter().enumerate().filter(|(_, s)| glob.is_match(&s.name)).map(|(i, _)| i).collect()
                    }
                    Err(e) => {
                        errors.push(ConfigError {
                            place: format!("--select {pattern}"),
                            message: format!("not a glob ({e}); write e.g. `crm_*`"),
                        });
                        continue;
                    }
                }
            } else {
                match self.sync(pattern) {
                    Ok(_) => self.syncs.iter().position(|s| &s.name == pattern).into_iter().collect(),
                    Err(e) => {
                        errors.extend(e.0);
                        continue;
                    }
                }
            };
            if hits.is_empty() {
                let tags: std::collections::BTreeSet<&str> =
                    self.syncs.iter().flat_map(|s| s.spec.tags.iter().map(String::as_str)).collect();
                errors.push(ConfigError {
                    place: format!("--select {pattern}"),
                    message: format!(
                        "matches no sync (syncs: {}; tags: {})",
                        self.syncs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "),
                        if tags.is_empty() {
                            "none".to_string()
                        } else {
                            tags.into_iter().collect::<Vec<_>>().join(", ")
                        }
                    ),
                });
            }
            for i in hits {
                if !chosen.contains(&i) {
                    chosen.push(i);
                }
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(chosen.into_iter().map(|i| self.syncs[i].name.clone()).collect())
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
