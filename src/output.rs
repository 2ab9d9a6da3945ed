//! What the commands print: text for people, `--json` for machines, and a
//! progress bar when stderr is a terminal.

use backflow_diff::KeyRecord;
use backflow_engine::{CheckReport, Engine, Plan, Progress, RunReport, SyncHistory};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;

pub struct Output {
    pub json: bool,
}

fn pretty(v: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

impl Output {
    pub fn validated(&self, engine: &Engine) {
        let syncs: Vec<_> = engine
            .project
            .syncs
            .iter()
            .map(|s| serde_json::json!({"name": s.name, "mode": s.spec.mode, "warehouse": s.spec.warehouse}))
            .collect();
        if self.json {
            say!("{}", pretty(&serde_json::json!({"valid": true, "syncs": syncs})));
            return;
        }
        say!("ok: {} sync(s) valid", syncs.len());
        for s in &engine.project.syncs {
            say!("  {:<24} {:<7} warehouse {}", s.name, s.spec.mode, s.spec.warehouse);
        }
    }

    /// One plan as a JSON object, several as an array.
    pub fn plans(&self, plans: &[Plan]) {
        if self.json {
            match plans {
                [one] => say!("{}", pretty(one)),
                many => say!("{}", pretty(&many)),
            }
            return;
        }
        for plan in plans {
            self.plan(plan);
        }
    }

    fn plan(&self, plan: &Plan) {
        let c = &plan.counts;
        say!(
            "plan for {} (mode {}{}) — nothing sent, nothing committed",
            plan.sync,
            plan.mode,
            if plan.full { ", full" } else { "" }
        );
        say!(
            "  rows {}: added {}, changed {}, removed {}, unchanged {}",
            c.rows,
            c.added,
            c.changed,
            c.removed,
            c.unchanged
        );
        let ops: Vec<String> = plan.ops.iter().map(|(op, n)| format!("{op} {n}")).collect();
        let ops = if ops.is_empty() { String::new() } else { format!(": {}", ops.join(", ")) };
        say!("  would send {} record(s){ops}", c.to_send);
        if c.forgotten > 0 {
            say!("  would forget {} removed key(s) (mode {} sends nothing for them)", c.forgotten, plan.mode);
        }
        if plan.in_warehouse {
            say!("  diffed inside the warehouse's DuckDB (only rows that may differ were read out)");
        }
        if plan.mapping_changed {
            say!("  the mapping changed since the last delivery: rows whose payload it changes are re-sent");
        }
        if plan.invalid_keys.skipped {
            say!(
                "  skipping rows with invalid keys: {} with NULL, {} duplicated",
                plan.invalid_keys.null_rows,
                plan.invalid_keys.duplicate_rows
            );
        }
        for (i, sample) in plan.samples.iter().enumerate() {
            say!("  sample {}: {}", i + 1, sample);
        }
        if !plan.diff.is_empty() {
            say!("  changes, field by field (first {}):", plan.diff.len());
        }
        for d in &plan.diff {
            match d.change {
                backflow_core::Change::Removed => say!("  - {} ({}): would remove", d.key, d.op),
                _ => say!("  ~ {} ({})", d.key, d.op),
            }
            for f in &d.fields {
                match d.change {
                    backflow_core::Change::Removed => say!("      {}: {}", f.field, f.old),
                    _ => say!("      {}: {} → {}", f.field, f.old, f.new),
                }
            }
        }
    }

    pub fn run(&self, r: &RunReport) {
        if self.json {
            return;
        }
        let c = &r.counts;
        let delivered: Vec<String> = r.delivered.iter().map(|(op, n)| format!("{op} {n}")).collect();
        say!(
            "{}: {} in {:.1}s — rows {}: added {}, changed {}, removed {}, unchanged {}; delivered {}{}; rejected {}; pending {}",
            r.sync,
            r.status,
            r.seconds,
            c.rows,
            c.added,
            c.changed,
            c.removed,
            c.unchanged,
            r.delivered_total(),
            if delivered.is_empty() { String::new() } else { format!(" ({})", delivered.join(", ")) },
            r.rejected,
            r.pending
        );
        if c.forgotten > 0 {
            say!("  forgot {} removed key(s)", c.forgotten);
        }
        if r.mapping_changed {
            say!("  the mapping changed since the last delivery");
        }
        if r.invalid_keys.skipped {
            say!(
                "  skipped rows with invalid keys: {} with NULL, {} duplicated ({} keys)",
                r.invalid_keys.null_rows,
                r.invalid_keys.duplicate_rows,
                r.invalid_keys.duplicate_keys
            );
        }
        if let Some(why) = &r.stopped_early {
            say!("  {why}");
        }
        for f in &r.failures {
            let status = f.status.map_or("-".to_string(), |s| s.to_string());
            say!(
                "  failed {} {} [{}] {}{}",
                f.op,
                f.key,
                status,
                f.reason,
                if f.body.is_empty() { String::new() } else { format!(": {}", f.body.trim()) }
            );
        }
        // More failures than shown were recorded (records left pending by a
        // stop are not failures: the stop says why).
        if (r.rejected as usize) > r.failures.len()
            || (r.stopped_early.is_none() && (r.rejected + r.pending) as usize > r.failures.len())
        {
            say!("  (see `backflow history {} --rejections` for all)", r.sync);
        }
    }

    pub fn check(&self, r: &CheckReport) {
        if self.json {
            say!(
                "{}",
                serde_json::json!({
                    "sync": r.sync,
                    "ok": r.ok(),
                    "source": r.source.as_ref().map_err(String::as_str).map_or_else(|e| serde_json::json!({"error": e}), |c| serde_json::json!({"columns": c})),
                    "destination": r.destination.as_ref().map_err(String::as_str).map_or_else(|e| serde_json::json!({"error": e}), |a| serde_json::json!({"address": a})),
                })
            );
            return;
        }
        match &r.source {
            Ok(columns) => say!("{}: source ok ({} columns: {})", r.sync, columns.len(), columns.join(", ")),
            Err(e) => say!("{}: source FAILED: {e}", r.sync),
        }
        match &r.destination {
            Ok(addr) => say!("{}: destination reachable ({addr})", r.sync),
            Err(e) => say!("{}: destination FAILED: {e}", r.sync),
        }
    }

    pub fn test_send(&self, t: &backflow_engine::TestSend) {
        if self.json {
            say!("{}", serde_json::to_string(t).unwrap_or_default());
            return;
        }
        say!("{}: test request ({}; nothing committed)", t.sync, t.op);
        say!("  {}", t.request);
        for (name, value) in &t.headers {
            say!("  {name}: {value}");
        }
        if !t.body.is_empty() {
            say!("");
            say!("  {}", t.body);
        }
        let status = t.status.map_or("no answer".to_string(), |s| s.to_string());
        if t.delivered {
            say!("{}: answer {status}: delivered", t.sync);
        } else {
            say!("{}: answer {status}: NOT delivered: {}", t.sync, t.answer);
        }
    }

    pub fn reset(&self, sync: &str, n: u64) {
        if self.json {
            say!("{}", serde_json::json!({"sync": sync, "forgotten_keys": n}));
        } else {
            say!("{sync}: forgot {n} delivered key(s); the next run sends every row as added");
        }
    }

    pub fn history(&self, engine: &Engine, history: &[SyncHistory], rejections: bool) -> anyhow::Result<()> {
        if self.json {
            let mut out = Vec::new();
            for h in history {
                let mut v = serde_json::to_value(h)?;
                if rejections {
                    let mut rej = serde_json::Map::new();
                    for run in &h.runs {
                        rej.insert(run.run_id.clone(), serde_json::to_value(engine.rejections(&h.sync, &run.run_id)?)?);
                    }
                    v["rejections"] = serde_json::Value::Object(rej);
                }
                out.push(v);
            }
            say!("{}", pretty(&out));
            return Ok(());
        }
        for h in history {
            if h.running {
                say!("{}: running now", h.sync);
                continue;
            }
            if h.runs.is_empty() {
                say!("{}: never run", h.sync);
                continue;
            }
            say!("{}:", h.sync);
            let mut table = comfy_table::Table::new();
            table.load_style(comfy_table::presets::UTF8_HORIZONTAL_ONLY).set_header([
                "started (UTC)",
                "status",
                "duration",
                "rows",
                "added",
                "changed",
                "removed",
                "delivered",
                "rejected",
                "pending",
                "run id",
            ]);
            for column in 2..10 {
                if let Some(c) = table.column_mut(column) {
                    c.set_cell_alignment(comfy_table::CellAlignment::Right);
                }
            }
            let mut notes = Vec::new();
            for run in &h.runs {
                let e = backflow_engine::service::RunEntry::recorded(run);
                let started = run.started_at.replace('T', " ");
                let started = started.split('.').next().unwrap_or(&started).trim_end_matches('Z').to_string();
                table.add_row([
                    started,
                    if run.full { format!("{} (full)", run.status) } else { run.status.clone() },
                    e.seconds.map_or("-".into(), |s| format!("{s:.1}s")),
                    e.rows.to_string(),
                    e.added.to_string(),
                    e.changed.to_string(),
                    e.removed.to_string(),
                    e.delivered.to_string(),
                    e.rejected.to_string(),
                    e.pending.to_string(),
                    run.run_id.clone(),
                ]);
                if let Some(m) = &run.message {
                    notes.push(format!("  {}: {m}", run.run_id));
                }
                if rejections {
                    for f in engine.rejections(&h.sync, &run.run_id)? {
                        notes.push(format!(
                            "  {}: failed {} {} [{}] {}",
                            run.run_id,
                            f.op,
                            f.key,
                            f.status.map_or("-".into(), |s| s.to_string()),
                            f.reason
                        ));
                    }
                }
            }
            say!("{table}");
            for note in notes {
                say!("{note}");
            }
        }
        Ok(())
    }

    pub fn inspect(&self, sync: &str, record: &KeyRecord) {
        if self.json {
            say!("{}", pretty(record));
            return;
        }
        say!("{sync} {}", record.key);
        match &record.delivered {
            Some(d) => {
                say!("  delivered {} at {} (run {}, message {})", d.op, d.delivered_at, d.run_id, d.message_id);
                say!("  payload: {}", d.payload);
            }
            None => say!("  not in the snapshot (never delivered, forgotten, or deleted)"),
        }
        if let Some(u) = &record.unconfirmed {
            say!(
                "  possibly delivered: {} sent by run {} (message {}) without an acknowledgement; the next run sends it \
                 again or deletes the key",
                u.op,
                u.run_id,
                u.message_id
            );
            say!("  payload: {}", u.payload);
        }
        if let Some(r) = &record.last_rejection {
            say!(
                "  last failure at {}: {} [{}] {}",
                r.at,
                r.op,
                r.status.map_or("-".into(), |s| s.to_string()),
                r.reason
            );
        }
    }
}

/// A progress bar on stderr when it is a terminal (and not `--json`).
pub struct TerminalProgress {
    bar: Mutex<Option<ProgressBar>>,
    enabled: bool,
}

impl TerminalProgress {
    pub fn new(json: bool) -> Self {
        TerminalProgress { bar: Mutex::new(None), enabled: !json && std::io::stderr().is_terminal() }
    }
}

impl Progress for TerminalProgress {
    fn phase(&self, sync: &str, phase: &str, total: Option<u64>) {
        if !self.enabled {
            return;
        }
        let bar = match total {
            Some(n) => ProgressBar::new(n).with_style(
                ProgressStyle::with_template("{prefix} {msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{prefix} {msg} {spinner} {pos} rows {per_sec}").expect("valid template"),
            ),
        };
        bar.set_prefix(sync.to_string());
        bar.set_message(phase.to_string());
        *self.bar.lock().expect("progress lock") = Some(bar);
    }

    fn advance(&self, n: u64) {
        if let Some(bar) = &*self.bar.lock().expect("progress lock") {
            bar.inc(n);
        }
    }

    fn done(&self) {
        if let Some(bar) = self.bar.lock().expect("progress lock").take() {
            bar.finish_and_clear();
        }
    }
}
