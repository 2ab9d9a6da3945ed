//! The HTTP client under delivery against real local servers: TLS with a
//! private authority, a receiver that requires a client certificate,
//! HTTP/2-only receivers, a `CONNECT` proxy, a SOCKS5 proxy, an early 413
//! and an answer framed by a TLS close. Each delivery is checked at the
//! receiver: the body, and its `X-Signature` recomputed here.

mod support;

use backflow_core::env::Env;
use backflow_sink::{Destination, DestinationConfig, Outcome, Sender, per_record};
use backflow_testkit::proxy::{Proxy, Socks5};
use backflow_testkit::{Received, Receiver, TlsOptions};
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};
use support::{config_with, ctx, record};

const SECRET: &str = "transport-test-secret";

fn config(url: &str, extra: Value) -> DestinationConfig {
    let base = json!({
        "retry": {"attempts": 2, "backoff": "10ms", "max_backoff": "50ms"},
        "signing": {"scheme": "hmac-sha1", "secret": SECRET},
    });
    config_with(url, base, extra)
}

/// Delivers records 1..=n through a destination configured by `c`, with
/// files relative to `dir`.
fn deliver_in(dir: &Path, c: &DestinationConfig, n: u64) -> Vec<Outcome> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let destination = Destination::new(c, &Env::default()).unwrap();
    let sender = Sender::new(c, &Env::default(), dir).unwrap();
    runtime.block_on(async {
        let mut out = Vec::new();
        for batch in destination.batches((1..=n).map(record).collect(), &ctx()) {
            out.extend(per_record(destination.send(&sender, batch, &ctx()).await).into_iter().map(|(_, o)| o));
        }
        out
    })
}

fn deliver(c: &DestinationConfig, n: u64) -> Vec<Outcome> {
    deliver_in(Path::new("."), c, n)
}

/// Checks, as a receiver would, that `got` is record `id` and that its
/// signature is the HMAC-SHA1 of the bytes that arrived.
fn verify(got: &Received, id: u64) {
    let body = got.json();
    assert_eq!((body["id"].as_u64(), body["name"].as_str()), (Some(id), Some(format!("n{id}").as_str())), "{body}");
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(&got.body);
    assert_eq!(got.header("x-signature"), Some(hex::encode(mac.finalize().into_bytes()).as_str()));
}

fn verify_all(receiver: &Receiver, n: u64) {
    let mut got = receiver.requests();
    got.sort_by_key(|r| r.json()["id"].as_u64());
    assert_eq!(got.len() as u64, n);
    for (i, r) in got.iter().enumerate() {
        verify(r, i as u64 + 1);
    }
}

