//! The fault scenarios: transient failures, a receiver down for a run,
//! permanent rejections, SIGKILL soaks (per record, batched, concurrency
//! 32), a disk that fills, and a warehouse connection lost mid-query.

use crate::Tally;
use crate::harness::{Bench, STALL, Verdict};
use backflow_diff::StateStore;
use backflow_testkit::faults::{Fault, FaultPlan};
use std::sync::Arc;
use std::time::Duration;

pub fn all(tally: &mut Tally, iterations: usize) {
    type Scenario = fn(&mut Tally, usize) -> Verdict;
    let scenarios: [(&str, Scenario); 10] = [
        ("transient failures over runs with edits", transient_failures),
        ("receiver down for a whole run", receiver_down_for_a_run),
        ("permanent rejections of some records", permanent_rejections),
        ("unconfirmed records whose rows left, outside mirror mode", unconfirmed_outside_mirror),
        ("SIGKILL soak, one record per request", |t, n| kill_soak(t, n, "", 1)),
        ("SIGKILL soak, batches of 1000", |t, n| kill_soak(t, n, "  batch_size: 1000\n", 2)),
        ("SIGKILL soak, concurrency 32", |t, n| kill_soak(t, n, "  concurrency: 32\n", 3)),
        ("SIGKILL soak, staged query", |t, n| kill_soak_staged(t, n)),
        ("a disk that fills while the state is written", disk_full),
        ("the warehouse connection lost mid-query", postgres_connection_lost),
    ];
    for (name, scenario) in scenarios {
        let started = std::time::Instant::now();
        let verdict = scenario(tally, iterations);
        eprintln!("scenario `{name}`: {verdict:?} in {:.1}s", started.elapsed().as_secs_f64());
        assert!(verdict.held(), "scenario `{name}` broke the promise: {verdict:?}");
        tally.verdict.add(verdict);
        if !tally.skipped.iter().any(|(skipped, _)| name.contains(skipped.as_str())) {
            tally.scenarios += 1;
        }
    }
}

/// 30% of requests fail (every kind of fault) over six runs, with inserts,
/// updates, deletes, keys that leave and come back and values that change
/// back between runs.
fn transient_failures(_: &mut Tally, _: usize) -> Verdict {
    let mut bench = Bench::new("mirror", "", 300, 11);
    bench.receiver.set_plan(FaultPlan::every_fault(0.3, STALL));
    for _ in 0..6 {
        let ran = bench.run();
        assert!(ran.code == 0 || ran.code == 1, "a run with transient failures ends 0 or 1\n{}", ran.all());
        let state = bench.check_state();
        assert!(state.held(), "after a faulty run: {state:?}");
        bench.edit(60);
    }
    let (injected, requests) = bench.receiver.injected();
    assert!(Fault::ALL.iter().all(|f| injected.get(f).copied().unwrap_or(0) > 0), "every fault injected: {injected:?}");
    assert!(requests > 500, "{requests} requests");
    bench.settle();
    bench.verdict()
}

/// The receiver refuses connections for a whole run (the run ends partial
/// with everything pending), then comes back.
fn receiver_down_for_a_run(_: &mut Tally, _: usize) -> Verdict {
    let mut bench = Bench::new("mirror", "  circuit_breaker: 5\n", 200, 12);
    bench.settle();
    bench.edit(80);
    bench.receiver.set_down(true);
    let ran = bench.run();
    assert_eq!(ran.code, 1, "records left pending: exit 1\n{}", ran.all());
    assert!(ran.all().contains("pending"), "{}", ran.all());
    bench.receiver.set_down(false);
    bench.settle();
    bench.verdict()
}

/// Records with score 3 are refused with 422: reported with status and
/// reason, the others delivered, and sent again (same message id) by the
/// next run once accepted.
fn permanent_rejections(_: &mut Tally, _: usize) -> Verdict {
    let bench = Bench::new("mirror", "", 200, 13);
    let refused = bench.table.values().filter(|(_, score)| *score == 3).count();
    assert!(refused > 10);
    bench.receiver.set_plan(FaultPlan {
        reject: Some(Arc::new(|record: &serde_json::Value| (record["score"] == 3).then_some(422))),
        ..FaultPlan::none()
    });
    let ran = bench.run();
    assert_eq!(ran.code, 1, "{}", ran.all());
    assert!(ran.all().contains(&format!("rejected {refused}")), "{}", ran.all());
    assert!(ran.all().contains("422"), "the status is reported\n{}", ran.all());
    let delivered = bench.view();
    assert_eq!(delivered.len(), 200 - refused, "the other records were delivered");
    let store = StateStore::open(&bench.state_dir(), "s", "256MB").unwrap();
    let run = store.runs(1).unwrap().remove(0);
    let rejections = store.rejections(&run.run_id).unwrap();
    drop(store);
    assert_eq!(rejections.len(), refused);
    assert!(rejections.iter().all(|r| r.status == Some(422) && r.reason.contains("422")), "{rejections:?}");
    bench.settle();
    let accepted = bench.receiver.accepted();
    for r in &rejections {
        let key: serde_json::Value = serde_json::from_str(&r.key).unwrap();
        let sent = accepted.iter().find(|a| a.key == key).expect("the refused record delivered");
        assert_eq!(sent.message_id, r.message_id, "sent again under the same message id");
    }
    bench.verdict()
}

