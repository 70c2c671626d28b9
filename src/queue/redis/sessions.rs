//! Sessions, evaluation-key blobs (on their own link) and what each tenant holds.

use redis::Value;

use super::{RedisQueue, PREFIX};
use crate::queue::{now_unix_ms, QueueError, Reserved, SessionQuota, SessionRecord, TenantUsage};

/// KEYS: tenant's session index (zset by expiry), its key-bytes hash. ARGV: now (ms).
/// Drops expired sessions from both, then returns `{sessions, key bytes}`.
pub(super) const TENANT_USAGE: &str = r"
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, id in ipairs(expired) do redis.call('HDEL', KEYS[2], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do total = total + tonumber(v) end
return {redis.call('ZCARD', KEYS[1]), total}";

/// KEYS: session, tenant index, tenant key bytes, then one reference set per key blob.
/// ARGV: now (ms), record, TTL (ms), expiry (ms), session id, key bytes, quota sessions, quota
/// bytes. Drops the tenant's expired sessions, then either refuses (`{0, sessions, bytes}`) or
/// stores and counts the session and references its blobs (`{1}`), in one step.
pub(super) const CREATE_SESSION: &str = r"
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, id in ipairs(expired) do redis.call('HDEL', KEYS[3], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[3])) do total = total + tonumber(v) end
local held = redis.call('ZCARD', KEYS[2])
if held >= tonumber(ARGV[7]) or total + tonumber(ARGV[6]) > tonumber(ARGV[8]) then
  return {0, held, total}
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
redis.call('HSET', KEYS[3], ARGV[5], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
for i = 4, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[5])
  redis.call('PEXPIRE', KEYS[i], ARGV[3])
end
return {1}";

/// KEYS: session, tenant index, tenant key bytes, then (reference set, blob) per key.
/// ARGV: record, TTL (ms), expiry (ms), session id, key bytes. Renews a session that still exists
/// (`SET XX`: one deleted or expired since it was read stays gone, never back outside its blobs'
/// reference sets), its place in the tenant's usage, its references (re-added: a renewal also
/// repairs one) and its blobs' TTL (only ever lengthened), in one step a replica applies whole.
/// Returns 1 when renewed.
pub(super) const REFRESH_SESSION: &str = r"
if not redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'XX') then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
for i = 4, #KEYS, 2 do
  redis.call('SADD', KEYS[i], ARGV[4])
  redis.call('PEXPIRE', KEYS[i], ARGV[2])
  redis.call('PEXPIRE', KEYS[i + 1], ARGV[2], 'GT')
end
return 1";

/// KEYS: session, tenant index, tenant key bytes, then (reference set, blob) per key.
/// ARGV: session id, the session key prefix. Deletes the session and every blob that no live
/// session references any more; returns `{sessions deleted, blobs deleted}`. (It reads session
/// keys it is not given, which a Redis Cluster would refuse; hyfhe runs one primary.)
pub(super) const DELETE_SESSION: &str = r"
local deleted = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
local dropped = 0
for i = 4, #KEYS, 2 do
  redis.call('SREM', KEYS[i], ARGV[1])
  for _, other in ipairs(redis.call('SMEMBERS', KEYS[i])) do
    if redis.call('EXISTS', ARGV[2] .. other) == 0 then redis.call('SREM', KEYS[i], other) end
  end
  if redis.call('SCARD', KEYS[i]) == 0 then
    dropped = dropped + redis.call('DEL', KEYS[i + 1])
    redis.call('DEL', KEYS[i])
  end
end
return {deleted, dropped}";

/// KEYS: the tenant's slot set (zset by lease end). ARGV: slot id, limit, lease (ms). Drops
/// ended leases, then takes a slot (`1`) or refuses (`0`); the set expires with its longest
/// lease (coordinators may run with different timeouts). Time is the server's (`TIME`), so
/// coordinators with skewed clocks agree on when a lease ends.
pub(super) const ACQUIRE_SLOT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[1], math.max(tonumber(last[2]) - now, 1))
return 1";

pub(super) fn session_key(id: &str) -> String {
    format!("{PREFIX}session:{id}")
}

fn key_key(id: &str) -> String {
    format!("{PREFIX}key:{id}")
}

