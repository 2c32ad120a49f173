//! Versioned state snapshots: what a stateful upgrade hands from one generation to the next.
//!
//! The SDK wraps the state in the envelope `{"version": V, "state": ...}`; this module produces
//! and consumes `state` for a given `V`.
//!
//! Schema 1 (`--schema 1`): `{"entries": {"key": "value", ...}}`. Keys and values are JSON
//! strings, so schema 1 can only carry UTF-8 data: a schema-1 server holding a non-UTF-8 key
//! or value refuses to write a snapshot (the upgrade aborts and the old generation resumes
//! with everything intact) rather than mangle data.
//!
//! Schema 2 (`--schema 2`, binary-safe, carries counters):
//! ```json
//! {"entries": [{"k": "name", "kind": "str", "v": "text"},
//!              {"k": "hits", "kind": "int", "v": 42},
//!              {"kb": "<base64 key>", "kind": "bytes", "v": "<base64 value>"}],
//!  "stats": {"commands_processed": 10, "keyspace_hits": 3, "keyspace_misses": 1}}
//! ```
//! A key is `k` when it is UTF-8, else `kb` (standard base64). A value is `int` (a JSON
//! number) when it is the canonical decimal form of an i64, `str` when UTF-8, else `bytes`.
//!
//! Compatibility (Erlang's `code_change`): a schema-2 server migrates a schema-1 snapshot
//! (counters start at zero); a schema-1 server rejects a schema-2 snapshot, because it cannot
//! represent it. Unknown versions and malformed state are rejected with a reason.
//!
//! Downgrade (`code_change({down, 1})`): a schema-1 successor announces that it restores
//! schema 1 only (a revert or a rollback to it), and a schema-2 server then writes schema 1.
//! Every key and value survives; the counters (`total_commands_processed`, `keyspace_hits`,
//! `keyspace_misses`) are dropped, as schema 1 has no place for them. A keyspace holding
//! non-UTF-8 data cannot go down to schema 1: the snapshot is refused, and so is the revert.
//!
//! Both directions stream: serialising walks the keyspace without building a JSON tree, and
//! deserialising inserts straight into the new keyspace, so a large snapshot costs little more
//! than its text (this bounds the upgrade's accept gap).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{self, SerializeMap, SerializeSeq, SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};

use crate::db::{Db, Pair, Stats};
use crate::resp::{parse_i64, push_i64};

/// A state schema version this binary can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// `{"entries": {"k": "v"}}`, UTF-8 only.
    V1,
    /// Typed, binary-safe entries plus counters.
    V2,
}

impl Schema {
    /// The number that goes into the snapshot envelope's `version`.
    pub fn version(self) -> u32 {
        match self {
            Schema::V1 => 1,
            Schema::V2 => 2,
        }
    }

    /// The schema for a version number, if this binary knows it.
    pub fn from_version(v: u32) -> Option<Schema> {
        match v {
            1 => Some(Schema::V1),
            2 => Some(Schema::V2),
            _ => None,
        }
    }
}

impl fmt::Display for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.version())
    }
}

/// `db` as the state value of `schema`. Serialising it fails (with the reason as the error
/// message) when schema 1 meets non-UTF-8 data.
#[derive(Debug, Clone, Copy)]
pub struct StateOf<'a> {
    db: &'a Db,
    schema: Schema,
}

impl<'a> StateOf<'a> {
    /// Wraps `db` for serialisation as `schema`.
    pub fn new(db: &'a Db, schema: Schema) -> Self {
        StateOf { db, schema }
    }
}

impl Serialize for StateOf<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.schema {
            Schema::V1 => {
                let mut st = s.serialize_struct("StateV1", 1)?;
                st.serialize_field("entries", &EntriesV1(self.db))?;
                st.end()
            }
            Schema::V2 => {
                let mut st = s.serialize_struct("StateV2", 2)?;
                st.serialize_field("entries", &EntriesV2(self.db))?;
                st.serialize_field("stats", &StatsV2::from(self.db.stats))?;
                st.end()
            }
        }
    }
}

