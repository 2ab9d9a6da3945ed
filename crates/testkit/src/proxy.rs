//! An HTTP proxy on 127.0.0.1 for tests: `CONNECT` tunnels (for `https`)
//! and forwarded plain requests (absolute-form targets), each recorded, to
//! receivers on loopback only.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One connection a client opened to the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxied {
    /// `CONNECT` or the forwarded request's method.
    pub method: String,
    /// The request target: `host:port` for `CONNECT`, the absolute URL of a
    /// forwarded request.
    pub target: String,
    /// The `Proxy-Authorization` header, if sent.
    pub authorization: Option<String>,
}

/// A running proxy; it stops with the test process.
pub struct Proxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Proxied>>>,
}

impl Proxy {
    /// Starts a proxy; with `credentials` (`user:password`) it answers 407
    /// to requests without them.
    pub fn start(credentials: Option<&str>) -> Proxy {
        let expected = credentials.map(|c| {
            use base64::Engine;
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(c))
        });
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log = seen.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
                tx.send(listener.local_addr().expect("addr")).expect("report address");
                loop {
                    let Ok((client, _)) = listener.accept().await else { continue };
                    tokio::spawn(relay(client, log.clone(), expected.clone()));
                }
            });
        });
        Proxy { addr: rx.recv().expect("proxy started"), seen }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The connections clients opened, in order.
    pub fn seen(&self) -> Vec<Proxied> {
        self.seen.lock().expect("lock").clone()
    }
}

/// Reads a request head, records it, and relays the connection to its
/// loopback target.
async fn relay(mut client: tokio::net::TcpStream, seen: Arc<Mutex<Vec<Proxied>>>, expected: Option<String>) {
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(&buf[..head_end]), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let method = request.method.unwrap_or_default().to_string();
    let target = request.path.unwrap_or_default().to_string();
    let authorization = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("proxy-authorization"))
        .map(|h| String::from_utf8_lossy(h.value).into_owned());
    seen.lock().expect("lock").push(Proxied {
        method: method.clone(),
        target: target.clone(),
        authorization: authorization.clone(),
    });
    if expected.is_some() && authorization != expected {
        let _ = client
            .write_all(
                b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\ncontent-length: 0\r\n\r\n",
            )
            .await;
        return;
    }
    let authority = if method == "CONNECT" {
        target.clone()
    } else {
        let rest = target.split_once("://").map_or(target.as_str(), |(_, rest)| rest);
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") }
    };
    // Loopback only: tests never send traffic elsewhere.
    let (host, port) = authority.rsplit_once(':').unwrap_or((&authority, "80"));
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
        let _ = client.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n").await;
        return;
    }
    let Ok(port) = port.parse::<u16>() else { return };
    let Ok(mut upstream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n").await;
        return;
    };
    if method == "CONNECT" {
        if client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.is_err() {
            return;
        }
        if head_end < buf.len() && upstream.write_all(&buf[head_end..]).await.is_err() {
            return;
        }
    } else if upstream.write_all(&buf).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
