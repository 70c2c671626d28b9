//! Worker heartbeats and shard leases (`SET NX PX`, renewed and released only by their owner).

use std::sync::atomic::Ordering;

use redis::Value;

use super::{RedisQueue, PREFIX};
use crate::queue::{fair_share, grown_shards, now_unix_ms, shard_of, Leases, QueueError};

/// How stale a coordinator's copy of the shard count may be: a job routed with an older count
/// still lands on a leased stream (the count only grows), it only misses its session's new
/// shard, so a second is plenty.
const SHARD_COUNT_CHECK_MS: u64 = 1000;

/// Extends a lease only if `worker` still holds it.
pub(super) const RENEW_IF_OWNER: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";
/// Releases a lease only if `worker` still holds it.
pub(super) const RELEASE_IF_OWNER: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// KEYS: the shard count. ARGV: the count wanted. Raises the count to that if it is below (or
/// absent: a Redis that lost it gets back what the processes knew), returns the count.
pub(super) const GROW_SHARDS: &str = r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
local wanted = tonumber(ARGV[1])
if n < wanted then
  redis.call('SET', KEYS[1], wanted)
  n = wanted
end
return n";

fn shards_key() -> String {
    format!("{PREFIX}shards")
}

fn lease_key(shard: u32) -> String {
    format!("{PREFIX}lease:{shard}")
}

fn workers_key() -> String {
    format!("{PREFIX}workers")
}

impl RedisQueue {
    /// The shard count this process knows (0 before the first exchange with Redis).
    pub(super) fn known_shards(&self) -> u32 {
        self.shards.load(Ordering::Relaxed)
    }

    /// The cluster's shard count, read from Redis at most every [`SHARD_COUNT_CHECK_MS`].
    pub(super) async fn shard_count(&self) -> Result<u32, QueueError> {
        let fresh = now_unix_ms().saturating_sub(self.shards_checked_ms.load(Ordering::Relaxed))
            < SHARD_COUNT_CHECK_MS;
        match self.known_shards() {
            known if fresh && known > 0 => Ok(known),
            known => self.grow_shards(known).await,
        }
    }

