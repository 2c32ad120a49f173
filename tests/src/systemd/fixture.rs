//! The shipped units plus drop-ins in a per-test directory, and a sandbox running them.

use crate::harness;
use baton_protocol::Status;
use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use super::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Layout {
    /// hello-http.socket + hello-http.service: systemd owns the listening socket.
    SocketUnit,
    /// baton@hello.service from the template, no socket unit: baton binds the listener
    /// itself (port 0), so only the fd store can keep it across a crash.
    Template,
    /// baton@hello-http.service from the template the installed baton package put in
    /// /lib/systemd/system, running the installed /usr/bin/baton on hello-http.
    Packaged,
}

/// The instance of [`Layout::Packaged`].
pub const PACKAGED_INSTANCE: &str = "baton@hello-http.service";
/// Where the installed package puts the template.
pub const PACKAGED_TEMPLATE: &str = "/lib/systemd/system/baton@.service";

pub struct Fixture {
    pub test: &'static str,
    pub dir: PathBuf,
    pub wrapper: PathBuf,
    pub log: PathBuf,
    pub unit: &'static str,
    /// The control socket inside the sandbox (its /run is private).
    pub control: String,
    /// Known up front for the socket layout; for the template, read from status.
    pub port: Option<u16>,
    pub tools: Tools,
    /// Taken down first when the fixture drops.
    pub sandbox: Option<Sandbox>,
}

impl Fixture {
    /// Writes the unit dir for `layout`; `app_args` go to hello-http via the wrapper.
    pub fn new(test: &'static str, mut tools: Tools, layout: Layout, app_args: &[&str]) -> Fixture {
        // Not under /tmp or /var/tmp: the shipped hello-http.service has PrivateTmp=yes,
        // so it would not see the wrapper script or the binaries there. A checkout under
        // /tmp has its target dir there too: then use /var/lib, and copy the binaries
        // next to the wrapper either way.
        // `<target>/tmp`, cargo's CARGO_TARGET_TMPDIR (only set for integration tests).
        let profile_dir = harness::target_dir().expect("the target dir");
        let base = profile_dir.parent().unwrap_or(&profile_dir).join("tmp");
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
        if layout == Layout::Packaged {
            tools.baton = PathBuf::from("/usr/bin/baton");
        }
        for bin in [&mut tools.baton, &mut tools.hello]
            .into_iter()
            .filter(|b| !b.starts_with("/usr/bin"))
        {
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
            Layout::Packaged => {
                let template = fs::read_to_string(PACKAGED_TEMPLATE).unwrap_or_else(|e| {
                    panic!("{PACKAGED_TEMPLATE}: {e} (is the package installed?)")
                });
                fx.install(TEMPLATE, &template);
                let port = free_port();
                fx.drop_in(
                    PACKAGED_INSTANCE,
                    &format!(
                        "[Service]\nEnvironmentFile=\nEnvironment=BATON_APP={wrapper_s}\n\
                         Environment=\"BATON_OPTS=--listen http=127.0.0.1:{port}\"\n{logging}"
                    ),
                );
                fx.control = "/run/baton-hello-http/baton.sock".into();
                fx.unit = PACKAGED_INSTANCE;
                fx.port = Some(port);
            }
        }
        fx
    }

    pub fn units(&self) -> PathBuf {
        self.dir.join("units")
    }

    pub fn install(&self, name: &str, text: &str) {
        fs::write(self.units().join(name), text).expect("write unit");
    }

    pub fn drop_in(&self, unit: &str, text: &str) {
        self.drop_in_named(unit, "50-test.conf", text);
    }

    pub fn drop_in_named(&self, unit: &str, file: &str, text: &str) {
        let d = self.units().join(format!("{unit}.d"));
        fs::create_dir_all(&d).expect("mkdir drop-in dir");
        fs::write(d.join(file), text).expect("write drop-in");
    }

    /// Replaces the app the unit runs, atomically (a half-written script must never be
    /// exec'd; baton resolves the program again at every spawn).
    pub fn write_app_script(&self, body: &str) {
        let tmp = self.wrapper.with_extension("tmp");
        fs::write(
            &tmp,
            format!("#!/bin/sh\n# written by tests/tests/systemd.rs\n{body}\n"),
        )
        .expect("write wrapper");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
        fs::rename(&tmp, &self.wrapper).expect("rename wrapper");
    }

    pub fn write_wrapper(&self, app_args: &[&str]) {
        let mut line = format!("exec '{}'", self.tools.hello.display());
        for a in app_args {
            line.push_str(&format!(" '{a}'"));
        }
        line.push_str(" \"$@\"");
        self.write_app_script(&line);
    }

    pub fn write_broken_app(&self) {
        self.write_app_script("echo 'hello-http: broken build, exiting' >&2\nexit 3");
    }

    pub fn boot(&mut self) {
        let name = format!("baton-{}-{}", self.test, std::process::id());
        self.sandbox = Some(Sandbox::up(&self.tools.sandbox, &name, &self.units()));
    }

    pub fn sb(&self) -> &Sandbox {
        self.sandbox.as_ref().expect("sandbox is up")
    }

    /// `systemctl ARGS`, which must succeed.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
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

    pub fn show(&self, unit: &str, props: &[&str]) -> HashMap<String, String> {
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

    pub fn prop(&self, prop: &str) -> String {
        self.show(self.unit, &[prop])
            .remove(prop)
            .unwrap_or_default()
    }

    pub fn prop_u64(&self, prop: &str) -> u64 {
        let v = self.prop(prop);
        v.parse()
            .unwrap_or_else(|_| self.fail(&format!("{prop}={v:?} is not a number")))
    }

    /// Polls `prop` until `pred` holds; returns the value that satisfied it.
    pub fn wait_prop(&self, prop: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
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

    pub fn main_pid(&self) -> u32 {
        self.prop_u64("MainPID") as u32
    }

    pub fn status(&self) -> Status {
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
    pub fn addr(&self) -> SocketAddr {
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

    /// Fails unless `after` (status after a restart) has as many listeners as `before`,
    /// and `http` is the inherited `addr`: the fd store (or socket unit) gave it back.
    pub fn check_listener_inherited(&self, before: &Status, after: &Status, addr: SocketAddr) {
        let http = after.listeners.iter().find(|l| l.name == "http");
        self.check(
            after.listeners.len() == before.listeners.len()
                && http.is_some_and(|l| l.inherited && l.addr == addr.to_string()),
            || format!("after the restart the listener is not the inherited {addr}: {after:?}"),
        );
    }

    /// The commands running in the sandbox (`pid comm`), systemd and this query aside.
    pub fn processes(&self) -> Vec<(u32, String)> {
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

    pub fn pid_alive(&self, pid: u32) -> bool {
        self.processes().iter().any(|(p, _)| *p == pid)
    }

    pub fn unit_log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with everything needed to understand a failure: the unit's state, its
    /// output (baton's and the app's logs) and systemd's console.
    pub fn fail(&self, what: &str) -> ! {
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

    pub fn check(&self, cond: bool, what: impl FnOnce() -> String) {
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

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = lines[start..].join("\n");
    out.push('\n');
    out
}

/// Does `text` mention `word` followed by exactly `n` (not `n` as a prefix of more digits)?
pub fn mentions(text: &str, word: &str, n: u64) -> bool {
    let pat = format!("{word} {n}");
    text.match_indices(&pat).any(|(i, _)| {
        !text[i + pat.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}
