//! The child's side of the stateful (two-phase) upgrade: versioned snapshots
//! in sealed memfds, restore with migration, and the quiesce / resume /
//! commit events.

use std::collections::VecDeque;
use std::fmt;
use std::io::BufWriter;
use std::marker::PhantomData;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::control::ControlTx;
use crate::error::{Error, Result};
use crate::sys;
use baton_protocol::ChildMsg;

/// What the old generation is asked to do during a stateful upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateEvent {
    /// Stop accepting **without closing the listeners** (connections wait in
    /// the kernel backlog), finish in-flight work, pause live connections,
    /// then call [`StateHandle::send_snapshot`] (or
    /// [`StateHandle::snapshot_failed`]).
    Quiesce,
    /// The upgrade was aborted: start accepting again, state intact.
    Resume {
        /// Why it was aborted.
        reason: String,
    },
    /// The candidate was promoted: hand over or close the paused
    /// connections, then exit. [`Drain`](crate::Drain) fires as well (cause
    /// [`Commit`](crate::DrainCause::Commit)).
    Commit {
        /// When the supervisor will SIGKILL this process.
        deadline: Instant,
        /// Whether the successor adopts connections.
        migrate: bool,
    },
}

/// What the control reader forwards to the state handle.
#[derive(Debug)]
pub(crate) enum StateMsg {
    Restore { fd: OwnedFd, size: u64 },
    Fresh { reason: String },
    Event(StateEvent),
}

/// The snapshot's JSON layout: `{"version": V, "state": ...}`.
#[derive(Serialize)]
struct SnapshotOut<'a, T> {
    version: u32,
    state: &'a T,
}

/// Takes part in stateful upgrades for state of type `T`, schema version
/// `version`. Get it from [`Baton::state`](crate::Baton::state) after
/// announcing the feature with [`Builder::stateful`](crate::Builder::stateful).
///
/// # Example
///
/// ```no_run
/// use std::collections::BTreeMap;
/// use baton_child::{Baton, StateEvent};
///
/// const SCHEMA: u32 = 2;
/// type Db = BTreeMap<String, String>;
///
/// # async fn f() -> Result<(), baton_child::Error> {
/// let mut baton = Baton::builder().stateful().from_env()?;
/// let listener = baton.tcp_listener("kv", "127.0.0.1:6379")?;
/// let mut state = baton.state::<Db>(SCHEMA)?;
/// // Version 1 stored a list of pairs; migrate it (Erlang's code_change).
/// let mut db: Db = state
///     .restore(|version, value| match version {
///         1 => serde_json::from_value::<Vec<(String, String)>>(value)
///             .map(|pairs| pairs.into_iter().collect())
///             .map_err(|e| e.to_string()),
///         v => Err(format!("cannot read schema version {v}")),
///     })
///     .await?
///     .unwrap_or_default();
/// baton.ready()?;
/// loop {
///     match state.next_event().await {
///         StateEvent::Quiesce => state.send_snapshot(&db)?,
///         StateEvent::Resume { .. } => { /* accept again */ }
///         StateEvent::Commit { .. } => break,
///         _ => {}
///     }
/// }
/// # drop(listener); db.clear(); Ok(()) }
/// ```
pub struct StateHandle<T> {
    version: u32,
    control: Option<ControlTx>,
    rx: Option<mpsc::UnboundedReceiver<StateMsg>>,
    pending: VecDeque<StateEvent>,
    restored: bool,
    _state: PhantomData<fn(T) -> T>,
}

impl<T> fmt::Debug for StateHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateHandle")
            .field("version", &self.version)
            .field("supervised", &self.control.is_some())
            .field("restored", &self.restored)
            .finish_non_exhaustive()
    }
}

