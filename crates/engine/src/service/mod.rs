//! `serve`: a scheduler that runs syncs side by side when they come due,
//! and an HTTP endpoint beside it (status page, metrics, health, triggers).
//!
//! The scheduler owns a board: per sync its schedule, next slot, run in
//! flight, failures in a row and recent runs. Each run goes on its own
//! thread (the diff is blocking DuckDB work) and drives its delivery on the
//! shared runtime; its end comes back to the scheduler over a channel.

pub mod alerts;
mod http;
pub mod metrics;
mod page;
pub mod schedule;

use crate::config::{Schedule, ServeSettings};
use crate::{Engine, EngineError, NoProgress, RunReport};
use backflow_core::env::Env;
use backflow_diff::Rejection;
use indexmap::IndexMap;
use metrics::Metrics;
use schedule::Time;
use serde::Serialize;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// Runs kept per sync for the status page.
const RECENT: usize = 30;
/// Runs whose status `GET /runs/{id}` can tell.
const KNOWN_RUNS: usize = 1_000;
/// After the drain time and the cancellation of requests, how long runs
/// still busy (reading their query) are waited for.
const ABANDON_AFTER: std::time::Duration = std::time::Duration::from_secs(5);
/// Before exiting, how long alerts and events still being sent may take.
const MESSAGES_AFTER: std::time::Duration = std::time::Duration::from_secs(15);

/// How `serve` was asked to run.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// The endpoint's address, over `serve.listen`.
    pub listen: Option<std::net::SocketAddr>,
    /// Run every due sync once, then exit.
    pub once: bool,
    /// Syncs to serve (names, globs, `tag:NAME`); all when empty.
    pub select: Vec<String>,
}

/// One run as the service knows it.
#[derive(Debug, Clone, Serialize)]
pub struct RunEntry {
    /// The run's id.
    pub run_id: String,
    /// The sync.
    pub sync: String,
    /// What started it: `schedule`, `trigger`, `once`, or `history` (a run
    /// from before this process, read from the state).
    pub trigger: String,
    /// `queued`, `running`, `succeeded`, `partial`, `failed` or `skipped`.
    pub status: String,
    /// When it was asked for (RFC 3339).
    pub queued_at: Option<String>,
    /// When it started.
    pub started_at: Option<String>,
    /// When it ended.
    pub ended_at: Option<String>,
    /// Seconds it took.
    pub seconds: Option<f64>,
    /// Rows read.
    pub rows: u64,
    /// Keys added, changed and removed.
    pub added: u64,
    /// Keys changed.
    pub changed: u64,
    /// Keys removed.
    pub removed: u64,
    /// Records delivered.
    pub delivered: u64,
    /// Records rejected.
    pub rejected: u64,
    /// Records left pending.
    pub pending: u64,
    /// Why it failed, stopped early or was skipped.
    pub message: Option<String>,
    /// The first rejected or failed records.
    pub failures: Vec<Rejection>,
}

impl RunEntry {
    fn new(sync: &str, run_id: String, trigger: &str) -> RunEntry {
        RunEntry {
            run_id,
            sync: sync.to_string(),
            trigger: trigger.to_string(),
            status: "queued".into(),
            queued_at: Some(backflow_diff::now()),
            started_at: None,
            ended_at: None,
            seconds: None,
            rows: 0,
            added: 0,
            changed: 0,
            removed: 0,
            delivered: 0,
            rejected: 0,
            pending: 0,
            message: None,
            failures: vec![],
        }
    }

