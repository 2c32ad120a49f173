//! A small RESP2 (Redis protocol) client for the kv-server tests: command encoding,
//! incremental reply parsing and pipelining.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Replies larger than this are rejected: the tests never store big values, so a huge
/// length prefix means a corrupt stream.
const MAX_BULK: usize = 64 << 20;
/// Nesting bound for arrays, so a hostile stream cannot blow the stack.
const MAX_DEPTH: usize = 32;

/// One RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$5\r\nhello` (`None` for the null bulk string `$-1`).
    Bulk(Option<Vec<u8>>),
    /// `*2\r\n...` (`None` for the null array `*-1`).
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The bytes of a bulk or simple string reply.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Reply::Bulk(Some(b)) => Some(b),
            Reply::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }

    /// Whether this is the `+OK` status reply.
    pub fn is_ok(&self) -> bool {
        matches!(self, Reply::Simple(s) if s == "OK")
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Simple(s) => write!(f, "+{s}"),
            Reply::Error(s) => write!(f, "-{s}"),
            Reply::Integer(n) => write!(f, ":{n}"),
            Reply::Bulk(None) => f.write_str("(nil)"),
            Reply::Bulk(Some(b)) => write!(f, "{:?}", String::from_utf8_lossy(b)),
            Reply::Array(None) => f.write_str("(nil array)"),
            Reply::Array(Some(items)) => {
                f.write_str("[")?;
                for (i, r) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{r}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// Errors of the RESP client.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    /// The byte stream is not valid RESP.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server closed the connection before a complete reply.
    #[error("connection closed by the server before a complete reply")]
    Eof,
    /// Socket error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Appends one command (an array of bulk strings) to `out`.
pub fn encode_into<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Encodes one command.
pub fn encode<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(&mut out, args);
    out
}

/// Parses one reply from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a reply (read more and call again),
/// or the reply and the number of bytes it used.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
    parse_at(buf, 0, 0)
}

fn parse_at(buf: &[u8], pos: usize, depth: usize) -> Result<Option<(Reply, usize)>, RespError> {
    if depth > MAX_DEPTH {
        return Err(RespError::Protocol("arrays nested too deeply".into()));
    }
    let Some(line_end) = find_crlf(buf, pos) else {
        return Ok(None);
    };
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[pos + 1..line_end])
        .map_err(|_| RespError::Protocol("reply line is not UTF-8".into()))?;
    let next = line_end + 2;
    match kind {
        b'+' => Ok(Some((Reply::Simple(line.to_owned()), next))),
        b'-' => Ok(Some((Reply::Error(line.to_owned()), next))),
        b':' => {
            let n = parse_int(line)?;
            Ok(Some((Reply::Integer(n), next)))
        }
        b'$' => {
            let n = parse_int(line)?;
            if n == -1 {
                return Ok(Some((Reply::Bulk(None), next)));
            }
            let len = usize::try_from(n)
                .ok()
                .filter(|l| *l <= MAX_BULK)
                .ok_or_else(|| RespError::Protocol(format!("bad bulk length {n}")))?;
            let end = next + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(RespError::Protocol(
                    "bulk string not followed by CRLF".into(),
                ));
            }
            Ok(Some((Reply::Bulk(Some(buf[next..end].to_vec())), end + 2)))
        }
        b'*' => {
            let n = parse_int(line)?;
            if n == -1 {
                return Ok(Some((Reply::Array(None), next)));
            }
            let count = usize::try_from(n)
                .ok()
                .filter(|c| *c <= MAX_BULK)
                .ok_or_else(|| RespError::Protocol(format!("bad array length {n}")))?;
            let mut items = Vec::with_capacity(count.min(1024));
            let mut at = next;
            for _ in 0..count {
                match parse_at(buf, at, depth + 1)? {
                    Some((item, used)) => {
                        items.push(item);
                        at = used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), at)))
        }
        other => Err(RespError::Protocol(format!(
            "unknown reply type byte {:?}",
            char::from(other)
        ))),
    }
}

