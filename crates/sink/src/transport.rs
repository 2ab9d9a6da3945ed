//! The HTTP client under delivery, behind one interface ([`Transport`]):
//! send this request, give back the answer's status, headers and the start
//! of its body, within these limits. [`HyperTransport`] implements it on
//! hyper-util's pooled client: HTTP/1.1 and HTTP/2 (by ALPN, or prior
//! knowledge), TLS by rustls with the platform's roots plus a destination's
//! own authority and client certificate, HTTP proxies (`CONNECT` tunnels for
//! `https`) and SOCKS5 proxies, idle timeout and maximum lifetime of kept
//! connections.

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tower_service::Service;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a request may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The whole exchange, connecting included, up to the end of the answer.
    pub timeout: Duration,
    /// How much of the answer's body is kept (the rest is read and dropped).
    pub body_prefix: usize,
}

/// An answer.
#[derive(Debug)]
pub struct Reply {
    /// The status.
    pub status: u16,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The start of the body, or why it broke off.
    pub body: Result<Bytes, String>,
}

/// Why no answer came.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The request cannot be sent as it is (retrying will not help).
    #[error("{0}")]
    Invalid(String),
    /// No connection, a broken exchange or no answer in time: worth retrying.
    #[error("{0}")]
    Failed(String),
    /// No request can reach the destination this way: its TLS certificate
    /// or protocol is refused, the proxy refuses us.
    #[error("{0}")]
    Destination(String),
    /// The receiver's host name does not resolve: retried (a resolver may
    /// fail for a moment), then the destination's when it persists.
    #[error("{0}")]
    Unresolved(String),
}

/// Sends one request and reads its answer.
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// Sends `request` and reads the answer within `limits`.
    fn send(&self, request: http::Request<Bytes>, limits: Limits) -> BoxFuture<'_, Result<Reply, TransportError>>;

    /// Opens a connection to `origin` (`scheme://host:port`) as a request
    /// would, proxy and TLS included, sends nothing, and describes it.
    fn reach(&self, origin: Uri) -> BoxFuture<'_, Result<String, TransportError>>;
}

/// Whether HTTP/2 is spoken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Http2 {
    /// HTTP/2 where the server offers it by ALPN (TLS), HTTP/1.1 otherwise.
    #[default]
    Auto,
    /// HTTP/2 only: by ALPN over TLS, by prior knowledge over plain TCP.
    Always,
    /// HTTP/1.1 only.
    Never,
}

/// Where requests go through a proxy.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Proxy {
    /// As `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY` say
    /// (either case).
    #[default]
    Environment,
    /// Through this proxy (`http://`, `socks5://` or `socks5h://`), whatever
    /// the environment says.
    Via(String),
    /// Directly, whatever the environment says.
    None,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proxy::Environment => f.write_str("Environment"),
            // The URL may hold the proxy's password.
            Proxy::Via(url) => f.debug_tuple("Via").field(&crate::send::redact_url(url)).finish(),
            Proxy::None => f.write_str("None"),
        }
    }
}

/// How a [`HyperTransport`] connects.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Opening a connection (TCP, proxy tunnel and TLS handshake).
    pub connect_timeout: Duration,
    /// A kept connection idle this long is closed.
    pub idle_timeout: Duration,
    /// A kept connection older than this is not used again.
    pub max_lifetime: Option<Duration>,
    /// HTTP/2.
    pub http2: Http2,
    /// Proxy.
    pub proxy: Proxy,
    /// A PEM file of certificate authorities trusted beside the platform's.
    pub ca_file: Option<PathBuf>,
    /// A PEM certificate chain and its private key, shown to receivers that
    /// ask for a client certificate.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// [`Transport`] on hyper-util's pooled client.
#[derive(Clone)]
pub struct HyperTransport {
    client: Client<Connector, Full<Bytes>>,
    /// Kept HTTP/1.1 connections to `http://` origins reached without a
    /// proxy, used by one request at a time (`None` with `http2: always`).
    direct: Option<Arc<Direct>>,
    connector: Connector,
    proxy: Option<Arc<Matcher>>,
    max_lifetime: Option<Duration>,
    /// Whether a receiver asked for a TLS client certificate…
    asked_for_certificate: Arc<std::sync::atomic::AtomicBool>,
    /// … and whether any answer came yet.
    answered: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for HyperTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HyperTransport")
            .field("proxied", &self.proxy.is_some())
            .field("max_lifetime", &self.max_lifetime)
            .finish_non_exhaustive()
    }
}

/// Why a transport cannot be set up (a file, a proxy URL).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SetupError {
    /// The setting at fault (`tls.ca_file`, `proxy`, …).
    pub field: &'static str,
    /// What is wrong and what would be right.
    pub reason: String,
}

