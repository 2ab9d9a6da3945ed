//! Plan and run against a real DuckDB warehouse and a real local receiver.

mod support;

use backflow_core::env::Env;
use backflow_engine::{EngineError, Project};
use backflow_testkit::Reply;
use serde_json::json;
use support::{Scenario, sync_yaml};

#[test]
fn first_run_sends_every_row_and_the_next_only_changes() {
    let s = Scenario::mirror();
    s.sql("insert into items values (1, 'a', 10), (2, 'b', 20), (3, 'c', 30)");
    let (report, bodies) = s.run_bodies();
    assert_eq!(report.delivered_total(), 3);
    assert!(report.complete());
    let first = bodies.iter().find(|b| b["_meta"]["key"]["id"] == 1).unwrap();
    assert_eq!(first["name"], "a");
    let meta = &first["_meta"];
    assert_eq!(
        (meta["op"].as_str(), meta["change"].as_str(), meta["sync"].as_str(), meta["mode"].as_str()),
        (Some("upsert"), Some("added"), Some("s"), Some("mirror"))
    );
    assert_eq!(meta["key"], json!({"id": 1}));
    assert_eq!(meta["run_id"], json!(report.run_id));
    let mut row_nums: Vec<u64> = bodies.iter().map(|b| b["_meta"]["row_num"].as_u64().unwrap()).collect();
    row_nums.sort();
    assert_eq!(row_nums, [1, 2, 3]);

    let (report, bodies) = s.run_bodies();
    assert_eq!((report.counts.unchanged, bodies.len()), (3, 0));

    s.sql("update items set score = 21 where id = 2; delete from items where id = 3; insert into items values (4, 'd', 40)");
    let (report, bodies) = s.run_bodies();
    assert_eq!((report.counts.added, report.counts.changed, report.counts.removed), (1, 1, 1));
    let mut seen: Vec<(i64, String, String)> = bodies
        .iter()
        .map(|b| {
            let m = &b["_meta"];
            (m["key"]["id"].as_i64().unwrap(), m["op"].as_str().unwrap().into(), m["change"].as_str().unwrap().into())
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (2, "upsert".into(), "changed".into()),
            (3, "delete".into(), "removed".into()),
            (4, "upsert".into(), "added".into())
        ]
    );
    let delete = bodies.iter().find(|b| b["_meta"]["op"] == "delete").unwrap();
    assert_eq!((delete["name"].as_str(), delete["score"].as_i64()), (Some("c"), Some(30)), "last delivered payload");
}

