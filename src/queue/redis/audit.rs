//! A consistency check of what Redis holds for sessions, key blobs and bills: what an operator
//! runs after a failover (`hyfhe store audit`), and what the `ha` fault scenarios check.
//!
//! A session and its reference sets are created, renewed and deleted by one script each, which a
//! replica applies whole (and a renewal never brings back a deleted session), so neither a
//! failover nor a race can leave a live session outside the reference set of a blob it uses;
//! that is the invariant [`StoreAudit::is_consistent`] checks. What a failover can
//! leave is recoverable and counted: a session whose blob (stored after the record) had not
//! reached the replica answers `session_not_found` and its client opens a new session with the
//! same keys; references to sessions that are gone and quota entries of such sessions are pruned
//! lazily or expire.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{RedisQueue, PREFIX};
use crate::queue::{QueueError, SessionRecord};

/// What [`RedisQueue::audit`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreAudit {
    pub sessions: usize,
    pub key_blobs: usize,
    /// Live sessions missing from the reference set of a blob they use (`session → key id`):
    /// deleting another session could then drop the blob under them. Must be empty.
    pub unreferenced_uses: Vec<String>,
    /// Live sessions with a key blob the store does not hold: their next job is answered
    /// `session_not_found` and the client re-uploads.
    pub sessions_without_blob: usize,
    /// Reference-set members that are no live session (pruned when a session sharing the blob
    /// is deleted, or expire with the set).
    pub stale_references: usize,
    /// Blobs that no live session references (they expire with their TTL).
    pub unreferenced_blobs: usize,
    /// Tenant key-bytes entries of sessions that are gone (they leave at the tenant's next
    /// session creation or usage check once expired, or expire with the hash).
    pub stale_quota_entries: usize,
    /// Every tenant's bill: jobs, rows and FHE microseconds.
    pub bills: BTreeMap<String, BTreeMap<String, u64>>,
}

impl StoreAudit {
    /// Whether every reference a live session needs is there.
    pub fn is_consistent(&self) -> bool {
        self.unreferenced_uses.is_empty()
    }
}

impl RedisQueue {
    /// Every key matching `pattern`, by `SCAN` (never `KEYS`, which would block the server).
    async fn scan(&self, pattern: &str) -> Result<Vec<String>, QueueError> {
        let mut cursor = 0u64;
        let mut out = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = self
                .commands
                .run_repeatable(|mut c| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            out.extend(keys);
            if next == 0 {
                out.sort_unstable();
                out.dedup();
                return Ok(out);
            }
            cursor = next;
        }
    }

    async fn members(&self, key: &str, command: &str) -> Result<Vec<String>, QueueError> {
        self.commands
            .run_repeatable(|mut c| async move {
                redis::cmd(command).arg(key).query_async(&mut c).await
            })
            .await
    }

    /// Walk the sessions, blobs, reference sets, tenant quota entries and bills. Not a snapshot
    /// (it reads key by key): run it when the cluster is idle, or read a non-empty
    /// `unreferenced_uses` again before acting on it.
    pub async fn audit(&self) -> Result<StoreAudit, QueueError> {
        let mut audit = StoreAudit::default();
        let mut live = BTreeSet::new();
        let mut uses = Vec::new();
        for key in self.scan(&format!("{PREFIX}session:*")).await? {
            // A session that expired between the scan and the read is simply not live.
            if let Some(record) = self.get_msgpack::<SessionRecord>(&key).await? {
                live.insert(record.id.clone());
                uses.extend(record.keys.into_values().map(|k| (record.id.clone(), k)));
            }
        }
        audit.sessions = live.len();
        let blobs: BTreeSet<String> = self
            .scan(&format!("{PREFIX}key:*"))
            .await?
            .into_iter()
            .filter_map(|k| k.strip_prefix(&format!("{PREFIX}key:")).map(String::from))
            .collect();
        audit.key_blobs = blobs.len();
        let mut refs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for key in self.scan(&format!("{PREFIX}key-refs:*")).await? {
            let id = key
                .trim_start_matches(&format!("{PREFIX}key-refs:"))
                .to_string();
            let members = self.members(&key, "SMEMBERS").await?;
            audit.stale_references += members.iter().filter(|m| !live.contains(*m)).count();
            refs.insert(id, members.into_iter().collect());
        }
        let mut without_blob = BTreeSet::new();
        for (session, key_id) in &uses {
            if !refs.get(key_id).is_some_and(|r| r.contains(session)) {
                audit
                    .unreferenced_uses
                    .push(format!("{session} → {key_id}"));
            }
            if !blobs.contains(key_id) {
                without_blob.insert(session);
            }
        }
        audit.sessions_without_blob = without_blob.len();
        audit.unreferenced_blobs = blobs
            .iter()
            .filter(|b| {
                !refs
                    .get(*b)
                    .is_some_and(|r| r.iter().any(|m| live.contains(m)))
            })
            .count();
        for key in self.scan(&format!("{PREFIX}tenant-key-bytes:*")).await? {
            let sessions = self.members(&key, "HKEYS").await?;
            audit.stale_quota_entries += sessions.iter().filter(|s| !live.contains(*s)).count();
        }
        for key in self.scan(&format!("{PREFIX}bill:*")).await? {
            let tenant = key
                .trim_start_matches(&format!("{PREFIX}bill:"))
                .to_string();
            let bill: BTreeMap<String, u64> = self
                .commands
                .run_repeatable(|mut c| {
                    let key = key.clone();
                    async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await }
                })
                .await?;
            audit.bills.insert(tenant, bill);
        }
        Ok(audit)
    }
}