    /// A run read from the state's run log.
    pub fn recorded(r: &backflow_diff::RunRecord) -> RunEntry {
        let n = |path: &[&str]| {
            let mut v = &r.counts;
            for p in path {
                v = &v[*p];
            }
            v.as_u64().unwrap_or(0)
        };
        let delivered = r.counts["delivered"].as_object().map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum());
        let seconds = match (parse_time(&r.started_at), r.ended_at.as_deref().and_then(parse_time)) {
            (Some(a), Some(b)) => Some((b - a).num_milliseconds() as f64 / 1000.0),
            _ => None,
        };
        RunEntry {
            run_id: r.run_id.clone(),
            sync: r.sync.clone(),
            trigger: "history".into(),
            status: r.status.clone(),
            queued_at: None,
            started_at: Some(r.started_at.clone()),
            ended_at: r.ended_at.clone(),
            seconds,
            rows: n(&["diff", "rows"]),
            added: n(&["diff", "added"]),
            changed: n(&["diff", "changed"]),
            removed: n(&["diff", "removed"]),
            delivered,
            rejected: n(&["rejected"]),
            pending: n(&["pending"]),
            message: r.message.clone(),
            failures: vec![],
        }
    }

    fn finished(&mut self, result: &Result<RunReport, EngineError>, engine: &Engine, seconds: f64) {
        self.ended_at = Some(backflow_diff::now());
        self.seconds = Some(seconds);
        match result {
            Ok(r) => {
                self.status = r.status.clone();
                self.rows = r.counts.rows;
                self.added = r.counts.added;
                self.changed = r.counts.changed;
                self.removed = r.counts.removed;
                self.delivered = r.delivered_total();
                self.rejected = r.rejected;
                self.pending = r.pending;
                self.message = r.stopped_early.clone();
                self.failures = r.failures.clone();
            }
            Err(e) if is_busy(e) => {
                self.status = "skipped".into();
                self.message = Some("already running (another process holds the sync's state)".into());
            }
            Err(e) => {
                self.status = "failed".into();
                self.message = Some(engine.env.redact(&e.to_string()));
            }
        }
    }
}

fn parse_time(text: &str) -> Option<Time> {
    chrono::DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&chrono::Utc))
}

fn is_busy(e: &EngineError) -> bool {
    matches!(e, EngineError::State(s) if s.is_busy())
}

/// One sync on the board.
#[derive(Debug, Clone)]
struct Slot {
    schedule: Option<Schedule>,
    /// When it runs next (None: only by trigger).
    next: Option<Time>,
    /// The run in flight or queued.
    current: Option<String>,
    /// Failed runs in a row.
    failures: u32,
    /// Set while failures push the next attempt back.
    backing_off: Option<String>,
    /// Newest first.
    recent: VecDeque<RunEntry>,
    /// Done with, under `--once`.
    once_done: bool,
    /// Its health after the last run (alerts go out when it changes).
    health: alerts::Health,
}

#[derive(Debug, Default)]
struct Board {
    syncs: IndexMap<String, Slot>,
    /// Runs by id, oldest first.
    runs: IndexMap<String, RunEntry>,
    /// Triggered runs waiting for a free slot: (sync, run id).
    queue: VecDeque<(String, String)>,
    running: usize,
}

impl Board {
    fn remember(&mut self, entry: RunEntry) {
        if let Some(slot) = self.syncs.get_mut(&entry.sync) {
            match slot.recent.iter_mut().find(|r| r.run_id == entry.run_id) {
                Some(known) => *known = entry.clone(),
                None => {
                    slot.recent.push_front(entry.clone());
                    slot.recent.truncate(RECENT);
                }
            }
        }
        self.runs.insert(entry.run_id.clone(), entry);
        while self.runs.len() > KNOWN_RUNS {
            self.runs.shift_remove_index(0);
        }
    }
}

/// A run that ended, sent back from its thread.
struct Done {
    sync: String,
    run_id: String,
    scheduled: bool,
    engine: Arc<Engine>,
    result: Result<RunReport, EngineError>,
    seconds: f64,
}

/// Why a trigger was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TriggerError {
    /// No such sync (or not served).
    #[error("no sync `{0}` is served here")]
    Unknown(String),
    /// A run of it is in flight or queued.
    #[error("sync `{sync}` already has run {run_id} in flight or queued")]
    Busy {
        /// The sync.
        sync: String,
        /// Its run in flight or queued.
        run_id: String,
    },
    /// The service is stopping.
    #[error("the service is stopping")]
    Stopping,
}

/// How `serve` ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct Served {
    /// Some run failed.
    pub failed: bool,
    /// Some run ended partial.
    pub partial: bool,
}

/// The running service: scheduler, board and endpoint.
pub struct Service {
    dir: PathBuf,
    env: Env,
    options: ServeOptions,
    engine: RwLock<Arc<Engine>>,
    board: Mutex<Board>,
    metrics: Arc<Metrics>,
    /// No new runs once fired.
    shutdown: CancellationToken,
    /// Runs drain (engine stop).
    stop: CancellationToken,
    /// Runs cancel their requests (engine abort).
    abort: CancellationToken,
    /// Something changed: a trigger, a reload.
    wake: Notify,
    /// Alerts and events being sent.
    messages: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The endpoint's address.
    address: Option<std::net::SocketAddr>,
    started_at: String,
}

