//! Property: any sequence of table edits, runs and receiver failures
//! converges. After a clean final run the receiver's view equals the query
//! (mirror); every run sends exactly what differs from what was acknowledged,
//! plus what was sent without an acknowledgement (it may have arrived); a
//! change sent again carries the same message id, and a new occurrence a new
//! one — whether a run diffs inside DuckDB or stages the query, in any order.

mod support;

use backflow_testkit::Reply;
use proptest::prelude::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use support::Scenario;

#[derive(Debug, Clone)]
enum Step {
    Upsert {
        id: u8,
        score: u8,
    },
    Delete {
        id: u8,
    },
    /// A run during which the receiver refuses records with these ids;
    /// `staged` runs stage the query instead of diffing inside DuckDB.
    Run {
        failing: BTreeSet<u8>,
        staged: bool,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u8..12, 0u8..4).prop_map(|(id, score)| Step::Upsert { id, score }),
        1 => (0u8..12).prop_map(|id| Step::Delete { id }),
        2 => (proptest::collection::btree_set(0u8..12, 0..4), any::<bool>())
            .prop_map(|(failing, staged)| Step::Run { failing, staged }),
    ]
}

/// The payload the sync sends for a row (mapping `name`, `score`).
fn payload(id: u8, score: u8) -> Value {
    json!({"name": format!("n{id}"), "score": score})
}

fn check(steps: Vec<Step>) {
    let s = Scenario::new(
        "warehouse: wh\nquery: select id, name, score from items\nprimary_key: id\nmode: mirror\n\
         mapping:\n  name: name\n  score: score\ndestination:\n  url: \"{URL}/hook\"\n  retry: {attempts: 1}\n",
    );
    let failing: Arc<Mutex<BTreeSet<u8>>> = Arc::default();
    let rule = failing.clone();
    s.receiver.respond(move |r, _| {
        let id = r.json()["_meta"]["key"]["id"].as_u64().unwrap() as u8;
        if rule.lock().unwrap().contains(&id) { Reply::Status(500) } else { Reply::Status(200) }
    });
    let mut table: BTreeMap<u8, u8> = BTreeMap::new();
    let mut view: BTreeMap<u8, Value> = BTreeMap::new();
    // Keys whose last send was not acknowledged: (op, content, message id).
    let mut unconfirmed: HashMap<u8, (String, Value, String)> = HashMap::new();
    let mut seen_ids: std::collections::HashSet<String> = Default::default();
    let clean = Step::Run { failing: BTreeSet::new(), staged: false };
    for step in steps.into_iter().chain([clean]) {
        match step {
            Step::Upsert { id, score } => {
                table.insert(id, score);
                s.sql(&format!("delete from items where id = {id}; insert into items values ({id}, 'n{id}', {score})"));
            }
            Step::Delete { id } => {
                table.remove(&id);
                s.sql(&format!("delete from items where id = {id}"));
            }
            Step::Run { failing: f, staged } => {
                *failing.lock().unwrap() = f.clone();
                s.stage_queries(staged);
                // What must be sent: every key whose payload differs from
                // the acknowledged view, and every key gone from the table.
                let mut expected: BTreeSet<(u8, &str)> = BTreeSet::new();
                for (id, score) in &table {
                    if view.get(id) != Some(&payload(*id, *score)) || unconfirmed.contains_key(id) {
                        expected.insert((*id, "upsert"));
                    }
                }
                for id in view.keys().chain(unconfirmed.keys()).filter(|id| !table.contains_key(id)) {
                    expected.insert((*id, "delete"));
                }
                s.receiver.clear();
                let report = s.run();
                assert!(report.stopped_early.is_none());
                let mut sent = BTreeSet::new();
                for r in s.receiver.requests() {
                    let body = r.json();
                    let meta = body["_meta"].clone();
                    let id = meta["key"]["id"].as_u64().unwrap() as u8;
                    let op = meta["op"].as_str().unwrap().to_string();
                    assert!(sent.insert((id, op.clone())), "key {id} sent twice in one run");
                    let mut content = body.clone();
                    content.as_object_mut().unwrap().remove("_meta");
                    let message_id = meta["message_id"].as_str().unwrap().to_string();
                    match unconfirmed.get(&id) {
                        Some((o, c, previous)) if *o == op && *c == content => {
                            assert_eq!(previous, &message_id, "{id}/{op}/{content} re-sent with another message id");
                        }
                        _ => assert!(seen_ids.insert(message_id.clone()), "{id}/{op}/{content} reuses an id"),
                    }
                    if f.contains(&id) {
                        unconfirmed.insert(id, (op.clone(), content, message_id));
                    } else {
                        unconfirmed.remove(&id);
                        match op.as_str() {
                            "upsert" => view.insert(id, content),
                            _ => view.remove(&id),
                        };
                    }
                }
                let sent: BTreeSet<(u8, &str)> =
                    sent.iter().map(|(id, op)| (*id, if op == "upsert" { "upsert" } else { "delete" })).collect();
                assert_eq!(sent, expected, "a run sends exactly what differs from the acknowledged view");
            }
        }
    }
    let want: BTreeMap<u8, Value> = table.iter().map(|(id, score)| (*id, payload(*id, *score))).collect();
    assert_eq!(view, want, "after a clean run the receiver equals the query");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn edits_runs_and_failures_converge(steps in proptest::collection::vec(step(), 1..14)) {
        check(steps);
    }
}
