//! The in-memory keyspace: binary-safe keys and values, plus counters that travel with the
//! state across upgrades (schema 2).

use std::collections::{HashMap, HashSet};

/// Counters kept with the data, so they survive a stateful upgrade.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Commands executed (every command, including PING and errors).
    pub commands_processed: u64,
    /// Read look-ups that found the key (GET, MGET, SET ... GET).
    pub keyspace_hits: u64,
    /// Read look-ups that did not.
    pub keyspace_misses: u64,
}

/// Shards of the keyspace: a pre-copy or a snapshot copies one at a time out of the lock,
/// so the lock is held for a shard's copy, not for the whole state's encoding.
pub const SHARDS: usize = 256;

/// A pair of the keyspace, owned.
pub type Pair = (Vec<u8>, Vec<u8>);

/// The keyspace. Redis strings only: every value is a byte string, and integer commands
/// parse and rewrite its decimal form, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Db {
    shards: Vec<HashMap<Vec<u8>, Vec<u8>>>,
    len: usize,
    /// Keys written or deleted since the last [`Db::take_dirty`], while a pre-copy runs.
    dirty: Option<HashSet<Vec<u8>>>,
    /// Counters restored from (and written to) the snapshot.
    pub stats: Stats,
}

impl Default for Db {
    fn default() -> Self {
        Db {
            shards: vec![HashMap::new(); SHARDS],
            len: 0,
            dirty: None,
            stats: Stats::default(),
        }
    }
}

/// FNV-1a: a stable, cheap shard index (the maps hash with their own keys).
fn shard_of(key: &[u8]) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % SHARDS as u64) as usize
}

