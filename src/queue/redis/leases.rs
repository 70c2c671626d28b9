//! Worker heartbeats and shard leases (`SET NX PX`, renewed and released only by their owner).

use redis::Value;

use super::{RedisQueue, PREFIX};
use crate::queue::{fair_share, now_unix_ms, shard_of, Leases, QueueError};

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

fn lease_key(shard: u32) -> String {
    format!("{PREFIX}lease:{shard}")
}

fn workers_key() -> String {
    format!("{PREFIX}workers")
}

impl RedisQueue {
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
        let (_, _, live): (Value, Value, usize) = self
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
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let target = fair_share(self.settings.shards, live);
        let keys: Vec<String> = (0..self.settings.shards).map(lease_key).collect();
        let holders: Vec<Option<String>> = self
            .commands
            .run(|mut c| {
                let keys = keys.clone();
                async move { redis::cmd("MGET").arg(keys).query_async(&mut c).await }
            })
            .await?;

        let mut leases = Leases::default();
        // Busy shards first, so that the fair share keeps them rather than idle ones.
        let mut held: Vec<u32> = (0..self.settings.shards)
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
        let n = self.settings.shards;
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
        for shard in 0..self.settings.shards {
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
