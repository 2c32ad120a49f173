//! Checks that run outside a generation: the preflight of a release
//! (`--preflight CMD`) and the health check during probation (`--health`).
//!
//! Commands run through `sh -c` with `{exe}`, `{version}`, `{dir}` and `{pid}`
//! replaced by single-quoted words (so never inside quotes); stdout and stderr are kept (the last
//! [`MAX_OUTPUT`] bytes) to show why a check failed.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Output kept from a check command.
pub const MAX_OUTPUT: usize = 4096;

/// `--health`: `exec:CMD` (exit 0 is healthy) or `http://HOST:PORT/PATH` (2xx is).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HealthCheck {
    /// A command.
    Exec(String),
    /// An HTTP GET.
    Http {
        /// `HOST:PORT`.
        authority: String,
        /// `/PATH`.
        path: String,
    },
}

impl HealthCheck {
    /// Parses `exec:CMD` or `http://HOST:PORT/PATH`.
    ///
    /// # Errors
    /// Neither form, or no command / host.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(cmd) = s.strip_prefix("exec:") {
            if cmd.trim().is_empty() {
                return Err(format!("invalid --health '{s}': no command after exec:"));
            }
            return Ok(HealthCheck::Exec(cmd.to_string()));
        }
        if let Some(rest) = s.strip_prefix("http://") {
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            if !authority.contains(':') || authority.ends_with(':') {
                return Err(format!(
                    "invalid --health '{s}': give the port, as in http://127.0.0.1:8080/health"
                ));
            }
            return Ok(HealthCheck::Http {
                authority: authority.to_string(),
                path: path.to_string(),
            });
        }
        Err(format!(
            "invalid --health '{s}': expected exec:CMD or http://HOST:PORT/PATH"
        ))
    }

    /// Runs the check once, within `timeout`.
    ///
    /// # Errors
    /// Unhealthy, with the reason (exit status and output, or the HTTP status).
    pub async fn run(&self, vars: &Vars, timeout: Duration) -> Result<(), String> {
        match self {
            HealthCheck::Exec(cmd) => {
                let (ok, out) = run_command(&vars.expand(cmd), timeout).await;
                if ok {
                    Ok(())
                } else {
                    Err(format!("'{cmd}' {out}"))
                }
            }
            HealthCheck::Http { authority, path } => {
                match tokio::time::timeout(timeout, http_status(authority, path)).await {
                    Ok(Ok(code)) if (200..300).contains(&code) => Ok(()),
                    Ok(Ok(code)) => Err(format!("GET http://{authority}{path}: HTTP {code}")),
                    Ok(Err(e)) => Err(format!("GET http://{authority}{path}: {e}")),
                    Err(_) => Err(format!(
                        "GET http://{authority}{path}: no answer within {}",
                        humantime::format_duration(timeout)
                    )),
                }
            }
        }
    }
}

/// What `{exe}`, `{version}`, `{dir}` and `{pid}` stand for.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    /// The executable's path.
    pub exe: String,
    /// The release's version.
    pub version: String,
    /// The release's directory.
    pub dir: String,
    /// The generation's pid (health checks).
    pub pid: String,
}

