//! A project whose one sync sends to a fault-injecting receiver, a model
//! of its table, and the invariants checked after every scenario.

use crate::common::{Ran, bin, finish};
use backflow_diff::StateStore;
use backflow_testkit::faults::{Accepted, FaultPlan, FaultReceiver};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Client timeout of the syncs under test; stalls last longer.
pub const TIMEOUT_MS: u64 = 250;
pub const STALL: Duration = Duration::from_millis(400);

/// A project in a temporary folder: a DuckDB file with `items(id, name,
/// score)`, the sync `s` (mode and extra destination lines as given) and a
/// fault receiver, with the model of what the table holds.
pub struct Bench {
    pub dir: tempfile::TempDir,
    pub receiver: FaultReceiver,
    /// id → (name, score), as the table holds it.
    pub table: BTreeMap<i64, (String, i64)>,
    /// Rows once in the table and deleted since (to bring back).
    gone: BTreeMap<i64, (String, i64)>,
    pub rng: fastrand::Rng,
    next_id: i64,
    pub mode: &'static str,
}

/// What the invariants found (all zero when the promise held).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Keys whose record at the receiver differs from the query's.
    pub lost: usize,
    /// Message ids accepted again after another occurrence of their key.
    pub ids_reused: usize,
    /// Message ids that carried two different payloads, keys or ops, and
    /// keys that one run sent under two ids (a retry must keep its id).
    pub id_conflicts: usize,
    /// Records a run sent again after a clean run had delivered everything
    /// (what was delivered is not known as delivered).
    pub not_converged: usize,
    /// Snapshot rows the receiver never accepted.
    pub false_claims: usize,
    /// State files that failed to open or verify.
    pub corrupt: usize,
}

impl Verdict {
    pub fn held(&self) -> bool {
        *self == Verdict::default()
    }

    pub fn add(&mut self, other: Verdict) {
        self.lost += other.lost;
        self.ids_reused += other.ids_reused;
        self.id_conflicts += other.id_conflicts;
        self.false_claims += other.false_claims;
        self.corrupt += other.corrupt;
        self.not_converged += other.not_converged;
    }
}

