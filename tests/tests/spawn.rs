//! Issue 14 (baton's share of an upgrade): a generation with a cgroup is created inside
//! it by `clone3(CLONE_INTO_CGROUP)`, and an exec that fails after baton's checks is a
//! rollback that names the exec's error.

use std::path::Path;

use baton_tests::harness::{
    Baton, TestDir, UpgradeOutcome, exclusive, hello_http_bin, replace_symlink,
};

async fn start(dir: TestDir, current: &Path) -> Option<Baton> {
    let baton = Baton::start_in(dir, ["--listen", "http=127.0.0.1:0"], [current.as_os_str()])
        .await
        .unwrap();
    let status = baton.status().await.unwrap();
    if status.containment != "cgroup" {
        eprintln!(
            "SKIP: generations are not in cgroups here ({}): the clone3 path is not taken",
            status.containment
        );
        return None;
    }
    Some(baton)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_starts_inside_its_cgroup_and_a_failed_exec_names_its_error() {
    let _serial = exclusive().await;
    let dir = TestDir::new("clone3").unwrap();
    let current = dir.join("current");
    std::os::unix::fs::symlink(hello_http_bin().unwrap(), &current).unwrap();
    // An ELF for this machine (it passes baton's checks) whose dynamic loader does not
    // exist: only the exec itself can fail, with ENOENT, inside the child.
    let broken = dir.join("broken");
    let elf = std::fs::read(hello_http_bin().unwrap()).unwrap();
    let (from, to) = (
        b"/lib64/ld-linux-x86-64.so.2".as_slice(),
        b"/nope64/ld-linux-x86-64.so2".as_slice(),
    );
    assert_eq!(from.len(), to.len());
    let at = elf.windows(from.len()).position(|w| w == from);
    let Some(at) = at else {
        eprintln!("SKIP: hello-http has no x86-64 PT_INTERP to break here");
        return;
    };
    let mut patched = elf.clone();
    patched[at..at + to.len()].copy_from_slice(to);
    std::fs::write(&broken, &patched).unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let Some(baton) = start(dir, &current).await else {
        return;
    };
    let status = baton.status().await.unwrap();
    let pid = status.pid.unwrap();
    // Created there, not moved there after the fork: no window outside it.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want = format!("baton-{}-gen-1", baton.pid());
    assert!(
        cgroup
            .lines()
            .any(|l| l.starts_with("0::") && l.ends_with(&want)),
        "{cgroup}"
    );

    replace_symlink(&current, &broken).unwrap();
    match baton.upgrade_wait().await.unwrap() {
        UpgradeOutcome::RolledBack { message } => assert!(
            message.contains("could not exec") && message.contains("No such file or directory"),
            "{message}"
        ),
        UpgradeOutcome::Promoted(r) => panic!("a binary that cannot exec was promoted: {r:?}"),
    }
    assert_eq!(
        baton.status().await.unwrap().pid,
        Some(pid),
        "the old one serves on"
    );
    replace_symlink(&current, &hello_http_bin().unwrap()).unwrap();
    assert!(matches!(
        baton.upgrade_wait().await.unwrap(),
        UpgradeOutcome::Promoted(_)
    ));
}
