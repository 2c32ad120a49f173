//! Pre-copy through the SDK against `testing::FakeSupervisor`, over real sockets: an old
//! generation sends its rounds with `Baton::chunks` while it serves, a candidate rebuilds
//! the state with `restore_chunked`; bad chunks are rejected, and an abort unblocks a sender.

use std::collections::BTreeMap;
use std::time::Duration;

use baton_child::testing::{FakeSupervisor, Restore, Snapshot};
use baton_child::{Baton, Chunked, Error, Event};
use serde::{Deserialize, Serialize};

const BOUND: Duration = Duration::from_secs(10);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f).await.expect("timed out")
}

#[derive(Debug, Default, PartialEq, Deserialize)]
struct Db(BTreeMap<String, String>);

#[derive(Debug, Serialize, Deserialize)]
struct Piece {
    set: Vec<(String, String)>,
    deleted: Vec<String>,
}

impl Chunked for Db {
    type Chunk = Piece;
    fn apply(&mut self, p: Piece) -> Result<(), String> {
        if p.set.iter().any(|(k, _)| k == "poison") {
            return Err("poisoned".into());
        }
        self.0.extend(p.set);
        for k in p.deleted {
            self.0.remove(&k);
        }
        Ok(())
    }
}

fn piece(set: &[(&str, &str)], deleted: &[&str]) -> Piece {
    Piece {
        set: set
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        deleted: deleted.iter().map(|k| k.to_string()).collect(),
    }
}

fn start(sup: &mut FakeSupervisor, b: baton_child::Builder) -> Baton {
    b.handle_signals(false).start(sup.env().unwrap()).unwrap()
}

/// The old generation's app: round 0 is two chunks, round 1 a delta, the last round one
/// more change.
async fn old_app(baton: Baton) {
    loop {
        let round = match baton.next_event().await {
            Event::Precopy { round } | Event::PrecopyFinal { round } => round,
            _ => return,
        };
        let b = baton.clone();
        tokio::task::spawn_blocking(move || {
            let tx = b.chunks(round).unwrap();
            let pieces = match round {
                0 => vec![piece(&[("a", "1")], &[]), piece(&[("b", "1")], &[])],
                1 => vec![piece(&[("a", "2")], &["b"])],
                _ => vec![piece(&[("c", "3")], &[])],
            };
            for p in &pieces {
                tx.send(p).unwrap();
            }
            tx.finish().unwrap();
        })
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn rounds_sent_while_serving_rebuild_the_state_in_order() {
    let mut old_sup = FakeSupervisor::new(1).unwrap();
    let old = start(&mut old_sup, Baton::builder().stateful(1).precopy());
    let features = old_sup.hello().await.unwrap();
    assert!(
        features.contains(&baton_protocol::Feature::Precopy),
        "{features:?}"
    );
    tokio::spawn(old_app(old));
    let r0 = within(old_sup.precopy(0)).await.unwrap();
    let r1 = within(old_sup.precopy(1)).await.unwrap();
    let r2 = within(old_sup.precopy_final(2)).await.unwrap();
    assert_eq!(
        (r0.chunks.len(), r1.chunks.len(), r2.chunks.len()),
        (2, 1, 1)
    );
    assert_eq!(r1.chunks[0].state().unwrap()["deleted"][0], "b");

    let mut new_sup = FakeSupervisor::new(2).unwrap();
    let new = start(&mut new_sup, Baton::builder().stateful(1).precopy());
    new_sup.hello().await.unwrap();
    let none = |v: u32, _| Err::<Db, _>(format!("no migration from {v}"));
    let rounds = [r0, r1, r2];
    let (restored, outcome) =
        within(async { tokio::join!(new.restore_chunked(none), new_sup.restore_chunks(&rounds)) })
            .await;
    assert_eq!(outcome.unwrap(), Restore::Restored { from_version: 1 });
    let db = restored.unwrap().unwrap();
    let want: BTreeMap<String, String> = [("a", "2"), ("c", "3")]
        .map(|(k, v)| (k.into(), v.into()))
        .into();
    assert_eq!(db.0, want);
}

#[tokio::test]
async fn a_bad_chunk_is_rejected_with_the_reason() {
    let good = |s: &str| format!(r#"{{"version":1,"state":{s}}}"#);
    let cases = [
        (
            Snapshot::from_bytes(
                9,
                good(r#"{"set":[],"deleted":[]}"#)
                    .replace(":1,", ":9,")
                    .as_bytes(),
                true,
            ),
            "schema 9",
        ),
        (
            Snapshot::from_bytes(1, good(r#"{"set":[],"deleted":[]}"#).as_bytes(), false),
            "not sealed",
        ),
        (
            Snapshot::from_bytes(
                1,
                good(r#"{"set":[["poison","x"]],"deleted":[]}"#).as_bytes(),
                true,
            ),
            "poisoned",
        ),
        (
            Snapshot::from_bytes(1, good(r#"{"nope":1}"#).as_bytes(), true),
            "chunk 0",
        ),
    ];
    for (chunk, want) in cases {
        let mut sup = FakeSupervisor::new(2).unwrap();
        let baton = start(&mut sup, Baton::builder().stateful(1).precopy());
        sup.hello().await.unwrap();
        let round = baton_child::testing::Round {
            round: 0,
            chunks: vec![chunk.unwrap()],
        };
        let restore = tokio::spawn(async move {
            baton
                .restore_chunked(|v, _| Err::<Db, _>(format!("no migration from {v}")))
                .await
        });
        let outcome = within(sup.restore_chunks(&[round])).await.unwrap();
        let Restore::Rejected { reason } = outcome else {
            panic!("{want}: {outcome:?}");
        };
        assert!(reason.contains(want), "{want}: {reason}");
        // The SDK waits to be stopped after a rejection; a drain ends that wait.
        sup.drain(Duration::from_secs(1), false).await.unwrap();
        let err = within(restore).await.unwrap().unwrap_err();
        assert!(matches!(err, Error::SnapshotRejected(_)), "{err}");
    }
}

#[tokio::test]
async fn an_abort_unblocks_a_sender_waiting_for_credit() {
    let mut sup = FakeSupervisor::new(1).unwrap();
    let baton = start(&mut sup, Baton::builder().stateful(1).precopy());
    sup.hello().await.unwrap();
    // Round 0 asked for, and no chunk is ever acknowledged.
    sup.send(&baton_protocol::SupervisorMsg::Precopy { round: 0 })
        .await
        .unwrap();
    assert_eq!(
        within(baton.next_event()).await,
        Event::Precopy { round: 0 }
    );
    let b = baton.clone();
    let sender = tokio::task::spawn_blocking(move || {
        let tx = b.chunks(0).unwrap();
        (0..100).try_for_each(|i| tx.send(&piece(&[("k", &i.to_string())], &[])))
    });
    // The window fills: exactly PRECOPY_WINDOW chunks arrive, then nothing until the abort.
    for _ in 0..baton_protocol::PRECOPY_WINDOW {
        let (msg, _) = within(sup.next_message()).await.unwrap();
        assert!(
            matches!(msg, baton_protocol::ChildMsg::Chunk { .. }),
            "{msg:?}"
        );
    }
    assert!(!sender.is_finished());
    sup.resume("candidate crashed").await.unwrap();
    let err = within(sender).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("candidate crashed"), "{err}");
    assert_eq!(
        within(baton.next_event()).await,
        Event::Resume {
            reason: "candidate crashed".into()
        }
    );
}
