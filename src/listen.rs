//! `backflow listen`: a local receiver that prints each request and checks
//! its `X-Signature`. Also the receiver behind `backflow demo`.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use backflow_sink::signing::verify_hmac_sha1;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// How the receiver behaves and prints.
pub struct Receiver {
    /// Shared secret for `X-Signature` checks.
    pub secret: Option<Vec<u8>>,
    /// One line per request instead of headers and pretty bodies.
    pub compact: bool,
    /// Print nothing per request.
    pub quiet: bool,
    /// Status to answer with.
    pub status: StatusCode,
    /// How long to wait before answering each request (a real endpoint's
    /// latency, for benchmarks; this kernel has no `netem`).
    pub delay: std::time::Duration,
    /// Requests seen.
    pub count: AtomicU64,
}

/// Serves until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, receiver: Arc<Receiver>) -> std::io::Result<()> {
    // Backflow sends bodies up to `max_body_bytes` (5 MiB by default, more
    // when configured); axum's 2 MiB default would refuse them.
    let app = Router::new().fallback(handle).with_state(receiver).layer(axum::extract::DefaultBodyLimit::max(1 << 30));
    axum::serve(listener, app).await
}

async fn handle(
    State(r): State<Arc<Receiver>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let n = r.count.fetch_add(1, Ordering::Relaxed) + 1;
    if !r.delay.is_zero() {
        tokio::time::sleep(r.delay).await;
    }
    if r.quiet {
        return (r.status, "ok\n");
    }
    let target = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let signature = headers.get("x-signature").and_then(|v| v.to_str().ok());
    let verdict = match (&r.secret, signature) {
        (Some(secret), Some(sig)) => {
            let signed: &[u8] = if method == Method::GET { target.as_bytes() } else { &body };
            if verify_hmac_sha1(secret, signed, sig) { "signature ok" } else { "SIGNATURE MISMATCH" }
        }
        (Some(_), None) => "unsigned",
        (None, Some(_)) => "signed (pass --secret-env to verify)",
        (None, None) => "",
    };
    let text = String::from_utf8_lossy(&body);
    if r.compact {
        let summary = match serde_json::from_slice::<serde_json::Value>(&body).ok() {
            Some(serde_json::Value::Array(items)) => format!("batch of {}", items.len()),
            Some(v) => match v.get("_meta") {
                Some(m) => format!(
                    "{} {} key={}",
                    m["op"].as_str().unwrap_or("?"),
                    m["change"].as_str().unwrap_or("?"),
                    m["key"]
                ),
                None => String::new(),
            },
            None => String::new(),
        };
        let verdict = if verdict.is_empty() { String::new() } else { format!(" [{verdict}]") };
        say!("  #{n:<4} {method} {target}  {summary}{verdict}  {text}");
    } else {
        say!("── #{n} {method} {target}");
        for (name, value) in &headers {
            let value = value.to_str().unwrap_or("<binary>");
            if backflow_core::env::is_credential_header(name.as_str()) {
                say!("   {name}: <redacted, {} chars>", value.len());
            } else {
                say!("   {name}: {value}");
            }
        }
        if !verdict.is_empty() {
            say!("   [{verdict}]");
        }
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(v) => say!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
            Err(_) if body.is_empty() => {}
            Err(_) => say!("{text}"),
        }
    }
    (r.status, "ok\n")
}