struct EntriesV1<'a>(&'a Db);

impl Serialize for EntriesV1<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0.iter() {
            let (Ok(key), Ok(value)) = (std::str::from_utf8(k), std::str::from_utf8(v)) else {
                return Err(ser::Error::custom(format!(
                    "schema 1 cannot represent non-UTF-8 data (key {:?}); \
                     upgrade to a schema-2 server first",
                    String::from_utf8_lossy(k)
                )));
            };
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

struct EntriesV2<'a>(&'a Db);

impl Serialize for EntriesV2<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        entries_v2(s, self.0.len(), self.0.iter())
    }
}

/// Pairs as schema-2 entries.
struct PairsV2<'a>(&'a [Pair]);

impl Serialize for PairsV2<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let pairs = self.0.iter().map(|(k, v)| (k.as_slice(), v.as_slice()));
        entries_v2(s, self.0.len(), pairs)
    }
}

/// Keys as `{"k": text}` or `{"kb": base64}`.
struct KeysV2<'a>(&'a [Vec<u8>]);

impl Serialize for KeysV2<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for k in self.0 {
            let key = match std::str::from_utf8(k) {
                Ok(text) => KeyOut {
                    k: Some(text),
                    kb: None,
                },
                Err(_) => KeyOut {
                    k: None,
                    kb: Some(B64.encode(k)),
                },
            };
            seq.serialize_element(&key)?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct KeyOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    k: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kb: Option<String>,
}

/// One pre-copy chunk (schema 2 only): pairs set, keys deleted, and the counters when they
/// were copied. `{"entries": [...], "deleted": [{"k"|"kb"}], "stats": {...}}`; the full copy
/// is chunks without deletions.
pub struct ChunkOut<'a> {
    /// Pairs to set.
    pub set: &'a [Pair],
    /// Keys to delete.
    pub deleted: &'a [Vec<u8>],
    /// The counters.
    pub stats: Stats,
}

impl Serialize for ChunkOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("ChunkV2", 3)?;
        st.serialize_field("entries", &PairsV2(self.set))?;
        st.serialize_field("deleted", &KeysV2(self.deleted))?;
        st.serialize_field("stats", &StatsV2::from(self.stats))?;
        st.end()
    }
}

/// A received chunk, validated, ready to apply.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    /// Pairs to set.
    pub set: Vec<Pair>,
    /// Keys to delete.
    pub deleted: Vec<Vec<u8>>,
    /// The counters, when the chunk carried them.
    pub stats: Option<Stats>,
}

impl Chunk {
    /// Applies the chunk to `db`.
    pub fn apply_to(self, db: &mut Db) {
        db.reserve(self.set.len());
        for (k, v) in self.set {
            db.insert(k, v);
        }
        for k in &self.deleted {
            db.remove(k);
        }
        if let Some(stats) = self.stats {
            db.stats = stats;
        }
    }
}

