//! A fault-injecting receiver: a real HTTP/1.1 server on 127.0.0.1 that
//! answers each request with a fault drawn at chosen rates (5xx, 429 with
//! and without `Retry-After`, connection resets before and after reading the
//! body, a stall past the client's timeout, a trickled answer), can go down
//! and come back on the same port, and keeps a record of every record it
//! *accepted* — applied to its own view — so that a test rebuilds what the
//! receiver holds independently of Backflow's state.
//!
//! A record counts as accepted when the receiver read it whole and would
//! act on it: after a 2xx, and also when it then resets the connection or
//! stalls past the client's timeout (the receiver did the work; the client
//! never heard), which is what makes an at-least-once sender re-send or
//! delete what it cannot know was delivered.

use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One way of answering a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// `503`, nothing applied.
    ServerError,
    /// `429` without `Retry-After`, nothing applied.
    TooManyRequests,
    /// `429` with `Retry-After: 1` (seconds), nothing applied.
    RetryAfterSeconds,
    /// `503` with `Retry-After` as an HTTP date a second ahead, nothing
    /// applied.
    RetryAfterDate,
    /// The head is read, then the connection is reset before the body is
    /// read: nothing applied.
    ResetBeforeBody,
    /// The body is read and applied, then the connection is reset with no
    /// answer.
    ResetAfterBody,
    /// The body is applied, and the `200` is held back past the client's
    /// timeout ([`FaultPlan::stall`]).
    Stall,
    /// The body is applied, and the `200` is written a few bytes at a time
    /// (within the client's timeout).
    Trickle,
}

impl Fault {
    /// Every fault.
    pub const ALL: [Fault; 8] = [
        Fault::ServerError,
        Fault::TooManyRequests,
        Fault::RetryAfterSeconds,
        Fault::RetryAfterDate,
        Fault::ResetBeforeBody,
        Fault::ResetAfterBody,
        Fault::Stall,
        Fault::Trickle,
    ];
}

/// Which faults to inject, at which rates (each the probability of that
/// fault for one request; the rest are answered `200`), and which records to
/// refuse for good.
#[derive(Clone, Default)]
pub struct FaultPlan {
    /// Fault rates; they add up to at most 1.
    pub rates: Vec<(Fault, f64)>,
    /// How long a stalled answer is held.
    pub stall: Duration,
    /// A status for records refused whatever the attempt (e.g. `422` for
    /// bad rows): a request carrying one is answered with it and nothing in
    /// it is applied.
    pub reject: Option<Rejecter>,
}

/// Says which status refuses a record for good, if any.
pub type Rejecter = Arc<dyn Fn(&Value) -> Option<u16> + Send + Sync>;

impl FaultPlan {
    /// No faults: every request is accepted.
    pub fn none() -> FaultPlan {
        FaultPlan::default()
    }

    /// Every fault, `total` of the requests in all, in equal shares; stalls
    /// last `stall`.
    pub fn every_fault(total: f64, stall: Duration) -> FaultPlan {
        let each = total / Fault::ALL.len() as f64;
        FaultPlan { rates: Fault::ALL.iter().map(|f| (*f, each)).collect(), stall, reject: None }
    }

    fn draw(&self, x: f64) -> Option<Fault> {
        let mut acc = 0.0;
        for (fault, rate) in &self.rates {
            acc += rate;
            if x < acc {
                return Some(*fault);
            }
        }
        None
    }
}

/// A record the receiver accepted, in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The record's `_meta.key`.
    pub key: Value,
    /// The record's `_meta.op`.
    pub op: String,
    /// The record's `_meta.message_id`.
    pub message_id: String,
    /// The record's `_meta.run_id`.
    pub run_id: String,
    /// The payload without `_meta`.
    pub payload: Value,
    /// The request's `webhook-timestamp`, if signed so.
    pub webhook_timestamp: Option<i64>,
    /// When it arrived (Unix seconds).
    pub arrived: i64,
}

struct State {
    plan: FaultPlan,
    rng: fastrand::Rng,
    accepted: Vec<Accepted>,
    injected: BTreeMap<Fault, u64>,
    requests: u64,
}

struct Shared {
    state: Mutex<State>,
    down: AtomicBool,
    /// Connections open, and requests being handled.
    busy: AtomicUsize,
    idle: Condvar,
    idle_lock: Mutex<()>,
    wake: tokio::sync::Notify,
}