impl HyperTransport {
    /// A client as `config` says; files are read now.
    pub fn new(config: &TransportConfig) -> Result<HyperTransport, SetupError> {
        let proxy = match &config.proxy {
            Proxy::None => None,
            Proxy::Via(url) => {
                let url = check_proxy_url(url).map_err(|reason| SetupError { field: "proxy", reason })?;
                let matcher = Matcher::builder().all(url).build();
                // Never go directly where a proxy was asked for.
                let probe: Uri = "http://backflow.invalid/".parse().expect("a valid URI");
                if matcher.intercept(&probe).is_none() {
                    return Err(SetupError {
                        field: "proxy",
                        reason: "cannot be used as a proxy URL; write e.g. `http://user:pass@proxy.internal:3128` \
                                 (percent-encode special characters in the password)"
                            .into(),
                    });
                }
                Some(Arc::new(matcher))
            }
            Proxy::Environment => {
                let set = ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
                    .iter()
                    .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
                set.then(|| Arc::new(Matcher::from_env()))
            }
        };
        let mut tcp = HttpConnector::new_with_resolver(Resolver);
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(config.connect_timeout));
        let asked_for_certificate = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (mut tls, verifier) = tls_config(config)?;
        tls.client_auth_cert_resolver = Arc::new(NoticeCertificateRequests {
            inner: tls.client_auth_cert_resolver.clone(),
            asked: asked_for_certificate.clone(),
            configured: config.client_cert.is_some(),
        });
        let connector = Connector {
            tcp,
            tls: Arc::new(tls),
            verifier,
            proxy: proxy.clone(),
            connect_timeout: config.connect_timeout,
            http2: config.http2,
            aged: config.max_lifetime.is_some(),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            // A connection opened for a request that another connection
            // served sits unused, so never answers (whose first answer
            // times its retirement): idle as long as it lives, it is not
            // handed out past its lifetime.
            .pool_idle_timeout(config.max_lifetime.map_or(config.idle_timeout, |max| max.min(config.idle_timeout)))
            .http2_only(config.http2 == Http2::Always)
            .build(connector.clone());
        let direct = (config.http2 != Http2::Always).then(|| {
            Arc::new(Direct {
                idle: Default::default(),
                idle_timeout: config.idle_timeout,
                max_lifetime: config.max_lifetime,
                reaping: Default::default(),
            })
        });
        Ok(HyperTransport {
            client,
            direct,
            connector,
            proxy,
            max_lifetime: config.max_lifetime,
            asked_for_certificate,
            answered: Default::default(),
        })
    }

    async fn exchange(&self, request: http::Request<Bytes>, body_prefix: usize) -> Result<Reply, TransportError> {
        let (mut parts, body) = request.into_parts();
        if parts.uri.scheme() == Some(&http::uri::Scheme::HTTP)
            && let Some(auth) =
                self.proxy.as_ref().and_then(|m| m.intercept(&parts.uri)).and_then(|i| i.basic_auth().cloned())
        {
            // A plain request forwarded by the proxy carries the proxy's
            // credentials itself (a tunnel carries them in `CONNECT`).
            parts.headers.insert(http::header::PROXY_AUTHORIZATION, auth);
        }
        let mut request = http::Request::from_parts(parts, Full::new(body));
        if let Some(direct) = &self.direct
            && request.uri().scheme() == Some(&http::uri::Scheme::HTTP)
            && self.proxy.as_ref().is_none_or(|m| m.intercept(request.uri()).is_none())
        {
            return self.exchange_direct(direct, request, body_prefix).await;
        }
        let captured = self.max_lifetime.map(|_| hyper_util::client::legacy::connect::capture_connection(&mut request));
        let https = request.uri().scheme() == Some(&http::uri::Scheme::HTTPS);
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(e) => return Err(self.refused_certificate(https, failure(e))),
        };
        self.answered.store(true, std::sync::atomic::Ordering::Relaxed);
        if let (Some(max), Some(captured)) = (self.max_lifetime, captured)
            && let Some(born) = response.extensions().get::<Born>()
        {
            born.retire_after(max, captured);
        }
        let (head, body) = response.into_parts();
        let (body, _) = read_body(body, body_prefix).await;
        Ok(Reply { status: head.status.as_u16(), headers: head.headers, body })
    }

    /// The exchange on a kept HTTP/1.1 connection of `direct` (or a new
    /// one), owned by this request until its answer is read: no pool
    /// lookup by hash, no connection future raced against the checkout.
    async fn exchange_direct(
        &self,
        direct: &Arc<Direct>,
        request: http::Request<Full<Bytes>>,
        body_prefix: usize,
    ) -> Result<Reply, TransportError> {
        let origin = request.uri().clone();
        let authority =
            origin.authority().cloned().ok_or_else(|| TransportError::Invalid("the URL has no host".into()))?;
        let (mut parts, body) = request.into_parts();
        parts.uri = match parts.uri.path_and_query() {
            Some(target) => Uri::from(target.clone()),
            None => Uri::from_static("/"),
        };
        if !parts.headers.contains_key(http::header::HOST) {
            // hyper's connection API writes no `Host` of its own.
            let host = http::HeaderValue::from_str(authority.as_str())
                .map_err(|e| TransportError::Invalid(format!("bad URL: {e}")))?;
            parts.headers.insert(http::header::HOST, host);
        }
        let mut request = http::Request::from_parts(parts, body);
        let (response, kept) = loop {
            let (mut kept, reused) = match direct.checkout(&authority) {
                Some(kept) => (kept, true),
                // Boxed: opening a connection is rare, and its state would
                // otherwise size (and be copied with) every request's future.
                None => (Box::pin(self.connect_direct(&origin)).await?, false),
            };
            // Ready once its last answer is wholly read; closed meanwhile,
            // another is taken.
            if kept.sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(TransportError::Failed("the receiver closed the connection at once".into()));
            }
            match kept.sender.try_send_request(request).await {
                Ok(response) => break (response, kept),
                Err(mut e) => match e.take_message() {
                    // A kept connection the receiver closed before it took
                    // the request: sent again on another.
                    Some(again) if reused => request = again,
                    _ => {
                        return Err(TransportError::Failed(format!(
                            "request failed: {}",
                            error_chain(&e.into_error())
                        )));
                    }
                },
            }
        };
        self.answered.store(true, std::sync::atomic::Ordering::Relaxed);
        let (head, body) = response.into_parts();
        let (body, whole) = read_body(body, body_prefix).await;
        if whole && body.is_ok() {
            direct.checkin(authority, kept);
        }
        Ok(Reply { status: head.status.as_u16(), headers: head.headers, body })
    }

    /// A new HTTP/1.1 connection to `origin`, its connection driven by a
    /// task of its own until it closes.
    async fn connect_direct(&self, origin: &Uri) -> Result<Kept, TransportError> {
        let conn = self.connector.clone().call(origin.clone()).await.map_err(|e| e.0)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(conn)
            .await
            .map_err(|e| TransportError::Failed(format!("could not connect to the receiver: {}", error_chain(&e))))?;
        tokio::spawn(async move {
            // Its errors reach the request that was using it.
            let _ = connection.await;
        });
        Ok(Kept { sender, born: Instant::now(), since: Instant::now() })
    }
}

