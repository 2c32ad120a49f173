//! Shared by the hello-http end-to-end tests: a process wrapper that
//! streams stderr lines, and a minimal HTTP/1.1 keep-alive client.

#![allow(dead_code)] // each test file uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub const BOUND: Duration = Duration::from_secs(15);

/// A running hello-http with its stderr lines streamed to the test.
pub struct Server {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Server {
    pub fn spawn(cmd: &mut Command) -> Server {
        let mut child = cmd
            .env("RUST_LOG", "hello_http=debug,baton_child=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Server {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    pub fn standalone(args: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hello-http"));
        cmd.args(["--listen-fallback", "127.0.0.1:0"]).args(args);
        Server::spawn(&mut cmd)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stderr line containing `needle`.
    pub fn wait_line(&mut self, needle: &str) -> String {
        self.wait_line_or_eof(needle).unwrap_or_else(|| {
            panic!(
                "stderr closed without a line containing {needle:?}:\n{}",
                self.seen.join("\n")
            )
        })
    }

    /// Waits for a stderr line containing `needle`; `None` if stderr closes
    /// first (the process exited).
    pub fn wait_line_or_eof(&mut self, needle: &str) -> Option<String> {
        let deadline = Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Some(line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "no line containing {needle:?} within {BOUND:?}; stderr so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The address from the "listening" log line.
    pub fn wait_listening(&mut self) -> SocketAddr {
        let line = self.wait_line("listening");
        let addr = line
            .split_whitespace()
            .find_map(|t| t.strip_prefix("addr="))
            .unwrap_or_else(|| panic!("no addr= in {line:?}"));
        addr.parse().expect("socket address")
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid() as i32), sig).expect("kill");
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "hello-http did not exit; stderr:\n{}",
                self.seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// A minimal keep-alive HTTP/1.1 client connection.
pub struct Conn {
    r: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(BOUND)).unwrap();
        Conn {
            r: BufReader::new(s),
        }
    }

    pub fn send(&mut self, path: &str) {
        write!(
            self.r.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"
        )
        .expect("send request");
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.r.get_mut().write_all(bytes).expect("send");
    }

    pub fn recv(&mut self) -> Response {
        let mut line = String::new();
        self.r.read_line(&mut line).expect("status line");
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.r.read_line(&mut h).expect("header");
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (n, v) = h.split_once(':').expect("header colon");
            headers.push((n.trim().to_owned(), v.trim().to_owned()));
        }
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().expect("content-length"))
            .unwrap_or(0);
        let mut body = vec![0; len];
        self.r.read_exact(&mut body).expect("body");
        Response {
            status,
            headers,
            body: String::from_utf8(body).expect("utf-8 body"),
        }
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.send(path);
        self.recv()
    }

    /// Asserts the server closes cleanly (EOF, not a reset).
    pub fn expect_eof(&mut self) {
        let mut buf = [0u8; 16];
        match self.r.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("expected EOF, got {:?}", &buf[..n]),
            Err(e) => panic!("expected a clean EOF, got {e}"),
        }
    }
}

pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hello-http-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