/// A project folder holding `files`.
fn files(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn delivered(out: &[Outcome]) -> bool {
    out.iter().all(Outcome::is_delivered)
}

fn refused_destination(out: &[Outcome]) -> String {
    match &out[0] {
        Outcome::Failed { destination: true, reason, .. } => reason.clone(),
        other => panic!("expected the destination refused: {other:?}"),
    }
}

#[test]
fn a_private_authority_in_ca_file_is_trusted_and_otherwise_refused() {
    let (r, pki) = Receiver::start_tls_with(TlsOptions::default());
    let dir = files(&[("ca.pem", &pki.ca_pem)]);
    let out = deliver_in(dir.path(), &config(&r.https_url(), json!({"tls": {"ca_file": "ca.pem"}})), 3);
    assert!(delivered(&out), "{out:?}");
    verify_all(&r, 3);
    assert!(r.requests().iter().all(|q| q.version == "HTTP/2.0"), "HTTP/2 when the receiver offers it");
    let reason = refused_destination(&deliver(&config(&r.https_url(), json!({})), 1));
    assert!(reason.contains("TLS handshake failed") && reason.contains("certificate"), "{reason}");
}

#[test]
fn a_receiver_that_requires_a_client_certificate_gets_the_configured_one() {
    let (r, pki) = Receiver::start_tls_with(TlsOptions { client_auth: true, ..TlsOptions::default() });
    let dir =
        files(&[("ca.pem", &pki.ca_pem), ("client.pem", &pki.client_cert_pem), ("client.key", &pki.client_key_pem)]);
    let tls = json!({"tls": {"ca_file": "ca.pem", "client_cert": "client.pem", "client_key": "client.key"}});
    let out = deliver_in(dir.path(), &config(&r.https_url(), tls), 3);
    assert!(delivered(&out), "{out:?}");
    verify_all(&r, 3);
    // Without the certificate the receiver closes the handshake: no record
    // is judged, the destination is.
    let out = deliver_in(dir.path(), &config(&r.https_url(), json!({"tls": {"ca_file": "ca.pem"}})), 1);
    let reason = refused_destination(&out);
    assert!(reason.contains("TLS") && reason.to_lowercase().contains("certificate"), "{reason}");
    assert_eq!(r.requests().len(), 3);
}

#[test]
fn tls_files_that_are_missing_or_mismatched_are_refused_when_the_sync_loads() {
    let (_, pki) = Receiver::start_tls_with(TlsOptions::default());
    let (_, other) = Receiver::start_tls_with(TlsOptions::default());
    let dir = files(&[("client.pem", &pki.client_cert_pem), ("other.key", &other.client_key_pem), ("empty.pem", "")]);
    let error = |tls: Value| {
        Sender::new(&config("https://localhost:1", json!({"tls": tls})), &Env::default(), dir.path())
            .unwrap_err()
            .to_string()
    };
    let e = error(json!({"ca_file": "missing.pem"}));
    assert!(e.contains("tls.ca_file") && e.contains("missing.pem"), "{e}");
    let e = error(json!({"ca_file": "empty.pem"}));
    assert!(e.contains("holds no PEM certificate"), "{e}");
    let e = error(json!({"client_cert": "client.pem"}));
    assert!(e.contains("tls.client_key") && e.contains("is needed"), "{e}");
    let e = error(json!({"client_cert": "client.pem", "client_key": "other.key"}));
    assert!(e.contains("tls.client_key") && e.contains("does not go with"), "{e}");
}

#[test]
fn http2_only_receivers_are_reached_by_alpn_and_by_prior_knowledge() {
    let (r, pki) = Receiver::start_tls_with(TlsOptions { alpn: vec![b"h2".to_vec()], ..TlsOptions::default() });
    let dir = files(&[("ca.pem", &pki.ca_pem)]);
    let tls = |http2: &str| json!({"tls": {"ca_file": "ca.pem"}, "http2": http2, "concurrency": 8});
    for http2 in ["auto", "always"] {
        r.clear();
        assert!(delivered(&deliver_in(dir.path(), &config(&r.https_url(), tls(http2)), 20)));
        verify_all(&r, 20);
        assert!(r.requests().iter().all(|q| q.version == "HTTP/2.0"));
    }
    let reason = refused_destination(&deliver_in(dir.path(), &config(&r.https_url(), tls("never")), 1));
    assert!(reason.contains("TLS handshake failed"), "{reason}");
    // Plain HTTP: HTTP/1.1 unless HTTP/2 is asked for (prior knowledge).
    let plain = Receiver::start();
    assert!(delivered(&deliver(&config(&plain.url(), json!({})), 2)));
    assert!(delivered(&deliver(&config(&plain.url(), json!({"http2": "always"})), 2)));
    let versions: Vec<String> = plain.requests().iter().map(|q| q.version.clone()).collect();
    assert_eq!(versions, ["HTTP/1.1", "HTTP/1.1", "HTTP/2.0", "HTTP/2.0"]);
    // A TLS receiver that offers only HTTP/1.1 refuses `always`.
    let (old, pki) = Receiver::start_tls_with(TlsOptions { alpn: vec![b"http/1.1".to_vec()], ..TlsOptions::default() });
    let dir = files(&[("ca.pem", &pki.ca_pem)]);
    let reason = refused_destination(&deliver_in(dir.path(), &config(&old.https_url(), tls("always")), 1));
    assert!(reason.contains("TLS handshake failed"), "{reason}");
    assert!(delivered(&deliver_in(dir.path(), &config(&old.https_url(), tls("auto")), 1)));
}

#[test]
fn a_proxy_carries_https_in_a_connect_tunnel_and_http_forwarded_with_its_credentials() {
    let proxy = Proxy::start(Some("bf:s3cret"));
    let (r, pki) = Receiver::start_tls_with(TlsOptions::default());
    let dir = files(&[("ca.pem", &pki.ca_pem)]);
    let via = proxy.url().replace("http://", "http://bf:s3cret@");
    let c = config(&r.https_url(), json!({"tls": {"ca_file": "ca.pem"}, "proxy": via}));
    assert!(delivered(&deliver_in(dir.path(), &c, 5)));
    verify_all(&r, 5);
    let plain = Receiver::start();
    assert!(delivered(&deliver(&config(&plain.url(), json!({"proxy": via})), 5)));
    verify_all(&plain, 5);
    let seen = proxy.seen();
    let port = |url: &str| url.rsplit(':').next().unwrap().to_string();
    assert!(seen.iter().any(|p| p.method == "CONNECT" && p.target == format!("localhost:{}", port(&r.https_url()))));
    assert!(seen.iter().any(|p| p.method == "POST" && p.target.starts_with(&plain.url())), "{seen:?}");
    assert!(seen.iter().all(|p| p.authorization.as_deref() == Some("Basic YmY6czNjcmV0")), "{seen:?}");
    // Wrong credentials: the proxy refuses every request, the destination stops.
    let wrong = proxy.url().replace("http://", "http://bf:nope@");
    let out = deliver_in(dir.path(), &config(&r.https_url(), json!({"tls": {"ca_file": "ca.pem"}, "proxy": wrong})), 3);
    assert!(refused_destination(&out).contains("proxy refuses the credentials"), "{out:?}");
    let out = deliver(&config(&plain.url(), json!({"proxy": wrong})), 3);
    assert!(refused_destination(&out).contains("HTTP 407"), "{out:?}");
    assert_eq!(plain.requests().len(), 5, "nothing more reached the receiver");
    // `none` goes directly.
    let before = proxy.seen().len();
    assert!(delivered(&deliver(&config(&plain.url(), json!({"proxy": "none"})), 1)));
    assert_eq!(proxy.seen().len(), before);
}

#[test]
fn a_socks5_proxy_carries_https_and_http_with_its_credentials() {
    let socks = Socks5::start(Some(("bf", "s3cret")));
    let (r, pki) = Receiver::start_tls_with(TlsOptions::default());
    let dir = files(&[("ca.pem", &pki.ca_pem)]);
    // socks5h: the proxy resolves the receiver's name.
    let via = format!("socks5h://bf:s3cret@{}", socks.addr());
    let c = config(&r.https_url(), json!({"tls": {"ca_file": "ca.pem"}, "proxy": via}));
    assert!(delivered(&deliver_in(dir.path(), &c, 5)));
    verify_all(&r, 5);
    // socks5: the name resolved here, an address given to the proxy;
    // plain HTTP in the tunnel.
    let plain = Receiver::start();
    let here = format!("socks5://bf:s3cret@{}", socks.addr());
    let by_name = plain.url().replace("127.0.0.1", "localhost");
    assert!(delivered(&deliver(&config(&by_name, json!({"proxy": here})), 5)));
    verify_all(&plain, 5);
    let seen = socks.seen();
    let port = |url: &str| url.rsplit(':').next().unwrap().to_string();
    assert!(seen.iter().any(|s| s.by_name && s.target == format!("localhost:{}", port(&r.https_url()))), "{seen:?}");
    assert!(seen.iter().any(|s| !s.by_name && s.target == format!("127.0.0.1:{}", port(&plain.url()))), "{seen:?}");
    assert!(seen.iter().all(|s| s.user.as_deref() == Some("bf")), "{seen:?}");
    // Refused credentials, and a receiver the proxy's rules forbid, refuse
    // every request: the destination stops, nothing is split or retried.
    let wrong = format!("socks5h://bf:nope@{}", socks.addr());
    let out = deliver(&config(&plain.url(), json!({"proxy": wrong})), 3);
    let reason = refused_destination(&out);
    assert!(reason.contains("refuses the credentials") && !reason.contains("nope"), "{out:?}");
    let out = deliver(&config("http://forbidden.invalid/hook", json!({"proxy": via})), 3);
    let reason = refused_destination(&out);
    assert!(reason.contains("not allowed by its rules") && !reason.contains("s3cret"), "{out:?}");
    let without = format!("socks5h://{}", socks.addr());
    let out = deliver(&config(&plain.url(), json!({"proxy": without})), 1);
    assert!(refused_destination(&out).contains("asks for credentials"), "{out:?}");
    assert_eq!(plain.requests().len(), 5, "nothing more reached the receiver");
}

#[test]
fn bad_proxy_urls_are_refused_when_the_sync_loads() {
    let error = |proxy: &str| {
        Sender::new(&config("http://localhost:1", json!({"proxy": proxy})), &Env::default(), Path::new("."))
            .unwrap_err()
            .to_string()
    };
    let e = error("socks4://u:hidden@proxy:1080");
    assert!(e.contains("only `http://` proxies") && e.contains("SOCKS5") && !e.contains("hidden"), "{e}");
    assert!(error("not a url").contains("is not a URL"));
}

/// A raw server on 127.0.0.1 that, for each connection, reads the request
/// head and acts; returns its port.
fn raw_server(act: impl Fn(std::net::TcpStream) + Send + Sync + 'static) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let act = std::sync::Arc::new(act);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let act = act.clone();
            std::thread::spawn(move || act(stream));
        }
    });
    port
}

