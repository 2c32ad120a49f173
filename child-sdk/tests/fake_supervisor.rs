//! The SDK against `testing::FakeSupervisor`, over real sockets: hand-over
//! and adoption of TCP and Unix connections, the stateful upgrade (restore,
//! migrate, reject, resume, commit) and the event order.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::time::Duration;

use baton_child::testing::{FakeSupervisor, Migrated, Restore};
use baton_child::{Baton, DrainCause, Error, Event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

const BOUND: Duration = Duration::from_secs(10);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f).await.expect("timed out")
}

fn start(sup: &mut FakeSupervisor, b: baton_child::Builder) -> Baton {
    b.handle_signals(false).start(sup.env().unwrap()).unwrap()
}

#[tokio::test]
async fn a_live_tcp_connection_moves_between_generations_with_its_unread_bytes() {
    let mut old_sup = FakeSupervisor::new(1).unwrap();
    let old = start(&mut old_sup, Baton::builder());
    let mut new_sup = FakeSupervisor::new(2).unwrap();
    let new = start(&mut new_sup, Baton::builder().adopt());
    assert!(old_sup.hello().await.unwrap().is_empty());
    assert_eq!(
        new_sup.hello().await.unwrap(),
        vec![baton_protocol::Feature::Adopt]
    );

    // The old generation accepts on its listener and reads half a request.
    let mut old_in = old.incoming("http", "127.0.0.1:0").unwrap();
    let addr = old_in.local_addr().unwrap();
    let mut client = TcpStream::connect(&addr).await.unwrap();
    client.write_all(b"GET / HT").await.unwrap();
    let mut stream = within(old_in.accept()).await.unwrap();
    assert!(stream.adopted().is_none() && stream.tcp().is_some());
    let mut head = [0u8; 8];
    stream.read_exact(&mut head).await.unwrap();
    old.hand_over(stream, &head, &serde_json::json!({"requests": 2}))
        .await
        .unwrap();

    // baton's relay: migrate from the old one becomes adopt for the new one.
    let m = old_sup.migrated().await.unwrap();
    assert_eq!(
        (m.listener.as_str(), &m.buffered[..]),
        ("http", &b"GET / HT"[..])
    );
    let mut new_in = new.incoming("http", "127.0.0.1:0").unwrap();
    assert!(new_in.adopts());
    new_sup.adopt(m).await.unwrap();

    let mut adopted = within(new_in.accept()).await.unwrap();
    assert_eq!(adopted.adopted(), Some(&serde_json::json!({"requests": 2})));
    assert_eq!(adopted.listener(), "http");
    client.write_all(b"TP/1.1\r\n").await.unwrap();
    let mut got = [0u8; 16];
    adopted.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"GET / HTTP/1.1\r\n");
    adopted.write_all(b"pong").await.unwrap();
    let mut pong = [0u8; 4];
    client.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"pong");
}

#[tokio::test]
async fn megabytes_read_and_not_processed_move_whole_in_a_memfd() {
    let mut old_sup = FakeSupervisor::new(1).unwrap();
    let old = start(&mut old_sup, Baton::builder());
    let mut new_sup = FakeSupervisor::new(2).unwrap();
    let new = start(&mut new_sup, Baton::builder().adopt());
    old_sup.hello().await.unwrap();
    new_sup.hello().await.unwrap();
    let mut old_in = old.incoming("kv", "127.0.0.1:0").unwrap();
    let addr = old_in.local_addr().unwrap();
    let _client = TcpStream::connect(&addr).await.unwrap();
    let stream = within(old_in.accept()).await.unwrap();
    // More than a control line can hold, even before base64.
    let unread: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
    old.hand_over(stream, &unread, &()).await.unwrap();
    let (msg, fds) = old_sup.next_message().await.unwrap();
    assert!(
        matches!(msg, baton_protocol::ChildMsg::Migrate { fds: 2, ref buffered, .. } if buffered.is_empty()),
        "{msg:?}"
    );
    let m = baton_child::testing::Migrated::from_message(msg, fds).unwrap();
    assert!(
        m.buffered == unread,
        "{} bytes came, not {}",
        m.buffered.len(),
        unread.len()
    );
    let mut new_in = new.incoming("kv", "127.0.0.1:0").unwrap();
    new_sup.adopt(m).await.unwrap();
    let mut adopted = within(new_in.accept()).await.unwrap();
    let mut got = vec![0u8; unread.len()];
    adopted.read_exact(&mut got).await.unwrap();
    assert!(
        got == unread,
        "the adopted stream reads the unread bytes first"
    );
}

