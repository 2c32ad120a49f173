//! The only module that talks to baton (through `baton-child`): listener, readiness, drain,
//! connection counts, connection migration (adopt as the new generation, hand over as the old
//! one), and the stateful upgrade (restore as a candidate; quiesce / resume / commit as the
//! old generation).

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use baton_child::{Baton, DrainCause, Env, ListenerKind, Migrator, StateEvent, StateHandle};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::db::Db;
use crate::fault::{self, Fault};
use crate::server::{Client, ConnHook, ConnToken, HandOver, HandOverFuture, Listener, Server};
use crate::state::{self, Schema, StateOf};
use crate::Options;

/// Name of the listener baton passes (`baton run --listen kv=...`).
const LISTENER: &str = "kv";

/// How long a candidate that rejected the snapshot waits to be stopped before exiting.
const REJECTED_GRACE: Duration = Duration::from_secs(10);

/// Runs the server until a drain (or a stateful commit) finishes.
pub async fn run(opts: Options, env: Env) -> anyhow::Result<()> {
    // The SDK's state handle is typed; the schema is a command-line choice, so pick the
    // type here.
    match opts.schema()? {
        Schema::V1 => run_with::<V1>(opts, env).await,
        Schema::V2 => run_with::<V2>(opts, env).await,
    }
}

/// A schema chosen at compile time, so that the SDK's typed state can (de)serialise it.
trait SchemaMarker: 'static {
    const SCHEMA: Schema;
}

struct V1;
impl SchemaMarker for V1 {
    const SCHEMA: Schema = Schema::V1;
}

struct V2;
impl SchemaMarker for V2 {
    const SCHEMA: Schema = Schema::V2;
}

/// The state the SDK moves between generations.
struct KvState<M> {
    inner: Inner,
    _schema: PhantomData<fn() -> M>,
}

enum Inner {
    /// Outgoing: the live keyspace, serialised under its lock straight into the snapshot
    /// memfd (no copy of the keyspace is made).
    Live(Arc<Server>),
    /// Incoming: a restored, validated keyspace.
    Restored(Db),
}

impl<M> KvState<M> {
    fn new(inner: Inner) -> Self {
        KvState {
            inner,
            _schema: PhantomData,
        }
    }
}

impl<M: SchemaMarker> Serialize for KvState<M> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.inner {
            Inner::Live(server) => server.with_db(|db| StateOf::new(db, M::SCHEMA).serialize(s)),
            Inner::Restored(db) => StateOf::new(db, M::SCHEMA).serialize(s),
        }
    }
}

impl<'de, M: SchemaMarker> Deserialize<'de> for KvState<M> {
    /// A snapshot of this binary's own schema; older ones go through [`state::restore`].
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fault::on_restore();
        state::deserialize_state(M::SCHEMA, d).map(|db| KvState::new(Inner::Restored(db)))
    }
}