fn read_head(stream: &mut impl Read) -> Vec<u8> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
        head.push(byte[0]);
    }
    head
}

#[test]
fn an_early_413_is_a_rejection_not_a_timeout() {
    let port = raw_server(|mut s| {
        read_head(&mut s);
        let _ =
            s.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big!");
        // Reads nothing more, and keeps the connection open a while.
        std::thread::sleep(Duration::from_secs(10));
    });
    // A body far larger than the socket buffers.
    let big: String = "x".repeat(16 << 20);
    let c = config(&format!("http://127.0.0.1:{port}/hook"), json!({"timeout": "5s"}));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let destination = Destination::new(&c, &Env::default()).unwrap();
    let sender = Sender::new(&c, &Env::default(), Path::new(".")).unwrap();
    let mut r = record(1);
    r.payload = format!(r#"{{"id":1,"blob":"{big}"}}"#);
    let started = Instant::now();
    let out = runtime.block_on(async {
        let batch = destination.batches(vec![r], &ctx()).into_iter().next().unwrap();
        destination.send(&sender, batch, &ctx()).await
    });
    assert!(started.elapsed() < Duration::from_secs(4), "waited {:?}", started.elapsed());
    match &out[0].1 {
        Outcome::Failed { status: Some(413), retryable: false, destination: false, body, .. } => {
            assert_eq!(body, "too big!")
        }
        other => panic!("expected a 413 rejection: {other:?}"),
    }
}

#[test]
fn a_tls_answer_framed_by_the_close_without_close_notify_is_delivered_once() {
    let (_, pki) = Receiver::start_tls_with(TlsOptions::default());
    // A TLS server with the receiver's authority's certificate is built
    // here from the same PEM files a user would have.
    let dir = files(&[("ca.pem", &pki.ca_pem)]);
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let config_tls = tls_server_config(&pki);
    let seen = count.clone();
    let port = raw_server(move |tcp| {
        let conn = rustls::ServerConnection::new(config_tls.clone()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let head = read_head(&mut tls);
        let length: usize = String::from_utf8_lossy(&head)
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        tls.read_exact(&mut body).unwrap();
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // No length, no chunks: the close ends the body, and the TCP
        // connection is shut without TLS's close_notify.
        let _ = tls.write_all(b"HTTP/1.1 200 OK\r\n\r\naccepted");
        let _ = tls.flush();
        let _ = tls.sock.shutdown(std::net::Shutdown::Both);
    });
    let c = config(&format!("https://localhost:{port}/hook"), json!({"tls": {"ca_file": "ca.pem"}, "http2": "never"}));
    let out = deliver_in(dir.path(), &c, 1);
    assert_eq!(out, [Outcome::Delivered { status: 200, attempts: 1 }]);
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1, "sent once");
}

/// A rustls server configuration with a certificate for `localhost` issued
/// by `pki`'s authority.
fn tls_server_config(pki: &backflow_testkit::Pki) -> std::sync::Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let cert = rustls::pki_types::CertificateDer::from_pem_slice(pki.server_cert_pem.as_bytes()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    std::sync::Arc::new(config)
}

/// How many requests each connection carried, in order, of `requests` sent
/// one at a time, `gap` apart, by one sender configured by `c` (its files
/// in `dir`).
fn requests_per_connection(
    receiver: &Receiver,
    c: &DestinationConfig,
    dir: &Path,
    requests: u64,
    gap: Duration,
) -> Vec<usize> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let destination = Destination::new(c, &Env::default()).unwrap();
    let sender = Sender::new(c, &Env::default(), dir).unwrap();
    runtime.block_on(async {
        for id in 1..=requests {
            let out = destination.deliver(&sender, vec![record(id)], &ctx()).await;
            assert!(out[0].1.is_delivered(), "{out:?}");
            tokio::time::sleep(gap).await;
        }
    });
    let ports: Vec<u16> = receiver.requests().iter().map(|q| q.peer_port).collect();
    receiver.clear();
    ports.chunk_by(|a, b| a == b).map(<[u16]>::len).collect()
}

