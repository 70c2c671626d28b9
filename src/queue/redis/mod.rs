//! Redis Streams implementation of [`JobQueue`] and [`SessionStore`].
//!
//! Keys (prefix `hyfhe:`): `jobs:{shard}` streams with group `workers`; `lease:{shard}` → worker
//! id with a TTL; `workers` (sorted set of heartbeat times); `result:{job}` and `running:{job}`
//! (the in-flight marker); `shards` (the shard count, only ever grown); channel `results`; `dead-letter` stream; `session:{id}`;
//! `key:{content id}`; `tenant-sessions:{tenant}` (sorted set of session ids by expiry) and
//! `tenant-key-bytes:{tenant}` (hash of session id → key bytes).
//!
//! - [`streams`]: jobs, outcomes, claims and dead letters.
//! - [`leases`]: worker heartbeats and shard leases.
//! - [`sessions`]: sessions, key blobs and per-tenant usage.
//! - [`link`]: connections replaced when they stop answering.
//! - [`audit`]: the consistency check an operator runs after a failover.

mod audit;
mod endpoint;
mod leases;
mod link;
mod sessions;
mod streams;

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, Script};
use tokio::sync::Mutex;

use self::endpoint::Endpoint;
use self::link::{unavailable, Link, CONNECT_TIMEOUT};
use crate::protocol::ErrorCode;

use super::{
    redact_url, BoxFuture, Charge, Completion, CompletionStream, Delivery, Job, JobQueue, Leases,
    QueueError, QueueSettings, Reserved, SessionQuota, SessionRecord, SessionStore, ShardLag,
    StoredOutcome, TenantBill, TenantUsage,
};

pub use self::audit::StoreAudit;

const PREFIX: &str = "hyfhe:";

/// The Redis stream holding shard `shard`'s jobs: what an external autoscaler watches (KEDA's
/// `redis-streams` scaler in deploy/k8s/worker.yaml, one trigger per shard).
pub fn job_stream(shard: u32) -> String {
    streams::stream_key(shard)
}

/// The consumer group every worker reads the job streams with.
pub const CONSUMER_GROUP: &str = streams::GROUP;
/// Short commands answer in milliseconds; past this the connection is taken for dead. Heartbeats
/// run on this link, so it must stay well under the lease TTL.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Key blobs are ~100 MiB: they get a link of their own with a timeout long enough to move one,
/// so that a transfer never delays a heartbeat.
const BLOB_TIMEOUT: Duration = Duration::from_secs(60);
/// A blocking read that has not answered `read_block_ms` plus this is on a dead connection.
const READ_SLACK: Duration = Duration::from_secs(2);

pub struct RedisQueue {
    settings: QueueSettings,
    /// The primary: one address, or the one Redis Sentinel names now (`endpoint.rs`).
    endpoint: Arc<Endpoint>,
    /// Every short command.
    commands: Link,
    /// Evaluation-key blobs.
    blobs: Link,
    /// Connections for job completions that `WAIT` for replicas (`replica_acks` > 0), one per
    /// concurrent completion: a `WAIT` blocks its connection, so it never shares one with
    /// heartbeats, nor with another job's completion (while no replica answers, each job
    /// waits its own timeout, not the sum of those before it).
    durables: Mutex<Vec<MultiplexedConnection>>,
    /// Whether the last completion was announced before enough replicas held it (logged once
    /// per change).
    unreplicated: std::sync::atomic::AtomicBool,
    /// Connections for `XREADGROUP … BLOCK`, one per concurrent read: a blocking read must never
    /// sit on the shared connection (it would stall every other command behind it). Their
    /// response timeout is the block time plus slack, so a dead connection is noticed and
    /// dropped instead of blocking forever.
    readers: Mutex<Vec<MultiplexedConnection>>,
    scripts: Scripts,
    /// Which owned shard a read starts at, turned by one each read (fairness across shards).
    read_rotation: std::sync::atomic::AtomicUsize,
    /// The cluster's shard count as last read from `hyfhe:shards` (only ever grows), and when.
    shards: std::sync::atomic::AtomicU32,
    shards_checked_ms: std::sync::atomic::AtomicU64,
}

