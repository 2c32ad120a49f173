//! Issue 2, test 4: a generation gets exactly stdio, the listeners (at 3.., in --listen
//! order) and the control fd, with the systemd-style environment describing them.
//!
//! The child is `sleep`: it opens nothing of its own, so whatever is in its fd table came
//! from baton.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::Duration;

use baton_tests::harness::{
    Baton, TestDir, UpgradeOutcome, exclusive, make_inheritable, proc_environ, proc_fd_flags,
    proc_fds, which,
};

const O_NONBLOCK: u32 = 0o4000;

fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Inodes of listening TCP sockets (IPv4 and IPv6) in this network namespace.
fn tcp_listen_inodes() -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // st == 0A is TCP_LISTEN; field 9 is the inode.
            if f.len() > 9 && f[3] == "0A" {
                if let Ok(inode) = f[9].parse() {
                    out.insert(inode);
                }
            }
        }
    }
    out
}

/// Unix sockets: inode -> (listening, path).
fn unix_sockets() -> Vec<(u64, bool, String)> {
    let text = fs::read_to_string("/proc/net/unix").unwrap();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 7 {
                return None;
            }
            // Flags 0x10000 is __SO_ACCEPTCON: a listening socket.
            let flags = u32::from_str_radix(f[3], 16).ok()?;
            let inode = f[6].parse().ok()?;
            Some((
                inode,
                flags & 0x10000 != 0,
                f.get(7).unwrap_or(&"").to_string(),
            ))
        })
        .collect()
}

fn sleep_program() -> String {
    which("sleep")
        .expect("`sleep` not found in PATH")
        .to_string_lossy()
        .into_owned()
}

/// Checks one generation's fds and environment.
fn audit(baton_pid: u32, pid: u32, generation: u64, unix_path: &Path) {
    let fds = proc_fds(pid).unwrap();
    let numbers: Vec<i32> = fds.keys().copied().collect();
    assert_eq!(
        numbers,
        vec![0, 1, 2, 3, 4, 5],
        "generation {generation} (pid {pid}) fd table: {fds:#?}"
    );
    let inode = |fd: i32| {
        socket_inode(&fds[&fd])
            .unwrap_or_else(|| panic!("fd {fd} of pid {pid} is not a socket: {}", fds[&fd]))
    };
    let (http, ctl, control) = (inode(3), inode(4), inode(5));

    // fd 3 is the TCP listener (first --listen), fd 4 the Unix one, fd 5 a connected socket.
    assert!(
        tcp_listen_inodes().contains(&http),
        "fd 3 is not a listening TCP socket"
    );
    let unix = unix_sockets();
    let find = |i: u64| unix.iter().find(|(inode, _, _)| *inode == i);
    let (_, listening, path) = find(ctl).expect("fd 4 is not a Unix socket");
    assert!(*listening, "fd 4 is not listening");
    assert_eq!(Path::new(path), unix_path);
    let (_, listening, _) = find(control).expect("fd 5 (control) is not a Unix socket");
    assert!(
        !*listening,
        "the control fd must be a connected socket, not a listener"
    );

    // The listeners are baton's own sockets (one open file description), O_NONBLOCK set
    // once by baton; the control socket is this generation's private end of a pair.
    let baton_inodes: BTreeSet<u64> = proc_fds(baton_pid)
        .unwrap()
        .values()
        .filter_map(|l| socket_inode(l))
        .collect();
    assert!(baton_inodes.contains(&http) && baton_inodes.contains(&ctl));
    assert!(
        !baton_inodes.contains(&control),
        "baton holds the child's end of the control pair"
    );
    for fd in [3, 4] {
        let flags = proc_fd_flags(pid, fd).unwrap();
        assert_ne!(
            flags & O_NONBLOCK,
            0,
            "listener fd {fd} is not O_NONBLOCK: {flags:o}"
        );
    }

    let env = proc_environ(pid).unwrap();
    let var = |k: &str| {
        env.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("{k} missing from the environment of pid {pid}"))
    };
    assert_eq!(var("LISTEN_PID"), pid.to_string());
    assert_eq!(var("LISTEN_FDS"), "2");
    assert_eq!(var("LISTEN_FDNAMES"), "http:ctl");
    assert_eq!(var("BATON_GENERATION"), generation.to_string());
    assert_eq!(var("BATON_CONTROL_FD"), "5");
    assert!(!var("NOTIFY_SOCKET").is_empty());
}

async fn start_sleep(dir: TestDir, unix_path: &Path) -> Baton {
    start_with(dir, unix_path, &[], &[sleep_program().as_str(), "1000"]).await
}

/// baton with an `http` TCP and a `ctl` Unix listener, readiness by delay, and `extra`.
async fn start_with(dir: TestDir, unix_path: &Path, extra: &[&str], program: &[&str]) -> Baton {
    let ctl = format!("ctl=unix:{}", unix_path.display());
    let mut args = vec![
        "--listen",
        "http=127.0.0.1:0",
        "--listen",
        ctl.as_str(),
        "--ready",
        "delay=300ms",
        "--drain-timeout",
        "5s",
    ];
    args.extend_from_slice(extra);
    Baton::start_in(dir, args, program).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_gets_exactly_listeners_and_control_fd() {
    let _serial = exclusive().await;
    let dir = TestDir::new("fds").unwrap();
    let unix_path = dir.join("app.sock");
    let baton = start_sleep(dir, &unix_path).await;

    let status = baton.status().await.unwrap();
    audit(
        baton.pid(),
        status.pid.unwrap(),
        status.generation,
        &unix_path,
    );

    // The second generation too: nothing of the first one (its control pair) leaks into it.
    let promoted = match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::Promoted(r) => r,
        UpgradeOutcome::RolledBack { message } => panic!("upgrade rolled back: {message}"),
    };
    let status = baton.status().await.unwrap();
    assert_eq!(status.pid, promoted.pid);
    audit(
        baton.pid(),
        status.pid.unwrap(),
        status.generation,
        &unix_path,
    );

    let meta = fs::symlink_metadata(&unix_path).unwrap();
    assert!(meta.file_type().is_socket());
    baton.wait_settled(Duration::from_secs(10)).await.unwrap();
}

