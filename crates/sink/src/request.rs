//! Stage 2: the HTTP request for one record or a batch: method and URL (per
//! change), body or flattened query, headers, signature; and delivery of a
//! batch with isolation of bad records.

use crate::config::{Compression, DestinationConfig, Method, SigningScheme};
use crate::encode::{Encoder, MetaContext};
use crate::send::{Outcome, Sender};
use crate::url::{UrlTemplate, flatten, scalar_text};
use crate::{SinkError, signing};
use backflow_core::env::Env;
use backflow_core::{Change, Record};
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// A request ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// The method.
    pub method: Method,
    /// The full URL.
    pub url: String,
    /// The request target sent: the URL's path and query.
    pub target: http::Uri,
    /// Headers, in order (configured ones first), checked and parsed once
    /// per destination rather than per request.
    pub headers: HeaderMap,
    /// The exact body bytes (empty for `GET`).
    pub body: bytes::Bytes,
    /// A signature over the time of sending (Standard Webhooks), made for
    /// each attempt as it is sent ([`HttpRequest::attempt_headers`]).
    pub timed: Option<TimedSignature>,
    /// Whether it carries one record: a `DELETE` of one record answered 404
    /// or 410 finds it gone, which is what was asked (a batch's 404 says
    /// nothing of each record).
    pub single: bool,
    /// Whether the URL holds values of the record (placeholders).
    pub per_record_url: bool,
}

impl HttpRequest {
    /// The bytes a signature covers: the request target for `GET`, the
    /// body otherwise.
    pub fn signed_bytes(&self) -> &[u8] {
        if self.method == Method::Get {
            self.target.path_and_query().map_or(b"/", |p| p.as_str().as_bytes())
        } else {
            &self.body
        }
    }

    /// The headers made for one attempt sent at `unix_seconds`: the
    /// Standard Webhooks id, timestamp and signature, when the destination
    /// signs so (receivers refuse timestamps a few minutes old, so they are
    /// never made ahead of time: a request waiting for the rate limit or a
    /// retry is signed when it goes).
    pub fn attempt_headers(&self, unix_seconds: i64) -> Vec<(HeaderName, HeaderValue)> {
        let Some(timed) = &self.timed else { return Vec::new() };
        let signature = signing::standard_webhooks_signature(&timed.key, &timed.id, unix_seconds, self.signed_bytes());
        vec![
            (HeaderName::from_static("webhook-signature"), text_value(signature)),
            (HeaderName::from_static("webhook-id"), text_value(timed.id.clone())),
            (HeaderName::from_static("webhook-timestamp"), HeaderValue::from(unix_seconds)),
        ]
    }
}

/// What a Standard Webhooks signature of a request needs besides the time.
#[derive(Clone, PartialEq, Eq)]
pub struct TimedSignature {
    key: std::sync::Arc<[u8]>,
    id: String,
}

impl std::fmt::Debug for TimedSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimedSignature").field("id", &self.id).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
struct Route {
    method: Method,
    url: UrlTemplate,
    /// The URL and request target, when they are the same for every
    /// record (no placeholders): made once, not per request.
    fixed: Option<(String, http::Uri)>,
}

impl Route {
    fn new(method: Method, url: UrlTemplate) -> Route {
        let fixed = match url.columns().next() {
            Some(_) => None,
            None => url.render(&serde_json::Map::new(), &[]).ok().and_then(|url| {
                let target = origin_form(&url).ok()?;
                Some((url, target))
            }),
        };
        Route { method, url, fixed }
    }
}

#[derive(Clone)]
enum Signer {
    HmacSha1(Vec<u8>),
    StandardWebhooks(std::sync::Arc<[u8]>),
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is never shown.
        f.write_str(match self {
            Signer::HmacSha1(_) => "HmacSha1(<secret>)",
            Signer::StandardWebhooks(_) => "StandardWebhooks(<secret>)",
        })
    }
}

/// A destination with its `${VAR}` references resolved and checked.
#[derive(Debug, Clone)]
pub struct Destination {
    /// Routes for added, changed and removed records.
    routes: [Route; 3],
    query_params: Vec<(String, String)>,
    headers: HeaderMap,
    meta_key: Option<String>,
    signer: Option<Signer>,
    batch_size: usize,
    max_body_bytes: usize,
    separator: String,
    compress: Compression,
}

