//! Statement summaries kept for texts that repeat.
//!
//! Applications send few distinct statement texts — prepared statements,
//! and the same parameterized query on every request — so summarizing
//! (a lexing pass per dialect reading, then the sanitized copy) is done
//! once per text and shared. Texts with literals inline are mostly unique;
//! caching them would cost a copy each and evict the useful entries, so a
//! text is admitted only the second time it is seen: a direct-mapped table
//! of hashes remembers texts seen once, in fixed memory.
//!
//! The cache is bounded by weight (bytes of text kept) and shared by every
//! connection's parser through their options.

use std::{
    hash::BuildHasher,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use quick_cache::{Weighter, sync::Cache};

use super::{SqlSummary, summarize};

/// Longest text kept: longer ones are summarized every time (rarely
/// repeated, and they would crowd the cache).
const MAX_KEPT_TEXT: usize = 4096;
/// Bytes of statement text and summaries kept, about.
const CAPACITY_BYTES: u64 = 2 << 20;
/// Texts expected, for sizing.
const EXPECTED_TEXTS: usize = 1024;
/// Slots of the seen-once table.
const SEEN_SLOTS: usize = 4096;

/// Summaries of repeated statement texts; see the module docs.
pub struct Summaries {
    cache: Cache<Key, Arc<SqlSummary>, ByBytes>,
    hasher: foldhash::fast::RandomState,
    /// Hash of a text seen once, by hash modulo the slot count (0: empty).
    seen: Box<[AtomicU64]>,
}

/// A text and the cap its summary was made with.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    text: Box<str>,
    max_len: usize,
}

/// Weighs an entry by the bytes it holds.
#[derive(Clone)]
struct ByBytes;

impl Weighter<Key, Arc<SqlSummary>> for ByBytes {
    fn weight(&self, key: &Key, summary: &Arc<SqlSummary>) -> u64 {
        let held = key.text.len()
            + summary.sanitized.len()
            + summary.collection.as_ref().map_or(0, String::len);
        // The entry's own overhead, so that empty texts weigh something.
        held as u64 + 64
    }
}

impl Default for Summaries {
    fn default() -> Self {
        Self {
            cache: Cache::with_weighter(EXPECTED_TEXTS, CAPACITY_BYTES, ByBytes),
            hasher: foldhash::fast::RandomState::default(),
            seen: (0..SEEN_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl std::fmt::Debug for Summaries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Summaries")
            .field("texts", &self.cache.len())
            .field("bytes", &self.cache.weight())
            .finish()
    }
}

impl Summaries {
    /// The summary of `sql` capped at `max_len`: [`summarize`]'s, from the
    /// cache when the text was summarized before.
    pub fn summarize(&self, sql: &str, max_len: usize) -> Arc<SqlSummary> {
        if sql.len() > MAX_KEPT_TEXT {
            return Arc::new(summarize(sql, max_len));
        }
        let lookup = (sql, max_len);
        if let Some(summary) = self.cache.get(&lookup) {
            return summary;
        }
        let summary = Arc::new(summarize(sql, max_len));
        if self.seen_before(&lookup) {
            let key = Key {
                text: sql.into(),
                max_len,
            };
            self.cache.insert(key, Arc::clone(&summary));
        }
        summary
    }

    /// Whether the text was seen once already; remembers it if not. Two
    /// texts sharing a slot evict each other, which only delays admission.
    fn seen_before(&self, lookup: &(&str, usize)) -> bool {
        let hash = self.hasher.hash_one(lookup).max(1);
        let slot = &self.seen[(hash % SEEN_SLOTS as u64) as usize];
        slot.swap(hash, Ordering::Relaxed) == hash
    }

    /// Texts kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.cache.len()
    }
}

/// Looks a key up by borrowed text, without building a [`Key`].
impl quick_cache::Equivalent<Key> for (&str, usize) {
    fn equivalent(&self, key: &Key) -> bool {
        *key.text == *self.0 && key.max_len == self.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_is_kept_from_its_second_sighting_and_gives_the_same_summary() {
        let s = Summaries::default();
        let sql = "SELECT * FROM t WHERE id = 42";
        let first = s.summarize(sql, 100);
        assert_eq!(s.len(), 0, "seen once: not kept");
        let second = s.summarize(sql, 100);
        assert_eq!(s.len(), 1, "seen twice: kept");
        let third = s.summarize(sql, 100);
        assert!(Arc::ptr_eq(&second, &third), "the kept summary is shared");
        assert_eq!(*first, summarize(sql, 100));
        assert_eq!(*third, summarize(sql, 100));
        assert_eq!(third.sanitized, "SELECT * FROM t WHERE id = ?");
        // Another cap is another summary.
        assert_eq!(*s.summarize(sql, 10), summarize(sql, 10));
    }

    #[test]
    fn unique_texts_are_not_kept_and_memory_stays_bounded() {
        let s = Summaries::default();
        for i in 0..20_000 {
            let sql = format!("UPDATE a SET b = b + {i} WHERE id = {i}");
            assert_eq!(
                s.summarize(&sql, 2048).sanitized,
                "UPDATE a SET b = b + ? WHERE id = ?"
            );
        }
        assert_eq!(s.len(), 0, "texts seen once are never kept");
        // Repeated texts, more than fit: the weight stays under the capacity.
        let long = "x".repeat(3000);
        for round in 0..2 {
            for i in 0..2_000 {
                let sql = format!("SELECT '{long}' FROM t{i}");
                let summary = s.summarize(&sql, 2048);
                assert_eq!(
                    summary.collection.as_deref(),
                    Some(&*format!("t{i}")),
                    "round {round}"
                );
            }
        }
        assert!(
            s.cache.weight() <= CAPACITY_BYTES,
            "{} bytes kept",
            s.cache.weight()
        );
        assert!(s.len() > 0);
        // Texts above the kept length are summarized, never kept.
        let huge = format!("SELECT '{}' FROM big", "y".repeat(MAX_KEPT_TEXT));
        let before = s.len();
        for _ in 0..3 {
            assert_eq!(s.summarize(&huge, 64).collection.as_deref(), Some("big"));
        }
        assert!(s.len() <= before);
    }
}