struct Observer(Arc<Metrics>);

impl crate::Observe for Observer {
    fn requests(&self, sync: &str) -> Arc<dyn backflow_sink::Observer> {
        self.0.requests(sync)
    }
}

impl Service {
    /// Loads the project in `dir`, reads each served sync's last runs, and
    /// opens the endpoint (its address from `serve.listen` or the options).
    pub async fn start(dir: &std::path::Path, env: Env, options: ServeOptions) -> Result<Arc<Service>, EngineError> {
        let metrics = Arc::new(Metrics::default());
        let (stop, abort) = (CancellationToken::new(), CancellationToken::new());
        let engine = Arc::new(
            Engine::load(dir, env.clone())?
                .stopping_on(stop.clone(), abort.clone())
                .observed_by(Arc::new(Observer(metrics.clone()))),
        );
        let served = served(&engine, &options)?;
        if !options.once && !served.iter().any(|n| engine.project.sync(n).is_ok_and(|s| s.spec.schedule.is_some())) {
            let triggers = engine.checked.serve.trigger_token.is_some();
            if !triggers {
                return Err(EngineError::Usage(
                    "no served sync has a `schedule` and triggers are off; add e.g. `schedule: {every: 15m}` to a \
                     sync, or set `serve.trigger_token` in backflow.yaml to start runs over HTTP"
                        .into(),
                ));
            }
        }
        // `--once` serves no endpoint unless asked (a CronJob beside a
        // running `serve` must not clash on its address).
        let listener = if options.once && options.listen.is_none() {
            None
        } else {
            let address = options.listen.unwrap_or(engine.checked.serve.listen);
            Some(tokio::net::TcpListener::bind(address).await.map_err(|e| {
                EngineError::Usage(format!(
                    "cannot listen on {address} ({e}); set `serve.listen` in backflow.yaml or pass `serve --listen ADDR`"
                ))
            })?)
        };
        let address = listener.as_ref().and_then(|l| l.local_addr().ok());
        let service = Arc::new(Service {
            dir: dir.to_path_buf(),
            env,
            options,
            engine: RwLock::new(engine.clone()),
            board: Mutex::new(Board::default()),
            metrics,
            shutdown: CancellationToken::new(),
            stop,
            abort,
            wake: Notify::new(),
            messages: Mutex::new(Vec::new()),
            address,
            started_at: backflow_diff::now(),
        });
        service.arrange(&engine, &served, true);
        if let Some(listener) = listener {
            http::spawn(service.clone(), listener);
        }
        Ok(service)
    }

    /// Where the endpoint listens (None: no endpoint, `--once`).
    pub fn address(&self) -> Option<std::net::SocketAddr> {
        self.address
    }

    fn engine(&self) -> Arc<Engine> {
        self.engine.read().expect("engine lock").clone()
    }

