//! Pre-copy, as the app sees it. The old generation sends its state as
//! chunks while it serves ([`Chunks`]): round 0 is everything, later rounds
//! what changed, and the last round runs while quiesced. The candidate
//! decodes chunks in parallel and applies them in order ([`Chunked`]).

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Mutex, PoisonError};

use baton_protocol::ChildMsg;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::baton::Baton;
use crate::codec;
use crate::dispatch::StateMsg;
use crate::error::{Error, Result};
use crate::events::Event;
use crate::state::{Control, Got, Receive, Received, decode_one, keep_early};
use std::time::Instant;
use tokio::sync::mpsc;

/// State a candidate rebuilds from chunks: the full copy's chunks, then the
/// deltas, applied in the order the old generation sent them. The one-shot
/// snapshot (from a predecessor without pre-copy) still decodes as `Self`.
///
/// # Example
///
/// ```
/// use std::collections::HashMap;
/// #[derive(Default, serde::Deserialize)]
/// struct Db(HashMap<String, String>);
/// #[derive(serde::Deserialize)]
/// struct Piece { set: Vec<(String, String)>, deleted: Vec<String> }
///
/// impl baton_child::Chunked for Db {
///     type Chunk = Piece;
///     fn apply(&mut self, piece: Piece) -> Result<(), String> {
///         self.0.extend(piece.set);
///         for k in piece.deleted { self.0.remove(&k); }
///         Ok(())
///     }
/// }
/// ```
pub trait Chunked: DeserializeOwned + Default + Send + 'static {
    /// One chunk as the old generation serialised it.
    type Chunk: DeserializeOwned + Send + 'static;

    /// Applies one chunk (values set and keys deleted since the last).
    ///
    /// # Errors
    ///
    /// The reason the chunk is refused; the upgrade aborts with it.
    fn apply(&mut self, chunk: Self::Chunk) -> std::result::Result<(), String>;
}

/// Sends one pre-copy round, from [`Baton::chunks`]. Share it by reference
/// between threads to encode chunks in parallel; the order within a round
/// does not matter, rounds are applied in order.
#[derive(Debug)]
pub struct Chunks {
    baton: Baton,
    round: u32,
    version: u32,
    sent: Mutex<(u64, u64)>,
}

impl Chunks {
    /// Serialises `chunk` as `{"version": V, "state": chunk}` into a sealed
    /// memfd and sends it. Blocks while [`PRECOPY_WINDOW`](baton_protocol::PRECOPY_WINDOW) chunks wait to be
    /// applied: call it from a blocking context (`spawn_blocking`,
    /// `block_in_place`, a thread).
    ///
    /// # Errors
    ///
    /// [`Error::Snapshot`] if serialising fails, [`Error::Precopy`] once the
    /// upgrade was aborted (then carry on serving: [`Event::Resume`]
    /// follows), [`Error::ControlClosed`].
    pub fn send(&self, chunk: &impl Serialize) -> Result<()> {
        let Some(control) = &self.baton.inner.control else {
            return Ok(());
        };
        let (fd, size) = codec::write_snapshot(self.version, chunk)?;
        let round = self.round;
        self.baton.inner.credit.send_next(|seq| {
            let msg = ChildMsg::Chunk {
                fds: 1,
                size,
                round,
                seq,
            };
            control.send(&msg, Some(fd))
        })?;
        let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        sent.0 += 1;
        sent.1 += size;
        Ok(())
    }

    /// Ends the round.
    ///
    /// # Errors
    ///
    /// [`Error::ControlClosed`].
    pub fn finish(self) -> Result<()> {
        let (chunks, bytes) = *self.sent.lock().unwrap_or_else(PoisonError::into_inner);
        tracing::debug!(round = self.round, chunks, bytes, "pre-copy round sent");
        match &self.baton.inner.control {
            Some(c) => c.send(
                &ChildMsg::RoundDone {
                    round: self.round,
                    chunks,
                    bytes,
                },
                None,
            ),
            None => Ok(()),
        }
    }
}

