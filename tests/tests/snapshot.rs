//! `baton snapshot --dump`: a dry-run snapshot of a running app, with writers running.
//! Each one is a consistent cut (the writers' keys hold a value they had acknowledged),
//! the app pauses and serves on, nothing is committed, and a bad request harms nothing.

use std::time::Duration;

use baton_tests::harness::{Baton, exclusive, hello_http_bin};
use baton_tests::kv::{self, connect};
use baton_tests::resp::IncrWriter;

const CLI: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_snapshots_under_writers_are_consistent_and_change_nothing() {
    let _serial = exclusive().await;
    let (baton, _app, addr) = kv::start("snapshot", &[("v2", "--schema 2")], "v2", &[]).await;
    let mut c = connect(addr).await;
    for i in 0..1000 {
        kv::command(&mut c, &["SET", &format!("k{i}"), &format!("v{i}")]).await;
    }
    let writers = {
        let mut w = Vec::new();
        for i in 0..4 {
            w.push(IncrWriter::start(addr, format!("w{i}")).await.unwrap());
        }
        w
    };
    baton_tests::resp::progress(&writers, 50).await.unwrap();
    let pid = baton.status().await.unwrap().pid;
    let file = baton.dir().join("snap.json");
    for round in 0..10 {
        let before: Vec<i64> = writers.iter().map(IncrWriter::last).collect();
        let out = baton
            .cli(
                &["snapshot", "--dump", file.to_str().unwrap(), "--json"],
                CLI,
            )
            .await
            .unwrap();
        let after: Vec<i64> = writers.iter().map(IncrWriter::last).collect();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let said: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(
            said["size"].as_u64(),
            Some(bytes.len() as u64),
            "round {round}"
        );
        let snap: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(snap["version"], 2);
        let entries = snap["state"]["entries"].as_array().unwrap();
        assert!(
            entries.len() >= 1000,
            "round {round}: {} keys",
            entries.len()
        );
        // Each writer's key holds a value it had acknowledged by the end, and at least
        // what it had acknowledged before: a cut, not a torn read.
        for (i, w) in writers.iter().enumerate() {
            let v: i64 = entries
                .iter()
                .find(|e| e["k"] == w.key())
                .map(|e| e["v"].as_i64().unwrap())
                .unwrap_or(0);
            assert!(
                v >= before[i] && v <= after[i] + IncrWriter::BATCH as i64,
                "round {round}: {} is {v}, acknowledged {}..{}",
                w.key(),
                before[i],
                after[i]
            );
        }
    }
    // A schema the app can write: its down-migration, with what it declares it drops.
    let out = baton
        .cli(&["snapshot", "--dump", "-", "--schema", "1"], CLI)
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let snap: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(snap["version"], 1);
    assert_eq!(snap["state"]["entries"]["k7"], "v7");
    // One it cannot: one line, and the app serves on.
    let out = baton
        .cli(
            &[
                "snapshot",
                "--dump",
                file.to_str().unwrap(),
                "--schema",
                "7",
            ],
            CLI,
        )
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(out.stderr.contains("cannot take a snapshot"), "{out:?}");
    baton_tests::resp::progress(&writers, after_all(&writers) + 50)
        .await
        .unwrap();
    // Nothing was committed: the same process serves, no upgrade happened.
    let status = baton.status().await.unwrap();
    assert_eq!(status.pid, pid);
    assert!(status.last_upgrade.is_none_or(|u| u.generation == 1));
    // And a real upgrade afterwards still carries every write.
    kv::upgrade_promoted(&baton, "upgrade after dry runs").await;
    // The writers check every reply (each INCR must give the next value): none lost.
    for w in writers {
        w.finish().await.unwrap();
    }
}

fn after_all(writers: &[IncrWriter]) -> i64 {
    writers.iter().map(IncrWriter::last).min().unwrap_or(0)
}

#[tokio::test]
async fn a_snapshot_of_an_app_without_state_is_a_clear_error() {
    let baton = Baton::start(
        ["--state", "--listen", "http=127.0.0.1:0"],
        [hello_http_bin().unwrap()],
    )
    .await
    .unwrap();
    let file = baton.dir().join("s.json");
    let out = baton
        .cli(&["snapshot", "--dump", file.to_str().unwrap()], CLI)
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(out.stderr.contains("does not take part"), "{out:?}");
    assert!(!file.exists(), "a partial file was left");
    let without = Baton::start(
        ["--listen", "http=127.0.0.1:0"],
        [hello_http_bin().unwrap()],
    )
    .await
    .unwrap();
    let out = without
        .cli(&["snapshot", "--dump", file.to_str().unwrap()], CLI)
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("without --state"), "{out:?}");
}
