//! A project in a temporary folder: a DuckDB warehouse file with a table
//! `items(id, name, score)`, one sync `s`, and a scripted receiver.
#![allow(dead_code)]

use backflow_core::env::Env;
use backflow_engine::{Engine, EngineError, NoProgress, Plan, RunReport};
use backflow_testkit::Receiver;
use std::path::Path;

pub struct Scenario {
    pub dir: tempfile::TempDir,
    pub receiver: Receiver,
}

/// Retries fast, so failure tests stay quick.
pub const FAST_RETRY: &str = "retry: {attempts: 3, backoff: 5ms, max_backoff: 50ms}";

impl Scenario {
    /// `sync` is the sync file's YAML; `{URL}` stands for the receiver.
    pub fn new(sync: &str) -> Scenario {
        let dir = tempfile::tempdir().unwrap();
        let receiver = Receiver::start();
        std::fs::create_dir(dir.path().join("syncs")).unwrap();
        let s = Scenario { dir, receiver };
        s.stage_queries(false);
        s.write_sync(sync);
        s.sql("create table items (id INTEGER, name VARCHAR, score INTEGER)");
        s
    }

    /// A mirror sync of `items` with the given extra destination lines.
    pub fn mirror() -> Scenario {
        Scenario::new(&sync_yaml("mirror", ""))
    }

    /// Gives the warehouse `init` SQL (`staged`), which makes runs stage
    /// the query row by row, or none, which lets them diff it inside DuckDB.
    pub fn stage_queries(&self, staged: bool) {
        let init = if staged { "    init: select 1\n" } else { "" };
        std::fs::write(
            self.dir.path().join("backflow.yaml"),
            format!("warehouses:\n  wh:\n    type: duckdb\n    path: warehouse.duckdb\n{init}"),
        )
        .unwrap();
    }

    pub fn write_sync(&self, yaml: &str) {
        let yaml = yaml.replace("{URL}", &self.receiver.url());
        std::fs::write(self.dir.path().join("syncs/s.yaml"), yaml).unwrap();
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs SQL against the warehouse file (closed again afterwards).
    pub fn sql(&self, sql: &str) {
        let conn = duckdb::Connection::open(self.dir.path().join("warehouse.duckdb")).unwrap();
        conn.execute_batch(sql).unwrap();
    }

    pub fn engine(&self) -> Engine {
        Engine::load(self.dir.path(), Env::process()).unwrap()
    }

    pub fn try_run(&self, full: bool) -> Result<RunReport, EngineError> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let engine = self.engine();
        runtime.block_on(engine.run("s", full, &NoProgress))
    }

    pub fn run(&self) -> RunReport {
        self.try_run(false).unwrap()
    }

    pub fn plan(&self) -> Plan {
        self.engine().plan("s", false, &NoProgress).unwrap()
    }

    /// Runs, and returns the bodies that arrived during the run.
    pub fn run_bodies(&self) -> (RunReport, Vec<serde_json::Value>) {
        self.receiver.clear();
        let report = self.run();
        (report, self.receiver.bodies())
    }
}

/// A sync of `items` keyed by `id`, mapping `name` and `score`.
pub fn sync_yaml(mode: &str, extra: &str) -> String {
    format!(
        "warehouse: wh\nquery: select id, name, score from items\nprimary_key: id\nmode: {mode}\n\
         mapping:\n  name: name\n  score: score\n\
         destination:\n  url: \"{{URL}}/hook\"\n  {FAST_RETRY}\n{extra}"
    )
}
