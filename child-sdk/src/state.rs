//! The stateful upgrade, as the app sees it: restore (candidate), then the
//! quiesce / resume / drain events and the snapshot (old generation). The
//! bytes are the codec's business.

use std::fmt;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use baton_protocol::ChildMsg;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::baton::Baton;
use crate::codec;
use crate::dispatch::StateMsg;
use crate::error::{Error, Result};
use crate::events::Event;
use crate::send::ControlTx;
use tokio::sync::mpsc;

/// How long a candidate that rejected the snapshot waits for the supervisor
/// to stop it, so that baton reports the rejection rather than "exited".
const REJECTED_GRACE: Duration = Duration::from_secs(10);

impl Baton {
    fn state_version(&self) -> Result<u32> {
        self.inner.state_version.ok_or(Error::Feature {
            feature: "state",
            reason: "not announced: use Baton::builder().stateful(VERSION)",
        })
    }

    /// Gets the predecessor's state, typed by this call. Call it once, after
    /// everything except state is initialised and before
    /// [`ready`](Self::ready).
    ///
    /// A snapshot of this program's version (from [`Builder::stateful`](crate::Builder::stateful))
    /// is decoded straight into `T`; for any other version,
    /// `migrate(version, state_json)` converts it (Erlang's `code_change`)
    /// or refuses it with a reason. `Ok(None)`: there is no predecessor
    /// state (the first generation, a stateless upgrade, or standalone).
    ///
    /// A rejection is handled end to end: the SDK tells the supervisor why
    /// (it aborts the upgrade and the old generation resumes), waits for it
    /// to stop this process, and returns [`Error::SnapshotRejected`] for the
    /// app to exit with.
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotRejected`] as above (the snapshot was invalid,
    /// truncated, of the wrong type, or `migrate` refused it),
    /// [`Error::Feature`] if `state` was not announced,
    /// [`Error::ControlClosed`] if the supervisor went away,
    /// [`Error::Protocol`] on a second call.
    ///
    /// # Example
    ///
    /// ```no_run
    /// use std::collections::BTreeMap;
    /// # async fn f(env: baton_child::Env) -> Result<(), baton_child::Error> {
    /// let baton = baton_child::Baton::builder().stateful(2).start(env)?;
    /// // Version 1 stored a list of pairs; version 2 stores a map.
    /// let db: BTreeMap<String, String> = baton
    ///     .restore(|version, json| match version {
    ///         1 => serde_json::from_value::<Vec<(String, String)>>(json)
    ///             .map(|pairs| pairs.into_iter().collect())
    ///             .map_err(|e| e.to_string()),
    ///         v => Err(format!("cannot read schema version {v}")),
    ///     })
    ///     .await?
    ///     .unwrap_or_default();
    /// baton.ready()?;
    /// # drop(db); Ok(()) }
    /// ```
    pub async fn restore<T, E, F>(&self, migrate: F) -> Result<Option<T>>
    where
        T: DeserializeOwned,
        E: fmt::Display,
        F: FnOnce(u32, serde_json::Value) -> std::result::Result<T, E>,
    {
        let migrate = |v, json| migrate(v, json).map_err(|e| e.to_string());
        self.restore_with(OneShot(migrate)).await
    }