/// baton's own parent may leak fds into it (a shell, a sloppy process manager); baton
/// must not pass them on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fds_leaked_into_baton_do_not_reach_the_generation() {
    let _serial = exclusive().await;
    let dir = TestDir::new("fds-leak").unwrap();
    let unix_path = dir.join("app.sock");
    let stray_path = dir.join("stray-fd-marker");
    let stray = fs::File::create(&stray_path).unwrap();
    make_inheritable(&stray).unwrap();
    let baton = start_sleep(dir, &unix_path).await;
    drop(stray);

    let marker = stray_path.to_string_lossy().into_owned();
    let baton_fds = proc_fds(baton.pid()).unwrap();
    assert!(
        baton_fds.values().any(|t| *t == marker),
        "test setup: baton did not inherit the stray fd: {baton_fds:#?}"
    );
    let status = baton.status().await.unwrap();
    let pid = status.pid.unwrap();
    let child_fds = proc_fds(pid).unwrap();
    assert!(
        !child_fds.values().any(|t| *t == marker),
        "the fd baton inherited leaked into generation {}: {child_fds:#?}",
        status.generation
    );
    audit(baton.pid(), pid, status.generation, &unix_path);
}

/// With `--releases`, baton execs the checked file itself: an ELF through `execveat`, a
/// `#!` script through its own `/proc` fd. Neither leaves an fd behind in the child.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_exec_by_fd_binary_and_script_leave_no_fd_behind() {
    use baton_tests::releases::{INSTALL_TIMEOUT, StoreDir, release};
    let _serial = exclusive().await;
    let s = StoreDir::new("fds-rel").unwrap();
    // A binary release (the file lands at PROGRAM), and a wrapper-script release.
    s.add("elf", Path::new(&sleep_program())).await.unwrap();
    let tree = s.join("sh-tree");
    fs::create_dir_all(tree.join("bin")).unwrap();
    baton_tests::harness::write_script(
        &tree.join("bin/app"),
        &format!("#!/bin/sh\nexec {} \"$@\"\n", sleep_program()),
    )
    .unwrap();
    s.add("script", &tree).await.unwrap();
    s.permanent("elf").await;

    let dir = TestDir::new("fds-rel-run").unwrap();
    let unix_path = dir.join("app.sock");
    let store = s.arg();
    let baton = start_with(
        dir,
        &unix_path,
        &["--releases", &store],
        &["bin/app", "1000"],
    )
    .await;
    for version in ["elf", "script"] {
        if version == "script" {
            let out = release(
                &baton,
                &["install", "script", "--promoted"],
                INSTALL_TIMEOUT,
            )
            .await
            .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        let st = baton.status().await.unwrap();
        let pid = st.pid.unwrap();
        audit(baton.pid(), pid, st.generation, &unix_path);
        let env = proc_environ(pid).unwrap();
        assert_eq!(env.get("BATON_RELEASE").map(String::as_str), Some(version));
        let dir = s.store().canonicalize().unwrap().join(version);
        assert_eq!(
            env.get("BATON_RELEASE_DIR").map(String::as_str),
            dir.to_str()
        );
        // It runs the store's bytes: sleep itself, after the script's exec.
        let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert!(exe.ends_with("sleep") || exe.starts_with(&dir), "{exe:?}");
    }
}

/// After `baton reexec` every fd baton handed over is close-on-exec again, the
/// hand-over memfd is gone, and the next generation gets exactly what the first did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reexec_leaves_no_fd_inheritable_and_the_next_generation_clean() {
    const O_CLOEXEC: u32 = 0o2000000;
    let _serial = exclusive().await;
    let dir = TestDir::new("fds-reexec").unwrap();
    let unix_path = dir.join("app.sock");
    let baton = start_sleep(dir, &unix_path).await;
    let inheritable = |pid: u32| -> BTreeSet<i32> {
        proc_fds(pid)
            .unwrap()
            .keys()
            .copied()
            .filter(|fd| *fd > 2 && proc_fd_flags(pid, *fd).is_ok_and(|f| f & O_CLOEXEC == 0))
            .collect()
    };
    // Whatever baton's own parent leaked into it stays as it was.
    let leaked = inheritable(baton.pid());
    let out = baton
        .cli(&["reexec", "--wait"], Duration::from_secs(30))
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        inheritable(baton.pid()),
        leaked,
        "{:#?}",
        proc_fds(baton.pid())
    );
    let fds = proc_fds(baton.pid()).unwrap();
    assert!(
        !fds.values().any(|t| t.contains("memfd:")),
        "the hand-over memfd is still open: {fds:#?}"
    );
    let promoted = match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::Promoted(r) => r,
        UpgradeOutcome::RolledBack { message } => panic!("upgrade rolled back: {message}"),
    };
    let status = baton.status().await.unwrap();
    assert_eq!(status.pid, promoted.pid);
    audit(
        baton.pid(),
        status.pid.unwrap(),
        status.generation,
        &unix_path,
    );
}