#[tokio::test]
async fn unix_connections_move_the_same_way_and_wrong_kinds_are_skipped() {
    let dir = std::env::temp_dir().join(format!("baton-fake-unix-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kv.sock");
    // The listener is inherited: the fallback (TCP here) is not used.
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut sup = FakeSupervisor::new(2)
        .unwrap()
        .listener("kv", OwnedFd::from(listener));
    let baton = start(&mut sup, Baton::builder().adopt());
    let mut incoming = baton.incoming("kv", "127.0.0.1:0").unwrap();
    assert_eq!(
        incoming.local_addr(),
        Some(format!("unix:{}", path.display()))
    );

    // A TCP connection offered on a Unix listener is closed, not served.
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut wrong_client = TcpStream::connect(tcp.local_addr().unwrap()).await.unwrap();
    let (wrong, _) = tcp.accept().await.unwrap();
    let wrong = Migrated {
        listener: "kv".into(),
        buffered: Vec::new(),
        meta: serde_json::Value::Null,
        fd: OwnedFd::from(wrong.into_std().unwrap()),
    };
    sup.adopt(wrong).await.unwrap();

    let (mut client, server_side) = UnixStream::pair().unwrap();
    let right = Migrated {
        listener: "kv".into(),
        buffered: b"PI".to_vec(),
        meta: serde_json::json!({"db": 3}),
        fd: OwnedFd::from(server_side.into_std().unwrap()),
    };
    sup.adopt(right).await.unwrap();
    let mut adopted = within(incoming.accept()).await.unwrap();
    assert!(adopted.unix().is_some());
    let mut eof = [0u8; 1];
    assert_eq!(within(wrong_client.read(&mut eof)).await.unwrap(), 0);
    client.write_all(b"NG\r\n").await.unwrap();
    let mut got = [0u8; 6];
    adopted.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"PING\r\n");
    let _ = std::fs::remove_dir_all(&dir);
}

type Db = BTreeMap<String, u64>;

fn from_pairs(version: u32, json: serde_json::Value) -> Result<Db, String> {
    match version {
        1 => serde_json::from_value::<Vec<(String, u64)>>(json)
            .map(|p| p.into_iter().collect())
            .map_err(|e| e.to_string()),
        v => Err(format!("no migration from version {v}")),
    }
}

#[tokio::test]
async fn stateful_upgrade_migrates_an_older_schema_and_commits_once() {
    // Version 1 of the app stores pairs.
    let mut old_sup = FakeSupervisor::new(1).unwrap();
    let old = start(&mut old_sup, Baton::builder().stateful(1));
    let (r, f) = tokio::join!(
        old.restore::<Vec<(String, u64)>, _, _>(|v, _| Err(format!("{v}"))),
        old_sup.fresh()
    );
    assert_eq!((r.unwrap(), f.unwrap()), (None, ()));
    old.ready().unwrap();
    old_sup.ready().await.unwrap();

    old_sup.quiesce_async().await.unwrap();
    assert_eq!(within(old.next_event()).await, Event::Quiesce);
    old.snapshot(&vec![("a".to_owned(), 1u64)]).unwrap();
    let snap = old_sup.snapshot().await.unwrap();
    assert_eq!(snap.version, 1);
    assert_eq!(snap.state().unwrap(), serde_json::json!([["a", 1]]));

    // Version 2 stores a map and migrates.
    let mut new_sup = FakeSupervisor::new(2).unwrap();
    let new = start(&mut new_sup, Baton::builder().stateful(2));
    let (restored, outcome) = tokio::join!(new.restore(from_pairs), new_sup.restore(&snap));
    assert_eq!(restored.unwrap(), Some(Db::from([("a".to_owned(), 1)])));
    assert_eq!(outcome.unwrap(), Restore::Restored { from_version: 1 });

    // Commit reaches the old generation once, as a drain.
    old_sup.commit(Duration::from_secs(5), true).await.unwrap();
    let Event::Drain(info) = within(old.next_event()).await else {
        panic!("expected the drain");
    };
    assert_eq!(info.cause, DrainCause::Commit);
    assert!(info.migrate && info.deadline.is_some());
    assert_eq!(old.draining(), Some(info));
    assert!(
        tokio::time::timeout(Duration::from_millis(50), old.next_event())
            .await
            .is_err(),
        "the drain is told once"
    );
}

#[tokio::test]
async fn a_refused_snapshot_is_rejected_end_to_end() {
    let mut sup = FakeSupervisor::new(1).unwrap();
    let old = start(&mut sup, Baton::builder().stateful(9));
    old.snapshot(&vec![("a".to_owned(), 1u64)]).unwrap();
    let snap = sup.snapshot().await.unwrap();

    let mut new_sup = FakeSupervisor::new(2).unwrap();
    let new = start(&mut new_sup, Baton::builder().stateful(2));
    let restore = tokio::spawn({
        let new = new.clone();
        async move { new.restore(from_pairs).await }
    });
    let outcome = new_sup.restore(&snap).await.unwrap();
    let Restore::Rejected { reason } = outcome else {
        panic!("expected a rejection, got {outcome:?}");
    };
    assert!(reason.contains("version 9 refused"), "{reason}");
    // The SDK waits for the supervisor to stop it before returning.
    assert!(!restore.is_finished());
    new_sup.drain(Duration::from_secs(1), false).await.unwrap();
    let err = within(restore).await.unwrap().unwrap_err();
    assert!(matches!(err, Error::SnapshotRejected(r) if r == reason));
}

