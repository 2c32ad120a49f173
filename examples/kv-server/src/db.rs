//! The in-memory keyspace: binary-safe keys and values, plus counters that travel with the
//! state across upgrades (schema 2).

use std::collections::HashMap;

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

/// The keyspace. Redis strings only: every value is a byte string, and integer commands
/// parse and rewrite its decimal form, as Redis does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Db {
    map: HashMap<Vec<u8>, Vec<u8>>,
    /// Counters restored from (and written to) the snapshot.
    pub stats: Stats,
}

impl Db {
    /// An empty keyspace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The value at `key`, counting a hit or a miss.
    pub fn get(&mut self, key: &[u8]) -> Option<&[u8]> {
        let found = self.map.get(key);
        if found.is_some() {
            self.stats.keyspace_hits += 1;
        } else {
            self.stats.keyspace_misses += 1;
        }
        found.map(Vec::as_slice)
    }

    /// Whether `key` exists (not counted as a hit or miss, like Redis' EXISTS).
    pub fn contains(&self, key: &[u8]) -> bool {
        self.map.contains_key(key)
    }

    /// Sets `key`, returning the previous value.
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> Option<Vec<u8>> {
        // Copy into exactly-sized buffers: the arguments borrow from the connection's read
        // buffer, and storing slices of it would pin whole read buffers in memory.
        if let Some(slot) = self.map.get_mut(key) {
            return Some(std::mem::replace(slot, value.to_vec()));
        }
        self.map.insert(key.to_vec(), value.to_vec());
        None
    }

    /// Inserts an owned pair (used by restore).
    pub fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) -> Option<Vec<u8>> {
        self.map.insert(key, value)
    }

    /// Removes `key`; returns whether it existed.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        self.map.remove(key).is_some()
    }

    /// Mutable access to an existing value (used by INCR).
    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut Vec<u8>> {
        self.map.get_mut(key)
    }

    /// Removes every key; counters are kept.
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Iterates over all pairs in arbitrary order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.map.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// Pre-sizes the table for `n` keys (restore knows the count up front).
    pub fn reserve(&mut self, n: usize) {
        self.map.reserve(n);
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
}
