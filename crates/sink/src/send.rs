//! Stage 3: sending with a timeout, bounded retries with exponential backoff
//! and jitter, `Retry-After`, and no redirects; the answer classified.
//!
//! Requests go through a [`Transport`] (by default hyper-util's pooled
//! client, [`HyperTransport`]): connections kept alive per origin, HTTP/2
//! where the receiver offers it, proxies and client certificates as the
//! destination says.

use crate::SinkError;
use crate::config::{DestinationConfig, Method, RetryConfig};
use crate::decision::{Answer, Decision};
use crate::request::HttpRequest;
use crate::transport::{HyperTransport, Limits, Transport, TransportError};
use std::sync::{Arc, Mutex};
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

/// Sends requests through the destination's transport, within its rate
/// limit. Clones share the connections.
#[derive(Clone)]
pub struct Sender {
    inner: Arc<Inner>,
    /// Once cancelled, failed requests are not retried (delivery is
    /// stopping: they stay pending).
    stop: tokio_util::sync::CancellationToken,
    /// Told how each attempt ended (metrics).
    observer: Option<Arc<dyn Observer>>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender").field("inner", &self.inner).finish_non_exhaustive()
    }
}

/// Watches the requests a [`Sender`] sends, e.g. to count them by status.
/// It is called once per attempt, after the answer's head and body prefix
/// arrived (or the attempt failed without an answer), from the task that
/// sent it: it must be cheap and must not block.
pub trait Observer: Send + Sync {
    /// An attempt ended: the answer's status (`None`: no answer, e.g. a
    /// refused connection or a timeout) after `elapsed`.
    fn answered(&self, status: Option<u16>, elapsed: Duration);
}

#[derive(Debug)]
struct Inner {
    retry: RetryConfig,
    timeout: Duration,
    limiter: Option<Limiter>,
    transport: Arc<dyn Transport>,
    origins: Mutex<Vec<Arc<Origin>>>,
    /// Whether `http://` goes over HTTP/1.1 (HTTP/2 is spoken there only
    /// when asked for: `http2: always`).
    plain_is_http1: bool,
}

/// Where requests of one scheme, host and port go.
#[derive(Debug)]
struct Origin {
    /// `scheme://authority` as it starts the URLs sent there.
    prefix: String,
    scheme: http::uri::Scheme,
    /// Host and port, without credentials.
    authority: http::uri::Authority,
    /// `Authorization: Basic …` from credentials written in the URL.
    auth: Option<http::HeaderValue>,
    /// `Host`, made once, for origins certainly spoken to in HTTP/1.1
    /// (the client would make it for each request; HTTP/2 carries the
    /// authority instead, and is left to the client).
    host: Option<http::HeaderValue>,
}

impl Origin {
    /// `request` as sent: the configured headers, then those made for this
    /// attempt (a signature over the time of sending), and `Authorization`
    /// from credentials in the URL unless one is configured.
    fn request(
        &self,
        request: &HttpRequest,
        attempt: Vec<(http::HeaderName, http::HeaderValue)>,
    ) -> Result<http::Request<bytes::Bytes>, String> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = request.target.path_and_query().cloned();
        let uri = http::Uri::from_parts(parts).map_err(|e| format!("bad URL: {e}"))?;
        let mut headers = request.headers.clone();
        headers.extend(attempt);
        if let Some(auth) = &self.auth
            && !headers.contains_key(http::header::AUTHORIZATION)
        {
            headers.insert(http::header::AUTHORIZATION, auth.clone());
        }
        if let Some(host) = &self.host {
            headers.insert(http::header::HOST, host.clone());
        }
        let method = match request.method {
            Method::Get => http::Method::GET,
            Method::Post => http::Method::POST,
            Method::Put => http::Method::PUT,
            Method::Patch => http::Method::PATCH,
            Method::Delete => http::Method::DELETE,
        };
        let mut out = http::Request::new(request.body.clone());
        *out.method_mut() = method;
        *out.uri_mut() = uri;
        *out.headers_mut() = headers;
        Ok(out)
    }
}

/// One attempt's result, before the retry decision.
enum Attempt {
    Done(Outcome),
    Retry { status: Option<u16>, reason: String, body: String, wait: Option<Duration>, unresolved: bool },
}

