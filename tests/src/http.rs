//! A minimal blocking HTTP/1.1 client for tests that need one request at a time and
//! the exact bytes on the wire (the load generator covers traffic).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `read`, retried when a signal interrupts it. A socket with a read timeout fails a
/// read with EINTR on any signal, `SA_RESTART` or not (signal(7)), and a test process
/// gets SIGCHLD whenever one of its children exits.
///
/// # Errors
/// As `read`, but never `Interrupted`.
pub fn read_retrying(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// A response: status code and body (the whole reply, for connection-close replies).
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code, 0 when the reply was not HTTP.
    pub status: u16,
    /// Everything after the header.
    pub body: String,
    /// The whole reply as received.
    pub raw: Vec<u8>,
}

/// Sends `request` as is, then reads until the server closes (or `timeout`).
///
/// # Errors
/// Connect, write or read failures (a reset included).
pub fn exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> io::Result<Reply> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(request)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok(Reply { status, body, raw })
}

/// `GET path` with `Connection: close`.
///
/// # Errors
/// As [`exchange`].
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Reply> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: baton-test\r\nConnection: close\r\n\r\n");
    exchange(addr, req.as_bytes(), timeout)
}

/// One response read off a keep-alive connection.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The header fields, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl Response {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the response says `Connection: close`.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }

    /// The `pid=<n>` in the body (the example apps all say it).
    pub fn pid(&self) -> Option<u32> {
        crate::load::find_pid(self.body.as_bytes())
    }
}

/// A connected socket with read and write timeouts.
///
/// # Errors
/// The connect failed or timed out.
pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// Writes `GET path`, with `Connection: close` when `close`.
///
/// # Errors
/// The write failed.
pub fn send_get(stream: &mut TcpStream, path: &str, close: bool) -> io::Result<()> {
    let conn = if close { "Connection: close\r\n" } else { "" };
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{conn}\r\n");
    stream.write_all(req.as_bytes())
}

/// Reads exactly one response: the head, then a `Content-Length` body (or, without one,
/// everything up to EOF). Bytes beyond it are an error: one request was sent, so one
/// response may come back.
///
/// # Errors
/// The read failed, the peer closed early, or the response is malformed.
pub fn read_response(stream: &mut TcpStream) -> io::Result<Response> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = read_retrying(stream, &mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before a complete head; got {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut headers: Vec<(String, String)> = Vec::new();
    let (minor, status, _) = crate::load::parse_response_head(&buf[..head_end], |n, v| {
        headers.push((n.to_ascii_lowercase(), v.to_owned()));
        Ok(())
    })
    .map_err(|()| {
        bad(format!(
            "malformed response head {:?}",
            String::from_utf8_lossy(&buf[..head_end])
        ))
    })?;
    if minor != 1 {
        return Err(bad(format!("HTTP/1.{minor} response, expected HTTP/1.1")));
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    if headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return Err(bad(format!("unsupported transfer-encoding: {head:?}")));
    }
    let length = match headers.iter().find(|(n, _)| n == "content-length") {
        Some((_, v)) => Some(v.parse::<usize>().map_err(|e| bad(e.to_string()))?),
        None => None,
    };
    let mut body = buf.split_off(head_end);
    match length {
        Some(len) => {
            while body.len() < len {
                let n = read_retrying(stream, &mut chunk)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the body",
                    ));
                }
                body.extend_from_slice(&chunk[..n]);
            }
            if body.len() != len {
                return Err(bad(format!(
                    "{} unexpected bytes after the response",
                    body.len() - len
                )));
            }
        }
        None => {
            stream.read_to_end(&mut body)?;
        }
    }
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One `GET path` on a new connection with `Connection: close`.
///
/// # Errors
/// As [`connect`] and [`read_response`].
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<Response> {
    let mut s = connect(addr, timeout)?;
    send_get(&mut s, path, true)?;
    read_response(&mut s)
}
