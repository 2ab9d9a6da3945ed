//! `backflow serve` as a service: runs side by side within the limit,
//! missed slots, backoff, draining on SIGTERM, SIGHUP reloads, `--once`,
//! triggers, `/metrics` parsed as Prometheus text, and the status page in a
//! real browser.

mod common;

use backflow_testkit::{Receiver, Reply};
use common::{Project, Serving, get, http, sync};
use std::time::{Duration, Instant};

const WAREHOUSE: &str = "warehouses:\n  wh:\n    type: duckdb\n    path: warehouse.duckdb\n";

/// A sync whose one row changes on every run (so every run sends one
/// request), to `{URL}/PATH`, with `schedule`.
fn ticking(path: &str, schedule: &str) -> String {
    format!(
        "warehouse: wh\nquery: select 1 as id, epoch_ns(now()) as t\nprimary_key: id\nmode: upsert\n\
         destination:\n  url: \"{{URL}}/{path}\"\n  retry: {{attempts: 1}}\nschedule: {{{schedule}}}\n"
    )
}

fn project(serve: &str, syncs: &[(&str, String)]) -> Project {
    let p = Project::new(&syncs[0].1);
    std::fs::remove_file(p.path().join("syncs/s.yaml")).unwrap();
    for (name, text) in syncs {
        p.write(&format!("syncs/{name}.yaml"), text);
    }
    p.write("backflow.yaml", &format!("{WAREHOUSE}{serve}"));
    p
}

fn to(receiver: &Receiver, path: &str) -> Vec<Instant> {
    receiver.requests().iter().filter(|r| r.target == format!("/{path}")).map(|r| r.arrived).collect()
}

/// Samples of `/metrics`, parsed by a Prometheus text-format parser.
fn metrics(addr: &str) -> Vec<prometheus_parse::Sample> {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200);
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap().samples
}