fn connections_used(receiver: &Receiver, c: &DestinationConfig, requests: u64, gap: Duration) -> usize {
    requests_per_connection(receiver, c, Path::new("."), requests, gap).len()
}

#[test]
fn kept_connections_end_after_their_idle_timeout_and_their_maximum_lifetime() {
    let r = Receiver::start();
    let gap = Duration::from_millis(150);
    assert_eq!(connections_used(&r, &config(&r.url(), json!({})), 4, gap), 1, "kept and reused");
    assert_eq!(
        connections_used(&r, &config(&r.url(), json!({"idle_timeout": "50ms"})), 4, gap),
        4,
        "closed while idle"
    );
    // No request starts on a connection older than its lifetime: with
    // requests 200 ms apart, at most two (at 0 and 200 ms) share a
    // connection that lives 300 ms (100 ms of margin either way); over
    // plain HTTP/1.1 (kept connections of its own) and over HTTPS with
    // HTTP/2 (hyper-util's pool).
    let (tls, pki) = Receiver::start_tls_with(TlsOptions::default());
    let dir = files(&[("ca.pem", &pki.ca_pem)]);
    for (receiver, url, extra) in [
        (&r, r.url(), json!({"max_lifetime": "300ms"})),
        (&tls, tls.https_url(), json!({"max_lifetime": "300ms", "tls": {"ca_file": "ca.pem"}})),
    ] {
        let carried =
            requests_per_connection(receiver, &config(&url, extra), dir.path(), 5, Duration::from_millis(200));
        assert!(carried.len() >= 2 && carried.iter().all(|&n| n <= 2), "{url}: requests per connection {carried:?}");
    }
}

