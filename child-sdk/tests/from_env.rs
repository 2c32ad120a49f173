//! `Env::take` + `Builder::start` against a real control socketpair and a
//! real notify socket. One test per file: it changes the process
//! environment, which must not race with other tests.
//!
//! It calls `Env::take` and sets the environment itself, both `unsafe` by contract.
#![allow(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::Duration;

use baton_child::{Baton, DrainCause, Env};
use baton_protocol::{ChildMsg, PROTOCOL_VERSION};

const BOUND: Duration = Duration::from_secs(10);

fn next_msg(r: &mut BufReader<UnixStream>) -> ChildMsg {
    let mut line = String::new();
    r.read_line(&mut line).expect("read from the child");
    assert!(line.ends_with('\n'), "truncated line {line:?}");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"))
}

/// O_CLOEXEC as shown in /proc/self/fdinfo (octal flags).
fn is_cloexec(fd: i32) -> bool {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .unwrap()
        .trim();
    u32::from_str_radix(flags, 8).unwrap() & 0o2000000 != 0
}

#[test]
fn from_env_takes_the_contract_and_talks_to_the_supervisor() {
    let dir = std::env::temp_dir().join(format!("baton-child-from-env-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(BOUND)).unwrap();

    let (child_end, supervisor_end) = UnixStream::pair().unwrap();
    supervisor_end.set_read_timeout(Some(BOUND)).unwrap();
    // The supervisor hands the fd over inheritable; the SDK must make it
    // close-on-exec so the app's own children do not get it.
    nix::fcntl::fcntl(
        &child_end,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    // Ownership moves to the SDK through the environment.
    let control_fd = child_end.into_raw_fd();
    assert!(!is_cloexec(control_fd));

    // SAFETY: this test binary runs one test, on this thread, before any runtime exists.
    unsafe {
        std::env::set_var("BATON_CONTROL_FD", control_fd.to_string());
        std::env::set_var("BATON_GENERATION", "4");
        std::env::set_var("NOTIFY_SOCKET", &notify_path);
        // Listeners meant for another process (our parent) must be ignored.
        std::env::set_var("LISTEN_FDS", "1");
        std::env::set_var("LISTEN_FDNAMES", "http");
        std::env::set_var("LISTEN_PID", "1");
    }

    // SAFETY: this test binary runs one test, on this thread, before any runtime.
    let env = unsafe { Env::take() }.unwrap();
    for var in [
        "BATON_CONTROL_FD",
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LISTEN_PID",
    ] {
        assert!(std::env::var_os(var).is_none(), "{var} still set");
    }
    assert_eq!(std::env::var("BATON_GENERATION").unwrap(), "4");
    assert!(is_cloexec(control_fd));
    assert_eq!(env.generation(), 4);
    assert!(env.is_supervised());
    assert_eq!(env.listener_names().count(), 0);
    // A second take finds nothing (the generation is informational and stays).
    // SAFETY: as above.
    let again = unsafe { Env::take() }.unwrap();
    assert_eq!(again.generation(), 4);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let baton = Baton::builder().start(env).unwrap();
        assert_eq!(baton.generation(), 4);
        assert!(baton.is_supervised());

        let mut sup = BufReader::new(supervisor_end.try_clone().unwrap());
        let mut sup_w = supervisor_end;
        let hello = tokio::task::spawn_blocking(move || {
            let m = next_msg(&mut sup);
            (m, sup)
        });
        let (m, sup) = tokio::time::timeout(BOUND, hello).await.unwrap().unwrap();
        assert_eq!(
            m,
            ChildMsg::Hello {
                protocol: PROTOCOL_VERSION,
                features: vec![],
                restores: None,
            }
        );

        // Not inherited: the fallback is bound.
        let l = baton.incoming("http", "127.0.0.1:0").unwrap();
        assert!(
            !l.local_addr().unwrap().ends_with(":0"),
            "{:?}",
            l.local_addr()
        );

        baton.ready().unwrap();
        let mut buf = [0u8; 64];
        let n = notify.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        // Connection counts reach the supervisor: the initial 0, the count
        // while connections are open, and the final 0.
        let read_until = |mut sup: BufReader<UnixStream>, want: u64| {
            tokio::task::spawn_blocking(move || {
                loop {
                    match next_msg(&mut sup) {
                        ChildMsg::Connections { active } if active == want => return sup,
                        ChildMsg::Connections { .. } => {}
                        other => panic!("unexpected {other:?}"),
                    }
                }
            })
        };
        let sup = tokio::time::timeout(BOUND, read_until(sup, 0))
            .await
            .unwrap()
            .unwrap();
        let g1 = baton.track();
        let g2 = baton.clone().track();
        let sup = tokio::time::timeout(BOUND, read_until(sup, 2))
            .await
            .unwrap()
            .unwrap();
        drop(g1);
        assert_eq!(baton.connections(), 1);
        drop(g2);
        let _sup = tokio::time::timeout(BOUND, read_until(sup, 0))
            .await
            .unwrap()
            .unwrap();

        assert!(baton.draining().is_none());
        sup_w
            .write_all(b"{\"type\":\"drain\",\"deadline_ms\":2500,\"migrate\":false}\n")
            .unwrap();
        let info = tokio::time::timeout(BOUND, baton.wait_drain())
            .await
            .unwrap();
        assert_eq!(info.cause, DrainCause::Supervisor);
        assert!(!info.migrate);
        assert!(info.deadline.is_some());
    });
    let _ = std::fs::remove_dir_all(&dir);
}