/// The most records one request may carry.
pub const MAX_BATCH: usize = 100_000;

impl Destination {
    /// Resolves and checks a destination. Errors name the field; they never
    /// contain the value of an environment variable.
    pub fn new(config: &DestinationConfig, env: &Env) -> Result<Destination, SinkError> {
        let expand = |field: &str, text: &str| {
            env.expand(text).map_err(|source| SinkError::Env { field: field.to_string(), source })
        };
        let template = |field: &str, url: &str| {
            let expanded = expand(field, url)?;
            UrlTemplate::parse(&expanded).map_err(|reason| SinkError::Url {
                field: field.to_string(),
                url: url.to_string(),
                reason,
            })
        };
        let base = Route::new(config.method, template("url", &config.url)?);
        let mut routes = [base.clone(), base.clone(), base];
        for (i, (name, over)) in
            [("on_added", &config.on_added), ("on_changed", &config.on_changed), ("on_removed", &config.on_removed)]
                .into_iter()
                .enumerate()
        {
            if let Some(over) = over {
                if let Some(m) = over.method {
                    routes[i].method = m;
                }
                if let Some(u) = &over.url {
                    routes[i] = Route::new(routes[i].method, template(&format!("{name}.url"), u)?);
                }
            }
        }
        let invalid =
            |field: &str, reason: &str| SinkError::Invalid { field: field.to_string(), reason: reason.to_string() };
        if config.batch_size == 0 || config.batch_size > MAX_BATCH {
            return Err(invalid("batch_size", "must be between 1 (no batching) and 100000"));
        }
        if config.batch_size > 1 {
            if routes.iter().any(|r| r.method == Method::Get) {
                return Err(invalid(
                    "batch_size",
                    "GET sends one record per request; use POST, PUT, PATCH or DELETE to batch",
                ));
            }
            if !config.query_params.is_empty() || routes.iter().any(|r| r.url.columns().next().is_some()) {
                return Err(invalid(
                    "batch_size",
                    "URL placeholders and query_params are per record, so they cannot be batched",
                ));
            }
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let field = format!("headers.{name}");
            let value = expand(&field, value)?;
            let (name, value) = check_header(name, &value)?;
            headers.append(name, value);
        }
        if !headers.contains_key(http::header::USER_AGENT) {
            headers.insert(http::header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        }
        let signer = match &config.signing {
            Some(s) => {
                let secret = expand("signing.secret", &s.secret)?;
                Some(match s.scheme {
                    SigningScheme::HmacSha1 => Signer::HmacSha1(secret.into_bytes()),
                    SigningScheme::StandardWebhooks => Signer::StandardWebhooks(
                        signing::standard_webhooks_key(&secret)
                            .map_err(|reason| invalid("signing.secret", &reason))?
                            .into(),
                    ),
                })
            }
            None => None,
        };
        Ok(Destination {
            routes,
            query_params: config.query_params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            headers,
            meta_key: config.metadata.then(|| config.metadata_key.clone()),
            signer,
            batch_size: config.batch_size,
            max_body_bytes: config.max_body_bytes.max(1024),
            separator: config.flatten_separator.clone(),
            compress: config.compress,
        })
    }

    /// The columns a record's URL needs (placeholders and `query_params`),
    /// which the caller puts in [`Record::route`].
    pub fn route_columns(&self) -> Vec<String> {
        let mut columns: Vec<String> = Vec::new();
        let used =
            self.routes.iter().flat_map(|r| r.url.columns()).chain(self.query_params.iter().map(|(_, c)| c.as_str()));
        for c in used {
            if !columns.iter().any(|x| x == c) {
                columns.push(c.to_string());
            }
        }
        columns
    }

    fn route(&self, change: Change) -> &Route {
        &self.routes[match change {
            Change::Added => 0,
            Change::Changed => 1,
            Change::Removed => 2,
        }]
    }

    /// Cuts records into requests, built ready to send: one record each,
    /// or with `batch_size > 1` runs of records bound for the same method
    /// and URL, at most `batch_size` and `max_body_bytes` each (each
    /// record's envelope is written into its batch's body, and copied once
    /// more only when it does not fit there and opens the next batch).
    pub fn batches(&self, records: Vec<Record>, ctx: &MetaContext) -> Vec<Batch> {
        let mut batcher = self.batcher(ctx);
        let mut out: Vec<Batch> = records.into_iter().filter_map(|r| batcher.push(r)).collect();
        out.extend(batcher.finish());
        out
    }

    /// A [`Batcher`]: [`Destination::batches`] one record at a time, so
    /// requests are built as they are handed on rather than a page at once.
    pub fn batcher<'a>(&'a self, ctx: &MetaContext) -> Batcher<'a> {
        Batcher {
            destination: self,
            encoder: Encoder::new(ctx, self.meta_key.as_deref()),
            groups: Vec::new(),
            scratch: Vec::new(),
        }
    }
    /// The request for `records` (one, or a batch bound for one route).
    /// `Err` when a record cannot be addressed (a NULL URL placeholder).
    pub fn request(&self, records: &[Record], ctx: &MetaContext) -> Result<HttpRequest, String> {
        self.build(&Encoder::new(ctx, self.meta_key.as_deref()), records, None)
    }

    /// The request for `records`, with the batch body when it is written
    /// already.
    fn build(&self, encoder: &Encoder, records: &[Record], array: Option<Vec<u8>>) -> Result<HttpRequest, String> {
        let first = &records[0];
        let route = self.route(first.change);
        let params: Vec<(String, String)> = self
            .query_params
            .iter()
            .filter_map(|(name, column)| {
                first.route.get(column).filter(|v| !v.is_null()).map(|v| (name.clone(), scalar_text(v)))
            })
            .collect();
        let mut headers = self.headers.clone();
        let addressed = |params: &[(String, String)]| -> Result<(String, http::Uri), String> {
            let url = route.url.render(&first.route, params)?;
            let target = origin_form(&url)?;
            Ok((url, target))
        };
        let ((url, target), body) = if route.method == Method::Get {
            let mut params = params;
            params.extend(flatten(&encoder.value(first), &self.separator));
            (addressed(&params)?, bytes::Bytes::new())
        } else {
            let body = match array {
                Some(body) => body,
                None if self.batch_size == 1 => encoder.encode(first),
                None => encoder.array(records),
            };
            if !headers.contains_key(http::header::CONTENT_TYPE) {
                headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            let body = match self.compress {
                Compression::None => body,
                Compression::Gzip => {
                    headers.insert(http::header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                    gzip(&body)
                }
            };
            let address = match &route.fixed {
                Some(fixed) if params.is_empty() => fixed.clone(),
                _ => addressed(&params)?,
            };
            (address, bytes::Bytes::from(body))
        };
        let single = self.batch_size == 1;
        if single {
            headers.append(IDEMPOTENCY_KEY, text_value(first.message_id.clone()));
        }
        let mut request = HttpRequest {
            method: route.method,
            url,
            target,
            headers,
            body,
            timed: None,
            single: records.len() == 1,
            per_record_url: route.url.columns().next().is_some(),
        };
        match &self.signer {
            Some(Signer::HmacSha1(secret)) => {
                // Over the exact bytes only: the same for every attempt.
                let signature = signing::hmac_sha1_hex(secret, request.signed_bytes());
                request.headers.append(X_SIGNATURE, text_value(signature));
            }
            Some(Signer::StandardWebhooks(key)) => {
                let id = if single { first.message_id.clone() } else { batch_id(records) };
                request.timed = Some(TimedSignature { key: key.clone(), id });
            }
            None => {}
        }
        Ok(request)
    }

    /// A JSON message that is not records (an alert, a lifecycle event),
    /// sent with the destination's method, headers and signature to its
    /// URL (which must hold no `{column}` placeholders). `id` names it for
    /// Standard Webhooks signatures.
    pub fn message(&self, id: &str, body: Vec<u8>) -> Result<HttpRequest, String> {
        let route = &self.routes[0];
        let url = route.url.render(&serde_json::Map::new(), &[])?;
        let mut headers = self.headers.clone();
        if !headers.contains_key(http::header::CONTENT_TYPE) {
            headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let mut request = HttpRequest {
            method: route.method,
            target: origin_form(&url)?,
            url,
            headers,
            body: bytes::Bytes::from(body),
            timed: None,
            single: true,
            per_record_url: false,
        };
        match &self.signer {
            Some(Signer::HmacSha1(secret)) => {
                let signature = signing::hmac_sha1_hex(secret, request.signed_bytes());
                request.headers.append(X_SIGNATURE, text_value(signature));
            }
            Some(Signer::StandardWebhooks(key)) => {
                request.timed = Some(TimedSignature { key: key.clone(), id: id.to_string() });
            }
            None => {}
        }
        Ok(request)
    }

    /// Sends `records` as one request; when a batch is refused with a
    /// permanent status it is split in halves, recursively, so the bad
    /// records are isolated and the rest delivered.
    pub async fn deliver(&self, sender: &Sender, records: Vec<Record>, ctx: &MetaContext) -> Vec<Settled> {
        let request = self.request(&records, ctx);
        self.send(sender, Batch { records, request }, ctx).await
    }

    /// Sends a batch built by [`Destination::batches`], isolating bad
    /// records like [`Destination::deliver`]: its records come back in
    /// runs that share an outcome (one run unless the batch was split).
    pub async fn send(&self, sender: &Sender, batch: Batch, ctx: &MetaContext) -> Vec<Settled> {
        let Batch { records, request } = batch;
        let outcome = match request {
            Ok(request) => sender.send(&request).await,
            Err(reason) if records.len() == 1 => Outcome::Failed {
                status: None,
                reason,
                body: String::new(),
                retryable: false,
                destination: false,
                attempts: 0,
            },
            Err(_) => Outcome::Failed {
                status: None,
                reason: String::new(),
                body: String::new(),
                retryable: false,
                destination: false,
                attempts: 0,
            },
        };
        // Only a refusal of records splits a batch; a destination that
        // refuses every request would refuse each half too.
        if records.len() > 1 && matches!(outcome, Outcome::Failed { retryable: false, destination: false, .. }) {
            let mut left = records;
            let right = left.split_off(left.len() / 2);
            let mut out = Box::pin(self.deliver(sender, left, ctx)).await;
            // A destination that refused the left half would refuse the right.
            let refused = out.iter().find(|(_, o)| matches!(o, Outcome::Failed { destination: true, .. }));
            if let Some((_, refused)) = refused {
                let refused = refused.clone();
                out.push((right, refused));
            } else {
                out.extend(Box::pin(self.deliver(sender, right, ctx)).await);
            }
            return out;
        }
        vec![(records, outcome)]
    }
}

/// Records sent together and the outcome they share.
pub type Settled = (Vec<Record>, Outcome);

/// Each record of `settled` with its own outcome.
pub fn per_record(settled: Vec<Settled>) -> Vec<(Record, Outcome)> {
    settled.into_iter().flat_map(|(records, outcome)| records.into_iter().map(move |r| (r, outcome.clone()))).collect()
}

/// Records to send in one request, with the request built for them.
#[derive(Debug)]
pub struct Batch {
    /// The records, in order.
    pub records: Vec<Record>,
    /// The request, or why the records cannot be addressed.
    pub request: Result<HttpRequest, String>,
}

/// Builds a destination's requests from records pushed one at a time
/// ([`Destination::batcher`]).
#[derive(Debug)]
pub struct Batcher<'a> {
    destination: &'a Destination,
    encoder: Encoder,
    /// Open batches, one per method and URL.
    groups: Vec<Group<'a>>,
    scratch: Vec<u8>,
}

/// An open batch: its records and the JSON array written so far.
#[derive(Debug)]
struct Group<'a> {
    route: &'a Route,
    records: Vec<Record>,
    body: Vec<u8>,
}

