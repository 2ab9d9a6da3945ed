//! Bad input, each case with the exact error it must get (what, where, and
//! what would be right), exit code 2, nothing sent, nothing delivered; and
//! secrets, which no output, log line or state file may show.

use crate::Tally;
use crate::common::{Ran, bin, finish};
use backflow_testkit::Receiver;
use std::path::Path;

const PROJECT: &str = "warehouses:\n  wh:\n    type: duckdb\n    path: warehouse.duckdb\n";

/// A sync of `items` whose destination is the receiver.
const SYNC: &str = "warehouse: wh\nquery: select id, name, score from items\nprimary_key: id\nmode: mirror\n\
                    destination:\n  url: \"{URL}/hook\"\n";

struct Case {
    name: &'static str,
    /// `backflow.yaml`.
    project: String,
    /// `syncs/s.yaml` (`{URL}` is the receiver).
    sync: String,
    /// More files (path, text).
    files: Vec<(&'static str, String)>,
    /// SQL run on the warehouse after `items(id, name, score)` is made.
    data: &'static str,
    args: Vec<&'static str>,
    /// Each must appear in the error.
    expect: Vec<&'static str>,
}

fn case(name: &'static str, sync_edit: impl Fn(&str) -> String, expect: &[&'static str]) -> Case {
    Case {
        name,
        project: PROJECT.to_string(),
        sync: sync_edit(SYNC),
        files: vec![],
        data: "",
        args: vec!["run", "s"],
        expect: expect.to_vec(),
    }
}

/// The sync with `extra` lines under `destination:`.
fn dest(extra: &str) -> impl Fn(&str) -> String + '_ {
    move |s| format!("{s}{extra}")
}

fn replace(from: &'static str, to: &'static str) -> impl Fn(&str) -> String {
    move |s| {
        assert!(s.contains(from), "{from}");
        s.replacen(from, to, 1)
    }
}

