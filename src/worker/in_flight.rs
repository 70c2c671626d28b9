//! The jobs this worker is running, by queue entry: what it must not claim again, must refresh so
//! that nobody else claims them, and must finish before it gives a shard up.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

/// Entry ids are unique within a shard's stream only (the in-memory queue numbers each shard from
/// zero), so an entry is known by both.
type Entry = (u32, String);

#[derive(Default)]
pub struct InFlight {
    entries: Mutex<HashSet<Entry>>,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<Entry>> {
        // Single inserts and removes: a panic elsewhere cannot leave the map inconsistent.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mark `entry` as running; false when it already is (a duplicate delivery to ignore).
    pub fn start(&self, shard: u32, entry: &str) -> bool {
        self.lock().insert((shard, entry.to_string()))
    }

    pub fn finish(&self, shard: u32, entry: &str) {
        self.lock().remove(&(shard, entry.to_string()));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Shards with a job running here.
    pub fn busy_shards(&self) -> Vec<u32> {
        let mut shards: Vec<u32> = self.lock().iter().map(|(s, _)| *s).collect();
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    /// Running entries, by shard.
    pub fn by_shard(&self) -> BTreeMap<u32, Vec<String>> {
        let mut out: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (shard, entry) in self.lock().iter() {
            out.entry(*shard).or_default().push(entry.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_delivery_is_refused_until_the_first_finishes() {
        let f = InFlight::default();
        assert!(f.start(3, "1-0"));
        assert!(!f.start(3, "1-0"));
        assert!(
            f.start(5, "1-0"),
            "the same entry id on another shard is another job"
        );
        assert_eq!(f.busy_shards(), vec![3, 5]);
        f.finish(3, "1-0");
        assert_eq!(f.busy_shards(), vec![5]);
        assert!(f.start(3, "1-0"));
        assert_eq!(f.len(), 2);
    }
}