/// Reads an answer's body, keeping its first `body_prefix` bytes; says
/// whether it was read to its end (a long one is not: its connection is
/// closed instead of kept).
async fn read_body(mut body: hyper::body::Incoming, body_prefix: usize) -> (Result<Bytes, String>, bool) {
    if hyper::body::Body::is_end_stream(&body) {
        return (Ok(Bytes::new()), true);
    }
    let mut kept = Vec::new();
    let mut read = 0usize;
    loop {
        match body.frame().await {
            None => return (Ok(Bytes::from(kept)), true),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    read += data.len();
                    let room = body_prefix.saturating_sub(kept.len());
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                    if read > DRAIN_MAX {
                        return (Ok(Bytes::from(kept)), false);
                    }
                }
            }
            Some(Err(e)) => return (Err(error_chain(&e)), false),
        }
    }
}

/// Kept HTTP/1.1 connections, per origin (its authority compared exactly:
/// the sender writes each origin's the same way, host names lowercased).
#[derive(Debug)]
struct Direct {
    idle: std::sync::Mutex<Idle>,
    idle_timeout: Duration,
    max_lifetime: Option<Duration>,
    /// Whether a task closes idle connections as their time runs out.
    reaping: std::sync::atomic::AtomicBool,
}

/// A kept connection.
#[derive(Debug)]
struct Kept {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// When it was opened…
    born: Instant,
    /// … and when it was last put back.
    since: Instant,
}

/// Kept connections, per origin.
type Idle = Vec<(http::uri::Authority, Vec<Kept>)>;

impl Direct {
    /// The most recently used connection to `authority` that is still
    /// open; those closed, idle too long or too old are dropped (which
    /// closes them).
    fn checkout(&self, authority: &http::uri::Authority) -> Option<Kept> {
        let mut idle = self.idle.lock().expect("idle connections lock");
        let (_, kept) = idle.iter_mut().find(|(a, _)| a.as_str() == authority.as_str())?;
        while let Some(k) = kept.pop() {
            let expired =
                k.since.elapsed() >= self.idle_timeout || self.max_lifetime.is_some_and(|max| k.born.elapsed() >= max);
            if !expired && !k.sender.is_closed() {
                return Some(k);
            }
        }
        None
    }

    /// Puts a connection back once its answer was read, and makes sure a
    /// task closes it if it stays idle past the idle timeout.
    fn checkin(self: &Arc<Self>, authority: http::uri::Authority, mut kept: Kept) {
        if self.max_lifetime.is_some_and(|max| kept.born.elapsed() >= max) {
            return;
        }
        kept.since = Instant::now();
        {
            let mut idle = self.idle.lock().expect("idle connections lock");
            match idle.iter_mut().find(|(a, _)| a.as_str() == authority.as_str()) {
                Some((_, list)) => list.push(kept),
                None => idle.push((authority, vec![kept])),
            }
        }
        if !self.reaping.swap(true, std::sync::atomic::Ordering::AcqRel) {
            tokio::spawn(Direct::reap(Arc::downgrade(self)));
        }
    }

    /// Closes idle connections as their idle time runs out, until none is
    /// left (or the transport is gone).
    async fn reap(direct: std::sync::Weak<Direct>) {
        /// Lets a later checkin start another reaper should this one be
        /// dropped on its way (its runtime shut down).
        struct Stopped(Option<std::sync::Weak<Direct>>);
        impl Drop for Stopped {
            fn drop(&mut self) {
                if let Some(direct) = self.0.take().and_then(|d| d.upgrade()) {
                    direct.reaping.store(false, std::sync::atomic::Ordering::Release);
                }
            }
        }
        let mut stopped = Stopped(Some(direct.clone()));
        let mut wait = direct.upgrade().map_or(Duration::ZERO, |d| d.idle_timeout);
        loop {
            tokio::time::sleep(wait).await;
            let Some(direct) = direct.upgrade() else { return };
            let mut idle = direct.idle.lock().expect("idle connections lock");
            for (_, list) in idle.iter_mut() {
                list.retain(|k| k.since.elapsed() < direct.idle_timeout);
            }
            idle.retain(|(_, list)| !list.is_empty());
            // The next connection to run out of time (none, with an idle
            // timeout too long to reach).
            let next = idle.iter().flat_map(|(_, list)| list).map(|k| k.since).min();
            match next.and_then(|oldest| oldest.checked_add(direct.idle_timeout)) {
                Some(at) => wait = at.saturating_duration_since(Instant::now()),
                None => {
                    // Cleared under the lock: a checkin after it starts a
                    // new reaper.
                    direct.reaping.store(false, std::sync::atomic::Ordering::Release);
                    stopped.0 = None;
                    return;
                }
            }
        }
    }
}

impl HyperTransport {
    /// `failure` as the destination's when it is most likely a client
    /// certificate refused: a receiver that asks for one may refuse it (or
    /// its absence) by an alert after the handshake and close, and the
    /// request then often fails writing, before the alert is read. So a
    /// broken `https` exchange, where a client certificate was asked for
    /// and no answer ever came, is taken for that refusal.
    fn refused_certificate(&self, https: bool, failure: TransportError) -> TransportError {
        use std::sync::atomic::Ordering::Relaxed;
        match failure {
            TransportError::Failed(reason)
                if https && self.asked_for_certificate.load(Relaxed) && !self.answered.load(Relaxed) =>
            {
                let what = if self.connector.tls.client_auth_cert_resolver.has_certs() {
                    "refused the configured one (tls.client_cert)"
                } else {
                    "none is configured (set tls.client_cert and tls.client_key)"
                };
                TransportError::Destination(format!(
                    "TLS: the receiver asks for a client certificate and {what}; the connection broke: {reason}"
                ))
            }
            other => other,
        }
    }
}