fn cases() -> Vec<Case> {
    vec![
        case("misspelt top-level key", replace("mode:", "mdoe:"), &["syncs/s.yaml:4:1", "did you mean `mode`"]),
        case(
            "misspelt destination key",
            dest("  methd: POST\n"),
            &["syncs/s.yaml:7:3", "unknown field `methd`", "did you mean `method`"],
        ),
        case("misspelt mode", replace("mode: mirror", "mode: mirrror"), &["syncs/s.yaml:4:7", "did you mean `mirror`"]),
        case("unknown method", dest("  method: FETCH\n"), &["syncs/s.yaml:7:11", "unknown variant `FETCH`"]),
        case("missing warehouse", replace("warehouse: wh\n", ""), &["syncs/s.yaml", "missing field `warehouse`"]),
        case(
            "undefined warehouse",
            replace("warehouse: wh", "warehouse: wh2"),
            &["syncs/s.yaml (sync s)", "`wh2` is not defined in backflow.yaml", "did you mean `wh`"],
        ),
        case("YAML syntax", replace("url: \"{URL}/hook\"", "url: \"{URL}/hook"), &["syncs/s.yaml:6:"]),
        case(
            "primary key as a map",
            replace("primary_key: id", "primary_key: {id: 1}"),
            &["syncs/s.yaml:3:", "primary_key: write one column"],
        ),
        case(
            "empty primary key",
            replace("primary_key: id", "primary_key: []"),
            &["primary_key: name at least one column"],
        ),
        case(
            "bad sync name",
            |s| format!("name: \"crm contacts\"\n{s}"),
            &["(sync crm contacts)", "must use only letters, digits"],
        ),
        case(
            "missing variable in a header",
            dest("  headers: {Authorization: \"Bearer ${BF_UNSET_TOKEN}\"}\n"),
            &["syncs/s.yaml:7:", "BF_UNSET_TOKEN is not set", "${BF_UNSET_TOKEN:-fallback}"],
        ),
        case(
            "missing variable in the query",
            replace("from items", "from ${BF_UNSET_TABLE}"),
            &["syncs/s.yaml:2:", "BF_UNSET_TABLE is not set"],
        ),
        case("URL scheme", replace("\"{URL}/hook\"", "\"ftp://example.com/hook\""), &["url", "not http or https"]),
        case(
            "URL without host",
            replace("\"{URL}/hook\"", "\"http:///hook\""),
            &["url", "no host", "https://api.example.com/hook"],
        ),
        case("relative URL", replace("\"{URL}/hook\"", "\"/hook\""), &["url", "not an absolute URL"]),
        case(
            "placeholder in the host",
            replace("\"{URL}/hook\"", "\"https://{id}.example.com/hook\""),
            &["url", "never in the host"],
        ),
        case("bad placeholder", replace("/hook\"", "/{a b}\""), &["url", "is not a column placeholder"]),
        case("batch size 0", dest("  batch_size: 0\n"), &["batch_size", "between 1 (no batching) and 100000"]),
        case(
            "batched GET",
            dest("  batch_size: 10\n  method: GET\n"),
            &["batch_size", "GET sends one record per request"],
        ),
        case(
            "batched placeholders",
            |s| s.replace("/hook\"", "/hook/{id}\"") + "  batch_size: 10\n",
            &["batch_size", "per record"],
        ),
        case("framing header", dest("  headers: {Host: example.com}\n"), &["Host", "Backflow sets this header itself"]),
        case("bad header name", dest("  headers: {\"bad header\": x}\n"), &["bad header", "not a valid header name"]),
        case("header value with a line break", dest("  headers: {X-A: \"a\\r\\nb\"}\n"), &["X-A", "CR, LF or NUL"]),
        case("rate not a rate", dest("  rate_limit: fast\n"), &["syncs/s.yaml:7:", "`fast` is not a rate", "`50/s`"]),
        case(
            "rate too high",
            dest("  rate_limit: 2000000000/s\n"),
            &["syncs/s.yaml:7:", "more than 1000000 requests per second"],
        ),
        case("rate zero", dest("  rate_limit: 0/s\n"), &["`0/s` is not a rate"]),
        case("concurrency 0", dest("  concurrency: 0\n"), &["destination.concurrency", "between 1 and 10000"]),
        case("duration not a duration", dest("  timeout: soon\n"), &["syncs/s.yaml:7:", "soon"]),
        case("zero timeout", dest("  timeout: 0s\n"), &["destination.timeout", "longer than 0"]),
        case("zero attempts", dest("  retry: {attempts: 0}\n"), &["destination.retry.attempts", "at least 1"]),
        case(
            "unknown signing scheme",
            dest("  signing: {scheme: hmac-md5, secret: x}\n"),
            &["syncs/s.yaml:7:", "unknown variant `hmac-md5`"],
        ),
        case(
            "Standard Webhooks secret not base64",
            dest("  signing: {scheme: standard-webhooks, secret: \"not base64!\"}\n"),
            &["signing.secret", "whsec_"],
        ),
        case(
            "bad cron",
            |s| format!("{s}schedule: {{cron: \"every day\"}}\n"),
            &["schedule.cron", "not a cron expression", "*/15 * * * *"],
        ),
        case(
            "cron and interval",
            |s| format!("{s}schedule: {{cron: \"* * * * *\", every: 5m}}\n"),
            &["schedule: give exactly one"],
        ),
        case("empty query", replace("select id, name, score from items", "\"-- nothing\""), &["query: is empty"]),
        case(
            "mapping of a column the query lacks",
            |s| s.replace("mode: mirror\n", "mode: mirror\nmapping:\n  email: email\n"),
            &["sync `s`", "email"],
        ),
        case(
            "primary key column the query lacks",
            replace("primary_key: id", "primary_key: customer_id"),
            &["sync `s`", "customer_id"],
        ),
        case("SQL error", replace("from items", "from itemz"), &["sync `s`", "itemz"]),
        Case {
            data: "insert into items values (1, 'a', 1), (1, 'b', 2), (2, 'c', 3)",
            ..case("duplicate keys", |s| s.to_string(), &["sync `s`", "appear more than once", "invalid_keys: skip"])
        },
        Case {
            data: "insert into items values (NULL, 'a', 1), (2, 'c', 3)",
            ..case("NULL key", |s| s.to_string(), &["sync `s`", "NULL in the primary key", "Nothing was sent"])
        },
        Case {
            args: vec!["run", "ss"],
            ..case(
                "unknown sync on the command line",
                |s| s.to_string(),
                &["sync ss", "no such sync", "did you mean `s`"],
            )
        },
        Case {
            project: format!("{PROJECT}state:\n  memory_limit: lots\n"),
            ..case("memory limit not a size", |s| s.to_string(), &["backflow.yaml", "state.memory_limit", "`1GB`"])
        },
        Case {
            project: format!("{PROJECT}stat:\n  dir: x\n"),
            ..case("misspelt project key", |s| s.to_string(), &["backflow.yaml:5:1", "did you mean `state`"])
        },
        Case {
            project: "warehouses:\n  wh:\n    type: snowflake\n".into(),
            ..case("unknown warehouse type", |s| s.to_string(), &["backflow.yaml:3:", "snowflake"])
        },
        Case {
            project: "warehouses:\n  wh:\n    type: duckdb\n    path: missing.duckdb\n".into(),
            ..case("missing warehouse file", |s| s.to_string(), &["sync `s`", "missing.duckdb", "no such file"])
        },
        Case {
            files: vec![("syncs/t.yaml", format!("name: s\n{SYNC}"))],
            ..case("two syncs with one name", |s| s.to_string(), &["names must be unique"])
        },
        Case {
            args: vec!["inspect", "s", "{\"name\": 1}"],
            ..case(
                "a key without its primary-key column",
                |s| s.to_string(),
                &["key {\"name\": 1} has no value for primary-key column `id`"],
            )
        },
    ]
}

