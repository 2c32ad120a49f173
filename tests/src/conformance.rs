//! Cross-language conformance: protocol transcripts (`tests/conformance/*.json`) played
//! by the Rust SDK's fake supervisor against a conformance child on each SDK
//! (`conformance-child` on the Rust SDK, `sdk/python/tests/conformance_child.py` on the
//! Python one). Every message a child sends must parse as `baton-protocol` defines it, so
//! neither SDK can drift from the protocol or from the other.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use baton_child::testing::{FakeSupervisor, Migrated, Restore, Snapshot};
use baton_protocol::{ChildMsg, Feature, SupervisorMsg};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::systemd::repo_root;

/// Bound on every wait of a transcript step.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// One transcript: the child's arguments and the steps, in order.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transcript {
    /// What it checks.
    pub about: String,
    /// The conformance child's arguments (`--state N`, `--restores A,B`, `--adopt`).
    #[serde(default)]
    pub args: Vec<String>,
    /// The exchange.
    pub steps: Vec<Step>,
}

/// One step; see `tests/conformance/README.md`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// The child's first message: `hello` with these features and `restores`.
    Hello {
        /// Feature names, in any order.
        features: Vec<String>,
        /// `restores`, if any.
        #[serde(default)]
        restores: Option<Vec<u32>>,
    },
    /// `READY=1` on the notify socket.
    Ready,
    /// The child says `prepared`; answer `fresh`.
    Fresh,
    /// The child says `prepared`; send a snapshot and check the answer.
    Restore {
        /// Snapshot schema.
        version: u32,
        /// Snapshot state.
        state: Value,
        /// Seal the memfd (an unsealed one must be rejected).
        #[serde(default = "yes")]
        sealed: bool,
        /// `restored` from this version...
        #[serde(default)]
        restored: Option<u32>,
        /// ...or `rejected` with a reason containing this.
        #[serde(default)]
        rejected: Option<String>,
    },
    /// Send `quiesce` and check the snapshot (or its failure).
    Quiesce {
        /// `accept`.
        #[serde(default)]
        accept: Option<Vec<u32>>,
        /// The snapshot's version...
        #[serde(default)]
        version: Option<u32>,
        /// ...and state...
        #[serde(default)]
        state: Option<Value>,
        /// ...or `snapshot_failed` with a reason containing this.
        #[serde(default)]
        failed: Option<String>,
    },
    /// Send a message as the protocol crate defines it (no fds).
    Send(Value),
    /// Send a raw line (an unknown type, say), with a `/dev/null` fd if `fd`.
    Raw {
        /// The JSON line, without its newline.
        line: String,
        /// Attach one fd.
        #[serde(default)]
        fd: bool,
    },
    /// Connect a client to the child's listener.
    Connect,
    /// Write this on the client connection (no newline added).
    Write(String),
    /// Read one line (without its newline) from the client connection.
    Read(String),
    /// Hand the child a live TCP connection with `buffered` (it becomes the client).
    Adopt {
        /// Its listener.
        listener: String,
        /// Bytes read and not processed.
        buffered: String,
    },
    /// The child hands the client's connection over with these fields.
    Migrated {
        /// Its listener.
        listener: String,
        /// The bytes it had read and not processed.
        buffered: String,
    },
    /// The child exits with this status (`0`) or any failure (`"nonzero"`).
    Exit(Value),
}

fn yes() -> bool {
    true
}

/// The conformance children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sdk {
    /// `conformance-child` (Rust).
    Rust,
    /// `sdk/python/tests/conformance_child.py`.
    Python,
}

/// Every transcript in `tests/conformance/`, by file name.
///
/// # Panics
/// When the directory or a transcript cannot be read.
pub fn transcripts() -> Vec<(String, Transcript)> {
    let dir = repo_root().join("tests/conformance");
    let mut out: Vec<(String, Transcript)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let t: Transcript =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), t)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn command(sdk: Sdk, python: &Path) -> tokio::process::Command {
    match sdk {
        Sdk::Rust => {
            let bin = crate::harness::bin("conformance-child").unwrap();
            tokio::process::Command::new(bin)
        }
        Sdk::Python => {
            let mut c = tokio::process::Command::new(python);
            c.arg(repo_root().join("sdk/python/tests/conformance_child.py"))
                .env("PYTHONPATH", crate::python::sdk_path());
            c
        }
    }
}