/// Notes that a receiver asked for a TLS client certificate, and answers
/// with the configured one, if any.
#[derive(Debug)]
struct NoticeCertificateRequests {
    inner: Arc<dyn rustls::client::ResolvesClientCert>,
    asked: Arc<std::sync::atomic::AtomicBool>,
    configured: bool,
}

impl rustls::client::ResolvesClientCert for NoticeCertificateRequests {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.asked.store(true, std::sync::atomic::Ordering::Relaxed);
        self.inner.resolve(root_hint_subjects, sigschemes)
    }

    fn has_certs(&self) -> bool {
        self.configured
    }
}

/// The most of an answer's body read to keep its connection.
const DRAIN_MAX: usize = 1 << 20;

impl Transport for HyperTransport {
    fn send(&self, request: http::Request<Bytes>, limits: Limits) -> BoxFuture<'_, Result<Reply, TransportError>> {
        Box::pin(async move {
            match tokio::time::timeout(limits.timeout, self.exchange(request, limits.body_prefix)).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::Failed("timed out waiting for the receiver".into())),
            }
        })
    }

    fn reach(&self, origin: Uri) -> BoxFuture<'_, Result<String, TransportError>> {
        let mut connector = self.connector.clone();
        Box::pin(async move { connector.call(origin).await.map(|conn| conn.describe()).map_err(|e| e.0) })
    }
}

/// The client's error as a [`TransportError`]: the connector's own kind
/// when it failed, a TLS refusal after the handshake, else a broken
/// exchange.
fn failure(e: hyper_util::client::legacy::Error) -> TransportError {
    if let Some(connected) = e.connect_info() {
        let mut extras = http::Extensions::new();
        connected.get_extras(&mut extras);
        if let Some(reason) = extras.get::<TlsRefusal>().and_then(|r| r.0.get()) {
            return TransportError::Destination(format!("TLS refused: {reason}"));
        }
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(connect) = s.downcast_ref::<ConnectError>() {
            return connect.0.clone();
        }
        // Refused by TLS after the handshake (a client certificate the
        // receiver does not accept is said in an alert then).
        if let Some(io) = s.downcast_ref::<io::Error>()
            && io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return TransportError::Destination(format!("TLS refused: {}", error_chain(&e)));
        }
        source = s.source();
    }
    if e.is_connect() {
        TransportError::Failed(format!("could not connect to the receiver: {}", error_chain(&e)))
    } else {
        TransportError::Failed(format!("request failed: {}", error_chain(&e)))
    }
}

/// A `http://` proxy URL, normalised (percent-encoded), or what is wrong
/// with it (never quoting it whole: it may hold a password).
fn check_proxy_url(url: &str) -> Result<String, String> {
    let parsed = url::Url::parse(url)
        .map_err(|e| format!("is not a URL ({e}); write e.g. `http://user:pass@proxy.internal:3128`"))?;
    if !matches!(parsed.scheme(), "http" | "socks5" | "socks5h") {
        return Err(format!(
            "`{}://…`: only `http://` proxies (HTTPS requests go through them in a CONNECT tunnel) and SOCKS5 \
             proxies are supported; write e.g. `http://proxy.internal:3128`, or `socks5h://proxy.internal:1080` \
             (`socks5://` to resolve host names here)",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none() {
        return Err("the proxy URL has no host; write e.g. `http://proxy.internal:3128`".into());
    }
    if parsed.scheme() != "http" {
        let decoded = |s: &str| percent_encoding::percent_decode_str(s).count();
        if decoded(parsed.username()) > 255 || decoded(parsed.password().unwrap_or_default()) > 255 {
            return Err("a SOCKS5 user name or password is at most 255 bytes".into());
        }
    }
    Ok(parsed.into())
}

/// rustls set up for the destination: the platform's roots (on Linux, also
/// `SSL_CERT_FILE` / `SSL_CERT_DIR`) and `ca_file`'s, a client certificate,
/// ALPN as `http2` says.
fn tls_config(config: &TransportConfig) -> Result<(rustls::ClientConfig, Arc<Verifier>), SetupError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let read_certs = |field: &'static str, path: &PathBuf| -> Result<Vec<CertificateDer<'static>>, SetupError> {
        let certs =
            CertificateDer::pem_file_iter(path).and_then(|certs| certs.collect::<Result<Vec<_>, _>>()).map_err(
                |e| SetupError { field, reason: format!("cannot read certificates from {}: {e}", path.display()) },
            )?;
        if certs.is_empty() {
            return Err(SetupError {
                field,
                reason: format!("{} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)", path.display()),
            });
        }
        Ok(certs)
    };
    let extra = match &config.ca_file {
        Some(path) => read_certs("tls.ca_file", path)?,
        None => Vec::new(),
    };
    // Checked now, though the platform's roots join them only when needed.
    let mut anchors = rustls::RootCertStore::empty();
    for cert in &extra {
        anchors.add(cert.clone()).map_err(|e| SetupError {
            field: "tls.ca_file",
            reason: format!("holds a certificate that cannot be an authority: {e}"),
        })?;
    }
    let verifier = Arc::new(Verifier {
        extra,
        provider: provider.clone(),
        platform: OnceLock::new(),
        loaded: tokio::sync::OnceCell::new(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError { field: "tls", reason: format!("cannot set up TLS: {e}") })?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone());
    let mut tls = match &config.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = read_certs("tls.client_cert", cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| SetupError {
                field: "tls.client_key",
                reason: format!("cannot read a PEM private key from {}: {e}", key.display()),
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| SetupError {
                field: "tls.client_key",
                reason: format!("does not go with tls.client_cert: {e}"),
            })?
        }
    };
    tls.alpn_protocols = match config.http2 {
        Http2::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        Http2::Always => vec![b"h2".to_vec()],
        Http2::Never => vec![b"http/1.1".to_vec()],
    };
    Ok((tls, verifier))
}

/// The platform's certificate checks with `tls.ca_file`'s authorities,
/// set up before the first TLS handshake ([`Verifier::prepare`]): loading
/// the system's roots costs about a quarter of a small run's CPU, which a
/// destination spoken to over plain HTTP never needs.
#[derive(Debug)]
struct Verifier {
    extra: Vec<rustls::pki_types::CertificateDer<'static>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    platform: OnceLock<Result<rustls_platform_verifier::Verifier, String>>,
    /// Set once the roots were loaded by [`Verifier::prepare`] (one
    /// blocking task, however many handshakes wait for it).
    loaded: tokio::sync::OnceCell<()>,
}

impl Verifier {
    /// Loads the platform's roots, once, off the runtime's threads.
    async fn prepare(self: &Arc<Self>) {
        self.loaded
            .get_or_init(|| async {
                let this = self.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = this.platform();
                })
                .await;
            })
            .await;
    }

    fn platform(&self) -> Result<&rustls_platform_verifier::Verifier, rustls::Error> {
        self.platform
            .get_or_init(|| {
                rustls_platform_verifier::Verifier::new_with_extra_roots(self.extra.clone(), self.provider.clone())
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| rustls::Error::General(format!("cannot set up certificate checks: {e}")))
    }
}

impl rustls::client::danger::ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.platform()?.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.platform()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.platform()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        // What the platform's checks support too, known without its roots.
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A connector's failure, with its kind decided where it is known.
#[derive(Debug)]
struct ConnectError(TransportError);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ConnectError {}

/// Opens connections: TCP (through a proxy's tunnel, or to the proxy), then
/// TLS for `https`.
#[derive(Clone)]
struct Connector {
    tcp: HttpConnector<Resolver>,
    tls: Arc<rustls::ClientConfig>,
    verifier: Arc<Verifier>,
    proxy: Option<Arc<Matcher>>,
    connect_timeout: Duration,
    http2: Http2,
    /// Whether connections say when they were opened (with a maximum
    /// lifetime only: it costs each answer an extension).
    aged: bool,
}

impl Service<Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = BoxFuture<'static, Result<Conn, ConnectError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            match tokio::time::timeout(this.connect_timeout, this.connect(dst)).await {
                Ok(result) => result.map_err(ConnectError),
                Err(_) => Err(ConnectError(TransportError::Failed("timed out connecting to the receiver".into()))),
            }
        })
    }
}

