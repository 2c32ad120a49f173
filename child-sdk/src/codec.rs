//! The snapshot codec: `{"version": V, "state": ...}` streamed into a
//! sealed memfd, and checked, mapped and decoded (or migrated) on the other
//! side. Pure apart from the fd calls in `sys`.

use std::fmt;
use std::io::BufWriter;
use std::marker::PhantomData;
use std::os::fd::{AsFd, OwnedFd};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::sys;

/// The snapshot's JSON layout: `{"version": V, "state": ...}`.
#[derive(Serialize)]
struct SnapshotOut<'a, T> {
    version: u32,
    state: &'a T,
}

/// Serialises a snapshot into a new sealed memfd; returns it and its size.
pub(crate) fn write_snapshot<T: Serialize>(version: u32, state: &T) -> Result<(OwnedFd, u64)> {
    write_memfd(|w| {
        serde_json::to_writer(w, &SnapshotOut { version, state })
            .map_err(|e| format!("serialising the state: {e}"))
    })
}

/// Fills a new memfd through `fill`, seals it; returns it and its size.
pub(crate) fn write_memfd<F>(fill: F) -> Result<(OwnedFd, u64)>
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
    // One pass: `version` comes first (as `Baton::snapshot` writes it), so `state` is
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
    use std::collections::BTreeMap;
    use std::io::Write;

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
        assert!(
            sys::seals(fd.as_fd())
                .unwrap()
                .contains(sys::immutable_seals())
        );
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

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any bytes in a sealed memfd are restored or rejected with a reason; never a
            /// panic.
            #[test]
            fn any_snapshot_bytes_are_restored_or_rejected(bytes in prop::collection::vec(any::<u8>(), 1..400)) {
                let fd = memfd_with(&bytes, true);
                if let Err(reason) = read_snapshot::<Db, _>(&fd, bytes.len() as u64, 2, no_migration) {
                    prop_assert!(!reason.is_empty());
                }
            }

            /// Any state of the program's own version round-trips.
            #[test]
            fn own_version_round_trips(version in any::<u32>(), db in prop::collection::btree_map(".{0,12}", any::<u64>(), 0..20)) {
                let (fd, size) = write_snapshot(version, &db).unwrap();
                let (back, from): (Db, u32) = read_snapshot(&fd, size, version, no_migration).unwrap();
                prop_assert_eq!(back, db);
                prop_assert_eq!(from, version);
            }
        }
    }
}
