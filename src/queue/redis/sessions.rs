//! Sessions, evaluation-key blobs (on their own link) and what each tenant holds.

use redis::Value;

use super::{RedisQueue, PREFIX};
use crate::queue::{now_unix_ms, QueueError, SessionRecord, TenantUsage};

/// KEYS: tenant's session index (zset by expiry), its key-bytes hash. ARGV: now (ms).
/// Drops expired sessions from both, then returns `{sessions, key bytes}`.
pub(super) const TENANT_USAGE: &str = r"
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, id in ipairs(expired) do redis.call('HDEL', KEYS[2], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do total = total + tonumber(v) end
return {redis.call('ZCARD', KEYS[1]), total}";

pub(super) fn session_key(id: &str) -> String {
    format!("{PREFIX}session:{id}")
}

fn key_key(id: &str) -> String {
    format!("{PREFIX}key:{id}")
}

fn tenant_sessions_key(tenant: &str) -> String {
    format!("{PREFIX}tenant-sessions:{tenant}")
}

fn tenant_bytes_key(tenant: &str) -> String {
    format!("{PREFIX}tenant-key-bytes:{tenant}")
}

impl RedisQueue {
    pub(super) async fn store_key(
        &self,
        key_id: &str,
        bytes: &[u8],
        ttl_ms: u64,
    ) -> Result<(), QueueError> {
        let _: Value = self
            .blobs
            .run_repeatable(|mut c| async move {
                redis::cmd("SET")
                    .arg(key_key(key_id))
                    .arg(bytes)
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    pub(super) async fn load_key(&self, key_id: &str) -> Result<Option<Vec<u8>>, QueueError> {
        self.blobs
            .run_repeatable(|mut c| async move {
                redis::cmd("GET")
                    .arg(key_key(key_id))
                    .query_async(&mut c)
                    .await
            })
            .await
    }

    pub(super) async fn store_session(
        &self,
        record: &SessionRecord,
        ttl_ms: u64,
    ) -> Result<(), QueueError> {
        let bytes = rmp_serde::to_vec_named(record).expect("msgpack encoding into a Vec");
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(session_key(&record.id))
            .arg(bytes)
            .arg("PX")
            .arg(ttl_ms);
        // The keys live as long as the longest session using them.
        for key_id in record.keys.values() {
            pipe.cmd("PEXPIRE")
                .arg(key_key(key_id))
                .arg(ttl_ms)
                .arg("GT");
        }
        let (index, sizes) = (
            tenant_sessions_key(&record.tenant),
            tenant_bytes_key(&record.tenant),
        );
        pipe.cmd("ZADD")
            .arg(&index)
            .arg(record.expires_unix_ms)
            .arg(&record.id)
            .cmd("HSET")
            .arg(&sizes)
            .arg(&record.id)
            .arg(record.key_bytes)
            // Every session has the same TTL, so the latest write expires last.
            .cmd("PEXPIRE")
            .arg(&index)
            .arg(ttl_ms)
            .cmd("PEXPIRE")
            .arg(&sizes)
            .arg(ttl_ms);
        let _: Value = self
            .commands
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(())
    }

    pub(super) async fn remove_session(&self, record: &SessionRecord) -> Result<bool, QueueError> {
        let (deleted, _, _): (i64, Value, Value) = self
            .commands
            .run(|mut c| async move {
                redis::pipe()
                    .cmd("DEL")
                    .arg(session_key(&record.id))
                    .cmd("ZREM")
                    .arg(tenant_sessions_key(&record.tenant))
                    .arg(&record.id)
                    .cmd("HDEL")
                    .arg(tenant_bytes_key(&record.tenant))
                    .arg(&record.id)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(deleted > 0)
    }

    pub(super) async fn usage_of(&self, tenant: &str) -> Result<TenantUsage, QueueError> {
        let now = now_unix_ms();
        let (sessions, key_bytes): (usize, u64) = self
            .commands
            .run(|mut c| async move {
                self.scripts
                    .usage
                    .key(tenant_sessions_key(tenant))
                    .key(tenant_bytes_key(tenant))
                    .arg(now)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(TenantUsage {
            sessions,
            key_bytes,
        })
    }
}