impl Connector {
    async fn connect(mut self, dst: Uri) -> Result<Conn, TransportError> {
        let https = dst.scheme() == Some(&http::uri::Scheme::HTTPS);
        let intercept = self.proxy.as_ref().and_then(|m| m.intercept(&dst));
        let tunneled = intercept.is_some();
        let (tcp, proxied) = match intercept {
            None => (self.tcp.call(dst.clone()).await.map_err(|e| tcp_failure(&e, "the receiver"))?, false),
            Some(via) => {
                let proxy = via.uri().clone();
                let socks = match proxy.scheme_str() {
                    Some("http") => None,
                    Some("socks5") => Some(false),
                    Some("socks5h") => Some(true),
                    _ => {
                        return Err(TransportError::Destination(format!(
                            "the proxy `{}` is of a kind not supported (only `http://`, `socks5://` and `socks5h://`)",
                            crate::send::origin_of(&proxy.to_string())
                        )));
                    }
                };
                let proxy = match (socks, proxy.port()) {
                    // SOCKS's own port, for a proxy URL written without one.
                    (Some(_), None) => format!("{}:1080", proxy.to_string().trim_end_matches('/'))
                        .parse()
                        .map_err(|e| TransportError::Destination(format!("the SOCKS proxy's URL: {e}")))?,
                    _ => proxy,
                };
                let tcp = self.tcp.call(proxy).await.map_err(|e| tcp_failure(&e, "the proxy"))?;
                if let Some(remote_dns) = socks {
                    let mut tcp = tcp.into_inner();
                    let host = dst.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
                    let port = dst.port_u16().unwrap_or(if https { 443 } else { 80 });
                    socks5(&mut tcp, host, port, remote_dns, via.raw_auth()).await?;
                    (TokioIo::new(tcp), false)
                } else if https {
                    let mut tcp = tcp.into_inner();
                    tunnel(&mut tcp, &dst, via.basic_auth()).await?;
                    (TokioIo::new(tcp), false)
                } else {
                    (tcp, true)
                }
            }
        };
        let tcp = tcp.into_inner();
        if !https {
            let mut conn = Conn::new(Stream::Plain(tcp), proxied, false, self.aged);
            conn.tunneled = tunneled && !proxied;
            return Ok(conn);
        }
        let host = dst.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| TransportError::Invalid(format!("`{host}` is not a valid TLS server name")))?;
        self.verifier.prepare().await;
        let stream = tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp).await.map_err(|e| {
            let reason = format!("TLS handshake failed: {}", error_chain(&e));
            // Refused by TLS itself (a certificate, a protocol): every
            // attempt would be; a broken connection may not.
            if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                TransportError::Destination(reason)
            } else {
                TransportError::Failed(reason)
            }
        })?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        if self.http2 == Http2::Always && !h2 {
            return Err(TransportError::Destination(
                "the receiver does not offer HTTP/2 (`http2: always`); set `http2: auto`".into(),
            ));
        }
        let mut conn = Conn::new(Stream::Tls(Box::new(stream), TlsRefusal::default()), false, h2, self.aged);
        conn.tunneled = tunneled;
        Ok(conn)
    }
}

/// A TCP connection's failure: a name that does not resolve, or no
/// connection (to `whom`: the receiver or the proxy).
fn tcp_failure(e: &(dyn std::error::Error + 'static), whom: &str) -> TransportError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(unresolved) = s.downcast_ref::<Unresolved>() {
            return TransportError::Unresolved(format!("{whom}: {unresolved}"));
        }
        source = s.source();
    }
    TransportError::Failed(format!("could not connect to {whom}: {}", error_chain(e)))
}