#[test]
fn a_receiver_that_drops_kept_connections_gets_every_record_once() {
    // Answers one request per connection, claiming keep-alive, then closes.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let port = raw_server({
        let seen = seen.clone();
        move |mut s| {
            let head = read_head(&mut s);
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; length];
            if s.read_exact(&mut body).is_ok() {
                seen.lock().unwrap().push(serde_json::from_slice::<Value>(&body).unwrap()["id"].as_u64().unwrap());
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
            }
        }
    });
    // A request written to a connection in the instant the receiver closes
    // it fails (as with any HTTP/1.1 client) and is retried: the receiver
    // never read it, so it still arrives once.
    let c = config(
        &format!("http://127.0.0.1:{port}/hook"),
        json!({"retry": {"attempts": 4, "backoff": "10ms", "max_backoff": "50ms"}}),
    );
    let out = deliver(&c, 30);
    assert!(delivered(&out), "{out:?}");
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_unstable();
    assert_eq!(seen, (1..=30).collect::<Vec<u64>>(), "each record arrived once");
}

#[test]
fn an_idle_kept_connection_is_closed_after_its_idle_timeout_while_nothing_is_sent() {
    // Reports how long each connection stayed open after its answer.
    let (closed_tx, closed) = std::sync::mpsc::channel::<Duration>();
    let closed_tx = std::sync::Mutex::new(closed_tx);
    let port = raw_server(move |mut s| {
        read_head(&mut s);
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        let answered = Instant::now();
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        // The request's body, then the end of the connection (or 5 s).
        let mut rest = [0u8; 4096];
        while s.read(&mut rest).is_ok_and(|n| n > 0) {}
        let _ = closed_tx.lock().unwrap().send(answered.elapsed());
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let open_after = |idle_timeout: &str| {
        let c = config(&format!("http://127.0.0.1:{port}/hook"), json!({"idle_timeout": idle_timeout}));
        let destination = Destination::new(&c, &Env::default()).unwrap();
        let sender = Sender::new(&c, &Env::default(), Path::new(".")).unwrap();
        runtime.block_on(async {
            let out = destination.deliver(&sender, vec![record(1)], &ctx()).await;
            assert!(out[0].1.is_delivered(), "{out:?}");
        });
        // The sender (and its kept connection) lives on, sending nothing.
        let open = closed.recv_timeout(Duration::from_secs(10)).expect("the connection ended");
        drop(sender);
        open
    };
    let open = open_after("200ms");
    assert!(open >= Duration::from_millis(150) && open < Duration::from_secs(2), "closed after {open:?}");
    let open = open_after("30s");
    assert!(open >= Duration::from_secs(4), "kept while within its idle timeout, closed after {open:?}");
}