fn parse_int(s: &str) -> Result<i64, RespError> {
    s.parse()
        .map_err(|_| RespError::Protocol(format!("bad integer {s:?}")))
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

/// A RESP connection over any byte stream.
pub struct RespClient<S> {
    stream: S,
    buf: Vec<u8>,
}

impl RespClient<TcpStream> {
    /// Connects over TCP.
    pub async fn connect(addr: SocketAddr) -> Result<Self, RespError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self::new(stream))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RespClient<S> {
    /// Wraps a connected stream.
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends one command and reads its reply. An `Error` reply is returned as a reply,
    /// not as an `Err`: it is the server's answer.
    pub async fn command<A: AsRef<[u8]>>(&mut self, args: &[A]) -> Result<Reply, RespError> {
        self.stream.write_all(&encode(args)).await?;
        self.read_reply().await
    }

    /// Sends every command in one write, then reads one reply per command, in order.
    pub async fn pipeline<A: AsRef<[u8]>>(
        &mut self,
        commands: &[Vec<A>],
    ) -> Result<Vec<Reply>, RespError> {
        let mut out = Vec::new();
        for c in commands {
            encode_into(&mut out, c);
        }
        self.stream.write_all(&out).await?;
        let mut replies = Vec::with_capacity(commands.len());
        for _ in commands {
            replies.push(self.read_reply().await?);
        }
        Ok(replies)
    }

    /// Reads the next reply.
    pub async fn read_reply(&mut self) -> Result<Reply, RespError> {
        loop {
            if let Some((reply, used)) = parse(&self.buf)? {
                self.buf.drain(..used);
                return Ok(reply);
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(4096);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(RespError::Eof);
            }
        }
    }

    /// The underlying stream.
    pub fn into_inner(self) -> S {
        self.stream
    }
}

/// A client that pipelines INCRs on its own key over one connection for its whole
/// life, checking that every reply is the previous one plus one: a skipped, repeated
/// or lost write, a close or an error ends it with the reason.
pub struct IncrWriter {
    key: String,
    last: std::sync::Arc<std::sync::atomic::AtomicI64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Result<i64, String>>,
}

impl IncrWriter {
    /// INCRs per pipelined batch.
    pub const BATCH: usize = 10;
    /// Bound on one batch (it may wait out a quiesce).
    pub const BATCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

    /// Connects to `addr` and starts writing `key` (which must not exist yet).
    ///
    /// # Errors
    /// The connection failed.
    pub async fn start(addr: SocketAddr, key: String) -> Result<Self, RespError> {
        use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
        let mut c = RespClient::connect(addr).await?;
        let last = std::sync::Arc::new(AtomicI64::new(0));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (l, s, k) = (last.clone(), stop.clone(), key.clone());
        let task = tokio::spawn(async move {
            let batch: Vec<Vec<&str>> =
                (0..Self::BATCH).map(|_| vec!["INCR", k.as_str()]).collect();
            let mut n = 0i64;
            while !s.load(Ordering::Relaxed) {
                let replies = tokio::time::timeout(Self::BATCH_TIMEOUT, c.pipeline(&batch))
                    .await
                    .map_err(|_| {
                        format!("{k}: no reply after {n} within {:?}", Self::BATCH_TIMEOUT)
                    })?
                    .map_err(|e| format!("{k}: after {n}: {e}"))?;
                for r in replies {
                    match r {
                        Reply::Integer(v) if v == n + 1 => n = v,
                        other => return Err(format!("{k}: INCR after {n} answered {other}")),
                    }
                }
                l.store(n, Ordering::Relaxed);
            }
            Ok(n)
        });
        Ok(Self {
            key,
            last,
            stop,
            task,
        })
    }

    /// The key it writes.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The last value acknowledged so far.
    pub fn last(&self) -> i64 {
        self.last.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether it stopped on an error.
    pub fn broken(&self) -> bool {
        self.task.is_finished()
    }

    /// Stops it and returns the last value acknowledged.
    ///
    /// # Errors
    /// Why it broke.
    pub async fn finish(self) -> Result<i64, String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.map_err(|e| e.to_string())?
    }
}

/// Waits until every writer acknowledged `at_least` (bounded by 20 s).
///
/// # Errors
/// A writer broke, or they stalled.
pub async fn progress(writers: &[IncrWriter], at_least: i64) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while writers.iter().any(|w| w.last() < at_least) {
        if let Some(w) = writers.iter().find(|w| w.broken()) {
            return Err(format!("writer {} broke", w.key()));
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!("writers stalled below {at_least}"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands() {
        assert_eq!(
            encode(&["SET", "k", "v a"]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv a\r\n".to_vec()
        );
        assert_eq!(encode::<&[u8]>(&[b""]), b"*1\r\n$0\r\n\r\n".to_vec());
    }

    #[test]
    fn parses_every_type() {
        let cases: Vec<(&[u8], Reply)> = vec![
            (b"+OK\r\n", Reply::Simple("OK".into())),
            (b"-ERR no\r\n", Reply::Error("ERR no".into())),
            (b":-12\r\n", Reply::Integer(-12)),
            (b"$5\r\nhe\r\no\r\n", Reply::Bulk(Some(b"he\r\no".to_vec()))),
            (b"$0\r\n\r\n", Reply::Bulk(Some(Vec::new()))),
            (b"$-1\r\n", Reply::Bulk(None)),
            (b"*-1\r\n", Reply::Array(None)),
            (
                b"*3\r\n:1\r\n*1\r\n+x\r\n$1\r\ny\r\n",
                Reply::Array(Some(vec![
                    Reply::Integer(1),
                    Reply::Array(Some(vec![Reply::Simple("x".into())])),
                    Reply::Bulk(Some(b"y".to_vec())),
                ])),
            ),
        ];
        for (raw, want) in cases {
            let (got, used) = parse(raw).unwrap().unwrap();
            assert_eq!(got, want);
            assert_eq!(used, raw.len());
            // Every strict prefix is incomplete, never an error or a wrong reply.
            for cut in 0..raw.len() {
                assert!(
                    parse(&raw[..cut]).unwrap().is_none(),
                    "prefix {cut} of {raw:?}"
                );
            }
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse(b"?x\r\n").is_err());
        assert!(parse(b":abc\r\n").is_err());
        assert!(parse(b"$3\r\nabcd\r\n").is_err());
        assert!(parse(b"$-5\r\n").is_err());
    }

    #[tokio::test]
    async fn pipelines_over_a_stream() {
        let (client, mut server) = tokio::io::duplex(1024);
        let mut c = RespClient::new(client);
        let serve = tokio::spawn(async move {
            let mut got = Vec::new();
            let want = encode(&["PING"]).len() + encode(&["GET", "k"]).len();
            while got.len() < want {
                let mut b = [0u8; 256];
                let n = server.read(&mut b).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&b[..n]);
            }
            // Answer in two writes that split a reply, to exercise partial reads.
            server.write_all(b"+PONG\r\n$3\r\nv").await.unwrap();
            server.write_all(b"al\r\n").await.unwrap();
            got
        });
        let replies = c.pipeline(&[vec!["PING"], vec!["GET", "k"]]).await.unwrap();
        assert_eq!(
            replies,
            vec![
                Reply::Simple("PONG".into()),
                Reply::Bulk(Some(b"val".to_vec()))
            ]
        );
        let sent = serve.await.unwrap();
        assert_eq!(sent, [encode(&["PING"]), encode(&["GET", "k"])].concat());
        assert!(matches!(c.read_reply().await, Err(RespError::Eof)));
    }
}
