//! Jobs on shard streams: enqueue, the in-flight marker, reads, claims, completion, dead letters.

use std::sync::atomic::Ordering;

use futures::StreamExt;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{RedisError, Value};

use super::link::{is_dead, unavailable};
use super::{RedisQueue, PREFIX};
use crate::protocol::ErrorCode;
use crate::queue::{
    now_unix_ms, shard_of, Begin, Charge, Completion, CompletionStream, Delivery, Job, JobOutcome,
    QueueError, ShardLag, StoredOutcome, TenantBill,
};

pub(super) const GROUP: &str = "workers";
const RESULTS_CHANNEL: &str = "hyfhe:results";
const DEAD_LETTER: &str = "hyfhe:dead-letter";
/// Jobs whose outcome was already stored when a worker finished them (evaluated twice).
const DUPLICATE_OUTCOMES_KEY: &str = "hyfhe:stats:duplicate-outcomes";
/// Entries kept on the dead-letter stream (approximately: `MAXLEN ~`).
const DEAD_LETTER_CAP: usize = 10_000;
/// Entries claimed per XAUTOCLAIM round trip.
const CLAIM_BATCH: usize = 64;

/// KEYS: result, running marker. ARGV: request digest, marker TTL (ms), owner token.
/// Returns `{'done', outcome}`, `{'running', digest}` or `{'started'}`; atomic, so two retries
/// arriving together start the job once. The marker holds `digest owner`.
pub(super) const BEGIN: &str = r"
local done = redis.call('GET', KEYS[1])
if done then return {'done', done} end
local running = redis.call('GET', KEYS[2])
if running then
  local digest = string.match(running, '^(%S+)') or running
  return {'running', digest}
end
redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. ARGV[3], 'PX', ARGV[2])
return {'started'}";

