//! The example syncs modelled on the five product pages in the seeds: each
//! reproduces its wire format, checked request by request.

mod common;

use backflow_testkit::Receiver;
use common::{example_project, run_example};
use serde_json::json;

fn run(sync: &str) -> Receiver {
    let project = example_project();
    let receiver = Receiver::start();
    let out = run_example(project.path(), sync, &receiver);
    assert_eq!(out.code, 0, "{}", out.all());
    receiver
}

fn verify(secret: &str, bytes: &[u8], signature: Option<&str>) -> bool {
    backflow_sink::signing::verify_hmac_sha1(secret.as_bytes(), bytes, signature.expect("X-Signature header"))
}

#[test]
fn dinmo_one_post_per_record_with_static_and_dynamic_parameters() {
    let receiver = run("seed_dinmo_conversions");
    let requests = receiver.requests();
    assert_eq!(requests.len(), 5, "one request per active customer");
    let first = requests.iter().find(|r| r.json()["_meta"]["key"]["customer_id"] == 1).unwrap();
    assert_eq!(first.method, "POST");
    assert_eq!(first.target, "/dinmo/webhook?foo=bar&email=ryan%40example.org&user_id=1");
    let mut body = first.json();
    body["_meta"].as_object_mut().unwrap().retain(|k, _| k == "op" || k == "key");
    assert_eq!(body, json!({"plan": "pro", "_meta": {"op": "upsert", "key": {"customer_id": 1}}}));
}

#[test]
fn segment_batches_are_arrays_signed_over_the_whole_body() {
    let receiver = run("seed_segment_batch");
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1, "six customers fit one batch");
    let r = &requests[0];
    let items = r.json().as_array().unwrap().clone();
    assert_eq!(items.len(), 6);
    assert_eq!(items[0]["userId"], 1);
    assert_eq!(items[0]["traits"], json!({"email": "ryan@example.org", "plan": "pro", "country": "PT"}));
    assert_eq!(items[0]["type"], "identify");
    assert!(r.header("idempotency-key").is_none(), "batches carry ids per item in _meta");
    assert!(verify("demo-secret", &r.body, r.header("x-signature")));
}

#[test]
fn datatrics_get_carries_profile_and_static_fields_and_the_api_key() {
    let receiver = run("seed_datatrics_profiles");
    let r = receiver.requests().into_iter().find(|r| r.target.contains("profileid=1&")).unwrap();
    assert_eq!(r.method, "GET");
    assert_eq!(
        r.target,
        "/datatrics/trigger?profileid=1&email=ryan%40example.org&firstname=Ryan&automationid=welcome-flow-7"
    );
    assert_eq!(r.header("x-api-key"), Some("demo-key"));
    assert!(r.body.is_empty());
}

#[test]
fn valmi_get_flattens_payload_and_sync_metadata() {
    let receiver = run("seed_valmi_get");
    let r = receiver.requests().into_iter().find(|r| r.target.contains("_valmi_meta__key__customer_id=2")).unwrap();
    let target = url_pairs(&r.target);
    let get = |k: &str| target.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("my_first_name"), Some("Mei"));
    assert_eq!(get("email"), Some("mei@example.org"));
    assert_eq!(get("active"), Some("true"));
    assert_eq!(get("_valmi_meta__op"), Some("upsert"));
    assert_eq!(get("_valmi_meta__sync"), Some("seed_valmi_get"));
    assert_eq!(get("_valmi_meta__mode"), Some("mirror"));
    assert!(get("_valmi_meta__row_num").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(get("_valmi_meta__message_id").unwrap().len(), 36);
    assert!(r.target.starts_with("/valmi?my_first_name=Mei&my_last_name=Tanaka&email=mei%40example.org&active=true&_valmi_meta__op=upsert&_valmi_meta__change=added"), "{}", r.target);
}

#[test]
fn customerio_track_batches_are_signed() {
    let receiver = run("seed_customerio_batch");
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    let items = r.json();
    assert_eq!(items.as_array().unwrap().len(), 4);
    let mut first = items[0].clone();
    first.as_object_mut().unwrap().remove("_meta");
    assert_eq!(
        first,
        json!({"userId": 1, "event": "paid", "properties": {"order_id": 1001, "total": 99}, "type": "track"})
    );
    assert_eq!(items[0]["_meta"]["op"], "append");
    assert!(verify("demo-secret", &r.body, r.header("x-signature")));
}

fn url_pairs(target: &str) -> Vec<(String, String)> {
    let url = url::Url::parse(&format!("http://x{target}")).unwrap();
    url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}
