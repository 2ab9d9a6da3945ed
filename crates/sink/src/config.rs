//! The `destination` section of a sync file. These doc comments are the user
//! reference for each field.

use backflow_core::Duration;
use indexmap::IndexMap;
use serde::{Deserialize, Deserializer, Serialize};

pub use crate::transport::{Http2, Proxy, TransportConfig};

/// Where and how records are sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    /// The endpoint, `http://` or `https://`. May reference `${VAR}`, hold a
    /// static query (`?foo=bar`, kept as written) and `{column}` placeholders
    /// in its path or query, filled per record and percent-encoded.
    pub url: String,
    /// HTTP method: `POST` (default), `PUT`, `PATCH`, `DELETE` (JSON bodies)
    /// or `GET` (the payload flattened into query parameters).
    #[serde(default)]
    pub method: Method,
    /// Per-record query parameters: parameter name ← column.
    #[serde(default)]
    pub query_params: IndexMap<String, String>,
    /// Method and/or URL for added records, overriding the defaults above.
    #[serde(default)]
    pub on_added: Option<RouteConfig>,
    /// Method and/or URL for changed records.
    #[serde(default)]
    pub on_changed: Option<RouteConfig>,
    /// Method and/or URL for removed records (mirror mode's deletes).
    #[serde(default)]
    pub on_removed: Option<RouteConfig>,
    /// Extra headers; values may reference `${VAR}` (e.g. `Bearer ${CRM_TOKEN}`).
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    /// Whether each payload carries the metadata object (default `true`).
    #[serde(default = "yes")]
    pub metadata: bool,
    /// The metadata object's key (default `_meta`).
    #[serde(default = "meta_key")]
    pub metadata_key: String,
    /// Records per request (default 1). Above 1 the body is a JSON array of
    /// payloads; up to 100000. Not with `GET`, placeholders or `query_params`.
    #[serde(default = "one")]
    pub batch_size: usize,
    /// Largest request body in bytes when batching (default 5 MiB); a batch
    /// is cut short rather than exceed it.
    #[serde(default = "max_body_bytes")]
    pub max_body_bytes: usize,
    /// Joins nested keys when a `GET` flattens the payload (default `__`).
    #[serde(default = "separator")]
    pub flatten_separator: String,
    /// `gzip` compresses request bodies (`Content-Encoding: gzip`; a
    /// signature covers the compressed bytes, as sent), or `none` (default).
    #[serde(default)]
    pub compress: Compression,
    /// Request signing (optional).
    #[serde(default)]
    pub signing: Option<SigningConfig>,
    /// Per-request timeout (default `30s`).
    #[serde(default = "timeout")]
    pub timeout: Duration,
    /// Connection timeout (default `10s`).
    #[serde(default = "connect_timeout")]
    pub connect_timeout: Duration,
    /// Requests in flight at once (default 8).
    #[serde(default = "concurrency")]
    pub concurrency: usize,
    /// Most requests started per second, e.g. `50/s` or `600/m` (default: no limit).
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Retries of retryable failures.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Consecutive requests that fail with retryable errors (after their
    /// retries) before the run stops early, leaving the rest pending (default 10).
    #[serde(default = "breaker")]
    pub circuit_breaker: u32,
    /// HTTP/2: `auto` (default: where the receiver offers it over TLS, by
    /// ALPN), `always` (by ALPN over TLS, by prior knowledge over `http://`)
    /// or `never` (HTTP/1.1 only).
    #[serde(default)]
    pub http2: Http2,
    /// A proxy for every request, or `none` to go directly: `http://`
    /// (`https` requests go through a `CONNECT` tunnel; credentials in the
    /// URL, e.g. `http://user:${PROXY_PASSWORD}@proxy.internal:3128`) or
    /// SOCKS5 (`socks5h://host:1080`, the proxy resolving host names;
    /// `socks5://` resolves them here). Default: as `HTTPS_PROXY`,
    /// `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` say.
    #[serde(default)]
    pub proxy: Option<String>,
    /// TLS settings for `https` receivers.
    #[serde(default)]
    pub tls: TlsConfig,
    /// A kept connection idle this long is closed (default `90s`).
    #[serde(default = "idle_timeout")]
    pub idle_timeout: Duration,
    /// A kept connection older than this is not used again (default: no
    /// limit; requests already on it finish). Useful behind load balancers
    /// that move receivers.
    #[serde(default)]
    pub max_lifetime: Option<Duration>,
}

/// TLS settings. Paths are relative to the project directory and may
/// reference `${VAR}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// A PEM file of certificate authorities trusted besides the system's
    /// (a private CA).
    #[serde(default)]
    pub ca_file: Option<String>,
    /// A PEM client certificate (chain) shown to receivers that ask for one
    /// (mutual TLS); needs `client_key`.
    #[serde(default)]
    pub client_cert: Option<String>,
    /// The PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<String>,
}

