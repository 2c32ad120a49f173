//! Idle keep-alive connections held open across upgrades, as a load balancer or a
//! pool of clients holds them: open many (from several source addresses past one
//! address's ephemeral ports), then one request on each, checking which pid answers
//! on the very same connection.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

use crate::resp::{Reply, RespClient};

/// Which app holds the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum App {
    /// hello-http: keep-alive HTTP/1.1, `GET /`.
    Http,
    /// kv-server: RESP, `INFO`.
    Kv,
}

/// Concurrent connects while opening (below the listen backlog).
const CONNECT_BATCH: usize = 256;
/// Connections per source address: well below loopback's ~28,000 ephemeral ports.
pub const PER_SOURCE: usize = 20_000;

/// A minimal HTTP/1.1 keep-alive client: it must see exactly when the server closes a
/// connection, which a pooling client library hides.
pub struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// What one exchange returned.
#[derive(Debug, Clone, Copy)]
pub struct HttpResp {
    /// Status code.
    pub status: u16,
    /// The server said `Connection: close`.
    pub close: bool,
    /// `pid=` from the body.
    pub pid: Option<u32>,
}

impl HttpConn {
    /// Connects (no request yet).
    ///
    /// # Errors
    /// The connect failed.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        Self::from_stream(TcpStream::connect(addr).await?)
    }

    fn from_stream(stream: TcpStream) -> anyhow::Result<Self> {
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(512),
        })
    }

    /// `GET /` and its response. An early EOF is an error.
    ///
    /// # Errors
    /// The connection failed or closed, or the response is malformed.
    pub async fn get(&mut self) -> anyhow::Result<HttpResp> {
        self.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: baton-tests\r\n\r\n")
            .await?;
        self.buf.clear();
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut headers);
            let parsed = resp.parse(&self.buf).context("malformed response head")?;
            if let httparse::Status::Complete(head_end) = parsed {
                let status = resp.code.context("no status code")?;
                let mut len = None;
                let mut close = false;
                for h in resp.headers.iter() {
                    let value = std::str::from_utf8(h.value).unwrap_or("");
                    if h.name.eq_ignore_ascii_case("content-length") {
                        len = Some(
                            value
                                .trim()
                                .parse::<usize>()
                                .context("bad content-length")?,
                        );
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        close |= value
                            .split(',')
                            .any(|t| t.trim().eq_ignore_ascii_case("close"));
                    }
                }
                let len = len.context("response without content-length")?;
                while self.buf.len() < head_end + len {
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        bail!("connection closed inside a response body");
                    }
                }
                return Ok(HttpResp {
                    status,
                    close,
                    pid: crate::load::find_pid(&self.buf[head_end..head_end + len]),
                });
            }
            if self.buf.len() > 64 * 1024 {
                bail!("response head too large");
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed before a response");
            }
        }
    }
}

/// One held connection.
pub enum Conn {
    /// HTTP keep-alive.
    Http(HttpConn),
    /// RESP.
    Kv(RespClient<TcpStream>),
}

/// How one request on a held connection went.
pub enum Outcome {
    /// Answered by `pid`, and the connection stays open.
    Served(u32),
    /// Answered, but the server closes the connection (`Connection: close`).
    ServedThenClosed,
    /// The connection was closed or reset, or the request failed.
    Lost(String),
}

