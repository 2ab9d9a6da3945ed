//! Proxies on 127.0.0.1 for tests, to receivers on loopback only, each
//! connection recorded: an HTTP proxy (`CONNECT` tunnels for `https`, and
//! forwarded plain requests with absolute-form targets), and a SOCKS5
//! proxy.

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
        let log = seen.clone();
        let addr = serve(move |client| relay(client, log.clone(), expected.clone()));
        Proxy { addr, seen }
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

/// Accepts connections on a port of 127.0.0.1, each handled by a task of
/// `handle` on a thread of its own; returns the address.
fn serve<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
            tx.send(listener.local_addr().expect("addr")).expect("report address");
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                tokio::spawn(handle(client));
            }
        });
    });
    rx.recv().expect("proxy started")
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

/// A connection a client asked a [`Socks5`] proxy for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocksRequest {
    /// The destination as the client wrote it: `host:port` for a name the
    /// proxy resolves, `a.b.c.d:port` for an address the client resolved.
    pub target: String,
    /// Whether the client named the host (rather than giving an address).
    pub by_name: bool,
    /// The user name the client authenticated with, if any.
    pub user: Option<String>,
}

/// A SOCKS5 proxy on 127.0.0.1 for tests (RFC 1928, with RFC 1929's user
/// name and password when started with credentials): `CONNECT` to loopback
/// targets only, each recorded.
pub struct Socks5 {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<SocksRequest>>>,
}

impl Socks5 {
    /// Starts a proxy; with `credentials` (`user`, `password`) a client must
    /// authenticate with them.
    pub fn start(credentials: Option<(&str, &str)>) -> Socks5 {
        let credentials = credentials.map(|(u, p)| (u.to_string(), p.to_string()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let addr = serve(move |client| {
            let (log, credentials) = (log.clone(), credentials.clone());
            async move {
                let _ = socks_relay(client, log, credentials).await;
            }
        });
        Socks5 { addr, seen }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The connections clients asked for, in order.
    pub fn seen(&self) -> Vec<SocksRequest> {
        self.seen.lock().expect("lock").clone()
    }
}

/// One SOCKS5 exchange, then the relay.
async fn socks_relay(
    mut client: tokio::net::TcpStream,
    seen: Arc<Mutex<Vec<SocksRequest>>>,
    credentials: Option<(String, String)>,
) -> std::io::Result<()> {
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await?;
    let mut methods = vec![0u8; usize::from(head[1])];
    client.read_exact(&mut methods).await?;
    let wanted = if credentials.is_some() { 2 } else { 0 };
    if head[0] != 5 || !methods.contains(&wanted) {
        client.write_all(&[5, 0xff]).await?;
        return Ok(());
    }
    client.write_all(&[5, wanted]).await?;
    let mut user = None;
    if let Some((expected_user, expected_password)) = &credentials {
        let mut version_and_length = [0u8; 2];
        client.read_exact(&mut version_and_length).await?;
        let mut name = vec![0u8; usize::from(version_and_length[1])];
        client.read_exact(&mut name).await?;
        let mut length = [0u8; 1];
        client.read_exact(&mut length).await?;
        let mut password = vec![0u8; usize::from(length[0])];
        client.read_exact(&mut password).await?;
        let name = String::from_utf8_lossy(&name).into_owned();
        let good = &name == expected_user && password == expected_password.as_bytes();
        client.write_all(&[1, if good { 0 } else { 1 }]).await?;
        if !good {
            return Ok(());
        }
        user = Some(name);
    }
    let mut request = [0u8; 4];
    client.read_exact(&mut request).await?;
    let (host, by_name) = match request[3] {
        1 => {
            let mut ip = [0u8; 4];
            client.read_exact(&mut ip).await?;
            (std::net::Ipv4Addr::from(ip).to_string(), false)
        }
        3 => {
            let mut length = [0u8; 1];
            client.read_exact(&mut length).await?;
            let mut name = vec![0u8; usize::from(length[0])];
            client.read_exact(&mut name).await?;
            (String::from_utf8_lossy(&name).into_owned(), true)
        }
        _ => {
            client.write_all(&[5, 8, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
            return Ok(());
        }
    };
    let mut port = [0u8; 2];
    client.read_exact(&mut port).await?;
    let port = u16::from_be_bytes(port);
    seen.lock().expect("lock").push(SocksRequest { target: format!("{host}:{port}"), by_name, user });
    // Loopback only: tests never send traffic elsewhere. Refused by rule: 2.
    if request[1] != 1 || !matches!(host.as_str(), "127.0.0.1" | "localhost") {
        client.write_all(&[5, 2, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
        return Ok(());
    }
    let Ok(mut upstream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        // Connection refused: 5.
        client.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
        return Ok(());
    };
    client.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0]).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await.map(|_| ())
}
