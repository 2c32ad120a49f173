//! The Python SDK (`sdk/python`) and its example apps, run from this checkout with the
//! machine's `python3` (standard library only), and a client for py-counter.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::harness::{HarnessError, Result, io_err};
use crate::systemd::repo_root;

/// Bound on one py-counter command; a command sent during the hand-over waits for it.
pub const COUNTER_TIMEOUT: Duration = Duration::from_secs(30);

/// `sdk/python/src`, for `PYTHONPATH`.
pub fn sdk_path() -> PathBuf {
    repo_root().join("sdk/python/src")
}

/// A file under `examples/`.
pub fn example(path: &str) -> PathBuf {
    repo_root().join("examples").join(path)
}

/// A shell command running `python3 <script> <args>` on this checkout's SDK.
pub fn command(python: &std::path::Path, script: &str, args: &str) -> String {
    format!(
        "env PYTHONPATH='{}' '{}' '{}' {args}",
        sdk_path().display(),
        python.display(),
        example(script).display()
    )
}

/// One py-counter connection.
pub struct CounterClient {
    rx: BufReader<OwnedReadHalf>,
    tx: OwnedWriteHalf,
}

impl CounterClient {
    /// Connects, with [`COUNTER_TIMEOUT`].
    ///
    /// # Errors
    /// When it cannot connect in time.
    pub async fn connect(addr: SocketAddr) -> Result<Self> {
        let s = tokio::time::timeout(COUNTER_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| timeout(format!("connect to {addr}")))?
            .map_err(io_err(format!("connect to {addr}")))?;
        let (rx, tx) = s.into_split();
        Ok(Self {
            rx: BufReader::new(rx),
            tx,
        })
    }

    /// Sends `line` and returns the reply line (without its newline).
    ///
    /// # Errors
    /// A timeout, or the connection failed or closed.
    pub async fn call(&mut self, line: &str) -> Result<String> {
        let work = async {
            self.tx
                .write_all(format!("{line}\n").as_bytes())
                .await
                .map_err(io_err(format!("send {line:?}")))?;
            let mut reply = String::new();
            let n = self
                .rx
                .read_line(&mut reply)
                .await
                .map_err(io_err(format!("reply to {line:?}")))?;
            if n == 0 {
                return Err(HarnessError::Setup(format!(
                    "the server closed the connection instead of answering {line:?}"
                )));
            }
            Ok(reply.trim_end().to_owned())
        };
        tokio::time::timeout(COUNTER_TIMEOUT, work)
            .await
            .map_err(|_| timeout(format!("a reply to {line:?}")))?
    }
}

/// `OK <key> <n> pid=<p>` or `VALUE <key> <n> pid=<p>` → (n, p).
pub fn parse_counter_reply(reply: &str) -> Option<(i64, u32)> {
    let mut w = reply.split_ascii_whitespace();
    let (Some("OK" | "VALUE"), Some(_), Some(n), Some(pid)) =
        (w.next(), w.next(), w.next(), w.next())
    else {
        return None;
    };
    Some((n.parse().ok()?, pid.strip_prefix("pid=")?.parse().ok()?))
}

fn timeout(what: String) -> HarnessError {
    HarnessError::Timeout {
        what,
        timeout: COUNTER_TIMEOUT,
        last: "no answer".into(),
    }
}