    fn settings(&self) -> ServeSettings {
        self.engine().checked.serve.clone()
    }

    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.board.lock().expect("board lock")
    }

    /// Puts `served` on the board: new syncs get their first slot (from
    /// their last run in the state), changed schedules their next slot,
    /// syncs no longer served leave (a run in flight ends as it would).
    fn arrange(&self, engine: &Engine, served: &[String], starting: bool) {
        let now = chrono::Utc::now();
        let new: Vec<String> = {
            let board = self.board();
            served.iter().filter(|n| !board.syncs.contains_key(*n)).cloned().collect()
        };
        // The state is read before the board is locked.
        let mut slots = Vec::new();
        let histories = if new.is_empty() {
            Vec::new()
        } else {
            engine.history(&new, RECENT).unwrap_or_else(|e| {
                tracing::warn!(error = %engine.env.redact(&e.to_string()), "cannot read the run history");
                Vec::new()
            })
        };
        for name in &new {
            let schedule = engine.project.sync(name).ok().and_then(|s| s.spec.schedule.clone());
            let records = histories.iter().find(|h| &h.sync == name).map(|h| h.runs.clone()).unwrap_or_default();
            let last_start = records.first().and_then(|r| parse_time(&r.started_at));
            let next = schedule.as_ref().and_then(|s| {
                if starting || last_start.is_some() {
                    schedule::first_slot(s, last_start, now, self.options.once)
                } else if s.every.is_some() {
                    // Added by a reload: an interval sync starts now, a cron sync at its next slot.
                    Some(now)
                } else {
                    schedule::next_slot(s, now)
                }
            });
            let mut recent: VecDeque<RunEntry> = records.iter().map(RunEntry::recorded).collect();
            for entry in recent.iter_mut().filter(|r| r.rejected > 0) {
                match engine.rejections(name, &entry.run_id) {
                    Ok(mut rejected) => {
                        rejected.truncate(20);
                        entry.failures = rejected;
                    }
                    Err(e) => tracing::debug!(sync = name, error = %e, "cannot read a run's rejections"),
                }
            }
            if let Some(success) = records.iter().find(|r| r.status == "succeeded") {
                self.metrics.seed_success(name, success.ended_at.as_deref().and_then(parse_time));
            }
            let health =
                records.iter().find_map(|r| alerts::Health::of_status(&r.status)).unwrap_or(alerts::Health::Ok);
            let slot = Slot {
                schedule,
                next,
                current: None,
                failures: 0,
                backing_off: None,
                recent,
                once_done: false,
                health,
            };
            slots.push((name.clone(), slot));
        }
        let mut board = self.board();
        board.syncs.retain(|name, _| served.contains(name));
        let queue = std::mem::take(&mut board.queue);
        board.queue = queue.into_iter().filter(|(s, _)| served.contains(s)).collect();
        for (name, slot) in &mut board.syncs {
            let schedule = engine.project.sync(name).ok().and_then(|s| s.spec.schedule.clone());
            if slot.schedule != schedule {
                // A changed schedule: its next slot, unless the old one is
                // overdue (then it runs now).
                let overdue = slot.next.is_some_and(|at| at <= now);
                slot.next =
                    schedule.as_ref().and_then(|s| if overdue { Some(now) } else { schedule::next_slot(s, now) });
                slot.schedule = schedule;
            }
        }
        for (name, slot) in slots {
            for entry in slot.recent.iter().rev() {
                board.runs.insert(entry.run_id.clone(), entry.clone());
            }
            board.syncs.insert(name, slot);
        }
    }

    /// Re-reads the project files (SIGHUP). A project that no longer loads
    /// keeps the old definitions; its errors are returned (and logged).
    pub fn reload(&self) -> Result<(), EngineError> {
        if self.options.once {
            tracing::info!("reload ignored: `serve --once` runs what was due when it started");
            return Ok(());
        }
        let loaded = Engine::load(&self.dir, self.env.clone()).and_then(|e| {
            let engine = e
                .stopping_on(self.stop.clone(), self.abort.clone())
                .observed_by(Arc::new(Observer(self.metrics.clone())));
            let served = served(&engine, &self.options)?;
            Ok((engine, served))
        });
        let (engine, served) = match loaded {
            Ok(l) => l,
            Err(e) => {
                let message = self.engine().env.redact(&e.to_string());
                tracing::error!("reload failed; the previous definitions stay in use:\n{message}");
                return Err(e);
            }
        };
        if engine.checked.serve.listen != self.engine().checked.serve.listen {
            tracing::warn!("serve.listen changed: it takes effect when serve restarts");
        }
        let engine = Arc::new(engine);
        self.arrange(&engine, &served, false);
        *self.engine.write().expect("engine lock") = engine;
        tracing::info!(syncs = served.len(), "reloaded the project");
        self.wake.notify_one();
        Ok(())
    }

    /// Starts a run of `sync` now (or as soon as a run slot frees); the run
    /// id is returned at once.
    pub fn trigger(&self, sync: &str) -> Result<String, TriggerError> {
        if self.shutdown.is_cancelled() {
            return Err(TriggerError::Stopping);
        }
        let mut board = self.board();
        let Some(slot) = board.syncs.get(sync) else { return Err(TriggerError::Unknown(sync.to_string())) };
        if let Some(run_id) = &slot.current {
            return Err(TriggerError::Busy { sync: sync.to_string(), run_id: run_id.clone() });
        }
        if let Some((_, run_id)) = board.queue.iter().find(|(s, _)| s == sync) {
            return Err(TriggerError::Busy { sync: sync.to_string(), run_id: run_id.clone() });
        }
        let run_id = uuid::Uuid::now_v7().to_string();
        board.queue.push_back((sync.to_string(), run_id.clone()));
        board.remember(RunEntry::new(sync, run_id.clone(), "trigger"));
        drop(board);
        tracing::info!(sync, run_id, "run triggered");
        self.wake.notify_one();
        Ok(run_id)
    }

    /// A run this service knows of.
    pub fn run_status(&self, run_id: &str) -> Option<RunEntry> {
        self.board().runs.get(run_id).cloned()
    }

    /// Stops the scheduler: no new run starts; runs in flight drain
    /// (within `serve.drain_timeout`, then their requests are cancelled).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Runs the scheduler until [`Service::shutdown`] (or, with `--once`,
    /// until every due sync ran once), calling `report` after every run.
    pub async fn serve(
        self: &Arc<Self>,
        report: &mut dyn FnMut(&str, Result<&RunReport, &EngineError>),
    ) -> Result<Served, EngineError> {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let mut served = Served::default();
        let mut finish = |this: &Arc<Self>, done: Done, served: &mut Served| {
            match &done.result {
                Ok(r) => {
                    served.partial |= !r.complete();
                    report(&done.sync, Ok(r));
                }
                Err(e) if is_busy(e) => {}
                Err(e) => {
                    served.failed = true;
                    report(&done.sync, Err(e));
                }
            }
            this.finished(done);
        };
        if self.options.once {
            let now = chrono::Utc::now();
            for slot in self.board().syncs.values_mut() {
                if slot.next.is_none_or(|at| at > now) {
                    slot.once_done = true;
                }
            }
        }
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            let wake_at = self.start_due(&done_tx);
            if self.options.once {
                let board = self.board();
                if board.running == 0 && board.queue.is_empty() && board.syncs.values().all(|s| s.once_done) {
                    break;
                }
            }
            let sleep = match wake_at {
                Some(at) => (at - chrono::Utc::now()).to_std().unwrap_or_default(),
                None => std::time::Duration::from_secs(3600),
            };
            tokio::select! {
                Some(done) = done_rx.recv() => finish(self, done, &mut served),
                _ = tokio::time::sleep(sleep) => {}
                _ = self.wake.notified() => {}
                _ = self.shutdown.cancelled() => {}
            }
        }
        // Draining: runs in flight end their requests; past the drain time
        // their requests are cancelled.
        self.stop.cancel();
        let running = self.board().running;
        if running > 0 {
            tracing::info!(runs = running, "stopping: draining the runs in flight");
        }
        let deadline = tokio::time::Instant::now() + self.settings().drain_timeout;
        let mut aborted = false;
        while self.board().running > 0 {
            tokio::select! {
                Some(done) = done_rx.recv() => finish(self, done, &mut served),
                _ = tokio::time::sleep_until(deadline), if !aborted => {
                    tracing::warn!("the drain time ran out: cancelling the requests in flight (they stay pending)");
                    self.abort.cancel();
                    aborted = true;
                }
                _ = tokio::time::sleep_until(deadline + ABANDON_AFTER), if aborted => {
                    // Still reading or diffing their query: nothing was sent
                    // for them; the state is crash-safe, so they are left.
                    tracing::warn!(runs = self.board().running, "runs still reading their query are abandoned (nothing was sent for them)");
                    break;
                }
            }
        }
        // Alerts and events about the last runs go out before the exit.
        let messages = std::mem::take(&mut *self.messages.lock().expect("messages lock"));
        if tokio::time::timeout(MESSAGES_AFTER, futures_join(messages)).await.is_err() {
            tracing::warn!("some alerts or events could not be sent before the exit");
        }
        Ok(served)
    }

    /// Starts what is due while run slots are free: triggered runs first,
    /// then scheduled syncs by slot. Returns when to look again.
    fn start_due(self: &Arc<Self>, done: &mpsc::UnboundedSender<Done>) -> Option<Time> {
        let limit = self.settings().max_concurrent_runs;
        let now = chrono::Utc::now();
        let mut board = self.board();
        let mut starts: Vec<(String, String, Option<Time>, &'static str)> = Vec::new();
        let mut waiting = VecDeque::new();
        while let Some((sync, run_id)) = board.queue.pop_front() {
            if board.running + starts.len() >= limit {
                waiting.push_back((sync, run_id));
                continue;
            }
            starts.push((sync, run_id, None, "trigger"));
        }
        board.queue = waiting;
        let mut due: Vec<(Time, String)> = board
            .syncs
            .iter()
            .filter(|(name, s)| s.current.is_none() && !s.once_done && !starts.iter().any(|(n, ..)| n == *name))
            .filter_map(|(name, s)| s.next.filter(|at| *at <= now).map(|at| (at, name.clone())))
            .collect();
        due.sort();
        for (at, sync) in due {
            if board.running + starts.len() >= limit {
                break;
            }
            let trigger = if self.options.once { "once" } else { "schedule" };
            starts.push((sync, uuid::Uuid::now_v7().to_string(), Some(at), trigger));
        }
        for (sync, run_id, slot_at, trigger) in starts {
            let mut entry =
                board.runs.get(&run_id).cloned().unwrap_or_else(|| RunEntry::new(&sync, run_id.clone(), trigger));
            entry.status = "running".into();
            entry.started_at = Some(backflow_diff::now());
            let engine = self.engine();
            self.sending(alerts::send(&engine.checked.events, &sync, &alerts::event(&entry), &engine.env));
            board.remember(entry);
            if let Some(slot) = board.syncs.get_mut(&sync) {
                slot.current = Some(run_id.clone());
                if self.options.once {
                    slot.once_done = true;
                }
            }
            board.running += 1;
            self.metrics.started(slot_at.map(|at| (now - at).to_std().unwrap_or_default()));
            self.spawn_run(sync, run_id, slot_at.is_some(), done.clone());
        }
        if board.running >= limit {
            return None;
        }
        board.syncs.values().filter(|s| s.current.is_none() && !s.once_done).filter_map(|s| s.next).min()
    }

    fn spawn_run(self: &Arc<Self>, sync: String, run_id: String, scheduled: bool, done: mpsc::UnboundedSender<Done>) {
        let engine = self.engine();
        let handle = tokio::runtime::Handle::current();
        tracing::info!(sync, run_id, "run started");
        let thread = {
            let (sync, run_id, engine, done) = (sync.clone(), run_id.clone(), engine.clone(), done.clone());
            std::thread::Builder::new().name(format!("run {sync}")).spawn(move || {
                let started = Instant::now();
                // A panic must not leave the sync "running" for ever.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    handle.block_on(engine.run_as(&sync, false, &run_id, &NoProgress))
                }))
                .unwrap_or_else(|_| {
                    Err(EngineError::Usage("the run panicked; see the log (its records stay pending)".into()))
                });
                let seconds = started.elapsed().as_secs_f64();
                let _ = done.send(Done { sync, run_id, scheduled, engine, result, seconds });
            })
        };
        if let Err(e) = thread {
            let result = Err(EngineError::Usage(format!("cannot start a thread for the run: {e}")));
            let _ = done.send(Done { sync, run_id, scheduled, engine, result, seconds: 0.0 });
        }
    }

    /// Books a run that ended: its entry, metrics, the sync's failures in a
    /// row and next slot (skipping those a long run missed, or backing off).
    fn finished(&self, done: Done) {
        let Done { sync, run_id, scheduled, engine, result, seconds } = done;
        let settings = engine.checked.serve.clone();
        let now = chrono::Utc::now();
        let mut board = self.board();
        board.running -= 1;
        self.metrics.stopped();
        let mut entry =
            board.runs.get(&run_id).cloned().unwrap_or_else(|| RunEntry::new(&sync, run_id.clone(), "schedule"));
        entry.finished(&result, &engine, seconds);
        self.metrics.run_ended(&sync, &entry.status, result.as_ref().ok(), seconds);
        match &result {
            Ok(r) => tracing::info!(
                sync, run_id, status = %r.status, seconds, delivered = r.delivered_total(), rejected = r.rejected,
                pending = r.pending, "run ended"
            ),
            Err(_) if entry.status == "skipped" => {
                tracing::info!(sync, run_id, "run skipped: the sync is already running in another process")
            }
            Err(_) => tracing::warn!(sync, run_id, error = entry.message.as_deref().unwrap_or(""), "run failed"),
        }
        let failed =
            entry.status == "failed" || (entry.status == "partial" && entry.delivered == 0 && entry.message.is_some());
        self.sending(alerts::send(&engine.checked.events, &sync, &alerts::event(&entry), &engine.env));
        let degraded_when = engine.project.sync(&sync).ok().and_then(|s| s.spec.degraded_when.clone());
        let judged = alerts::judge(&entry, degraded_when.as_ref());
        board.remember(entry.clone());
        let Some(slot) = board.syncs.get_mut(&sync) else { return };
        slot.current = None;
        // A run cut short by the service stopping says nothing of the
        // sync's health.
        let stopping = self.shutdown.is_cancelled();
        if let Some((health, reasons)) = judged.filter(|_| !stopping) {
            if let Some(alert) = alerts::alert(&entry, slot.health, health, &reasons) {
                tracing::warn!(sync, health = ?health, reasons = %reasons.join("; "), "sync health changed: alerting");
                self.sending(alerts::send(&engine.checked.alerts, &sync, &alert, &engine.env));
            }
            slot.health = health;
        }
        if entry_is_skip(&result) || stopping {
            // Another process runs it (its next slot stands), or the
            // service stopped it.
        } else if failed {
            slot.failures += 1;
        } else {
            slot.failures = 0;
            slot.backing_off = None;
        }
        self.metrics.failures(&sync, slot.failures);
        let Some(schedule) = slot.schedule.clone() else { return };
        let Some(next) = slot.next else { return };
        let lag = match (entry.started_at.as_deref().and_then(parse_time), scheduled) {
            (Some(started), true) if started - next > chrono::TimeDelta::seconds(1) => {
                format!(
                    "{:.1}s after its slot, waiting for a free run slot",
                    (started - next).num_milliseconds() as f64 / 1000.0
                )
            }
            _ => "on time".to_string(),
        };
        // A scheduled run was for slot `next`; a triggered run leaves it
        // standing unless it passed meanwhile.
        let (mut upcoming, missed) = if scheduled {
            schedule::skip_missed(&schedule, next, now)
        } else if next <= now {
            let (n, m) = schedule::skip_missed(&schedule, next, now);
            (n, m + 1)
        } else {
            (Some(next), 0)
        };
        if scheduled && missed > 0 {
            tracing::warn!(
                sync,
                missed,
                "the run (started {lag}, took {seconds:.1}s) ended past {missed} slot(s) of its schedule: skipped them \
                 (no catch-up runs)"
            );
        } else if !scheduled && missed > 0 {
            tracing::info!(sync, missed, "a triggered run covered {missed} slot(s): skipped them");
        }
        if slot.failures > 0 && !entry_is_skip(&result) {
            let wait = schedule::backoff(slot.failures, settings.failure_backoff, settings.max_failure_backoff);
            let earliest = now + chrono::TimeDelta::from_std(wait).unwrap_or_default();
            if upcoming.is_some_and(|at| at < earliest) {
                upcoming = schedule::slot_at_or_after(&schedule, next, earliest);
            }
            let when = upcoming.map_or("never".into(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            let why = format!(
                "{} failure(s) in a row: backing off {}, next attempt at {when}",
                slot.failures,
                backflow_core::Duration(wait)
            );
            tracing::warn!(sync, failures = slot.failures, next = %when, "{why}");
            slot.backing_off = Some(why);
        }
        slot.next = upcoming;
    }

    /// Keeps `tasks` (messages being sent) until they end.
    fn sending(&self, tasks: Vec<tokio::task::JoinHandle<()>>) {
        let mut messages = self.messages.lock().expect("messages lock");
        messages.retain(|t| !t.is_finished());
        messages.extend(tasks);
    }

    /// Whether the endpoint should say ready: the schedule is loaded, the
    /// state folder can be written, and the service is not stopping.
    fn readiness(&self) -> Result<(), String> {
        if self.shutdown.is_cancelled() {
            return Err("stopping".into());
        }
        let dir = self.engine().project.state_dir();
        std::fs::create_dir_all(&dir)
            .and_then(|()| tempfile_probe(&dir))
            .map_err(|e| format!("the state folder {} cannot be written: {e}", dir.display()))
    }
}

/// Waits for every task.
async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

fn entry_is_skip(result: &Result<RunReport, EngineError>) -> bool {
    matches!(result, Err(e) if is_busy(e))
}

/// Writes and removes a small file in `dir`.
fn tempfile_probe(dir: &std::path::Path) -> std::io::Result<()> {
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!(".ready-{}-{n}", std::process::id()));
    std::fs::write(&path, b"ok")?;
    std::fs::remove_file(&path)
}

/// The syncs `options` select (all when none is named).
fn served(engine: &Engine, options: &ServeOptions) -> Result<Vec<String>, EngineError> {
    if options.select.is_empty() {
        return Ok(engine.project.syncs.iter().map(|s| s.name.clone()).collect());
    }
    Ok(engine.project.select(&options.select)?)
}