impl<'de> Deserialize<'de> for Chunk {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct ChunkIn {
            #[serde(default)]
            entries: Vec<EntryIn>,
            #[serde(default)]
            deleted: Vec<KeyIn>,
            #[serde(default)]
            stats: Option<StatsV2>,
        }
        let c = ChunkIn::deserialize(d)?;
        let set = c
            .entries
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                e.into_pair()
                    .map_err(|e| de::Error::custom(format!("entry {i}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let deleted = c
            .deleted
            .into_iter()
            .map(|k| key_of(k.k, k.kb).map_err(de::Error::custom))
            .collect::<Result<_, _>>()?;
        Ok(Chunk {
            set,
            deleted,
            stats: c.stats.map(Stats::from),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyIn {
    #[serde(default)]
    k: Option<String>,
    #[serde(default)]
    kb: Option<String>,
}

fn key_of(k: Option<String>, kb: Option<String>) -> Result<Vec<u8>, String> {
    match (k, kb) {
        (Some(k), None) => Ok(k.into_bytes()),
        (None, Some(kb)) => B64.decode(kb).map_err(|e| format!("bad base64 in kb: {e}")),
        _ => Err("exactly one of k and kb is required".to_owned()),
    }
}

/// Writes `pairs` as schema-2 entries.
fn entries_v2<'a, S: Serializer>(
    s: S,
    len: usize,
    pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<S::Ok, S::Error> {
    {
        let mut seq = s.serialize_seq(Some(len))?;
        for (k, v) in pairs {
            let (k, kb) = match std::str::from_utf8(k) {
                Ok(text) => (Some(text), None),
                Err(_) => (None, Some(B64.encode(k))),
            };
            let (kind, v) = if let Some(n) = parse_i64(v) {
                (Kind::Int, ScalarOut::Int(n))
            } else if let Ok(text) = std::str::from_utf8(v).map_err(drop).and_then(|t| {
                // Control bytes take six in a JSON string (`\u0000`); base64 takes 1.33.
                if t.bytes().any(|b| b < 0x20) {
                    Err(())
                } else {
                    Ok(t)
                }
            }) {
                (Kind::Str, ScalarOut::Text(text))
            } else {
                (Kind::Bytes, ScalarOut::Owned(B64.encode(v)))
            };
            seq.serialize_element(&EntryOut { k, kb, kind, v })?;
        }
        seq.end()
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Int,
    Str,
    Bytes,
}

#[derive(Serialize)]
struct EntryOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    k: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kb: Option<String>,
    kind: Kind,
    v: ScalarOut<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ScalarOut<'a> {
    Int(i64),
    Text(&'a str),
    Owned(String),
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StatsV2 {
    #[serde(default)]
    commands_processed: u64,
    #[serde(default)]
    keyspace_hits: u64,
    #[serde(default)]
    keyspace_misses: u64,
}

impl From<Stats> for StatsV2 {
    fn from(s: Stats) -> Self {
        StatsV2 {
            commands_processed: s.commands_processed,
            keyspace_hits: s.keyspace_hits,
            keyspace_misses: s.keyspace_misses,
        }
    }
}

impl From<StatsV2> for Stats {
    fn from(s: StatsV2) -> Self {
        Stats {
            commands_processed: s.commands_processed,
            keyspace_hits: s.keyspace_hits,
            keyspace_misses: s.keyspace_misses,
        }
    }
}

/// The state value of `db` as `schema`, as a JSON tree. The upgrade path streams
/// [`StateOf`] into the snapshot memfd instead; this is the same serialisation, for tests.
#[cfg(test)]
pub fn snapshot(db: &Db, schema: Schema) -> Result<serde_json::Value, String> {
    serde_json::to_value(StateOf::new(db, schema)).map_err(|e| e.to_string())
}

/// Reads a state value of exactly `schema` into a keyspace, validating every entry. This is
/// the Deserialize side of the snapshot for the version this binary writes.
pub fn deserialize_state<'de, D: Deserializer<'de>>(schema: Schema, d: D) -> Result<Db, D::Error> {
    match schema {
        Schema::V1 => Ok(StateV1In::deserialize(d)?.entries.0),
        Schema::V2 => {
            let state = StateV2In::deserialize(d)?;
            let mut db = state.entries.0;
            db.stats = state.stats.into();
            Ok(db)
        }
    }
}

/// Rebuilds a keyspace from a snapshot of schema `version`, on a server that writes `ours`.
/// Older schemas are migrated; newer, unknown and malformed ones are rejected with a reason
/// that ends up in `baton status`.
pub fn restore(ours: Schema, version: u32, state: serde_json::Value) -> Result<Db, String> {
    if version > ours.version() {
        return Err(format!(
            "snapshot schema {version} is newer than this server's schema {ours}"
        ));
    }
    let theirs = Schema::from_version(version)
        .ok_or_else(|| format!("unknown snapshot schema {version}"))?;
    deserialize_state(theirs, state).map_err(|e| format!("malformed schema-{theirs} snapshot: {e}"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateV1In {
    entries: DbV1,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateV2In {
    entries: DbV2,
    #[serde(default)]
    stats: StatsV2,
}

/// Schema-1 entries, inserted straight into a keyspace.
struct DbV1(Db);

impl<'de> Deserialize<'de> for DbV1 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DbV1;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of string keys to string values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<DbV1, A::Error> {
                let mut db = Db::new();
                db.reserve(map.size_hint().unwrap_or(0));
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    if db.contains(k.as_bytes()) {
                        return Err(de::Error::custom(format!("duplicate key {k:?}")));
                    }
                    db.insert(k.into_bytes(), v.into_bytes());
                }
                Ok(DbV1(db))
            }
        }
        d.deserialize_map(V)
    }
}

/// Schema-2 entries, validated and inserted straight into a keyspace.
struct DbV2(Db);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryIn {
    #[serde(default)]
    k: Option<String>,
    #[serde(default)]
    kb: Option<String>,
    kind: Kind,
    v: serde_json::Value,
}

impl EntryIn {
    fn into_pair(self) -> Result<(Vec<u8>, Vec<u8>), String> {
        let key = key_of(self.k, self.kb)?;
        let value = match (self.kind, self.v) {
            (Kind::Int, serde_json::Value::Number(n)) => {
                let n = n.as_i64().ok_or("int value is not a 64-bit integer")?;
                let mut out = Vec::with_capacity(20);
                push_i64(&mut out, n);
                out
            }
            (Kind::Str, serde_json::Value::String(s)) => s.into_bytes(),
            (Kind::Bytes, serde_json::Value::String(s)) => {
                B64.decode(s).map_err(|e| format!("bad base64 in v: {e}"))?
            }
            (kind, _) => return Err(format!("value does not match kind {kind:?}")),
        };
        Ok((key, value))
    }
}

impl<'de> Deserialize<'de> for DbV2 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = DbV2;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of {k|kb, kind, v} entries")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DbV2, A::Error> {
                let mut db = Db::new();
                db.reserve(seq.size_hint().unwrap_or(0));
                let mut i = 0usize;
                while let Some(entry) = seq.next_element::<EntryIn>()? {
                    let (k, v) = entry
                        .into_pair()
                        .map_err(|e| de::Error::custom(format!("entry {i}: {e}")))?;
                    if db.contains(&k) {
                        return Err(de::Error::custom(format!("entry {i}: duplicate key")));
                    }
                    db.insert(k, v);
                    i += 1;
                }
                Ok(DbV2(db))
            }
        }
        d.deserialize_seq(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Db {
        let mut db = Db::new();
        db.set(b"name", b"baton");
        db.set(b"counter", b"42");
        db.set(b"neg", b"-7");
        db.set(b"padded", b"007");
        db.set(b"empty", b"");
        db.set("unicode \u{e9}".as_bytes(), "caf\u{e9}".as_bytes());
        db.set(b"big", i64::MIN.to_string().as_bytes());
        db.stats = Stats {
            commands_processed: 10,
            keyspace_hits: 3,
            keyspace_misses: 1,
        };
        db
    }

    fn binary_sample() -> Db {
        let mut db = sample();
        db.set(b"\xff\x00key", b"\x00\x01\xfe");
        db.set(b"text", b"\xc3\x28");
        db
    }

    fn without_stats(mut db: Db) -> Db {
        db.stats = Stats::default();
        db
    }

    /// The upgrade path: JSON text written by streaming, read back by the same schema.
    fn text_round_trip(db: &Db, schema: Schema) -> Db {
        let text = serde_json::to_vec(&StateOf::new(db, schema)).unwrap();
        deserialize_state(schema, &mut serde_json::Deserializer::from_slice(&text)).unwrap()
    }

    #[test]
    fn chunks_round_trip_and_apply_sets_deletes_and_counters() {
        let db = binary_sample();
        let set: Vec<Pair> = db.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        let deleted = vec![b"gone".to_vec(), b"\xfe\xff".to_vec()];
        let text = serde_json::to_vec(&ChunkOut {
            set: &set,
            deleted: &deleted,
            stats: db.stats,
        })
        .unwrap();
        let chunk: Chunk = serde_json::from_slice(&text).unwrap();
        assert_eq!(chunk.set.len(), set.len());
        assert_eq!(chunk.deleted, deleted);
        let mut target = Db::new();
        target.set(b"gone", b"x");
        target.set(b"\xfe\xff", b"y");
        target.set(b"name", b"stale");
        chunk.apply_to(&mut target);
        assert_eq!(target, db);
        for (bad, want) in [
            (
                &br#"{"entries":[{"k":"a","kind":"int","v":"x"}]}"#[..],
                "entry 0",
            ),
            (br#"{"deleted":[{}]}"#, "exactly one of k and kb"),
            (br#"{"nope":1}"#, "unknown field"),
        ] {
            let err = serde_json::from_slice::<Chunk>(bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn v1_round_trip() {
        let db = sample();
        let state = snapshot(&db, Schema::V1).unwrap();
        assert_eq!(state["entries"]["counter"], json!("42"));
        assert_eq!(state.as_object().unwrap().len(), 1, "{state}");
        // Schema 1 has no counters.
        assert_eq!(
            restore(Schema::V1, 1, state).unwrap(),
            without_stats(db.clone())
        );
        assert_eq!(text_round_trip(&db, Schema::V1), without_stats(db));
    }

    #[test]
    fn v2_round_trip_is_exact_and_binary_safe() {
        let db = binary_sample();
        let state = snapshot(&db, Schema::V2).unwrap();
        assert_eq!(restore(Schema::V2, 2, state).unwrap(), db);
        assert_eq!(text_round_trip(&db, Schema::V2), db);
    }

    #[test]
    fn v2_shape() {
        let mut db = Db::new();
        db.set(b"n", b"42");
        db.set(b"s", b"007");
        db.set(b"\xff", b"\xff");
        let state = snapshot(&db, Schema::V2).unwrap();
        let mut entries = state["entries"].as_array().unwrap().clone();
        entries.sort_by_key(|e| e["kind"].as_str().unwrap().to_owned());
        assert_eq!(
            entries,
            vec![
                json!({"kb": "/w==", "kind": "bytes", "v": "/w=="}),
                json!({"k": "n", "kind": "int", "v": 42}),
                json!({"k": "s", "kind": "str", "v": "007"}),
            ]
        );
        assert_eq!(
            state["stats"],
            json!({"commands_processed": 0, "keyspace_hits": 0, "keyspace_misses": 0})
        );
    }

    #[test]
    fn v2_server_migrates_v1_snapshot() {
        let db = sample();
        let v1 = snapshot(&db, Schema::V1).unwrap();
        let migrated = restore(Schema::V2, 1, v1).unwrap();
        assert_eq!(migrated, without_stats(db.clone()));
        // The migrated data writes out as schema 2 and reads back unchanged.
        assert_eq!(text_round_trip(&migrated, Schema::V2), without_stats(db));
        // Hand-written schema-1 state, as an old release would have produced it.
        let old = json!({"entries": {"a": "1", "b": "x"}});
        let mut db = restore(Schema::V2, 1, old).unwrap();
        assert_eq!(db.len(), 2);
        assert_eq!(db.get(b"a"), Some(&b"1"[..]));
    }

    #[test]
    fn v1_server_rejects_v2_snapshot() {
        let v2 = snapshot(&sample(), Schema::V2).unwrap();
        assert_eq!(
            restore(Schema::V1, 2, v2).unwrap_err(),
            "snapshot schema 2 is newer than this server's schema 1"
        );
    }

    #[test]
    fn v1_snapshot_refuses_binary_data() {
        let err = snapshot(&binary_sample(), Schema::V1).unwrap_err();
        assert!(
            err.contains("schema 1 cannot represent non-UTF-8 data"),
            "{err}"
        );
        let err = serde_json::to_vec(&StateOf::new(&binary_sample(), Schema::V1)).unwrap_err();
        assert!(err.to_string().contains("non-UTF-8"), "{err}");
    }

    #[test]
    fn unknown_versions_are_rejected() {
        let e = restore(Schema::V2, 3, json!({})).unwrap_err();
        assert_eq!(e, "snapshot schema 3 is newer than this server's schema 2");
        let e = restore(Schema::V2, 0, json!({"entries": {}})).unwrap_err();
        assert_eq!(e, "unknown snapshot schema 0");
    }

    #[test]
    fn malformed_states_are_rejected_with_reasons() {
        let cases = [
            (1, json!(null)),
            (1, json!([])),
            (1, json!({})),
            (1, json!({"entries": {"a": 1}})),
            (1, json!({"entries": {}, "extra": true})),
            (1, json!({"entries": []})),
            (2, json!({"entries": {"a": "b"}})),
            (2, json!({"entries": [{"k": "a", "kind": "int", "v": "x"}]})),
            (2, json!({"entries": [{"k": "a", "kind": "int", "v": 1.5}]})),
            (
                2,
                json!({"entries": [{"k": "a", "kind": "int", "v": 18446744073709551615u64}]}),
            ),
            (2, json!({"entries": [{"k": "a", "kind": "str", "v": 3}]})),
            (
                2,
                json!({"entries": [{"k": "a", "kind": "bytes", "v": "not base64!"}]}),
            ),
            (
                2,
                json!({"entries": [{"k": "a", "kb": "YQ==", "kind": "str", "v": ""}]}),
            ),
            (2, json!({"entries": [{"kind": "str", "v": ""}]})),
            (2, json!({"entries": [{"k": "a", "kind": "float", "v": 1}]})),
            (
                2,
                json!({"entries": [{"k": "a", "kind": "str", "v": "", "ttl": 5}]}),
            ),
            (
                2,
                json!({"entries": [{"k": "a", "kind": "str", "v": "1"}, {"kb": "YQ==", "kind": "str", "v": "2"}]}),
            ),
            (2, json!({"entries": [], "stats": {"uptime": 1}})),
        ];
        for (version, state) in cases {
            let err = restore(Schema::V2, version, state.clone())
                .expect_err(&format!("accepted v{version} {state}"));
            assert!(err.starts_with("malformed schema-"), "{err}");
        }
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let err = restore(
            Schema::V2,
            2,
            json!({"entries": [{"k": "a", "kind": "str", "v": "1"}, {"k": "a", "kind": "str", "v": "2"}]}),
        )
        .unwrap_err();
        assert!(err.contains("entry 1: duplicate key"), "{err}");
        // A JSON object with a repeated key (only possible in hand-made text).
        let text = br#"{"entries": {"a": "1", "a": "2"}}"#;
        let err = deserialize_state(Schema::V1, &mut serde_json::Deserializer::from_slice(text))
            .unwrap_err();
        assert!(err.to_string().contains("duplicate key \"a\""), "{err}");
    }

    #[test]
    fn empty_db_round_trips_in_both_schemas() {
        for schema in [Schema::V1, Schema::V2] {
            let state = snapshot(&Db::new(), schema).unwrap();
            assert_eq!(
                restore(Schema::V2, schema.version(), state).unwrap(),
                Db::new()
            );
            assert_eq!(text_round_trip(&Db::new(), schema), Db::new());
        }
    }
}