#[tokio::test]
async fn resume_after_a_failed_snapshot_and_events_before_restore_are_kept() {
    let mut sup = FakeSupervisor::new(1).unwrap();
    let baton = start(&mut sup, Baton::builder().stateful(1));
    // A quiesce that arrives while restore waits is delivered afterwards.
    sup.quiesce_async().await.unwrap();
    let (r, f) = tokio::join!(baton.restore::<Db, _, _>(from_pairs), sup.fresh());
    assert_eq!((r.unwrap(), f.unwrap()), (None, ()));
    assert_eq!(within(baton.next_event()).await, Event::Quiesce);
    baton.snapshot_failed("disk on fire").unwrap();
    let err = sup.snapshot().await.unwrap_err();
    assert!(err.to_string().contains("disk on fire"), "{err}");
    sup.resume("snapshot failed").await.unwrap();
    assert_eq!(
        within(baton.next_event()).await,
        Event::Resume {
            reason: "snapshot failed".into()
        }
    );
    assert!(matches!(
        baton.restore::<Db, _, _>(from_pairs).await,
        Err(Error::Protocol(_))
    ));
}

#[tokio::test]
async fn connection_counts_reach_the_supervisor() {
    let mut sup = FakeSupervisor::new(1).unwrap();
    let baton = start(&mut sup, Baton::builder());
    let a = baton.track();
    let b = baton.clone().track();
    sup.wait_connections(2).await.unwrap();
    drop(a);
    assert_eq!(baton.connections(), 1);
    drop(b);
    sup.wait_connections(0).await.unwrap();
    within(baton.idle()).await;
}

#[tokio::test]
async fn standalone_everything_is_a_no_op() {
    let baton = Baton::builder()
        .stateful(1)
        .adopt()
        .handle_signals(false)
        .start(baton_child::Env::standalone())
        .unwrap();
    assert!(!baton.is_supervised());
    assert_eq!(baton.restore::<Db, _, _>(from_pairs).await.unwrap(), None);
    baton.ready().unwrap();
    baton.snapshot(&Db::new()).unwrap();
    let mut incoming = baton.incoming("x", "127.0.0.1:0").unwrap();
    assert!(!incoming.adopts());
    assert!(incoming.try_accept_adopted().is_none());
    // Without a supervisor there is nobody to hand over to.
    let addr = incoming.local_addr().unwrap();
    let _client = TcpStream::connect(&addr).await.unwrap();
    let stream = within(incoming.accept()).await.unwrap();
    assert!(matches!(
        baton.hand_over(stream, b"", &()).await,
        Err(Error::ControlClosed)
    ));
    // Not announced: state calls say so.
    let plain = Baton::builder()
        .handle_signals(false)
        .start(baton_child::Env::standalone())
        .unwrap();
    assert!(matches!(plain.snapshot(&()), Err(Error::Feature { .. })));
}

#[tokio::test]
async fn a_dry_run_snapshot_resumes_and_a_down_migration_says_what_it_drops() {
    let mut sup = FakeSupervisor::new(1).unwrap();
    let baton = start(&mut sup, Baton::builder().stateful(2).restores([1, 2]));
    let (r, f) = tokio::join!(baton.restore::<Db, _, _>(from_pairs), sup.fresh());
    assert_eq!((r.unwrap(), f.unwrap()), (None, ()));
    let app = async {
        assert_eq!(within(baton.next_event()).await, Event::Quiesce);
        baton.snapshot(&vec![("a".to_owned(), 1u64)]).unwrap();
        within(baton.next_event()).await
    };
    let (snap, after) = tokio::join!(sup.dry_run_snapshot(), app);
    let snap = snap.unwrap();
    assert_eq!(snap.version, 2);
    assert!(snap.dropped.is_empty());
    assert_eq!(snap.state().unwrap(), serde_json::json!([["a", 1]]));
    // A dry run always ends in a resume: the app serves on.
    assert!(matches!(after, Event::Resume { reason } if reason.contains("dry-run")));

    let app = async {
        assert_eq!(within(baton.next_event()).await, Event::Quiesce);
        assert_eq!(baton.successor_restores(), Some(vec![1]));
        baton
            .snapshot_dropping(1, &vec![("a".to_owned(), 1u64)], &["/stats"])
            .unwrap();
    };
    let (snap, ()) = tokio::join!(sup.quiesce_for(&[1]), app);
    let snap = snap.unwrap();
    assert_eq!((snap.version, snap.dropped), (1, vec!["/stats".to_owned()]));
}
