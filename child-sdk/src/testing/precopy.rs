//! Pre-copy with the fake supervisor: drive an old generation through its rounds, and feed
//! the chunks to a candidate, as baton relays them.

use std::io;
use std::os::fd::OwnedFd;

use baton_protocol::{ChildMsg, SupervisorMsg};

use super::{FakeSupervisor, Restore, Snapshot, protocol};

/// One pre-copy round an old generation sent: its chunks, in order. Each chunk is a
/// [`Snapshot`] (`{"version": V, "state": <chunk>}` in a sealed memfd).
#[derive(Debug)]
pub struct Round {
    /// The round's number.
    pub round: u32,
    /// Its chunks.
    pub chunks: Vec<Snapshot>,
}

impl FakeSupervisor {
    /// Asks the old generation for round `round` while it serves (`precopy`) and collects
    /// it, acknowledging every chunk at once.
    ///
    /// # Errors
    ///
    /// Timed out, the child sent `precopy_failed` (the reason is in the error), or a
    /// chunk came without its fd or out of order.
    pub async fn precopy(&mut self, round: u32) -> io::Result<Round> {
        self.send(&SupervisorMsg::Precopy { round }).await?;
        self.collect(round).await
    }

    /// Asks the old generation to quiesce and send its last round (`precopy_final`), and
    /// collects it. Commit or resume it afterwards.
    ///
    /// # Errors
    ///
    /// As [`precopy`](Self::precopy).
    pub async fn precopy_final(&mut self, round: u32) -> io::Result<Round> {
        self.send(&SupervisorMsg::PrecopyFinal { round }).await?;
        self.collect(round).await
    }

    async fn collect(&mut self, round: u32) -> io::Result<Round> {
        let mut chunks = Vec::new();
        loop {
            let (msg, mut fds) = self
                .expect("chunk or round_done", |m| {
                    matches!(
                        m,
                        ChildMsg::Chunk { .. }
                            | ChildMsg::RoundDone { .. }
                            | ChildMsg::PrecopyFailed { .. }
                    )
                })
                .await?;
            match (msg, fds.pop()) {
                (
                    ChildMsg::Chunk {
                        size,
                        seq,
                        round: r,
                        ..
                    },
                    Some(fd),
                ) if r == round => {
                    chunks.push(chunk(size, fd)?);
                    self.send(&SupervisorMsg::Acked { seq }).await?;
                }
                (
                    ChildMsg::RoundDone {
                        round: r,
                        chunks: n,
                        ..
                    },
                    _,
                ) if r == round => {
                    if n != chunks.len() as u64 {
                        return Err(protocol(format!(
                            "round {round}: {} chunks came, round_done says {n}",
                            chunks.len()
                        )));
                    }
                    return Ok(Round { round, chunks });
                }
                (ChildMsg::PrecopyFailed { reason }, _) => {
                    return Err(protocol(format!("pre-copy failed: {reason}")));
                }
                (other, _) => return Err(protocol(format!("round {round}: unexpected {other:?}"))),
            }
        }
    }

    /// Waits for the candidate's `prepared`, sends it every chunk of `rounds` in order,
    /// each once the one before is `applied` (a candidate must acknowledge a chunk without
    /// waiting for the next: baton pauses the old generation only once it caught up), then
    /// `complete`, and returns its answer.
    ///
    /// # Errors
    ///
    /// Timed out (a chunk never acknowledged, too), or the socket failed.
    pub async fn restore_chunks(&mut self, rounds: &[Round]) -> io::Result<Restore> {
        self.expect("prepared", |m| matches!(m, ChildMsg::Prepared))
            .await?;
        let mut seq = 0u64;
        for r in rounds {
            for c in &r.chunks {
                let msg = SupervisorMsg::Chunk {
                    fds: 1,
                    size: c.size,
                    round: r.round,
                    seq,
                };
                self.send_with(&msg, &[&c.fd]).await?;
                if let Some(rejected) = self.applied(seq).await? {
                    return Ok(rejected);
                }
                seq += 1;
            }
        }
        self.send(&SupervisorMsg::Complete { chunks: seq }).await?;
        self.restore_answer().await
    }

    /// Waits for `applied{seq}`; a rejection instead is returned.
    async fn applied(&mut self, seq: u64) -> io::Result<Option<Restore>> {
        let (msg, _) = self
            .expect("applied", |m| {
                matches!(m, ChildMsg::Applied { .. } | ChildMsg::Rejected { .. })
            })
            .await?;
        match msg {
            ChildMsg::Applied { seq: s } if s == seq => Ok(None),
            ChildMsg::Rejected { reason } => Ok(Some(Restore::Rejected { reason })),
            other => Err(protocol(format!("expected applied {seq}, got {other:?}"))),
        }
    }
}

/// A received chunk, kept as a snapshot-shaped memfd.
fn chunk(size: u64, fd: OwnedFd) -> io::Result<Snapshot> {
    let mut s = Snapshot {
        version: 0,
        dropped: Vec::new(),
        size,
        fd,
    };
    s.version = serde_json::from_slice::<serde_json::Value>(&s.bytes()?)
        .ok()
        .and_then(|v| v["version"].as_u64())
        .and_then(|v| u32::try_from(v).ok())
        .unwrap_or(0);
    Ok(s)
}