/// Runs `backflow` in `dir` with the receiver's URL substituted.
fn run_in(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Ran {
    let mut c = bin();
    c.arg("--project").arg(dir).args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    finish(c.output().unwrap())
}

pub fn bad_inputs(tally: &mut Tally) {
    let mut failures = Vec::new();
    for case in cases() {
        tally.bad_inputs += 1;
        let receiver = Receiver::start();
        let dir = tempfile::tempdir().unwrap();
        let url = receiver.url();
        std::fs::write(dir.path().join("backflow.yaml"), &case.project).unwrap();
        std::fs::create_dir(dir.path().join("syncs")).unwrap();
        std::fs::write(dir.path().join("syncs/s.yaml"), case.sync.replace("{URL}", &url)).unwrap();
        for (file, text) in &case.files {
            std::fs::write(dir.path().join(file), text.replace("{URL}", &url)).unwrap();
        }
        let conn = duckdb::Connection::open(dir.path().join("warehouse.duckdb")).unwrap();
        conn.execute_batch("create table items (id INTEGER, name VARCHAR, score INTEGER)").unwrap();
        if !case.data.is_empty() {
            conn.execute_batch(case.data).unwrap();
        }
        drop(conn);
        let ran = run_in(dir.path(), &case.args, &[]);
        let mut problems = Vec::new();
        if ran.code != 2 {
            problems.push(format!("exit code {} instead of 2", ran.code));
        }
        for want in &case.expect {
            if !ran.stderr.contains(want) {
                problems.push(format!("the error does not say `{want}`"));
            }
        }
        if ran.stderr.matches("error:").count() != 1 {
            problems.push("the error is not said exactly once".into());
        }
        if ran.stderr.contains('\u{1b}') {
            problems.push("colour codes in the error".into());
        }
        if !receiver.requests().is_empty() {
            problems.push(format!("{} request(s) sent", receiver.requests().len()));
        }
        let state = dir.path().join(".backflow/state");
        if backflow_diff::StateStore::path(&state, "s").exists() {
            let store = backflow_diff::StateStore::open(&state, "s", "256MB").unwrap();
            if !store.snapshot_rows().unwrap().is_empty() {
                problems.push("something was recorded as delivered".into());
            }
        }
        if problems.is_empty() {
            tally.clear_errors += 1;
        } else {
            failures.push(format!("{}: {}\n    stderr: {}", case.name, problems.join("; "), ran.stderr.trim()));
        }
    }
    assert!(tally.bad_inputs >= 40, "at least 40 cases");
    assert!(failures.is_empty(), "bad input without a clear error:\n  {}", failures.join("\n  "));
}

/// Distinctive secrets in a header, a signing secret, a Postgres URL's
/// password and a variable inside a query that fails in the warehouse;
/// every command run, with rejections, retries and `-vv`: no secret in any
/// output or any file under the state directory.
pub fn secrets(tally: &mut Tally) {
    const TOKEN: &str = "tok_7Hq2VxZpLm9Rw4";
    const SIGNING: &str = "sig_Kd83JfPq0wZxN5";
    const PASSWORD: &str = "pw_Yt6BnE2sQa8Lc1";
    const NEEDLE: &str = "needle_Gh4Ur9Wc2Ek7";
    let receiver = Receiver::start();
    // The receiver echoes the request's Authorization header in its
    // rejections, as some APIs do, and fails a few requests first.
    receiver.respond(|r, i| {
        let auth = r.header("authorization").unwrap_or_default().to_string();
        match i {
            0 | 1 => backflow_testkit::Reply::Status(503),
            _ if r.json()["score"] == 3 => {
                backflow_testkit::Reply::Full(400, vec![], format!("bad record; you sent {auth}"))
            }
            _ => backflow_testkit::Reply::Status(200),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("backflow.yaml"), PROJECT).unwrap();
    std::fs::create_dir(dir.path().join("syncs")).unwrap();
    let sync = format!(
        "warehouse: wh\nquery: select id, name, score from items\nprimary_key: id\nmode: mirror\n\
         destination:\n  url: \"{}/hook?token=${{BF_TOKEN}}\"\n  headers: {{Authorization: \"Bearer ${{BF_TOKEN}}\"}}\n  \
         signing: {{scheme: hmac-sha1, secret: \"${{BF_SIGNING}}\"}}\n  retry: {{attempts: 3, backoff: 5ms}}\n\
         schedule: {{every: 1h}}\n",
        receiver.url()
    );
    std::fs::write(dir.path().join("syncs/s.yaml"), &sync).unwrap();
    let failing = "warehouse: wh\nquery: select id from items where name = '${BF_NEEDLE}' and missing_column = 1\n\
                   primary_key: id\nmode: upsert\ndestination:\n  url: \"http://127.0.0.1:9/x\"\n";
    std::fs::write(dir.path().join("syncs/q.yaml"), failing).unwrap();
    let conn = duckdb::Connection::open(dir.path().join("warehouse.duckdb")).unwrap();
    conn.execute_batch(
        "create table items (id INTEGER, name VARCHAR, score INTEGER);
         insert into items select i, 'n' || i, i % 4 from range(1, 9) t(i);",
    )
    .unwrap();
    drop(conn);
    let envs = [("BF_TOKEN", TOKEN), ("BF_SIGNING", SIGNING), ("BF_NEEDLE", NEEDLE), ("BF_PG_PASSWORD", PASSWORD)];
    let mut outputs = Vec::new();
    for args in [
        vec!["validate"],
        vec!["plan", "s"],
        vec!["plan", "q"],
        // The first run: retries, a rejection echoing the header, JSON logs.
        vec!["-vv", "--log-format", "json", "serve", "--once"],
        vec!["-vv", "run", "s"],
        vec!["-vv", "run", "q"],
        vec!["--json", "run", "s", "q"],
        vec!["check"],
        vec!["check", "s", "--send-test"],
        vec!["history", "--rejections"],
        vec!["--json", "history", "--rejections"],
        vec!["inspect", "s", "1"],
        vec!["inspect", "s", "3"],
        vec!["plan", "s", "--diff"],
        vec!["-vv", "reset", "s"],
    ] {
        let ran = run_in(dir.path(), &args, &envs);
        outputs.push((args.join(" "), ran.all()));
    }
    // A Postgres warehouse whose URL carries the password.
    if let Some(db) = backflow_testkit::postgres::TestDatabase::create() {
        db.execute("create table items (id BIGINT, name TEXT, score BIGINT); insert into items values (1, 'a', 1);");
        let url = db.url.replace("postgres@", "postgres:${BF_PG_PASSWORD}@");
        std::fs::write(
            dir.path().join("backflow.yaml"),
            format!("{PROJECT}  pg:\n    type: postgres\n    url: \"{url}\"\n"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("syncs/p.yaml"),
            sync.replace("warehouse: wh", "warehouse: pg").replace("from items", "from itemz"),
        )
        .unwrap();
        for args in [vec!["-vv", "run", "p"], vec!["check", "p"], vec!["plan", "p"]] {
            let ran = run_in(dir.path(), &args, &envs);
            outputs.push((args.join(" "), ran.all()));
        }
    }
    let mut leaks = Vec::new();
    for (command, text) in &outputs {
        assert!(!text.contains('\u{1b}'), "`backflow {command}` wrote colour codes to a file:\n{text}");
        for secret in [TOKEN, SIGNING, PASSWORD, NEEDLE] {
            if text.contains(secret) {
                leaks.push(format!("`backflow {command}` printed {secret}:\n{text}"));
            }
        }
    }
    for entry in walk(&dir.path().join(".backflow")) {
        let bytes = std::fs::read(&entry).unwrap();
        for secret in [TOKEN, SIGNING, PASSWORD, NEEDLE] {
            if bytes.windows(secret.len()).any(|w| w == secret.as_bytes()) {
                leaks.push(format!("{} holds {secret}", entry.display()));
            }
        }
    }
    // The run really met rejections and retries, and the failing query failed.
    let all: String = outputs.iter().map(|(_, t)| t.as_str()).collect();
    assert!(all.contains("retrying"), "a retry was logged");
    assert!(all.contains("400"), "a rejection was reported");
    assert!(all.contains("missing_column"), "the failing query's error was shown");
    tally.secrets_leaked += leaks.len();
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}