/// Plays `t` against `sdk`'s child; the error says which step failed and how.
///
/// # Errors
/// The first step the child did not conform to.
pub async fn play(sdk: Sdk, python: &Path, t: &Transcript) -> Result<(), String> {
    let mut fake = FakeSupervisor::new(2).map_err(|e| e.to_string())?;
    let mut cmd = command(sdk, python);
    cmd.args(&t.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    fake.command(cmd.as_std_mut()).map_err(|e| e.to_string())?;
    let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    within("LISTENING", out.read_line(&mut line))
        .await?
        .map_err(|e| e.to_string())?;
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("LISTENING ")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| format!("expected `LISTENING <addr>` on stdout, got {line:?}"))?;
    let mut client: Option<BufReader<tokio::net::TcpStream>> = None;
    for (i, step) in t.steps.iter().enumerate() {
        let fail = |why: String| format!("step {} {step:?}: {why}", i + 1);
        match step {
            Step::Hello { features, restores } => {
                let (msg, _) = within("hello", fake.next_message())
                    .await?
                    .map_err(|e| fail(e.to_string()))?;
                let ChildMsg::Hello {
                    protocol,
                    features: got,
                    restores: got_restores,
                } = msg
                else {
                    return Err(fail(format!("got {msg:?}")));
                };
                let mut want: Vec<Feature> = features
                    .iter()
                    .map(|f| {
                        serde_json::from_value(Value::String(f.clone()))
                            .map_err(|e| fail(e.to_string()))
                    })
                    .collect::<Result<_, _>>()?;
                let mut got = got;
                want.sort_by_key(|f| format!("{f:?}"));
                got.sort_by_key(|f| format!("{f:?}"));
                // The order of `restores` carries no meaning.
                let sorted = |r: &Option<Vec<u32>>| {
                    r.clone().map(|mut v| {
                        v.sort_unstable();
                        v
                    })
                };
                if protocol != 1 || got != want || sorted(&got_restores) != sorted(restores) {
                    return Err(fail(format!(
                        "got protocol {protocol}, features {got:?}, restores {got_restores:?}"
                    )));
                }
            }
            Step::Ready => within("READY=1", fake.ready())
                .await?
                .map_err(|e| fail(e.to_string()))?,
            Step::Fresh => within("prepared", fake.fresh())
                .await?
                .map_err(|e| fail(e.to_string()))?,
            Step::Restore {
                version,
                state,
                sealed,
                restored,
                rejected,
            } => {
                let doc = serde_json::json!({"version": version, "state": state});
                let snap = Snapshot::from_bytes(*version, doc.to_string().as_bytes(), *sealed)
                    .map_err(|e| fail(e.to_string()))?;
                let answer = within("restored or rejected", fake.restore(&snap))
                    .await?
                    .map_err(|e| fail(e.to_string()))?;
                match (answer, restored, rejected) {
                    (Restore::Restored { from_version }, Some(v), None) if from_version == *v => {}
                    (Restore::Rejected { reason }, None, Some(part))
                        if reason.contains(part.as_str()) => {}
                    (other, _, _) => return Err(fail(format!("got {other:?}"))),
                }
            }
            Step::Quiesce {
                accept,
                version,
                state,
                failed,
            } => {
                let got = match accept {
                    Some(a) => within("snapshot", fake.quiesce_for(a)).await?,
                    None => within("snapshot", fake.quiesce()).await?,
                };
                match (got, failed) {
                    (Ok(snap), None) => {
                        let doc = snap.state().map_err(|e| fail(e.to_string()))?;
                        if Some(snap.version) != *version || Some(&doc) != state.as_ref() {
                            return Err(fail(format!("got version {} with {doc}", snap.version)));
                        }
                    }
                    (Err(e), Some(part)) if e.to_string().contains(part.as_str()) => {}
                    (other, _) => return Err(fail(format!("got {other:?}"))),
                }
            }
            Step::Send(v) => {
                let msg: SupervisorMsg =
                    serde_json::from_value(v.clone()).map_err(|e| fail(e.to_string()))?;
                fake.send(&msg).await.map_err(|e| fail(e.to_string()))?;
            }
            Step::Raw { line, fd } => {
                let null: OwnedFd = std::fs::File::open("/dev/null")
                    .map_err(|e| fail(e.to_string()))?
                    .into();
                let fds: Vec<&OwnedFd> = if *fd { vec![&null] } else { vec![] };
                fake.send_raw(format!("{line}\n").as_bytes(), &fds)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
            }
            Step::Connect => {
                let s = within("connect", tokio::net::TcpStream::connect(addr))
                    .await?
                    .map_err(|e| fail(e.to_string()))?;
                client = Some(BufReader::new(s));
            }
            Step::Write(text) => {
                let c = client.as_mut().ok_or_else(|| fail("no client".into()))?;
                c.get_mut()
                    .write_all(text.as_bytes())
                    .await
                    .map_err(|e| fail(e.to_string()))?;
            }
            Step::Read(want) => {
                let c = client.as_mut().ok_or_else(|| fail("no client".into()))?;
                let mut got = String::new();
                within("a reply", c.read_line(&mut got))
                    .await?
                    .map_err(|e| fail(e.to_string()))?;
                if got.trim_end_matches('\n') != want {
                    return Err(fail(format!("read {got:?}")));
                }
            }
            Step::Adopt { listener, buffered } => {
                let (ours, theirs) = tcp_pair().map_err(|e| fail(e.to_string()))?;
                let conn = Migrated {
                    listener: listener.clone(),
                    buffered: buffered.clone().into_bytes(),
                    meta: Value::Null,
                    fd: theirs.into(),
                };
                fake.adopt(conn).await.map_err(|e| fail(e.to_string()))?;
                ours.set_nonblocking(true)
                    .map_err(|e| fail(e.to_string()))?;
                let s = tokio::net::TcpStream::from_std(ours).map_err(|e| fail(e.to_string()))?;
                client = Some(BufReader::new(s));
            }
            Step::Migrated { listener, buffered } => {
                let m = within("migrate", fake.migrated())
                    .await?
                    .map_err(|e| fail(e.to_string()))?;
                if &m.listener != listener || m.buffered != buffered.as_bytes() {
                    return Err(fail(format!(
                        "got listener {:?}, buffered {:?}",
                        m.listener,
                        String::from_utf8_lossy(&m.buffered)
                    )));
                }
                // The very connection the client holds: what it writes arrives here.
                let c = client.as_mut().ok_or_else(|| fail("no client".into()))?;
                c.get_mut()
                    .write_all(b"probe\n")
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                let std_stream = std::net::TcpStream::from(m.fd);
                std_stream
                    .set_nonblocking(true)
                    .map_err(|e| fail(e.to_string()))?;
                let mut s =
                    tokio::net::TcpStream::from_std(std_stream).map_err(|e| fail(e.to_string()))?;
                let mut buf = [0u8; 6];
                within("the probe", s.read_exact(&mut buf))
                    .await?
                    .map_err(|e| fail(e.to_string()))?;
                if &buf != b"probe\n" {
                    return Err(fail(format!("the migrated fd read {buf:?}")));
                }
            }
            Step::Exit(want) => {
                let status = within("exit", child.wait())
                    .await?
                    .map_err(|e| fail(e.to_string()))?;
                let ok = match want {
                    Value::String(s) if s == "nonzero" => !status.success(),
                    v => v.as_i64().is_some_and(|c| status.code() == Some(c as i32)),
                };
                if !ok {
                    return Err(fail(format!("exited with {status}")));
                }
            }
        }
    }
    Ok(())
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(STEP_TIMEOUT, f)
        .await
        .map_err(|_| format!("no {what} within {STEP_TIMEOUT:?}"))
}

/// A connected pair of TCP sockets on loopback (client end, server end).
fn tcp_pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let c = TcpStream::connect(l.local_addr()?)?;
    let (s, _) = l.accept()?;
    Ok((c, s))
}
