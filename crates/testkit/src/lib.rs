//! Real HTTP receivers on 127.0.0.1 for tests: a scripted one (here) that
//! accepts, rejects, fails, stalls and recovers, recording every request it
//! gets; a fault-injecting one ([`faults`]) that also resets connections and
//! rebuilds its own view of what it accepted; and real Postgres databases.
#![deny(missing_docs)]

pub mod faults;
pub mod postgres;
pub mod proxy;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The method.
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Headers, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The exact body bytes.
    pub body: Vec<u8>,
    /// The client's port: one per connection.
    pub peer_port: u16,
    /// The protocol: `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// When it arrived.
    pub arrived: Instant,
}

impl Received {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }
}

/// How the receiver answers one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Answer with this status and a short body.
    Status(u16),
    /// Answer with this status, headers and body.
    Full(u16, Vec<(String, String)>, String),
    /// Wait this long, then answer 200.
    Stall(Duration),
}

type Rule = Box<dyn Fn(&Received, usize) -> Reply + Send>;

struct Inner {
    requests: Vec<Received>,
    rule: Rule,
}

struct Shared {
    inner: Mutex<Inner>,
    arrived: Condvar,
}

/// A running receiver; it stops when dropped (with the test process).
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Receiver {
    /// Starts a receiver that answers 200 to everything.
    pub fn start() -> Receiver {
        Receiver::start_on(0)
    }

    /// Starts a receiver on a given port of 127.0.0.1 (0: any free port).
    pub fn start_on(port: u16) -> Receiver {
        Receiver::serve(port, None)
    }

    /// Starts a receiver that speaks HTTPS, with a certificate for
    /// `localhost` and 127.0.0.1 issued by a certificate authority made for
    /// it. Returns the receiver and that authority's certificate (PEM), which
    /// a client must trust to reach it ([`Receiver::https_url`]).
    pub fn start_tls() -> (Receiver, String) {
        let (receiver, pki) = Receiver::start_tls_with(TlsOptions::default());
        (receiver, pki.ca_pem)
    }

    /// Starts an HTTPS receiver as `options` say; returns it with the
    /// authority that issued its certificate and a client certificate.
    pub fn start_tls_with(options: TlsOptions) -> (Receiver, Pki) {
        let ca_params = {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("no names");
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name.push(rcgen::DnType::CommonName, "backflow test CA");
            p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
            p
        };
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let issue = |names: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose| {
            let mut params = rcgen::CertificateParams::new(names).expect("names");
            params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
            params.extended_key_usages = vec![usage];
            params.use_authority_key_identifier_extension = true;
            let key = rcgen::KeyPair::generate().expect("key");
            let cert = params.signed_by(&key, &issuer).expect("certificate");
            (cert, key)
        };
        let (leaf, leaf_key) =
            issue(vec!["localhost".to_string(), "127.0.0.1".to_string()], rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        let (client, client_key) =
            issue(vec!["backflow-client".to_string()], rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = if options.client_auth {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.der().clone()).expect("CA root");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .expect("server TLS config");
        config.alpn_protocols = options.alpn;
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let pki = Pki {
            ca_pem: ca.pem(),
            client_cert_pem: client.pem(),
            client_key_pem: client_key.serialize_pem(),
            server_cert_pem: leaf.pem(),
            server_key_pem: leaf_key.serialize_pem(),
        };
        (Receiver::serve(0, Some(acceptor)), pki)
    }

    fn serve(port: u16, tls: Option<tokio_rustls::TlsAcceptor>) -> Receiver {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner { requests: Vec::new(), rule: Box::new(|_, _| Reply::Status(200)) }),
            arrived: Condvar::new(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let server_state = shared.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind 127.0.0.1");
                tx.send(listener.local_addr().expect("addr")).expect("report address");
                let app = Router::new()
                    .fallback(handle)
                    .with_state(server_state)
                    .layer(axum::extract::DefaultBodyLimit::max(1 << 30));
                let app = app.into_make_service_with_connect_info::<Peer>();
                match tls {
                    Some(acceptor) => axum::serve(TlsListener { tcp: listener, acceptor }, app).await.expect("serve"),
                    None => axum::serve(listener, app).await.expect("serve"),
                }
            });
        });
        let addr = rx.recv().expect("receiver started");
        Receiver { addr, shared }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `https://localhost:PORT`, for a receiver started with
    /// [`Receiver::start_tls`].
    pub fn https_url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// Answers each request by `rule(request, index)`; `index` counts every
    /// request received so far (0-based).
    pub fn respond(&self, rule: impl Fn(&Received, usize) -> Reply + Send + 'static) {
        self.shared.inner.lock().expect("lock").rule = Box::new(rule);
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Received> {
        self.shared.inner.lock().expect("lock").requests.clone()
    }

    /// The JSON bodies received so far.
    pub fn bodies(&self) -> Vec<Value> {
        self.requests().iter().map(Received::json).collect()
    }

    /// Forgets the requests received so far.
    pub fn clear(&self) {
        self.shared.inner.lock().expect("lock").requests.clear();
    }

    /// Waits until at least `n` requests have arrived (panics after `timeout`).
    pub fn wait_for(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut inner = self.shared.inner.lock().expect("lock");
        while inner.requests.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "only {} of {n} requests arrived within {timeout:?}", inner.requests.len());
            inner = self.shared.arrived.wait_timeout(inner, left).expect("lock").0;
        }
    }
}

