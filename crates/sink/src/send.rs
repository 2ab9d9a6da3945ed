//! Stage 3: sending with a timeout, bounded retries with exponential backoff
//! and jitter, `Retry-After`, and no redirects; the answer classified.
//!
//! Requests go over HTTP/1.1 connections kept alive per origin (scheme, host
//! and port) and handed from one request to the next, at most one request
//! per connection at a time; `https` is TLS with the platform's trusted
//! roots. A kept connection the receiver closed while idle is replaced
//! without counting an attempt, when the close is seen before the request
//! is written or when no byte of an answer came on it. Each exchange is run
//! by the `http1` module inside the request's own future.

use crate::SinkError;
use crate::config::{DestinationConfig, Method, RetryConfig};
use crate::decision::{Answer, Decision};
use crate::http1;
use crate::request::HttpRequest;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered 2xx.
    Delivered {
        /// The status.
        status: u16,
        /// Attempts it took.
        attempts: u32,
    },
    /// The record was not delivered: refused (a permanent status) or still
    /// failing after the last retry. It stays pending for the next run.
    Failed {
        /// The last status, if the receiver answered.
        status: Option<u16>,
        /// Why, in words.
        reason: String,
        /// The start of the last response body.
        body: String,
        /// Whether the last failure was of a retryable kind (the endpoint
        /// may recover) rather than a rejection of this record.
        retryable: bool,
        /// Whether the destination refuses every request
        /// ([`Decision::RejectDestination`]): the record was not judged,
        /// and stays pending.
        destination: bool,
        /// Attempts made.
        attempts: u32,
    },
}

impl Outcome {
    /// Whether the record was acknowledged.
    pub fn is_delivered(&self) -> bool {
        matches!(self, Outcome::Delivered { .. })
    }
}

pub use crate::decision::is_retryable_status;

/// How much of a response body is kept with a rejection.
pub const BODY_PREFIX: usize = 512;

type Limiter = governor::DefaultDirectRateLimiter;

/// Sends requests over kept-alive HTTP connections, within the
/// destination's rate limit. Clones share the connections.
#[derive(Debug, Clone)]
pub struct Sender {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    retry: RetryConfig,
    timeout: Duration,
    connect_timeout: Duration,
    limiter: Option<Limiter>,
    origins: Mutex<Vec<Arc<Origin>>>,
    tls: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

/// Where requests of one scheme, host and port go, with its idle
/// connections.
#[derive(Debug)]
struct Origin {
    /// `scheme://authority` as it starts the URLs sent there.
    prefix: String,
    tls: bool,
    host: String,
    port: u16,
    /// The `Host` header line.
    host_line: Vec<u8>,
    /// An `Authorization: Basic …` line from credentials written in the URL.
    auth_line: Option<Vec<u8>>,
    idle: Mutex<Vec<http1::Connection>>,
}

impl Origin {
    /// `request` as written on the wire: request line, headers (the `Host`
    /// line first, then `Authorization` from credentials in the URL unless
    /// one is configured), `Content-Length` for a body, then the body, in
    /// one buffer for one write. `attempt` are the headers made for this
    /// attempt (a signature over the time of sending).
    fn write(&self, request: &HttpRequest, attempt: &[(http::HeaderName, http::HeaderValue)]) -> Vec<u8> {
        let target = request.target.path_and_query().map_or("/", |p| p.as_str());
        let headers_len: usize = request.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
        let mut out = Vec::with_capacity(64 + target.len() + self.host_line.len() + headers_len + request.body.len());
        out.extend_from_slice(request.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        out.extend_from_slice(&self.host_line);
        if let Some(auth) = &self.auth_line
            && !request.headers.contains_key(http::header::AUTHORIZATION)
        {
            out.extend_from_slice(auth);
        }
        for (name, value) in request.headers.iter().chain(attempt.iter().map(|(n, v)| (n, v))) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if request.method != Method::Get {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(request.body.len()).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&request.body);
        out
    }
}

/// One attempt's result, before the retry decision.
enum Attempt {
    Done(Outcome),
    Retry { status: Option<u16>, reason: String, body: String, wait: Option<Duration>, unresolved: bool },
}

/// Why no answer came.
enum Failure {
    /// The request cannot be sent as it is (retrying will not help).
    Invalid(String),
    /// No connection, a broken exchange or no answer in time.
    Transport(String),
    /// The destination cannot be reached by any request: its TLS
    /// certificate or protocol is refused.
    Destination(String),
    /// The receiver's host name does not resolve: retried (a resolver may
    /// fail for a moment), then the destination's when it persists.
    Unresolved(String),
}

impl Sender {
    /// A sender with the destination's timeouts, retry policy and rate limit.
    pub fn new(config: &DestinationConfig) -> Result<Sender, SinkError> {
        let limiter = config.rate_limit.map(|rate| {
            let burst = std::num::NonZeroU32::new(rate.requests).expect("rates are positive");
            let quota = governor::Quota::with_period(rate.per / rate.requests)
                .expect("a positive period")
                .allow_burst(burst.min(std::num::NonZeroU32::new(config.concurrency.max(1) as u32).expect("positive")));
            governor::RateLimiter::direct(quota)
        });
        Ok(Sender {
            inner: Arc::new(Inner {
                retry: config.retry.clone(),
                timeout: config.timeout.get(),
                connect_timeout: config.connect_timeout.get(),
                limiter,
                origins: Mutex::new(Vec::new()),
                tls: OnceLock::new(),
            }),
        })
    }

