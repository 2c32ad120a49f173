//! The README's commands, run as written: its shell blocks are read from README.md
//! (never copied into a test), and run from the repository root against the release
//! binaries. A `./target/release/baton run ... &` line is started by the runner instead,
//! which then waits until that baton answers `status` (a person would wait for its log),
//! and kills its whole process group at the end.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::TestDir;
use crate::systemd::repo_root;

/// The shell blocks of one `## ` section of README.md, in order.
///
/// # Panics
/// The README has no such section, or it has no shell block.
pub fn blocks(section: &str) -> Vec<Vec<String>> {
    blocks_in("README.md", section)
}

/// The shell blocks of one `## ` section of `file` (relative to the repository), in order.
///
/// # Panics
/// The file has no such section, or it has no shell block.
pub fn blocks_in(file: &str, section: &str) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(repo_root().join(file)).expect("the document");
    let mut out = Vec::new();
    let mut inside_section = false;
    let mut block: Option<Vec<String>> = None;
    for line in text.lines() {
        if let Some(b) = &mut block {
            if line.starts_with("```") {
                out.push(block.take().unwrap_or_default());
            } else {
                b.push(line.to_owned());
            }
            continue;
        }
        if let Some(h) = line.strip_prefix("## ") {
            inside_section = h.trim() == section;
        } else if inside_section && line.trim() == "```sh" {
            block = Some(Vec::new());
        }
    }
    assert!(
        !out.is_empty(),
        "{file} has no shell block under '## {section}'"
    );
    out
}

/// Command 1 of the README's first block (`cargo build ... && ./target/release/baton run
/// ...`), without its build: the suite has built the binaries already, and a second
/// cargo would wait for the one running the tests.
///
/// # Panics
/// The README does not start with that command.
pub fn first_command() -> String {
    let text = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("cargo build --release") && l.contains("&& ./target/release/baton run")
        })
        .expect("the README's command 1");
    line.split_once("&& ")
        .map(|(_, run)| run.to_owned())
        .unwrap_or_default()
}

/// Joins backslash-continued lines.
fn logical_lines(lines: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cont = false;
    for l in lines {
        if cont {
            if let Some(last) = out.last_mut() {
                last.push('\n');
                last.push_str(l);
            }
        } else {
            out.push(l.clone());
        }
        cont = l.trim_end().ends_with('\\');
    }
    out
}

/// What one script printed, and how it ended.
#[derive(Debug)]
pub struct Ran {
    /// Stdout and stderr, interleaved as written.
    pub output: String,
    /// The exit status of the last command.
    pub code: Option<i32>,
}

/// Runs README blocks in one session, and kills what they started on drop.
#[derive(Default)]
pub struct Session {
    background: Vec<Child>,
}

impl Session {
    /// Runs `lines` (a block, or part of one): each `baton run ... &` line is started in
    /// the background and waited for; the lines between are one bash script each.
    ///
    /// # Panics
    /// A script does not end within `timeout`, or a baton never answers.
    pub fn run(&mut self, lines: &[String], timeout: Duration) -> Vec<Ran> {
        let mut out = Vec::new();
        let mut script = Vec::new();
        for line in logical_lines(lines) {
            let code = line.split(" #").next().unwrap_or("").trim_end();
            if code.starts_with("./target/release/baton run") && code.ends_with('&') {
                if !script.is_empty() {
                    out.push(script_run(&std::mem::take(&mut script), timeout));
                }
                self.start(code.trim_end_matches('&').trim_end());
            } else {
                script.push(line);
            }
        }
        if !script.is_empty() {
            out.push(script_run(&script, timeout));
        }
        out
    }

    /// Starts `command` (a `baton run`) in a process group of its own, and waits until
    /// it answers `status` on its control socket with an active generation.
    pub fn start(&mut self, command: &str) {
        let child = Command::new("bash")
            .args(["-c", &format!("exec {command}")])
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("bash");
        self.background.push(child);
        let control = control_of(command);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut status = Command::new(repo_root().join("target/release/baton"));
            status.arg("status");
            if let Some(c) = &control {
                status.args(["--control", c]);
            }
            let ok = status.output().is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains("active")
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "'{command}' never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for c in &mut self.background {
            // The whole group: baton, and its guardian, which then kills the generations.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.wait();
        }
    }
}

/// The `--control` a command line gives, if any.
fn control_of(command: &str) -> Option<String> {
    let mut words = command.split_whitespace();
    while let Some(w) = words.next() {
        if w == "--control" {
            return words.next().map(str::to_owned);
        }
    }
    None
}

/// Runs `lines` as one bash script from the repository root, in a process group of its
/// own that is killed when it ends (a background job it started goes with it).
fn script_run(lines: &[String], timeout: Duration) -> Ran {
    let script = lines.join("\n");
    let dir = TestDir::new("readme").expect("a temp dir");
    let log = dir.join("out.log");
    let file = std::fs::File::create(&log).expect("log file");
    // The docs say `baton` where an installed one would be: this checkout's.
    let path = format!(
        "{}:{}",
        repo_root().join("target/release").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .env("PATH", path)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup"))
        .stderr(file)
        .process_group(0)
        .spawn()
        .expect("bash");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = child.wait();
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let Some(status) = status else {
        panic!("README script did not end in {timeout:?}:\n{script}\n--- output:\n{output}");
    };
    Ran {
        output,
        code: status.code(),
    }
}
