//! Issue 11: `contrib/git-post-receive` deploys a push to a bare repository through
//! baton's releases: a good commit goes live with no failed request; one that does
//! not build, or builds but never gets ready, is reported to the pusher and the
//! running release keeps serving.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use baton_protocol::ReleaseStatus;
use baton_tests::harness::{
    Baton, TestDir, baton_bin, exclusive, hello_http_bin, which, write_script,
};
use baton_tests::http::http_get;
use baton_tests::load::{LoadGen, LoadOpts};
use baton_tests::releases::{StoreDir, active_release, list, status_of};
use baton_tests::systemd::repo_root;

/// git with a fixed identity and no user or system config.
fn git(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "init.defaultBranch=main",
            "-c",
            "advice.detachedHead=false",
        ])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = git(dir, args);
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Commits the project with `label`; `broken_build` makes the build fail, and
/// `never_ready` makes the release exit before READY.
fn commit(src: &Path, label: &str, broken_build: bool, never_ready: bool) -> String {
    std::fs::write(src.join("LABEL"), label).unwrap();
    let marker = src.join("BROKEN_BUILD");
    if broken_build {
        std::fs::write(&marker, "").unwrap();
    } else {
        let _ = std::fs::remove_file(&marker);
    }
    let hello = hello_http_bin().unwrap();
    let start = if never_ready {
        "#!/bin/sh\necho 'app: cannot start' >&2\nexit 1\n".to_string()
    } else {
        format!(
            "#!/bin/sh\nexec {} --label @LABEL@ \"$@\"\n",
            hello.display()
        )
    };
    std::fs::write(src.join("start.in"), start).unwrap();
    ok(src, &["add", "-A"]);
    ok(src, &["commit", "-q", "-m", label]);
    ok(src, &["rev-parse", "--short=12", "HEAD"])
}

fn push(src: &Path) -> String {
    let out = git(src, &["push", "-q", "origin", "HEAD:main"]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn label(addr: std::net::SocketAddr) -> String {
    let r = http_get(addr, "/", Duration::from_secs(5)).unwrap();
    r.body
        .split_whitespace()
        .find_map(|w| w.strip_prefix("label="))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_deploys_and_a_broken_push_is_reported_while_the_old_release_serves() {
    let _serial = exclusive().await;
    if which("git").is_none() {
        eprintln!("SKIP git_deploy: git is missing (scripts/install-test-deps installs it)");
        return;
    }
    let s = StoreDir::new("git-store").unwrap();
    s.add_hello("v0", "", true).await.unwrap();
    s.permanent("v0").await;
    let store = s.arg();
    let baton = Baton::start_in(
        TestDir::new("git-run").unwrap(),
        [
            "--listen",
            "http=127.0.0.1:0",
            "--releases",
            store.as_str(),
            "--probation",
            "1s",
        ],
        ["bin/app"],
    )
    .await
    .unwrap();
    let addr = baton.tcp_addr("http").await.unwrap();

    // The bare repository, with the hook from contrib/, and a clone to push from.
    let dir = TestDir::new("git-repos").unwrap();
    let bare = dir.join("app.git");
    ok(
        dir.path(),
        &["init", "-q", "--bare", bare.to_str().unwrap()],
    );
    let hook = bare.join("hooks/post-receive");
    std::fs::copy(repo_root().join("contrib/git-post-receive"), &hook).unwrap();
    for (k, v) in [
        ("baton.control", baton.control().display().to_string()),
        ("baton.build", "./build.sh".to_string()),
        ("baton.bin", baton_bin().unwrap().display().to_string()),
    ] {
        ok(&bare, &["config", k, &v]);
    }
    let src = dir.join("src");
    ok(
        dir.path(),
        &["clone", "-q", bare.to_str().unwrap(), src.to_str().unwrap()],
    );
    write_script(
        &src.join("build.sh"),
        "#!/bin/sh\nset -e\n\
         if [ -e BROKEN_BUILD ]; then echo 'error: the build is broken' >&2; exit 1; fi\n\
         mkdir -p \"$BATON_OUT/bin\"\n\
         sed \"s/@LABEL@/$(cat LABEL)/\" start.in > \"$BATON_OUT/bin/app\"\n\
         chmod +x \"$BATON_OUT/bin/app\"\n",
    )
    .unwrap();

    let load = LoadGen::start(addr, LoadOpts::default());
    load.wait_until(Duration::from_secs(10), |s| s.ok >= 200)
        .await
        .unwrap();

    // A good commit: live, and permanent after its probation.
    let good = commit(&src, "first-push", false, false);
    let said = push(&src);
    assert!(
        said.contains(&format!(
            "remote: baton-deploy: {good} is live and permanent"
        )),
        "{said}"
    );
    assert_eq!(label(addr), "first-push");
    assert_eq!(
        active_release(&baton).await.unwrap().as_deref(),
        Some(good.as_str())
    );

    // A commit that does not build: nothing deployed.
    let bad = commit(&src, "does-not-build", true, false);
    let said = push(&src);
    assert!(
        said.contains("remote: error: the build is broken"),
        "{said}"
    );
    assert!(said.contains(&format!("build of {bad} failed")), "{said}");
    assert_eq!(label(addr), "first-push");

    // A commit that builds but never gets ready: rolled back.
    let dead = commit(&src, "never-ready", false, true);
    let said = push(&src);
    assert!(said.contains(&format!("{dead} was rolled back")), "{said}");
    assert_eq!(label(addr), "first-push");
    let releases = list(&baton).await.unwrap();
    assert_eq!(status_of(&releases, &dead), ReleaseStatus::Failed);
    assert_eq!(status_of(&releases, &good), ReleaseStatus::Permanent);

    let snap = load.snapshot();
    load.wait_until(Duration::from_secs(10), |s| s.ok >= snap.ok + 200)
        .await
        .unwrap();
    let report = load.stop().await;
    println!("{report}");
    assert_eq!(report.failed, 0, "{}", report.failures);
}