/// Upsert and append mode: records that failed (503, retried, left
/// unconfirmed) and whose rows then left the query are still delivered, as
/// they were, by the next run — they were changes.
fn unconfirmed_outside_mirror(_: &mut Tally, _: usize) -> Verdict {
    let mut verdict = Verdict::default();
    for (mode, seed) in [("upsert", 16), ("append", 17)] {
        let mut bench = Bench::new(mode, "", 120, seed);
        bench.receiver.set_plan(FaultPlan {
            reject: Some(Arc::new(|record: &serde_json::Value| (record["score"] == 3).then_some(503))),
            ..FaultPlan::none()
        });
        let ran = bench.run();
        assert_eq!(ran.code, 1, "{mode}: records left pending\n{}", ran.all());
        let failed: Vec<(i64, serde_json::Value)> =
            bench.expected().into_iter().filter(|(_, payload)| payload["score"] == 3).collect();
        assert!(!failed.is_empty());
        bench.sql("delete from items where score = 3");
        bench.table.retain(|_, (_, score)| *score != 3);
        bench.settle();
        let accepted = bench.receiver.accepted();
        for (id, payload) in &failed {
            if !accepted.iter().any(|a| a.key["id"] == *id && a.payload == *payload) {
                eprintln!("{mode}: key {id} ({payload}) failed, left the query, and never reached the receiver");
                verdict.lost += 1;
            }
        }
        verdict.add(bench.verdict());
    }
    verdict
}

/// `backflow run` killed with SIGKILL at random moments, with rows deleted
/// and changed between kills, and faults injected; the state checked after
/// each kill; then a clean run, and every invariant.
fn kill_soak(tally: &mut Tally, iterations: usize, extra: &str, seed: u64) -> Verdict {
    let mut bench = Bench::new("mirror", extra, 1500, 100 + seed);
    soak(tally, &mut bench, iterations)
}

/// The same over a staged query (the warehouse's `init` makes runs stage
/// the query row by row instead of diffing inside DuckDB).
fn kill_soak_staged(tally: &mut Tally, iterations: usize) -> Verdict {
    let mut bench = Bench::new("mirror", "", 1500, 104);
    std::fs::write(
        bench.dir.path().join("backflow.yaml"),
        "warehouses:\n  wh:\n    type: duckdb\n    path: warehouse.duckdb\n    init: select 1\n",
    )
    .unwrap();
    soak(tally, &mut bench, iterations.div_ceil(2))
}

fn soak(tally: &mut Tally, bench: &mut Bench, iterations: usize) -> Verdict {
    let (first, ran) = bench.timed_run();
    assert_eq!(ran.code, 0, "{}", ran.all());
    bench.edit(300);
    let (span, _) = bench.timed_run();
    // Kills land anywhere from the start of the process to a little past
    // the end of a typical run: opening, the query, the diff, sending,
    // acknowledgement commits and the fold.
    let span = (span.max(first / 2) * 3) / 2;
    bench.receiver.set_plan(FaultPlan::every_fault(0.1, STALL));
    let mut verdict = Verdict::default();
    for _ in 0..iterations {
        bench.edit(40);
        let (landed, state) = bench.kill_run(span);
        tally.kills += 1;
        tally.kills_mid_run += usize::from(landed);
        assert!(state.held(), "after a kill: {state:?}");
        verdict.add(state);
    }
    bench.settle();
    verdict.add(bench.verdict());
    // A long clean delivery is known as delivered whole: the next run
    // sends nothing (its last acknowledgements are committed too).
    bench.insert_rows(4000);
    bench.settle();
    verdict.add(bench.verdict());
    verdict
}

