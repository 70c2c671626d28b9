//! Redis Streams implementation of [`JobQueue`] and [`SessionStore`].
//!
//! Keys (prefix `hyfhe:`): `jobs:{shard}` streams with group `workers`; `lease:{shard}` → worker
//! id with a TTL; `workers` (sorted set of heartbeat times); `result:{job}`; channel `results`;
//! `dead-letter` stream; `session:{id}`; `key:{content id}`.

use std::time::Duration;

use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{AsyncConnectionConfig, AsyncTypedCommands, Client, RedisError, Script, Value};
use tokio::sync::Mutex;

use super::{
    fair_share, now_unix_ms, shard_of, BoxFuture, CompletionStream, Delivery, Job, JobOutcome,
    JobQueue, Leases, QueueError, QueueSettings, SessionRecord, SessionStore,
};

const PREFIX: &str = "hyfhe:";
const GROUP: &str = "workers";
const RESULTS_CHANNEL: &str = "hyfhe:results";
const DEAD_LETTER: &str = "hyfhe:dead-letter";
/// Key blobs are ~100 MiB: far longer than redis-rs's 500 ms default to move.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Entries claimed per XAUTOCLAIM round trip.
const CLAIM_BATCH: usize = 64;

/// Extends a lease only if `worker` still holds it.
const RENEW_IF_OWNER: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";
/// Releases a lease only if `worker` still holds it.
const RELEASE_IF_OWNER: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

pub struct RedisQueue {
    settings: QueueSettings,
    client: Client,
    /// Shared by every short command.
    conn: ConnectionManager,
    /// Connections without a response timeout, one per concurrent `XREADGROUP … BLOCK`: a
    /// blocking read must never sit on the shared connection (it would stall every other command
    /// behind it, and the default timeout would cut it off).
    readers: Mutex<Vec<MultiplexedConnection>>,
    renew: Script,
    release: Script,
}

fn unavailable(e: RedisError) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

fn stream_key(shard: u32) -> String {
    format!("{PREFIX}jobs:{shard}")
}

fn lease_key(shard: u32) -> String {
    format!("{PREFIX}lease:{shard}")
}

fn result_key(job: &str) -> String {
    format!("{PREFIX}result:{job}")
}

fn session_key(id: &str) -> String {
    format!("{PREFIX}session:{id}")
}

fn key_key(id: &str) -> String {
    format!("{PREFIX}key:{id}")
}