#[test]
fn requests_carry_idempotency_key_user_agent_headers_and_signature() {
    let s = Scenario::new(&sync_yaml(
        "upsert",
        "  headers:\n    Authorization: Bearer ${BF_TEST_TOKEN_A:-tok}\n  signing: {scheme: hmac-sha1, secret: \"${BF_TEST_SECRET_A:-shh}\"}\n",
    ));
    s.sql("insert into items values (1, 'a', 10)");
    s.run();
    let r = &s.receiver.requests()[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, "/hook");
    assert_eq!(r.header("authorization"), Some("Bearer tok"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.header("user-agent").unwrap().starts_with("backflow/"));
    assert_eq!(r.header("idempotency-key"), r.json()["_meta"]["message_id"].as_str());
    assert_eq!(
        r.header("x-signature").unwrap(),
        backflow_sink::signing::hmac_sha1_hex(b"shh", &r.body),
        "signature over the exact body bytes"
    );
}

#[test]
fn an_unmapped_column_change_sends_nothing_and_a_mapping_change_resends() {
    let s = Scenario::new(
        "warehouse: wh\nquery: select id, name, score from items\nprimary_key: id\nmode: upsert\n\
         mapping:\n  name: name\ndestination:\n  url: \"{URL}/hook\"\n",
    );
    s.sql("insert into items values (1, 'a', 10), (2, 'b', 20)");
    s.run();
    s.sql("update items set score = 99");
    let (report, bodies) = s.run_bodies();
    assert_eq!((report.counts.changed, bodies.len()), (0, 0));

    s.write_sync(
        "warehouse: wh\nquery: select id, name, score from items\nprimary_key: id\nmode: upsert\n\
         mapping:\n  title: name\ndestination:\n  url: \"{URL}/hook\"\n",
    );
    let plan = s.plan();
    assert!(plan.mapping_changed);
    assert_eq!(plan.counts.changed, 2);
    assert_eq!(plan.samples[0]["title"], "a");
    assert!(s.receiver.requests().is_empty(), "plan sends nothing");
    let (report, bodies) = s.run_bodies();
    assert_eq!((report.counts.changed, bodies.len()), (2, 2));
    assert!(report.mapping_changed);
    assert_eq!(s.plan().counts.to_send, 0, "the new mapping is now the delivered one");
}

#[test]
fn plan_commits_nothing() {
    let s = Scenario::mirror();
    s.sql("insert into items values (1, 'a', 10)");
    let plan = s.plan();
    assert_eq!((plan.counts.added, plan.counts.to_send), (1, 1));
    assert_eq!(plan.samples.len(), 1);
    assert_eq!(s.plan().counts.added, 1, "a second plan sees the same");
    assert!(s.receiver.requests().is_empty());
}

#[test]
fn null_and_duplicate_keys_fail_before_anything_is_sent() {
    let s = Scenario::mirror();
    s.sql("insert into items values (1, 'a', 1), (2, 'b', 2), (2, 'b2', 2), (NULL, 'n', 0), (5, 'e', 5)");
    let err = s.try_run(false).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, EngineError::InvalidKeys { .. }), "{text}");
    assert!(text.contains("1 row(s) have a NULL in the primary key (id)"), "{text}");
    assert!(text.contains("1 key(s) appear more than once (2 rows), e.g. {\"id\":2}"), "{text}");
    assert!(text.contains("invalid_keys: skip"), "{text}");
    assert!(s.receiver.requests().is_empty());
    let runs = &s.engine().history(&[], 5).unwrap()[0].runs;
    assert_eq!(runs[0].status, "failed", "the failed run is recorded");
    assert!(runs[0].message.as_deref().unwrap().contains("NULL in the primary key"));
}

#[test]
fn invalid_keys_can_be_skipped_and_are_reported() {
    let s = Scenario::new(&sync_yaml("upsert", "invalid_keys: skip\n"));
    s.sql("insert into items values (1, 'a', 1), (2, 'b', 2), (2, 'b2', 2), (NULL, 'n', 0)");
    let (report, bodies) = s.run_bodies();
    assert_eq!(bodies.len(), 1);
    assert_eq!(report.invalid_keys.null_rows, 1);
    assert_eq!(report.invalid_keys.duplicate_rows, 2);
    assert!(!report.complete(), "skipped rows make the run incomplete");
}

#[test]
fn composite_keys_identify_records() {
    let s = Scenario::new(
        "warehouse: wh\nquery: select id, name, score from items\nprimary_key: [id, name]\nmode: mirror\n\
         destination:\n  url: \"{URL}/hook\"\n",
    );
    s.sql("insert into items values (1, 'a', 1), (1, 'b', 2)");
    let (report, bodies) = s.run_bodies();
    assert_eq!(report.delivered_total(), 2);
    assert!(bodies.iter().any(|b| b["_meta"]["key"] == json!({"id": 1, "name": "b"})));
    let record = s.engine().inspect("s", "id=1,name=b").unwrap();
    assert_eq!(record.delivered.unwrap().payload, json!({"id": 1, "name": "b", "score": 2}));
}

