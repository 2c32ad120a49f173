//! Issue 11: baton and apps as Debian packages, upgraded in service.
//!
//! - Upgrading the baton package re-executes the running `baton@` instance (a real
//!   systemd in the sandbox): MainPID, the app's pid and every connection stay.
//! - The hello-http example packages (`examples/packaging`) upgrade the live service
//!   from their postinst through baton's releases; a broken one fails dpkg while the
//!   previous version keeps serving.
//!
//! Packages are installed for real and purged afterwards (see `baton_tests::packaging`);
//! dpkg runs inside the sandbox when the postinst must see its systemd and its /run.

use std::fs;
use std::sync::PoisonError;

use baton_tests::harness::TestDir;
use baton_tests::http::http_get;
use baton_tests::packaging::{Installed, baton_deb, hello_debs, installed, unavailable};
use baton_tests::systemd::{
    Fixture, LONG, Layout, Load, PACKAGED_INSTANCE, SERIAL, SHORT, Tools, tools,
};

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn ready(test: &str) -> Option<Tools> {
    let tools = tools(test)?;
    if let Some(why) = unavailable() {
        eprintln!("SKIP packaging::{test}: {why}");
        return None;
    }
    Some(tools)
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn label(fx: &Fixture) -> (String, Option<u32>) {
    let r = http_get(fx.addr(), "/", SHORT).unwrap_or_else(|e| fx.fail(&format!("GET /: {e}")));
    let label = r
        .body
        .split_whitespace()
        .find_map(|w| w.strip_prefix("label="))
        .unwrap_or_default()
        .to_owned();
    (label, r.pid())
}

#[test]
fn upgrading_the_baton_package_reexecs_the_running_baton() {
    let _serial = serial();
    let Some(tools) = ready("baton_package_upgrade") else {
        return;
    };
    let debs = TestDir::new("pkg-baton").unwrap();
    let old = baton_deb("0.1.0-t1", debs.path());
    let new = baton_deb("0.1.0-t2", debs.path());
    // The package carries the generated man pages, baton-config(5) among them.
    let listing = std::process::Command::new("dpkg-deb")
        .arg("-c")
        .arg(&new)
        .output()
        .expect("dpkg-deb");
    let listing = text(&listing);
    for page in [
        "usr/share/man/man1/baton-run.1.gz",
        "usr/share/man/man5/baton-config.5.gz",
    ] {
        assert!(
            listing.contains(page),
            "{page} not in the package: {listing}"
        );
    }
    let mut pkgs = Installed::default();
    pkgs.install("baton", &old);
    let mut fx = Fixture::new("pkg-reexec", tools, Layout::Packaged, &[]);
    fx.boot();
    fx.ctl_ok(&["start", PACKAGED_INSTANCE]);
    fx.wait_prop("ActiveState", LONG, |v| v == "active");
    let main = fx.main_pid();
    let app = fx
        .status()
        .pid
        .unwrap_or_else(|| fx.fail("no active generation"));
    let load = Load::start(&fx, fx.addr());

    // dpkg in the sandbox, so that the postinst finds its systemd and the unit.
    let out = fx.sb().exec(&["dpkg", "-i", new.to_str().unwrap()]);
    let said = text(&out);
    fx.check(out.status.success(), || format!("dpkg -i: {said}"));
    fx.check(
        said.contains("re-executing baton@hello-http.service"),
        || said.clone(),
    );
    fx.check(said.contains("re-executed in"), || said.clone());
    load.progress(&fx, 500);
    let report = load.stop();
    println!("{report}");
    fx.check(report.failed == 0, || format!("{report}"));
    fx.check(report.keepalive_reconnects.iter().all(|n| *n == 0), || {
        format!("keep-alive clients reconnected: {report}")
    });

    assert_eq!(installed("baton").as_deref(), Some("0.1.0-t2"));
    fx.check(fx.main_pid() == main, || "MainPID changed".into());
    let st = fx.status();
    fx.check(st.pid == Some(app), || format!("the app changed: {st:?}"));
    fx.check(
        st.supervisor.as_ref().is_some_and(|s| s.reexecs == 1),
        || format!("{:?}", st.supervisor),
    );
    // MainPID runs the new file (the old one was unlinked by the upgrade).
    let exe = fx.sb().exec(&["readlink", &format!("/proc/{main}/exe")]);
    let exe = String::from_utf8_lossy(&exe.stdout).trim().to_owned();
    fx.check(exe == "/usr/bin/baton", || format!("MainPID runs {exe:?}"));
    // And it goes on upgrading the app as before.
    fx.ctl_ok(&["reload", PACKAGED_INSTANCE]);
    fx.check(fx.status().pid != Some(app), || {
        "reload did not upgrade".into()
    });
    fx.ctl_ok(&["stop", PACKAGED_INSTANCE]);
}

#[test]
fn hello_http_packages_upgrade_in_service_and_a_broken_one_fails_dpkg() {
    let _serial = serial();
    let Some(tools) = ready("app_packages") else {
        return;
    };
    let out = TestDir::new("pkg-app").unwrap();
    let baton = baton_deb("0.1.0-1", out.path());
    let apps = hello_debs(out.path());
    let mut pkgs = Installed::default();
    pkgs.install("baton", &baton);
    // Not running yet: the postinst adds release 1 to the store, permanent.
    pkgs.install("hello-http", &apps[0]);
    let mut fx = Fixture::new("pkg-app", tools, Layout::Packaged, &[]);
    // The instance as the package's env file configures it, on a free port.
    let env = fs::read_to_string("/etc/baton/hello-http.env").unwrap();
    let port = fx.port.unwrap_or_else(|| fx.fail("no port"));
    let mut dropin = String::from("[Service]\n");
    for line in env.lines().filter(|l| l.starts_with("BATON_")) {
        let line = line.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
        dropin.push_str(&format!("Environment=\"{line}\"\n"));
    }
    fx.drop_in_named(PACKAGED_INSTANCE, "60-hello-http-env.conf", &dropin);
    fx.boot();
    fx.ctl_ok(&["start", PACKAGED_INSTANCE]);
    fx.wait_prop("ActiveState", LONG, |v| v == "active");
    let (l, _) = label(&fx);
    fx.check(l == "v1", || format!("serving {l:?}"));

    let load = Load::start(&fx, fx.addr());
    let o = fx.sb().exec(&["dpkg", "-i", apps[1].to_str().unwrap()]);
    let said = text(&o);
    fx.check(o.status.success(), || {
        format!("dpkg -i hello-http 2: {said}")
    });
    fx.check(said.contains("installing 2 in service"), || said.clone());
    let (l, v2_pid) = label(&fx);
    fx.check(l == "v2", || format!("serving {l:?} after v2: {said}"));
    load.progress(&fx, 300);

    // Release 3 exits before it is ready: rolled back, dpkg fails, v2 serves on.
    let o = fx.sb().exec(&["dpkg", "-i", apps[2].to_str().unwrap()]);
    let said = text(&o);
    fx.check(!o.status.success(), || {
        format!("dpkg -i hello-http 3 succeeded: {said}")
    });
    fx.check(
        said.contains("3 failed; the previous version keeps serving"),
        || said.clone(),
    );
    load.progress(&fx, 300);
    let report = load.stop();
    println!("{report}");
    fx.check(report.failed == 0, || format!("{report}"));
    let (l, pid) = label(&fx);
    fx.check(l == "v2" && pid == v2_pid, || {
        format!("serving {l:?} from {pid:?}")
    });
    let status = std::process::Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", "hello-http"])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    fx.check(status.contains("half-configured"), || status.clone());
    fx.ctl_ok(&["stop", PACKAGED_INSTANCE]);
}
