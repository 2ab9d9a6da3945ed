//! HTTP/1.1 exchanges on a kept connection, one at a time: the request
//! written whole in one write, the answer's head parsed by `httparse` and its
//! body framed by `Content-Length`, chunked coding or the close (RFC 9112 §6).
//! The exchange runs inside the caller's future: no connection task, no
//! channel between the two.

use bytes::{Buf, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The most header lines an answer may have.
const MAX_HEADERS: usize = 100;
/// The largest answer head (or chunked trailer section) read.
const MAX_HEAD: usize = 64 * 1024;
/// Read buffer growth.
const READ_CHUNK: usize = 8 * 1024;

/// A connection's byte stream: TCP, or TLS over TCP.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An open connection and what was read from it but not yet used.
pub(crate) struct Connection {
    stream: Stream,
    buf: BytesMut,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("tls", &matches!(self.stream, Stream::Tls(_)))
            .field("buffered", &self.buf.len())
            .finish()
    }
}

/// A receiver's answer: its status, the headers Backflow reads, and the
/// start of its body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: u16,
    pub location: Option<String>,
    pub retry_after: Option<String>,
    /// The body's first bytes (as many as asked for), or why it broke off.
    pub body: Result<Vec<u8>, String>,
}

/// Why an exchange brought no answer.
#[derive(Debug)]
pub(crate) enum Error {
    /// The connection ended before any byte of an answer came: on a kept
    /// connection, the receiver had closed it while it was idle.
    Closed(String),
    /// The exchange broke: an I/O error, an answer that is not HTTP/1.x, or
    /// a close in the middle of the answer's head.
    Broken(String),
}

/// How an answer's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    Close,
}

/// An answer's head, as far as Backflow reads it.
struct Head {
    status: u16,
    location: Option<String>,
    retry_after: Option<String>,
    framing: Framing,
    keep_alive: bool,
}

impl Connection {
    /// A connection over `stream`.
    pub(crate) fn new(stream: Stream) -> Connection {
        Connection { stream, buf: BytesMut::with_capacity(READ_CHUNK) }
    }