#[test]
fn rejected_records_stay_pending_with_their_reason_and_are_retried_next_run() {
    let s = Scenario::mirror();
    s.sql("insert into items values (1, 'a', 1), (2, 'bad', 2), (3, 'c', 3)");
    s.receiver.respond(|r, _| {
        if r.json()["name"] == "bad" {
            backflow_testkit::Reply::Full(422, vec![], "{\"error\":\"name is bad\"}".into())
        } else {
            Reply::Status(200)
        }
    });
    let report = s.run();
    assert_eq!((report.delivered_total(), report.rejected, report.pending), (2, 1, 0));
    assert_eq!(report.status, "partial");
    let f = &report.failures[0];
    assert_eq!((f.status, f.key.as_str()), (Some(422), r#"{"id":2}"#));
    assert!(f.body.contains("name is bad"));
    let first_id =
        s.receiver.requests().iter().find(|r| r.json()["name"] == "bad").unwrap().json()["_meta"]["message_id"].clone();

    let record = s.engine().inspect("s", "2").unwrap();
    assert!(record.delivered.is_none());
    assert_eq!(record.last_rejection.unwrap().status, Some(422));

    s.receiver.respond(|_, _| Reply::Status(200));
    let (report, bodies) = s.run_bodies();
    assert_eq!((report.delivered_total(), bodies.len()), (1, 1));
    assert_eq!(bodies[0]["_meta"]["message_id"], first_id, "same change, same message id");
    assert!(report.complete());
}

#[test]
fn retryable_failures_are_retried_within_the_run() {
    let s = Scenario::mirror();
    s.sql("insert into items values (1, 'a', 1)");
    s.receiver.respond(|_, i| if i < 2 { Reply::Status(503) } else { Reply::Status(200) });
    let report = s.run();
    assert_eq!(report.delivered_total(), 1);
    assert_eq!(s.receiver.requests().len(), 3);
}

#[test]
fn an_endpoint_that_is_down_stops_the_run_early_and_leaves_the_rest_pending() {
    let s = Scenario::new(&sync_yaml("upsert", "  concurrency: 1\n"));
    s.sql("insert into items select range, 'x', 0 from range(50)");
    s.receiver.respond(|_, _| Reply::Status(500));
    let report = s.run();
    assert!(report.stopped_early.is_some());
    assert_eq!(report.delivered_total(), 0);
    assert_eq!(report.pending, 50);
    assert!(s.receiver.requests().len() < 50 * 3, "stopped before trying everything");
    s.receiver.respond(|_, _| Reply::Status(200));
    assert_eq!(s.run().delivered_total(), 50);
}

#[test]
fn full_resends_everything_and_reset_forgets_everything() {
    let s = Scenario::mirror();
    s.sql("insert into items values (1, 'a', 1), (2, 'b', 2)");
    s.run();
    s.sql("delete from items where id = 2");
    s.receiver.clear();
    let report = s.try_run(true).unwrap();
    assert_eq!((report.counts.added, report.counts.removed), (1, 0));
    assert!(s.receiver.bodies().iter().all(|b| b["_meta"]["op"] == "upsert"), "full never deletes");
    assert_eq!(s.engine().reset("s").unwrap(), 2);
    assert_eq!(s.plan().counts.added, 1);
}

#[test]
fn history_records_every_run() {
    let s = Scenario::mirror();
    s.sql("insert into items values (1, 'a', 1)");
    let first = s.run();
    let second = s.run();
    let history = s.engine().history(&[], 10).unwrap();
    let runs = &history[0].runs;
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].run_id, second.run_id, "newest first");
    assert_eq!(runs[1].run_id, first.run_id);
    assert_eq!(runs[1].status, "succeeded");
    assert_eq!(runs[1].counts["delivered"]["upsert"], 1);
}

fn load_errors(files: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("syncs")).unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let env = Env::process();
    match Project::load(dir.path(), &env) {
        Err(e) => e.to_string(),
        Ok(p) => p.validate(&env).err().map(|e| e.to_string()).unwrap_or_default(),
    }
}

const PROJECT: (&str, &str) = ("backflow.yaml", "warehouses:\n  wh:\n    type: duckdb\n");