/// Asks the proxy on `tcp` for a tunnel to `dst` (`CONNECT`, RFC 9110
/// §9.3.6) and reads its answer. Written here rather than with
/// hyper-util's `Tunnel`, which keeps neither the proxy's status nor an
/// error type callers can match: a proxy that refuses the credentials
/// (407) or the destination (403) refuses every request, one that cannot
/// reach the receiver (502, 503, 504) may recover.
async fn tunnel(tcp: &mut TcpStream, dst: &Uri, auth: Option<&http::HeaderValue>) -> Result<(), TransportError> {
    let host = dst.host().unwrap_or_default();
    let port = dst.port_u16().unwrap_or(443);
    let mut head = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n").into_bytes();
    if let Some(auth) = auth {
        head.extend_from_slice(b"Proxy-Authorization: ");
        head.extend_from_slice(auth.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let failed = |what: String| TransportError::Failed(format!("the proxy's tunnel to {host}:{port} failed: {what}"));
    tcp.write_all(&head).await.map_err(|e| failed(e.to_string()))?;
    let mut answer = Vec::with_capacity(512);
    loop {
        if answer.len() > 16 * 1024 {
            return Err(failed("its answer's head is too long".into()));
        }
        let mut chunk = [0u8; 1024];
        let n = tcp.read(&mut chunk).await.map_err(|e| failed(e.to_string()))?;
        if n == 0 {
            return Err(failed("it closed the connection".into()));
        }
        answer.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&answer) {
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err(failed(format!("a malformed answer ({e})"))),
            Ok(httparse::Status::Complete(end)) => {
                let status = response.code.unwrap_or_default();
                let reason = response.reason.unwrap_or_default();
                return match status {
                    200..=299 if end == answer.len() => Ok(()),
                    200..=299 => Err(failed("it sent data before the tunnel was used".into())),
                    407 => Err(TransportError::Destination(format!(
                        "the proxy refuses the credentials (407 {reason}); put them in the proxy URL"
                    ))),
                    403 => Err(TransportError::Destination(format!(
                        "the proxy forbids tunnels to {host}:{port} (403 {reason})"
                    ))),
                    _ => Err(failed(format!("it answered {status} {reason}"))),
                };
            }
        }
    }
}

/// Asks the SOCKS5 proxy on `tcp` for a connection to `host:port` (RFC
/// 1928; user name and password by RFC 1929), naming the host for the
/// proxy to resolve (`remote_dns`, `socks5h://`) or giving the address
/// resolved here (`socks5://`). Written here rather than with hyper-util's
/// `SocksV5` for the reason [`tunnel`] is: its errors do not tell refused
/// credentials or a destination the proxy forbids (every request would be
/// refused the same) from a receiver it could not reach (which may
/// recover).
async fn socks5(
    tcp: &mut TcpStream,
    host: &str,
    port: u16,
    remote_dns: bool,
    auth: Option<(&str, &str)>,
) -> Result<(), TransportError> {
    let failed =
        |what: String| TransportError::Failed(format!("the SOCKS proxy's connection to {host}:{port} failed: {what}"));
    let io = |e: io::Error| failed(e.to_string());
    let not_socks = || TransportError::Destination("the proxy does not answer as a SOCKS5 proxy".into());
    // Without credentials, or with them (RFC 1929) if asked for.
    let methods: &[u8] = if auth.is_some() { &[5, 2, 0, 2] } else { &[5, 1, 0] };
    tcp.write_all(methods).await.map_err(io)?;
    let mut chosen = [0u8; 2];
    tcp.read_exact(&mut chosen).await.map_err(io)?;
    if chosen[0] != 5 {
        return Err(not_socks());
    }
    match (chosen[1], auth) {
        (0, _) => {}
        (2, Some((user, password))) => {
            // Lengths are checked when the proxy URL is read; one from the
            // environment is refused here.
            let too_long = |what: &str| {
                TransportError::Destination(format!(
                    "the SOCKS proxy's {what} is over 255 bytes, more than SOCKS5 carries"
                ))
            };
            let user_length = u8::try_from(user.len()).map_err(|_| too_long("user name"))?;
            let password_length = u8::try_from(password.len()).map_err(|_| too_long("password"))?;
            let mut message = vec![1, user_length];
            message.extend_from_slice(user.as_bytes());
            message.push(password_length);
            message.extend_from_slice(password.as_bytes());
            tcp.write_all(&message).await.map_err(io)?;
            let mut status = [0u8; 2];
            tcp.read_exact(&mut status).await.map_err(io)?;
            // The status's version byte is not checked (as curl does not):
            // some proxies write 5 there.
            if status[1] != 0 {
                return Err(TransportError::Destination(
                    "the SOCKS proxy refuses the credentials; put them in the proxy URL".into(),
                ));
            }
        }
        _ if auth.is_none() => {
            return Err(TransportError::Destination(
                "the SOCKS proxy asks for credentials; put them in the proxy URL (`socks5h://user:pass@host:1080`)"
                    .into(),
            ));
        }
        _ => {
            return Err(TransportError::Destination(
                "the SOCKS proxy accepts no user name and password authentication".into(),
            ));
        }
    }
    let mut request = vec![5, 1, 0];
    let address = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) if remote_dns => None,
        // Resolved here: an IPv4 address first (the one a proxy can most
        // likely reach), else the first.
        Err(_) => match tokio::net::lookup_host((host, port)).await {
            Ok(addrs) => {
                let addrs: Vec<std::net::IpAddr> = addrs.map(|a| a.ip()).collect();
                let ip = addrs.iter().find(|ip| ip.is_ipv4()).or(addrs.first()).copied();
                Some(ip.ok_or_else(|| TransportError::Unresolved(format!("cannot resolve the host `{host}`")))?)
            }
            Err(e) => return Err(TransportError::Unresolved(format!("cannot resolve the host `{host}`: {e}"))),
        },
    };
    match address {
        Some(std::net::IpAddr::V4(ip)) => {
            request.push(1);
            request.extend_from_slice(&ip.octets());
        }
        Some(std::net::IpAddr::V6(ip)) => {
            request.push(4);
            request.extend_from_slice(&ip.octets());
        }
        None => {
            let length = u8::try_from(host.len())
                .map_err(|_| TransportError::Invalid(format!("the host name `{host}` is over 255 bytes")))?;
            request.push(3);
            request.push(length);
            request.extend_from_slice(host.as_bytes());
        }
    }
    request.extend_from_slice(&port.to_be_bytes());
    tcp.write_all(&request).await.map_err(io)?;
    // The version and the reply first: a refusal is told whatever follows.
    let mut reply = [0u8; 2];
    tcp.read_exact(&mut reply).await.map_err(io)?;
    if reply[0] != 5 {
        return Err(not_socks());
    }
    let refused =
        |why: &str| TransportError::Destination(format!("the SOCKS proxy refuses connections to {host}:{port}: {why}"));
    match reply[1] {
        0 => {
            // The rest: the address the proxy bound, unused.
            let mut kind = [0u8; 2];
            tcp.read_exact(&mut kind).await.map_err(io)?;
            let bound = match kind[1] {
                1 => 4,
                4 => 16,
                3 => {
                    let mut length = [0u8; 1];
                    tcp.read_exact(&mut length).await.map_err(io)?;
                    usize::from(length[0])
                }
                _ => return Err(failed("a malformed answer".into())),
            };
            let mut rest = vec![0u8; bound + 2];
            tcp.read_exact(&mut rest).await.map(|_| ()).map_err(io)
        }
        2 => Err(refused("not allowed by its rules")),
        7 => Err(refused("it does not support CONNECT")),
        8 => Err(refused("it does not support this kind of address")),
        1 => Err(failed("the proxy failed".into())),
        3 => Err(failed("network unreachable".into())),
        4 => Err(failed("host unreachable".into())),
        5 => Err(failed("connection refused".into())),
        6 => Err(failed("TTL expired".into())),
        other => Err(failed(format!("an unknown reply ({other})"))),
    }
}