impl Sender {
    /// A sender for the destination, on hyper-util's client set up as it
    /// says: `${VAR}` in `proxy` and `tls` from `env`, relative file paths
    /// from `dir` (the project's). Certificate files are read now.
    pub fn new(
        config: &DestinationConfig,
        env: &backflow_core::env::Env,
        dir: &std::path::Path,
    ) -> Result<Sender, SinkError> {
        let transport = HyperTransport::new(&config.transport(env, dir)?)
            .map_err(|e| SinkError::Invalid { field: e.field.to_string(), reason: e.reason })?;
        Ok(Sender::with_transport(config, Arc::new(transport)))
    }

    /// A sender with the destination's timeouts, retry policy and rate
    /// limit, sending through `transport`.
    pub fn with_transport(config: &DestinationConfig, transport: Arc<dyn Transport>) -> Sender {
        let limiter = config.rate_limit.map(|rate| {
            let burst = std::num::NonZeroU32::new(rate.requests).expect("rates are positive");
            let quota = governor::Quota::with_period(rate.per / rate.requests)
                .expect("a positive period")
                .allow_burst(burst.min(std::num::NonZeroU32::new(config.concurrency.max(1) as u32).expect("positive")));
            governor::RateLimiter::direct(quota)
        });
        Sender {
            inner: Arc::new(Inner {
                retry: config.retry.clone(),
                timeout: config.timeout.get(),
                limiter,
                transport,
                origins: Mutex::new(Vec::new()),
                plain_is_http1: config.http2 != crate::transport::Http2::Always,
            }),
            stop: Default::default(),
            observer: None,
        }
    }

    /// This sender, telling `observer` how each attempt ended.
    pub fn observed_by(&self, observer: Arc<dyn Observer>) -> Sender {
        Sender { observer: Some(observer), ..self.clone() }
    }

    /// This sender, retrying no more once `stop` is cancelled.
    pub fn stopping_on(&self, stop: tokio_util::sync::CancellationToken) -> Sender {
        Sender { stop, ..self.clone() }
    }