    /// Whether an idle connection can carry another request: the receiver
    /// neither closed it nor sent anything unasked. Costs no system call
    /// unless the socket became readable while idle.
    pub(crate) fn is_usable(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut peek = ReadBuf::new(&mut byte);
        match self.stream.tcp().poll_peek(&mut cx, &mut peek) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) | Poll::Ready(Ok(0)) => false,
            // TLS may carry records of its own (session tickets) between
            // answers; bytes on a plain connection were never asked for.
            Poll::Ready(Ok(_)) => matches!(self.stream, Stream::Tls(_)),
        }
    }

    /// Writes `request` (head and body) and reads the answer, keeping at most
    /// `keep` bytes of its body. Also says whether the connection can carry
    /// another request.
    pub(crate) async fn exchange(&mut self, request: &[u8], keep: usize) -> Result<(Answer, bool), Error> {
        // A receiver that refuses a request may answer and close before
        // reading all of it: its answer counts when it comes whole.
        let written = self.write(request).await;
        let head = match (self.read_head().await, written.as_ref()) {
            (Ok(head), _) => head,
            (Err(e), Ok(())) => return Err(e),
            (Err(_), Err(e)) => return Err(Error::Closed(format!("the request could not be written: {e}"))),
        };
        let body = self.read_body(head.framing, keep).await;
        let reusable =
            written.is_ok() && head.keep_alive && head.framing != Framing::Close && body.is_ok() && self.buf.is_empty();
        Ok((Answer { status: head.status, location: head.location, retry_after: head.retry_after, body }, reusable))
    }

    async fn write(&mut self, request: &[u8]) -> io::Result<()> {
        self.stream.write_all(request).await?;
        self.stream.flush().await
    }

    /// Reads more bytes into the buffer; 0 when the receiver closed.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        self.stream.read_buf(&mut self.buf).await
    }

    /// Reads the answer's head, skipping interim (1xx) answers. A close
    /// before any byte is [`Error::Closed`].
    async fn read_head(&mut self) -> Result<Head, Error> {
        let mut received = false;
        loop {
            if let Some(head) = self.parse_head()? {
                if (100..200).contains(&head.status) && head.status != 101 {
                    continue;
                }
                return Ok(head);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(Error::Broken("the answer's head is larger than 64 KiB".into()));
            }
            match self.fill().await {
                Ok(0) if !received && self.buf.is_empty() => {
                    return Err(Error::Closed("the receiver closed the connection without answering".into()));
                }
                Ok(0) => {
                    return Err(Error::Broken("the receiver closed the connection in the middle of its answer".into()));
                }
                Ok(_) => received = true,
                Err(e) if !received && self.buf.is_empty() => {
                    return Err(Error::Closed(format!("the connection broke before an answer: {e}")));
                }
                Err(e) => return Err(Error::Broken(format!("reading the answer failed: {e}"))),
            }
        }
    }

    /// Parses a whole head at the start of the buffer and consumes it.
    fn parse_head(&mut self) -> Result<Option<Head>, Error> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let len = match response.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Error::Broken(format!("the answer is not valid HTTP/1.x: {e}"))),
        };
        let status = response.code.unwrap_or_default();
        let http11 = response.version == Some(1);
        let mut head = Head { status, location: None, retry_after: None, framing: Framing::Close, keep_alive: http11 };
        let (mut length, mut invalid_length, mut encoded, mut chunked) = (None, false, false, false);
        for header in response.headers.iter() {
            let value = || String::from_utf8_lossy(header.value).trim().to_string();
            let name = header.name;
            if name.eq_ignore_ascii_case("content-length") {
                match value().parse::<u64>() {
                    Ok(n) if length.is_none_or(|l| l == n) => length = Some(n),
                    _ => invalid_length = true,
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                encoded = true;
                chunked = value().rsplit(',').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            } else if name.eq_ignore_ascii_case("connection") {
                for token in value().split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        head.keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") && !http11 {
                        head.keep_alive = true;
                    }
                }
            } else if name.eq_ignore_ascii_case("location") {
                head.location = Some(value());
            } else if name.eq_ignore_ascii_case("retry-after") {
                head.retry_after = Some(value());
            }
        }
        if status == 101 {
            // Switching protocols: the connection no longer speaks HTTP/1.1.
            head.keep_alive = false;
        }
        head.framing = if (100..200).contains(&status) || status == 204 || status == 304 {
            Framing::Empty
        } else if encoded {
            // A length beside a transfer coding is ignored, and the
            // connection not trusted with another request (RFC 9112 §6.3).
            head.keep_alive &= length.is_none();
            if chunked { Framing::Chunked } else { Framing::Close }
        } else if invalid_length {
            return Err(Error::Broken("the answer's Content-Length is invalid".into()));
        } else {
            length.map_or(Framing::Close, Framing::Length)
        };
        self.buf.advance(len);
        Ok(Some(head))
    }

    /// Reads the body, keeping its first `keep` bytes.
    async fn read_body(&mut self, framing: Framing, keep: usize) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        match framing {
            Framing::Empty => {}
            Framing::Length(n) => self.read_exactly(n, &mut body, keep).await?,
            Framing::Chunked => loop {
                match httparse::parse_chunk_size(&self.buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        self.buf.advance(used);
                        if size == 0 {
                            self.skip_trailers().await?;
                            break;
                        }
                        self.read_exactly(size, &mut body, keep).await?;
                        while self.buf.len() < 2 {
                            self.more().await?;
                        }
                        if &self.buf[..2] != b"\r\n" {
                            return Err("a chunk of the answer does not end in CRLF".into());
                        }
                        self.buf.advance(2);
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() <= MAX_HEAD => self.more().await?,
                    _ => return Err("the answer's chunked coding is invalid".into()),
                }
            },
            Framing::Close => loop {
                let n = self.buf.len();
                self.take(n, &mut body, keep);
                match self.fill().await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => return Err(format!("reading the answer failed: {e}")),
                }
            },
        }
        Ok(body)
    }

    /// Reads `n` body bytes, keeping the start of them.
    async fn read_exactly(&mut self, mut n: u64, body: &mut Vec<u8>, keep: usize) -> Result<(), String> {
        while n > 0 {
            if self.buf.is_empty() {
                self.more().await?;
            }
            let step = n.min(self.buf.len() as u64) as usize;
            self.take(step, body, keep);
            n -= step as u64;
        }
        Ok(())
    }

    /// Skips a chunked body's trailer section, up to its empty line.
    async fn skip_trailers(&mut self) -> Result<(), String> {
        loop {
            match self.buf.windows(2).position(|w| w == b"\r\n") {
                Some(end) => {
                    self.buf.advance(end + 2);
                    if end == 0 {
                        return Ok(());
                    }
                }
                None if self.buf.len() > MAX_HEAD => return Err("the answer's trailers are larger than 64 KiB".into()),
                None => self.more().await?,
            }
        }
    }

    /// Reads more of a body that has not ended yet.
    async fn more(&mut self) -> Result<(), String> {
        match self.fill().await {
            Ok(0) => Err("the receiver closed the connection before the answer's body ended".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("reading the answer failed: {e}")),
        }
    }

    /// Consumes `n` buffered bytes, keeping them while `body` is shorter
    /// than `keep`.
    fn take(&mut self, n: usize, body: &mut Vec<u8>, keep: usize) {
        let room = keep.saturating_sub(body.len()).min(n);
        body.extend_from_slice(&self.buf[..room]);
        self.buf.advance(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    const REQUEST: &[u8] = b"POST /hook HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}";

    /// A raw receiver: for each answer in turn, reads one request and writes
    /// the answer in pieces of `piece` bytes; closes after the last.
    fn receiver(answers: Vec<&'static [u8]>, piece: usize) -> std::net::SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            socket.set_nodelay(true).unwrap();
            for answer in answers {
                let mut got = Vec::new();
                while !got.ends_with(b"{}") {
                    let mut buf = [0u8; 1024];
                    let n = socket.read(&mut buf).unwrap();
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                for chunk in answer.chunks(piece) {
                    socket.write_all(chunk).unwrap();
                    socket.flush().unwrap();
                    if piece < answer.len() {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
        });
        addr
    }

    fn exchanges(answers: Vec<&'static [u8]>, piece: usize) -> Vec<Result<(Answer, bool), Error>> {
        let addr = receiver(answers.clone(), piece);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut conn = Connection::new(Stream::Plain(tcp));
            let mut out = Vec::new();
            for _ in 0..answers.len() {
                let result = conn.exchange(REQUEST, 16).await;
                let go_on = matches!(result, Ok((_, true)));
                out.push(result);
                if !go_on {
                    break;
                }
            }
            out
        })
    }

    fn answer(result: &Result<(Answer, bool), Error>) -> (u16, String, bool) {
        match result {
            Ok((a, reusable)) => {
                (a.status, String::from_utf8_lossy(a.body.as_ref().expect("a whole body")).into_owned(), *reusable)
            }
            Err(e) => panic!("{e:?}"),
        }
    }

    #[test]
    fn answers_are_framed_by_length_chunks_or_close_in_any_pieces() {
        for piece in [1, 7, 4096] {
            let out = exchanges(
                vec![
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
                    b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nbad \r\n1a\r\nrecord, and more than kept\r\n0\r\nX-Trailer: t\r\n\r\n",
                    b"HTTP/1.1 204 No Content\r\n\r\n",
                    b"HTTP/1.0 503 Busy\r\nRetry-After: 3\r\n\r\nuntil the close",
                ],
                piece,
            );
            assert_eq!(answer(&out[0]), (200, "hello".into(), true), "piece {piece}");
            assert_eq!(answer(&out[1]), (201, "".into(), true));
            assert_eq!(answer(&out[2]), (400, "bad record, and ".into(), true), "the body is cut at 16 bytes");
            assert_eq!(answer(&out[3]), (204, "".into(), true));
            assert_eq!(answer(&out[4]), (503, "until the close".into(), false), "HTTP/1.0 without keep-alive");
            assert_eq!(out[4].as_ref().unwrap().0.retry_after.as_deref(), Some("3"));
        }
    }

    #[test]
    fn connections_the_receiver_closes_are_not_kept() {
        let out = exchanges(vec![b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"], 4096);
        assert_eq!(answer(&out[0]), (101, "".into(), false));
        let out = exchanges(
            vec![b"HTTP/1.1 302 Found\r\nLocation: /b\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"],
            4096,
        );
        let (a, reusable) = out[0].as_ref().unwrap();
        assert_eq!((a.status, a.location.as_deref(), *reusable), (302, Some("/b"), false));
        let out = exchanges(
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
            4096,
        );
        assert_eq!(answer(&out[0]), (200, "".into(), false), "a length beside a coding is not trusted");
    }

    #[test]
    fn a_close_before_any_answer_differs_from_a_broken_answer() {
        // The receiver reads the request and closes without a word.
        let out = exchanges(vec![b""], 4096);
        assert!(matches!(out[0], Err(Error::Closed(_))), "{:?}", out[0]);
        let out = exchanges(vec![b"HTTP/1.1 200 OK\r\nContent-Le"], 4096);
        assert!(matches!(out[0], Err(Error::Broken(_))), "{:?}", out[0]);
        let out = exchanges(vec![b"SMTP ready\r\n\r\n"], 4096);
        assert!(matches!(&out[0], Err(Error::Broken(r)) if r.contains("not valid HTTP")), "{:?}", out[0]);
        let out = exchanges(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"], 4096);
        let (a, _) = out[0].as_ref().unwrap();
        assert!(a.body.as_ref().is_err_and(|e| e.contains("before the answer's body ended")), "{a:?}");
        let out = exchanges(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"], 4096);
        assert!(matches!(&out[0], Err(Error::Broken(r)) if r.contains("Content-Length")), "{:?}", out[0]);
    }

    #[test]
    fn an_idle_connection_the_receiver_closed_is_not_usable() {
        let addr = receiver(vec![b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], 4096);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut conn = Connection::new(Stream::Plain(TcpStream::connect(addr).await.unwrap()));
            let (_, reusable) = conn.exchange(REQUEST, 16).await.unwrap();
            assert!(reusable);
            // The receiver's thread ends and closes the socket.
            for _ in 0..200 {
                if !conn.is_usable() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            panic!("a closed connection still looks usable");
        });
    }
}
