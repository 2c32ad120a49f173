//! A minimal blocking HTTP/1.1 client for tests that need one request at a time and
//! the exact bytes on the wire (the load generator covers traffic).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

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