    /// Sends `request`, retrying retryable failures, and says how it ended.
    pub async fn send(&self, request: &HttpRequest) -> Outcome {
        let attempts = self.inner.retry.attempts.max(1);
        let mut attempt = 1;
        loop {
            match self.attempt(request, attempt).await {
                Attempt::Done(outcome) => return outcome,
                Attempt::Retry { status, reason, body, wait, unresolved } => {
                    let failed = |reason: String| Outcome::Failed {
                        status,
                        reason,
                        body: body.clone(),
                        retryable: !unresolved,
                        destination: false,
                        attempts: attempt,
                    };
                    if self.stop.is_cancelled() {
                        return failed(format!("{reason} (not retried: delivery is stopping)"));
                    }
                    if attempt >= attempts {
                        // A name that never resolved is the destination's.
                        return Outcome::Failed {
                            status,
                            reason,
                            body: body.clone(),
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
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stop.cancelled() => {
                            return failed(format!("{reason} (not retried: delivery is stopping)"));
                        }
                    }
                    attempt += 1;
                }
            }
        }
    }

    async fn attempt(&self, request: &HttpRequest, attempt: u32) -> Attempt {
        if let Some(limiter) = &self.inner.limiter {
            limiter.until_ready().await;
        }
        let sent = match self.origin(&request.url) {
            Ok(origin) => {
                let signed_now = match request.timed {
                    Some(_) => request.attempt_headers(chrono::Utc::now().timestamp()),
                    None => Vec::new(),
                };
                origin.request(request, signed_now)
            }
            Err(reason) => Err(reason),
        };
        let sent = match sent {
            Ok(sent) => sent,
            Err(reason) => return refused_without_status(reason, false, attempt),
        };
        let limits = Limits { timeout: self.inner.timeout, body_prefix: BODY_PREFIX };
        let started = self.observer.as_ref().map(|_| std::time::Instant::now());
        let answer = self.inner.transport.send(sent, limits).await;
        if let (Some(observer), Some(started)) = (&self.observer, started) {
            observer.answered(answer.as_ref().ok().map(|a| a.status), started.elapsed());
        }
        let answer = match answer {
            Err(TransportError::Invalid(reason)) => return refused_without_status(reason, false, attempt),
            Err(TransportError::Destination(reason)) => return refused_without_status(reason, true, attempt),
            Err(TransportError::Failed(reason)) => return retry_without_status(reason),
            Err(TransportError::Unresolved(reason)) => {
                return Attempt::Retry { status: None, reason, body: String::new(), wait: None, unresolved: true };
            }
            Ok(answer) => answer,
        };
        let status = answer.status;
        // Kept as text only with a failure.
        let body = match answer.body {
            Ok(b) => b,
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
            Err(_) => bytes::Bytes::new(),
        };
        let text = || String::from_utf8_lossy(&body).into_owned();
        let header = |name: http::HeaderName| answer.headers.get(name).and_then(|v| v.to_str().ok());
        let answered = Answer {
            status,
            method: request.method,
            single: request.single,
            per_record_url: request.per_record_url,
            location: header(http::header::LOCATION),
            retry_after: header(http::header::RETRY_AFTER),
        };
        let failed = |reason: String, destination: bool| Outcome::Failed {
            status: Some(status),
            reason,
            body: text(),
            retryable: false,
            destination,
            attempts: attempt,
        };
        match Decision::for_answer(answered) {
            Decision::Deliver => Attempt::Done(Outcome::Delivered { status, attempts: attempt }),
            Decision::Retry { reason, wait } => {
                Attempt::Retry { status: Some(status), reason, body: text(), wait, unresolved: false }
            }
            Decision::RejectRecord { reason } => Attempt::Done(failed(reason, false)),
            Decision::RejectDestination { reason } => Attempt::Done(failed(reason, true)),
        }
    }

    /// The origin of `url`, created on first use.
    fn origin(&self, url: &str) -> Result<Arc<Origin>, String> {
        let mut origins = self.inner.origins.lock().expect("origins lock");
        let known = origins.iter().find(|o| {
            url.starts_with(&o.prefix) && matches!(url.as_bytes().get(o.prefix.len()), None | Some(b'/' | b'?' | b'#'))
        });
        if let Some(o) = known {
            return Ok(o.clone());
        }
        let authority_start = url.find("://").map(|i| i + 3).ok_or("bad URL")?;
        let end = url[authority_start..].find(['/', '?', '#']).map_or(url.len(), |i| authority_start + i);
        let prefix = &url[..end];
        let parsed = url::Url::parse(prefix).map_err(|e| format!("bad URL: {e}"))?;
        let host = parsed.host_str().ok_or("the URL has no host")?;
        let authority = match parsed.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let auth = (!parsed.username().is_empty() || parsed.password().is_some()).then(|| {
            let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
            let user = decode(parsed.username());
            let password = decode(parsed.password().unwrap_or_default());
            use base64::Engine;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            let mut value = http::HeaderValue::try_from(format!("Basic {token}")).expect("base64 is a header value");
            value.set_sensitive(true);
            value
        });
        let https = parsed.scheme() == "https";
        let host = (!https && self.inner.plain_is_http1)
            .then(|| http::HeaderValue::try_from(authority.as_str()).map_err(|e| format!("bad URL: {e}")))
            .transpose()?;
        let origin = Arc::new(Origin {
            prefix: prefix.to_string(),
            scheme: if https { http::uri::Scheme::HTTPS } else { http::uri::Scheme::HTTP },
            authority: authority.parse().map_err(|e| format!("bad URL: {e}"))?,
            auth,
            host,
        });
        origins.push(origin.clone());
        Ok(origin)
    }

    /// Opens a connection to `url`'s origin as a request would (proxy and
    /// TLS included), sends nothing, and describes it.
    pub async fn reach(&self, url: &str) -> Result<String, String> {
        let origin = self.origin(&url.replace(['{', '}'], ""))?;
        let uri = http::Uri::builder()
            .scheme(origin.scheme.clone())
            .authority(origin.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| format!("bad URL: {e}"))?;
        let reach = self.inner.transport.reach(uri);
        match tokio::time::timeout(self.inner.timeout, reach).await {
            Ok(Ok(description)) => Ok(description),
            Ok(Err(e)) => Err(format!("cannot connect to {}: {e}", origin.authority)),
            Err(_) => Err(format!("no answer from {} within {:?}", origin.authority, self.inner.timeout)),
        }
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