    /// Says `prepared`, receives the state through `how`, and reports
    /// `restored` or `rejected`.
    pub(crate) async fn restore_with<T, R: Receive<T>>(&self, how: R) -> Result<Option<T>> {
        let version = self.state_version()?;
        let mut state = self.inner.state.lock().await;
        if state.restored {
            return Err(Error::Protocol("restore() called twice".to_owned()));
        }
        state.restored = true;
        let (Some(control), Some(rx)) = (&self.inner.control, state.rx.as_mut()) else {
            return Ok(None);
        };
        control.send(&ChildMsg::Prepared, None)?;
        tracing::debug!("prepared: waiting for the predecessor's state");
        let mut early = Vec::new();
        let ctx = Control {
            baton: self.clone(),
            tx: control.clone(),
            version,
        };
        let result = how.receive(rx, &mut early, &ctx).await?;
        if !early.is_empty() {
            tracing::warn!(events = ?early, "state events before restore; kept for later");
            state.pending.extend(early);
        }
        drop(state);
        match result {
            Ok(None) => Ok(None),
            Ok(Some(got)) => {
                let restore_ms =
                    u64::try_from(got.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                let from_version = got.from_version;
                tracing::info!(from_version, size = got.bytes, restore_ms, "state restored");
                let msg = ChildMsg::Restored {
                    from_version,
                    restore_ms,
                };
                control.send(&msg, None)?;
                Ok(Some(got.state))
            }
            Err(reason) => {
                tracing::error!(%reason, "rejecting the snapshot");
                // On the socket before we go on: the process is about to exit, and an
                // unwritten `rejected` would take the reason baton reports with it.
                let msg = ChildMsg::Rejected {
                    reason: reason.clone(),
                };
                control.send_and_wait(&msg, None).await?;
                // The supervisor aborts and stops us; exiting first would race its
                // report of the reason with "candidate exited".
                let _ = tokio::time::timeout(REJECTED_GRACE, self.wait_drain()).await;
                Err(Error::SnapshotRejected(reason))
            }
        }
    }

    /// The next instruction: [`Event::Quiesce`] and [`Event::Resume`] in a
    /// stateful upgrade, and [`Event::Drain`] once, when draining starts
    /// (whatever the cause). Never resolves after the drain. Cancel-safe.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f(baton: baton_child::Baton, db: std::collections::BTreeMap<String, String>) -> Result<(), baton_child::Error> {
    /// use baton_child::Event;
    /// loop {
    ///     match baton.next_event().await {
    ///         Event::Quiesce => baton.snapshot(&db)?, // and pause clients
    ///         Event::Resume { .. } => {}              // accept again
    ///         Event::Drain(_) => break,               // hand over or close, then exit
    ///         _ => {}
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn next_event(&self) -> Event {
        let mut state = self.inner.state.lock().await;
        if let Some(e) = state.pending.pop_front() {
            return e;
        }
        loop {
            let told = state.drain_told;
            let rx = state.rx.as_mut();
            let recv = async {
                match rx {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let drain = async {
                if told {
                    std::future::pending().await
                } else {
                    self.wait_drain().await
                }
            };
            // The reader queues quiesce/resume before it triggers a drain that
            // follows them, so checking the queue first keeps their order.
            let msg = tokio::select! {
                biased;
                m = recv => Ok(m),
                info = drain => Err(info),
            };
            match msg {
                Err(info) => {
                    state.drain_told = true;
                    return Event::Drain(info);
                }
                Ok(Some(msg)) => match self.event_of(msg) {
                    Some(e) => return e,
                    None => tracing::warn!("restore message outside restore(); ignored"),
                },
                Ok(None) => state.rx = None,
            }
        }
    }

    /// Writes `{"version": V, "state": state}` into a sealed memfd and sends
    /// it to the supervisor: the answer to [`Event::Quiesce`]. The JSON is
    /// streamed into the memfd; baton never copies it. A no-op standalone.
    ///
    /// # Errors
    ///
    /// [`Error::Snapshot`] if serialising or writing fails (then call
    /// [`snapshot_failed`](Self::snapshot_failed)), [`Error::Feature`] if
    /// `state` was not announced, [`Error::ControlClosed`].
    pub fn snapshot(&self, state: &impl Serialize) -> Result<()> {
        let version = self.state_version()?;
        if let Some(accept) = self.successor_restores() {
            if !accept.contains(&version) {
                return Err(Error::Snapshot(format!(
                    "the successor restores schema versions {accept:?}, and this generation writes version {version} only (write an older one with snapshot_as)"
                )));
            }
        }
        self.snapshot_as(version, state)
    }

    /// The schema versions the successor restores, as the last
    /// [`Event::Quiesce`] said (`None`: it did not say; write this program's
    /// own). A successor of an older schema (a revert, a downgrade) lists only
    /// older versions: answer with [`snapshot_as`](Self::snapshot_as) in one
    /// of them, or [`snapshot_failed`](Self::snapshot_failed) to refuse.
    pub fn successor_restores(&self) -> Option<Vec<u32>> {
        self.inner
            .successor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_successor(&self, accept: Option<Vec<u32>>) {
        *self
            .inner
            .successor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = accept;
    }

    /// Like [`snapshot`](Self::snapshot), but `state` is written as schema
    /// `version`: the down-conversion (Erlang's `code_change({down, V})`) for
    /// a successor that restores only older versions.
    ///
    /// # Errors
    ///
    /// As [`snapshot`](Self::snapshot); also [`Error::Snapshot`] when the
    /// successor said it does not restore `version`.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # fn f(baton: &baton_child::Baton, pairs: &Vec<(String, String)>) -> Result<(), baton_child::Error> {
    /// // Schema 2 holds a map; schema 1 held a list of pairs.
    /// match baton.successor_restores() {
    ///     Some(v) if !v.contains(&2) && v.contains(&1) => baton.snapshot_as(1, pairs)?,
    ///     _ => { /* baton.snapshot(&map)? */ }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn snapshot_as(&self, version: u32, state: &impl Serialize) -> Result<()> {
        self.snapshot_dropping(version, state, &[])
    }

    /// Like [`snapshot_as`](Self::snapshot_as), for a down-migration that loses
    /// something, and says what: `dropped` holds JSON pointers into the state (e.g.
    /// `"/stats"`) of the fields the older schema cannot hold or that it cannot fill
    /// faithfully. `baton rehearse` lists them and leaves them out when it checks
    /// that a round trip gives the state back.
    ///
    /// # Errors
    ///
    /// As [`snapshot_as`](Self::snapshot_as).
    pub fn snapshot_dropping(
        &self,
        version: u32,
        state: &impl Serialize,
        dropped: &[&str],
    ) -> Result<()> {
        self.state_version()?;
        if let Some(accept) = self.successor_restores() {
            if !accept.contains(&version) {
                return Err(Error::Snapshot(format!(
                    "the successor restores schema versions {accept:?}, not {version}"
                )));
            }
        }
        let Some(control) = &self.inner.control else {
            return Ok(());
        };
        let started = Instant::now();
        let (fd, size) = codec::write_snapshot(version, state)?;
        let ms = started.elapsed().as_millis();
        tracing::info!(version, size, ms, "snapshot written");
        let dropped = dropped.iter().map(|s| (*s).to_owned()).collect();
        send_snapshot(control, version, fd, size, dropped)
    }

    /// Tells the supervisor no snapshot can be made; it aborts the upgrade
    /// and sends [`Event::Resume`]. A no-op standalone.
    ///
    /// # Errors
    ///
    /// [`Error::ControlClosed`].
    pub fn snapshot_failed(&self, reason: &str) -> Result<()> {
        match &self.inner.control {
            Some(c) => c.send(
                &ChildMsg::SnapshotFailed {
                    reason: reason.to_owned(),
                },
                None,
            ),
            None => Ok(()),
        }
    }

    /// Sends `bytes`, unchecked, as this program's snapshot (in a sealed
    /// memfd, like [`snapshot`](Self::snapshot)). For fault-injection tests
    /// of the receiving side: corrupt or truncated snapshots must be
    /// rejected by the candidate and roll the upgrade back. A no-op
    /// standalone.
    ///
    /// # Errors
    ///
    /// As [`snapshot`](Self::snapshot).
    #[cfg(feature = "testing")]
    pub fn snapshot_raw(&self, bytes: &[u8]) -> Result<()> {
        let version = self.state_version()?;
        let Some(control) = &self.inner.control else {
            return Ok(());
        };
        let (fd, size) = codec::write_memfd(|w| {
            std::io::Write::write_all(w, bytes).map_err(|e| format!("writing the memfd: {e}"))
        })?;
        tracing::warn!(version, size, "sending an unchecked snapshot");
        send_snapshot(control, version, fd, size, Vec::new())
    }
}

/// What a candidate needs to answer while it receives state.
pub(crate) struct Control {
    pub(crate) baton: Baton,
    pub(crate) tx: ControlTx,
    /// This program's schema version.
    pub(crate) version: u32,
}

/// The state a candidate received.
pub(crate) struct Got<T> {
    pub(crate) state: T,
    pub(crate) from_version: u32,
    pub(crate) bytes: u64,
    /// When the first of it arrived.
    pub(crate) started: Instant,
}

/// The state, none (`fresh`), or why it is refused.
pub(crate) type Received<T> = std::result::Result<Option<Got<T>>, String>;

/// How a candidate receives its state: one snapshot, or chunks.
pub(crate) trait Receive<T> {
    /// Reads state messages until the state is complete; quiesce and resume
    /// (which may come early) go to `early`.
    async fn receive(
        self,
        rx: &mut mpsc::UnboundedReceiver<StateMsg>,
        early: &mut Vec<Event>,
        control: &Control,
    ) -> Result<Received<T>>;
}

/// [`Baton::restore`]: one snapshot, migrated if older.
struct OneShot<F>(F);

impl<T, F> Receive<T> for OneShot<F>
where
    T: DeserializeOwned,
    F: FnOnce(u32, serde_json::Value) -> std::result::Result<T, String>,
{
    async fn receive(
        self,
        rx: &mut mpsc::UnboundedReceiver<StateMsg>,
        early: &mut Vec<Event>,
        control: &Control,
    ) -> Result<Received<T>> {
        loop {
            match rx.recv().await.ok_or(Error::ControlClosed)? {
                StateMsg::Fresh { reason } => {
                    tracing::info!(%reason, "no predecessor state: starting fresh");
                    return Ok(Ok(None));
                }
                StateMsg::Restore { fd, size } => {
                    return Ok(decode_one(&fd, size, control.version, self.0));
                }
                StateMsg::Chunk { .. } | StateMsg::Complete { .. } => {
                    return Ok(Err(
                        "state arrived in chunks, and this program restores one snapshot (restore_chunked reads chunks)".to_owned(),
                    ));
                }
                other => keep_early(&control.baton, other, early),
            }
        }
    }
}

/// Decodes a one-shot snapshot.
pub(crate) fn decode_one<T, F>(fd: &OwnedFd, size: u64, version: u32, migrate: F) -> Received<T>
where
    T: DeserializeOwned,
    F: FnOnce(u32, serde_json::Value) -> std::result::Result<T, String>,
{
    let started = Instant::now();
    codec::read_snapshot(fd, size, version, migrate).map(|(state, from_version)| {
        Some(Got {
            state,
            from_version,
            bytes: size,
            started,
        })
    })
}

impl Baton {
    /// The old-generation event a state message is (a quiesce records what the
    /// successor restores), or `None` for the candidate's restore messages.
    fn event_of(&self, msg: StateMsg) -> Option<Event> {
        Some(match msg {
            StateMsg::Quiesce { accept } => {
                self.set_successor(accept);
                Event::Quiesce
            }
            StateMsg::Resume { reason } => Event::Resume { reason },
            StateMsg::Precopy { round } => Event::Precopy { round },
            StateMsg::PrecopyFinal { round } => Event::PrecopyFinal { round },
            StateMsg::Restore { .. }
            | StateMsg::Fresh { .. }
            | StateMsg::Chunk { .. }
            | StateMsg::Complete { .. } => return None,
        })
    }
}

/// Keeps an old-generation event that arrived while restoring.
pub(crate) fn keep_early(baton: &Baton, msg: StateMsg, early: &mut Vec<Event>) {
    match baton.event_of(msg) {
        Some(e) => early.push(e),
        None => tracing::warn!("unexpected state message while restoring; ignored"),
    }
}

/// Sends a written snapshot memfd as the answer to quiesce.
fn send_snapshot(
    control: &ControlTx,
    version: u32,
    fd: OwnedFd,
    size: u64,
    dropped: Vec<String>,
) -> Result<()> {
    let msg = ChildMsg::Snapshot {
        fds: 1,
        version,
        size,
        dropped,
    };
    control.send(&msg, Some(fd))
}