    /// Sends `request`, retrying retryable failures, and says how it ended.
    pub async fn send(&self, request: &HttpRequest) -> Outcome {
        let attempts = self.inner.retry.attempts.max(1);
        let mut attempt = 1;
        loop {
            match self.attempt(request, attempt).await {
                Attempt::Done(outcome) => return outcome,
                Attempt::Retry { status, reason, body, wait, unresolved } => {
                    if attempt >= attempts {
                        // A name that never resolved is the destination's.
                        return Outcome::Failed {
                            status,
                            reason,
                            body,
                            retryable: !unresolved,
                            destination: unresolved,
                            attempts: attempt,
                        };
                    }
                    let wait = wait.unwrap_or_else(|| self.backoff(attempt)).min(self.inner.retry.max_backoff.get());
                    tracing::warn!(
                        origin = %origin_of(&request.url),
                        attempt,
                        reason = %reason,
                        wait_ms = wait.as_millis() as u64,
                        "retrying"
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn attempt(&self, request: &HttpRequest, attempt: u32) -> Attempt {
        if let Some(limiter) = &self.inner.limiter {
            limiter.until_ready().await;
        }
        let exchange = async {
            let origin = self.origin(&request.url)?;
            self.exchange(&origin, request).await
        };
        let answer = match tokio::time::timeout(self.inner.timeout, exchange).await {
            Err(_) => return retry_without_status("timed out waiting for the receiver".into()),
            Ok(Err(Failure::Invalid(reason))) => return refused_without_status(reason, false, attempt),
            Ok(Err(Failure::Destination(reason))) => return refused_without_status(reason, true, attempt),
            Ok(Err(Failure::Transport(reason))) => return retry_without_status(reason),
            Ok(Err(Failure::Unresolved(reason))) => {
                return Attempt::Retry { status: None, reason, body: String::new(), wait: None, unresolved: true };
            }
            Ok(Ok(answer)) => answer,
        };
        let status = answer.status;
        let body = match answer.body {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if (200..300).contains(&status) => {
                // The receiver said 2xx but the body broke off: not an ack.
                return Attempt::Retry {
                    status: Some(status),
                    reason: format!("response body broke off: {e}"),
                    body: String::new(),
                    wait: None,
                    unresolved: false,
                };
            }
            Err(_) => String::new(),
        };
        let answered = Answer {
            status,
            method: request.method,
            single: request.single,
            per_record_url: request.per_record_url,
            location: answer.location.as_deref(),
            retry_after: answer.retry_after.as_deref(),
        };
        let failed = |reason: String, destination: bool| Outcome::Failed {
            status: Some(status),
            reason,
            body: body.clone(),
            retryable: false,
            destination,
            attempts: attempt,
        };
        match Decision::for_answer(answered) {
            Decision::Deliver => Attempt::Done(Outcome::Delivered { status, attempts: attempt }),
            Decision::Retry { reason, wait } => {
                Attempt::Retry { status: Some(status), reason, body, wait, unresolved: false }
            }
            Decision::RejectRecord { reason } => Attempt::Done(failed(reason, false)),
            Decision::RejectDestination { reason } => Attempt::Done(failed(reason, true)),
        }
    }

    /// The origin of `url`, created on first use.
    fn origin(&self, url: &str) -> Result<Arc<Origin>, Failure> {
        let mut origins = self.inner.origins.lock().expect("origins lock");
        let known = origins.iter().find(|o| {
            url.starts_with(&o.prefix) && matches!(url.as_bytes().get(o.prefix.len()), None | Some(b'/' | b'?' | b'#'))
        });
        if let Some(o) = known {
            return Ok(o.clone());
        }
        let authority_start = url.find("://").map(|i| i + 3).ok_or_else(|| Failure::Invalid("bad URL".into()))?;
        let end = url[authority_start..].find(['/', '?', '#']).map_or(url.len(), |i| authority_start + i);
        let prefix = &url[..end];
        let parsed = url::Url::parse(prefix).map_err(|e| Failure::Invalid(format!("bad URL: {e}")))?;
        let host = parsed.host_str().ok_or_else(|| Failure::Invalid("the URL has no host".into()))?.to_string();
        let port = parsed.port_or_known_default().ok_or_else(|| Failure::Invalid("the URL has no port".into()))?;
        let host_header = match parsed.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let auth_line = (!parsed.username().is_empty() || parsed.password().is_some()).then(|| {
            let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
            let user = decode(parsed.username());
            let password = decode(parsed.password().unwrap_or_default());
            use base64::Engine;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            format!("authorization: Basic {token}\r\n").into_bytes()
        });
        let origin = Arc::new(Origin {
            prefix: prefix.to_string(),
            tls: parsed.scheme() == "https",
            host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
            port,
            host_line: format!("host: {host_header}\r\n").into_bytes(),
            auth_line,
            idle: Mutex::new(Vec::new()),
        });
        origins.push(origin.clone());
        Ok(origin)
    }

    /// Sends `request` over an idle connection of `origin` or a new one and
    /// reads the answer. The connection is kept for the next request unless
    /// it was closed. A kept connection that turns out to have been closed
    /// by the receiver before it answered is replaced by a new one, without
    /// counting an attempt (as browsers and Go's client do; delivery is at
    /// least once either way).
    async fn exchange(&self, origin: &Origin, request: &HttpRequest) -> Result<http1::Answer, Failure> {
        let bytes = origin.write(request, &request.attempt_headers(chrono::Utc::now().timestamp()));
        loop {
            let idle = origin.idle.lock().expect("idle lock").pop();
            let (mut conn, reused) = match idle {
                Some(conn) if conn.is_usable() => (conn, true),
                Some(_) => continue,
                None => (Box::pin(self.connect(origin)).await?, false),
            };
            match conn.exchange(&bytes, BODY_PREFIX).await {
                Ok((answer, reusable)) => {
                    if reusable {
                        origin.idle.lock().expect("idle lock").push(conn);
                    }
                    return Ok(answer);
                }
                Err(http1::Error::Closed(_)) if reused => continue,
                Err(http1::Error::Closed(reason) | http1::Error::Broken(reason)) => {
                    return Err(Failure::Transport(format!("request failed: {reason}")));
                }
            }
        }
    }

    /// Opens a connection (TCP, then TLS for `https`) within the connect
    /// timeout.
    async fn connect(&self, origin: &Origin) -> Result<http1::Connection, Failure> {
        let connect = async {
            // Resolved apart from connecting: a name that does not resolve
            // fails every request alike.
            let addresses: Vec<std::net::SocketAddr> = tokio::net::lookup_host((origin.host.as_str(), origin.port))
                .await
                .map_err(|e| Failure::Unresolved(format!("cannot resolve the receiver's host `{}`: {e}", origin.host)))?
                .collect();
            let tcp = tokio::net::TcpStream::connect(&addresses[..])
                .await
                .map_err(|e| Failure::Transport(format!("could not connect to the receiver: {e}")))?;
            let _ = tcp.set_nodelay(true);
            if !origin.tls {
                return Ok(http1::Connection::new(http1::Stream::Plain(tcp)));
            }
            let tls = self.tls().map_err(Failure::Destination)?;
            let name = rustls::pki_types::ServerName::try_from(origin.host.clone())
                .map_err(|_| Failure::Invalid(format!("`{}` is not a valid TLS server name", origin.host)))?;
            let stream = tls.connect(name, tcp).await.map_err(|e| {
                let reason = format!("TLS handshake failed: {}", error_chain(&e));
                // Refused by TLS itself (a certificate, a protocol):
                // every attempt would be; a broken connection may not.
                if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                    Failure::Destination(reason)
                } else {
                    Failure::Transport(reason)
                }
            })?;
            Ok(http1::Connection::new(http1::Stream::Tls(Box::new(stream))))
        };
        match tokio::time::timeout(self.inner.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Transport("timed out connecting to the receiver".into())),
        }
    }

    /// The TLS client set up on first use: the platform's trusted roots
    /// (on Linux, also `SSL_CERT_FILE` / `SSL_CERT_DIR`), HTTP/1.1.
    fn tls(&self) -> Result<tokio_rustls::TlsConnector, String> {
        self.inner
            .tls
            .get_or_init(|| {
                use rustls_platform_verifier::BuilderVerifierExt;
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .and_then(|b| b.with_platform_verifier())
                    .map_err(|e| format!("cannot set up TLS: {e}"))?
                    .with_no_client_auth();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Ok(Arc::new(config))
            })
            .clone()
            .map(tokio_rustls::TlsConnector::from)
    }

    /// Exponential backoff with full jitter between half and all of the step.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.inner.retry.backoff.get().as_millis() as u64;
        let step = base.saturating_mul(1u64 << (attempt - 1).min(20));
        Duration::from_millis(step / 2 + fastrand::u64(0..=step / 2))
    }
}

/// A refusal with no answer: of the request (`destination` false) or of
/// every request to the destination.
fn refused_without_status(reason: String, destination: bool, attempts: u32) -> Attempt {
    Attempt::Done(Outcome::Failed {
        status: None,
        reason,
        body: String::new(),
        retryable: false,
        destination,
        attempts,
    })
}

fn retry_without_status(reason: String) -> Attempt {
    Attempt::Retry { status: None, reason, body: String::new(), wait: None, unresolved: false }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.signed_duration_since(chrono::Utc::now());
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The URL for logs: without its query string and without credentials
/// written before the host (either may carry keys).
pub fn redact_url(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or(url);
    let Some(authority) = url.find("://").map(|i| i + 3) else { return url.to_string() };
    let host_end = url[authority..].find('/').map_or(url.len(), |i| authority + i);
    match url[authority..host_end].rfind('@') {
        Some(at) => format!("{}{}", &url[..authority], &url[authority + at + 1..]),
        None => url.to_string(),
    }
}

/// `scheme://host:port` of `url`, for logs: paths and queries may carry
/// tokens (webhook URLs often do), credentials are dropped.
pub fn origin_of(url: &str) -> String {
    let url = redact_url(url);
    let Some(authority) = url.find("://").map(|i| i + 3) else { return String::new() };
    let end = url[authority..].find('/').map_or(url.len(), |i| authority + i);
    url[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"), Some(Duration::ZERO));
        let later = (chrono::Utc::now() + chrono::TimeDelta::seconds(60)).to_rfc2822();
        assert!(parse_retry_after(&later).unwrap() > Duration::from_secs(50));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn logged_urls_carry_neither_query_nor_credentials() {
        assert_eq!(redact_url("https://u:p%40ss@api.example.com/a/b?key=1#f"), "https://api.example.com/a/b");
        assert_eq!(redact_url("http://127.0.0.1:8080/hook?k=v"), "http://127.0.0.1:8080/hook");
        assert_eq!(redact_url("http://h/x@y"), "http://h/x@y");
        assert_eq!(
            origin_of("https://u:p@hooks.example.com:8443/services/T0K3N?x=1"),
            "https://hooks.example.com:8443"
        );
    }

    #[test]
    fn retryable_statuses_are_the_specs() {
        let retryable: Vec<u16> = (100..600).filter(|s| is_retryable_status(*s)).collect();
        assert_eq!(retryable, [408, 425, 429, 500, 502, 503, 504]);
    }
}