/// The state lives on a small file system that fills while a run writes
/// it: the run fails with a clear error, the state stays usable, and once
/// there is room again nothing was lost. Needs `mount` (root); skipped with
/// the reason printed when the file system cannot be made.
fn disk_full(tally: &mut Tally, _: usize) -> Verdict {
    let mut bench = Bench::new("mirror", "", 200, 14);
    let mount = bench.dir.path().join("small");
    std::fs::create_dir(&mount).unwrap();
    let mounted =
        std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"]).arg(&mount).output();
    match mounted {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let why = format!("cannot mount a tmpfs ({})", String::from_utf8_lossy(&out.stderr).trim());
            return tally.skip("a disk that fills", &why);
        }
        Err(e) => return tally.skip("a disk that fills", &format!("no `mount` command ({e})")),
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    std::fs::write(
        bench.dir.path().join("backflow.yaml"),
        format!(
            "warehouses:\n  wh:\n    type: duckdb\n    path: warehouse.duckdb\nstate:\n  dir: {}\n",
            mount.join("state").display()
        ),
    )
    .unwrap();
    let ran = bench.run();
    assert_eq!(ran.code, 0, "{}", ran.all());
    // Leave almost no room, then make a run write much more.
    let filler = mount.join("filler");
    let free = fs_free(&mount);
    std::fs::write(&filler, vec![0u8; free.saturating_sub(64 * 1024) as usize]).unwrap();
    let wide = "x".repeat(2000);
    bench.sql(&format!("update items set name = name || '{wide}'"));
    for (name, _) in bench.table.values_mut() {
        name.push_str(&wide);
    }
    let ran = bench.run();
    assert_eq!(ran.code, 2, "a full disk is a fatal error\n{}", ran.all());
    let said = ran.stderr.to_lowercase();
    assert!(
        said.contains("no space") || said.contains("space left") || said.contains("disk"),
        "the error says the disk is full\n{}",
        ran.all()
    );
    assert_eq!(said.matches("error:").count(), 1, "said once\n{}", ran.stderr);
    std::fs::remove_file(&filler).unwrap();
    let state = bench.check_state();
    assert!(state.held(), "the state is usable after the disk filled: {state:?}");
    bench.edit(20);
    bench.settle();
    bench.verdict()
}

fn fs_free(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("df").args(["--output=avail", "-B1"]).arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap()
}

/// A Postgres warehouse whose backend is terminated mid-query: a clear error
/// naming the sync, nothing sent or committed, the next run correct.
fn postgres_connection_lost(tally: &mut Tally, _: usize) -> Verdict {
    use backflow_testkit::postgres::TestDatabase;
    let Some(db) = TestDatabase::create() else {
        return tally.skip("the warehouse connection lost", "no Postgres (with CI=true this fails instead)");
    };
    let bench = Bench::new("mirror", "", 0, 15);
    db.execute(
        "create table items (id BIGINT PRIMARY KEY, name TEXT, score BIGINT);
         insert into items select i, 'n' || i, i % 4 from generate_series(1, 50) i;",
    );
    std::fs::write(
        bench.dir.path().join("backflow.yaml"),
        format!("warehouses:\n  wh:\n    type: postgres\n    url: \"{}\"\n", db.url),
    )
    .unwrap();
    let sync = std::fs::read_to_string(bench.dir.path().join("syncs/s.yaml")).unwrap();
    let slow = sync.replace(
        "query: select id, name, score from items",
        "query: select id, name, score from items, (select pg_sleep(3)) as slow",
    );
    std::fs::write(bench.dir.path().join("syncs/s.yaml"), slow).unwrap();
    let child = bench
        .command(&["run", "s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Terminate the backend running the query once it runs.
    let running = "from pg_stat_activity where datname = current_database() and query like '%pg_sleep(3)%' \
                   and pid <> pg_backend_pid()";
    let mut terminated = false;
    for _ in 0..200 {
        std::thread::sleep(Duration::from_millis(25));
        if db.query_i64(&format!("select count(*) {running}")) > 0 {
            db.execute(&format!("select pg_terminate_backend(pid) {running}"));
            terminated = true;
            break;
        }
    }
    assert!(terminated, "the query's backend was found and terminated");
    let ran = crate::common::finish(child.wait_with_output().unwrap());
    assert_eq!(ran.code, 2, "{}", ran.all());
    assert!(ran.stderr.contains("sync `s`"), "the error names the sync\n{}", ran.stderr);
    assert!(bench.receiver.accepted().is_empty(), "nothing sent");
    assert!(bench.check_state().held());
    if StateStore::path(&bench.state_dir(), "s").exists() {
        let store = StateStore::open(&bench.state_dir(), "s", "256MB").unwrap();
        assert!(store.snapshot_rows().unwrap().is_empty(), "nothing committed");
    }
    std::fs::write(bench.dir.path().join("syncs/s.yaml"), sync).unwrap();
    let mut bench = bench;
    bench.table = (1..=50).map(|i| (i, (format!("n{i}"), i % 4))).collect();
    bench.settle();
    bench.verdict()
}