#[test]
fn yaml_errors_name_file_line_column_and_suggest_a_fix() {
    let err = load_errors(&[PROJECT, ("syncs/a.yaml", "warehouse: wh\nquerry: select 1\n")]);
    assert!(err.starts_with("syncs/a.yaml:2:1: unknown field `querry`"), "{err}");
    assert!(err.contains("did you mean `query`?"), "{err}");

    let err = load_errors(&[
        PROJECT,
        (
            "syncs/a.yaml",
            "warehouse: wh\nquery: x\nprimary_key: id\nmode: mirorr\ndestination: {url: \"http://127.0.0.1:1\"}\n",
        ),
    ]);
    assert!(err.starts_with("syncs/a.yaml:4:7: unknown variant `mirorr`"), "{err}");
    assert!(err.contains("did you mean `mirror`?"), "{err}");

    let err = load_errors(&[("backflow.yaml", "warehouses:\n  wh:\n    type: duckdb\n    pth: x.duckdb\n")]);
    assert!(err.starts_with("backflow.yaml:"), "{err}");
    assert!(err.contains("did you mean `path`?"), "{err}");
}

#[test]
fn missing_environment_variables_are_named_with_their_position() {
    let err = load_errors(&[
        PROJECT,
        (
            "syncs/a.yaml",
            "warehouse: wh\nquery: x\nprimary_key: id\nmode: upsert\n# ${BF_COMMENTED_OUT}\ndestination:\n  url: \"http://127.0.0.1:1\"\n  headers:\n    Authorization: Bearer ${BF_SURELY_UNSET_TOKEN}\n",
        ),
    ]);
    assert_eq!(
        err,
        "syncs/a.yaml:9:27: environment variable BF_SURELY_UNSET_TOKEN is not set (referenced as ${BF_SURELY_UNSET_TOKEN}); export it, or write ${BF_SURELY_UNSET_TOKEN:-fallback}"
    );
}

#[test]
fn semantic_errors_name_the_sync_and_field() {
    let sync = |extra: &str| {
        format!(
            "warehouse: wh\nquery: x\nprimary_key: id\nmode: upsert\ndestination:\n  url: \"http://127.0.0.1:1\"\n{extra}"
        )
    };
    let err = load_errors(&[PROJECT, ("syncs/a.yaml", &sync("warehouse: whx\n").replacen("warehouse: wh\n", "", 1))]);
    assert!(err.contains("(sync a): warehouse: `whx` is not defined in backflow.yaml (did you mean `wh`?)"), "{err}");
    let err = load_errors(&[PROJECT, ("syncs/a.yaml", &sync("schedule: {cron: \"every day\"}\n"))]);
    assert!(err.contains("schedule.cron: `every day` is not a cron expression"), "{err}");
    let err = load_errors(&[PROJECT, ("syncs/a.yaml", &sync("mapping: {a: x, a.b: y}\n"))]);
    assert!(err.contains("mapping: destination field `a` collides with `a.b`"), "{err}");
    let err = load_errors(&[PROJECT, ("syncs/a.yaml", &sync("").replace("http://127.0.0.1:1", "ftp://x"))]);
    assert!(err.contains("destination.url: `ftp://x` is not a valid http(s) URL"), "{err}");
    let err = load_errors(&[PROJECT, ("syncs/a.yaml", &sync("")), ("syncs/b.yaml", &sync("name: a\n"))]);
    assert!(err.contains("names must be unique"), "{err}");
}

#[test]
fn a_primary_key_missing_from_the_query_is_a_clear_error() {
    let s = Scenario::new(
        "warehouse: wh\nquery: select name from items\nprimary_key: id\nmode: upsert\ndestination:\n  url: \"{URL}/hook\"\n",
    );
    s.sql("insert into items values (1, 'a', 1)");
    let err = s.try_run(false).unwrap_err().to_string();
    assert!(err.contains("primary_key: column `id` is not returned by the query (columns: name)"), "{err}");
}

