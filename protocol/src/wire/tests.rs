use super::*;
use crate::child::{ChildMsg, SupervisorMsg};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, BorrowedFd};
use tokio::net::UnixStream;

fn memfile(content: &[u8]) -> OwnedFd {
    let mut f = tempfile_in_proc();
    f.write_all(content).unwrap();
    f.rewind().unwrap();
    f.into()
}

// An anonymous temp file without extra crates: O_TMPFILE in /tmp.
fn tempfile_in_proc() -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_TMPFILE)
        .open(std::env::temp_dir())
        .unwrap()
}

fn read_all(fd: OwnedFd) -> Vec<u8> {
    let mut f = std::fs::File::from(fd);
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

#[test]
fn decoder_closes_fds_no_line_claims() {
    let mut d = LineDecoder::new();
    // A message that announces no fds but carries three.
    d.push(
        b"{\"type\":\"connections\",\"active\":1}\n",
        [memfile(b"a"), memfile(b"b"), memfile(b"c")],
    );
    let f = d.next_frame().unwrap().unwrap();
    assert!(f.fds.is_empty());
    assert!(d.next_frame().unwrap().is_none());
    assert_eq!(d.queued_fds(), 0, "orphaned fds must be closed at once");
}

#[test]
fn decoder_refuses_fds_piling_up_behind_a_partial_line() {
    let mut d = LineDecoder::new();
    for _ in 0..=MAX_QUEUED_FDS {
        d.push(b"{", [memfile(b"x")]);
    }
    assert!(matches!(d.next_frame(), Err(WireError::TooManyFds)));
    assert_eq!(d.queued_fds(), 0);
}

#[test]
fn decoder_pairs_fds_with_lines_in_order() {
    let mut d = LineDecoder::new();
    // Two fd-carrying messages and one plain one arrive in odd chunks;
    // both fds were received with the first chunk.
    let a = br#"{"type":"adopt","fds":1,"listener":"http"}"#;
    let b = br#"{"type":"drain","deadline_ms":5}"#;
    let c = br#"{"type":"restore","fds":1,"size":3}"#;
    let mut stream = Vec::new();
    for l in [&a[..], &b[..], &c[..]] {
        stream.extend_from_slice(l);
        stream.push(b'\n');
    }
    d.push(&stream[..10], [memfile(b"one"), memfile(b"two")]);
    assert!(d.next_frame().unwrap().is_none());
    d.push(&stream[10..], []);

    let f = d.next_frame().unwrap().unwrap();
    assert!(matches!(
        f.parse::<SupervisorMsg>().unwrap(),
        SupervisorMsg::Adopt { .. }
    ));
    assert_eq!(read_all(f.fds.into_iter().next().unwrap()), b"one");

    let f = d.next_frame().unwrap().unwrap();
    assert_eq!(
        f.parse::<SupervisorMsg>().unwrap(),
        SupervisorMsg::Drain {
            deadline_ms: 5,
            migrate: false
        }
    );
    assert!(f.fds.is_empty());

    let f = d.next_frame().unwrap().unwrap();
    assert_eq!(f.kind(), "restore");
    assert_eq!(read_all(f.fds.into_iter().next().unwrap()), b"two");
    assert!(d.next_frame().unwrap().is_none());
    assert_eq!(d.queued_fds(), 0);
}

#[test]
fn unknown_messages_still_consume_their_fds() {
    let mut d = LineDecoder::new();
    d.push(
        b"{\"type\":\"from_the_future\",\"fds\":1}\n{\"type\":\"adopt\",\"fds\":1,\"listener\":\"x\"}\n",
        [memfile(b"future"), memfile(b"adopt")],
    );
    let f = d.next_frame().unwrap().unwrap();
    assert!(f.parse::<SupervisorMsg>().is_err());
    assert_eq!(f.fds.len(), 1);
    let f = d.next_frame().unwrap().unwrap();
    assert_eq!(read_all(f.fds.into_iter().next().unwrap()), b"adopt");
}

#[test]
fn missing_fds_and_malformed_lines_are_errors() {
    let mut d = LineDecoder::new();
    d.push(b"not json\n{\"type\":\"adopt\",\"fds\":1}\n\n", []);
    let e = d.next_frame().unwrap_err();
    assert!(matches!(e, WireError::Malformed { .. }) && !e.is_fatal());
    let e = d.next_frame().unwrap_err();
    assert!(
        matches!(
            e,
            WireError::MissingFds {
                wanted: 1,
                queued: 0
            }
        ) && e.is_fatal()
    );
    d.push(b"[1,2]\n{\"fds\":\"x\"}\n", []);
    assert!(matches!(d.next_frame(), Err(WireError::Malformed { .. })));
    assert!(matches!(d.next_frame(), Err(WireError::Malformed { .. })));
    assert!(d.next_frame().unwrap().is_none());
}

#[test]
fn overlong_lines_are_rejected() {
    let mut d = LineDecoder::new();
    d.push(&vec![b'x'; MAX_LINE + 1], []);
    assert!(matches!(d.next_frame(), Err(WireError::LineTooLong)));
}

#[tokio::test]
async fn frames_roundtrip_through_a_real_socketpair() {
    let (a, b) = UnixStream::pair().unwrap();
    let snapshot = memfile(b"{\"version\":1,\"state\":{}}");
    let msgs = [
        (
            encode(&ChildMsg::Hello {
                protocol: 1,
                features: vec![],
                restores: None,
            })
            .unwrap(),
            None,
        ),
        (
            encode(&ChildMsg::Snapshot {
                fds: 1,
                version: 1,
                size: 24,
                dropped: vec![],
            })
            .unwrap(),
            Some(snapshot),
        ),
        (encode(&ChildMsg::Connections { active: 3 }).unwrap(), None),
    ];
    for (line, fd) in &msgs {
        let fds: Vec<BorrowedFd<'_>> = fd.iter().map(AsFd::as_fd).collect();
        write_line(&a, line, &fds).await.unwrap();
    }
    drop(msgs);
    drop(a);

    let mut r = FrameReader::new();
    let f = r.next(&b).await.unwrap().unwrap();
    assert_eq!(
        f.parse::<ChildMsg>().unwrap(),
        ChildMsg::Hello {
            protocol: 1,
            features: vec![],
            restores: None,
        }
    );
    let f = r.next(&b).await.unwrap().unwrap();
    assert_eq!(f.kind(), "snapshot");
    assert_eq!(f.fds.len(), 1);
    let content = read_all(f.fds.into_iter().next().unwrap());
    assert_eq!(content, b"{\"version\":1,\"state\":{}}");
    let f = r.next(&b).await.unwrap().unwrap();
    assert_eq!(
        f.parse::<ChildMsg>().unwrap(),
        ChildMsg::Connections { active: 3 }
    );
    assert!(r.next(&b).await.unwrap().is_none());
}

#[tokio::test]
async fn eof_mid_line_is_truncation() {
    let (a, b) = UnixStream::pair().unwrap();
    write_line(&a, b"{\"type\":", &[]).await.unwrap();
    drop(a);
    let mut r = FrameReader::new();
    assert!(matches!(r.next(&b).await, Err(WireError::Truncated)));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn child_msg() -> impl Strategy<Value = ChildMsg> {
        prop_oneof![
            (any::<u64>()).prop_map(|active| ChildMsg::Connections { active }),
            Just(ChildMsg::Prepared),
            (".{0,40}").prop_map(|reason| ChildMsg::Rejected { reason }),
            (
                ".{0,20}",
                prop::collection::vec(any::<u8>(), 0..64),
                ".{0,20}"
            )
                .prop_map(|(listener, buffered, user)| ChildMsg::Migrate {
                    fds: 0,
                    listener,
                    buffered: String::from_utf8_lossy(&buffered).into_owned(),
                    meta: serde_json::json!({ "user": user }),
                }),
        ]
    }

    proptest! {
        /// Messages come out whole and in order however the stream is cut.
        #[test]
        fn any_split_of_valid_lines_decodes_them_in_order(
            msgs in prop::collection::vec(child_msg(), 1..8),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let stream: Vec<u8> = msgs.iter().flat_map(|m| encode(m).unwrap()).collect();
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            at.push(0);
            at.push(stream.len());
            at.sort_unstable();
            let mut d = LineDecoder::new();
            let mut out = Vec::new();
            for w in at.windows(2) {
                d.push(&stream[w[0]..w[1]], Vec::new());
                while let Some(f) = d.next_frame().unwrap() {
                    out.push(f.parse::<ChildMsg>().unwrap());
                }
            }
            prop_assert_eq!(out, msgs);
            prop_assert_eq!(d.buffered(), 0);
        }

        /// Garbage never panics the decoder, and it never hands out more fds than it got.
        #[test]
        fn arbitrary_bytes_and_fds_never_panic(
            chunks in prop::collection::vec(
                (prop::collection::vec(any::<u8>(), 0..300), 0usize..3),
                1..10,
            ),
        ) {
            let mut d = LineDecoder::new();
            let (mut given, mut handed) = (0usize, 0usize);
            for (bytes, nfds) in chunks {
                let fds: Vec<OwnedFd> = (0..nfds).map(|_| memfile(b"")).collect();
                given += fds.len();
                d.push(&bytes, fds);
                loop {
                    match d.next_frame() {
                        Ok(Some(f)) => handed += f.fds.len(),
                        Ok(None) => break,
                        Err(e) if e.is_fatal() => return Ok(()),
                        Err(_) => {}
                    }
                }
            }
            prop_assert!(handed + d.queued_fds() <= given);
        }

        /// Every message type survives a round trip, fds count included.
        #[test]
        fn supervisor_messages_round_trip(
            listener in ".{0,30}",
            buffered in ".{0,60}",
            deadline_ms in any::<u64>(),
            migrate in any::<bool>(),
            size in any::<u64>(),
        ) {
            for m in [
                SupervisorMsg::Adopt { fds: 1, listener: listener.clone(), buffered: buffered.clone(), meta: serde_json::json!([listener.clone()]) },
                SupervisorMsg::Drain { deadline_ms, migrate },
                SupervisorMsg::Commit { deadline_ms, migrate },
                SupervisorMsg::Restore { fds: 1, size },
                SupervisorMsg::Resume { reason: buffered.clone() },
            ] {
                let line = encode(&m).unwrap();
                prop_assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
                let back: SupervisorMsg = serde_json::from_slice(&line).unwrap();
                prop_assert_eq!(back, m);
            }
        }
    }
}
