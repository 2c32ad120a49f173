//! A tiny blocking HTTP/1.1 keep-alive client for the individual requests the systemd
//! tests reason about (the continuous load comes from `crate::load`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

impl HttpResponse {
    pub fn pid(&self) -> Option<u32> {
        crate::load::find_pid(self.body.as_bytes())
    }
}

pub fn send_get(stream: &mut TcpStream, path: &str, close: bool) -> io::Result<()> {
    let conn = if close { "Connection: close\r\n" } else { "" };
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{conn}\r\n");
    stream.write_all(req.as_bytes())
}

/// Reads one response: headers, then a Content-Length body, or everything up to EOF.
pub fn read_response(stream: &mut TcpStream) -> io::Result<HttpResponse> {
    let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF after {} bytes of response", buf.len()),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line: {head:?}")))?;
    let mut length = None;
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if k == "content-length" {
                length = Some(v.trim().parse::<usize>().map_err(|e| bad(e.to_string()))?);
            } else if k == "transfer-encoding" {
                return Err(bad(format!("unsupported transfer-encoding: {head:?}")));
            }
        }
    }
    let mut body = buf[head_end..].to_vec();
    match length {
        Some(len) => {
            while body.len() < len {
                let n = stream.read(&mut chunk)?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in body"));
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None => {
            stream.read_to_end(&mut body)?;
        }
    }
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// One `GET path` on a new connection with `Connection: close`.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<HttpResponse> {
    let mut s = connect(addr, timeout)?;
    send_get(&mut s, path, true)?;
    read_response(&mut s)
}