#[test]
fn standard_webhooks_timestamps_are_taken_when_each_attempt_is_sent() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let s = Scenario::new(&format!(
        "warehouse: wh\nquery: select id, name, score from items\nprimary_key: id\nmode: upsert\n\
         destination:\n  url: \"{{URL}}/hook\"\n  signing: {{scheme: standard-webhooks, secret: \"{secret}\"}}\n  \
         retry: {{attempts: 2, backoff: 5ms, max_backoff: 5s}}\n"
    ));
    s.sql("insert into items values (1, 'a', 10)");
    // The first attempt is told to come back in two seconds.
    s.receiver.respond(|_, i| {
        if i == 0 {
            Reply::Full(429, vec![("retry-after".into(), "2".into())], String::new())
        } else {
            Reply::Status(200)
        }
    });
    assert!(s.run().complete());
    let requests = s.receiver.requests();
    assert_eq!(requests.len(), 2);
    let timestamp = |i: usize| requests[i].header("webhook-timestamp").unwrap().parse::<i64>().unwrap();
    assert!(timestamp(1) - timestamp(0) >= 2, "the retry is signed when it is sent, not when it was built");
    let key = backflow_sink::signing::standard_webhooks_key(secret).unwrap();
    let id = requests[1].header("webhook-id").unwrap();
    assert_eq!(id, requests[1].json()["_meta"]["message_id"].as_str().unwrap());
    assert_eq!(
        requests[1].header("webhook-signature").unwrap(),
        backflow_sink::signing::standard_webhooks_signature(&key, id, timestamp(1), &requests[1].body)
    );
}

#[test]
fn occurrences_get_new_ids_and_deletes_answered_404_are_delivered() {
    let s = Scenario::new(&sync_yaml("mirror", "  on_removed: {method: DELETE}\n"));
    s.sql("insert into items values (1, 'a', 1)");
    let (_, first) = s.run_bodies();
    s.sql("update items set score = 2");
    let (_, second) = s.run_bodies();
    s.sql("update items set score = 1");
    let (_, third) = s.run_bodies();
    let ids: Vec<&str> =
        [&first, &second, &third].iter().map(|b| b[0]["_meta"]["message_id"].as_str().unwrap()).collect();
    assert_eq!(first[0]["score"], third[0]["score"]);
    assert_ne!(ids[0], ids[2], "A, B, A: the revert is a new occurrence");
    // The record is already gone at the receiver: a DELETE answered 404.
    s.sql("delete from items");
    s.receiver.respond(|r, _| if r.method == "DELETE" { Reply::Status(404) } else { Reply::Status(200) });
    let (report, bodies) = s.run_bodies();
    assert_eq!(bodies.len(), 1);
    assert!(report.complete(), "a delete answered 404 is delivered: {report:?}");
    assert!(s.run_bodies().1.is_empty());
}

#[test]
fn a_destination_that_refuses_every_request_stops_the_run_once_with_its_reason() {
    let s = Scenario::new(&sync_yaml("upsert", "  batch_size: 100\n  concurrency: 1\n"));
    s.sql("insert into items select range, 'x', 0 from range(1000)");
    s.receiver.respond(|_, _| Reply::Status(403));
    let report = s.run();
    assert_eq!(s.receiver.requests().len(), 1, "the first refusal stops the run");
    let reason = report.stopped_early.clone().expect("stopped early");
    assert!(reason.contains("HTTP 403") && reason.contains("rest stays pending"), "{reason}");
    assert_eq!((report.delivered_total(), report.rejected, report.pending), (0, 0, 1000));
    assert!(report.failures.is_empty(), "reported once, as the run's reason, not per record");
    s.receiver.respond(|_, _| Reply::Status(200));
    assert_eq!(s.run().delivered_total(), 1000, "delivered once the destination accepts");
}
