//! End to end: the real binary, a real DuckDB warehouse, a real receiver.

mod common;

use backflow_testkit::{Receiver, Reply};
use common::{Project, bin, finish, repo, sync};
use std::collections::HashMap;
use std::io::Read;
use std::time::Duration;

#[test]
fn every_example_sync_validates() {
    let out = finish(bin().arg("--project").arg(repo()).arg("validate").output().unwrap());
    assert_eq!(out.code, 0, "{}", out.all());
    let names: Vec<String> = std::fs::read_dir(repo().join("syncs"))
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "yaml").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    assert!(names.len() >= 5);
    for name in names {
        assert!(out.stdout.contains(&name), "{name} missing from:\n{}", out.stdout);
    }
}

#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    // `backflow validate | head -0`: the reader is gone before the first line.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = bin().arg("--project").arg(repo()).arg("validate").stdout(writer).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn demo_delivers_every_example_then_nothing_more() {
    let dir = common::example_project();
    let demo = || finish(bin().arg("--project").arg(dir.path()).arg("demo").output().unwrap());
    let first = demo();
    assert_eq!(first.code, 0, "{}", first.all());
    assert!(first.stdout.contains("POST /crm/contacts  upsert added key={\"customer_id\":1}"), "{}", first.stdout);
    assert!(first.stdout.contains("crm_contacts: succeeded"), "{}", first.stdout);
    assert!(first.stdout.contains("gdpr_deletions: succeeded"), "{}", first.stdout);
    assert!(!first.all().contains("MISMATCH"));
    let second = demo();
    assert_eq!(second.code, 0, "{}", second.all());
    assert!(second.stderr.contains("the receiver got 0 request(s)"), "{}", second.all());
}