async fn run_with<M: SchemaMarker>(opts: Options, env: Env) -> anyhow::Result<()> {
    let schema = M::SCHEMA;
    // Announcing `state` is harmless without `baton run --state`: the supervisor then
    // answers `prepared` with `fresh`.
    let mut builder = Baton::builder().stateful();
    if !opts.no_adopt {
        builder = builder.adopt();
    }
    let mut baton = builder.start(env).context("starting baton-child")?;
    let listener = take_listener(&mut baton, &opts.listen_fallback)?;
    let mut state = baton
        .state::<KvState<M>>(schema.version())
        .context("stateful upgrades")?;

    let conns = baton.connections();
    let hook: ConnHook = Box::new(move || Some(Box::new(conns.track()) as ConnToken));
    let migrator = baton.migrator();
    let hand_over = (!opts.no_adopt && migrator.is_available())
        .then(|| Arc::new(MigratorHandOver(migrator)) as Arc<dyn HandOver>);
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
    let mut from_version = schema.version();
    let restored = state
        .restore(|version, value| {
            fault::on_restore();
            from_version = version;
            state::restore(schema, version, value).map(|db| KvState::new(Inner::Restored(db)))
        })
        .await;
    let restored = match restored {
        Ok(r) => r,
        Err(baton_child::Error::SnapshotRejected(reason)) => {
            // `rejected` is on the socket already (the SDK waits until it is written). The
            // supervisor aborts the upgrade and kills this candidate; wait for that (or a
            // drain) rather than exit first, so that baton reports the rejection reason
            // instead of racing it with "candidate exited".
            tracing::error!(%reason, "snapshot rejected; waiting for the supervisor to stop us");
            let _ = tokio::time::timeout(REJECTED_GRACE, baton.drain().wait()).await;
            anyhow::bail!("snapshot rejected: {reason}");
        }
        Err(e) => return Err(e).context("restoring the predecessor's state"),
    };
    match restored.map(|s| s.inner) {
        Some(Inner::Restored(db)) => {
            tracing::info!(from_version, keys = db.len(), "keyspace restored");
            server.install(db, from_version);
        }
        Some(Inner::Live(_)) => anyhow::bail!("restore produced a live state"),
        None => tracing::debug!("starting with an empty keyspace"),
    }

    let serving = tokio::spawn({
        let server = Arc::clone(&server);
        async move { server.run(listener).await }
    });
    baton.ready().context("sending READY=1")?;

    let drain = baton.drain();
    let drain = loop {
        tokio::select! {
            info = drain.wait() => break info,
            event = state.next_event() => handle_state_event(&server, &state, event),
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

fn handle_state_event<M: SchemaMarker>(
    server: &Arc<Server>,
    state: &StateHandle<KvState<M>>,
    event: StateEvent,
) {
    match event {
        StateEvent::Quiesce => {
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
            let live = KvState::<M>::new(Inner::Live(Arc::clone(server)));
            // Serialising a large keyspace takes a while; let the runtime move this worker's
            // other tasks elsewhere meanwhile (main builds a multi-thread runtime).
            let sent = tokio::task::block_in_place(|| send_snapshot(state, &live));
            match sent {
                Ok(()) => tracing::info!(
                    keys = server.with_db(Db::len),
                    ms = started.elapsed().as_millis(),
                    "quiesced and snapshot sent; paused until commit or resume"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "cannot snapshot; the upgrade aborts, resuming");
                    if let Err(e) = state.snapshot_failed(&e.to_string()) {
                        tracing::warn!(error = %e, "could not report the snapshot failure");
                    }
                    // The supervisor aborts on snapshot_failed and sends resume as well;
                    // resuming now just shortens the pause (resume is idempotent).
                    server.resume();
                }
            }
        }
        StateEvent::Resume { reason } => {
            tracing::info!(%reason, "upgrade aborted: accepting again");
            server.resume();
        }
        StateEvent::Commit { .. } => {
            // The drain future fires too (cause Commit); the main loop closes connections.
            tracing::debug!("commit received");
        }
        other => tracing::warn!(event = ?other, "unknown state event ignored"),
    }
}

/// Sends the snapshot of `live`, or the armed corruption of it (`--fault`).
fn send_snapshot<M: SchemaMarker>(
    state: &StateHandle<KvState<M>>,
    live: &KvState<M>,
) -> Result<(), baton_child::Error> {
    if let Some(damage) = fault::snapshot_damage() {
        // The same layout the SDK writes, so the fault damages a realistic snapshot.
        let mut good = format!(r#"{{"version":{},"state":"#, state.version()).into_bytes();
        serde_json::to_writer(&mut good, live)
            .map_err(|e| baton_child::Error::Snapshot(e.to_string()))?;
        good.push(b'}');
        let bad = damage(good);
        tracing::error!(bytes = bad.len(), "fault: sending a damaged snapshot");
        return state.send_raw_snapshot(&bad);
    }
    state.send_snapshot(live)
}

/// Hands connections over through the SDK, on the `kv` listener.
struct MigratorHandOver(Migrator);

impl HandOver for MigratorHandOver {
    fn hand_over(
        &self,
        stream: Client,
        buffered: Vec<u8>,
        meta: serde_json::Value,
    ) -> HandOverFuture<'_> {
        Box::pin(async move {
            match stream {
                Client::Tcp(s) => self.0.hand_over_tcp(s, LISTENER, &buffered, meta).await,
                Client::Unix(s) => self.0.hand_over_unix(s, LISTENER, &buffered, meta).await,
            }
            .map_err(|e| e.to_string())
        })
    }
}

/// The `kv` listener as the supervisor (or systemd) passed it, TCP or Unix; standalone, the
/// `--listen-fallback` address, whose kind then decides.
fn take_listener(baton: &mut Baton, fallback: &str) -> anyhow::Result<Listener> {
    let unix_fallback = fallback.strip_prefix("unix:");
    let unix = match baton.inherited_kind(LISTENER) {
        Some(ListenerKind::Unix) => true,
        Some(ListenerKind::Tcp) => false,
        Some(other) => anyhow::bail!(
            "listener {LISTENER:?}: the inherited socket is {other:?}, not a TCP or Unix stream \
             listener"
        ),
        None => unix_fallback.is_some(),
    };
    // When the listener is inherited the SDK never binds the fallback, so a fallback of the
    // other kind is only a placeholder there.
    let listener = if unix {
        baton
            .unix_incoming(LISTENER, unix_fallback.unwrap_or(fallback))
            .map(Listener::Unix)
    } else {
        baton.tcp_incoming(LISTENER, fallback).map(Listener::Tcp)
    };
    listener.with_context(|| format!("listener {LISTENER:?}"))
}