impl Vars {
    /// `cmd` with every placeholder replaced by its shell-quoted value.
    pub fn expand(&self, cmd: &str) -> String {
        cmd.replace("{exe}", &quote(&self.exe))
            .replace("{version}", &quote(&self.version))
            .replace("{dir}", &quote(&self.dir))
            .replace("{pid}", &quote(&self.pid))
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Runs `sh -c cmd` with stdin from /dev/null; returns whether it exited 0 within
/// `timeout`, and its output (stdout and stderr, the last [`MAX_OUTPUT`] bytes) or
/// why it failed.
pub async fn run_command(cmd: &str, timeout: Duration) -> (bool, String) {
    let mut cmd_line = tokio::process::Command::new("/bin/sh");
    crate::sys::children_nice(&mut cmd_line);
    let mut child = match cmd_line
        .arg("-c")
        .arg(format!("exec 2>&1\n{cmd}"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot run /bin/sh: {e}")),
    };
    // Its own process group (above): whatever it started in the background dies with
    // it, when it finishes as when it times out.
    let group = child.id();
    let Some(mut out) = child.stdout.take() else {
        return (false, "no output pipe".into());
    };
    let work = async {
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        let keep = |kept: &mut Vec<u8>, n: usize, buf: &[u8]| {
            kept.extend_from_slice(&buf[..n]);
            let extra = kept.len().saturating_sub(MAX_OUTPUT);
            kept.drain(..extra);
        };
        let mut eof = false;
        // Done when the shell exits: a background child may hold the pipe open.
        let st = loop {
            tokio::select! {
                st = child.wait() => break st,
                r = out.read(&mut buf), if !eof => match r {
                    Ok(0) | Err(_) => eof = true,
                    Ok(n) => keep(&mut kept, n, &buf),
                },
            }
        };
        // What it wrote just before it exited.
        let _ = tokio::time::timeout(Duration::from_millis(50), async {
            while !eof {
                match out.read(&mut buf).await {
                    Ok(0) | Err(_) => eof = true,
                    Ok(n) => keep(&mut kept, n, &buf),
                }
            }
        })
        .await;
        (st, kept)
    };
    let outcome = tokio::time::timeout(timeout, work).await;
    if let Some(g) = group {
        let _ = crate::sys::kill_group(g);
    }
    match outcome {
        Ok((Ok(st), kept)) => {
            let text = String::from_utf8_lossy(&kept).trim().to_string();
            if st.success() {
                (true, text)
            } else {
                let how = crate::text::exit_status(st);
                if text.is_empty() {
                    (false, format!("failed ({how})"))
                } else {
                    (false, format!("failed ({how}): {text}"))
                }
            }
        }
        Ok((Err(e), _)) => (false, format!("cannot wait for it: {e}")),
        Err(_) => (
            false,
            format!(
                "did not finish within {}",
                humantime::format_duration(timeout)
            ),
        ),
    }
}

async fn http_status(authority: &str, path: &str) -> std::io::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(authority).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: baton-health\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    status_code(line)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response"))
}

/// The code of an HTTP/1.x status line (`HTTP/1.1 200 OK`), and nothing else: a
/// service that answers with anything but HTTP is not healthy.
fn status_code(line: &[u8]) -> Option<u16> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| line.strip_prefix(b"HTTP/1.0 "))?;
    let (code, tail) = rest.split_at_checked(3)?;
    if !code.iter().all(u8::is_ascii_digit) || !(tail.is_empty() || tail[0] == b' ') {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_real_status_line_has_a_code() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(status_code(b"HTTP/1.1 204"), Some(204));
        for bad in [
            &b"\0\xff 200"[..],
            b"SSH-2.0 299 OpenSSH",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 20x OK",
            b"http/1.1 200 OK",
            b"200 OK",
            b"",
        ] {
            assert_eq!(status_code(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[tokio::test]
    async fn a_check_leaves_no_process_behind() {
        let marker = format!("sleep 77{}", std::process::id() % 1000);
        let alive = || {
            std::process::Command::new("pgrep")
                .args(["-f", &marker])
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false)
        };
        // Finished, with something left in the background.
        let (ok, _) = run_command(
            &format!("{marker} >/dev/null & true"),
            Duration::from_secs(5),
        )
        .await;
        assert!(ok);
        assert!(!alive(), "a background child of a passed check survived");
        // Timed out, with something holding its output open.
        let (ok, _) =
            run_command(&format!("{marker} & {marker}"), Duration::from_millis(200)).await;
        assert!(!ok);
        assert!(!alive(), "a child of a timed-out check survived");
    }

    #[test]
    fn parses_both_forms_and_refuses_others() {
        assert_eq!(
            HealthCheck::parse("exec:true").unwrap(),
            HealthCheck::Exec("true".into())
        );
        assert_eq!(
            HealthCheck::parse("http://127.0.0.1:8080/healthz").unwrap(),
            HealthCheck::Http {
                authority: "127.0.0.1:8080".into(),
                path: "/healthz".into()
            }
        );
        for bad in ["exec:", "http://host/x", "tcp://x:1", ""] {
            let e = HealthCheck::parse(bad).unwrap_err();
            assert!(e.contains("--health"), "{e}");
        }
    }

    #[test]
    fn placeholders_are_quoted() {
        let v = Vars {
            exe: "/srv/it's/app".into(),
            ..Vars::default()
        };
        assert_eq!(v.expand("{exe} -t"), "'/srv/it'\\''s/app' -t");
    }

    #[tokio::test]
    async fn commands_report_status_output_and_timeouts() {
        let (ok, out) = run_command("echo fine", Duration::from_secs(10)).await;
        assert!(ok && out == "fine", "{out}");
        let (ok, out) = run_command("echo bad config >&2; exit 3", Duration::from_secs(10)).await;
        assert!(
            !ok && out.contains("bad config") && out.contains("3"),
            "{out}"
        );
        let (ok, out) = run_command("sleep 30", Duration::from_millis(100)).await;
        assert!(!ok && out.contains("did not finish"), "{out}");
    }
}
