//! A state write that fails mid-delivery (injected at `diff::ack`): the run
//! returns the error, and no request is sent after it returned, though the
//! runtime lives on (as in `serve`). Its own test binary, so the injected
//! failure reaches no other test.

mod support;

use backflow_engine::NoProgress;
use backflow_testkit::Reply;
use std::time::Duration;
use support::{Scenario, sync_yaml};

#[test]
fn a_state_write_failing_mid_delivery_leaves_nothing_sending_after_the_run_returned() {
    let s = Scenario::new(&sync_yaml("upsert", "  concurrency: 32\n"));
    s.sql("insert into items select range, 'x', 0 from range(5000)");
    s.receiver.respond(|_, _| Reply::Stall(Duration::from_millis(20)));
    // The first acknowledgement commit succeeds, the next fails.
    fail::cfg("diff::ack", "1*off->return").unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let engine = s.engine();
    let error = runtime.block_on(engine.run("s", false, &NoProgress)).unwrap_err();
    // A request written just before the return may be recorded a moment
    // later; a task left sending would go on sending hundreds a second.
    std::thread::sleep(Duration::from_millis(100));
    let at_return = s.receiver.requests().len();
    assert!(error.to_string().contains("injected failure"), "{error}");
    assert!(at_return < 5000, "the failure stopped delivery mid-way ({at_return} sent)");
    // The runtime is still running: any request task left would go on.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.receiver.requests().len(), at_return, "requests were sent after the run returned");
    fail::remove("diff::ack");
    drop(runtime);
    // Nothing is lost: the next run delivers every record not confirmed.
    s.receiver.respond(|_, _| Reply::Status(200));
    let report = s.run();
    assert!(report.complete(), "{report:?}");
    let mut ids: Vec<i64> = s.receiver.bodies().iter().map(|b| b["_meta"]["key"]["id"].as_i64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 5000, "every record arrived at least once");
}