/// The sessions that reference a key blob.
fn key_refs_key(id: &str) -> String {
    format!("{PREFIX}key-refs:{id}")
}

/// The KEYS of [`REFRESH_SESSION`] and [`DELETE_SESSION`]: the session, its tenant's index and
/// key bytes, then (reference set, blob) per key.
fn session_and_blob_keys(call: &mut redis::ScriptInvocation<'_>, record: &SessionRecord) {
    call.key(session_key(&record.id))
        .key(tenant_sessions_key(&record.tenant))
        .key(tenant_bytes_key(&record.tenant));
    for key_id in record.keys.values() {
        call.key(key_refs_key(key_id)).key(key_key(key_id));
    }
}

fn tenant_sessions_key(tenant: &str) -> String {
    format!("{PREFIX}tenant-sessions:{tenant}")
}

fn tenant_bytes_key(tenant: &str) -> String {
    format!("{PREFIX}tenant-key-bytes:{tenant}")
}

fn tenant_slots_key(tenant: &str) -> String {
    format!("{PREFIX}tenant-in-flight:{tenant}")
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
        let _: i64 = self
            .commands
            .run(|mut c| async move {
                let mut call = self.scripts.refresh_session.prepare_invoke();
                session_and_blob_keys(&mut call, record);
                call.arg(bytes)
                    .arg(ttl_ms)
                    .arg(record.expires_unix_ms)
                    .arg(&record.id)
                    .arg(record.key_bytes);
                call.invoke_async(&mut c).await
            })
            .await?;
        Ok(())
    }

    pub(super) async fn reserve_session(
        &self,
        record: &SessionRecord,
        ttl_ms: u64,
        quota: SessionQuota,
    ) -> Result<Reserved, QueueError> {
        let bytes = rmp_serde::to_vec_named(record).expect("msgpack encoding into a Vec");
        let reply: Vec<u64> = self
            .commands
            .run(|mut c| async move {
                let mut call = self.scripts.create_session.prepare_invoke();
                call.key(session_key(&record.id))
                    .key(tenant_sessions_key(&record.tenant))
                    .key(tenant_bytes_key(&record.tenant));
                for key_id in record.keys.values() {
                    call.key(key_refs_key(key_id));
                }
                call.arg(now_unix_ms())
                    .arg(bytes)
                    .arg(ttl_ms)
                    .arg(record.expires_unix_ms)
                    .arg(&record.id)
                    .arg(record.key_bytes)
                    .arg(quota.sessions)
                    .arg(quota.key_bytes);
                call.invoke_async(&mut c).await
            })
            .await?;
        match reply.as_slice() {
            [1] => Ok(Reserved::Created),
            [0, sessions, key_bytes] => Ok(Reserved::OverQuota(TenantUsage {
                sessions: *sessions as usize,
                key_bytes: *key_bytes,
            })),
            other => Err(QueueError::Corrupt(format!(
                "unexpected reply to a session creation: {other:?}"
            ))),
        }
    }

    pub(super) async fn remove_session(&self, record: &SessionRecord) -> Result<bool, QueueError> {
        let (deleted, blobs): (i64, i64) = self
            .commands
            .run(|mut c| async move {
                let mut call = self.scripts.delete_session.prepare_invoke();
                session_and_blob_keys(&mut call, record);
                call.arg(&record.id).arg(session_key(""));
                call.invoke_async(&mut c).await
            })
            .await?;
        if blobs > 0 {
            tracing::info!(session = %record.id, blobs, "deleted key blobs no session uses");
        }
        Ok(deleted > 0)
    }

    pub(super) async fn take_slot(
        &self,
        tenant: &str,
        slot: &str,
        limit: usize,
        lease_ms: u64,
    ) -> Result<bool, QueueError> {
        let taken: i64 = self
            .commands
            .run(|mut c| async move {
                self.scripts
                    .acquire_slot
                    .key(tenant_slots_key(tenant))
                    .arg(slot)
                    .arg(limit)
                    .arg(lease_ms)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(taken == 1)
    }

    pub(super) async fn give_back_slot(&self, tenant: &str, slot: &str) -> Result<(), QueueError> {
        let _: Value = self
            .commands
            .run_repeatable(|mut c| async move {
                redis::cmd("ZREM")
                    .arg(tenant_slots_key(tenant))
                    .arg(slot)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
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