struct Scripts {
    renew: Script,
    release: Script,
    begin: Script,
    abandon: Script,
    usage: Script,
    read_new: Script,
    create_session: Script,
    delete_session: Script,
    charge_rows: Script,
    acquire_slot: Script,
    grow_shards: Script,
    refresh_session: Script,
}

/// A client for `url`; `rediss://` speaks TLS with the process's crypto provider (*ring*), trusting
/// `ca_cert` alone when given (a private CA), else the system's roots.
fn open_client(url: &str, ca_cert: Option<&std::path::Path>) -> Result<Client, String> {
    if !url.starts_with("rediss://") {
        return Client::open(url).map_err(|e| e.to_string());
    }
    crate::tls::install_provider();
    let Some(path) = ca_cert else {
        return Client::open(url).map_err(|e| e.to_string());
    };
    let pem = std::fs::read(path)
        .map_err(|e| format!("cannot read CA certificate {}: {e}", path.display()))?;
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    };
    Client::build_with_tls(url, certs).map_err(|e| e.to_string())
}

impl RedisQueue {
    /// Connect and create the consumer groups. Retries for `connect_timeout` so a service can
    /// start before Redis (docker-compose starts them together).
    pub async fn connect(
        url: &str,
        settings: QueueSettings,
        connect_timeout: Duration,
    ) -> Result<Self, QueueError> {
        Self::connect_with_ca(url, None, settings, connect_timeout).await
    }

    /// [`RedisQueue::connect`]; a `rediss://` URL's certificate must chain to `ca_cert` (a PEM
    /// file) when one is given, to the system's roots otherwise.
    pub async fn connect_with_ca(
        url: &str,
        ca_cert: Option<&std::path::Path>,
        settings: QueueSettings,
        connect_timeout: Duration,
    ) -> Result<Self, QueueError> {
        let queue = Self::connect_read_only(url, ca_cert, settings, connect_timeout).await?;
        // The configured count starts a new cluster (or grows a running one to it); a process
        // joining a cluster that has grown past it takes the larger count. Creates the groups.
        queue.grow_shards(queue.settings.shards).await?;
        Ok(queue)
    }