impl Bench {
    /// `rows` rows to start with; `extra` goes under `destination:`.
    pub fn new(mode: &'static str, extra: &str, rows: i64, seed: u64) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let receiver = FaultReceiver::start(seed);
        std::fs::write(
            dir.path().join("backflow.yaml"),
            "warehouses:\n  wh:\n    type: duckdb\n    path: warehouse.duckdb\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("syncs")).unwrap();
        let bench = Bench {
            dir,
            receiver,
            table: BTreeMap::new(),
            gone: BTreeMap::new(),
            rng: fastrand::Rng::with_seed(seed),
            next_id: 1,
            mode,
        };
        bench.write_sync(extra);
        bench.sql("create table items (id BIGINT, name VARCHAR, score BIGINT)");
        let mut bench = bench;
        let mut inserts = Vec::new();
        for _ in 0..rows {
            let id = bench.next_id;
            bench.next_id += 1;
            let row = (format!("n{id}"), bench.rng.i64(0..4));
            inserts.push(format!("({id}, '{}', {})", row.0, row.1));
            bench.table.insert(id, row);
        }
        if !inserts.is_empty() {
            bench.sql(&format!("insert into items values {}", inserts.join(",")));
        }
        bench
    }

    pub fn write_sync(&self, extra: &str) {
        let sync = format!(
            "warehouse: wh\nquery: select id, name, score from items\nprimary_key: id\nmode: {mode}\n\
             mapping:\n  name: name\n  score: score\n\
             destination:\n  url: \"{url}/hook\"\n  timeout: {TIMEOUT_MS}ms\n  connect_timeout: {TIMEOUT_MS}ms\n  \
             retry: {{attempts: 2, backoff: 5ms, max_backoff: 20ms}}\n{breaker}{extra}",
            mode = self.mode,
            url = self.receiver.url(),
            // Faults come in streaks; the breaker stops a run only when asked.
            breaker = if extra.contains("circuit_breaker") { "" } else { "  circuit_breaker: 100000\n" },
        );
        std::fs::write(self.dir.path().join("syncs/s.yaml"), sync).unwrap();
    }

    /// Runs SQL against the warehouse, waiting while a process holds it.
    pub fn sql(&self, sql: &str) {
        let path = self.dir.path().join("warehouse.duckdb");
        for _ in 0..400 {
            match duckdb::Connection::open(&path) {
                Ok(conn) => return conn.execute_batch(sql).unwrap(),
                Err(_) => std::thread::sleep(Duration::from_millis(25)),
            }
        }
        panic!("the warehouse stayed locked");
    }

    /// Random edits: changed scores (often back to an earlier value), rows
    /// deleted, new rows, and deleted rows brought back as they were.
    pub fn edit(&mut self, changes: usize) {
        let mut statements = Vec::new();
        for _ in 0..changes {
            let ids: Vec<i64> = self.table.keys().copied().collect();
            match self.rng.u8(0..10) {
                0..=4 if !ids.is_empty() => {
                    let id = ids[self.rng.usize(..ids.len())];
                    let score = self.rng.i64(0..4);
                    self.table.get_mut(&id).unwrap().1 = score;
                    statements.push(format!("update items set score = {score} where id = {id}"));
                }
                5 | 6 if !ids.is_empty() => {
                    let id = ids[self.rng.usize(..ids.len())];
                    let row = self.table.remove(&id).unwrap();
                    self.gone.insert(id, row);
                    statements.push(format!("delete from items where id = {id}"));
                }
                7 if !self.gone.is_empty() => {
                    let gone: Vec<i64> = self.gone.keys().copied().collect();
                    let id = gone[self.rng.usize(..gone.len())];
                    let row = self.gone.remove(&id).unwrap();
                    statements.push(format!("insert into items values ({id}, '{}', {})", row.0, row.1));
                    self.table.insert(id, row);
                }
                _ => {
                    let id = self.next_id;
                    self.next_id += 1;
                    let row = (format!("n{id}"), self.rng.i64(0..4));
                    statements.push(format!("insert into items values ({id}, '{}', {})", row.0, row.1));
                    self.table.insert(id, row);
                }
            }
        }
        if !statements.is_empty() {
            self.sql(&statements.join(";\n"));
        }
    }

    /// Inserts `n` new rows at once (a delivery long enough to commit its
    /// acknowledgements in several steps).
    pub fn insert_rows(&mut self, n: i64) {
        let (from, to) = (self.next_id, self.next_id + n);
        self.next_id = to;
        self.sql(&format!("insert into items select range, 'n' || range, range % 4 from range({from}, {to})"));
        for id in from..to {
            self.table.insert(id, (format!("n{id}"), id % 4));
        }
    }

    pub fn run(&self) -> Ran {
        finish(self.command(&["run", "s"]).output().unwrap())
    }

    pub fn spawn(&self) -> Child {
        self.command(&["run", "s"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
    }

    pub fn command(&self, args: &[&str]) -> std::process::Command {
        let mut c = bin();
        c.arg("--project").arg(self.dir.path()).args(args);
        c
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join(".backflow/state")
    }

    /// Runs with no faults until a run delivers everything (at most three
    /// runs: the first must, unless a run was left partial on purpose).
    pub fn settle(&self) -> Ran {
        self.receiver.set_plan(FaultPlan::none());
        let ran = self.run();
        assert_eq!(ran.code, 0, "a clean run delivers everything\n{}", ran.all());
        ran
    }

    /// What the receiver holds, rebuilt from the records it accepted:
    /// each op applied per key, in arrival order.
    pub fn view(&self) -> BTreeMap<i64, Value> {
        let mut view = BTreeMap::new();
        for a in self.receiver.accepted() {
            let id = a.key["id"].as_i64().expect("a key id");
            match a.op.as_str() {
                "delete" => {
                    view.remove(&id);
                }
                _ => {
                    view.insert(id, a.payload.clone());
                }
            }
        }
        view
    }

    /// The payloads the query gives.
    pub fn expected(&self) -> BTreeMap<i64, Value> {
        self.table.iter().map(|(id, (name, score))| (*id, json!({"name": name, "score": score}))).collect()
    }

    /// The state alone: it opens, verifies, and claims nothing the
    /// receiver did not accept.
    pub fn check_state(&self) -> Verdict {
        let mut verdict = Verdict::default();
        if !StateStore::path(&self.state_dir(), "s").exists() {
            return verdict;
        }
        let store = match StateStore::open(&self.state_dir(), "s", "256MB") {
            Ok(store) => store,
            Err(e) => {
                eprintln!("state does not open: {e}");
                verdict.corrupt += 1;
                return verdict;
            }
        };
        if let Err(e) = store.verify() {
            eprintln!("state does not verify: {e}");
            verdict.corrupt += 1;
        }
        let accepted = self.receiver.accepted();
        let mut delivered: HashMap<String, Vec<&Accepted>> = HashMap::new();
        for a in &accepted {
            delivered.entry(a.key.to_string()).or_default().push(a);
        }
        for (key, payload) in store.snapshot_rows().expect("snapshot rows") {
            let payload: Value = serde_json::from_str(&payload).expect("payload JSON");
            let claimed =
                delivered.get(&key).is_some_and(|all| all.iter().any(|a| a.op != "delete" && a.payload == payload));
            if !claimed {
                eprintln!("the snapshot claims {key} = {payload}, which the receiver never accepted");
                verdict.false_claims += 1;
            }
        }
        verdict
    }

    /// Every invariant, after a clean final run.
    pub fn verdict(&self) -> Verdict {
        let mut verdict = self.check_state();
        let (view, expected) = (self.view(), self.expected());
        // Outside mirror mode the receiver keeps what left the query.
        let keys: std::collections::BTreeSet<&i64> = if self.mode == "mirror" {
            view.keys().chain(expected.keys()).collect()
        } else {
            expected.keys().collect()
        };
        for id in keys {
            if view.get(id) != expected.get(id) {
                eprintln!("key {id}: the receiver holds {:?}, the query {:?}", view.get(id), expected.get(id));
                for a in self.receiver.accepted().iter().filter(|a| a.key["id"] == *id) {
                    eprintln!("    accepted {} {} id {} run {}", a.op, a.payload, a.message_id, a.run_id);
                }
                let shown = self.command(&["inspect", "s", &id.to_string()]).output().unwrap();
                eprintln!("    {}", String::from_utf8_lossy(&shown.stdout).replace('\n', "\n    "));
                verdict.lost += 1;
            }
        }
        let accepted = self.receiver.accepted();
        verdict.id_conflicts = id_conflicts(&accepted);
        verdict.ids_reused = ids_reused(&accepted);
        // Everything is delivered: one more run sends nothing.
        let before = accepted.len();
        let ran = self.run();
        let again = self.receiver.accepted().len() - before;
        if ran.code != 0 || again > 0 {
            eprintln!("a run after a clean run sent {again} record(s) (exit {})\n{}", ran.code, ran.all());
            verdict.not_converged += again.max(1);
        }
        verdict
    }

    /// Kills a run at a random moment within `span` of its start
    /// (SIGKILL), waits for the receiver to have read everything the run
    /// wrote, and checks the state. Returns whether the kill landed before
    /// the run ended.
    pub fn kill_run(&mut self, span: Duration) -> (bool, Verdict) {
        let mut child = self.spawn();
        let delay = Duration::from_micros(self.rng.u64(0..span.as_micros().max(1) as u64));
        std::thread::sleep(delay);
        let landed = matches!(child.try_wait(), Ok(None));
        child.kill().unwrap();
        child.wait().unwrap();
        self.receiver.wait_idle(Duration::from_secs(20));
        (landed, self.check_state())
    }

    /// How long a run takes now (a clean one, not counted).
    pub fn timed_run(&self) -> (Duration, Ran) {
        let started = Instant::now();
        let ran = self.run();
        (started.elapsed(), ran)
    }
}

/// Message ids that carried more than one (key, op, payload).
pub fn id_conflicts(accepted: &[Accepted]) -> usize {
    let mut seen: HashMap<&str, (&Value, &str, &Value)> = HashMap::new();
    let mut per_run: HashMap<(&str, String), &str> = HashMap::new();
    let mut conflicts = 0;
    for a in accepted {
        let first = per_run.entry((a.run_id.as_str(), a.key.to_string())).or_insert(a.message_id.as_str());
        if *first != a.message_id {
            eprintln!("run {} sent key {} under two message ids ({first}, {})", a.run_id, a.key, a.message_id);
            conflicts += 1;
        }
    }
    for a in accepted {
        let this = (&a.key, a.op.as_str(), &a.payload);
        match seen.get(a.message_id.as_str()) {
            Some(first) if *first != this => {
                eprintln!("message id {} carried {:?} and then {:?}", a.message_id, first, this);
                conflicts += 1;
            }
            Some(_) => {}
            None => {
                seen.insert(&a.message_id, this);
            }
        }
    }
    conflicts
}

/// Message ids accepted again for a key after another occurrence of that
/// key was accepted: a re-send never has another occurrence between its
/// copies, a reused id has.
pub fn ids_reused(accepted: &[Accepted]) -> usize {
    let mut per_key: HashMap<String, Vec<&str>> = HashMap::new();
    for a in accepted {
        let ids = per_key.entry(a.key.to_string()).or_default();
        if ids.last() != Some(&a.message_id.as_str()) {
            ids.push(&a.message_id);
        }
    }
    let mut reused = 0;
    for (key, ids) in per_key {
        let mut seen = std::collections::HashSet::new();
        for id in ids {
            if !seen.insert(id) {
                eprintln!("key {key}: message id {id} came back after another occurrence");
                reused += 1;
            }
        }
    }
    reused
}
