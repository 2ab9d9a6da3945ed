//! Delivery decisions on scripted answers, through the in-memory transport:
//! what each answer or failure costs in requests and what it leaves.

mod support;

use backflow_core::env::Env;
use backflow_sink::transport::{Scripted, TransportError};
use backflow_sink::{Destination, DestinationConfig, Outcome, Sender, per_record};
use serde_json::{Value, json};
use std::sync::Arc;
use support::{config_with, ctx, record};

fn config(extra: Value) -> DestinationConfig {
    let retry = json!({"retry": {"attempts": 3, "backoff": "1ms", "max_backoff": "5ms"}});
    config_with("https://api.example.com/hook", retry, extra)
}

/// Delivers records 1..=n in batches of `batch_size` through `transport`.
fn deliver(transport: &Arc<Scripted>, batch_size: usize, n: u64) -> Vec<Outcome> {
    let c = config(json!({"batch_size": batch_size}));
    let ctx = ctx();
    let destination = Destination::new(&c, &Env::default()).unwrap();
    let sender = Sender::with_transport(&c, transport.clone());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut out = Vec::new();
        for batch in destination.batches((1..=n).map(record).collect(), &ctx) {
            out.extend(per_record(destination.send(&sender, batch, &ctx).await).into_iter().map(|(_, o)| o));
        }
        out
    })
}

#[test]
fn a_401_on_a_batch_of_1000_costs_one_request_and_refuses_the_destination() {
    let t = Arc::new(Scripted::new(|_, _| Scripted::status(401, "bad token")));
    let out = deliver(&t, 1000, 1000);
    assert_eq!(t.sent().len(), 1);
    assert!(out.iter().all(|o| matches!(o, Outcome::Failed { destination: true, status: Some(401), .. })));
}

#[test]
fn a_422_for_one_record_in_1000_isolates_it_within_25_requests() {
    let t = Arc::new(Scripted::new(|sent, _| {
        let body: Vec<Value> = serde_json::from_slice(&sent.body).unwrap_or_default();
        let bad =
            body.iter().any(|p| p["id"] == 617) || serde_json::from_slice::<Value>(&sent.body).unwrap()["id"] == 617;
        if bad { Scripted::status(422, "invalid email") } else { Scripted::status(200, "") }
    }));
    let out = deliver(&t, 1000, 1000);
    assert!(t.sent().len() <= 25, "{} requests", t.sent().len());
    let rejected: Vec<usize> = out.iter().enumerate().filter(|(_, o)| !o.is_delivered()).map(|(i, _)| i + 1).collect();
    assert_eq!(rejected, [617]);
}

#[test]
fn transport_failures_decide_like_answers() {
    // A TLS refusal stops at the first request, unsplit.
    let t = Arc::new(Scripted::new(|_, _| Err(TransportError::Destination("TLS handshake failed".into()))));
    assert!(deliver(&t, 100, 100).iter().all(|o| matches!(o, Outcome::Failed { destination: true, .. })));
    assert_eq!(t.sent().len(), 1);
    // A name that never resolves is retried, then the destination's.
    let t = Arc::new(Scripted::new(|_, _| Err(TransportError::Unresolved("no such host".into()))));
    assert!(matches!(deliver(&t, 1, 1)[0], Outcome::Failed { destination: true, attempts: 3, .. }));
    // A broken connection is retried, and counts as delivered once answered.
    let t = Arc::new(Scripted::new(|_, i| {
        if i == 0 { Err(TransportError::Failed("connection reset".into())) } else { Scripted::status(200, "") }
    }));
    assert_eq!(deliver(&t, 1, 1), [Outcome::Delivered { status: 200, attempts: 2 }]);
    // A 503 with Retry-After is retried after it.
    let t = Arc::new(Scripted::new(|_, i| {
        if i == 0 {
            let mut reply = Scripted::status(503, "busy").unwrap();
            reply.headers.insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("0"));
            Ok(reply)
        } else {
            Scripted::status(200, "")
        }
    }));
    assert_eq!(deliver(&t, 1, 1), [Outcome::Delivered { status: 200, attempts: 2 }]);
}

#[test]
fn requests_carry_the_url_credentials_as_basic_auth_unless_authorization_is_configured() {
    let t = Arc::new(Scripted::new(|_, _| Scripted::status(200, "")));
    let c = config(json!({"url": "https://user:p%40ss@api.example.com:8443/hook?x=1"}));
    let ctx = ctx();
    let destination = Destination::new(&c, &Env::default()).unwrap();
    let sender = Sender::with_transport(&c, t.clone());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(destination.deliver(&sender, vec![record(1)], &ctx));
    let sent = &t.sent()[0];
    assert_eq!(sent.uri.to_string(), "https://api.example.com:8443/hook?x=1", "no credentials in the URL sent");
    assert_eq!(sent.headers["authorization"], "Basic dXNlcjpwQHNz");
}
