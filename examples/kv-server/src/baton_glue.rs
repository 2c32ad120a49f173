//! The only module that talks to baton (through `baton-child`): listener, readiness, drain,
//! connection counts, connection migration (adopt as the new generation, hand over as the old
//! one), and the stateful upgrade (restore as a candidate; quiesce / resume / commit as the
//! old generation).

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use baton_child::{Baton, DrainCause, Env, Event};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Options;
use crate::db::Db;
use crate::fault::{self, Fault};
use crate::precopy;
use crate::server::{Client, ConnHook, ConnToken, HandOver, HandOverFuture, Listener, Server};
use crate::state::{self, Schema, StateOf};

/// Name of the listener baton passes (`baton run --listen kv=...`).
const LISTENER: &str = "kv";

/// The live keyspace, serialised under its lock straight into the snapshot memfd (no copy
/// of the keyspace is made).
struct Live<'a>(&'a Server, Schema);

impl Serialize for Live<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.with_db(|db| StateOf::new(db, self.1).serialize(s))
    }
}

/// A snapshot of this binary's own schema (version `V`), decoded in one pass.
struct Own<const V: u32>(Db);

impl<'de, const V: u32> Deserialize<'de> for Own<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fault::on_restore();
        let schema = Schema::from_version(V)
            .ok_or_else(|| serde::de::Error::custom(format!("no schema version {V}")))?;
        state::deserialize_state(schema, d).map(Own)
    }
}

impl<const V: u32> Default for Own<V> {
    fn default() -> Self {
        Own(Db::new())
    }
}

/// Pre-copy: chunks of the full copy and the deltas, applied in order.
impl<const V: u32> baton_child::Chunked for Own<V> {
    type Chunk = Piece;

    fn apply(&mut self, Piece(chunk): Piece) -> Result<(), String> {
        chunk.apply_to(&mut self.0);
        Ok(())
    }
}

/// A pre-copy chunk; receiving one is where the restore faults fire.
struct Piece(state::Chunk);

impl<'de> Deserialize<'de> for Piece {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fault::on_restore();
        state::Chunk::deserialize(d).map(Piece)
    }
}

/// The predecessor's keyspace and the schema it was written with: this binary's own schema
/// (version `V`) is decoded directly, any other goes through [`state::restore`]. With
/// pre-copy, it may arrive in chunks.
async fn restore_as<const V: u32>(
    baton: &Baton,
    schema: Schema,
    precopy: bool,
) -> Result<Option<(Db, u32)>, baton_child::Error> {
    let mut from_version = schema.version();
    let migrate = |version, value| {
        fault::on_restore();
        from_version = version;
        state::restore(schema, version, value).map(Own::<V>)
    };
    let restored = if precopy {
        baton.restore_chunked(migrate).await?
    } else {
        baton.restore(migrate).await?
    };
    Ok(restored.map(|Own(db)| (db, from_version)))
}