impl Batcher<'_> {
    /// Takes `record`; gives back the batch it completes, if any: a
    /// single-record request at once, a batch once the next record bound
    /// for its route would not fit.
    pub fn push(&mut self, record: Record) -> Option<Batch> {
        let d = self.destination;
        if d.batch_size == 1 {
            let request = d.build(&self.encoder, std::slice::from_ref(&record), None);
            return Some(Batch { records: vec![record], request });
        }
        let route = d.route(record.change);
        let slot =
            self.groups.iter().position(|g| g.route.method == route.method && g.route.url == route.url).unwrap_or_else(
                || {
                    self.groups.push(Group { route, records: Vec::new(), body: Vec::new() });
                    self.groups.len() - 1
                },
            );
        let group = &mut self.groups[slot];
        let mut done = if group.records.len() >= d.batch_size { Some(close(d, &self.encoder, group)) } else { None };
        let opening = group.records.is_empty();
        if opening {
            // A first guess at the envelope's size.
            group.body.reserve(record.payload.len() + record.key_text.len() + ENVELOPE_ROOM);
        }
        // The envelope is written straight into the batch's body; should it
        // not fit there, it moves on to open the next batch.
        let start = group.body.len();
        group.body.push(if opening { b'[' } else { b',' });
        self.encoder.write(&record, &mut group.body);
        if !opening && group.body.len() + 1 > d.max_body_bytes {
            self.scratch.clear();
            self.scratch.extend_from_slice(&group.body[start + 1..]);
            group.body.truncate(start);
            done = Some(close(d, &self.encoder, group));
            group.body.reserve(self.scratch.len() + 1);
            group.body.push(b'[');
            group.body.extend_from_slice(&self.scratch);
        }
        if group.records.is_empty() {
            // Sized for a full batch of records like this one, with an
            // eighth more for longer ones (also past `max_body_bytes`, where
            // the record that does not fit is written before it moves on):
            // no regrowing, and copying, of large bodies.
            let size = group.body.len();
            let fit = (d.max_body_bytes / size).clamp(1, d.batch_size);
            let full = size.saturating_mul(fit);
            let cap = d.max_body_bytes + d.max_body_bytes / 8 + 2;
            group.body.reserve((full + full / 8 + 2).min(cap).saturating_sub(size));
            group.records.reserve_exact(fit.min(RECORDS_RESERVED));
        }
        group.records.push(record);
        done
    }

    /// The batches still open.
    pub fn finish(mut self) -> Vec<Batch> {
        let (d, encoder) = (self.destination, &self.encoder);
        self.groups.iter_mut().filter(|g| !g.records.is_empty()).map(|g| close(d, encoder, g)).collect()
    }
}