impl RedisQueue {
    /// Connect and create the consumer groups. Retries for `connect_timeout` so a service can
    /// start before Redis (docker-compose starts them together).
    pub async fn connect(
        url: &str,
        settings: QueueSettings,
        connect_timeout: Duration,
    ) -> Result<Self, QueueError> {
        let client = Client::open(url).map_err(unavailable)?;
        let started = std::time::Instant::now();
        let conn = loop {
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_number_of_retries(2);
            match client.get_connection_manager_with_config(config).await {
                Ok(c) => break c,
                Err(e) if started.elapsed() < connect_timeout => {
                    tracing::warn!(error = %e, url, "redis not reachable yet, retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(unavailable(e)),
            }
        };
        let queue = Self {
            settings,
            client,
            conn,
            readers: Mutex::new(Vec::new()),
            renew: Script::new(RENEW_IF_OWNER),
            release: Script::new(RELEASE_IF_OWNER),
        };
        queue.ensure_groups().await?;
        Ok(queue)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    async fn ensure_groups(&self) -> Result<(), QueueError> {
        let mut conn = self.conn();
        for shard in 0..self.settings.shards {
            let created: Result<Value, RedisError> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream_key(shard))
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match created {
                Ok(_) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(unavailable(e)),
            }
        }
        Ok(())
    }

    async fn reader(&self) -> Result<MultiplexedConnection, QueueError> {
        if let Some(c) = self.readers.lock().await.pop() {
            return Ok(c);
        }
        let config = AsyncConnectionConfig::new().set_response_timeout(None);
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(unavailable)
    }

    fn delivery(shard: u32, entry: StreamId, deliveries: u32) -> Result<Delivery, QueueError> {
        let job = match entry.map.get("job") {
            Some(Value::BulkString(bytes)) => rmp_serde::from_slice::<Job>(bytes)
                .map_err(|e| QueueError::Corrupt(format!("entry {}: {e}", entry.id)))?,
            _ => {
                return Err(QueueError::Corrupt(format!(
                    "entry {} has no job",
                    entry.id
                )))
            }
        };
        Ok(Delivery {
            shard,
            entry_id: entry.id,
            deliveries,
            job,
        })
    }

    /// `GET key`, decoded from msgpack; `None` when the key is absent (or expired).
    async fn get_msgpack<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, QueueError> {
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        bytes
            .map(|b| {
                rmp_serde::from_slice(&b).map_err(|e| QueueError::Corrupt(format!("{key}: {e}")))
            })
            .transpose()
    }

    async fn delivery_count(&self, shard: u32, entry_id: &str) -> Result<u32, QueueError> {
        let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(stream_key(shard))
            .arg(GROUP)
            .arg(entry_id)
            .arg(entry_id)
            .arg(1)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(rows.first().map_or(1, |r| r.3 as u32))
    }
}

impl JobQueue for RedisQueue {
    fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), QueueError>> {
        Box::pin(async move {
            let _: String = redis::cmd("PING")
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn enqueue<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let shard = shard_of(&job.session, self.settings.shards);
            let key = stream_key(shard);
            let mut conn = self.conn();
            // Entries are deleted once acknowledged, so the length is what waits or runs.
            let depth = conn.xlen(&key).await.map_err(unavailable)?;
            if depth >= self.settings.max_depth {
                return Err(QueueError::Full {
                    shard,
                    depth,
                    cap: self.settings.max_depth,
                });
            }
            let bytes = rmp_serde::to_vec_named(job).expect("msgpack encoding into a Vec");
            let _: String = redis::cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("job")
                .arg(bytes)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn outcome<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<JobOutcome>, QueueError>> {
        Box::pin(async move { self.get_msgpack(&result_key(job_id)).await })
    }

    fn completions(&self) -> BoxFuture<'_, Result<CompletionStream, QueueError>> {
        Box::pin(async move {
            let mut pubsub = self.client.get_async_pubsub().await.map_err(unavailable)?;
            pubsub
                .subscribe(RESULTS_CHANNEL)
                .await
                .map_err(unavailable)?;
            let stream = pubsub
                .into_on_message()
                .map(|msg| msg.get_payload::<String>().unwrap_or_default());
            Ok(Box::pin(stream) as CompletionStream)
        })
    }

    fn live_workers(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(async move {
            let since = now_unix_ms().saturating_sub(self.settings.lease_ttl_ms);
            let n: usize = redis::cmd("ZCOUNT")
                .arg(format!("{PREFIX}workers"))
                .arg(since)
                .arg("+inf")
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            Ok(n)
        })
    }

    fn depth(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            for shard in 0..self.settings.shards {
                pipe.cmd("XLEN").arg(stream_key(shard));
            }
            let lens: Vec<usize> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            Ok(lens.iter().sum())
        })
    }

    fn heartbeat<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, Result<Leases, QueueError>> {
        Box::pin(async move {
            let ttl = self.settings.lease_ttl_ms;
            let now = now_unix_ms();
            let workers_key = format!("{PREFIX}workers");
            let mut conn = self.conn();
            let (_, _, live): (Value, Value, usize) = redis::pipe()
                .cmd("ZADD")
                .arg(&workers_key)
                .arg(now)
                .arg(worker)
                .cmd("ZREMRANGEBYSCORE")
                .arg(&workers_key)
                .arg("-inf")
                .arg(now.saturating_sub(ttl))
                .cmd("ZCARD")
                .arg(&workers_key)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let target = fair_share(self.settings.shards, live);
            let keys: Vec<String> = (0..self.settings.shards).map(lease_key).collect();
            let holders: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;

            let mut leases = Leases::default();
            for (shard, holder) in holders.iter().enumerate() {
                if holder.as_deref() != Some(worker) {
                    continue;
                }
                let key = &keys[shard];
                if leases.owned.len() >= target {
                    let _: i64 = self
                        .release
                        .key(key)
                        .arg(worker)
                        .invoke_async(&mut conn)
                        .await
                        .map_err(unavailable)?;
                    continue;
                }
                let kept: i64 = self
                    .renew
                    .key(key)
                    .arg(worker)
                    .arg(ttl)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                if kept == 1 {
                    leases.owned.push(shard as u32);
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
                let taken: Option<String> = redis::cmd("SET")
                    .arg(&keys[shard as usize])
                    .arg(worker)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl)
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                if taken.is_some() {
                    leases.owned.push(shard);
                    leases.acquired.push(shard);
                }
            }
            leases.owned.sort_unstable();
            Ok(leases)
        })
    }

    fn read<'a>(
        &'a self,
        worker: &'a str,
        shards: &'a [u32],
        count: usize,
        block_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, QueueError>> {
        Box::pin(async move {
            if shards.is_empty() {
                tokio::time::sleep(Duration::from_millis(block_ms)).await;
                return Ok(Vec::new());
            }
            let mut conn = self.reader().await?;
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(GROUP)
                .arg(worker)
                .arg("COUNT")
                .arg(count)
                .arg("BLOCK")
                .arg(block_ms)
                .arg("STREAMS");
            for &s in shards {
                cmd.arg(stream_key(s));
            }
            for _ in shards {
                cmd.arg(">");
            }
            let reply: Result<Option<StreamReadReply>, RedisError> =
                cmd.query_async(&mut conn).await;
            let reply = match reply {
                Ok(r) => {
                    self.readers.lock().await.push(conn);
                    r
                }
                // Redis lost its state (restart without persistence): recreate the groups.
                Err(e) if e.code() == Some("NOGROUP") => {
                    self.readers.lock().await.push(conn);
                    self.ensure_groups().await?;
                    return Ok(Vec::new());
                }
                Err(e) => return Err(unavailable(e)),
            };
            let mut out = Vec::new();
            for stream in reply.map(|r| r.keys).unwrap_or_default() {
                let shard = stream
                    .key
                    .rsplit(':')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| QueueError::Corrupt(format!("stream {}", stream.key)))?;
                for entry in stream.ids {
                    out.push(Self::delivery(shard, entry, 1)?);
                }
            }
            Ok(out)
        })
    }

