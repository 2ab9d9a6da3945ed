//! Every retry and failure class against a scripted local receiver.

mod support;

use backflow_core::Record;
use backflow_core::env::Env;
use backflow_sink::{Destination, DestinationConfig, Outcome, Sender, per_record};
use backflow_testkit::{Receiver, Reply};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::{config_with, ctx, record};

fn config(url: &str, extra: Value) -> DestinationConfig {
    config_with(url, json!({"retry": {"attempts": 4, "backoff": "10ms", "max_backoff": "200ms"}}), extra)
}

/// Delivers `records` through a destination configured by `c`.
fn deliver(c: &DestinationConfig, records: Vec<Record>) -> Vec<(Record, Outcome)> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let destination = Destination::new(c, &Env::default()).unwrap();
    let sender = Sender::new(c, &Env::default(), std::path::Path::new(".")).unwrap();
    runtime.block_on(async {
        let mut out = Vec::new();
        for batch in destination.batches(records, &ctx()) {
            out.extend(per_record(destination.send(&sender, batch, &ctx()).await));
        }
        out
    })
}

fn one(c: &DestinationConfig) -> Outcome {
    deliver(c, vec![record(1)]).pop().unwrap().1
}

#[test]
fn server_errors_are_retried_until_success() {
    let r = Receiver::start();
    r.respond(|_, i| if i < 2 { Reply::Status(503) } else { Reply::Status(200) });
    assert_eq!(one(&config(&r.url(), json!({}))), Outcome::Delivered { status: 200, attempts: 3 });
    let ids: Vec<_> = r.requests().iter().map(|q| q.header("idempotency-key").unwrap().to_string()).collect();
    assert_eq!(ids, ["m1", "m1", "m1"], "retries carry the same id");
}

#[test]
fn retry_after_is_honoured_in_seconds_and_capped() {
    let r = Receiver::start();
    r.respond(|_, i| {
        if i == 0 {
            Reply::Full(429, vec![("Retry-After".into(), "1".into())], String::new())
        } else {
            Reply::Status(200)
        }
    });
    let started = Instant::now();
    assert!(
        one(&config(&r.url(), json!({"retry": {"attempts": 3, "backoff": "1ms", "max_backoff": "5s"}}))).is_delivered()
    );
    assert!(started.elapsed() >= Duration::from_millis(950), "waited {:?}", started.elapsed());

    let r = Receiver::start();
    r.respond(|_, i| {
        if i == 0 {
            Reply::Full(503, vec![("Retry-After".into(), "3600".into())], String::new())
        } else {
            Reply::Status(200)
        }
    });
    let started = Instant::now();
    assert!(one(&config(&r.url(), json!({}))).is_delivered());
    assert!(started.elapsed() < Duration::from_secs(5), "capped by max_backoff");
}

#[test]
fn retry_after_as_an_http_date_is_honoured() {
    let r = Receiver::start();
    let date = (chrono::Utc::now() + chrono::TimeDelta::seconds(2)).format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    r.respond(move |_, i| {
        if i == 0 {
            Reply::Full(429, vec![("Retry-After".into(), date.clone())], String::new())
        } else {
            Reply::Status(200)
        }
    });
    let started = Instant::now();
    assert!(
        one(&config(&r.url(), json!({"retry": {"attempts": 2, "backoff": "1ms", "max_backoff": "10s"}})))
            .is_delivered()
    );
    assert!(started.elapsed() >= Duration::from_millis(900), "waited {:?}", started.elapsed());
}

#[test]
fn connections_are_kept_alive_and_replaced_without_a_retry_when_the_receiver_closes_them() {
    let r = Receiver::start();
    r.respond(|_, i| {
        if i % 3 == 2 {
            Reply::Full(200, vec![("Connection".into(), "close".into())], String::new())
        } else {
            Reply::Status(200)
        }
    });
    let out = deliver(&config(&r.url(), json!({"retry": {"attempts": 1}})), (1..=30).map(record).collect());
    assert!(out.iter().all(|(_, o)| *o == Outcome::Delivered { status: 200, attempts: 1 }), "{out:?}");
    let mut connections: Vec<u16> = r.requests().iter().map(|q| q.peer_port).collect();
    assert_eq!(connections.len(), 30);
    connections.dedup();
    assert_eq!(connections.len(), 10, "three requests per connection, then the receiver closed it");
}

