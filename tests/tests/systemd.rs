//! baton under a real systemd (issue 5), driven through the shipped unit files.
//!
//! Every test boots systemd as PID 1 of private namespaces with
//! `<repo>/../shared/systemd-sandbox/sandbox`, loads the unit files from `systemd/` exactly
//! as shipped (copied byte for byte into a per-test unit directory) plus a drop-in that
//! only swaps what cannot be the same on a test machine: the binaries (the target dir's
//! `baton`, and a wrapper script around the target dir's `hello-http`), the port and the
//! log destination. The drop-in's ExecStart=/ExecReload= are *derived* from the shipped
//! lines by substitution, and every substitution must match, so a changed unit file makes
//! these tests fail loudly instead of testing a stale copy.
//!
//! The tests skip (pass, with the reason on stderr) when not root, or when systemd or the
//! sandbox script is missing. They run the target dir's binaries, so `cargo build
//! --workspace` first (a missing binary fails them). `shipped_units_are_consistent` checks
//! the unit files statically and runs everywhere.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use baton_protocol::{Status, UpgradeResult};
use baton_tests::harness;
use baton_tests::load::{LoadGen, LoadHandle, LoadOpts, LoadReport};

/// The systemd tests share the machine's two cores with a whole init system, baton, the
/// app and a load generator each; running them one at a time keeps their timing honest.
static SERIAL: Mutex<()> = Mutex::new(());

/// Bound for anything that should take well under a second.
const SHORT: Duration = Duration::from_secs(10);
/// Bound for a start, a reload or a stop (the shipped timeouts are 30 s and more).
const LONG: Duration = Duration::from_secs(60);
/// How long hello-http waits before READY in the activation test.
const READY_DELAY: Duration = Duration::from_millis(1500);

const HELLO_SERVICE: &str = "hello-http.service";
const HELLO_SOCKET: &str = "hello-http.socket";
const TEMPLATE: &str = "baton@.service";
const TEMPLATE_INSTANCE: &str = "baton@hello.service";

// Values in the shipped unit files that the drop-ins replace.
const SHIPPED_BATON: &str = "/usr/local/bin/baton";
const SHIPPED_APP: &str = "/usr/local/bin/hello-http";
const SHIPPED_ADDR: &str = "127.0.0.1:8080";

// ---------------------------------------------------------------------------------------
// Locating things
// ---------------------------------------------------------------------------------------

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn systemd_dir() -> PathBuf {
    repo_root().join("systemd")
}

struct Tools {
    sandbox: PathBuf,
    baton: PathBuf,
    hello: PathBuf,
}

/// What the tests need, or `None` (after saying why on stderr) when this machine cannot
/// run them. Missing *binaries* are not a reason to skip: that is a broken test setup.
fn tools(test: &str) -> Option<Tools> {
    let skip = |why: &str| {
        eprintln!("SKIP systemd::{test}: {why}");
        None
    };
    if !nix::unistd::geteuid().is_root() {
        return skip("needs root (the sandbox boots systemd in new namespaces)");
    }
    if !Path::new("/lib/systemd/systemd").exists() {
        return skip("/lib/systemd/systemd is missing (apt-get install systemd)");
    }
    if harness::which("unshare").is_none() || harness::which("nsenter").is_none() {
        return skip("unshare/nsenter missing (apt-get install util-linux)");
    }
    let sandbox = repo_root().join("../shared/systemd-sandbox/sandbox");
    if !sandbox.is_file() {
        return skip(&format!("{} is missing", sandbox.display()));
    }
    // Missing binaries are a broken setup, not a reason to skip.
    let baton = harness::baton_bin().unwrap_or_else(|e| panic!("{e}"));
    let hello = harness::hello_http_bin().unwrap_or_else(|e| panic!("{e}"));
    Some(Tools {
        sandbox,
        baton,
        hello,
    })
}

// ---------------------------------------------------------------------------------------
// Unit files
// ---------------------------------------------------------------------------------------

/// The assignments of one section of a unit file, in order, with `\`-continued lines
/// joined the way systemd joins them.
fn unit_entries(text: &str, section: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut in_section = false;
    let mut pending: Option<String> = None;
    for raw in text.lines() {
        if let Some(mut acc) = pending.take() {
            let line = raw.trim();
            if line.starts_with('#') || line.starts_with(';') {
                pending = Some(acc);
                continue;
            }
            match line.strip_suffix('\\') {
                Some(head) => {
                    acc.push(' ');
                    acc.push_str(head.trim());
                    pending = Some(acc);
                }
                None => {
                    acc.push(' ');
                    acc.push_str(line);
                    push_entry(&mut out, &acc);
                }
            }
            continue;
        }
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            in_section = line == format!("[{section}]");
            continue;
        }
        if !in_section {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => pending = Some(head.trim().to_owned()),
            None => push_entry(&mut out, line),
        }
    }
    out
}

fn push_entry(out: &mut Vec<(String, String)>, line: &str) {
    if let Some((k, v)) = line.split_once('=') {
        let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
        out.push((k.trim().to_owned(), v));
    }
}

/// The last value of `key` in `[section]`; panics if there is none.
fn unit_value(text: &str, file: &str, section: &str, key: &str) -> String {
    unit_entries(text, section)
        .into_iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("{file}: no {key}= in [{section}]"))
}

fn read_shipped(file: &str) -> String {
    let path = systemd_dir().join(file);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `value` with every `(from, to)` applied; each `from` must occur, so that a change to
/// the shipped unit shows up here as a failure rather than as a silently stale test.
fn substitute(file: &str, key: &str, value: &str, subs: &[(&str, &str)]) -> String {
    let mut out = value.to_owned();
    for (from, to) in subs {
        assert!(
            out.contains(from),
            "{file}: {key}= no longer contains {from:?} (the systemd tests derive their \
             drop-ins from it; update tests/tests/systemd.rs): {value}"
        );
        out = out.replace(from, to);
    }
    out
}

/// The value following `flag` in a command line (`--flag VALUE`).
fn flag_value<'a>(cmdline: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = cmdline.split_whitespace();
    while let Some(w) = words.next() {
        if w == flag {
            return words.next();
        }
        if let Some(v) = w.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            return Some(v);
        }
    }
    None
}

fn duration(file: &str, what: &str, s: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("{file}: {what} {s:?}: {e}"))
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

