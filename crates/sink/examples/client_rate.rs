//! The request rate of the HTTP client alone, for `bench/delivery.sh`: POSTs
//! a fixed body (shaped like Backflow's) to a receiver, `concurrency` at a
//! time, and prints requests per second.
//!
//! `client_rate bare URL N CONCURRENCY`: hyper's HTTP/1.1 connection API
//! directly, one kept connection per request in flight (the least a hyper
//! client does). `client_rate transport URL N CONCURRENCY`: Backflow's
//! transport ([`HyperTransport`]), requests made by a fixed function. Beside a
//! full run, they tell how much of a run's cost is the client's.

use backflow_sink::transport::{HyperTransport, Limits, Transport, TransportConfig};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BODY: &str = r#"{"name":"n42","email":"u42@example.org","score":42,"active":true,"city":"Lisbon","_meta":{"op":"upsert","change":"added","sync":"bench","mode":"upsert","run_id":"0193a0b1-0000-7000-8000-000000000000","row_num":42,"message_id":"5f0c2a8e-1b7d-5c3e-9a4f-6d2b8e1c0f3a","key":{"id":42}}}"#;

fn request(url: &http::Uri) -> http::Request<Bytes> {
    http::Request::post(url.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::HOST, url.authority().map_or("", |a| a.as_str()))
        .body(Bytes::from_static(BODY.as_bytes()))
        .expect("a valid request")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, url, n, concurrency] = args.as_slice() else {
        eprintln!("usage: client_rate bare|transport URL REQUESTS CONCURRENCY");
        std::process::exit(2);
    };
    let url: http::Uri = url.parse().expect("a URL");
    let n: u64 = n.parse().expect("a number of requests");
    let concurrency: usize = concurrency.parse().expect("a concurrency");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a runtime");
    let left = Arc::new(AtomicU64::new(n));
    let take = |left: &AtomicU64| left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| l.checked_sub(1)).is_ok();
    let started = Instant::now();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        match mode.as_str() {
            "bare" => {
                for _ in 0..concurrency {
                    let (url, left) = (url.clone(), left.clone());
                    tasks.push(tokio::spawn(async move {
                        let addr = url.authority().expect("a host").as_str().to_string();
                        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connected");
                        tcp.set_nodelay(true).expect("nodelay");
                        let (mut sender, connection) =
                            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                                .await
                                .expect("handshake");
                        tokio::spawn(connection);
                        let path = http::Uri::from_static("/hook");
                        while take(&left) {
                            sender.ready().await.expect("ready");
                            let (mut parts, body) = request(&url).into_parts();
                            parts.uri = path.clone();
                            let response = sender
                                .send_request(http::Request::from_parts(parts, Full::new(body)))
                                .await
                                .expect("answered");
                            assert!(response.status().is_success());
                            response.into_body().collect().await.expect("a body");
                        }
                    }));
                }
            }
            "transport" => {
                let config = TransportConfig {
                    connect_timeout: Duration::from_secs(10),
                    idle_timeout: Duration::from_secs(90),
                    max_lifetime: None,
                    http2: Default::default(),
                    proxy: backflow_sink::transport::Proxy::None,
                    ca_file: None,
                    client_cert: None,
                };
                let transport = Arc::new(HyperTransport::new(&config).expect("a transport"));
                let limits = Limits { timeout: Duration::from_secs(30), body_prefix: 512 };
                for _ in 0..concurrency {
                    let (url, left, transport) = (url.clone(), left.clone(), transport.clone());
                    tasks.push(tokio::spawn(async move {
                        while take(&left) {
                            let reply = transport.send(request(&url), limits).await.expect("answered");
                            assert!((200..300).contains(&reply.status));
                        }
                    }));
                }
            }
            other => panic!("unknown mode {other}: bare or transport"),
        }
        for task in tasks {
            task.await.expect("a sending task");
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    println!("{:.0}", n as f64 / seconds);
}