    /// Raise the cluster's shard count to at least `wanted` and at least what this process
    /// knows, then adopt the count Redis holds.
    pub(super) async fn grow_shards(&self, wanted: u32) -> Result<u32, QueueError> {
        let wanted = wanted.max(self.known_shards());
        let n: u32 = self
            .commands
            .run(|mut c| async move {
                self.scripts
                    .grow_shards
                    .key(shards_key())
                    .arg(wanted)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        self.adopt_shards(n).await
    }

    /// Take `n` (what Redis holds) as the count: never below the count already known, never past
    /// the largest any config allows. New streams get their consumer group here, from entry 0, so
    /// that jobs a coordinator appended before any worker knew the stream are read too.
    async fn adopt_shards(&self, n: u32) -> Result<u32, QueueError> {
        let n = n.min(1024);
        let before = self.known_shards();
        if n > before {
            // Groups first: a failure here leaves the count unchanged, so the next call
            // creates them again rather than routing or leasing onto streams without one.
            self.ensure_groups_of(before..n).await?;
            if self.shards.fetch_max(n, Ordering::Relaxed) < n && before > 0 {
                tracing::info!(from = before, to = n, "the queue's shard count grew");
            }
        }
        self.shards_checked_ms
            .store(now_unix_ms(), Ordering::Relaxed);
        Ok(n.max(self.known_shards()))
    }

    pub(super) async fn count_live_workers(&self) -> Result<usize, QueueError> {
        let since = now_unix_ms().saturating_sub(self.settings.lease_ttl_ms);
        self.commands
            .run(|mut c| async move {
                redis::cmd("ZCOUNT")
                    .arg(workers_key())
                    .arg(since)
                    .arg("+inf")
                    .query_async(&mut c)
                    .await
            })
            .await
    }

    async fn lease_script(
        &self,
        release: bool,
        shard: u32,
        worker: &str,
    ) -> Result<i64, QueueError> {
        let ttl = self.settings.lease_ttl_ms;
        self.commands
            .run(|mut c| async move {
                let mut invocation = if release {
                    self.scripts.release.key(lease_key(shard))
                } else {
                    self.scripts.renew.key(lease_key(shard))
                };
                invocation.arg(worker);
                if !release {
                    invocation.arg(ttl);
                }
                invocation.invoke_async(&mut c).await
            })
            .await
    }

    pub(super) async fn renew_leases(
        &self,
        worker: &str,
        busy: &[u32],
    ) -> Result<Leases, QueueError> {
        let ttl = self.settings.lease_ttl_ms;
        let now = now_unix_ms();
        let (_, _, live, stored): (Value, Value, usize, Option<u32>) = self
            .commands
            .run(|mut c| async move {
                redis::pipe()
                    .cmd("ZADD")
                    .arg(workers_key())
                    .arg(now)
                    .arg(worker)
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(workers_key())
                    .arg("-inf")
                    .arg(now.saturating_sub(ttl))
                    .cmd("ZCARD")
                    .arg(workers_key())
                    .cmd("GET")
                    .arg(shards_key())
                    .query_async(&mut c)
                    .await
            })
            .await?;
        // The shards follow the workers: a heartbeat that sees more workers than half the
        // shards grows the count (one more round trip, only then).
        let stored = stored.unwrap_or(0);
        let current = stored.max(self.known_shards());
        let wanted = grown_shards(current, live, self.settings.max_shards);
        let shards = if wanted > stored {
            self.grow_shards(wanted).await?
        } else {
            self.adopt_shards(stored).await?
        };
        let target = fair_share(shards, live);
        let keys: Vec<String> = (0..shards).map(lease_key).collect();
        let holders: Vec<Option<String>> = self
            .commands
            .run(|mut c| {
                let keys = keys.clone();
                async move { redis::cmd("MGET").arg(keys).query_async(&mut c).await }
            })
            .await?;

        let mut leases = Leases::default();
        // Busy shards first, so that the fair share keeps them rather than idle ones.
        let mut held: Vec<u32> = (0..shards)
            .filter(|&s| holders[s as usize].as_deref() == Some(worker))
            .collect();
        held.sort_by_key(|s| !busy.contains(s));
        for shard in held {
            let keep = leases.owned.len() < target;
            if !keep && !busy.contains(&shard) {
                self.lease_script(true, shard, worker).await?;
                continue;
            }
            if self.lease_script(false, shard, worker).await? == 1 {
                if keep {
                    leases.owned.push(shard);
                } else {
                    leases.draining.push(shard);
                }
            }
        }
        // Start looking for free shards at a worker-specific offset so that workers starting
        // together do not all race for shard 0.
        let n = shards;
        let offset = shard_of(worker, n);
        for i in 0..n {
            if leases.owned.len() >= target {
                break;
            }
            let shard = (offset + i) % n;
            if holders[shard as usize].is_some() {
                continue;
            }
            let taken: Option<String> = self
                .commands
                .run(|mut c| {
                    let key = keys[shard as usize].clone();
                    async move {
                        redis::cmd("SET")
                            .arg(key)
                            .arg(worker)
                            .arg("NX")
                            .arg("PX")
                            .arg(ttl)
                            .query_async(&mut c)
                            .await
                    }
                })
                .await?;
            if taken.is_some() {
                leases.owned.push(shard);
                leases.acquired.push(shard);
            }
        }
        leases.owned.sort_unstable();
        Ok(leases)
    }

    pub(super) async fn release_all(&self, worker: &str) -> Result<(), QueueError> {
        for shard in 0..self.known_shards() {
            self.lease_script(true, shard, worker).await?;
        }
        let _: Value = self
            .commands
            .run(|mut c| async move {
                redis::cmd("ZREM")
                    .arg(workers_key())
                    .arg(worker)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }
}