/// Runs the server until a drain (or a stateful commit) finishes.
pub async fn run(opts: Options, env: Env) -> anyhow::Result<()> {
    let schema = opts.schema()?;
    // Announcing `state` is harmless without `baton run --state`: the supervisor then
    // answers `prepared` with `fresh`.
    let mut builder = Baton::builder().stateful(schema.version());
    if !opts.no_adopt {
        builder = builder.adopt();
    }
    // Chunks carry schema-2 entries.
    let precopy = schema == Schema::V2 && !opts.no_precopy;
    if precopy {
        builder = builder.precopy();
    }
    let baton = builder.start(env).context("starting baton-child")?;
    // TCP or Unix, as the operator configured it; standalone, `--listen-fallback` decides.
    let listener = Listener(
        baton
            .incoming(LISTENER, &opts.listen_fallback)
            .with_context(|| format!("listener {LISTENER:?}"))?,
    );

    let hook: ConnHook = {
        let baton = baton.clone();
        Box::new(move || Some(Box::new(baton.track()) as ConnToken))
    };
    let hand_over = (!opts.no_adopt && baton.is_supervised())
        .then(|| Arc::new(SdkHandOver(baton.clone())) as Arc<dyn HandOver>);
    let server = Server::new(schema, baton.generation(), Some(hook), hand_over);
    tracing::info!(
        generation = baton.generation(),
        supervised = baton.is_supervised(),
        schema = schema.version(),
        migration = !opts.no_adopt,
        listener = %listener.describe(),
        "kv-server starting"
    );

    // As a candidate: take the predecessor's state before accepting anything or saying READY.
    // A rejection is reported by the SDK, which returns once baton has stopped the upgrade.
    let restored = match schema {
        Schema::V1 => restore_as::<1>(&baton, schema, precopy).await,
        Schema::V2 => restore_as::<2>(&baton, schema, precopy).await,
    };
    match restored {
        Ok(Some((mut db, from_version))) => {
            if fault::armed(Fault::LoseXKeys) {
                let lost: Vec<Vec<u8>> = db
                    .iter()
                    .filter(|(k, _)| k.starts_with(b"x"))
                    .map(|(k, _)| k.to_vec())
                    .collect();
                tracing::error!(
                    lost = lost.len(),
                    "fault lose-x-keys: dropping restored keys"
                );
                for k in lost {
                    db.remove(&k);
                }
            }
            tracing::info!(from_version, keys = db.len(), "keyspace restored");
            server.install(db, from_version);
        }
        Ok(None) => tracing::debug!("starting with an empty keyspace"),
        Err(baton_child::Error::SnapshotRejected(reason)) => {
            anyhow::bail!("snapshot rejected: {reason}")
        }
        Err(e) => return Err(e).context("restoring the predecessor's state"),
    }

    let serving = tokio::spawn({
        let server = Arc::clone(&server);
        async move { server.run(listener).await }
    });
    baton.ready().context("sending READY=1")?;
    if let Some(after) = opts.exit_after {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            tracing::error!(?after, "--exit-after: exiting with status 3");
            std::process::exit(3);
        });
    }

    let drain = loop {
        match baton.next_event().await {
            Event::Drain(info) => break info,
            event => handle_state_event(&server, &baton, schema, event),
        }
    };
    let deadline = drain.deadline_or(opts.drain_timeout);
    tracing::info!(
        cause = ?drain.cause,
        connections = server.connections(),
        deadline_in_ms = deadline.saturating_duration_since(Instant::now()).as_millis(),
        "draining"
    );
    if drain.cause == DrainCause::Commit {
        tracing::info!("stateful upgrade committed: the successor owns the keyspace now");
    }
    if drain.migrate && server.migrate() {
        tracing::info!("the successor adopts connections: handing them over at command boundaries");
    } else {
        server.close();
    }
    match tokio::time::timeout_at(deadline.into(), serving).await {
        Ok(Ok(())) => {
            tracing::info!(handed_over = server.handed_over(), "drained; exiting");
            Ok(())
        }
        Ok(Err(e)) => Err(e).context("server task failed"),
        Err(_) => {
            tracing::warn!(
                connections = server.connections(),
                "drain deadline reached with connections open; exiting"
            );
            Ok(())
        }
    }
}

