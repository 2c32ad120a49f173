//! A real systemd as PID 1 of private namespaces (`shared/systemd-sandbox/sandbox`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A running sandboxed systemd; `sandbox down` on drop, whatever happened.
pub struct Sandbox {
    pub script: PathBuf,
    pub name: String,
}

impl Sandbox {
    pub fn up(script: &Path, name: &str, units: &Path) -> Sandbox {
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
    pub fn repair_recorded_pid(&self) -> bool {
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

    pub fn run(&self, verb: &str, args: &[&str]) -> Output {
        Command::new(&self.script)
            .args([verb, self.name.as_str()])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run sandbox {verb}: {e}"))
    }

    /// `systemctl ARGS` inside.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.run("ctl", args)
    }

    /// Any command inside the sandbox's namespaces.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.run("exec", args)
    }

    pub fn console_log(&self) -> String {
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