    /// A connection that writes nothing on its own (no shard count, no consumer groups): what
    /// `hyfhe store audit` reads the store with.
    pub async fn connect_read_only(
        url: &str,
        ca_cert: Option<&std::path::Path>,
        settings: QueueSettings,
        connect_timeout: Duration,
    ) -> Result<Self, QueueError> {
        let shown = redact_url(url);
        let endpoint = if endpoint::is_sentinel_url(url) {
            Endpoint::Sentinel(
                endpoint::parse_sentinels(url, ca_cert)
                    .map_err(|e| QueueError::Unavailable(format!("redis URL {shown}: {e}")))?,
            )
        } else {
            Endpoint::Direct(
                open_client(url, ca_cert)
                    .map_err(|e| QueueError::Unavailable(format!("redis URL {shown}: {e}")))?,
            )
        };
        let endpoint = Arc::new(endpoint);
        let started = std::time::Instant::now();
        let (commands, blobs) = loop {
            let links = async {
                Ok::<_, RedisError>((
                    Link::open(&endpoint, "commands", COMMAND_TIMEOUT).await?,
                    Link::open(&endpoint, "key blobs", BLOB_TIMEOUT).await?,
                ))
            };
            match links.await {
                Ok(links) => break links,
                Err(e) if started.elapsed() < connect_timeout => {
                    tracing::warn!(error = %e, url = %shown, "redis not reachable yet, retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(unavailable(e)),
            }
        };
        Ok(Self {
            settings,
            endpoint,
            commands,
            blobs,
            durables: Mutex::new(Vec::new()),
            unreplicated: Default::default(),
            readers: Mutex::new(Vec::new()),
            scripts: Scripts {
                renew: Script::new(leases::RENEW_IF_OWNER),
                release: Script::new(leases::RELEASE_IF_OWNER),
                begin: Script::new(streams::BEGIN),
                abandon: Script::new(streams::ABANDON),
                usage: Script::new(sessions::TENANT_USAGE),
                read_new: Script::new(streams::READ_NEW),
                create_session: Script::new(sessions::CREATE_SESSION),
                delete_session: Script::new(sessions::DELETE_SESSION),
                charge_rows: Script::new(streams::CHARGE_ROWS),
                acquire_slot: Script::new(sessions::ACQUIRE_SLOT),
                grow_shards: Script::new(leases::GROW_SHARDS),
                refresh_session: Script::new(sessions::REFRESH_SESSION),
            },
            read_rotation: Default::default(),
            shards: Default::default(),
            shards_checked_ms: Default::default(),
        })
    }

    /// A connection for one blocking read.
    async fn reader(&self) -> Result<MultiplexedConnection, QueueError> {
        if let Some(c) = self.readers.lock().await.pop() {
            return Ok(c);
        }
        self.connection(Duration::from_millis(self.settings.read_block_ms) + READ_SLACK)
            .await
    }

    /// A connection of its own to the primary (not behind a [`Link`]: it never reconnects by
    /// itself), answering within `response_timeout`.
    async fn connection(
        &self,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection, QueueError> {
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(CONNECT_TIMEOUT));
        self.endpoint
            .client()
            .await
            .map_err(unavailable)?
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(unavailable)
    }

    /// A connection for one completion that waits for replicas; given back with
    /// [`Self::durable_done`] unless it failed (a failed one is dropped, never reused: a
    /// `WAIT` on a connection that might not be the one that stored would be vacuous).
    /// `fresh` skips (and empties) the pool: after a failover every pooled connection is to the
    /// old primary.
    async fn durable(&self, fresh: bool) -> Result<MultiplexedConnection, QueueError> {
        let mut pool = self.durables.lock().await;
        if fresh {
            pool.clear();
        } else if let Some(c) = pool.pop() {
            return Ok(c);
        }
        drop(pool);
        self.connection(
            COMMAND_TIMEOUT + Duration::from_millis(self.settings.replica_ack_timeout_ms),
        )
        .await
    }

    async fn durable_done(&self, c: MultiplexedConnection) {
        self.durables.lock().await.push(c);
    }

    /// `GET key`, decoded from msgpack; `None` when the key is absent (or expired).
    async fn get_msgpack<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, QueueError> {
        let bytes: Option<Vec<u8>> = self
            .commands
            .run_repeatable(
                |mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await },
            )
            .await?;
        bytes
            .map(|b| {
                rmp_serde::from_slice(&b).map_err(|e| QueueError::Corrupt(format!("{key}: {e}")))
            })
            .transpose()
    }
}

impl JobQueue for RedisQueue {
    fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), QueueError>> {
        Box::pin(async move {
            let _: String = self
                .commands
                .run(|mut c| async move { redis::cmd("PING").query_async(&mut c).await })
                .await?;
            Ok(())
        })
    }

    fn begin<'a>(
        &'a self,
        job: &'a Job,
        ttl_ms: u64,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<super::Begin, QueueError>> {
        Box::pin(self.begin_job(job, ttl_ms, owner))
    }