    fn claim<'a>(
        &'a self,
        worker: &'a str,
        shard: u32,
        min_idle_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, QueueError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let mut cursor = "0-0".to_string();
            loop {
                let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                    .arg(stream_key(shard))
                    .arg(GROUP)
                    .arg(worker)
                    .arg(min_idle_ms)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(CLAIM_BATCH)
                    .query_async(&mut self.conn())
                    .await
                    .map_err(unavailable)?;
                for entry in reply.claimed {
                    let deliveries = self.delivery_count(shard, &entry.id).await?;
                    out.push(Self::delivery(shard, entry, deliveries)?);
                }
                if reply.next_stream_id == "0-0" {
                    return Ok(out);
                }
                cursor = reply.next_stream_id;
            }
        })
    }

    fn complete<'a>(
        &'a self,
        delivery: &'a Delivery,
        outcome: &'a JobOutcome,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let bytes = rmp_serde::to_vec_named(outcome).expect("msgpack encoding into a Vec");
            let stream = stream_key(delivery.shard);
            // One transaction, outcome first: if we die before it, the entry stays pending and is
            // redelivered; after it, a retried job id finds the outcome.
            let _: Value = redis::pipe()
                .atomic()
                .cmd("SET")
                .arg(result_key(&delivery.job.id))
                .arg(bytes)
                .arg("NX")
                .arg("PX")
                .arg(self.settings.result_ttl_ms)
                .cmd("PUBLISH")
                .arg(RESULTS_CHANNEL)
                .arg(&delivery.job.id)
                .cmd("XACK")
                .arg(&stream)
                .arg(GROUP)
                .arg(&delivery.entry_id)
                .cmd("XDEL")
                .arg(&stream)
                .arg(&delivery.entry_id)
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn dead_letter<'a>(
        &'a self,
        delivery: &'a Delivery,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let job = &delivery.job;
            let _: String = redis::cmd("XADD")
                .arg(DEAD_LETTER)
                .arg("MAXLEN")
                .arg("~")
                .arg(10_000)
                .arg("*")
                .arg("job")
                .arg(&job.id)
                .arg("session")
                .arg(&job.session)
                .arg("module")
                .arg(&job.module)
                .arg("deliveries")
                .arg(delivery.deliveries)
                .arg("reason")
                .arg(reason)
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            self.complete(delivery, &JobOutcome::failed(super::DEAD_LETTERED, reason))
                .await
        })
    }

    fn dead_letters(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(async move { self.conn().xlen(DEAD_LETTER).await.map_err(unavailable) })
    }

    fn leave<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut conn = self.conn();
            for shard in 0..self.settings.shards {
                let _: i64 = self
                    .release
                    .key(lease_key(shard))
                    .arg(worker)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
            }
            let _: Value = redis::cmd("ZREM")
                .arg(format!("{PREFIX}workers"))
                .arg(worker)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }
}

impl SessionStore for RedisQueue {
    fn put_key<'a>(
        &'a self,
        key_id: &'a str,
        bytes: &'a [u8],
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let _: Value = redis::cmd("SET")
                .arg(key_key(key_id))
                .arg(bytes)
                .arg("PX")
                .arg(ttl_ms)
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn get_key<'a>(
        &'a self,
        key_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, QueueError>> {
        Box::pin(async move {
            redis::cmd("GET")
                .arg(key_key(key_id))
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)
        })
    }

    fn put_session<'a>(
        &'a self,
        record: &'a SessionRecord,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
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
            let _: Value = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn get_session<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SessionRecord>, QueueError>> {
        Box::pin(async move { self.get_msgpack(&session_key(id)).await })
    }

    fn delete_session<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(async move {
            let n: i64 = redis::cmd("DEL")
                .arg(session_key(id))
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            Ok(n > 0)
        })
    }
}