impl<T> StateHandle<T>
where
    T: Serialize + DeserializeOwned,
{
    pub(crate) fn new(
        version: u32,
        control: Option<ControlTx>,
        rx: Option<mpsc::UnboundedReceiver<StateMsg>>,
    ) -> Self {
        StateHandle {
            version,
            control,
            rx,
            pending: VecDeque::new(),
            restored: false,
            _state: PhantomData,
        }
    }

    /// The schema version this program writes.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Gets the predecessor's state. Call it once, after everything except
    /// state is initialised and before [`Baton::ready`](crate::Baton::ready).
    ///
    /// Sends `prepared` and waits for the supervisor: `fresh` gives
    /// `Ok(None)` (start empty); `restore` gives the snapshot, which is
    /// checked (a sealed memfd of the announced size), parsed and answered
    /// with `restored`. A snapshot of this handle's version is deserialised
    /// directly; for any other version `migrate(version, state_json)` is
    /// called to convert it (or refuse with a reason).
    ///
    /// Standalone (no control socket) it returns `Ok(None)` at once. It
    /// waits as long as the supervisor takes (which kills a candidate that
    /// does not become ready within its ready timeout).
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotRejected`] after answering `rejected` (the snapshot
    /// was invalid, corrupt, truncated, or `migrate` refused it): the
    /// supervisor aborts the upgrade and kills this process, so exit.
    /// [`Error::ControlClosed`] if the supervisor went away,
    /// [`Error::Protocol`] on a second call.
    pub async fn restore<F>(&mut self, migrate: F) -> Result<Option<T>>
    where
        F: FnOnce(u32, serde_json::Value) -> Result<T, String>,
    {
        if self.restored {
            return Err(Error::Protocol("restore() called twice".to_owned()));
        }
        self.restored = true;
        let (Some(control), Some(rx)) = (&self.control, &mut self.rx) else {
            return Ok(None);
        };
        control.send(&ChildMsg::Prepared, None)?;
        tracing::debug!("prepared: waiting for the predecessor's state");
        loop {
            match rx.recv().await.ok_or(Error::ControlClosed)? {
                StateMsg::Fresh { reason } => {
                    tracing::info!(%reason, "no predecessor state: starting fresh");
                    return Ok(None);
                }
                StateMsg::Restore { fd, size } => {
                    let started = Instant::now();
                    return match read_snapshot(&fd, size, self.version, migrate) {
                        Ok((state, from_version)) => {
                            let restore_ms =
                                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                            tracing::info!(from_version, size, restore_ms, "state restored");
                            control.send(
                                &ChildMsg::Restored {
                                    from_version,
                                    restore_ms,
                                },
                                None,
                            )?;
                            Ok(Some(state))
                        }
                        Err(reason) => {
                            tracing::error!(%reason, "rejecting the snapshot");
                            // Wait until the line is on the socket: the caller is told to
                            // exit, and a queued-but-unwritten `rejected` would be lost
                            // with the process, and with it the reason baton reports.
                            control
                                .send_and_wait(
                                    &ChildMsg::Rejected {
                                        reason: reason.clone(),
                                    },
                                    None,
                                )
                                .await?;
                            Err(Error::SnapshotRejected(reason))
                        }
                    };
                }
                StateMsg::Event(e) => {
                    tracing::warn!(event = ?e, "state event before restore; keeping it for later");
                    self.pending.push_back(e);
                }
            }
        }
    }

    /// The next instruction from the supervisor. Never resolves standalone
    /// or once the supervisor is gone (its death drains the process through
    /// the parent-death signal instead). Cancel-safe.
    pub async fn next_event(&mut self) -> StateEvent {
        if let Some(e) = self.pending.pop_front() {
            return e;
        }
        let Some(rx) = &mut self.rx else {
            return std::future::pending().await;
        };
        loop {
            match rx.recv().await {
                Some(StateMsg::Event(e)) => return e,
                Some(StateMsg::Restore { .. } | StateMsg::Fresh { .. }) => {
                    tracing::warn!("unexpected restore/fresh outside restore(); ignored");
                }
                None => return std::future::pending().await,
            }
        }
    }

    /// Writes `{"version": V, "state": state}` into a sealed memfd and sends
    /// it to the supervisor (the answer to [`StateEvent::Quiesce`]). The
    /// JSON is streamed into the memfd; the supervisor never copies it. A
    /// no-op standalone.
    ///
    /// # Errors
    ///
    /// [`Error::Snapshot`] if serialising or writing fails (then call
    /// [`snapshot_failed`](Self::snapshot_failed)), [`Error::ControlClosed`].
    pub fn send_snapshot(&self, state: &T) -> Result<()> {
        let Some(control) = &self.control else {
            return Ok(());
        };
        let started = Instant::now();
        let (fd, size) = write_snapshot(self.version, state)?;
        tracing::info!(
            version = self.version,
            size,
            ms = started.elapsed().as_millis(),
            "snapshot written"
        );
        control.send(
            &ChildMsg::Snapshot {
                fds: 1,
                version: self.version,
                size,
            },
            Some(fd),
        )
    }

    /// Sends `bytes`, unchecked, as the snapshot of this handle's version (in
    /// a sealed memfd, like [`send_snapshot`](Self::send_snapshot)). For
    /// fault-injection tests of the receiving side only: corrupt or truncated
    /// snapshots must be rejected by the candidate and roll the upgrade back.
    /// A no-op standalone.
    ///
    /// # Errors
    ///
    /// As [`send_snapshot`](Self::send_snapshot).
    #[doc(hidden)]
    pub fn send_raw_snapshot(&self, bytes: &[u8]) -> Result<()> {
        let Some(control) = &self.control else {
            return Ok(());
        };
        let (fd, size) = write_memfd(|w| {
            std::io::Write::write_all(w, bytes).map_err(|e| format!("writing the memfd: {e}"))
        })?;
        tracing::warn!(
            version = self.version,
            size,
            "sending an unchecked snapshot"
        );
        control.send(
            &ChildMsg::Snapshot {
                fds: 1,
                version: self.version,
                size,
            },
            Some(fd),
        )
    }

    /// Tells the supervisor no snapshot can be made; it aborts the upgrade
    /// and sends [`StateEvent::Resume`]. A no-op standalone.
    ///
    /// # Errors
    ///
    /// [`Error::ControlClosed`].
    pub fn snapshot_failed(&self, reason: &str) -> Result<()> {
        match &self.control {
            Some(c) => c.send(
                &ChildMsg::SnapshotFailed {
                    reason: reason.to_owned(),
                },
                None,
            ),
            None => Ok(()),
        }
    }
}

/// Serialises a snapshot into a new sealed memfd; returns it and its size.
pub(crate) fn write_snapshot<T: Serialize>(version: u32, state: &T) -> Result<(OwnedFd, u64)> {
    write_memfd(|w| {
        serde_json::to_writer(w, &SnapshotOut { version, state })
            .map_err(|e| format!("serialising the state: {e}"))
    })
}

/// Fills a new memfd through `fill`, seals it; returns it and its size.
fn write_memfd<F>(fill: F) -> Result<(OwnedFd, u64)>
where
    F: FnOnce(&mut BufWriter<std::fs::File>) -> std::result::Result<(), String>,
{
    let fail = |what: &str, e: &dyn fmt::Display| Error::Snapshot(format!("{what}: {e}"));
    let fd = sys::memfd("baton-snapshot").map_err(|e| fail("memfd_create", &e))?;
    let file = std::fs::File::from(fd.try_clone().map_err(|e| fail("dup", &e))?);
    let mut w = BufWriter::with_capacity(1 << 16, file);
    fill(&mut w).map_err(Error::Snapshot)?;
    let file = w
        .into_inner()
        .map_err(|e| fail("writing the memfd", &e.into_error()))?;
    let size = file.metadata().map_err(|e| fail("fstat", &e))?.len();
    drop(file);
    sys::seal_immutable(fd.as_fd()).map_err(|e| fail("sealing the memfd", &e))?;
    Ok((fd, size))
}

/// Checks, maps and parses a received snapshot; returns the state and the
/// version it was written with. The error is the reason sent in `rejected`.
pub(crate) fn read_snapshot<T, F>(
    fd: &OwnedFd,
    size: u64,
    version: u32,
    migrate: F,
) -> std::result::Result<(T, u32), String>
where
    T: DeserializeOwned,
    F: FnOnce(u32, serde_json::Value) -> std::result::Result<T, String>,
{
    let actual = sys::regular_file_size(fd.as_fd())
        .map_err(|e| format!("snapshot fd: fstat: {e}"))?
        .ok_or("snapshot fd is not a memfd or regular file")?;
    let seals = sys::seals(fd.as_fd()).map_err(|e| format!("snapshot fd is not sealable: {e}"))?;
    if !seals.contains(sys::immutable_seals()) {
        return Err(format!(
            "snapshot memfd is not sealed against write/shrink/grow (seals {seals:?})"
        ));
    }
    if actual != size {
        return Err(format!(
            "snapshot is {actual} bytes but was announced as {size} (truncated or corrupt)"
        ));
    }
    if size == 0 {
        return Err("snapshot is empty".to_owned());
    }
    let map = sys::SealedMap::new(fd.as_fd()).map_err(|e| format!("mapping the snapshot: {e}"))?;
    let bytes = map.as_slice();
    let corrupt = |e: serde_json::Error| {
        let hint = if e.is_eof() { " (truncated?)" } else { "" };
        format!("snapshot is not valid JSON{hint}: {e}")
    };
    // One pass: `version` comes first (as `send_snapshot` writes it), so `state` is
    // decoded straight into `T` when the versions match, or into a `Value` for `migrate`.
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let decoded = serde::de::DeserializeSeed::deserialize(
        Envelope::<T> {
            ours: version,
            _t: PhantomData,
        },
        &mut de,
    )
    .and_then(|d| de.end().map(|()| d))
    .map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            format!("snapshot does not match this program's state type (version {version}): {e}")
        }
        _ => corrupt(e),
    })?;
    match decoded {
        Decoded::Current(state) => Ok((state, version)),
        Decoded::Other(found, value) => {
            tracing::info!(from = found, to = version, "migrating the snapshot");
            let state = migrate(found, value).map_err(|e| {
                format!("snapshot version {found} refused by this program (version {version}): {e}")
            })?;
            Ok((state, found))
        }
    }
}

/// What one pass over `{"version": V, "state": ...}` produced.
enum Decoded<T> {
    /// The program's own version, decoded into its type.
    Current(T),
    /// Another version, as JSON, for the migration hook.
    Other(u32, serde_json::Value),
}

/// Decodes the snapshot envelope in a single pass (see [`Decoded`]).
struct Envelope<T> {
    ours: u32,
    _t: PhantomData<T>,
}

impl<'de, T: DeserializeOwned> serde::de::DeserializeSeed<'de> for Envelope<T> {
    type Value = Decoded<T>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Decoded<T>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: DeserializeOwned> serde::de::Visitor<'de> for Envelope<T> {
    type Value = Decoded<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a snapshot object {\"version\": N, \"state\": ...}")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Decoded<T>, A::Error> {
        use serde::de::Error as _;
        let mut version: Option<u32> = None;
        let mut out: Option<Decoded<T>> = None;
        // `state` before `version` (another writer): keep it as JSON until we know.
        let mut early: Option<serde_json::Value> = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "version" => version = Some(map.next_value()?),
                "state" => match version {
                    Some(v) if v == self.ours => out = Some(Decoded::Current(map.next_value()?)),
                    Some(v) => out = Some(Decoded::Other(v, map.next_value()?)),
                    None => early = Some(map.next_value()?),
                },
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        let version = version.ok_or_else(|| A::Error::missing_field("version"))?;
        match (out, early) {
            (Some(d), _) => Ok(d),
            (None, Some(v)) if version == self.ours => T::deserialize(v)
                .map(Decoded::Current)
                .map_err(A::Error::custom),
            (None, Some(v)) => Ok(Decoded::Other(version, v)),
            (None, None) => Err(A::Error::missing_field("state")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::Env;
    use crate::testutil::{self, recv, send, BOUND};
    use crate::{Baton, DrainCause};
    use baton_protocol::wire::FrameReader;
    use baton_protocol::SupervisorMsg;
    use std::collections::BTreeMap;
    use std::io::Write;
    use std::time::Duration;
    use tokio::net::UnixStream;

    type Db = BTreeMap<String, u64>;

    fn no_migration(v: u32, _: serde_json::Value) -> std::result::Result<Db, String> {
        Err(format!("no migration from {v}"))
    }

    fn memfd_with(content: &[u8], seal: bool) -> OwnedFd {
        let fd = sys::memfd("test").unwrap();
        std::fs::File::from(fd.try_clone().unwrap())
            .write_all(content)
            .unwrap();
        if seal {
            sys::seal_immutable(fd.as_fd()).unwrap();
        }
        fd
    }

    #[test]
    fn snapshot_roundtrip_same_version() {
        let db: Db = [("a".to_owned(), 1), ("b".to_owned(), 2)].into();
        let (fd, size) = write_snapshot(3, &db).unwrap();
        // Sealed: the receiver can trust it does not change.
        assert!(sys::seals(fd.as_fd())
            .unwrap()
            .contains(sys::immutable_seals()));
        let (back, from): (Db, u32) = read_snapshot(&fd, size, 3, no_migration).unwrap();
        assert_eq!(back, db);
        assert_eq!(from, 3);
    }

    #[test]
    fn older_versions_go_through_the_migration() {
        // Version 1 stored a list of pairs.
        let old = vec![("x".to_owned(), 7u64)];
        let (fd, size) = write_snapshot(1, &old).unwrap();
        let (db, from): (Db, u32) = read_snapshot(&fd, size, 2, |v, value| {
            assert_eq!(v, 1);
            serde_json::from_value::<Vec<(String, u64)>>(value)
                .map(|p| p.into_iter().collect())
                .map_err(|e| e.to_string())
        })
        .unwrap();
        assert_eq!(from, 1);
        assert_eq!(db.get("x"), Some(&7));

        let (fd, size) = write_snapshot(9, &old).unwrap();
        let err = read_snapshot::<Db, _>(&fd, size, 2, no_migration).unwrap_err();
        assert!(err.contains("version 9 refused"), "{err}");
    }

    #[test]
    fn envelope_fields_in_any_order_and_unknown_ones_ignored() {
        let cases: [(&[u8], u32); 3] = [
            (br#"{"state":{"a":1},"version":2}"#, 2),
            (
                br#"{"note":"x","version":2,"state":{"a":1},"more":[1,2]}"#,
                2,
            ),
            (br#"{"state":[["a",1]],"version":1}"#, 1),
        ];
        for (text, found) in cases {
            let fd = memfd_with(text, true);
            let (db, from): (Db, u32) = read_snapshot(&fd, text.len() as u64, 2, |v, value| {
                assert_eq!(v, 1);
                serde_json::from_value::<Vec<(String, u64)>>(value)
                    .map(|p| p.into_iter().collect())
                    .map_err(|e| e.to_string())
            })
            .unwrap();
            assert_eq!(from, found);
            assert_eq!(db.get("a"), Some(&1));
        }
        for (text, want) in [
            (&br#"{"state":{"a":1}}"#[..], "missing field `version`"),
            (&br#"{"version":2}"#[..], "missing field `state`"),
            (
                &br#"{"version":2,"state":{"a":1}} trailing"#[..],
                "trailing",
            ),
        ] {
            let fd = memfd_with(text, true);
            let err = read_snapshot::<Db, _>(&fd, text.len() as u64, 2, no_migration).unwrap_err();
            assert!(err.contains(want), "expected {want:?} in {err:?}");
        }
    }

    #[test]
    fn bad_snapshots_are_rejected_with_a_reason() {
        let good = br#"{"version":1,"state":{"a":1}}"#;
        let cases: Vec<(OwnedFd, u64, &str)> = vec![
            (memfd_with(good, false), good.len() as u64, "not sealed"),
            (memfd_with(good, true), good.len() as u64 + 5, "announced"),
            (
                memfd_with(&good[..good.len() - 4], true),
                good.len() as u64 - 4,
                "truncated?",
            ),
            (memfd_with(b"\x00\x01garbage", true), 9, "not valid JSON"),
            (
                memfd_with(br#"{"version":1,"state":"nope"}"#, true),
                28,
                "does not match",
            ),
            (memfd_with(b"", true), 0, "empty"),
            (
                std::fs::File::open("/dev/null").unwrap().into(),
                0,
                "not a memfd",
            ),
        ];
        for (fd, size, want) in cases {
            let err = read_snapshot::<Db, _>(&fd, size, 1, no_migration).unwrap_err();
            assert!(err.contains(want), "expected {want:?} in {err:?}");
        }
    }

    fn child(generation: u64) -> (Baton, UnixStream) {
        testutil::child(Baton::builder().stateful(), generation)
    }

    #[tokio::test]
    async fn stateful_upgrade_through_real_sockets() {
        let (mut old, old_sup) = child(1);
        let (mut new, new_sup) = child(2);
        let (mut old_r, mut new_r) = (FrameReader::new(), FrameReader::new());
        for (r, s) in [(&mut old_r, &old_sup), (&mut new_r, &new_sup)] {
            let (hello, _) = recv(r, s).await;
            assert_eq!(
                hello,
                ChildMsg::Hello {
                    protocol: 1,
                    features: vec![baton_protocol::Feature::State]
                }
            );
        }

        // Generation 1: the first one starts fresh.
        let mut old_state = old.state::<Db>(2).unwrap();
        let first = tokio::spawn(async move {
            let r = old_state.restore(no_migration).await;
            (r, old_state)
        });
        assert_eq!(recv(&mut old_r, &old_sup).await.0, ChildMsg::Prepared);
        send(
            &old_sup,
            &SupervisorMsg::Fresh {
                reason: "first generation".into(),
            },
            None,
        )
        .await;
        let (r, mut old_state) = tokio::time::timeout(BOUND, first).await.unwrap().unwrap();
        assert_eq!(r.unwrap(), None);

        // Generation 2 prepares; generation 1 quiesces and snapshots.
        let mut new_state = new.state::<Db>(2).unwrap();
        let candidate = tokio::spawn(async move {
            let r = new_state.restore(no_migration).await;
            (r, new_state)
        });
        assert_eq!(recv(&mut new_r, &new_sup).await.0, ChildMsg::Prepared);
        send(&old_sup, &SupervisorMsg::Quiesce, None).await;
        let ev = tokio::time::timeout(BOUND, old_state.next_event())
            .await
            .unwrap();
        assert_eq!(ev, StateEvent::Quiesce);
        let db: Db = (0..1000).map(|i| (format!("key{i}"), i)).collect();
        old_state.send_snapshot(&db).unwrap();
        let (msg, mut fds) = recv(&mut old_r, &old_sup).await;
        let ChildMsg::Snapshot {
            fds: 1,
            version: 2,
            size,
        } = msg
        else {
            panic!("expected a snapshot, got {msg:?}");
        };
        assert_eq!(fds.len(), 1);
        let memfd = fds.remove(0);

        // The supervisor relays the fd without reading it.
        send(
            &new_sup,
            &SupervisorMsg::Restore { fds: 1, size },
            Some(&memfd),
        )
        .await;
        let (r, _new_state) = tokio::time::timeout(BOUND, candidate)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.unwrap(), Some(db));
        let (msg, _) = recv(&mut new_r, &new_sup).await;
        assert!(
            matches!(
                msg,
                ChildMsg::Restored {
                    from_version: 2,
                    ..
                }
            ),
            "{msg:?}"
        );

        // Commit ends generation 1: a state event and a drain.
        let drain = old.drain();
        send(
            &old_sup,
            &SupervisorMsg::Commit {
                deadline_ms: 5000,
                migrate: true,
            },
            None,
        )
        .await;
        let ev = tokio::time::timeout(BOUND, old_state.next_event())
            .await
            .unwrap();
        assert!(
            matches!(ev, StateEvent::Commit { migrate: true, .. }),
            "{ev:?}"
        );
        let info = tokio::time::timeout(BOUND, drain.wait()).await.unwrap();
        assert_eq!(info.cause, DrainCause::Commit);
        assert!(info.migrate);
    }

    #[tokio::test]
    async fn a_bad_snapshot_is_answered_with_rejected() {
        let (mut new, sup) = child(2);
        let mut r = FrameReader::new();
        recv(&mut r, &sup).await; // hello
        let mut st = new.state::<Db>(2).unwrap();
        assert!(matches!(new.state::<Db>(2), Err(Error::Feature { .. })));
        let task = tokio::spawn(async move { st.restore(no_migration).await });
        assert_eq!(recv(&mut r, &sup).await.0, ChildMsg::Prepared);
        // Announced bigger than it is: a truncated snapshot.
        let body = br#"{"version":2,"state":{"a":1}}"#;
        let fd = memfd_with(body, true);
        send(
            &sup,
            &SupervisorMsg::Restore {
                fds: 1,
                size: body.len() as u64 * 2,
            },
            Some(&fd),
        )
        .await;
        let res = tokio::time::timeout(BOUND, task).await.unwrap().unwrap();
        assert!(matches!(res, Err(Error::SnapshotRejected(_))), "{res:?}");
        let (msg, _) = recv(&mut r, &sup).await;
        let ChildMsg::Rejected { reason } = msg else {
            panic!("expected rejected, got {msg:?}");
        };
        assert!(reason.contains("announced"), "{reason}");
    }

    /// An app exits as soon as `restore` reports a rejection, so `rejected` must already be
    /// on the socket when `restore` returns, not merely queued for the writer task.
    #[tokio::test(flavor = "current_thread")]
    async fn rejected_is_written_before_restore_returns() {
        use std::io::Read;
        let (mut new, sup) = child(2);
        let mut r = FrameReader::new();
        recv(&mut r, &sup).await; // hello
        let mut st = new.state::<Db>(2).unwrap();
        let body = br#"{"version":2,"state":"#;
        let fd = memfd_with(body, true);
        let restore = SupervisorMsg::Restore {
            fds: 1,
            size: body.len() as u64,
        };
        send(&sup, &restore, Some(&fd)).await;
        let res = tokio::time::timeout(BOUND, st.restore(no_migration))
            .await
            .unwrap();
        assert!(matches!(res, Err(Error::SnapshotRejected(_))), "{res:?}");
        // No await from here on: on this single-threaded runtime the SDK's writer task cannot
        // run any more, so whatever is not on the socket yet would be lost with the process.
        let sup = sup.into_std().unwrap();
        sup.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match (&sup).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains(r#""type":"rejected""#), "{text}");
        assert!(text.contains("truncated?"), "{text}");
    }

    #[tokio::test]
    async fn raw_snapshots_are_sealed_and_sized_but_unchecked() {
        let (mut old, sup) = child(1);
        let mut r = FrameReader::new();
        recv(&mut r, &sup).await; // hello
        let st = old.state::<Db>(2).unwrap();
        let half = br#"{"version":2,"sta"#;
        st.send_raw_snapshot(half).unwrap();
        let (msg, mut fds) = recv(&mut r, &sup).await;
        assert_eq!(
            msg,
            ChildMsg::Snapshot {
                fds: 1,
                version: 2,
                size: half.len() as u64
            }
        );
        let fd = fds.remove(0);
        // It passes the transport checks (sealed, size as announced), and only the
        // candidate's parser refuses it.
        let err = read_snapshot::<Db, _>(&fd, half.len() as u64, 2, no_migration).unwrap_err();
        assert!(err.contains("truncated?"), "{err}");
    }

    #[tokio::test]
    async fn resume_and_snapshot_failed() {
        let (mut old, sup) = child(1);
        let mut r = FrameReader::new();
        recv(&mut r, &sup).await; // hello
        let mut st = old.state::<Db>(1).unwrap();
        send(&sup, &SupervisorMsg::Quiesce, None).await;
        assert_eq!(
            tokio::time::timeout(BOUND, st.next_event()).await.unwrap(),
            StateEvent::Quiesce
        );
        st.snapshot_failed("disk on fire").unwrap();
        assert_eq!(
            recv(&mut r, &sup).await.0,
            ChildMsg::SnapshotFailed {
                reason: "disk on fire".into()
            }
        );
        send(
            &sup,
            &SupervisorMsg::Resume {
                reason: "snapshot failed".into(),
            },
            None,
        )
        .await;
        assert_eq!(
            tokio::time::timeout(BOUND, st.next_event()).await.unwrap(),
            StateEvent::Resume {
                reason: "snapshot failed".into()
            }
        );
        assert!(!old.drain().is_draining());
    }

    #[tokio::test]
    async fn standalone_state_is_a_no_op() {
        let mut baton = Baton::builder()
            .stateful()
            .handle_signals(false)
            .start(Env::standalone())
            .unwrap();
        let mut st = baton.state::<Db>(1).unwrap();
        assert_eq!(st.restore(no_migration).await.unwrap(), None);
        st.send_snapshot(&Db::new()).unwrap();
        let pending = tokio::time::timeout(Duration::from_millis(50), st.next_event()).await;
        assert!(pending.is_err(), "no event can come standalone");
        let mut plain = Baton::builder()
            .handle_signals(false)
            .start(Env::standalone())
            .unwrap();
        assert!(matches!(plain.state::<Db>(1), Err(Error::Feature { .. })));
    }
}