impl Db {
    /// An empty keyspace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn touch(&mut self, key: &[u8]) {
        if let Some(d) = self.dirty.as_mut() {
            if !d.contains(key) {
                d.insert(key.to_vec());
            }
        }
    }

    /// The value at `key`, counting a hit or a miss.
    pub fn get(&mut self, key: &[u8]) -> Option<&[u8]> {
        let found = self.shards[shard_of(key)].get(key);
        if found.is_some() {
            self.stats.keyspace_hits += 1;
        } else {
            self.stats.keyspace_misses += 1;
        }
        found.map(Vec::as_slice)
    }

    /// Whether `key` exists (not counted as a hit or miss, like Redis' EXISTS).
    pub fn contains(&self, key: &[u8]) -> bool {
        self.shards[shard_of(key)].contains_key(key)
    }

    /// Sets `key`, returning the previous value.
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> Option<Vec<u8>> {
        self.touch(key);
        let shard = &mut self.shards[shard_of(key)];
        // Copy into exactly-sized buffers: the arguments borrow from the connection's read
        // buffer, and storing slices of it would pin whole read buffers in memory.
        if let Some(slot) = shard.get_mut(key) {
            return Some(std::mem::replace(slot, value.to_vec()));
        }
        shard.insert(key.to_vec(), value.to_vec());
        self.len += 1;
        None
    }

    /// Inserts an owned pair (used by restore).
    pub fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) -> Option<Vec<u8>> {
        self.touch(&key);
        let old = self.shards[shard_of(&key)].insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `key`; returns whether it existed.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        let gone = self.shards[shard_of(key)].remove(key).is_some();
        if gone {
            self.len -= 1;
            self.touch(key);
        }
        gone
    }

    /// Mutable access to an existing value (used by INCR); counts as a write.
    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut Vec<u8>> {
        // The extra look-up only while a pre-copy tracks changes: INCR is a hot path.
        if self.dirty.is_some() && self.contains(key) {
            self.touch(key);
        }
        self.shards[shard_of(key)].get_mut(key)
    }

    /// Removes every key; counters are kept.
    pub fn clear(&mut self) {
        if let Some(d) = self.dirty.as_mut() {
            for shard in &self.shards {
                d.extend(shard.keys().cloned());
            }
        }
        for shard in &mut self.shards {
            *shard = HashMap::new();
        }
        self.len = 0;
    }

    /// Iterates over all pairs in arbitrary order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.shards
            .iter()
            .flat_map(|m| m.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
    }

    /// Pre-sizes the table for `n` more keys (restore knows the count up front).
    pub fn reserve(&mut self, n: usize) {
        let each = n / SHARDS + 1;
        for shard in &mut self.shards {
            shard.reserve(each);
        }
    }

    /// A copy of shard `i`'s pairs (empty past the last shard).
    pub fn copy_shard(&self, i: usize) -> Vec<Pair> {
        self.shards.get(i).map_or_else(Vec::new, |m| {
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        })
    }

    /// Starts (or restarts) recording the keys written and deleted.
    pub fn track_changes(&mut self) {
        self.dirty = Some(HashSet::new());
    }

    /// Stops recording changes.
    pub fn stop_tracking(&mut self) {
        self.dirty = None;
    }

    /// The keys changed since the last call (or since tracking started), and tracking goes
    /// on from an empty set.
    pub fn take_dirty(&mut self) -> Vec<Vec<u8>> {
        match self.dirty.as_mut() {
            Some(d) => std::mem::take(d).into_iter().collect(),
            None => Vec::new(),
        }
    }

    /// The current value of each of `keys`: set pairs, and the keys that do not exist.
    pub fn current(&self, keys: &[Vec<u8>]) -> (Vec<Pair>, Vec<Vec<u8>>) {
        let (mut set, mut deleted) = (Vec::new(), Vec::new());
        for k in keys {
            match self.shards[shard_of(k)].get(k) {
                Some(v) => set.push((k.clone(), v.clone())),
                None => deleted.push(k.clone()),
            }
        }
        (set, deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_remove_and_counters() {
        let mut db = Db::new();
        assert_eq!(db.get(b"k"), None);
        assert_eq!(db.set(b"k", b"v1"), None);
        assert_eq!(db.set(b"k", b"v2"), Some(b"v1".to_vec()));
        assert_eq!(db.get(b"k"), Some(&b"v2"[..]));
        assert!(db.contains(b"k"));
        assert_eq!(db.len(), 1);
        assert!(db.remove(b"k"));
        assert!(!db.remove(b"k"));
        assert!(db.is_empty());
        assert_eq!(db.stats.keyspace_hits, 1);
        assert_eq!(db.stats.keyspace_misses, 1);
    }

    #[test]
    fn tracked_changes_are_every_key_written_or_deleted() {
        let mut db = Db::new();
        db.set(b"a", b"1");
        db.set(b"b", b"2");
        db.set(b"c", b"3");
        db.track_changes();
        db.set(b"a", b"10");
        db.remove(b"b");
        db.get_mut(b"c").unwrap().push(b'0');
        db.insert(b"d".to_vec(), b"4".to_vec());
        db.remove(b"nothing");
        db.get(b"a");
        let mut dirty = db.take_dirty();
        dirty.sort();
        assert_eq!(dirty, [&b"a"[..], b"b", b"c", b"d"]);
        let (set, deleted) = db.current(&dirty);
        assert_eq!(set.len(), 3);
        assert_eq!(deleted, [b"b".to_vec()]);
        assert!(db.take_dirty().is_empty(), "a new mark starts empty");
        db.clear();
        assert_eq!(db.take_dirty().len(), 3);
        assert_eq!(db.len(), 0);
        db.stop_tracking();
        db.set(b"x", b"1");
        assert!(db.take_dirty().is_empty());
    }

    #[test]
    fn shards_together_hold_every_key_once() {
        let mut db = Db::new();
        for i in 0..2000u32 {
            db.set(i.to_string().as_bytes(), b"v");
        }
        let copied: usize = (0..SHARDS).map(|i| db.copy_shard(i).len()).sum();
        assert_eq!((copied, db.len(), db.iter().count()), (2000, 2000, 2000));
        assert!(db.copy_shard(SHARDS).is_empty());
    }
}