impl Conn {
    /// Opens one connection to `addr` from `source` (any port).
    ///
    /// # Errors
    /// The connect failed.
    pub async fn open(app: App, addr: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<Self> {
        let stream = match source {
            None => TcpStream::connect(addr).await?,
            Some(ip) => {
                let s = TcpSocket::new_v4()?;
                s.bind(SocketAddr::new(ip, 0))
                    .with_context(|| format!("binding source address {ip}"))?;
                s.connect(addr).await?
            }
        };
        Ok(match app {
            App::Http => Conn::Http(HttpConn::from_stream(stream)?),
            App::Kv => Conn::Kv(RespClient::new(stream)),
        })
    }

    /// One request, answered within `timeout`.
    pub async fn request(&mut self, timeout: Duration) -> Outcome {
        let attempt = tokio::time::timeout(timeout, async {
            match self {
                Conn::Http(c) => {
                    let r = c.get().await?;
                    if r.status != 200 {
                        bail!("status {}", r.status);
                    }
                    let pid = r.pid.context("no pid in the body")?;
                    Ok(if r.close {
                        Outcome::ServedThenClosed
                    } else {
                        Outcome::Served(pid)
                    })
                }
                Conn::Kv(c) => match c.command(&["INFO"]).await? {
                    Reply::Bulk(Some(text)) => {
                        let text = String::from_utf8_lossy(&text);
                        let pid = text
                            .lines()
                            .find_map(|l| l.strip_prefix("process_id:"))
                            .and_then(|p| p.trim().parse().ok())
                            .context("no process_id in INFO")?;
                        Ok(Outcome::Served(pid))
                    }
                    other => bail!("INFO returned {other}"),
                },
            }
        })
        .await;
        match attempt {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => Outcome::Lost(format!("{e:#}")),
            Err(_) => Outcome::Lost(format!("no answer within {timeout:?}")),
        }
    }
}

/// The source address for connection `i`: 127.0.0.1 for the first
/// [`PER_SOURCE`], then 127.0.0.2, … (all of 127.0.0.0/8 is loopback).
pub fn source_for(i: usize) -> Option<IpAddr> {
    let k = i / PER_SOURCE;
    if k == 0 {
        return None;
    }
    let k = u32::try_from(k).unwrap_or(u32::MAX).min(250);
    Some(IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(127, 0, 0, 1)) + k,
    )))
}

/// Opens `n` connections, [`CONNECT_BATCH`] at a time, numbering them from `first`
/// for their source address.
///
/// # Errors
/// A connect failed.
pub async fn open_all(
    app: App,
    addr: SocketAddr,
    first: usize,
    n: usize,
) -> anyhow::Result<Vec<Conn>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = CONNECT_BATCH.min(n - out.len());
        let mut set = JoinSet::new();
        for j in 0..batch {
            let source = source_for(first + out.len() + j);
            set.spawn(Conn::open(app, addr, source));
        }
        while let Some(joined) = set.join_next().await {
            out.push(joined.context("connect task")??);
        }
    }
    Ok(out)
}

/// What a [`round`] found.
pub struct Round {
    /// The connections still open and served by the expected pid.
    pub kept: Vec<Conn>,
    /// How many were lost (closed, reset, or answered by another pid).
    pub lost: u64,
    /// The first loss, described.
    pub first_loss: Option<String>,
    /// Each answered request's latency, ms.
    pub latencies_ms: Vec<f64>,
}

/// One request on every connection, at most `parallel` at once (all at once when
/// 0), each expected to be answered by `pid`.
pub async fn round(conns: Vec<Conn>, pid: u32, parallel: usize, timeout: Duration) -> Round {
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(if parallel == 0 {
        tokio::sync::Semaphore::MAX_PERMITS
    } else {
        parallel
    }));
    let mut set = JoinSet::new();
    for mut c in conns {
        let limit = limit.clone();
        set.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let t = Instant::now();
            let outcome = c.request(timeout).await;
            (c, outcome, t.elapsed())
        });
    }
    let mut r = Round {
        kept: Vec::new(),
        lost: 0,
        first_loss: None,
        latencies_ms: Vec::new(),
    };
    while let Some(joined) = set.join_next().await {
        let Ok((conn, outcome, took)) = joined else {
            r.lost += 1;
            continue;
        };
        let why = match outcome {
            Outcome::Served(p) if p == pid => {
                r.latencies_ms.push(took.as_secs_f64() * 1000.0);
                r.kept.push(conn);
                continue;
            }
            Outcome::Served(p) => format!("answered by pid {p}, expected {pid}"),
            Outcome::ServedThenClosed => "closed by the server (Connection: close)".to_owned(),
            Outcome::Lost(e) => e,
        };
        r.lost += 1;
        r.first_loss.get_or_insert(why);
    }
    r
}