/// Room for an envelope's metadata beside its payload and key, as a first
/// guess of its size.
const ENVELOPE_ROOM: usize = 256;

/// The most records a batch's list is sized for at once (it grows past).
const RECORDS_RESERVED: usize = 4096;

/// The request of an open batch, which is left empty.
fn close(destination: &Destination, encoder: &Encoder, group: &mut Group) -> Batch {
    let records = std::mem::take(&mut group.records);
    let mut body = std::mem::take(&mut group.body);
    body.push(b']');
    // The body is sent (and kept for retries) with its allocation: a body
    // that grew for a record which then moved on gives the room back.
    if body.capacity() > body.len() + body.len() / 4 {
        body.shrink_to_fit();
    }
    let request = destination.build(encoder, &records, Some(body));
    Batch { records, request }
}

/// The request target (path and query) of an absolute `url` as sent: as
/// written when it is a valid URI; characters a URI may not hold as written
/// (spaces, non-ASCII in the configured URL) are encoded the way URL
/// parsers do.
fn origin_form(url: &str) -> Result<http::Uri, String> {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let rest = url[after_scheme..].find(['/', '?', '#']).map_or("", |i| &url[after_scheme + i..]);
    let rest = rest.split('#').next().unwrap_or_default();
    let target = if rest.starts_with('/') { rest.to_string() } else { format!("/{rest}") };
    match http::Uri::try_from(target) {
        Ok(uri) => Ok(uri),
        Err(_) => {
            let url = url::Url::parse(url).map_err(|e| format!("bad URL: {e}"))?;
            let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
            http::Uri::try_from(target).map_err(|e| format!("bad URL: {e}"))
        }
    }
}