impl DestinationConfig {
    /// How the transport connects: `${VAR}` from `env`, relative paths
    /// from `dir`.
    pub fn transport(
        &self,
        env: &backflow_core::env::Env,
        dir: &std::path::Path,
    ) -> Result<TransportConfig, crate::SinkError> {
        let expand = |field: &str, text: &str| {
            env.expand(text).map_err(|source| crate::SinkError::Env { field: field.to_string(), source })
        };
        let path = |field: &str, text: &Option<String>| -> Result<Option<std::path::PathBuf>, crate::SinkError> {
            let Some(text) = text else { return Ok(None) };
            let expanded = std::path::PathBuf::from(expand(field, text)?);
            Ok(Some(if expanded.is_absolute() { expanded } else { dir.join(expanded) }))
        };
        let invalid = |field: &str, reason: &str| crate::SinkError::Invalid {
            field: field.to_string(),
            reason: reason.to_string(),
        };
        let proxy = match self.proxy.as_deref().map(str::trim) {
            None => Proxy::Environment,
            Some("none" | "") => Proxy::None,
            Some(url) => Proxy::Via(expand("proxy", url)?),
        };
        let client_cert =
            match (path("tls.client_cert", &self.tls.client_cert)?, path("tls.client_key", &self.tls.client_key)?) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(invalid(
                        "tls.client_key",
                        "is needed with tls.client_cert (the certificate's PEM private key)",
                    ));
                }
                (None, Some(_)) => {
                    return Err(invalid(
                        "tls.client_cert",
                        "is needed with tls.client_key (the PEM certificate the key goes with)",
                    ));
                }
            };
        if self.idle_timeout.get().is_zero() {
            return Err(invalid("idle_timeout", "must be longer than 0 (e.g. `90s`)"));
        }
        if self.max_lifetime.is_some_and(|d| d.get().is_zero()) {
            return Err(invalid("max_lifetime", "must be longer than 0 (e.g. `5m`), or left out for no limit"));
        }
        Ok(TransportConfig {
            connect_timeout: self.connect_timeout.get(),
            idle_timeout: self.idle_timeout.get(),
            max_lifetime: self.max_lifetime.map(Duration::get),
            http2: self.http2,
            proxy,
            ca_file: path("tls.ca_file", &self.tls.ca_file)?,
            client_cert,
        })
    }
}

/// A per-change override of method and URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The method for this change.
    #[serde(default)]
    pub method: Option<Method>,
    /// The URL for this change (same rules as `url`).
    #[serde(default)]
    pub url: Option<String>,
}

/// The HTTP method of requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    /// `GET`: one record per request, payload flattened into the query.
    Get,
    /// `POST` (default).
    #[default]
    Post,
    /// `PUT`.
    Put,
    /// `PATCH`.
    Patch,
    /// `DELETE` (with a JSON body).
    Delete,
}

impl Method {
    /// The method's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
        }
    }
}

/// How request bodies are encoded on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// As they are.
    #[default]
    None,
    /// gzip, with `Content-Encoding: gzip`.
    Gzip,
}

/// Request signing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// `hmac-sha1` or `standard-webhooks`.
    pub scheme: SigningScheme,
    /// The shared secret; reference an environment variable (`${WEBHOOK_SECRET}`).
    /// For `standard-webhooks`, the `whsec_…` form.
    pub secret: String,
}

/// Supported signature schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SigningScheme {
    /// `X-Signature`: lowercase hex HMAC-SHA1 of the exact body bytes (for
    /// `GET`, of the request target: path and query).
    HmacSha1,
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp` and
    /// `webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>`.
    StandardWebhooks,
}

/// Retry policy for retryable failures (connection errors, timeouts, 408,
/// 425, 429, 500, 502, 503, 504).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included (default 5).
    #[serde(default = "attempts")]
    pub attempts: u32,
    /// First backoff; doubles per attempt, with jitter (default `500ms`).
    #[serde(default = "backoff")]
    pub backoff: Duration,
    /// Longest wait between attempts, `Retry-After` included (default `30s`).
    #[serde(default = "max_backoff")]
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig { attempts: attempts(), backoff: backoff(), max_backoff: max_backoff() }
    }
}

/// Requests per period, written `50/s`, `600/m` or `3600/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    /// Requests allowed per period.
    pub requests: u32,
    /// The period.
    pub per: std::time::Duration,
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bad =
            || serde::de::Error::custom(format!("`{text}` is not a rate; write e.g. `50/s`, `600/m` or `3600/h`"));
        let (n, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let requests: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(bad()),
        };
        if requests == 0 {
            return Err(bad());
        }
        // The limiter spaces requests at least a microsecond apart.
        if u64::from(requests) > per * MAX_RATE_PER_SECOND {
            return Err(serde::de::Error::custom(format!(
                "`{text}` is more than {MAX_RATE_PER_SECOND} requests per second; write a smaller rate, or leave \
                 `rate_limit` out for no limit"
            )));
        }
        Ok(RateLimit { requests, per: std::time::Duration::from_secs(per) })
    }
}

impl schemars::JsonSchema for RateLimit {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RateLimit".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "Requests per period: `50/s`, `600/m` or `3600/h`.",
            "pattern": "^\\s*[0-9]+\\s*/\\s*[smh]\\s*$",
            "examples": ["50/s", "600/m"]
        })
    }
}

/// The highest rate a `rate_limit` may give.
pub const MAX_RATE_PER_SECOND: u64 = 1_000_000;

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn meta_key() -> String {
    "_meta".into()
}
fn separator() -> String {
    "__".into()
}
fn max_body_bytes() -> usize {
    5 * 1024 * 1024
}
fn timeout() -> Duration {
    Duration::from_secs(30)
}
fn idle_timeout() -> Duration {
    Duration::from_secs(90)
}
fn connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn concurrency() -> usize {
    8
}
fn breaker() -> u32 {
    10
}
fn attempts() -> u32 {
    5
}
fn backoff() -> Duration {
    Duration::from_millis(500)
}
fn max_backoff() -> Duration {
    Duration::from_secs(30)
}