#[test]
fn connection_refused_then_up_is_retried() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let c = config(
        &format!("http://127.0.0.1:{port}"),
        json!({"retry": {"attempts": 6, "backoff": "100ms", "max_backoff": "400ms"}}),
    );
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        Receiver::start_on(port)
    });
    let outcome = one(&c);
    let receiver = late.join().unwrap();
    assert!(outcome.is_delivered(), "{outcome:?}");
    assert_eq!(receiver.requests().len(), 1);
}

#[test]
fn connection_refused_for_good_is_pending_not_rejected() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    match one(&config(&format!("http://127.0.0.1:{port}"), json!({"retry": {"attempts": 2, "backoff": "1ms"}}))) {
        Outcome::Failed { retryable, status, reason, attempts, .. } => {
            assert!(retryable);
            assert_eq!((status, attempts), (None, 2));
            assert!(reason.contains("could not connect"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_stall_past_the_timeout_is_a_retryable_timeout() {
    let r = Receiver::start();
    r.respond(|_, i| if i == 0 { Reply::Stall(Duration::from_secs(3)) } else { Reply::Status(200) });
    assert_eq!(one(&config(&r.url(), json!({"timeout": "200ms"}))), Outcome::Delivered { status: 200, attempts: 2 });
    let r = Receiver::start();
    r.respond(|_, _| Reply::Stall(Duration::from_secs(3)));
    match one(&config(&r.url(), json!({"timeout": "200ms", "retry": {"attempts": 1}}))) {
        Outcome::Failed { retryable: true, reason, .. } => assert!(reason.contains("timed out"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn client_errors_are_not_retried_and_keep_the_body() {
    let r = Receiver::start();
    r.respond(|_, _| Reply::Full(400, vec![], "{\"error\":\"email is invalid\"}".into()));
    match one(&config(&r.url(), json!({}))) {
        Outcome::Failed { status, retryable, body, attempts, .. } => {
            assert_eq!((status, retryable, attempts), (Some(400), false, 1));
            assert!(body.contains("email is invalid"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.requests().len(), 1);
}

#[test]
fn redirects_are_not_followed() {
    let target = Receiver::start();
    let r = Receiver::start();
    let location = format!("{}/elsewhere", target.url());
    r.respond(move |_, _| Reply::Full(302, vec![("Location".into(), location.clone())], String::new()));
    match one(&config(&r.url(), json!({}))) {
        Outcome::Failed { status, retryable, reason, .. } => {
            assert_eq!((status, retryable), (Some(302), false));
            assert!(reason.contains("redirects are not followed"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(target.requests().is_empty());
}

#[test]
fn one_bad_record_in_a_batch_of_1000_is_isolated() {
    let r = Receiver::start();
    r.respond(|q, _| {
        let bad = q.json().as_array().unwrap().iter().any(|item| item["id"] == 500);
        if bad { Reply::Status(422) } else { Reply::Status(200) }
    });
    let results = deliver(&config(&r.url(), json!({"batch_size": 1000})), (1..=1000).map(record).collect());
    let failed: Vec<u64> = results.iter().filter(|(_, o)| !o.is_delivered()).map(|(r, _)| r.row_num).collect();
    assert_eq!(failed, [500]);
    assert_eq!(results.len(), 1000);
    let requests = r.requests().len();
    assert!(requests <= 25, "{requests} requests to isolate one record");
}

#[test]
fn a_batch_refused_with_401_costs_one_request_and_is_not_split() {
    let r = Receiver::start();
    r.respond(|_, _| Reply::Full(401, vec![], "bad token".into()));
    let results = deliver(&config(&r.url(), json!({"batch_size": 1000})), (1..=1000).map(record).collect());
    assert_eq!(r.requests().len(), 1, "one request, not a split into halves");
    assert_eq!(results.len(), 1000);
    for (_, outcome) in &results {
        match outcome {
            Outcome::Failed { status: Some(401), destination: true, retryable: false, reason, body, .. } => {
                assert!(reason.contains("refuses the credentials"), "{reason}");
                assert_eq!(body, "bad token");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn deletes_answered_404_are_gone_and_a_404_at_a_record_url_is_that_records() {
    let r = Receiver::start();
    r.respond(|_, _| Reply::Status(404));
    // A batch's 404 says nothing of each record: split down to singles, each gone.
    let batched =
        deliver(&config(&r.url(), json!({"batch_size": 10, "method": "DELETE"})), (1..=10).map(record).collect());
    assert!(batched.iter().all(|(_, o)| o.is_delivered()), "{batched:?}");
    // A 404 at a URL made from the record refuses that record only.
    let mut routed = record(7);
    routed.route = json!({"id": 7}).as_object().unwrap().clone();
    let c = config(&format!("{}/users/{{id}}", r.url()), json!({"method": "PATCH"}));
    match deliver(&c, vec![routed]).pop().unwrap().1 {
        Outcome::Failed { status: Some(404), destination: false, retryable: false, .. } => {}
        other => panic!("{other:?}"),
    }
    // Without placeholders, a 404 is the destination's.
    match one(&config(&r.url(), json!({}))) {
        Outcome::Failed { status: Some(404), destination: true, .. } => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn bodies_can_be_sent_gzip_compressed_and_signed_as_sent() {
    use std::io::Read;
    let r = Receiver::start();
    let c = config(
        &r.url(),
        json!({"compress": "gzip", "batch_size": 50, "signing": {"scheme": "hmac-sha1", "secret": "k"}}),
    );
    assert!(deliver(&c, (1..=50).map(record).collect()).iter().all(|(_, o)| o.is_delivered()));
    let got = &r.requests()[0];
    assert_eq!(got.header("content-encoding"), Some("gzip"));
    assert!(backflow_sink::signing::verify_hmac_sha1(b"k", &got.body, got.header("x-signature").unwrap()));
    let mut text = String::new();
    flate2::read::GzDecoder::new(&got.body[..]).read_to_string(&mut text).unwrap();
    let items: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(items.as_array().map(Vec::len), Some(50));
    assert!(got.body.len() < text.len(), "{} compressed bytes for {}", got.body.len(), text.len());
}

#[test]
fn concurrency_and_rate_limits_hold() {
    let r = Receiver::start();
    let c = config(&r.url(), json!({"rate_limit": "20/s", "concurrency": 1}));
    let started = Instant::now();
    let results = deliver(&c, (1..=10).map(record).collect());
    assert!(results.iter().all(|(_, o)| o.is_delivered()));
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "10 requests at 20/s take ~450ms: {:?}",
        started.elapsed()
    );
}

#[test]
fn bad_rates_are_refused_with_an_example() {
    let err =
        serde_json::from_value::<DestinationConfig>(json!({"url": "http://x", "rate_limit": "fast"})).unwrap_err();
    assert!(err.to_string().contains("write e.g. `50/s`"), "{err}");
}

#[test]
fn requests_carry_host_length_and_configured_headers_in_place_of_backflows() {
    let r = Receiver::start();
    let c = config(&r.url(), json!({"headers": {"User-Agent": "acme/1", "X-Team": "data"}, "batch_size": 2}));
    assert!(deliver(&c, vec![record(1), record(2)]).iter().all(|(_, o)| o.is_delivered()));
    let got = &r.requests()[0];
    let count = |name: &str| got.headers.iter().filter(|(n, _)| n == name).count();
    assert_eq!((count("user-agent"), got.header("user-agent")), (1, Some("acme/1")));
    assert_eq!(got.header("x-team"), Some("data"));
    assert_eq!(got.header("host"), Some(&r.url()["http://".len()..]));
    assert_eq!(got.header("content-length"), Some(got.body.len().to_string().as_str()));
    assert_eq!(got.json().as_array().map(Vec::len), Some(2));
}