/// `bytes` gzip-compressed (the fast level: bodies are many and small).
fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(bytes.len() / 4), flate2::Compression::fast());
    encoder.write_all(bytes).expect("writing to memory");
    encoder.finish().expect("writing to memory")
}

/// A batch's id: deterministic in its records' message ids.
fn batch_id(records: &[Record]) -> String {
    let ids: Vec<&str> = records.iter().map(|r| r.message_id.as_str()).collect();
    uuid_from(&ids.join(","))
}

fn uuid_from(text: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    format!("batch_{}", hex::encode(&digest[..16]))
}

fn check_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), SinkError> {
    let err = |reason: &str| SinkError::Header { name: name.to_string(), reason: reason.to_string() };
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| err("not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)"))?;
    if FRAMING.contains(&parsed.as_str()) {
        return Err(err("Backflow sets this header itself for every request (it frames the request); remove it"));
    }
    if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(err("the value contains CR, LF or NUL, which would split the request; remove them"));
    }
    let mut value = HeaderValue::from_str(value).map_err(|_| err("the value holds control characters; remove them"))?;
    value.set_sensitive(true);
    Ok((parsed, value))
}

/// Headers that frame a request or its connection, which Backflow writes.
const FRAMING: [&str; 8] =
    ["host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade"];