#[test]
fn exit_codes_say_delivered_incomplete_or_fatal() {
    let p = Project::new(&sync("mirror", ""));
    p.sql("insert into items values (1, 'a', 1), (2, 'b', 2)");
    let ok = p.backflow(&["run", "s"]);
    assert_eq!(ok.code, 0, "{}", ok.all());
    assert!(ok.stdout.contains("s: succeeded"), "{}", ok.stdout);

    p.sql("update items set score = 5");
    p.receiver.respond(|r, _| if r.json()["id"] == 2 { Reply::Status(400) } else { Reply::Status(200) });
    let partial = p.backflow(&["run", "--all"]);
    assert_eq!(partial.code, 1, "{}", partial.all());
    assert!(partial.stdout.contains("rejected 1"), "{}", partial.stdout);
    assert!(partial.stdout.contains(r#"failed upsert {"id":2} [400]"#), "{}", partial.stdout);

    let unknown = p.backflow(&["run", "nope"]);
    assert_eq!(unknown.code, 2);
    assert!(unknown.stderr.contains("no such sync"), "{}", unknown.stderr);
    p.write("syncs/s.yaml", "warehouse: wh\nmode: upsert\nprimary_key: id\nquery: x\ndestinaton: {}\n");
    let bad = p.backflow(&["validate"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("syncs/s.yaml:5:1: unknown field `destinaton`"), "{}", bad.stderr);
    assert!(bad.stderr.contains("did you mean `destination`?"), "{}", bad.stderr);
}

#[test]
fn plan_inspect_history_and_reset_from_the_command_line() {
    let p = Project::new(&sync("upsert", ""));
    p.sql("insert into items values (7, 'seven', 70)");
    let plan = p.backflow(&["plan", "s"]);
    assert_eq!(plan.code, 0, "{}", plan.all());
    assert!(plan.stdout.contains("added 1"), "{}", plan.stdout);
    assert!(plan.stdout.contains("would send 1 record(s): upsert 1"), "{}", plan.stdout);
    assert!(p.receiver.requests().is_empty());

    let json = p.backflow(&["--json", "run", "s"]);
    assert_eq!(json.code, 0, "{}", json.all());
    let reports: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(reports[0]["status"], "succeeded");
    assert_eq!(reports[0]["delivered"]["upsert"], 1);

    let inspect = p.backflow(&["inspect", "s", "7"]);
    assert_eq!(inspect.code, 0, "{}", inspect.all());
    assert!(inspect.stdout.contains(r#""name":"seven""#), "{}", inspect.stdout);

    let history = p.backflow(&["history"]);
    assert!(history.stdout.contains("succeeded"), "{}", history.stdout);

    let reset = p.backflow(&["reset", "s"]);
    assert!(reset.stdout.contains("forgot 1"), "{}", reset.stdout);
    assert!(p.backflow(&["plan", "s"]).stdout.contains("added 1"));
}

#[test]
fn concurrency_keeps_that_many_requests_in_flight_and_no_more() {
    // The sink driver's shards (one per thread of the runtime) share the
    // requests in flight: together they keep `concurrency`, never more.
    let p = Project::new(&sync("upsert", "  concurrency: 8\n"));
    p.sql("insert into items select range, 'n' || range, range from range(240)");
    let stall = Duration::from_millis(40);
    p.receiver.respond(move |_, _| Reply::Stall(stall));
    let ran = p.backflow(&["run", "s"]);
    assert_eq!(ran.code, 0, "{}", ran.all());
    let requests = p.receiver.requests();
    let mut ids: Vec<u64> = requests.iter().map(|r| r.json()["_meta"]["key"]["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..240).collect::<Vec<u64>>(), "each row once");
    // In flight when a request arrived: those that arrived within the
    // stall before it (each is answered a stall after it arrived).
    let mut arrived: Vec<std::time::Instant> = requests.iter().map(|r| r.arrived).collect();
    arrived.sort_unstable();
    let most = (0..arrived.len())
        .map(|i| arrived[..=i].iter().filter(|a| arrived[i].duration_since(**a) < stall * 9 / 10).count())
        .max()
        .unwrap();
    assert!((7..=8).contains(&most), "{most} requests in flight at most, with concurrency 8");
}

#[test]
fn a_second_concurrent_run_is_refused() {
    let p = Project::new(&sync("upsert", "  concurrency: 1\n"));
    p.sql("insert into items select range, 'x', 0 from range(20)");
    p.receiver.respond(|_, _| Reply::Stall(Duration::from_millis(100)));
    let mut first = p.spawn(&["run", "s"]);
    p.receiver.wait_for(1, Duration::from_secs(30));
    let second = p.backflow(&["run", "s"]);
    assert_eq!(second.code, 2, "{}", second.all());
    assert!(second.stderr.contains("sync `s` is already running"), "{}", second.stderr);
    first.kill().unwrap();
    first.wait().unwrap();
}

#[test]
fn a_damaged_state_file_is_reported_with_what_to_do_and_left_as_it_was() {
    let p = Project::new(&sync("mirror", ""));
    p.sql("insert into items values (1, 'a', 1)");
    assert_eq!(p.backflow(&["run", "s"]).code, 0);
    let state = p.path().join(".backflow/state/s.duckdb");
    // A file that is not a state file at all, where the state was.
    let garbage = b"this is not a DuckDB file, and it must not be overwritten".repeat(100);
    std::fs::remove_file(&state).unwrap();
    let _ = std::fs::remove_file(p.path().join(".backflow/state/s.duckdb.wal"));
    std::fs::write(&state, &garbage).unwrap();
    for args in [&["run", "s"][..], &["history", "s"], &["inspect", "s", "1"], &["reset", "s"]] {
        let ran = p.backflow(args);
        assert_eq!(ran.code, 2, "{args:?}: {}", ran.all());
        assert!(ran.stderr.contains("the state of sync `s`"), "{args:?}: {}", ran.stderr);
        assert!(ran.stderr.contains("is damaged"), "{args:?}: {}", ran.stderr);
        assert!(ran.stderr.contains("Restore the file from a backup, or move it aside"), "{}", ran.stderr);
        assert!(!ran.stderr.contains("already running"), "not mistaken for a concurrent run: {}", ran.stderr);
        assert_eq!(ran.stderr.matches("error:").count(), 1, "{}", ran.stderr);
        assert_eq!(std::fs::read(&state).unwrap(), garbage, "{args:?} left the file as it was");
    }
    assert_eq!(p.receiver.requests().len(), 1, "nothing sent after the first run");
}

#[test]
fn sigkill_mid_delivery_loses_nothing() {
    let p = Project::new(&sync("mirror", "  concurrency: 2\n"));
    p.sql("insert into items select range, 'n' || range, range from range(300)");
    p.receiver.respond(|_, _| Reply::Stall(Duration::from_millis(20)));
    let mut run = p.spawn(&["run", "s"]);
    // Acks are committed at least every second; by 200 requests (~2 s) some are.
    p.receiver.wait_for(200, Duration::from_secs(60));
    run.kill().unwrap(); // SIGKILL
    run.wait().unwrap();
    let first = p.receiver.requests();
    assert!(first.len() < 300, "killed mid-delivery");

    p.receiver.respond(|_, _| Reply::Status(200));
    let again = p.backflow(&["run", "s"]);
    assert_eq!(again.code, 0, "{}", again.all());
    let all = p.receiver.requests();
    let mut ids: HashMap<u64, Vec<String>> = HashMap::new();
    for r in &all {
        let meta = r.json()["_meta"].clone();
        ids.entry(meta["key"]["id"].as_u64().unwrap()).or_default().push(meta["message_id"].as_str().unwrap().into());
    }
    assert_eq!(ids.len(), 300, "every row arrived");
    for (id, messages) in &ids {
        assert!(messages.iter().all(|m| m == &messages[0]), "key {id} re-sent with another message id");
    }
    assert!(all.len() < 300 + first.len(), "acknowledged records were not all sent again");
    let last = p.backflow(&["run", "s"]);
    assert_eq!(last.code, 0, "{}", last.all());
    assert!(last.stdout.contains("unchanged 300; delivered 0"), "{}", last.stdout);
    let history = p.backflow(&["history"]);
    assert_eq!(history.code, 0, "the state store is intact: {}", history.all());
    assert!(history.stdout.contains("interrupted"), "the killed run is marked: {}", history.stdout);
}

#[test]
fn ctrl_c_mid_delivery_finishes_the_requests_in_flight_and_commits_them() {
    let p = Project::new(&sync("mirror", "  concurrency: 4\n"));
    p.sql("insert into items select range, 'n' || range, range from range(400)");
    p.receiver.respond(|_, _| Reply::Stall(Duration::from_millis(50)));
    let run = p.spawn(&["run", "s"]);
    p.receiver.wait_for(40, Duration::from_secs(60));
    let interrupted = std::process::Command::new("kill").args(["-INT", &run.id().to_string()]).status().unwrap();
    assert!(interrupted.success());
    let ran = finish(run.wait_with_output().unwrap());
    let sent = p.receiver.requests().len();
    assert_eq!(ran.code, 1, "partial: the rest stays pending: {}", ran.all());
    assert!(ran.stderr.contains("stopping: finishing the requests in flight"), "{}", ran.stderr);
    assert!(ran.stdout.contains("asked to stop"), "{}", ran.stdout);
    assert!(sent < 400, "stopped mid-delivery");
    // Every request sent was answered and committed: none is sent again.
    let again = p.backflow(&["run", "s"]);
    assert_eq!(again.code, 0, "{}", again.all());
    let all = p.receiver.requests();
    assert_eq!(all.len(), 400, "each record sent exactly once: {} then {}", sent, all.len() - sent);
    let mut keys: Vec<u64> = all.iter().map(|r| r.json()["_meta"]["key"]["id"].as_u64().unwrap()).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), 400);
}

#[test]
fn proxies_from_the_environment_are_used_unless_no_proxy_says_otherwise() {
    let proxy = backflow_testkit::proxy::Proxy::start(None);
    let p = Project::new(&sync("upsert", ""));
    p.sql("insert into items values (1, 'a', 1), (2, 'b', 2)");
    let ran = finish(p.cmd(&["run", "s"]).env("HTTP_PROXY", proxy.url()).env_remove("NO_PROXY").output().unwrap());
    assert_eq!(ran.code, 0, "{}", ran.all());
    assert_eq!(p.receiver.requests().len(), 2);
    let seen = proxy.seen();
    assert!(!seen.is_empty() && seen.iter().all(|s| s.target.starts_with(&p.receiver.url())), "{seen:?}");
    p.sql("update items set score = 3");
    let ran = finish(
        p.cmd(&["run", "s"]).env("http_proxy", proxy.url()).env("NO_PROXY", "localhost,127.0.0.1").output().unwrap(),
    );
    assert_eq!(ran.code, 0, "{}", ran.all());
    assert_eq!((p.receiver.requests().len(), proxy.seen().len()), (4, seen.len()), "NO_PROXY went directly");
}

#[test]
fn listen_prints_requests_and_verifies_signatures() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let signed = "  signing: {scheme: hmac-sha1, secret: \"${BF_TEST_SIGNING}\"}\n";
    let p = Project::new(&sync("upsert", signed).replace("{URL}", &format!("http://127.0.0.1:{port}")));
    p.sql("insert into items values (1, 'a', 1)");
    let mut listener = bin()
        .args(["listen", "--port", &port.to_string(), "--secret-env", "BF_LISTEN_SECRET"])
        .env("BF_LISTEN_SECRET", "right")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = listener.stderr.take().unwrap();
    let mut first = [0u8; 9];
    stderr.read_exact(&mut first).unwrap(); // "listening" once bound
    let good = finish(p.cmd(&["run", "s"]).env("BF_TEST_SIGNING", "right").output().unwrap());
    assert_eq!(good.code, 0, "{}", good.all());
    p.sql("update items set score = 2");
    let bad = finish(p.cmd(&["run", "s"]).env("BF_TEST_SIGNING", "wrong").output().unwrap());
    assert_eq!(bad.code, 0, "{}", bad.all());
    listener.kill().unwrap();
    listener.wait().unwrap();
    let mut printed = String::new();
    listener.stdout.take().unwrap().read_to_string(&mut printed).unwrap();
    assert!(printed.contains("── #1 POST /hook"), "{printed}");
    assert!(printed.contains("[signature ok]"), "{printed}");
    assert!(printed.contains("[SIGNATURE MISMATCH]"), "{printed}");
    assert!(printed.contains("\"name\": \"a\""), "{printed}");
}

#[test]
fn listen_can_answer_after_a_delay_like_a_real_endpoint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let p = Project::new(&sync("upsert", "  concurrency: 1\n").replace("{URL}", &format!("http://127.0.0.1:{port}")));
    p.sql("insert into items select i, 'n', i from range(4) t(i)");
    let mut listener = bin()
        .args(["listen", "--quiet", "--delay", "300ms", "--port", &port.to_string()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(listener.stderr.take().unwrap()), &mut first).unwrap();
    assert!(first.starts_with("listening on"), "{first}");
    let started = std::time::Instant::now();
    let ran = p.backflow(&["run", "s"]);
    let took = started.elapsed();
    listener.kill().unwrap();
    listener.wait().unwrap();
    assert_eq!(ran.code, 0, "{}", ran.all());
    assert!(took >= Duration::from_millis(1200), "4 requests one at a time, 300 ms each: {took:?}");
}

#[test]
fn credentials_in_the_url_are_sent_as_basic_auth_and_never_printed() {
    let p = Project::new(&sync("upsert", ""));
    let url = p.receiver.url().replace("http://", "http://ops:${BF_TEST_PASSWORD}@");
    p.write("syncs/s.yaml", &sync("upsert", "").replace("{URL}", &url));
    p.sql("insert into items values (1, 'a', 1)");
    p.receiver.respond(|_, i| if i == 0 { Reply::Status(503) } else { Reply::Status(200) });
    let secret = "pw-5e4d3c2b1a";
    let run = finish(p.cmd(&["-vv", "run", "s"]).env("BF_TEST_PASSWORD", secret).output().unwrap());
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(run.stderr.contains("retrying"), "the retry is logged with its URL:\n{}", run.stderr);
    assert!(!run.all().contains(secret), "secret leaked:\n{}", run.all());
    let requests = p.receiver.requests();
    assert_eq!(requests.len(), 2);
    // base64("ops:pw-5e4d3c2b1a")
    assert_eq!(requests[1].header("authorization"), Some("Basic b3BzOnB3LTVlNGQzYzJiMWE="));
}

#[test]
fn secrets_never_reach_output_or_history() {
    let p = Project::new(&sync("upsert", "  headers:\n    Authorization: Bearer ${BF_TEST_TOKEN}\n"));
    p.sql("insert into items values (1, 'a', 1)");
    p.receiver.respond(|_, _| Reply::Status(401));
    let secret = "tok-9f8e7d6c5b4a";
    let run = finish(p.cmd(&["-vv", "run", "s"]).env("BF_TEST_TOKEN", secret).output().unwrap());
    assert_eq!(run.code, 1, "{}", run.all());
    assert_eq!(p.receiver.requests()[0].header("authorization"), Some("Bearer tok-9f8e7d6c5b4a"));
    let plan = finish(p.cmd(&["plan", "s"]).env("BF_TEST_TOKEN", secret).output().unwrap());
    let history = finish(p.cmd(&["history", "--rejections"]).env("BF_TEST_TOKEN", secret).output().unwrap());
    for out in [&run, &plan, &history] {
        assert!(!out.all().contains(secret), "secret leaked:\n{}", out.all());
    }
    let broken = finish(p.cmd(&["validate"]).env("BF_TEST_TOKEN", "x\r\nInjected: 1").output().unwrap());
    assert_eq!(broken.code, 2);
    assert!(broken.stderr.contains("destination.headers.Authorization"), "{}", broken.stderr);
    assert!(!broken.all().contains("Injected"), "{}", broken.all());
    let missing = finish(p.cmd(&["validate"]).output().unwrap());
    assert_eq!(missing.code, 2);
    assert!(
        missing.stderr.contains("syncs/s.yaml:9:27: environment variable BF_TEST_TOKEN is not set"),
        "{}",
        missing.stderr
    );
}

#[test]
fn check_reaches_both_ends_and_names_what_fails() {
    let p = Project::new(&sync("upsert", ""));
    let ok = p.backflow(&["check", "s"]);
    assert_eq!(ok.code, 0, "{}", ok.all());
    assert!(ok.stdout.contains("s: source ok (3 columns: id, name, score)"), "{}", ok.stdout);
    assert!(ok.stdout.contains("s: destination reachable (127.0.0.1:"), "{}", ok.stdout);
    assert!(p.receiver.requests().is_empty(), "check sends nothing");

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    p.write(
        "syncs/s.yaml",
        &sync("upsert", "")
            .replace("{URL}", &format!("http://127.0.0.1:{port}"))
            .replace("select id, name, score", "select name, score"),
    );
    let bad = p.backflow(&["check"]);
    assert_eq!(bad.code, 2, "{}", bad.all());
    assert!(
        bad.stdout.contains("s: source FAILED: primary_key: column `id` is not returned by the query"),
        "{}",
        bad.stdout
    );
    assert!(bad.stdout.contains("destination FAILED: cannot connect to 127.0.0.1"), "{}", bad.stdout);
}

#[test]
fn serve_runs_scheduled_syncs_when_due() {
    let p = Project::new(&format!("{}schedule: {{every: 300ms}}\n", sync("append", "")));
    p.sql("insert into items values (1, 'a', 1)");
    let mut serve = p.spawn(&["serve", "--listen", "127.0.0.1:0"]);
    p.receiver.wait_for(1, Duration::from_secs(30));
    p.sql("update items set score = 2");
    p.receiver.wait_for(2, Duration::from_secs(30));
    serve.kill().unwrap();
    serve.wait().unwrap();
    let scores: Vec<_> = p.receiver.bodies().iter().map(|b| b["score"].clone()).collect();
    assert_eq!(scores[..2], [serde_json::json!(1), serde_json::json!(2)]);
}

#[test]
fn batches_larger_than_two_mebibytes_reach_the_test_receiver_and_listen() {
    let p = Project::new(&sync("upsert", "  batch_size: 20000\n"));
    p.sql("insert into items select range, repeat('x', 150) || range, range from range(20000)");
    let out = p.backflow(&["run", "s"]);
    assert_eq!(out.code, 0, "{}", out.all());
    let requests = p.receiver.requests();
    let rows: usize = requests.iter().map(|r| r.json().as_array().unwrap().len()).sum();
    assert_eq!(rows, 20000);
    let largest = requests.iter().map(|r| r.body.len()).max().unwrap();
    assert!(largest > 3 << 20, "{largest} bytes");

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut listen = bin()
        .args(["listen", "--quiet", "--port", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    p.write(
        "syncs/l.yaml",
        &sync("upsert", "  batch_size: 20000\n").replace("{URL}", &format!("http://127.0.0.1:{port}")),
    );
    let out = p.backflow(&["run", "l"]);
    listen.kill().unwrap();
    listen.wait().unwrap();
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("delivered 20000"), "{}", out.stdout);
}

#[test]
fn https_receivers_are_reached_when_their_certificate_is_trusted_and_only_then() {
    let (receiver, ca) = Receiver::start_tls();
    let (_other, foreign_ca) = Receiver::start_tls();
    let url = receiver.https_url();
    let p = Project::with_receiver(&sync("upsert", "  concurrency: 1\n").replace("{URL}", &url), receiver);
    std::fs::write(p.path().join("ca.pem"), ca).unwrap();
    std::fs::write(p.path().join("foreign.pem"), foreign_ca).unwrap();
    p.sql("insert into items values (1, 'a', 1)");

    let untrusted = finish(p.cmd(&["run", "s"]).env("SSL_CERT_FILE", p.path().join("foreign.pem")).output().unwrap());
    assert_eq!(untrusted.code, 1, "{}", untrusted.all());
    assert!(untrusted.all().contains("TLS handshake failed"), "{}", untrusted.all());
    assert!(untrusted.all().to_lowercase().contains("certificate"), "{}", untrusted.all());
    assert!(p.receiver.requests().is_empty());

    let trusted = finish(p.cmd(&["run", "s"]).env("SSL_CERT_FILE", p.path().join("ca.pem")).output().unwrap());
    assert_eq!(trusted.code, 0, "{}", trusted.all());
    let requests = p.receiver.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].target, "/hook");
    assert_eq!(requests[0].version, "HTTP/2.0", "HTTP/2, offered by the receiver (ALPN)");
    assert_eq!(requests[0].json()["name"], "a");

    // Later requests of a run go over the one kept TLS connection.
    p.sql("insert into items select i, 'b' || i, i from range(2, 12) t(i)");
    let more = finish(p.cmd(&["run", "s"]).env("SSL_CERT_FILE", p.path().join("ca.pem")).output().unwrap());
    assert_eq!(more.code, 0, "{}", more.all());
    let requests = p.receiver.requests();
    assert_eq!(requests.len(), 11);
    let ports: std::collections::HashSet<u16> = requests[1..].iter().map(|r| r.peer_port).collect();
    assert_eq!(ports.len(), 1, "one connection for the ten requests of the second run");
}

#[test]
fn check_send_test_sends_one_real_signed_request_and_commits_nothing() {
    let extra = "  signing: {scheme: hmac-sha1, secret: \"${BF_TEST_SIGNING}\"}\n  headers: {Authorization: \"Bearer ${BF_TEST_SIGNING}\"}\n";
    let p = Project::new(&sync("upsert", extra));
    p.sql("insert into items values (1, 'a', 1), (2, 'b', 2)");
    let out = finish(p.cmd(&["check", "s", "--send-test"]).env("BF_TEST_SIGNING", "s3cret-value").output().unwrap());
    assert_eq!(out.code, 0, "{}", out.all());
    let requests = p.receiver.requests();
    assert_eq!(requests.len(), 1, "one request");
    let sent = &requests[0];
    let signature = backflow_sink::signing::hmac_sha1_hex(b"s3cret-value", &sent.body);
    assert_eq!(sent.header("x-signature"), Some(signature.as_str()), "signed as a run signs");
    assert_eq!(sent.header("authorization"), Some("Bearer s3cret-value"));
    let body = sent.json();
    assert_eq!((body["id"].clone(), body["_meta"]["test"].clone()), (serde_json::json!(1), serde_json::json!(true)));
    assert_eq!(body["_meta"]["op"], "upsert");
    assert!(out.stdout.contains("answer 200: delivered"), "{}", out.stdout);
    assert!(out.stdout.contains("authorization: <redacted>"), "{}", out.stdout);
    assert!(!out.all().contains("s3cret-value"), "{}", out.all());
    // Nothing committed: the next run sends both rows, and is the first run.
    let history = finish(p.cmd(&["history"]).env("BF_TEST_SIGNING", "s3cret-value").output().unwrap());
    assert!(history.stdout.contains("never run"), "{}", history.all());
    let run = finish(p.cmd(&["run", "s"]).env("BF_TEST_SIGNING", "s3cret-value").output().unwrap());
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(p.receiver.requests().len(), 3);
    // Without the flag, check sends nothing.
    let check = finish(p.cmd(&["check", "s"]).env("BF_TEST_SIGNING", "s3cret-value").output().unwrap());
    assert_eq!(check.code, 0, "{}", check.all());
    assert_eq!(p.receiver.requests().len(), 3);
}

#[test]
fn plan_diff_shows_the_fields_that_change_and_what_a_mirror_removes() {
    let p = Project::new(&sync("mirror", ""));
    p.sql("insert into items values (1, 'a', 1), (2, 'b', 2), (3, 'c', 3)");
    assert_eq!(p.backflow(&["run", "s"]).code, 0);
    p.sql("update items set name = 'A', score = 10 where id = 1; delete from items where id = 3");
    let out = p.backflow(&["plan", "s", "--diff"]);
    assert_eq!(out.code, 0, "{}", out.all());
    assert!(out.stdout.contains("~ {\"id\":1}"), "{}", out.stdout);
    assert!(out.stdout.contains("name: \"a\" → \"A\""), "{}", out.stdout);
    assert!(out.stdout.contains("score: 1 → 10"), "{}", out.stdout);
    assert!(!out.stdout.contains("id: 1 → 1"), "unchanged fields are not shown: {}", out.stdout);
    assert!(out.stdout.contains("- {\"id\":3} (delete): would remove"), "{}", out.stdout);
    assert!(out.stdout.contains("name: \"c\""), "{}", out.stdout);
    let json = p.backflow(&["--json", "plan", "s", "--diff"]);
    let plan: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(plan["diff"].as_array().unwrap().len(), 2);
    let changed = plan["diff"].as_array().unwrap().iter().find(|d| d["change"] == "changed").unwrap();
    assert_eq!(changed["fields"][0], serde_json::json!({"field": "name", "old": "a", "new": "A"}));
    assert!(p.backflow(&["plan", "s"]).stdout.contains("removed 1"), "nothing committed");
}