/// A running fault-injecting receiver; it stops with the test process.
pub struct FaultReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FaultReceiver {
    /// Starts a receiver with no faults; `seed` makes its draws repeatable.
    pub fn start(seed: u64) -> FaultReceiver {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                plan: FaultPlan::none(),
                rng: fastrand::Rng::with_seed(seed),
                accepted: Vec::new(),
                injected: BTreeMap::new(),
                requests: 0,
            }),
            down: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            idle: Condvar::new(),
            idle_lock: Mutex::new(()),
            wake: tokio::sync::Notify::new(),
        });
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addr = std_listener.local_addr().expect("address");
        std_listener.set_nonblocking(true).expect("non-blocking");
        let server = shared.clone();
        std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            runtime.block_on(serve(server, addr, std_listener));
        });
        FaultReceiver { addr, shared }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers from now on by `plan`.
    pub fn set_plan(&self, plan: FaultPlan) {
        self.shared.state.lock().expect("state").plan = plan;
    }

    /// Goes down (connections refused, open ones closed at their next
    /// request) or comes back on the same port.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        self.shared.wake.notify_waiters();
        if !down {
            // Accepting again once the port is bound anew.
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::net::TcpStream::connect(self.addr).is_err() {
                assert!(Instant::now() < deadline, "the receiver did not come back");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Every record accepted so far, in arrival order.
    pub fn accepted(&self) -> Vec<Accepted> {
        self.shared.state.lock().expect("state").accepted.clone()
    }

    /// How many of each fault were injected, and the requests received.
    pub fn injected(&self) -> (BTreeMap<Fault, u64>, u64) {
        let state = self.shared.state.lock().expect("state");
        (state.injected.clone(), state.requests)
    }

    /// Waits until no connection has been open and no request handled for
    /// a quiet spell (after a client was killed: every request it wrote has
    /// been read and applied, including one on a connection still waiting
    /// in the listener's queue when the client died). Panics after
    /// `timeout`.
    pub fn wait_idle(&self, timeout: Duration) {
        const QUIET: Duration = Duration::from_millis(100);
        let deadline = Instant::now() + timeout;
        let mut quiet_since: Option<Instant> = None;
        let mut guard = self.shared.idle_lock.lock().expect("idle");
        loop {
            if self.shared.busy.load(Ordering::SeqCst) > 0 {
                quiet_since = None;
            } else if quiet_since.get_or_insert_with(Instant::now).elapsed() >= QUIET {
                return;
            }
            assert!(Instant::now() < deadline, "the receiver stayed busy for {timeout:?}");
            guard = self.shared.idle.wait_timeout(guard, Duration::from_millis(10)).expect("idle").0;
        }
    }
}

/// Counts a connection or request as busy while it lives.
struct Busy(Arc<Shared>);

impl Busy {
    fn new(shared: &Arc<Shared>) -> Busy {
        shared.busy.fetch_add(1, Ordering::SeqCst);
        Busy(shared.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
        let _guard = self.0.idle_lock.lock().expect("idle");
        self.0.idle.notify_all();
    }
}

async fn serve(shared: Arc<Shared>, addr: SocketAddr, first: std::net::TcpListener) {
    let mut listener = Some(tokio::net::TcpListener::from_std(first).expect("listener"));
    loop {
        let down = shared.down.load(Ordering::SeqCst);
        match (&listener, down) {
            (Some(_), true) => {
                // Closing the listening socket: connections are refused.
                listener = None;
                continue;
            }
            (None, false) => {
                listener = Some(tokio::net::TcpListener::bind(addr).await.expect("bind the same port again"));
                continue;
            }
            (None, true) => {
                let woken = shared.wake.notified();
                if shared.down.load(Ordering::SeqCst) {
                    let _ = tokio::time::timeout(Duration::from_millis(20), woken).await;
                }
                continue;
            }
            (Some(l), false) => {
                let woken = shared.wake.notified();
                tokio::select! {
                    accepted = l.accept() => {
                        if let Ok((stream, _)) = accepted {
                            let _ = stream.set_nodelay(true);
                            let busy = Busy::new(&shared);
                            tokio::spawn(connection(shared.clone(), stream, busy));
                        }
                    }
                    _ = woken => {}
                }
            }
        }
    }
}

/// Serves one connection's requests until it closes, is reset or the
/// receiver goes down.
async fn connection(shared: Arc<Shared>, mut stream: tokio::net::TcpStream, _busy: Busy) {
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    loop {
        // The head.
        let head_end = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        if shared.down.load(Ordering::SeqCst) {
            return;
        }
        let _request = Busy::new(&shared);
        let (content_length, timestamp) = {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut request = httparse::Request::new(&mut headers);
            if !matches!(request.parse(&buf[..head_end]), Ok(httparse::Status::Complete(_))) {
                return;
            }
            let header = |name: &str| {
                request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .map(str::to_string)
            };
            let length = header("content-length").and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(0);
            let timestamp = header("webhook-timestamp").and_then(|v| v.trim().parse::<i64>().ok());
            (length, timestamp)
        };
        let fault = {
            let mut state = shared.state.lock().expect("state");
            state.requests += 1;
            let x = state.rng.f64();
            let fault = state.plan.draw(x);
            if let Some(f) = fault {
                *state.injected.entry(f).or_insert(0) += 1;
            }
            fault
        };
        if fault == Some(Fault::ResetBeforeBody) {
            reset(stream);
            return;
        }
        // The body.
        while buf.len() < head_end + content_length {
            let mut chunk = [0u8; 65536];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf[head_end..head_end + content_length].to_vec();
        buf.drain(..head_end + content_length);
        let answer = match fault {
            Some(Fault::ServerError) => Answer::status(503, &[]),
            Some(Fault::TooManyRequests) => Answer::status(429, &[]),
            Some(Fault::RetryAfterSeconds) => Answer::status(429, &[("retry-after", "1".into())]),
            Some(Fault::RetryAfterDate) => {
                let at = chrono::Utc::now() + chrono::Duration::seconds(1);
                Answer::status(503, &[("retry-after", at.format("%a, %d %b %Y %H:%M:%S GMT").to_string())])
            }
            _ => {
                let records = records(&body);
                let plan_reject = shared.state.lock().expect("state").plan.reject.clone();
                let refused = plan_reject.and_then(|reject| records.iter().find_map(|r| reject(r)));
                match refused {
                    Some(status) => Answer::status(status, &[]),
                    None => {
                        apply(&shared, &records, timestamp);
                        Answer::status(200, &[])
                    }
                }
            }
        };
        let accepted_status = answer.status == 200;
        match fault {
            Some(Fault::ResetAfterBody) if accepted_status => {
                reset(stream);
                return;
            }
            Some(Fault::Stall) if accepted_status => {
                let stall = shared.state.lock().expect("state").plan.stall;
                tokio::time::sleep(stall).await;
                if stream.write_all(&answer.bytes()).await.is_err() {
                    return;
                }
            }
            Some(Fault::Trickle) if accepted_status => {
                for byte in answer.bytes() {
                    if stream.write_all(&[byte]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            _ => {
                if stream.write_all(&answer.bytes()).await.is_err() {
                    return;
                }
            }
        }
    }
}

struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
}

impl Answer {
    fn status(status: u16, headers: &[(&'static str, String)]) -> Answer {
        Answer { status, headers: headers.to_vec() }
    }

    fn bytes(&self) -> Vec<u8> {
        let body = format!("status {}", self.status);
        let mut out = format!("HTTP/1.1 {} X\r\ncontent-length: {}\r\n", self.status, body.len());
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&body);
        out.into_bytes()
    }
}

/// Resets the connection (RST, not FIN): the client sees its request fail.
fn reset(stream: tokio::net::TcpStream) {
    // A zero linger time makes the close a reset. (Deprecated in tokio for
    // the blocking close a non-zero linger causes; zero does not block.)
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// The records of a body: an object, or an array of them.
fn records(body: &[u8]) -> Vec<Value> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) => items,
        Ok(v @ Value::Object(_)) => vec![v],
        _ => Vec::new(),
    }
}

/// Records the accepted records (those carrying `_meta`).
fn apply(shared: &Shared, records: &[Value], timestamp: Option<i64>) {
    let now = chrono::Utc::now().timestamp();
    let mut state = shared.state.lock().expect("state");
    for record in records {
        let mut payload = record.clone();
        let meta = payload.as_object_mut().and_then(|o| o.remove("_meta")).unwrap_or(Value::Null);
        state.accepted.push(Accepted {
            key: meta["key"].clone(),
            op: meta["op"].as_str().unwrap_or_default().to_string(),
            message_id: meta["message_id"].as_str().unwrap_or_default().to_string(),
            run_id: meta["run_id"].as_str().unwrap_or_default().to_string(),
            payload,
            webhook_timestamp: timestamp,
            arrived: now,
        });
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