/// How an HTTPS receiver is set up.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// Whether a client certificate issued by the receiver's authority is
    /// required (mutual TLS).
    pub client_auth: bool,
    /// The protocols offered by ALPN (`h2`, `http/1.1`); a client offering
    /// none of them is refused.
    pub alpn: Vec<Vec<u8>>,
}

impl Default for TlsOptions {
    fn default() -> Self {
        TlsOptions { client_auth: false, alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()] }
    }
}

/// The certificates of an HTTPS receiver's test authority, PEM.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The authority's certificate, which clients must trust.
    pub ca_pem: String,
    /// A client certificate the authority issued…
    pub client_cert_pem: String,
    /// … and its private key.
    pub client_key_pem: String,
    /// The receiver's own certificate (for `localhost` and 127.0.0.1)…
    pub server_cert_pem: String,
    /// … and its private key.
    pub server_key_pem: String,
}

/// The client's address, for plain and TLS connections.
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

/// Accepts TCP connections and completes their TLS handshake (one that
/// fails is dropped).
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else { continue };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    axum::extract::ConnectInfo(Peer(peer)): axum::extract::ConnectInfo<Peer>,
    method: Method,
    version: axum::http::Version,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received = Received {
        method: method.to_string(),
        target: uri.path_and_query().map_or("/".to_string(), |p| p.to_string()),
        headers: headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect(),
        body: body.to_vec(),
        peer_port: peer.port(),
        version: format!("{version:?}"),
        arrived: Instant::now(),
    };
    let reply = {
        let mut inner = shared.inner.lock().expect("lock");
        let index = inner.requests.len();
        let reply = (inner.rule)(&received, index);
        inner.requests.push(received);
        shared.arrived.notify_all();
        reply
    };
    let status = |s: u16| StatusCode::from_u16(s).expect("valid status");
    match reply {
        Reply::Status(s) => (status(s), format!("status {s}")).into_response(),
        Reply::Full(s, headers, body) => {
            let mut response = (status(s), body).into_response();
            for (n, v) in headers {
                response.headers_mut().insert(
                    axum::http::HeaderName::from_bytes(n.as_bytes()).expect("header name"),
                    v.parse().expect("header value"),
                );
            }
            response
        }
        Reply::Stall(d) => {
            tokio::time::sleep(d).await;
            (StatusCode::OK, "late").into_response()
        }
    }
}