/// Resolves host names with the system's resolver, telling a name that does
/// not resolve from a connection that fails.
#[derive(Clone)]
struct Resolver;

/// A host name that did not resolve.
#[derive(Debug)]
struct Unresolved(String);

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unresolved {}

impl Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = Unresolved;
    type Future = BoxFuture<'static, Result<Self::Response, Unresolved>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Unresolved>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        Box::pin(async move {
            let host = name.as_str();
            match tokio::net::lookup_host((host, 0)).await {
                Ok(addrs) => Ok(addrs.collect::<Vec<_>>().into_iter()),
                Err(e) => Err(Unresolved(format!("cannot resolve the host `{host}`: {e}"))),
            }
        })
    }
}

/// When a connection was opened (an extra of its answers), and whether a
/// timer retires it at its maximum lifetime.
#[derive(Debug, Clone)]
struct Born {
    at: Instant,
    timed: Arc<std::sync::atomic::AtomicBool>,
    /// Told when the connection closes: its timer then ends.
    closed: Arc<tokio::sync::Notify>,
}

impl Born {
    /// Retires the pooled connection `captured` (one that answered) once it
    /// is `max` old: at once if it is, else by a timer its first answer
    /// starts. The pool has no hook where it hands a connection out, and
    /// the pool's poison keeps it from handing this one out again.
    fn retire_after(&self, max: Duration, captured: hyper_util::client::legacy::connect::CaptureConnection) {
        let retire = move |captured: &hyper_util::client::legacy::connect::CaptureConnection| {
            if let Some(connected) = captured.connection_metadata().as_ref() {
                connected.poison();
            }
        };
        let left = max.saturating_sub(self.at.elapsed());
        if left.is_zero() {
            retire(&captured);
        } else if !self.timed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let closed = self.closed.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(left) => retire(&captured),
                    () = closed.notified() => {}
                }
            });
        }
    }
}

/// What TLS refused on a connection after its handshake (in TLS 1.3 a
/// receiver refuses a client certificate by an alert then), kept for the
/// request that sees the connection fail: HTTP/2 passes I/O errors on as
/// text only.
#[derive(Debug, Clone, Default)]
struct TlsRefusal(Arc<std::sync::OnceLock<String>>);

/// A connection's byte stream: TCP, or TLS over TCP.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>, TlsRefusal),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            // A receiver that closes without TLS's `close_notify` ends the
            // stream: an answer framed by the close is whole (one framed by
            // length or chunks still tells a short body from a whole one).
            Stream::Tls(s, refusal) => match Pin::new(s.as_mut()).poll_read(cx, buf) {
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
                Poll::Ready(Err(e)) => {
                    if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                        let _ = refusal.0.set(error_chain(&e));
                    }
                    Poll::Ready(Err(e))
                }
                other => other,
            },
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An open connection as the pool sees it.
struct Conn {
    io: TokioIo<Stream>,
    proxied: bool,
    h2: bool,
    /// Whether it goes through a proxy's tunnel (`CONNECT`, SOCKS5).
    tunneled: bool,
    /// When it was opened, if its age is watched.
    born: Option<Born>,
}

impl Conn {
    fn new(stream: Stream, proxied: bool, h2: bool, aged: bool) -> Conn {
        let born = aged.then(|| Born { at: Instant::now(), timed: Default::default(), closed: Default::default() });
        Conn { io: TokioIo::new(stream), proxied, h2, tunneled: false, born }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(born) = &self.born {
            // A permit, should the timer start later.
            born.closed.notify_one();
        }
    }
}