    fn abandon<'a>(
        &'a self,
        job_id: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.abandon_job(job_id, owner))
    }

    fn enqueue<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.enqueue_job(job))
    }

    fn is_running<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(self.job_running(job_id))
    }

    fn outcome<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredOutcome>, QueueError>> {
        Box::pin(async move { self.get_msgpack(&streams::result_key(job_id)).await })
    }

    fn completions(&self) -> BoxFuture<'_, Result<CompletionStream, QueueError>> {
        Box::pin(self.subscribe_completions())
    }

    fn live_workers(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(self.count_live_workers())
    }

    fn depth(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(self.total_depth())
    }

    fn shard_lag(&self) -> BoxFuture<'_, Result<Vec<ShardLag>, QueueError>> {
        Box::pin(self.lag_per_shard())
    }

    fn heartbeat<'a>(
        &'a self,
        worker: &'a str,
        busy: &'a [u32],
    ) -> BoxFuture<'a, Result<Leases, QueueError>> {
        Box::pin(self.renew_leases(worker, busy))
    }

    fn read<'a>(
        &'a self,
        worker: &'a str,
        shards: &'a [u32],
        count: usize,
        block_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, QueueError>> {
        Box::pin(self.read_new(worker, shards, count, block_ms))
    }

    fn claim<'a>(
        &'a self,
        worker: &'a str,
        shard: u32,
        min_idle_ms: u64,
        count: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, QueueError>> {
        Box::pin(self.claim_idle(worker, shard, min_idle_ms, count))
    }

    fn refresh<'a>(
        &'a self,
        worker: &'a str,
        shard: u32,
        entries: &'a [String],
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.refresh_entries(worker, shard, entries))
    }

    fn complete<'a>(
        &'a self,
        delivery: &'a Delivery,
        outcome: &'a StoredOutcome,
    ) -> BoxFuture<'a, Result<Completion, QueueError>> {
        Box::pin(self.complete_job(delivery, outcome))
    }

    fn count_duplicate(&self) -> BoxFuture<'_, Result<(), QueueError>> {
        Box::pin(self.incr_duplicates())
    }

    fn dead_letter<'a>(
        &'a self,
        delivery: &'a Delivery,
        code: ErrorCode,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.dead_letter_job(delivery, code, reason))
    }

    fn discard<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.discard_entry(delivery))
    }

    fn bill<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, Result<TenantBill, QueueError>> {
        Box::pin(self.bill_of(tenant))
    }

    fn charge_rows<'a>(
        &'a self,
        tenant: &'a str,
        module: &'a str,
        rows: i64,
        limit: u64,
        window_ms: u64,
    ) -> BoxFuture<'a, Result<Charge, QueueError>> {
        Box::pin(self.charge(tenant, module, rows, limit, window_ms))
    }

    fn dead_letters(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(self.count_dead_letters())
    }

    fn leave<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.release_all(worker))
    }
}

impl SessionStore for RedisQueue {
    fn create_session<'a>(
        &'a self,
        record: &'a SessionRecord,
        ttl_ms: u64,
        quota: SessionQuota,
    ) -> BoxFuture<'a, Result<Reserved, QueueError>> {
        Box::pin(self.reserve_session(record, ttl_ms, quota))
    }

    fn put_key<'a>(
        &'a self,
        key_id: &'a str,
        bytes: &'a [u8],
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.store_key(key_id, bytes, ttl_ms))
    }

    fn get_key<'a>(
        &'a self,
        key_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, QueueError>> {
        Box::pin(self.load_key(key_id))
    }

    fn put_session<'a>(
        &'a self,
        record: &'a SessionRecord,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.store_session(record, ttl_ms))
    }

    fn get_session<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SessionRecord>, QueueError>> {
        Box::pin(async move { self.get_msgpack(&sessions::session_key(id)).await })
    }

    fn delete_session<'a>(
        &'a self,
        record: &'a SessionRecord,
    ) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(self.remove_session(record))
    }

    fn tenant_usage<'a>(
        &'a self,
        tenant: &'a str,
    ) -> BoxFuture<'a, Result<TenantUsage, QueueError>> {
        Box::pin(self.usage_of(tenant))
    }

    fn acquire_slot<'a>(
        &'a self,
        tenant: &'a str,
        slot: &'a str,
        limit: usize,
        lease_ms: u64,
    ) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(self.take_slot(tenant, slot, limit, lease_ms))
    }

    fn release_slot<'a>(
        &'a self,
        tenant: &'a str,
        slot: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.give_back_slot(tenant, slot))
    }
}