/// The value of a counter or gauge with these labels (0 when absent).
fn value(samples: &[prometheus_parse::Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn syncs_due_together_run_side_by_side_up_to_the_limit_and_metrics_count_them() {
    let p = project(
        "serve:\n  max_concurrent_runs: 2\n",
        &[("a", ticking("a", "every: 1h")), ("b", ticking("b", "every: 1h")), ("c", ticking("c", "every: 1h"))],
    );
    p.receiver.respond(|_, _| Reply::Stall(Duration::from_millis(1500)));
    let serve = Serving::start(&p, &[]);
    let addr = serve.addr();
    p.receiver.wait_for(3, Duration::from_secs(60));
    let mut at: Vec<Instant> = p.receiver.requests().iter().map(|r| r.arrived).collect();
    at.sort();
    assert!(at[1] - at[0] < Duration::from_millis(1300), "two runs side by side: {:?}", at[1] - at[0]);
    assert!(at[2] - at[0] >= Duration::from_millis(1400), "the third waited for a free slot: {:?}", at[2] - at[0]);
    wait_until("three runs counted", Duration::from_secs(30), || {
        value(&metrics(&addr), "backflow_runs_total", &[("status", "succeeded")]) == 3.0
    });
    let m = metrics(&addr);
    for s in ["a", "b", "c"] {
        assert_eq!(value(&m, "backflow_runs_total", &[("sync", s), ("status", "succeeded")]), 1.0, "{s}");
        assert_eq!(
            value(&m, "backflow_records_total", &[("sync", s), ("op", "upsert"), ("outcome", "delivered")]),
            1.0,
            "{s}"
        );
        assert_eq!(value(&m, "backflow_requests_total", &[("sync", s), ("class", "2xx")]), 1.0, "{s}");
        assert_eq!(value(&m, "backflow_rows_read_total", &[("sync", s)]), 1.0, "{s}");
        assert!(value(&m, "backflow_last_success_timestamp_seconds", &[("sync", s)]) > 1.7e9, "{s}");
    }
    assert_eq!(value(&m, "backflow_request_duration_seconds_count", &[]), 3.0, "one latency per request");
    assert_eq!(value(&m, "backflow_run_duration_seconds_count", &[]), 3.0);
    assert_eq!(value(&m, "backflow_runs_in_flight", &[]), 0.0);
    assert_eq!(get(&addr, "/healthz").0, 200);
    assert_eq!(get(&addr, "/readyz").0, 200);
}

#[test]
fn a_run_past_its_slots_skips_them_once_and_a_failing_sync_backs_off_without_stopping_others() {
    let p = project(
        "serve:\n  failure_backoff: 1s\n  max_failure_backoff: 2s\n",
        &[
            ("slow", ticking("slow", "every: 300ms")),
            (
                "broken",
                ticking("broken", "every: 200ms")
                    .replace("select 1 as id, epoch_ns(now()) as t", "select id, t from missing_table"),
            ),
        ],
    );
    // The first run of `slow` takes 1.6 s: five slots pass meanwhile.
    let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = first.clone();
    p.receiver.respond(move |_, _| {
        if flag.swap(false, std::sync::atomic::Ordering::SeqCst) {
            Reply::Stall(Duration::from_millis(1600))
        } else {
            Reply::Status(200)
        }
    });
    let serve = Serving::start(&p, &[]);
    let addr = serve.addr();
    p.receiver.wait_for(5, Duration::from_secs(60));
    let log = serve.wait_log("slot(s) of its schedule", Duration::from_secs(10));
    let line = log
        .lines()
        .find(|l| l.contains("slot(s) of its schedule") && l.contains("\"slow\""))
        .unwrap_or_else(|| panic!("the long run's slots:\n{log}"));
    let missed: u32 = line.split("past ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(missed >= 4, "about 1.6 s / 300 ms slots: {line}");
    // No burst of catch-up runs: the runs after the long one keep the
    // schedule (one run may start a little late and the next on time, so
    // single gaps vary; a burst would put the missed runs back to back).
    let at = to(&p.receiver, "slow");
    let soon = at[1..].iter().filter(|t| **t - at[1] < Duration::from_millis(400)).count();
    assert!(soon <= 2, "{soon} runs within 400 ms of the long one's end: {at:?}");
    let spacing = (at[at.len() - 1] - at[1]) / (at.len() - 2) as u32;
    assert!(spacing >= Duration::from_millis(250), "runs about 300 ms apart on average, got {spacing:?}: {at:?}");
    // The broken sync fails again and again, backing off, and the other goes on.
    let log = serve.wait_log("failure(s) in a row: backing off", Duration::from_secs(10));
    assert!(log.contains("missing_table"), "{log}");
    std::thread::sleep(Duration::from_secs(3));
    let m = metrics(&addr);
    let failed = value(&m, "backflow_runs_total", &[("sync", "broken"), ("status", "failed")]);
    assert!((2.0..=6.0).contains(&failed), "backed off (without it, about 30 runs): {failed}");
    assert!(value(&m, "backflow_consecutive_failures", &[("sync", "broken")]) >= 2.0);
    assert!(value(&m, "backflow_runs_total", &[("sync", "slow"), ("status", "succeeded")]) >= 8.0);
    let (_, page) = get(&addr, "/");
    assert!(page.contains("backing off"), "{page}");
}

#[test]
fn sigterm_mid_delivery_drains_commits_and_exits_0_and_the_next_run_sends_the_rest_with_the_same_ids() {
    let p = Project::new(&format!("{}schedule: {{every: 1h}}\n", sync("upsert", "  concurrency: 2\n")));
    p.sql("insert into items select range, 'n' || range, range from range(200)");
    p.receiver.respond(|_, _| Reply::Stall(Duration::from_millis(40)));
    let mut serve = Serving::start(&p, &[]);
    p.receiver.wait_for(20, Duration::from_secs(60));
    serve.signal("-TERM");
    assert_eq!(serve.wait(Duration::from_secs(30)), 0, "{}", serve.stderr());
    let first = p.receiver.requests();
    assert!(first.len() < 200, "stopped mid-delivery");
    assert!(serve.stdout().contains("partial"), "{}", serve.stdout());
    // Answered requests were committed: the next run sends only the rest.
    let again = p.backflow(&["run", "s"]);
    assert_eq!(again.code, 0, "{}", again.all());
    let all = p.receiver.requests();
    assert_eq!(all.len(), 200, "each record once: {} then {}", first.len(), all.len() - first.len());
}

#[test]
fn past_the_drain_time_requests_in_flight_are_cancelled_and_stay_pending() {
    let p = project(
        "serve:\n  drain_timeout: 500ms\n",
        &[("s", format!("{}schedule: {{every: 1h}}\n", sync("upsert", "  timeout: 60s\n")))],
    );
    p.sql("insert into items values (1, 'a', 1)");
    p.receiver.respond(|_, n| if n == 0 { Reply::Stall(Duration::from_secs(20)) } else { Reply::Status(200) });
    let mut serve = Serving::start(&p, &[]);
    p.receiver.wait_for(1, Duration::from_secs(60));
    let asked = Instant::now();
    serve.signal("-TERM");
    assert_eq!(serve.wait(Duration::from_secs(15)), 0, "{}", serve.stderr());
    assert!(asked.elapsed() < Duration::from_secs(5), "the drain time bounds the stop: {:?}", asked.elapsed());
    assert!(serve.stderr().contains("drain time ran out"), "{}", serve.stderr());
    let again = p.backflow(&["run", "s"]);
    assert_eq!(again.code, 0, "{}", again.all());
    assert!(again.stdout.contains("delivered 1"), "the cancelled record was pending: {}", again.stdout);
}

#[test]
fn sighup_picks_up_an_edited_sync_and_survives_a_broken_file() {
    let p = project("", &[("s", ticking("first", "every: 200ms"))]);
    let serve = Serving::start(&p, &[]);
    p.receiver.wait_for(1, Duration::from_secs(60));
    p.write("syncs/s.yaml", &ticking("second", "every: 200ms"));
    serve.signal("-HUP");
    serve.wait_log("reloaded the project", Duration::from_secs(10));
    wait_until("a run to the new URL", Duration::from_secs(10), || !to(&p.receiver, "second").is_empty());
    p.write("syncs/s.yaml", "warehouse: wh\nquery: select 1\nprimary_key: [id\n");
    serve.signal("-HUP");
    let log = serve.wait_log("reload failed", Duration::from_secs(10));
    assert!(log.contains("syncs/s.yaml:"), "the error says where: {log}");
    let before = to(&p.receiver, "second").len();
    wait_until("the old definition still runs", Duration::from_secs(10), || {
        to(&p.receiver, "second").len() > before + 1
    });
}

#[test]
fn once_runs_exactly_the_due_syncs_then_exits() {
    let p = project(
        "",
        &[
            ("due", ticking("due", "every: 1h")),
            ("later", ticking("later", "cron: \"0 0 1 1 *\"")),
            ("manual", ticking("manual", "every: 1h").replace("schedule: {every: 1h}\n", "")),
        ],
    );
    // Due: the interval sync that never ran, and the yearly cron sync that
    // never ran (its latest slot, January 1st, passed); not the manual one.
    let mut once = Serving::start_with(p.cmd(&["serve", "--once"]), &[]);
    assert_eq!(once.wait(Duration::from_secs(60)), 0, "{}", once.stderr());
    assert_eq!((to(&p.receiver, "due").len(), to(&p.receiver, "later").len()), (1, 1));
    assert!(to(&p.receiver, "manual").is_empty());
    assert!(!once.stderr().contains("on http://"), "no endpoint under --once: {}", once.stderr());
    // Both ran since their latest slot: nothing is due now.
    let mut again = Serving::start_with(p.cmd(&["serve", "--once"]), &[]);
    assert_eq!(again.wait(Duration::from_secs(60)), 0, "{}", again.stderr());
    assert_eq!(p.receiver.requests().len(), 2);
}

#[test]
fn a_second_serve_on_the_project_skips_runs_that_the_first_holds() {
    let p = project("", &[("s", ticking("s", "every: 300ms"))]);
    p.receiver.respond(|_, n| if n == 0 { Reply::Stall(Duration::from_secs(4)) } else { Reply::Status(200) });
    let _first = Serving::start(&p, &[]);
    p.receiver.wait_for(1, Duration::from_secs(60));
    let second = Serving::start(&p, &[]);
    let addr = second.addr();
    second.wait_log("already running in another process", Duration::from_secs(20));
    let m = metrics(&addr);
    assert!(value(&m, "backflow_runs_total", &[("status", "skipped")]) >= 1.0);
    assert_eq!(value(&m, "backflow_runs_total", &[("status", "failed")]), 0.0, "not a failure");
}

#[test]
fn a_trigger_with_the_token_starts_exactly_one_run_and_others_are_refused() {
    let p =
        project("serve:\n  trigger_token: ${BF_TRIGGER}\n", &[("s", format!("{}tags: [crm]\n", sync("upsert", "")))]);
    p.sql("insert into items values (1, 'a', 1), (2, 'b', 2)");
    let serve = Serving::start_with(
        {
            let mut c = p.cmd(&["serve", "--listen", "127.0.0.1:0"]);
            c.env("BF_TRIGGER", "t0ken-123-abcdefgh");
            c
        },
        &[],
    );
    let addr = serve.addr();
    let (status, _, _) = http("POST", &addr, "/syncs/s/runs", &[]);
    assert_eq!(status, 401);
    let (status, _, _) = http("POST", &addr, "/syncs/s/runs", &[("Authorization", "Bearer wrong")]);
    assert_eq!(status, 401);
    let auth = [("Authorization", "Bearer t0ken-123-abcdefgh")];
    let (status, _, _) = http("POST", &addr, "/syncs/nope/runs", &auth);
    assert_eq!(status, 404);
    assert!(p.receiver.requests().is_empty(), "nothing ran");
    let (status, _, body) = http("POST", &addr, "/syncs/s/runs", &auth);
    assert_eq!(status, 202, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let run_id = answer["run_id"].as_str().unwrap().to_string();
    let mut run = serde_json::Value::Null;
    wait_until("the triggered run ends", Duration::from_secs(30), || {
        let (_, body) = get(&addr, &format!("/runs/{run_id}"));
        run = serde_json::from_str(&body).unwrap();
        run["status"] == "succeeded"
    });
    assert_eq!((run["delivered"].as_u64(), run["trigger"].as_str()), (Some(2), Some("trigger")));
    assert_eq!(p.receiver.requests().len(), 2, "one run");
    let metadata = p.receiver.bodies()[0]["_meta"]["run_id"].clone();
    assert_eq!(metadata, serde_json::json!(run_id), "the run id answered is the run's");
    assert_eq!(get(&addr, "/runs/unknown").0, 404);
    let (_, _, refused) = http("POST", &addr, "/syncs/s/runs", &[("Authorization", "Bearer t0ken-123-abcdefgX")]);
    for text in
        [serve.stderr(), get(&addr, "/").1, get(&addr, "/syncs/s").1, get(&addr, &format!("/runs/{run_id}")).1, refused]
    {
        assert!(!text.contains("t0ken-123-abcdefgh"), "the token leaked: {text}");
    }
}

#[test]
fn triggers_are_off_without_a_token() {
    let p = project("", &[("s", ticking("s", "every: 1h"))]);
    let serve = Serving::start(&p, &[]);
    let (status, _, body) = http("POST", &serve.addr(), "/syncs/s/runs", &[("Authorization", "Bearer x")]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("serve.trigger_token"), "{body}");
}

#[test]
fn select_by_tag_and_glob_runs_only_those_syncs() {
    let p = project(
        "",
        &[
            ("crm_a", format!("{}tags: [crm]\n", ticking("crm_a", "every: 1h"))),
            ("crm_b", ticking("crm_b", "every: 1h")),
            ("ads", format!("{}tags: [ads]\n", ticking("ads", "every: 1h"))),
        ],
    );
    let ran = p.backflow(&["run", "tag:crm"]);
    assert_eq!(ran.code, 0, "{}", ran.all());
    assert_eq!(
        (to(&p.receiver, "crm_a").len(), to(&p.receiver, "crm_b").len(), to(&p.receiver, "ads").len()),
        (1, 0, 0)
    );
    let ran = p.backflow(&["run", "crm_*"]);
    assert_eq!(ran.code, 0, "{}", ran.all());
    assert_eq!((to(&p.receiver, "crm_a").len(), to(&p.receiver, "crm_b").len()), (2, 1));
    let mut once = Serving::start(&p, &["--once", "--select", "tag:ads"]);
    assert_eq!(once.wait(Duration::from_secs(60)), 0, "{}", once.stderr());
    assert_eq!(to(&p.receiver, "ads").len(), 1);
    assert_eq!(p.receiver.requests().len(), 4);
    let plans = p.backflow(&["--json", "plan", "crm_*"]);
    let plans: serde_json::Value = serde_json::from_str(&plans.stdout).unwrap();
    let names: Vec<&str> = plans.as_array().unwrap().iter().map(|p| p["sync"].as_str().unwrap()).collect();
    assert_eq!(names, ["crm_a", "crm_b"]);
    let bad = p.backflow(&["run", "tag:nope"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("matches no sync") && bad.stderr.contains("tags: ads, crm"), "{}", bad.stderr);
}

/// Debian's Chromium, installed when missing.
fn chromium() -> Option<std::path::PathBuf> {
    let path = std::path::PathBuf::from("/usr/bin/chromium");
    if !path.exists() {
        let installed = std::process::Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
        if !installed.is_ok_and(|s| s.success()) {
            let _ = std::process::Command::new("apt-get").args(["update", "-q"]).status();
            let _ = std::process::Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends", "chromium"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
        }
    }
    path.exists().then_some(path)
}

/// Runs headless Chromium on `url` with `args` (e.g. `--dump-dom`).
fn browse(chromium: &std::path::Path, url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_status_page_reads_well_in_a_real_browser() {
    let Some(chromium) = chromium() else {
        assert!(std::env::var("CI").is_err(), "CI needs Debian's chromium (apt-get install chromium)");
        eprintln!("skipped: chromium is not installed and could not be installed");
        return;
    };
    let p = project(
        "",
        &[
            ("contacts", format!("{}schedule: {{every: 1h}}\ntags: [crm]\n", sync("upsert", ""))),
            ("events", ticking("events", "cron: \"0 0 1 1 *\"")),
        ],
    );
    p.sql("insert into items values (1, 'a', 1), (2, 'b', 2), (3, 'c', 3)");
    p.receiver.respond(|r, _| {
        if r.json()["id"] == 2 {
            Reply::Full(422, vec![], "{\"error\":\"email is invalid\"}".into())
        } else {
            Reply::Status(200)
        }
    });
    let serve = Serving::start(&p, &[]);
    let addr = serve.addr();
    wait_until("the run ends", Duration::from_secs(30), || get(&addr, "/").1.contains("partial"));
    let dom = browse(&chromium, &format!("http://{addr}/"), &["--dump-dom"]);
    for text in ["contacts", "events", "every 1h", "cron 0 0 1 1 *", "partial", "never run", "crm"] {
        assert!(dom.contains(text), "`{text}` on the page:\n{dom}");
    }
    assert!(dom.contains("href=\"/syncs/contacts\""), "{dom}");
    let page = browse(&chromium, &format!("http://{addr}/syncs/contacts"), &["--dump-dom"]);
    for text in ["Recent runs", "email is invalid", "422", "Rejected"] {
        assert!(page.contains(text), "`{text}` on the sync's page:\n{page}");
    }
    let shot = tempfile::tempdir().unwrap();
    let png = shot.path().join("status.png");
    browse(
        &chromium,
        &format!("http://{addr}/"),
        &["--window-size=1280,520", &format!("--screenshot={}", png.display())],
    );
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000, "a screenshot of the page");
    if let Ok(keep) = std::env::var("BACKFLOW_SCREENSHOT") {
        std::fs::copy(&png, keep).unwrap();
    }
}

#[test]
fn alerts_go_out_once_per_change_of_health_signed_and_in_slack_format_and_events_follow_runs() {
    let ops = Receiver::start();
    let serve_config = format!(
        "serve:\n  failure_backoff: 100ms\n  max_failure_backoff: 200ms\nalerts:\n  \
         - url: \"{0}/alerts\"\n    signing: {{scheme: hmac-sha1, secret: \"${{BF_ALERT_SECRET}}\"}}\n  \
         - url: \"{0}/slack\"\n    format: slack\n    syncs: [flaky]\nevents:\n  - url: \"{0}/events\"\n    syncs: [flaky]\n",
        ops.url()
    );
    let p = project(
        &serve_config,
        &[
            (
                "flaky",
                ticking("flaky", "every: 200ms").replace(
                    "select 1 as id, epoch_ns(now()) as t",
                    "select id, epoch_ns(now()) as t from read_csv('later.csv')",
                ),
            ),
            (
                "empty",
                format!("{}degraded_when: {{rows_below: 1}}\n", ticking("empty", "every: 200ms"))
                    .replace("select 1 as id, epoch_ns(now()) as t", "select 1 as id, 'x' as t where false"),
            ),
        ],
    );
    let serve = Serving::start_with(
        {
            let mut c = p.cmd(&["serve", "--listen", "127.0.0.1:0"]);
            c.env("BF_ALERT_SECRET", "alert-s3cret");
            c
        },
        &[],
    );
    let addr = serve.addr();
    wait_until("three failed runs", Duration::from_secs(30), || {
        value(&metrics(&addr), "backflow_runs_total", &[("sync", "flaky"), ("status", "failed")]) >= 3.0
    });
    std::fs::write(p.path().join("later.csv"), "id\n1\n").unwrap();
    wait_until("a recovery", Duration::from_secs(30), || {
        ops.requests()
            .iter()
            .any(|r| r.target == "/slack" && r.json()["text"].as_str().unwrap_or("").contains("recovered"))
    });
    wait_until("more good runs", Duration::from_secs(30), || {
        value(&metrics(&addr), "backflow_runs_total", &[("sync", "flaky"), ("status", "succeeded")]) >= 3.0
    });
    let alerts: Vec<_> = ops.requests().into_iter().filter(|r| r.target == "/alerts").collect();
    let about = |sync: &str| -> Vec<String> {
        alerts
            .iter()
            .filter(|r| r.json()["sync"] == sync)
            .map(|r| r.json()["event"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(about("flaky"), ["sync.failed", "sync.recovered"], "once per change");
    assert_eq!(about("empty"), ["sync.degraded"], "once, however many runs");
    for a in &alerts {
        let signature = backflow_sink::signing::hmac_sha1_hex(b"alert-s3cret", &a.body);
        assert_eq!(a.header("x-signature"), Some(signature.as_str()), "signed like deliveries");
    }
    let degraded = alerts.iter().find(|r| r.json()["sync"] == "empty").unwrap().json();
    assert_eq!(degraded["reasons"][0], "0 rows read (below 1)");
    let slack: Vec<String> = ops
        .requests()
        .iter()
        .filter(|r| r.target == "/slack")
        .map(|r| r.json()["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(slack.len(), 2, "{slack:?}");
    assert!(slack[0].contains("`flaky` failed") && slack[0].contains("later"), "{slack:?}");
    let events: Vec<String> = ops
        .requests()
        .iter()
        .filter(|r| r.target == "/events")
        .map(|r| r.json()["type"].as_str().unwrap().to_string())
        .collect();
    for kind in ["run.started", "run.failed", "run.completed"] {
        assert!(events.iter().any(|e| e == kind), "{kind}: {events:?}");
    }
    assert!(!serve.stderr().contains("alert-s3cret"));
}

#[test]
fn json_logs_carry_the_sync_and_run_id_of_each_line_of_a_run() {
    let p = project("", &[("s", format!("{}schedule: {{every: 1h}}\n", sync("upsert", "")))]);
    p.sql("insert into items values (1, 'a', 1)");
    p.receiver.respond(|_, _| Reply::Status(503));
    let out = common::finish(
        p.cmd(&["--log-format", "json", "serve", "--once", "--listen", "127.0.0.1:0"]).output().unwrap(),
    );
    assert_eq!(out.code, 1, "partial: {}", out.all());
    let lines: Vec<serde_json::Value> =
        out.stderr.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"))).collect();
    let retry = lines.iter().find(|l| l["fields"]["message"] == "retrying").expect("a retry logged");
    assert_eq!(retry["span"]["sync"], "s", "{retry}");
    let run_id = retry["span"]["run_id"].as_str().unwrap();
    assert_eq!(p.receiver.bodies()[0]["_meta"]["run_id"], run_id);
    assert!(lines.iter().any(|l| l["fields"]["message"] == "run ended" && l["fields"]["run_id"] == run_id));
}

#[test]
fn once_sends_its_alerts_and_events_before_it_exits() {
    let ops = Receiver::start();
    let p = project(
        &format!("alerts:\n  - url: \"{0}/alerts\"\nevents:\n  - url: \"{0}/events\"\n", ops.url()),
        &[(
            "s",
            ticking("s", "every: 1h").replace("select 1 as id, epoch_ns(now()) as t", "select id, t from missing"),
        )],
    );
    // The receiver is down at first: each message is delivered by a retry
    // about a second later, which only a process that waits for it makes.
    ops.respond(|_, n| if n < 3 { Reply::Status(503) } else { Reply::Status(200) });
    let mut once = Serving::start_with(p.cmd(&["serve", "--once"]), &[]);
    assert_eq!(once.wait(Duration::from_secs(60)), 2, "a failed run: {}", once.stderr());
    let got: Vec<(String, String)> = ops
        .requests()
        .iter()
        .map(|r| (r.target.clone(), r.json()["event"].as_str().or(r.json()["type"].as_str()).unwrap().to_string()))
        .collect();
    for expected in [("/alerts", "sync.failed"), ("/events", "run.started"), ("/events", "run.failed")] {
        let tries = got.iter().filter(|(t, e)| t == expected.0 && e == expected.1).count();
        assert_eq!(tries, 2, "{expected:?} refused once, then delivered: {got:?}");
    }
}