impl Baton {
    /// The sender for pre-copy round `round`: the answer to
    /// [`Event::Precopy`] (serving) and [`Event::PrecopyFinal`] (quiesced).
    /// Round 0 is the whole state; round `n` is every key written or deleted
    /// since round `n - 1` began (start tracking before round 0 is read).
    ///
    /// # Errors
    ///
    /// [`Error::Feature`] if `state` was not announced.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # fn f(baton: &baton_child::Baton, shards: Vec<Vec<(String, String)>>) -> Result<(), baton_child::Error> {
    /// let tx = baton.chunks(0)?;
    /// std::thread::scope(|s| {
    ///     for half in shards.chunks(shards.len().div_ceil(2)) {
    ///         let tx = &tx;
    ///         s.spawn(move || half.iter().try_for_each(|shard| tx.send(shard)));
    ///     }
    /// });
    /// tx.finish()?;
    /// # Ok(()) }
    /// ```
    pub fn chunks(&self, round: u32) -> Result<Chunks> {
        let version = self.inner.state_version.ok_or(Error::Feature {
            feature: "precopy",
            reason: "not announced: use Baton::builder().stateful(VERSION).precopy()",
        })?;
        Ok(Chunks {
            baton: self.clone(),
            round,
            version,
            sent: Mutex::new((0, 0)),
        })
    }

    /// Tells the supervisor this round cannot be sent; it aborts the upgrade
    /// and sends [`Event::Resume`]. A no-op standalone.
    ///
    /// # Errors
    ///
    /// [`Error::ControlClosed`].
    pub fn precopy_failed(&self, reason: &str) -> Result<()> {
        match &self.inner.control {
            Some(c) => c.send(
                &ChildMsg::PrecopyFailed {
                    reason: reason.to_owned(),
                },
                None,
            ),
            None => Ok(()),
        }
    }

    /// Like [`restore`](Self::restore), for state that also arrives in
    /// chunks (announce [`Builder::precopy`](crate::Builder::precopy)).
    /// Chunks are decoded on tokio's blocking pool, several at once, and
    /// applied in order; a one-shot snapshot is decoded as `T` (or through
    /// `migrate`). A chunk of another schema than this program's is
    /// rejected: baton pre-copies only between generations that share one.
    ///
    /// # Errors
    ///
    /// As [`restore`](Self::restore); a chunk that is malformed, out of
    /// order, or that [`Chunked::apply`] refuses is rejected.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Deserialize)] struct Db(std::collections::HashMap<String, String>);
    /// # impl baton_child::Chunked for Db { type Chunk = Vec<(String, String)>;
    /// #   fn apply(&mut self, c: Self::Chunk) -> Result<(), String> { self.0.extend(c); Ok(()) } }
    /// # async fn f(env: baton_child::Env) -> Result<(), baton_child::Error> {
    /// let baton = baton_child::Baton::builder().stateful(1).precopy().start(env)?;
    /// let db: Db = baton
    ///     .restore_chunked(|v, _| Err(format!("no migration from {v}")))
    ///     .await?
    ///     .unwrap_or_default();
    /// baton.ready()?;
    /// # drop(db); Ok(()) }
    /// ```
    pub async fn restore_chunked<T, E, F>(&self, migrate: F) -> Result<Option<T>>
    where
        T: Chunked,
        E: fmt::Display,
        F: FnOnce(u32, serde_json::Value) -> std::result::Result<T, E>,
    {
        let migrate = |v, json| migrate(v, json).map_err(|e| e.to_string());
        self.restore_with(Pieces(migrate)).await
    }
}

/// Decodes chunk `seq` on the blocking pool.
type Decoding<C> = tokio::task::JoinHandle<std::result::Result<C, String>>;

/// [`Baton::restore_chunked`]: chunks, or one snapshot.
struct Pieces<F>(F);

