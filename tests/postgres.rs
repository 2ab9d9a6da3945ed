//! End to end over a real Postgres (a fresh database per test): the example
//! Postgres syncs, and bad input named with the sync and a fix.

mod common;

use backflow_testkit::Receiver;
use backflow_testkit::postgres::TestDatabase;
use common::{bin, example_project, finish, repo};
use std::path::Path;

fn backflow(dir: &Path, database_url: &str, receiver: &Receiver, args: &[&str]) -> common::Ran {
    finish(
        bin()
            .arg("--project")
            .arg(dir)
            .args(args)
            .env("DATABASE_URL", database_url)
            .env("BACKFLOW_DEMO_URL", receiver.url())
            .output()
            .unwrap(),
    )
}

/// A fresh database holding the examples' demo tables.
fn demo_database() -> Option<TestDatabase> {
    let db = TestDatabase::create()?;
    db.execute(&std::fs::read_to_string(repo().join("syncs/data/postgres_demo.sql")).unwrap());
    Some(db)
}

#[test]
fn the_postgres_examples_deliver_then_send_only_changes() {
    let Some(db) = demo_database() else { return };
    let dir = example_project();
    let receiver = Receiver::start();
    let run = |args: &[&str]| backflow(dir.path(), &db.url, &receiver, args);

    let first = run(&["run", "pg_accounts", "pg_usage_events"]);
    assert_eq!(first.code, 0, "{}", first.all());
    let requests = receiver.requests();
    let accounts: Vec<_> = requests.iter().filter(|r| r.target == "/accounts").collect();
    assert_eq!(accounts.len(), 5);
    assert!(accounts.iter().all(|r| r.method == "POST"));
    let acme = accounts.iter().find(|r| r.json()["id"] == 1).unwrap();
    let body = String::from_utf8(acme.body.clone()).unwrap();
    assert!(
        body.starts_with(
            r#"{"id":1,"name":"Acme Corp","plan":"enterprise","billing":{"mrr":4200.00,"seats":120},"tags":["manufacturing","emea"],"settings":{"sso":true,"region":"eu"},"signed_up_at":"2023-02-14T09:30:00Z","_meta":{"op":"upsert","change":"added""#
        ),
        "{body}"
    );
    let usage: Vec<_> = requests.iter().filter(|r| r.target == "/usage").collect();
    assert_eq!(usage.len(), 3, "24 events in batches of 10");
    let events: usize = usage.iter().map(|r| r.json().as_array().unwrap().len()).sum();
    assert_eq!(events, 24);
    assert!(usage.iter().all(|r| r.header("x-signature").is_some()));

    // Nothing changed: nothing sent.
    receiver.clear();
    let again = run(&["run", "pg_accounts", "pg_usage_events"]);
    assert_eq!(again.code, 0, "{}", again.all());
    assert!(receiver.requests().is_empty(), "{:?}", receiver.requests());

    // One account changes, one goes away: one PATCH, one DELETE at their URLs.
    db.execute(
        "UPDATE accounts SET seats = 19, settings = settings || '{\"sso\": true}' WHERE account_id = 2;
         DELETE FROM usage_events WHERE account_id = 3; DELETE FROM accounts WHERE account_id = 3;",
    );
    let changes = run(&["run", "pg_accounts", "pg_usage_events"]);
    assert_eq!(changes.code, 0, "{}", changes.all());
    let mut sent: Vec<(String, String)> =
        receiver.requests().iter().map(|r| (r.method.clone(), r.target.clone())).collect();
    sent.sort();
    assert_eq!(sent, [("DELETE".to_string(), "/accounts/3".to_string()), ("PATCH".into(), "/accounts/2".into())]);
    let patch = receiver.requests().into_iter().find(|r| r.method == "PATCH").unwrap();
    assert_eq!(patch.json()["billing"]["seats"], 19);
    assert_eq!(patch.json()["settings"]["sso"], true);
}

#[test]
fn bad_postgres_input_is_named_with_the_sync_and_a_fix_and_commits_nothing() {
    let Some(db) = demo_database() else { return };
    let dir = example_project();
    let receiver = Receiver::start();

    // A primary-key column the query does not return.
    let sync = std::fs::read_to_string(dir.path().join("syncs/pg_accounts.yaml")).unwrap();
    std::fs::write(
        dir.path().join("syncs/pg_accounts.yaml"),
        sync.replace("primary_key: account_id", "primary_key: acct"),
    )
    .unwrap();
    let out = backflow(dir.path(), &db.url, &receiver, &["run", "pg_accounts"]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stderr.contains("pg_accounts") && out.stderr.contains("primary_key: column `acct`"), "{}", out.stderr);
    assert!(receiver.requests().is_empty());
    let failed = backflow(dir.path(), &db.url, &receiver, &["history", "pg_accounts"]);
    assert!(failed.stdout.contains("failed"), "the failed run is recorded: {}", failed.all());

    // An unreachable server, with a password in the URL that must not leak.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://bob:pa55word-xyz@127.0.0.1:{closed}/analytics");
    let out = backflow(dir.path(), &url, &receiver, &["run", "pg_usage_events"]);
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stderr.contains("sync `pg_usage_events`"), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("cannot connect to Postgres as bob@127.0.0.1:{closed}/analytics")),
        "{}",
        out.stderr
    );
    assert!(!out.all().contains("pa55word-xyz"), "the password leaked: {}", out.all());
    let history = backflow(dir.path(), &url, &receiver, &["history", "pg_usage_events"]);
    assert!(!history.all().contains("pa55word-xyz"), "the password leaked into history: {}", history.all());

    // A missing DATABASE_URL without a fallback is a configuration error.
    std::fs::write(
        dir.path().join("backflow.yaml"),
        std::fs::read_to_string(dir.path().join("backflow.yaml"))
            .unwrap()
            .replace("${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/backflow_demo}", "${BACKFLOW_PG_URL_UNSET}"),
    )
    .unwrap();
    let out = finish(bin().arg("--project").arg(dir.path()).arg("validate").output().unwrap());
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.all().contains("BACKFLOW_PG_URL_UNSET"), "{}", out.all());
}