impl Conn {
    /// The peer's address and what was agreed on.
    fn describe(&self) -> String {
        let (tcp, tls) = match self.io.inner() {
            Stream::Plain(tcp) => (tcp, ""),
            Stream::Tls(tls, _) => (tls.get_ref().0, ", TLS"),
        };
        let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let h2 = if self.h2 { ", HTTP/2" } else { "" };
        let via = if self.proxied || self.tunneled { ", through the proxy" } else { "" };
        format!("{peer}{tls}{h2}{via}")
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        let mut connected = Connected::new().proxy(self.proxied);
        if let Some(born) = &self.born {
            connected = connected.extra(born.clone());
        }
        if let Stream::Tls(_, refusal) = self.io.inner() {
            connected = connected.extra(refusal.clone());
        }
        if self.h2 { connected.negotiated_h2() } else { connected }
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

/// An error with its causes, `: `-joined.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// A request as a [`Scripted`] transport saw it.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The method.
    pub method: http::Method,
    /// The full URL.
    pub uri: Uri,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The body.
    pub body: Bytes,
}

type Script = dyn Fn(&Sent, usize) -> Result<Reply, TransportError> + Send + Sync;

/// A [`Transport`] in memory, for tests: each request is answered by a
/// function of it and of how many came before; requests are kept.
pub struct Scripted {
    script: Box<Script>,
    sent: std::sync::Mutex<Vec<Sent>>,
}

impl std::fmt::Debug for Scripted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scripted").finish_non_exhaustive()
    }
}

impl Scripted {
    /// A transport answering by `script(request, index)`.
    pub fn new(script: impl Fn(&Sent, usize) -> Result<Reply, TransportError> + Send + Sync + 'static) -> Scripted {
        Scripted { script: Box::new(script), sent: Default::default() }
    }

    /// An answer with `status` and `body`.
    pub fn status(status: u16, body: &str) -> Result<Reply, TransportError> {
        Ok(Reply { status, headers: http::HeaderMap::new(), body: Ok(Bytes::copy_from_slice(body.as_bytes())) })
    }

    /// The requests sent so far.
    pub fn sent(&self) -> Vec<Sent> {
        self.sent.lock().expect("sent lock").clone()
    }
}

impl Transport for Scripted {
    fn send(&self, request: http::Request<Bytes>, _: Limits) -> BoxFuture<'_, Result<Reply, TransportError>> {
        let (parts, body) = request.into_parts();
        let sent = Sent { method: parts.method, uri: parts.uri, headers: parts.headers, body };
        let answer = {
            let mut log = self.sent.lock().expect("sent lock");
            let answer = (self.script)(&sent, log.len());
            log.push(sent);
            answer
        };
        Box::pin(std::future::ready(answer))
    }

    fn reach(&self, origin: Uri) -> BoxFuture<'_, Result<String, TransportError>> {
        Box::pin(std::future::ready(Ok(origin.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `socks5()` to `example.org:443` through a proxy that reads the
    /// greeting, then writes `replies` (whatever the client asks next).
    fn socks_answered(replies: &'static [u8]) -> Result<(), TransportError> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut proxy, _) = listener.accept().await.unwrap();
                let mut greeting = [0u8; 3];
                proxy.read_exact(&mut greeting).await.unwrap();
                proxy.write_all(replies).await.unwrap();
                // Kept open until the client is done.
                let mut rest = Vec::new();
                let _ = proxy.read_to_end(&mut rest).await;
            });
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            socks5(&mut tcp, "example.org", 443, true, None).await
        })
    }

    #[test]
    fn socks5_answers_are_read_whatever_address_the_proxy_bound_and_refusals_are_told_apart() {
        // Bound to a name, to an IPv6 address, to an IPv4 one.
        assert_eq!(socks_answered(&[5, 0, 5, 0, 0, 3, 4, b'h', b'o', b's', b't', 1, 187]), Ok(()));
        assert_eq!(socks_answered(&[5, 0, 5, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 187]), Ok(()));
        assert_eq!(socks_answered(&[5, 0, 5, 0, 0, 1, 10, 0, 0, 1, 1, 187]), Ok(()));
        // The receiver refused the proxy's connection: may recover.
        let refused = socks_answered(&[5, 0, 5, 5, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(&refused, Err(TransportError::Failed(r)) if r.contains("connection refused")), "{refused:?}");
        // The proxy's rules forbid it, or it is no SOCKS5 proxy: every
        // request would be refused the same.
        let forbidden = socks_answered(&[5, 0, 5, 2, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(&forbidden, Err(TransportError::Destination(r)) if r.contains("rules")), "{forbidden:?}");
        let other = socks_answered(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        assert!(matches!(&other, Err(TransportError::Destination(r)) if r.contains("SOCKS5")), "{other:?}");
    }

    #[test]
    fn the_platform_roots_are_loaded_at_the_first_tls_handshake_only() {
        let plain = backflow_testkit::Receiver::start();
        let (tls, ca_pem) = backflow_testkit::Receiver::start_tls();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_pem).unwrap();
        let transport = HyperTransport::new(&TransportConfig {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(90),
            max_lifetime: None,
            http2: Http2::Auto,
            proxy: Proxy::None,
            ca_file: Some(dir.path().join("ca.pem")),
            client_cert: None,
        })
        .unwrap();
        let limits = Limits { timeout: Duration::from_secs(10), body_prefix: 64 };
        let post = |url: String| http::Request::post(url).body(Bytes::from_static(b"{}")).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let answer = transport.send(post(format!("{}/hook", plain.url())), limits).await.unwrap();
            assert_eq!(answer.status, 200);
            assert!(transport.connector.verifier.platform.get().is_none(), "not loaded for plain HTTP");
            let answer = transport.send(post(format!("{}/hook", tls.https_url())), limits).await.unwrap();
            assert_eq!(answer.status, 200);
            assert!(transport.connector.verifier.platform.get().is_some_and(|p| p.is_ok()));
        });
    }
}