// ---------------------------------------------------------------------------------------
// The sandbox
// ---------------------------------------------------------------------------------------

/// A running sandboxed systemd; `sandbox down` on drop, whatever happened.
struct Sandbox {
    script: PathBuf,
    name: String,
}

impl Sandbox {
    fn up(script: &Path, name: &str, units: &Path) -> Sandbox {
        // The guard exists before `up` runs: a boot that fails half-way must be torn
        // down too.
        let sandbox = Sandbox {
            script: script.to_path_buf(),
            name: name.to_owned(),
        };
        let out = sandbox.run("up", &[units.to_str().expect("utf-8 path")]);
        if !out.status.success() {
            // See `repair_recorded_pid`: the boot may have worked, only the pid is wrong.
            let state = sandbox.repair_recorded_pid().then(|| {
                let s = sandbox.ctl(&["is-system-running"]);
                String::from_utf8_lossy(&s.stdout).trim().to_owned()
            });
            assert!(
                matches!(state.as_deref(), Some("running" | "degraded")),
                "sandbox up {name} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        sandbox
    }

    /// Stopgap for a race in `sandbox up`: it records the first child of its `outer.sh`
    /// as systemd's pid, and that child can be outer.sh's short-lived `mkdir` instead of
    /// the `unshare`d systemd (about one boot in four here). `up` then times out and
    /// `down` would leave the real systemd running. This points the state's pid file at
    /// the real PID 1, the `systemd` child of the recorded `outer` process. Returns
    /// whether it changed anything. Remove once the script picks the pid by name.
    fn repair_recorded_pid(&self) -> bool {
        let state = Path::new("/tmp/systemd-sandbox").join(&self.name);
        let Ok(outer) = fs::read_to_string(state.join("outer")) else {
            return false;
        };
        let outer = outer.trim();
        let Ok(children) = fs::read_to_string(format!("/proc/{outer}/task/{outer}/children"))
        else {
            return false;
        };
        let Some(real) = children.split_whitespace().find(|c| {
            fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|comm| comm.trim() == "systemd")
        }) else {
            return false;
        };
        let recorded = fs::read_to_string(state.join("pid")).unwrap_or_default();
        if recorded.trim() == real {
            return false;
        }
        eprintln!(
            "sandbox {}: recorded pid {} is not systemd; using {real} (race in `sandbox up`)",
            self.name,
            recorded.trim()
        );
        fs::write(state.join("pid"), format!("{real}\n")).is_ok()
    }

    fn run(&self, verb: &str, args: &[&str]) -> Output {
        Command::new(&self.script)
            .args([verb, self.name.as_str()])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run sandbox {verb}: {e}"))
    }

    /// `systemctl ARGS` inside.
    fn ctl(&self, args: &[&str]) -> Output {
        self.run("ctl", args)
    }

    /// Any command inside the sandbox's namespaces.
    fn exec(&self, args: &[&str]) -> Output {
        self.run("exec", args)
    }

    fn console_log(&self) -> String {
        fs::read_to_string(format!("/tmp/systemd-sandbox/{}/console.log", self.name))
            .unwrap_or_default()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.repair_recorded_pid();
        match Command::new(&self.script)
            .args(["down", self.name.as_str()])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "sandbox down {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("sandbox down {}: {e}", self.name),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The fixture: shipped units + drop-ins in a per-test directory, and a sandbox
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    /// hello-http.socket + hello-http.service: systemd owns the listening socket.
    SocketUnit,
    /// baton@hello.service from the template, no socket unit: baton binds the listener
    /// itself (port 0), so only the fd store can keep it across a crash.
    Template,
}

struct Fixture {
    test: &'static str,
    dir: PathBuf,
    wrapper: PathBuf,
    log: PathBuf,
    unit: &'static str,
    /// The control socket inside the sandbox (its /run is private).
    control: String,
    /// Known up front for the socket layout; for the template, read from status.
    port: Option<u16>,
    tools: Tools,
    /// Taken down first when the fixture drops.
    sandbox: Option<Sandbox>,
}

impl Fixture {
    /// Writes the unit dir for `layout`; `app_args` go to hello-http via the wrapper.
    fn new(test: &'static str, mut tools: Tools, layout: Layout, app_args: &[&str]) -> Fixture {
        // Not under /tmp or /var/tmp: the shipped hello-http.service has PrivateTmp=yes,
        // so it would not see the wrapper script or the binaries there. A checkout under
        // /tmp has its target dir there too: then use /var/lib, and copy the binaries
        // next to the wrapper either way.
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let base = if base.starts_with("/tmp") || base.starts_with("/var/tmp") {
            PathBuf::from("/var/lib/baton-tests")
        } else {
            base.to_path_buf()
        };
        let dir = base.join(format!("systemd-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let units = dir.join("units");
        fs::create_dir_all(dir.join("bin")).expect("mkdir bin");
        fs::create_dir_all(&units).expect("mkdir units");
        for bin in [&mut tools.baton, &mut tools.hello] {
            let copy = dir.join("bin").join(format!(
                "real-{}",
                bin.file_name().expect("binary name").to_string_lossy()
            ));
            fs::copy(&*bin, &copy).expect("copy a binary next to the units");
            *bin = copy;
        }
        let wrapper = dir.join("bin").join("hello-http");
        let log = dir.join("unit.log");
        let baton = tools.baton.to_str().expect("utf-8 path").to_owned();
        let wrapper_s = wrapper.to_str().expect("utf-8 path").to_owned();
        let log_s = log.to_str().expect("utf-8 path").to_owned();

        let mut fx = Fixture {
            test,
            dir,
            wrapper,
            log,
            unit: HELLO_SERVICE,
            control: String::new(),
            port: None,
            tools,
            sandbox: None,
        };
        fx.write_wrapper(app_args);

        // Output goes to a file: there is no journal in the sandbox. The hardening in the
        // shipped unit (ProtectSystem=strict) does not matter here, because systemd opens
        // StandardOutput= files before it sets up the unit's namespaces.
        let logging = format!("StandardOutput=append:{log_s}\nStandardError=inherit\n");
        match layout {
            Layout::SocketUnit => {
                let port = free_port();
                let addr = format!("127.0.0.1:{port}");
                let service = read_shipped(HELLO_SERVICE);
                let socket = read_shipped(HELLO_SOCKET);
                let listen = unit_value(&socket, HELLO_SOCKET, "Socket", "ListenStream");
                assert_eq!(listen, SHIPPED_ADDR, "{HELLO_SOCKET}: ListenStream changed");
                let exec_start = unit_value(&service, HELLO_SERVICE, "Service", "ExecStart");
                let exec_reload = unit_value(&service, HELLO_SERVICE, "Service", "ExecReload");
                fx.control = flag_value(&exec_start, "--control")
                    .expect("ExecStart has --control")
                    .to_owned();
                let start = substitute(
                    HELLO_SERVICE,
                    "ExecStart",
                    &exec_start,
                    &[
                        (SHIPPED_BATON, &baton),
                        (SHIPPED_APP, &wrapper_s),
                        (SHIPPED_ADDR, &addr),
                    ],
                );
                let reload = substitute(
                    HELLO_SERVICE,
                    "ExecReload",
                    &exec_reload,
                    &[(SHIPPED_BATON, &baton)],
                );
                fx.install(HELLO_SERVICE, &service);
                fx.install(HELLO_SOCKET, &socket);
                fx.drop_in(
                    HELLO_SOCKET,
                    &format!("[Socket]\nListenStream=\nListenStream={addr}\n"),
                );
                fx.drop_in(
                    HELLO_SERVICE,
                    &format!(
                        "[Service]\nExecStart=\nExecStart={start}\nExecReload=\n\
                         ExecReload={reload}\n{logging}"
                    ),
                );
                fx.port = Some(port);
            }
            Layout::Template => {
                let template = read_shipped(TEMPLATE);
                let exec_start = unit_value(&template, TEMPLATE, "Service", "ExecStart");
                let exec_reload = unit_value(&template, TEMPLATE, "Service", "ExecReload");
                let runtime = unit_value(&template, TEMPLATE, "Service", "RuntimeDirectory");
                let control = flag_value(&exec_start, "--control")
                    .expect("ExecStart has --control")
                    .replace("%t", "/run")
                    .replace("%i", "hello");
                assert!(
                    control.starts_with(&format!("/run/{}/", runtime.replace("%i", "hello"))),
                    "{TEMPLATE}: the control socket {control} is not in RuntimeDirectory={runtime}"
                );
                fx.control = control;
                let start = substitute(
                    TEMPLATE,
                    "ExecStart",
                    &exec_start,
                    &[(SHIPPED_BATON, &baton)],
                );
                let reload = substitute(
                    TEMPLATE,
                    "ExecReload",
                    &exec_reload,
                    &[(SHIPPED_BATON, &baton)],
                );
                fx.install(TEMPLATE, &template);
                // What /etc/baton/hello.env would say; EnvironmentFile= is reset because
                // the tests must not touch /etc.
                fx.drop_in(
                    TEMPLATE_INSTANCE,
                    &format!(
                        "[Service]\nEnvironmentFile=\nEnvironment=BATON_APP={wrapper_s}\n\
                         Environment=\"BATON_OPTS=--listen http=127.0.0.1:0\"\n\
                         ExecStart=\nExecStart={start}\nExecReload=\nExecReload={reload}\n\
                         {logging}"
                    ),
                );
                fx.unit = TEMPLATE_INSTANCE;
            }
        }
        fx
    }

    fn units(&self) -> PathBuf {
        self.dir.join("units")
    }

    fn install(&self, name: &str, text: &str) {
        fs::write(self.units().join(name), text).expect("write unit");
    }

    fn drop_in(&self, unit: &str, text: &str) {
        self.drop_in_named(unit, "50-test.conf", text);
    }

    fn drop_in_named(&self, unit: &str, file: &str, text: &str) {
        let d = self.units().join(format!("{unit}.d"));
        fs::create_dir_all(&d).expect("mkdir drop-in dir");
        fs::write(d.join(file), text).expect("write drop-in");
    }

    /// Replaces the app the unit runs, atomically (a half-written script must never be
    /// exec'd; baton resolves the program again at every spawn).
    fn write_app_script(&self, body: &str) {
        let tmp = self.wrapper.with_extension("tmp");
        fs::write(
            &tmp,
            format!("#!/bin/sh\n# written by tests/tests/systemd.rs\n{body}\n"),
        )
        .expect("write wrapper");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
        fs::rename(&tmp, &self.wrapper).expect("rename wrapper");
    }

    fn write_wrapper(&self, app_args: &[&str]) {
        let mut line = format!("exec '{}'", self.tools.hello.display());
        for a in app_args {
            line.push_str(&format!(" '{a}'"));
        }
        line.push_str(" \"$@\"");
        self.write_app_script(&line);
    }

    fn write_broken_app(&self) {
        self.write_app_script("echo 'hello-http: broken build, exiting' >&2\nexit 3");
    }

    fn boot(&mut self) {
        let name = format!("baton-{}-{}", self.test, std::process::id());
        self.sandbox = Some(Sandbox::up(&self.tools.sandbox, &name, &self.units()));
    }

    fn sb(&self) -> &Sandbox {
        self.sandbox.as_ref().expect("sandbox is up")
    }

    /// `systemctl ARGS`, which must succeed.
    fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.sb().ctl(args);
        if !out.status.success() {
            self.fail(&format!(
                "systemctl {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn show(&self, unit: &str, props: &[&str]) -> HashMap<String, String> {
        let mut args = vec!["show"];
        for p in props {
            args.push("-p");
            args.push(p);
        }
        args.push(unit);
        self.ctl_ok(&args)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn prop(&self, prop: &str) -> String {
        self.show(self.unit, &[prop])
            .remove(prop)
            .unwrap_or_default()
    }

    fn prop_u64(&self, prop: &str) -> u64 {
        let v = self.prop(prop);
        v.parse()
            .unwrap_or_else(|_| self.fail(&format!("{prop}={v:?} is not a number")))
    }

    /// Polls `prop` until `pred` holds; returns the value that satisfied it.
    fn wait_prop(&self, prop: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.prop(prop);
            if pred(&v) {
                return v;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("{prop} still {v:?} after {timeout:?}"));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn main_pid(&self) -> u32 {
        self.prop_u64("MainPID") as u32
    }

    fn status(&self) -> Status {
        let baton = self.tools.baton.to_str().expect("utf-8 path");
        let out = self
            .sb()
            .exec(&[baton, "status", "--json", "--control", &self.control]);
        if !out.status.success() {
            self.fail(&format!(
                "baton status failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            self.fail(&format!(
                "baton status --json: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            ))
        })
    }

    /// The address clients use: the socket unit's, or what baton bound (port 0).
    fn addr(&self) -> SocketAddr {
        match self.port {
            Some(p) => SocketAddr::from(([127, 0, 0, 1], p)),
            None => {
                let st = self.status();
                let l = st
                    .listeners
                    .iter()
                    .find(|l| l.name == "http")
                    .unwrap_or_else(|| self.fail(&format!("no listener http in {st:?}")));
                l.addr
                    .parse()
                    .unwrap_or_else(|e| self.fail(&format!("listener addr {:?}: {e}", l.addr)))
            }
        }
    }

    /// The commands running in the sandbox (`pid comm`), systemd and this query aside.
    fn processes(&self) -> Vec<(u32, String)> {
        let out = self.sb().exec(&["ps", "-e", "-o", "pid=,comm="]);
        let procs: Vec<(u32, String)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let pid = it.next()?.parse().ok()?;
                Some((pid, it.next()?.to_owned()))
            })
            .collect();
        // An empty or failed listing would make every "is it gone?" check pass.
        if !out.status.success() || !procs.iter().any(|(p, c)| *p == 1 && c == "systemd") {
            self.fail(&format!("ps in the sandbox: {out:?}"));
        }
        procs
    }

    fn pid_alive(&self, pid: u32) -> bool {
        self.processes().iter().any(|(p, _)| *p == pid)
    }

    fn unit_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with everything needed to understand a failure: the unit's state, its
    /// output (baton's and the app's logs) and systemd's console.
    fn fail(&self, what: &str) -> ! {
        let mut msg = format!("systemd::{}: {what}\n", self.test);
        if let Some(sb) = &self.sandbox {
            let st = sb.ctl(&["status", "--no-pager", "-l", self.unit]);
            msg.push_str(&format!(
                "--- systemctl status {}\n{}",
                self.unit,
                String::from_utf8_lossy(&st.stdout)
            ));
            msg.push_str(&format!(
                "--- systemd console\n{}",
                tail(&sb.console_log(), 40)
            ));
        }
        msg.push_str(&format!(
            "--- unit output ({})\n{}",
            self.log.display(),
            tail(&self.unit_log(), 80)
        ));
        panic!("{msg}");
    }

    fn check(&self, cond: bool, what: impl FnOnce() -> String) {
        if !cond {
            self.fail(&what());
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Sandbox first: the units must be gone before their files are.
        self.sandbox.take();
        if thread::panicking() {
            eprintln!(
                "systemd::{}: files kept in {}",
                self.test,
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = lines[start..].join("\n");
    out.push('\n');
    out
}

/// Does `text` mention `word` followed by exactly `n` (not `n` as a prefix of more digits)?
fn mentions(text: &str, word: &str, n: u64) -> bool {
    let pat = format!("{word} {n}");
    text.match_indices(&pat).any(|(i, _)| {
        !text[i + pat.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

// ---------------------------------------------------------------------------------------
// A tiny blocking HTTP/1.1 client for the individual requests the tests reason about
// (the continuous load comes from baton_tests::load)
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct HttpResponse {
    status: u16,
    body: String,
}

impl HttpResponse {
    fn pid(&self) -> Option<u32> {
        baton_tests::load::find_pid(self.body.as_bytes())
    }
}

fn send_get(stream: &mut TcpStream, path: &str, close: bool) -> io::Result<()> {
    let conn = if close { "Connection: close\r\n" } else { "" };
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{conn}\r\n");
    stream.write_all(req.as_bytes())
}

/// Reads one response: headers, then a Content-Length body, or everything up to EOF.
fn read_response(stream: &mut TcpStream) -> io::Result<HttpResponse> {
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

fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// One `GET path` on a new connection with `Connection: close`.
fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<HttpResponse> {
    let mut s = connect(addr, timeout)?;
    send_get(&mut s, path, true)?;
    read_response(&mut s)
}

// ---------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------

struct Load {
    rt: tokio::runtime::Runtime,
    handle: Option<LoadHandle>,
}

impl Load {
    /// Keep-alive and connection-per-request clients, running on their own runtime while
    /// the test drives systemctl from this thread.
    fn start(fx: &Fixture, addr: SocketAddr) -> Load {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let opts = LoadOpts {
            keepalive: 4,
            fresh: 4,
            request_timeout: Duration::from_secs(10),
            ..LoadOpts::default()
        };
        let handle = {
            let _enter = rt.enter();
            LoadGen::start(addr, opts)
        };
        let load = Load {
            rt,
            handle: Some(handle),
        };
        load.progress(fx, 50);
        load
    }

    fn handle(&self) -> &LoadHandle {
        self.handle.as_ref().expect("load is running")
    }

    /// Waits until `n` more requests succeeded (the service is really serving), and
    /// fails fast if any request failed meanwhile.
    fn progress(&self, fx: &Fixture, n: u64) {
        let before = self.handle().snapshot().ok;
        let res = self.rt.block_on(
            self.handle()
                .wait_until(LONG, |s| s.failed > 0 || s.ok >= before + n),
        );
        match res {
            Ok(s) if s.failed == 0 => {}
            Ok(s) | Err(s) => fx.fail(&format!(
                "load: wanted {n} more ok requests after {before} with none failed, got {s:?}"
            )),
        }
    }

    fn stop(mut self) -> LoadReport {
        let handle = self.handle.take().expect("load is running");
        self.rt.block_on(handle.stop())
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The shipped units agree with each other and with baton's timeouts. Runs everywhere.
#[test]
fn shipped_units_are_consistent() {
    let service = read_shipped(HELLO_SERVICE);
    let socket = read_shipped(HELLO_SOCKET);
    let template = read_shipped(TEMPLATE);

    // The socket unit's fd is matched to baton's listener by name, and must be the same
    // address.
    let fd_name = unit_value(&socket, HELLO_SOCKET, "Socket", "FileDescriptorName");
    let listen_stream = unit_value(&socket, HELLO_SOCKET, "Socket", "ListenStream");
    let exec_start = unit_value(&service, HELLO_SERVICE, "Service", "ExecStart");
    let listen = flag_value(&exec_start, "--listen").expect("ExecStart has --listen");
    assert_eq!(
        listen,
        format!("{fd_name}={listen_stream}"),
        "{HELLO_SERVICE} --listen must match {HELLO_SOCKET}'s FileDescriptorName=/ListenStream="
    );
    let deps = unit_entries(&service, "Unit");
    for key in ["Requires", "After"] {
        assert!(
            deps.iter()
                .any(|(k, v)| k == key && v.split_whitespace().any(|u| u == HELLO_SOCKET)),
            "{HELLO_SERVICE}: {key}= should name {HELLO_SOCKET}"
        );
    }

    for (file, text) in [(HELLO_SERVICE, &service), (TEMPLATE, &template)] {
        let v = |key: &str| unit_value(text, file, "Service", key);
        assert_eq!(v("Type"), "notify", "{file}");
        // baton alone speaks to systemd; children speak to baton.
        assert_eq!(v("NotifyAccess"), "main", "{file}");
        assert_eq!(v("KillMode"), "mixed", "{file}");
        assert_eq!(v("Restart"), "on-failure", "{file}");
        let store: u32 = v("FileDescriptorStoreMax").parse().expect("a number");
        assert!(
            store >= 1,
            "{file}: FileDescriptorStoreMax must keep the listeners"
        );

        let start = v("ExecStart");
        let reload = v("ExecReload");
        let words: Vec<&str> = reload.split_whitespace().collect();
        assert_eq!(
            &words[..3],
            &[SHIPPED_BATON, "upgrade", "--wait"],
            "{file}: ExecReload= must wait for the outcome so that a rollback fails the reload"
        );
        let control = flag_value(&start, "--control").expect("ExecStart has --control");
        assert_eq!(
            flag_value(&reload, "--control"),
            Some(control),
            "{file}: ExecStart= and ExecReload= must use the same control socket"
        );
        let runtime = v("RuntimeDirectory");
        let expected_dir = if control.starts_with("%t/") {
            format!("%t/{runtime}/")
        } else {
            format!("/run/{runtime}/")
        };
        assert!(
            control.starts_with(&expected_dir),
            "{file}: control socket {control} is not in RuntimeDirectory={runtime}"
        );

        // baton's own deadlines must expire before systemd's: baton enforces the drain
        // deadline itself, and a reload waits up to two ready timeouts (one queued behind a
        // running upgrade). The template passes them via $BATON_OPTS (defaults: 30 s).
        let drain = flag_value(&start, "--drain-timeout").unwrap_or("30s");
        let ready = flag_value(&start, "--ready-timeout").unwrap_or("30s");
        let drain = duration(file, "--drain-timeout", drain);
        let ready = duration(file, "--ready-timeout", ready);
        let stop = duration(file, "TimeoutStopSec", &v("TimeoutStopSec"));
        let start_timeout = duration(file, "TimeoutStartSec", &v("TimeoutStartSec"));
        assert!(
            stop > drain,
            "{file}: TimeoutStopSec must exceed --drain-timeout"
        );
        assert!(
            start_timeout > 2 * ready,
            "{file}: TimeoutStartSec (also ExecReload='s timeout) must exceed 2 x --ready-timeout"
        );
    }
}

/// systemd's own linter finds nothing to complain about in the shipped units (an unknown
/// or misspelt key is only a warning to systemd, and would silently fall back to the
/// default). Needs `systemd-analyze`, not root.
#[test]
fn shipped_units_pass_systemd_analyze_verify() {
    let Some(analyze) = harness::which("systemd-analyze") else {
        eprintln!("SKIP systemd::shipped_units_pass_systemd_analyze_verify: no systemd-analyze");
        return;
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("systemd-verify-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("mkdir");
    // verify also checks that the commands exist; /bin/true stands in for the binaries
    // that are installed under /usr/local/bin on a real machine.
    for file in [HELLO_SOCKET, HELLO_SERVICE, TEMPLATE] {
        let text = read_shipped(file)
            .replace(SHIPPED_BATON, "/bin/true")
            .replace(SHIPPED_APP, "/bin/true");
        fs::write(dir.join(file), text).expect("write unit");
    }
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(dir.join(HELLO_SOCKET))
        .arg(dir.join(HELLO_SERVICE))
        .arg(dir.join(TEMPLATE_INSTANCE))
        .output()
        .expect("run systemd-analyze");
    let _ = fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        out.status
    );
}

/// (a) Socket activation: a connection to the socket starts the service; the unit is
/// `activating` until the app is READY and only then `active`, and the request that
/// triggered the start is served.
#[test]
fn socket_activated_start_waits_for_ready() {
    let _serial = serial();
    let Some(tools) = tools("socket_activated_start_waits_for_ready") else {
        return;
    };
    let delay = format!("{}ms", READY_DELAY.as_millis());
    let mut fx = Fixture::new(
        "activation",
        tools,
        Layout::SocketUnit,
        &["--ready-delay", &delay],
    );
    fx.boot();
    fx.ctl_ok(&["start", HELLO_SOCKET]);
    let state = fx.prop("ActiveState");
    fx.check(state == "inactive", || {
        format!("service is {state} before any connection")
    });

    let addr = fx.addr();
    let client = thread::spawn(move || http_get(addr, "/", LONG));

    // Record every ActiveState seen until the unit is active.
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + LONG;
    loop {
        let s = fx.prop("ActiveState");
        if seen.last() != Some(&s) {
            seen.push(s.clone());
        }
        if s == "active" || s == "failed" || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    fx.check(seen.last().map(String::as_str) == Some("active"), || {
        format!("ActiveState went {seen:?}, never active")
    });
    let activating = seen.iter().position(|s| s == "activating");
    fx.check(activating.is_some_and(|i| i + 1 < seen.len()), || {
        format!("ActiveState went {seen:?}: expected activating before active")
    });

    // systemd's own timestamps: active no earlier than the app's READY.
    let ts = fx.show(
        HELLO_SERVICE,
        &[
            "InactiveExitTimestampMonotonic",
            "ActiveEnterTimestampMonotonic",
        ],
    );
    let usec = |k: &str| ts.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let took = Duration::from_micros(
        usec("ActiveEnterTimestampMonotonic")
            .saturating_sub(usec("InactiveExitTimestampMonotonic")),
    );
    fx.check(took >= READY_DELAY, || {
        format!(
            "unit became active {took:?} after starting, before the app's READY ({READY_DELAY:?})"
        )
    });

    let resp = client.join().expect("client thread");
    let resp = resp.unwrap_or_else(|e| fx.fail(&format!("the activating request failed: {e}")));
    fx.check(resp.status == 200, || {
        format!("activating request: {resp:?}")
    });

    let st = fx.status();
    let main_pid = fx.main_pid();
    fx.check(st.supervisor_pid == main_pid, || {
        format!("MainPID {main_pid} is not baton ({})", st.supervisor_pid)
    });
    fx.check(
        st.generation == 1 && st.pid.is_some() && resp.pid() == st.pid,
        || format!("response {resp:?} not from the first generation: {st:?}"),
    );
    let http = st.listeners.iter().find(|l| l.name == "http");
    fx.check(
        http.is_some_and(|l| l.inherited && l.addr == addr.to_string()),
        || format!("listener http should be inherited from {HELLO_SOCKET} at {addr}: {st:?}"),
    );
    let text = fx.prop("StatusText");
    fx.check(mentions(&text, "generation", 1), || {
        format!("StatusText {text:?} does not name generation 1")
    });

    // baton's log is plain text when not on a tty, and says which generation is which.
    let log = fx.unit_log();
    fx.check(!log.contains('\u{1b}'), || {
        "ANSI escapes in the unit's output".to_owned()
    });
    fx.check(log.contains("generation"), || {
        "no generation field in baton's log".to_owned()
    });
}

/// (b) Five `systemctl reload`s under continuous load: each succeeds, baton's PID stays,
/// the app's changes, StatusText follows, and not one request fails.
#[test]
fn reload_under_load_keeps_main_pid_and_serves_every_request() {
    let _serial = serial();
    let Some(tools) = tools("reload_under_load_keeps_main_pid_and_serves_every_request") else {
        return;
    };
    let mut fx = Fixture::new("reload", tools, Layout::SocketUnit, &[]);
    fx.boot();
    fx.ctl_ok(&["start", HELLO_SERVICE]);
    let main_pid = fx.main_pid();
    let first = fx.status();
    let mut gen = first.generation;
    let mut pid = first.pid.unwrap_or_else(|| fx.fail("no active pid"));
    let mut pids = vec![pid];
    // The shipped unit delegates its cgroup: each generation gets one of its own.
    fx.check(first.containment == "cgroup", || {
        format!("containment under Delegate=yes: {:?}", first.containment)
    });

    let load = Load::start(&fx, fx.addr());
    for i in 1..=5 {
        let ok_before = load.handle().snapshot().ok;
        let started = Instant::now();
        fx.ctl_ok(&["reload", HELLO_SERVICE]);
        let took = started.elapsed();
        let ok_during = load.handle().snapshot().ok - ok_before;
        fx.check(ok_during > 0, || {
            format!("reload {i}: no request completed while it ran ({took:?}): not under load")
        });
        let m = fx.main_pid();
        fx.check(m == main_pid, || {
            format!("reload {i}: MainPID {main_pid} -> {m}")
        });
        let state = fx.show(HELLO_SERVICE, &["ActiveState", "SubState"]);
        fx.check(
            state.get("ActiveState").map(String::as_str) == Some("active")
                && state.get("SubState").map(String::as_str) == Some("running"),
            || format!("reload {i}: unit is {state:?}"),
        );
        let st = fx.status();
        let new_pid = st.pid.unwrap_or(0);
        fx.check(
            st.generation > gen && new_pid != 0 && new_pid != pid,
            || format!("reload {i} (took {took:?}) did not promote a new generation: {st:?}"),
        );
        let promoted = st
            .last_upgrade
            .as_ref()
            .is_some_and(|u| u.result == UpgradeResult::Promoted && u.generation == st.generation);
        fx.check(promoted, || {
            format!("reload {i}: last_upgrade {:?}", st.last_upgrade)
        });
        gen = st.generation;
        pid = new_pid;
        pids.push(pid);
        // baton sends STATUS= before answering `upgrade --wait`; allow systemd a moment
        // to have processed the datagram.
        fx.wait_prop("StatusText", SHORT, |t| {
            mentions(t, "generation", gen) && mentions(t, "pid", u64::from(pid))
        });
        load.progress(&fx, 20);
    }
    let report = load.stop();
    eprintln!("{report}");
    fx.check(report.failed == 0, || {
        format!("requests failed during reloads:\n{report}")
    });
    fx.check(report.pids.contains(&pid), || {
        format!("the last generation (pid {pid}) served nothing:\n{report}")
    });
    let restarts = fx.prop_u64("NRestarts");
    fx.check(restarts == 0, || format!("NRestarts={restarts}"));
    // Every replaced generation drains and exits (no load holds them any more).
    let deadline = Instant::now() + LONG;
    loop {
        let st = fx.status();
        if st.generations.len() == 1 {
            break;
        }
        if Instant::now() >= deadline {
            fx.fail(&format!("old generations never exited: {st:?}"));
        }
        thread::sleep(Duration::from_millis(50));
    }
    for old in &pids[..pids.len() - 1] {
        fx.check(!fx.pid_alive(*old), || {
            format!("old app pid {old} still runs")
        });
    }
}

/// (c) A reload to a binary that cannot start fails `systemctl reload`, and changes
/// nothing for clients: the unit stays active, the old generation keeps serving.
#[test]
fn reload_to_broken_binary_fails_and_keeps_serving() {
    let _serial = serial();
    let Some(tools) = tools("reload_to_broken_binary_fails_and_keeps_serving") else {
        return;
    };
    let mut fx = Fixture::new("rollback", tools, Layout::SocketUnit, &[]);
    fx.boot();
    fx.ctl_ok(&["start", HELLO_SERVICE]);
    let main_pid = fx.main_pid();
    let before = fx.status();
    let load = Load::start(&fx, fx.addr());

    fx.write_broken_app();
    let out = fx.sb().ctl(&["reload", HELLO_SERVICE]);
    fx.check(!out.status.success(), || {
        "systemctl reload succeeded although the new binary exits at once".to_owned()
    });
    let state = fx.show(HELLO_SERVICE, &["ActiveState", "SubState", "MainPID"]);
    fx.check(
        state.get("ActiveState").map(String::as_str) == Some("active")
            && state.get("SubState").map(String::as_str) == Some("running")
            && state.get("MainPID") == Some(&main_pid.to_string()),
        || format!("after the failed reload the unit is {state:?} (MainPID was {main_pid})"),
    );
    let st = fx.status();
    fx.check(
        st.generation == before.generation && st.pid == before.pid,
        || format!("the old generation is no longer active: before {before:?}, now {st:?}"),
    );
    let rolled_back = st
        .last_upgrade
        .as_ref()
        .is_some_and(|u| u.result == UpgradeResult::RolledBack);
    fx.check(rolled_back, || {
        format!("last_upgrade {:?}", st.last_upgrade)
    });
    fx.wait_prop("StatusText", SHORT, |t| t.contains("rolled back"));
    load.progress(&fx, 50);
    let snap = load.handle().snapshot();
    let old_pid = before.pid.unwrap_or(0);
    fx.check(snap.pids.contains(&old_pid), || {
        format!("the old generation (pid {old_pid}) did not serve: {snap:?}")
    });

    // Fixed binary: the next reload goes through.
    fx.write_wrapper(&[]);
    fx.ctl_ok(&["reload", HELLO_SERVICE]);
    let after = fx.status();
    fx.check(after.pid.is_some() && after.pid != before.pid, || {
        format!("reload after the fix did not promote: {after:?}")
    });
    load.progress(&fx, 20);
    let report = load.stop();
    eprintln!("{report}");
    fx.check(report.failed == 0, || format!("requests failed:\n{report}"));
}

/// (d) `kill -9` of baton with the socket bound by baton itself (template unit, port 0):
/// only the fd store can keep the listener. Connections made while baton is down are
/// served after the restart, on the same port.
#[test]
fn crash_restart_keeps_listener_via_fd_store() {
    let _serial = serial();
    let Some(tools) = tools("crash_restart_keeps_listener_via_fd_store") else {
        return;
    };
    let fx = Fixture::new("fdstore", tools, Layout::Template, &[]);
    crash_restart(fx, Layout::Template);
}

/// (d, socket unit) The same crash with hello-http.socket: after the restart systemd
/// passes the socket unit's fd *and* the fd store's copy of it, both named `http`.
#[test]
fn crash_restart_with_socket_unit() {
    let _serial = serial();
    let Some(tools) = tools("crash_restart_with_socket_unit") else {
        return;
    };
    let fx = Fixture::new("crashsock", tools, Layout::SocketUnit, &[]);
    crash_restart(fx, Layout::SocketUnit);
}

fn crash_restart(mut fx: Fixture, layout: Layout) {
    fx.boot();
    fx.ctl_ok(&["start", fx.unit]);
    let addr = fx.addr();
    let before = fx.status();
    let old_main = fx.main_pid();
    let old_app = before.pid.unwrap_or_else(|| fx.fail("no active pid"));
    // baton parks the listeners it bound itself in systemd's fd store; one that came
    // from the socket unit is held by systemd already.
    let stored = match layout {
        Layout::Template => "1",
        Layout::SocketUnit => "0",
    };
    fx.wait_prop("NFileDescriptorStore", SHORT, |v| v == stored);
    let resp = http_get(addr, "/", SHORT)
        .unwrap_or_else(|e| fx.fail(&format!("request before the crash: {e}")));
    fx.check(resp.status == 200, || format!("before the crash: {resp:?}"));

    let kill = fx.sb().exec(&["kill", "-9", &old_main.to_string()]);
    fx.check(kill.status.success(), || {
        format!("kill -9 {old_main}: {kill:?}")
    });
    // Restart=on-failure, RestartSec=1s: systemd sits in auto-restart with no baton.
    fx.wait_prop("SubState", SHORT, |s| s == "auto-restart");

    // Connect during the gap: the listening socket is still open in systemd, so the
    // kernel completes the handshake and queues the connection.
    let mut gap_clients = Vec::new();
    for _ in 0..8 {
        let mut s = connect(addr, SHORT)
            .unwrap_or_else(|e| fx.fail(&format!("connect while baton was down: {e}")));
        send_get(&mut s, "/", true)
            .unwrap_or_else(|e| fx.fail(&format!("send while baton was down: {e}")));
        gap_clients.push(s);
    }
    let state = fx.prop("ActiveState");
    fx.check(state != "active", || {
        "baton was back before the gap clients connected: the test proved nothing".to_owned()
    });

    fx.wait_prop("ActiveState", LONG, |s| s == "active");
    let new_main = fx.main_pid();
    fx.check(new_main != old_main, || format!("MainPID still {old_main}"));
    let restarts = fx.prop_u64("NRestarts");
    fx.check(restarts == 1, || format!("NRestarts={restarts}"));
    let after = fx.status();
    let new_app = after.pid.unwrap_or(0);
    for (i, mut s) in gap_clients.into_iter().enumerate() {
        let resp = read_response(&mut s).unwrap_or_else(|e| {
            fx.fail(&format!(
                "gap client {i}: connected while baton was down, then: {e}"
            ))
        });
        fx.check(resp.status == 200 && resp.pid() == Some(new_app), || {
            format!("gap client {i}: {resp:?}, expected 200 from the new app pid {new_app}")
        });
    }
    let http = after.listeners.iter().find(|l| l.name == "http");
    fx.check(
        after.listeners.len() == before.listeners.len()
            && http.is_some_and(|l| l.inherited && l.addr == addr.to_string()),
        || format!("after the restart the listener is not the inherited {addr}: {after:?}"),
    );
    let now = fx.prop("NFileDescriptorStore");
    fx.check(now == stored, || {
        format!("NFileDescriptorStore={now} after the restart, {stored} before")
    });
    fx.check(!fx.pid_alive(old_app), || {
        format!("old app pid {old_app} survived")
    });
    let resp = http_get(addr, "/", SHORT)
        .unwrap_or_else(|e| fx.fail(&format!("request after the restart: {e}")));
    fx.check(resp.status == 200, || {
        format!("after the restart: {resp:?}")
    });
}

/// (e) `systemctl stop` lets an in-flight request finish, and the unit ends `inactive`
/// (not `failed`) with no process left.
#[test]
fn stop_drains_in_flight_request() {
    let _serial = serial();
    let Some(tools) = tools("stop_drains_in_flight_request") else {
        return;
    };
    let mut fx = Fixture::new("stop", tools, Layout::SocketUnit, &[]);
    fx.boot();
    fx.ctl_ok(&["start", HELLO_SERVICE]);
    let main_pid = fx.main_pid();
    let app_pid = fx.status().pid.unwrap_or_else(|| fx.fail("no active pid"));
    let addr = fx.addr();

    // A first request proves the connection is accepted and being served, so the slow
    // request below is read by the app as soon as it is sent: it is in flight when the
    // stop begins.
    let mut conn = connect(addr, LONG).unwrap_or_else(|e| fx.fail(&format!("connect: {e}")));
    send_get(&mut conn, "/", false).unwrap_or_else(|e| fx.fail(&format!("send: {e}")));
    let warm = read_response(&mut conn).unwrap_or_else(|e| fx.fail(&format!("warm-up: {e}")));
    fx.check(warm.status == 200, || format!("warm-up: {warm:?}"));
    let slow = Duration::from_secs(3);
    send_get(&mut conn, &format!("/sleep?ms={}", slow.as_millis()), true)
        .unwrap_or_else(|e| fx.fail(&format!("send slow request: {e}")));
    let sent = Instant::now();

    let sandbox_script = fx.tools.sandbox.clone();
    let name = fx.sb().name.clone();
    let stopper = thread::spawn(move || {
        let out = Command::new(sandbox_script)
            .args(["ctl", &name, "stop", HELLO_SERVICE])
            .output();
        (out, Instant::now())
    });
    let resp = read_response(&mut conn);
    let answered = Instant::now();
    let (out, stopped) = stopper.join().expect("stopper thread");
    let out = out.expect("run systemctl stop");

    let resp = resp.unwrap_or_else(|e| fx.fail(&format!("the in-flight request failed: {e}")));
    fx.check(resp.status == 200 && resp.pid() == Some(app_pid), || {
        format!("in-flight request: {resp:?}")
    });
    fx.check(answered.duration_since(sent) >= slow, || {
        "the slow request was answered early: the test's premise is wrong".to_owned()
    });
    fx.check(out.status.success(), || format!("systemctl stop: {out:?}"));
    fx.check(answered <= stopped, || {
        "systemctl stop returned before the in-flight request was answered".to_owned()
    });
    let state = fx.show(HELLO_SERVICE, &["ActiveState", "Result", "ExecMainStatus"]);
    fx.check(
        state.get("ActiveState").map(String::as_str) == Some("inactive")
            && state.get("Result").map(String::as_str) == Some("success")
            && state.get("ExecMainStatus").map(String::as_str) == Some("0"),
        || format!("after stop: {state:?}"),
    );
    let procs = fx.processes();
    let left: Vec<_> = procs
        .iter()
        .filter(|(p, c)| *p == main_pid || *p == app_pid || c == "baton" || c == "hello-http")
        .collect();
    fx.check(left.is_empty(), || {
        format!("processes left after stop: {left:?}")
    });
}

/// baton pings the watchdog when the unit sets WatchdogSec= (here shortened to 1 s so the
/// test sees several pings): systemd records each one and never kills baton.
#[test]
fn watchdog_is_pinged() {
    let _serial = serial();
    let Some(tools) = tools("watchdog_is_pinged") else {
        return;
    };
    let mut fx = Fixture::new("watchdog", tools, Layout::SocketUnit, &[]);
    // Sorts after the main drop-in (50-test.conf), so it wins.
    fx.drop_in_named(
        HELLO_SERVICE,
        "60-watchdog.conf",
        "[Service]\nWatchdogSec=1s\n",
    );
    fx.boot();
    fx.ctl_ok(&["start", HELLO_SERVICE]);
    let main_pid = fx.main_pid();
    let mut last = fx.prop_u64("WatchdogTimestampMonotonic");
    for ping in 1..=3 {
        let v = fx.wait_prop("WatchdogTimestampMonotonic", SHORT, |v| {
            v.parse::<u64>().is_ok_and(|t| t > last)
        });
        last = v.parse().unwrap_or(last);
        let m = fx.main_pid();
        fx.check(m == main_pid, || {
            format!("watchdog ping {ping}: MainPID {main_pid} -> {m}")
        });
    }
    let restarts = fx.prop_u64("NRestarts");
    fx.check(restarts == 0, || format!("NRestarts={restarts}"));
}

/// The fire-and-forget alternative documented in the units, `ExecReload=/bin/kill -HUP
/// $MAINPID`: `systemctl reload` returns at once, baton upgrades on SIGHUP and reports
/// the outcome through StatusText.
#[test]
fn reload_by_sighup_alternative() {
    let _serial = serial();
    let Some(tools) = tools("reload_by_sighup_alternative") else {
        return;
    };
    let mut fx = Fixture::new("sighup", tools, Layout::SocketUnit, &[]);
    let alternative = "ExecReload=/bin/kill -HUP $MAINPID";
    fx.check(read_shipped(HELLO_SERVICE).contains(alternative), || {
        format!("{HELLO_SERVICE} no longer documents {alternative}")
    });
    fx.drop_in_named(
        HELLO_SERVICE,
        "60-sighup.conf",
        &format!("[Service]\nExecReload=\n{alternative}\n"),
    );
    fx.boot();
    fx.ctl_ok(&["start", HELLO_SERVICE]);
    let main_pid = fx.main_pid();
    let before = fx.status();
    let load = Load::start(&fx, fx.addr());
    for i in 1..=2u64 {
        fx.ctl_ok(&["reload", HELLO_SERVICE]);
        let gen = before.generation + i;
        let text = fx.wait_prop("StatusText", LONG, |t| {
            mentions(t, "generation", gen) && t.contains("promoted")
        });
        let st = fx.status();
        fx.check(st.generation == gen, || format!("after {text:?}: {st:?}"));
        fx.wait_prop("ActiveState", SHORT, |s| s == "active");
        let m = fx.main_pid();
        fx.check(m == main_pid, || {
            format!("SIGHUP {i}: MainPID {main_pid} -> {m}")
        });
        load.progress(&fx, 20);
    }
    let report = load.stop();
    eprintln!("{report}");
    fx.check(report.failed == 0, || format!("requests failed:\n{report}"));
}