impl<T, F> Receive<T> for Pieces<F>
where
    T: Chunked,
    F: FnOnce(u32, serde_json::Value) -> std::result::Result<T, String>,
{
    async fn receive(
        self,
        rx: &mut mpsc::UnboundedReceiver<StateMsg>,
        early: &mut Vec<Event>,
        control: &Control,
    ) -> Result<Received<T>> {
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut state = T::default();
        let mut decoding: VecDeque<(u64, Decoding<T::Chunk>)> = VecDeque::new();
        let (mut next_seq, mut bytes, mut started) = (0u64, 0u64, None);
        let ours = control.version;
        loop {
            // Apply each chunk as soon as it is decoded (and acknowledge it): baton waits
            // for a caught-up candidate before it pauses the old generation.
            let msg = match decoding.front_mut() {
                Some((_, job)) => tokio::select! {
                    done = job => {
                        let seq = decoding.pop_front().map_or(0, |(s, _)| s);
                        if let Err(why) = apply(&mut state, seq, done, control)? {
                            return Ok(Err(why));
                        }
                        continue;
                    }
                    msg = rx.recv() => msg,
                },
                None => rx.recv().await,
            };
            match msg.ok_or(Error::ControlClosed)? {
                StateMsg::Fresh { reason } => {
                    tracing::info!(%reason, "no predecessor state: starting fresh");
                    return Ok(Ok(None));
                }
                StateMsg::Restore { fd, size } => return Ok(decode_one(&fd, size, ours, self.0)),
                StateMsg::Chunk {
                    fd,
                    size,
                    round,
                    seq,
                } => {
                    if seq != next_seq {
                        return Ok(Err(format!(
                            "chunk {seq} of round {round} arrived; expected chunk {next_seq}"
                        )));
                    }
                    next_seq += 1;
                    bytes += size;
                    started.get_or_insert_with(Instant::now);
                    let job = tokio::task::spawn_blocking(move || {
                        codec::read_snapshot::<T::Chunk, _>(&fd, size, ours, |v, _| {
                            Err(format!(
                                "it is of schema {v}, and chunks are read in this program's schema ({ours}) only"
                            ))
                        })
                        .map(|(c, _)| c)
                    });
                    decoding.push_back((seq, job));
                    while decoding.len() >= parallel {
                        if let Err(why) = apply_next(&mut state, &mut decoding, control).await? {
                            return Ok(Err(why));
                        }
                    }
                }
                StateMsg::Complete { chunks } => {
                    while !decoding.is_empty() {
                        if let Err(why) = apply_next(&mut state, &mut decoding, control).await? {
                            return Ok(Err(why));
                        }
                    }
                    if chunks != next_seq {
                        return Ok(Err(format!(
                            "{next_seq} chunks arrived, and baton sent {chunks}"
                        )));
                    }
                    return Ok(Ok(Some(Got {
                        state,
                        from_version: ours,
                        bytes,
                        started: started.unwrap_or_else(Instant::now),
                    })));
                }
                other => keep_early(&control.baton, other, early),
            }
        }
    }
}

/// Waits for the oldest chunk's decoding, then applies and acknowledges it.
async fn apply_next<T: Chunked>(
    state: &mut T,
    decoding: &mut VecDeque<(u64, Decoding<T::Chunk>)>,
    control: &Control,
) -> Result<std::result::Result<(), String>> {
    let Some((seq, job)) = decoding.pop_front() else {
        return Ok(Ok(()));
    };
    apply(state, seq, job.await, control)
}

/// Applies decoded chunk `seq` and acknowledges it.
fn apply<T: Chunked>(
    state: &mut T,
    seq: u64,
    decoded: std::result::Result<std::result::Result<T::Chunk, String>, tokio::task::JoinError>,
    control: &Control,
) -> Result<std::result::Result<(), String>> {
    let chunk = match decoded {
        Ok(Ok(c)) => c,
        Ok(Err(why)) => return Ok(Err(format!("chunk {seq}: {why}"))),
        Err(e) => return Ok(Err(format!("chunk {seq}: decoding panicked: {e}"))),
    };
    if let Err(why) = state.apply(chunk) {
        return Ok(Err(format!("chunk {seq} refused: {why}")));
    }
    control.tx.send(&ChildMsg::Applied { seq }, None)?;
    Ok(Ok(()))
}