/// Sent unless a `User-Agent` is configured.
const USER_AGENT: &str = concat!("backflow/", env!("CARGO_PKG_VERSION"));

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const X_SIGNATURE: HeaderName = HeaderName::from_static("x-signature");

/// A header value Backflow wrote (ids, hex and base64 signatures: always
/// valid), taken without a copy.
fn text_value(text: String) -> HeaderValue {
    HeaderValue::try_from(text).expect("ids and signatures are valid header values")
}

#[cfg(test)]
mod tests {
    use super::*;
    use backflow_core::{Mode, Op};
    use serde_json::{Value, json};

    fn config(extra: Value) -> DestinationConfig {
        let mut base = json!({"url": "http://127.0.0.1:1/hook?foo=bar"});
        base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    fn record(id: i64, change: Change) -> Record {
        let payload = json!({"email": format!("u{id}@x.org"), "tags": ["a", "b"], "addr": {"city": "Oslo"}, "n": null});
        Record {
            key_text: format!(r#"{{"id":{id}}}"#),
            payload: payload.to_string(),
            route: json!({"id": id, "email": format!("u{id}@x.org")}).as_object().unwrap().clone(),
            fingerprint: 1,
            change,
            op: Op::Upsert,
            row_num: id as u64,
            message_id: format!("m{id}"),
        }
    }

    fn ctx() -> MetaContext {
        MetaContext { sync: "s".into(), mode: Mode::Mirror, run_id: "r".into(), test: false }
    }

    #[test]
    fn rejects_bad_urls_and_headers_without_leaking_secrets() {
        let env = Env::default().with("BF_SINK_SECRET", "hunter2\r\nX-Evil: 1");
        assert!(matches!(Destination::new(&config(json!({"url": "ftp://x"})), &env), Err(SinkError::Url { .. })));
        assert!(matches!(Destination::new(&config(json!({"url": "not a url"})), &env), Err(SinkError::Url { .. })));
        let c = config(json!({"headers": {"Authorization": "Bearer ${BF_SINK_SECRET}"}}));
        let err = Destination::new(&c, &env).unwrap_err().to_string();
        assert!(err.contains("CR, LF"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        // Other control characters are refused when the sync loads, too,
        // rather than failing every request.
        let c = config(json!({"headers": {"X-Tag": "a\u{1}b"}}));
        let err = Destination::new(&c, &env).unwrap_err().to_string();
        assert!(err.contains("destination.headers.X-Tag") && err.contains("control characters"), "{err}");
        // Headers that frame the request are Backflow's to write.
        for name in ["Host", "Content-Length", "Transfer-Encoding", "Connection"] {
            let c = config(json!({"headers": {name: "x"}}));
            let err = Destination::new(&c, &env).unwrap_err().to_string();
            assert!(err.contains(&format!("headers.{name}")) && err.contains("sets this header itself"), "{err}");
        }
    }

    #[test]
    fn a_configured_content_type_replaces_the_json_default() {
        let c = config(json!({"headers": {"Content-Type": "application/vnd.api+json"}}));
        let r = Destination::new(&c, &Env::default()).unwrap().request(&[record(1, Change::Added)], &ctx()).unwrap();
        let types: Vec<_> = r.headers.get_all("content-type").iter().collect();
        assert_eq!(types, ["application/vnd.api+json"]);
        let plain = Destination::new(&config(json!({})), &Env::default()).unwrap();
        let r = plain.request(&[record(1, Change::Added)], &ctx()).unwrap();
        assert_eq!(r.headers["content-type"], "application/json");
    }

    #[test]
    fn get_flattens_the_payload_after_static_and_mapped_parameters() {
        let d = Destination::new(
            &config(json!({"method": "GET", "query_params": {"user": "email"}, "metadata": false})),
            &Env::default(),
        )
        .unwrap();
        let r = d.request(&[record(7, Change::Added)], &ctx()).unwrap();
        assert_eq!(
            r.url,
            "http://127.0.0.1:1/hook?foo=bar&user=u7%40x.org&email=u7%40x.org&tags__0=a&tags__1=b&addr__city=Oslo"
        );
        assert!(r.body.is_empty());
        assert!(!r.headers.contains_key("Content-Type"));
    }

    #[test]
    fn per_change_routes_pick_method_and_url() {
        let d = Destination::new(
            &config(json!({
                "url": "http://h/users",
                "on_changed": {"method": "PATCH", "url": "http://h/users/{id}"},
                "on_removed": {"method": "DELETE", "url": "http://h/users/{id}"},
            })),
            &Env::default(),
        )
        .unwrap();
        let added = d.request(&[record(1, Change::Added)], &ctx()).unwrap();
        let changed = d.request(&[record(2, Change::Changed)], &ctx()).unwrap();
        let removed = d.request(&[record(3, Change::Removed)], &ctx()).unwrap();
        assert_eq!((added.method, added.url.as_str()), (Method::Post, "http://h/users"));
        assert_eq!((changed.method, changed.url.as_str()), (Method::Patch, "http://h/users/2"));
        assert_eq!((removed.method, removed.url.as_str()), (Method::Delete, "http://h/users/3"));
        assert_eq!(d.route_columns(), ["id"]);
    }

    #[test]
    fn batches_are_arrays_bounded_by_count_and_bytes_and_grouped_by_route() {
        let d =
            Destination::new(&config(json!({"batch_size": 3, "on_removed": {"method": "DELETE"}})), &Env::default())
                .unwrap();
        let records: Vec<Record> =
            (1..=7).map(|i| record(i, if i == 4 { Change::Removed } else { Change::Added })).collect();
        let batches = d.batches(records, &ctx());
        let ids: Vec<Vec<u64>> = batches.iter().map(|b| b.records.iter().map(|r| r.row_num).collect()).collect();
        assert_eq!(ids, [vec![1, 2, 3], vec![5, 6, 7], vec![4]]);
        let r = batches[0].request.clone().unwrap();
        assert_eq!(
            r,
            d.request(&batches[0].records, &ctx()).unwrap(),
            "the body written while batching is the batch's"
        );
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body.as_array().unwrap().len(), 3);
        assert!(!r.headers.contains_key("Idempotency-Key"));

        let small =
            Destination::new(&config(json!({"batch_size": 1000, "max_body_bytes": 1024})), &Env::default()).unwrap();
        let batches = small.batches((1..=40).map(|i| record(i, Change::Added)).collect(), &ctx());
        assert!(batches.len() > 1);
        for b in &batches {
            let body = &b.request.as_ref().unwrap().body;
            assert!(body.len() <= 1024);
            assert_eq!(*body, small.request(&b.records, &ctx()).unwrap().body);
        }
        let sent: Vec<u64> = batches.iter().flat_map(|b| b.records.iter().map(|r| r.row_num)).collect();
        assert_eq!(sent, (1..=40).collect::<Vec<u64>>(), "every record once, in order");
        // A record larger than the bound goes alone, between full batches.
        let mut records: Vec<Record> = (1..=9).map(|i| record(i, Change::Added)).collect();
        records[4].payload = format!(r#"{{"blob":"{}"}}"#, "x".repeat(2000));
        let batches = small.batches(records, &ctx());
        let ids: Vec<Vec<u64>> = batches.iter().map(|b| b.records.iter().map(|r| r.row_num).collect()).collect();
        assert_eq!(ids, [vec![1, 2, 3, 4], vec![5], vec![6, 7, 8, 9]]);
        for b in &batches {
            assert_eq!(b.request.as_ref().unwrap().body, small.request(&b.records, &ctx()).unwrap().body);
        }
        let err = Destination::new(&config(json!({"batch_size": 10, "method": "GET"})), &Env::default()).unwrap_err();
        assert!(err.to_string().contains("GET sends one record per request"), "{err}");
    }

    #[test]
    fn a_batcher_hands_each_request_on_as_soon_as_it_is_complete() {
        let rows = |batches: Vec<Batch>| -> Vec<Vec<u64>> {
            batches.iter().map(|b| b.records.iter().map(|r| r.row_num).collect()).collect()
        };
        let d = Destination::new(&config(json!({"batch_size": 3})), &Env::default()).unwrap();
        let mut batcher = d.batcher(&ctx());
        let mut handed: Vec<(i64, Vec<u64>)> = Vec::new();
        for i in 1..=7 {
            if let Some(batch) = batcher.push(record(i, Change::Added)) {
                handed.push((i, rows(vec![batch]).remove(0)));
            }
        }
        // A batch goes once the next record would not fit, not at the end.
        assert_eq!(handed, [(4, vec![1, 2, 3]), (7, vec![4, 5, 6])]);
        assert_eq!(rows(batcher.finish()), [vec![7]]);

        let single = Destination::new(&config(json!({})), &Env::default()).unwrap();
        let mut batcher = single.batcher(&ctx());
        let batch = batcher.push(record(1, Change::Added)).expect("one record, one request, at once");
        assert_eq!(batch.request.unwrap(), single.request(&batch.records, &ctx()).unwrap());
        assert!(batcher.finish().is_empty());
    }

    #[test]
    fn signatures_cover_the_exact_bytes_sent() {
        let d = Destination::new(&config(json!({"signing": {"scheme": "hmac-sha1", "secret": "k"}})), &Env::default())
            .unwrap();
        let r = d.request(&[record(1, Change::Added)], &ctx()).unwrap();
        let sig = r.headers["X-Signature"].to_str().unwrap();
        assert!(signing::verify_hmac_sha1(b"k", &r.body, sig));

        let get = Destination::new(
            &config(json!({"method": "GET", "signing": {"scheme": "hmac-sha1", "secret": "k"}})),
            &Env::default(),
        )
        .unwrap();
        let r = get.request(&[record(1, Change::Added)], &ctx()).unwrap();
        let sig = r.headers["X-Signature"].to_str().unwrap();
        let target = &r.url["http://127.0.0.1:1".len()..];
        assert!(target.starts_with("/hook?foo=bar&"));
        assert_eq!(r.target.to_string(), target, "what is signed is what is sent");
        assert!(signing::verify_hmac_sha1(b"k", target.as_bytes(), sig));

        let sw = Destination::new(
            &config(
                json!({"signing": {"scheme": "standard-webhooks", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}),
            ),
            &Env::default(),
        )
        .unwrap();
        let r = sw.request(&[record(1, Change::Added)], &ctx()).unwrap();
        assert!(!r.headers.contains_key("webhook-timestamp"), "made per attempt, not when the request is built");
        for ts in [1_614_265_330, 1_614_265_400] {
            let headers = r.attempt_headers(ts);
            let header = |n: &str| headers.iter().find(|(h, _)| h == n).unwrap().1.to_str().unwrap().to_string();
            assert_eq!(header("webhook-id"), "m1");
            assert_eq!(header("webhook-timestamp"), ts.to_string());
            let key = signing::standard_webhooks_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
            assert_eq!(header("webhook-signature"), signing::standard_webhooks_signature(&key, "m1", ts, &r.body));
        }
    }
}