fn handle_state_event(server: &Arc<Server>, baton: &Baton, schema: Schema, event: Event) {
    match event {
        Event::Quiesce => {
            let started = Instant::now();
            server.quiesce();
            if fault::fire(Fault::HangDuringSnapshot) {
                tracing::error!("fault hang-during-snapshot: quiesced, never sending the snapshot");
                return;
            }
            if fault::fire(Fault::DieDuringSnapshot) {
                // Quiesced, so commands are held back unanswered; the keyspace dies with the
                // process. baton must report the loss ("STATE LOST"), not hide it.
                tracing::error!("fault die-during-snapshot: aborting before sending the snapshot");
                std::process::abort();
            }
            let live = Live(server, schema);
            // Serialising a large keyspace takes a while; let the runtime move this worker's
            // other tasks elsewhere meanwhile (main builds a multi-thread runtime).
            let sent = tokio::task::block_in_place(|| send_snapshot(baton, schema, &live));
            match sent {
                Ok(()) => tracing::info!(
                    keys = server.with_db(Db::len),
                    ms = started.elapsed().as_millis(),
                    "quiesced and snapshot sent; paused until commit or resume"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "cannot snapshot; the upgrade aborts, resuming");
                    if let Err(e) = baton.snapshot_failed(&e.to_string()) {
                        tracing::warn!(error = %e, "could not report the snapshot failure");
                    }
                    // The supervisor aborts on snapshot_failed and sends resume as well;
                    // resuming now just shortens the pause (resume is idempotent).
                    server.resume();
                }
            }
        }
        Event::Precopy { round } => {
            // Serving goes on on the other workers meanwhile.
            let sent =
                tokio::task::block_in_place(|| precopy::send_round(server, baton, round, false));
            if let Err(e) = sent {
                tracing::warn!(round, error = %e, "pre-copy round not sent");
            }
        }
        Event::PrecopyFinal { round } => {
            server.quiesce();
            let sent =
                tokio::task::block_in_place(|| precopy::send_round(server, baton, round, true));
            match sent {
                Ok(()) => tracing::info!(
                    round,
                    "quiesced and the last round sent; paused until commit or resume"
                ),
                Err(e) => {
                    tracing::error!(round, error = %e, "cannot send the last round; resuming");
                    let _ = baton.precopy_failed(&e.to_string());
                    server.resume();
                }
            }
        }
        Event::Resume { reason } => {
            tracing::info!(%reason, "upgrade aborted: accepting again");
            server.with_db_mut(Db::stop_tracking);
            server.resume();
        }
        other => tracing::warn!(event = ?other, "unknown state event ignored"),
    }
}

/// Sends the snapshot of `live`, or the armed corruption of it (`--fault`).
fn send_snapshot(baton: &Baton, schema: Schema, live: &Live<'_>) -> Result<(), baton_child::Error> {
    if let Some(damage) = fault::snapshot_damage() {
        // The same layout the SDK writes, so the fault damages a realistic snapshot.
        let mut good = format!(r#"{{"version":{},"state":"#, schema.version()).into_bytes();
        serde_json::to_writer(&mut good, live)
            .map_err(|e| baton_child::Error::Snapshot(e.to_string()))?;
        good.push(b'}');
        let bad = damage(good);
        tracing::error!(bytes = bad.len(), "fault: sending a damaged snapshot");
        return baton.snapshot_raw(&bad);
    }
    match downgrade_to(baton, schema)? {
        None => baton.snapshot(live),
        Some(older) if fault::armed(Fault::RefuseDowngrade) => Err(baton_child::Error::Snapshot(
            format!("this build cannot write schema {older} (fault refuse-downgrade)"),
        )),
        Some(older) => {
            // Erlang's code_change({down, V}): the successor (a revert, a rollback)
            // restores only older schemas. Schema 1 has no counters: they are dropped.
            tracing::warn!(
                from = schema.version(),
                to = older.version(),
                "successor restores an older schema only: writing schema {older} (counters are dropped)"
            );
            baton.snapshot_dropping(older.version(), &Live(live.0, older), &["/stats"])
        }
    }
}

/// The older schema to write when the successor does not restore `schema`: the newest it
/// restores. `Ok(None)`: write `schema`.
fn downgrade_to(baton: &Baton, schema: Schema) -> Result<Option<Schema>, baton_child::Error> {
    let Some(accept) = baton.successor_restores() else {
        return Ok(None);
    };
    if accept.contains(&schema.version()) {
        return Ok(None);
    }
    accept
        .iter()
        .filter_map(|&v| Schema::from_version(v))
        .filter(|s| s.version() < schema.version())
        .max_by_key(|s| s.version())
        .map(Some)
        .ok_or_else(|| {
            baton_child::Error::Snapshot(format!(
                "the successor restores schema versions {accept:?}; this server writes {schema} and cannot write any of them"
            ))
        })
}

/// Hands connections over through the SDK.
struct SdkHandOver(Baton);

impl HandOver for SdkHandOver {
    fn hand_over(
        &self,
        stream: Client,
        buffered: Vec<u8>,
        meta: serde_json::Value,
    ) -> HandOverFuture<'_> {
        Box::pin(async move {
            self.0
                .hand_over(stream, &buffered, &meta)
                .await
                .map_err(|e| e.to_string())
        })
    }
}
