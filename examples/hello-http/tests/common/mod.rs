//! Shared by the hello-http end-to-end tests: a process wrapper that
//! streams stderr lines, and a keep-alive connection on `baton_tests::http`.

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

pub use baton_tests::http::Response;

/// A keep-alive HTTP/1.1 client connection (`baton_tests::http` underneath).
pub struct Conn {
    s: TcpStream,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        Conn {
            s: baton_tests::http::connect(addr, BOUND).expect("connect"),
        }
    }

    pub fn send(&mut self, path: &str) {
        baton_tests::http::send_get(&mut self.s, path, false).expect("send request");
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send");
    }

    pub fn recv(&mut self) -> Response {
        baton_tests::http::read_response(&mut self.s).expect("one response")
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.send(path);
        self.recv()
    }

    /// Asserts the server closes cleanly (EOF, not a reset).
    pub fn expect_eof(&mut self) {
        let mut buf = [0u8; 16];
        match self.s.read(&mut buf) {
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
