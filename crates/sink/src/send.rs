//! Stage 3: sending with a timeout, bounded retries with exponential backoff
//! and jitter, `Retry-After`, and no redirects; the answer classified.

use crate::SinkError;
use crate::config::{DestinationConfig, Method, RetryConfig};
use crate::request::HttpRequest;
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

/// Statuses worth retrying (SPEC §4).
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429 | 500 | 502 | 503 | 504)
}

/// How much of a response body is kept with a rejection.
pub const BODY_PREFIX: usize = 512;

type Limiter = governor::DefaultDirectRateLimiter;

/// Sends requests over one pooled, keep-alive HTTP client, within the
/// destination's rate limit.
#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
    retry: RetryConfig,
    limiter: Option<std::sync::Arc<Limiter>>,
}

/// One attempt's result, before the retry decision.
enum Attempt {
    Done(Outcome),
    Retry { status: Option<u16>, reason: String, body: String, wait: Option<Duration> },
}

impl Sender {
    /// A sender with the destination's timeouts, retry policy and rate limit.
    pub fn new(config: &DestinationConfig) -> Result<Sender, SinkError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .user_agent(concat!("backflow/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.timeout.get())
            .connect_timeout(config.connect_timeout.get())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(config.concurrency.max(1))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| SinkError::Client(e.to_string()))?;
        let limiter = config.rate_limit.map(|rate| {
            let burst = std::num::NonZeroU32::new(rate.requests).expect("rates are positive");
            let quota = governor::Quota::with_period(rate.per / rate.requests)
                .expect("a positive period")
                .allow_burst(burst.min(std::num::NonZeroU32::new(config.concurrency.max(1) as u32).expect("positive")));
            std::sync::Arc::new(governor::RateLimiter::direct(quota))
        });
        Ok(Sender { client, retry: config.retry.clone(), limiter })
    }

    /// Sends `request`, retrying retryable failures, and says how it ended.
    pub async fn send(&self, request: &HttpRequest) -> Outcome {
        let attempts = self.retry.attempts.max(1);
        let mut attempt = 1;
        loop {
            match self.attempt(request, attempt).await {
                Attempt::Done(outcome) => return outcome,
                Attempt::Retry { status, reason, body, wait } => {
                    if attempt >= attempts {
                        return Outcome::Failed { status, reason, body, retryable: true, attempts: attempt };
                    }
                    let wait = wait.unwrap_or_else(|| self.backoff(attempt)).min(self.retry.max_backoff.get());
                    tracing::warn!(
                        url = %redact_query(&request.url),
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
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
        let method = match request.method {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
            Method::Patch => reqwest::Method::PATCH,
            Method::Delete => reqwest::Method::DELETE,
        };
        let mut builder = self.client.request(method, &request.url);
        if !request.body.is_empty() {
            builder = builder.body(request.body.clone());
        }
        for (name, value) in &request.headers {
            builder = builder.header(name, value);
        }
        let response = match builder.send().await {
            Ok(r) => r,
            Err(e) => {
                let reason = if e.is_timeout() {
                    "timed out waiting for the receiver".to_string()
                } else if e.is_connect() {
                    "could not connect to the receiver".to_string()
                } else {
                    format!("request failed: {}", error_chain(&e))
                };
                return Attempt::Retry { status: None, reason, body: String::new(), wait: None };
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let location =
            response.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = match response.bytes().await {
            Ok(b) => body_prefix(&b),
            Err(e) if (200..300).contains(&status) => {
                // The receiver said 2xx but the body broke off: not an ack.
                return Attempt::Retry {
                    status: Some(status),
                    reason: format!("response body broke off: {}", error_chain(&e)),
                    body: String::new(),
                    wait: None,
                };
            }
            Err(_) => String::new(),
        };
        match status {
            200..=299 => Attempt::Done(Outcome::Delivered { status, attempts: attempt }),
            300..=399 => Attempt::Done(Outcome::Failed {
                status: Some(status),
                reason: format!(
                    "HTTP {status}: redirects are not followed (Location: {}); configure the final URL",
                    location.as_deref().unwrap_or("none")
                ),
                body,
                retryable: false,
                attempts: attempt,
            }),
            s if is_retryable_status(s) => {
                Attempt::Retry { status: Some(s), reason: format!("HTTP {s}"), body, wait: retry_after }
            }
            s => Attempt::Done(Outcome::Failed {
                status: Some(s),
                reason: format!("HTTP {s}: rejected by the receiver"),
                body,
                retryable: false,
                attempts: attempt,
            }),
        }
    }

    /// Exponential backoff with full jitter between half and all of the step.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.retry.backoff.get().as_millis() as u64;
        let step = base.saturating_mul(1u64 << (attempt - 1).min(20));
        Duration::from_millis(step / 2 + fastrand::u64(0..=step / 2))
    }
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

fn body_prefix(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(BODY_PREFIX)];
    String::from_utf8_lossy(cut).into_owned()
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

/// The URL without its query string (which may carry keys) for logs.
pub fn redact_query(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or(url).to_string()
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
    fn retryable_statuses_are_the_specs() {
        let retryable: Vec<u16> = (100..600).filter(|s| is_retryable_status(*s)).collect();
        assert_eq!(retryable, [408, 425, 429, 500, 502, 503, 504]);
    }
}