/// KEYS: running marker. ARGV: owner token. Deletes the marker only if that owner set it.
pub(super) const ABANDON: &str = r"
local marker = redis.call('GET', KEYS[1])
if marker and string.match(marker, ' (%S+)$') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// KEYS: shard streams in reading order. ARGV: group, consumer, count.
/// Reads new entries stream by stream until `count` in total; returns `{entries, {}}` in
/// `XREADGROUP`'s reply shape, or, when there were none, `{{}, last-delivered ids}` to wait from.
pub(super) const READ_NEW: &str = r"
local left = tonumber(ARGV[3])
local out = {}
for _, key in ipairs(KEYS) do
  if left <= 0 then break end
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', left, 'STREAMS', key, '>')
  if r and #r[1][2] > 0 then
    out[#out + 1] = r[1]
    left = left - #r[1][2]
  end
end
if #out > 0 then return {out, {}} end
local ids = {}
for _, key in ipairs(KEYS) do
  local id = '0-0'
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f['name'] == ARGV[1] then id = f['last-delivered-id'] end
  end
  ids[#ids + 1] = id
end
return {out, ids}";

/// KEYS: result, running marker, stream, tenant bill. ARGV: outcome, result TTL (ms), job id,
/// entry id, group, rows, FHE µs, results channel, `1` when the outcome is billable. Stores the
/// outcome unless one is there and bills the tenant only then (and only a billable outcome:
/// [`JobOutcome::billable`]); returns 1 when stored, 0 for a duplicate. A duplicate refreshes the
/// stored outcome's TTL: a write that is replicated, so that a `WAIT` after it on the same
/// connection also covers the first store (made on another connection, maybe not yet replicated).
pub(super) const COMPLETE: &str = r"
local stored = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
if ARGV[8] ~= '' then redis.call('PUBLISH', ARGV[8], ARGV[3]) end
redis.call('XACK', KEYS[3], ARGV[5], ARGV[4])
redis.call('XDEL', KEYS[3], ARGV[4])
if not stored then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 0
end
if ARGV[9] == '1' then
  redis.call('HINCRBY', KEYS[4], 'jobs', 1)
  redis.call('HINCRBY', KEYS[4], 'rows', ARGV[6])
  redis.call('HINCRBY', KEYS[4], 'fhe_micros', ARGV[7])
end
return 1";

/// Replicas this primary streams to that are online (synchronised): those a `WAIT` can count.
pub(super) const REPLICAS_ONLINE: &str = r"
local n = 0
for _ in string.gmatch(redis.call('INFO', 'replication'), 'state=online') do n = n + 1 end
return n";

/// KEYS: the (tenant, module, window) row counter. ARGV: rows (negative: a refund), limit,
/// window (ms). Returns `{1, used}` when charged, `{0, used}` when it would pass the limit.
pub(super) const CHARGE_ROWS: &str = r"
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local rows = tonumber(ARGV[1])
if rows > 0 and used + rows > tonumber(ARGV[2]) then return {0, used} end
used = redis.call('INCRBY', KEYS[1], rows)
if used < 0 then used = redis.call('SET', KEYS[1], 0) and 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, used}";

/// What a stored outcome adds to its tenant's bill.
#[derive(Clone, Copy)]
struct Bill {
    rows: u64,
    fhe_micros: u64,
    /// `false`: nothing ([`JobOutcome::billable`]).
    billable: bool,
}

/// A tenant's bill: a hash of jobs, rows and FHE microseconds. No TTL: it is the invoice.
fn bill_key(tenant: &str) -> String {
    format!("{PREFIX}bill:{tenant}")
}

pub(super) fn stream_key(shard: u32) -> String {
    format!("{PREFIX}jobs:{shard}")
}

pub(super) fn result_key(job: &str) -> String {
    format!("{PREFIX}result:{job}")
}

fn running_key(job: &str) -> String {
    format!("{PREFIX}running:{job}")
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("msgpack encoding into a Vec")
}

/// The job in a stream entry, or why there is none.
fn parse_entry(entry: &StreamId) -> Result<Job, String> {
    match entry.map.get("job") {
        Some(Value::BulkString(bytes)) => rmp_serde::from_slice::<Job>(bytes)
            .map_err(|e| format!("entry {} is not a job: {e}", entry.id)),
        _ => Err(format!("entry {} has no job field", entry.id)),
    }
}

impl RedisQueue {
    /// The consumer group of every stream this process knows (after a Redis that lost its
    /// state answers `NOGROUP`).
    pub(super) async fn ensure_groups(&self) -> Result<(), QueueError> {
        self.ensure_groups_of(0..self.known_shards()).await
    }

    pub(super) async fn ensure_groups_of(
        &self,
        shards: std::ops::Range<u32>,
    ) -> Result<(), QueueError> {
        for shard in shards {
            let created: Result<Value, QueueError> = self
                .commands
                .run(|mut c| async move {
                    let r: Result<Value, RedisError> = redis::cmd("XGROUP")
                        .arg("CREATE")
                        .arg(stream_key(shard))
                        .arg(GROUP)
                        .arg("0")
                        .arg("MKSTREAM")
                        .query_async(&mut c)
                        .await;
                    match r {
                        Err(e) if e.code() == Some("BUSYGROUP") => Ok(Value::Okay),
                        other => other,
                    }
                })
                .await;
            created?;
        }
        Ok(())
    }

    pub(super) async fn job_running(&self, job_id: &str) -> Result<bool, QueueError> {
        let key = running_key(job_id);
        self.commands
            .run_repeatable(|mut c| {
                let key = key.clone();
                async move { redis::cmd("EXISTS").arg(key).query_async(&mut c).await }
            })
            .await
    }

    pub(super) async fn begin_job(
        &self,
        job: &Job,
        ttl_ms: u64,
        owner: &str,
    ) -> Result<Begin, QueueError> {
        let reply: Vec<Vec<u8>> = self
            .commands
            .run(|mut c| async move {
                self.scripts
                    .begin
                    .key(result_key(&job.id))
                    .key(running_key(&job.id))
                    .arg(&job.request_sha256)
                    .arg(ttl_ms.max(1))
                    .arg(owner)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        match reply.as_slice() {
            [kind] if kind == b"started" => Ok(Begin::Started),
            [kind, digest] if kind == b"running" => Ok(Begin::Running {
                request_sha256: String::from_utf8_lossy(digest).into_owned(),
            }),
            [kind, stored] if kind == b"done" => rmp_serde::from_slice(stored)
                .map(Begin::Done)
                .map_err(|e| QueueError::Corrupt(format!("outcome of {}: {e}", job.id))),
            _ => Err(QueueError::Corrupt(format!(
                "unexpected reply to begin of {}",
                job.id
            ))),
        }
    }

    pub(super) async fn abandon_job(&self, job_id: &str, owner: &str) -> Result<(), QueueError> {
        let _: i64 = self
            .commands
            .run(|mut c| async move {
                self.scripts
                    .abandon
                    .key(running_key(job_id))
                    .arg(owner)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    pub(super) async fn enqueue_job(&self, job: &Job) -> Result<(), QueueError> {
        let shard = shard_of(&job.session, self.shard_count().await?);
        let key = stream_key(shard);
        // Entries are deleted once acknowledged, so the length is what waits or runs.
        let depth: usize = self
            .commands
            .run(|mut c| {
                let key = key.clone();
                async move { redis::cmd("XLEN").arg(key).query_async(&mut c).await }
            })
            .await?;
        if depth >= self.settings.max_depth {
            return Err(QueueError::Full {
                shard,
                depth,
                cap: self.settings.max_depth,
            });
        }
        let bytes = encode(job);
        let _: String = self
            .commands
            .run(|mut c| async move {
                redis::cmd("XADD")
                    .arg(&key)
                    .arg("*")
                    .arg("job")
                    .arg(bytes)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    pub(super) async fn subscribe_completions(&self) -> Result<CompletionStream, QueueError> {
        let mut pubsub = self
            .endpoint
            .client()
            .await
            .map_err(unavailable)?
            .get_async_pubsub()
            .await
            .map_err(unavailable)?;
        pubsub
            .subscribe(RESULTS_CHANNEL)
            .await
            .map_err(unavailable)?;
        let stream = pubsub
            .into_on_message()
            .map(|msg| msg.get_payload::<String>().unwrap_or_default());
        Ok(Box::pin(stream) as CompletionStream)
    }

    pub(super) async fn total_depth(&self) -> Result<usize, QueueError> {
        let mut pipe = redis::pipe();
        for shard in 0..self.shard_count().await? {
            pipe.cmd("XLEN").arg(stream_key(shard));
        }
        let lens: Vec<usize> = self
            .commands
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(lens.iter().sum())
    }

    /// Per shard, in one round trip: `XLEN` (entries are deleted when acknowledged, so the
    /// stream holds exactly the unfinished jobs), `XPENDING`'s count (delivered, not
    /// acknowledged), and the first entry's id, whose millisecond part is when Redis appended it
    /// — compared with Redis's own `TIME`, so the age does not depend on this host's clock.
    pub(super) async fn lag_per_shard(&self) -> Result<Vec<ShardLag>, QueueError> {
        let shards = self.shard_count().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        for shard in 0..shards {
            let key = stream_key(shard);
            pipe.cmd("XLEN").arg(&key);
            pipe.cmd("XPENDING").arg(&key).arg(GROUP);
            pipe.cmd("XRANGE")
                .arg(&key)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1);
        }
        let replies: Vec<Value> = self
            .commands
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        let bad = |what: &str| QueueError::Corrupt(format!("unexpected {what} reply from Redis"));
        let now_ms = match replies.first() {
            Some(Value::Array(t)) if t.len() == 2 => {
                let secs: u64 = redis::from_redis_value(t[0].clone()).map_err(|_| bad("TIME"))?;
                let micros: u64 = redis::from_redis_value(t[1].clone()).map_err(|_| bad("TIME"))?;
                secs * 1000 + micros / 1000
            }
            _ => return Err(bad("TIME")),
        };
        replies[1..]
            .chunks_exact(3)
            .zip(0..shards)
            .map(|(r, shard)| {
                let len: u64 = redis::from_redis_value(r[0].clone()).map_err(|_| bad("XLEN"))?;
                let pending: u64 = match &r[1] {
                    Value::Array(summary) if !summary.is_empty() => {
                        redis::from_redis_value(summary[0].clone()).map_err(|_| bad("XPENDING"))?
                    }
                    _ => 0,
                };
                let first_ms = match &r[2] {
                    Value::Array(entries) => match entries.first() {
                        Some(Value::Array(entry)) if !entry.is_empty() => {
                            let id: String = redis::from_redis_value(entry[0].clone())
                                .map_err(|_| bad("XRANGE"))?;
                            id.split('-').next().and_then(|ms| ms.parse::<u64>().ok())
                        }
                        _ => None,
                    },
                    _ => return Err(bad("XRANGE")),
                };
                Ok(ShardLag {
                    shard,
                    unread: len.saturating_sub(pending),
                    pending,
                    oldest_ms: first_ms.map_or(0, |t| now_ms.saturating_sub(t)),
                })
            })
            .collect()
    }

    /// At most `count` new entries over all of `shards`, waiting up to `block_ms` for the first.
    ///
    /// `XREADGROUP … COUNT n` counts per stream, so one call over 16 streams could hand a worker
    /// 16·n entries it has no room to start. [`READ_NEW`] reads the streams one after another in
    /// one script until `count` is reached, starting at a rotating shard so that no shard starves.
    /// When every stream is drained, the wait is a plain `XREAD BLOCK` from the group's
    /// last-delivered ids: it consumes nothing (what it returns is dropped, and the next scripted
    /// read takes the entries under the bound), so a wake-up never over-reads either.
    pub(super) async fn read_new(
        &self,
        worker: &str,
        shards: &[u32],
        count: usize,
        block_ms: u64,
    ) -> Result<Vec<Delivery>, QueueError> {
        if shards.is_empty() || count == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(block_ms)).await;
            return Ok(Vec::new());
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(block_ms);
        let start = self.read_rotation.fetch_add(1, Ordering::Relaxed) % shards.len();
        let order: Vec<u32> = shards[start..]
            .iter()
            .chain(&shards[..start])
            .copied()
            .collect();
        loop {
            let reply: Option<(StreamReadReply, Vec<String>)> = self
                .commands
                .run(|mut c| {
                    let order = &order;
                    async move {
                        let mut call = self.scripts.read_new.prepare_invoke();
                        for &s in order {
                            call.key(stream_key(s));
                        }
                        call.arg(GROUP).arg(worker).arg(count);
                        match call.invoke_async(&mut c).await {
                            Err(e) if e.code() == Some("NOGROUP") => Ok(None),
                            other => other.map(Some),
                        }
                    }
                })
                .await?;
            // Redis lost its state (restart without persistence): recreate the groups.
            let Some((entries, last_delivered)) = reply else {
                self.ensure_groups().await?;
                return Ok(Vec::new());
            };
            if !entries.keys.is_empty() {
                return self.deliveries_of(entries).await;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || last_delivered.len() != order.len() {
                return Ok(Vec::new());
            }
            self.wait_for_entries(&order, &last_delivered, left).await?;
        }
    }

    /// Block until a stream of `order` holds an entry past its `last_delivered` id, or `left`
    /// passes, on a connection of its own (never the shared one).
    async fn wait_for_entries(
        &self,
        order: &[u32],
        last_delivered: &[String],
        left: std::time::Duration,
    ) -> Result<(), QueueError> {
        let mut conn = self.reader().await?;
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(left.as_millis().max(1) as u64)
            .arg("STREAMS");
        for &s in order {
            cmd.arg(stream_key(s));
        }
        for id in last_delivered {
            cmd.arg(id);
        }
        let woke: Result<Value, RedisError> = cmd.query_async(&mut conn).await;
        match woke {
            Ok(_) => {
                self.readers.lock().await.push(conn);
                Ok(())
            }
            // A dead connection is dropped here, not returned to the pool.
            Err(e) => {
                if is_dead(&e) {
                    tracing::warn!(error = %e, "blocking read got no answer; dropping its connection");
                }
                Err(unavailable(e))
            }
        }
    }

    /// The jobs of a read's entries; entries that are not jobs are dead-lettered on their own.
    async fn deliveries_of(&self, reply: StreamReadReply) -> Result<Vec<Delivery>, QueueError> {
        let mut out = Vec::new();
        for stream in reply.keys {
            let shard = stream
                .key
                .rsplit(':')
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| QueueError::Corrupt(format!("stream {}", stream.key)))?;
            for entry in stream.ids {
                match parse_entry(&entry) {
                    Ok(job) => out.push(Delivery {
                        shard,
                        entry_id: entry.id,
                        deliveries: 1,
                        job,
                    }),
                    Err(reason) => self.dead_letter_entry(shard, &entry.id, &reason).await?,
                }
            }
        }
        Ok(out)
    }

    pub(super) async fn claim_idle(
        &self,
        worker: &str,
        shard: u32,
        min_idle_ms: u64,
        count: usize,
    ) -> Result<Vec<Delivery>, QueueError> {
        let mut out = Vec::new();
        let mut cursor = "0-0".to_string();
        while out.len() < count {
            let batch = CLAIM_BATCH.min(count - out.len());
            let reply: StreamAutoClaimReply = self
                .commands
                .run(|mut c| {
                    let cursor = cursor.clone();
                    async move {
                        redis::cmd("XAUTOCLAIM")
                            .arg(stream_key(shard))
                            .arg(GROUP)
                            .arg(worker)
                            .arg(min_idle_ms)
                            .arg(cursor)
                            .arg("COUNT")
                            .arg(batch)
                            .query_async(&mut c)
                            .await
                    }
                })
                .await?;
            for entry in reply.claimed {
                match parse_entry(&entry) {
                    Ok(job) => {
                        let deliveries = self.delivery_count(shard, &entry.id).await?;
                        out.push(Delivery {
                            shard,
                            entry_id: entry.id,
                            deliveries,
                            job,
                        });
                    }
                    Err(reason) => self.dead_letter_entry(shard, &entry.id, &reason).await?,
                }
            }
            if reply.next_stream_id == "0-0" {
                break;
            }
            cursor = reply.next_stream_id;
        }
        Ok(out)
    }

    async fn delivery_count(&self, shard: u32, entry_id: &str) -> Result<u32, QueueError> {
        let rows: Vec<(String, String, u64, u64)> = self
            .commands
            .run(|mut c| async move {
                redis::cmd("XPENDING")
                    .arg(stream_key(shard))
                    .arg(GROUP)
                    .arg(entry_id)
                    .arg(entry_id)
                    .arg(1)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(rows.first().map_or(1, |r| r.3 as u32))
    }

    pub(super) async fn refresh_entries(
        &self,
        worker: &str,
        shard: u32,
        entries: &[String],
    ) -> Result<(), QueueError> {
        if entries.is_empty() {
            return Ok(());
        }
        // XCLAIM … JUSTID to ourselves resets the idle time and leaves the delivery count alone.
        let _: Value = self
            .commands
            .run(|mut c| async move {
                redis::cmd("XCLAIM")
                    .arg(stream_key(shard))
                    .arg(GROUP)
                    .arg(worker)
                    .arg(0)
                    .arg(entries)
                    .arg("JUSTID")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    pub(super) async fn complete_job(
        &self,
        delivery: &Delivery,
        outcome: &StoredOutcome,
    ) -> Result<Completion, QueueError> {
        let bytes = encode(outcome);
        let job = &delivery.job;
        let bill = Bill {
            rows: match outcome.outcome {
                JobOutcome::Done(_) => job.rows as u64,
                JobOutcome::Failed { .. } => 0,
            },
            fhe_micros: (outcome.fhe_seconds.max(0.0) * 1e6).round() as u64,
            billable: outcome.outcome.billable(),
        };
        if self.settings.replica_acks > 0 {
            return self.complete_replicated(delivery, bytes, bill).await;
        }
        // One script, outcome first: if we die before it, the entry stays pending and is
        // redelivered; after it, a retried job id finds the outcome, billed once.
        let complete = self.complete_command(delivery, bytes, bill, RESULTS_CHANNEL);
        let stored: i64 = self
            .commands
            .run(|mut c| async move { complete.query_async(&mut c).await })
            .await?;
        Ok(if stored == 1 {
            Completion::Stored
        } else {
            Completion::Duplicate
        })
    }

    /// The [`COMPLETE`] script for `delivery` as one `EVAL` (announcing on `channel`; `""`: not).
    fn complete_command(
        &self,
        delivery: &Delivery,
        outcome: Vec<u8>,
        bill: Bill,
        channel: &str,
    ) -> redis::Cmd {
        let job = &delivery.job;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(COMPLETE)
            .arg(4)
            .arg(result_key(&job.id))
            .arg(running_key(&job.id))
            .arg(stream_key(delivery.shard))
            .arg(bill_key(&job.tenant))
            .arg(outcome)
            .arg(self.settings.result_ttl_ms)
            .arg(&job.id)
            .arg(&delivery.entry_id)
            .arg(GROUP)
            .arg(bill.rows)
            .arg(bill.fhe_micros)
            .arg(channel)
            .arg(if bill.billable { "1" } else { "0" });
        cmd
    }

    /// [`Self::complete_job`] with `replica_acks`: the same script, but the announcement waits
    /// for the replicas. On one connection of its own, never given up in between (a `WAIT`
    /// covers the earlier writes of *its* connection only: a reconnect between the store and the
    /// `WAIT` would make it vacuous): the script (not announcing) and a count of the replicas
    /// online, in one round trip; then `WAIT replicas timeout` — only when enough replicas are
    /// online to answer it: with none (a failover under way, the replica cut off or re-syncing)
    /// a `WAIT` could only time out, so every job would pay the timeout for nothing — and
    /// `PUBLISH`. A coordinator is told only of outcomes a failover keeps (or, counted, of those
    /// no replica could take), and a request that was answered is billed on the replica too. The
    /// wait blocks this connection alone (one per concurrent completion), never the heartbeats
    /// on `commands`. Not repeated on a dead connection past the first try on a pooled one: the
    /// entry stays pending and is claimed again, or a retry finds the outcome.
    async fn complete_replicated(
        &self,
        delivery: &Delivery,
        bytes: Vec<u8>,
        bill: Bill,
    ) -> Result<Completion, QueueError> {
        let job = &delivery.job;
        let mut store = redis::pipe();
        store.add_command(self.complete_command(delivery, bytes, bill, ""));
        store.cmd("EVAL").arg(REPLICAS_ONLINE).arg(0);
        // A pooled connection that turns out dead (Redis restarted, or failed over, while it sat
        // idle, so the request never reached a live server): once more on a fresh one. Not after
        // a timeout: the script may have run, and a second run would find its own outcome and
        // take it for a duplicate.
        let mut fresh = false;
        let (mut conn, stored, online) = loop {
            let mut conn = self.durable(fresh).await?;
            match store.query_async::<(i64, u32)>(&mut conn).await {
                Ok((stored, online)) => break (conn, stored, online),
                Err(e) if !fresh && is_dead(&e) && !e.is_timeout() => fresh = true,
                Err(e) => return Err(unavailable(e)),
            }
        };
        let wanted = self.settings.replica_acks;
        // Wait for as many of the wanted replicas as are online (none online: a `WAIT` could
        // only time out). A duplicate waits too: the outcome that stands may be another
        // evaluation's whose own wait has not finished (the script's TTL refresh makes this
        // connection's `WAIT` cover it).
        let waiting_for = wanted.min(online);
        let mut announce = redis::pipe();
        if waiting_for > 0 {
            announce
                .cmd("WAIT")
                .arg(waiting_for)
                .arg(self.settings.replica_ack_timeout_ms);
        }
        announce.cmd("PUBLISH").arg(RESULTS_CHANNEL).arg(&job.id);
        let acked = match announce.query_async::<Vec<i64>>(&mut conn).await {
            Ok(replies) => {
                self.durable_done(conn).await;
                if waiting_for > 0 {
                    replies[0].max(0) as u32
                } else {
                    0
                }
            }
            // Stored, billed and acknowledged, but not announced: announce it on the command
            // link (waiting requests would otherwise find it only at their next re-check).
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "waiting for replicas failed; announcing anyway");
                self.commands
                    .run(|mut c| async move {
                        redis::cmd("PUBLISH")
                            .arg(RESULTS_CHANNEL)
                            .arg(&job.id)
                            .query_async::<i64>(&mut c)
                            .await
                    })
                    .await?;
                0
            }
        };
        self.note_replication(acked >= wanted, acked, online);
        Ok(if stored != 1 {
            Completion::Duplicate
        } else if acked < wanted {
            Completion::StoredUnreplicated
        } else {
            Completion::Stored
        })
    }

    /// Log the first outcome announced unreplicated after replicated ones, and the return to
    /// replicated: one line per change, not one per job (a partition lasts thousands of jobs;
    /// `hyfhe_worker_outcomes_unreplicated_total` counts them).
    fn note_replication(&self, replicated: bool, acked: u32, online: u32) {
        let was = self.unreplicated.swap(!replicated, Ordering::Relaxed);
        if !replicated && !was {
            tracing::warn!(
                acked,
                online,
                wanted = self.settings.replica_acks,
                "outcomes are announced before enough replicas hold them (a failover now would lose them)"
            );
        } else if replicated && was {
            tracing::info!("outcomes are replicated again before they are announced");
        }
    }

    /// Replicas the primary streams to that are online (what a `WAIT` can count).
    pub async fn replicas_online(&self) -> Result<usize, QueueError> {
        self.commands
            .run_repeatable(|mut c| async move {
                redis::cmd("EVAL")
                    .arg(REPLICAS_ONLINE)
                    .arg(0)
                    .query_async(&mut c)
                    .await
            })
            .await
    }

    pub(super) async fn bill_of(&self, tenant: &str) -> Result<TenantBill, QueueError> {
        let key = bill_key(tenant);
        let fields: std::collections::HashMap<String, u64> = self
            .commands
            .run_repeatable(|mut c| {
                let key = key.clone();
                async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await }
            })
            .await?;
        let get = |f: &str| fields.get(f).copied().unwrap_or(0);
        Ok(TenantBill {
            jobs: get("jobs"),
            rows: get("rows"),
            fhe_micros: get("fhe_micros"),
        })
    }

    pub(super) async fn charge(
        &self,
        tenant: &str,
        module: &str,
        rows: i64,
        limit: u64,
        window_ms: u64,
    ) -> Result<Charge, QueueError> {
        let window = now_unix_ms() / window_ms.max(1);
        let key = format!(
            "{PREFIX}rows:{}:{window}",
            crate::queue::scoped_job_id(tenant, "", module, "")
        );
        let reply: Vec<u64> = self
            .commands
            .run(|mut c| async move {
                self.scripts
                    .charge_rows
                    .key(&key)
                    .arg(rows)
                    .arg(limit)
                    .arg(window_ms)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        match reply.as_slice() {
            [1, used] => Ok(Charge::Charged { used: *used }),
            [0, used] => Ok(Charge::Refused { used: *used }),
            other => Err(QueueError::Corrupt(format!(
                "unexpected reply to a row charge: {other:?}"
            ))),
        }
    }

    /// Count a second evaluation in Redis, so that the count outlives the worker (the compose
    /// fault tests read it after killing and scaling workers away).
    pub(super) async fn incr_duplicates(&self) -> Result<(), QueueError> {
        let _: Value = self
            .commands
            .run(|mut c| async move {
                redis::cmd("INCR")
                    .arg(DUPLICATE_OUTCOMES_KEY)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    /// Record an entry on the dead-letter stream (no payload: it may be large) and remove it.
    async fn dead_letter_fields(
        &self,
        shard: u32,
        entry_id: &str,
        fields: &[(&str, String)],
    ) -> Result<(), QueueError> {
        let stream = stream_key(shard);
        let mut pipe = redis::pipe();
        pipe.atomic();
        let add = pipe
            .cmd("XADD")
            .arg(DEAD_LETTER)
            .arg("MAXLEN")
            .arg("~")
            .arg(DEAD_LETTER_CAP)
            .arg("*")
            .arg("stream")
            .arg(&stream)
            .arg("entry")
            .arg(entry_id);
        for (k, v) in fields {
            add.arg(*k).arg(v);
        }
        pipe.cmd("XACK")
            .arg(&stream)
            .arg(GROUP)
            .arg(entry_id)
            .cmd("XDEL")
            .arg(&stream)
            .arg(entry_id);
        let _: Value = self
            .commands
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(())
    }

    /// An entry that is not a job: nobody can complete it, so it goes to the dead-letter stream
    /// on its own, without failing the batch it came in.
    async fn dead_letter_entry(
        &self,
        shard: u32,
        entry_id: &str,
        reason: &str,
    ) -> Result<(), QueueError> {
        tracing::warn!(
            shard,
            entry = entry_id,
            reason,
            "undecodable entry dead-lettered"
        );
        self.dead_letter_fields(shard, entry_id, &[("reason", reason.to_string())])
            .await
    }

    pub(super) async fn discard_entry(&self, delivery: &Delivery) -> Result<(), QueueError> {
        let stream = stream_key(delivery.shard);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("XACK")
            .arg(&stream)
            .arg(GROUP)
            .arg(&delivery.entry_id)
            .cmd("XDEL")
            .arg(&stream)
            .arg(&delivery.entry_id);
        let _: Value = self
            .commands
            .run(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(())
    }

    pub(super) async fn dead_letter_job(
        &self,
        delivery: &Delivery,
        code: ErrorCode,
        reason: &str,
    ) -> Result<(), QueueError> {
        let job = &delivery.job;
        // Outcome first: the waiting client is answered even if the record below fails.
        let outcome = StoredOutcome {
            request_sha256: job.request_sha256.clone(),
            fhe_seconds: 0.0,
            outcome: JobOutcome::failed(code, reason),
        };
        self.complete_job(delivery, &outcome).await?;
        self.dead_letter_fields(
            delivery.shard,
            &delivery.entry_id,
            &[
                ("job", job.client_job_id.clone()),
                ("tenant", job.tenant.clone()),
                ("session", job.session.clone()),
                ("module", job.module.clone()),
                ("deliveries", delivery.deliveries.to_string()),
                ("reason", reason.to_string()),
            ],
        )
        .await
    }

    pub(super) async fn count_dead_letters(&self) -> Result<usize, QueueError> {
        self.commands
            .run(|mut c| async move {
                redis::cmd("XLEN")
                    .arg(DEAD_LETTER)
                    .query_async(&mut c)
                    .await
            })
            .await
    }
}
