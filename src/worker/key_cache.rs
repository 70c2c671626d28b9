//! Sessions' evaluation keys, Fourier-transformed, in a byte-bounded LRU.
//!
//! Key memory is what limits an FHE worker (384–576 MiB per session), which is why sessions are
//! sharded onto workers and this cache is bounded in bytes, not entries. A miss fetches the
//! uploaded key from the store and transforms it on the blocking pool (seconds of CPU must not
//! run on the actor system's thread); concurrent misses for one key wait on that single load.

use std::collections::HashMap;
use std::sync::Arc;

use actix::{
    Actor, ActorFutureExt, AsyncContext, Context, Handler, Message, ResponseFuture, WrapFuture,
};
use tokio::sync::oneshot;
use tracing::Instrument;

use super::{JobError, WorkerMetrics};
use crate::fhe::{decode, EvaluationKey, Precision, SessionKey};
use crate::queue::Broker;

type KeyResult = Result<Arc<SessionKey>, JobError>;

/// Largest evaluation-key blob accepted from the store (row key and block keys: ~107 MiB exact;
/// with bootstrapping keys ~167 MiB).
fn max_key_bytes() -> usize {
    EvaluationKey::max_len(Precision::Exact).max(EvaluationKey::max_len(Precision::Compact)) + 4096
}

struct Entry {
    key: Arc<SessionKey>,
    bytes: u64,
    last_used: u64,
    /// The tenant the blob is charged to (blob ids are scoped by tenant, so it is only one).
    tenant: String,
}

pub struct KeyCache {
    broker: Arc<dyn Broker>,
    capacity_bytes: u64,
    entries: HashMap<String, Entry>,
    loading: HashMap<String, Vec<oneshot::Sender<KeyResult>>>,
    clock: u64,
    metrics: Arc<WorkerMetrics>,
}

impl KeyCache {
    pub fn new(broker: Arc<dyn Broker>, capacity_bytes: u64, metrics: Arc<WorkerMetrics>) -> Self {
        Self {
            broker,
            capacity_bytes,
            entries: HashMap::new(),
            loading: HashMap::new(),
            clock: 0,
            metrics,
        }
    }

    fn used_bytes(&self) -> u64 {
        self.entries.values().map(|e| e.bytes).sum()
    }

    fn bytes_of(&self, tenant: &str) -> u64 {
        self.entries
            .values()
            .filter(|e| e.tenant == tenant)
            .map(|e| e.bytes)
            .sum()
    }

    /// Each tenant's share of the cache: an equal part per tenant holding keys here (counting
    /// the one about to load), so one tenant's sessions cannot push every other tenant's keys out.
    fn share(&self, incoming_tenant: &str) -> u64 {
        let mut tenants: Vec<&str> = self.entries.values().map(|e| e.tenant.as_str()).collect();
        tenants.push(incoming_tenant);
        tenants.sort_unstable();
        tenants.dedup();
        self.capacity_bytes / tenants.len() as u64
    }

    /// The least recently used entry whose tenant satisfies `pick`.
    fn oldest_of(&self, pick: impl Fn(&str) -> bool) -> Option<String> {
        self.entries
            .iter()
            .filter(|(_, e)| pick(&e.tenant))
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| k.clone())
    }

    fn evict(&mut self, key_id: &str) {
        self.entries.remove(key_id);
        self.metrics.key_cache_evictions.inc();
        tracing::info!(key = %key_id, "evicted evaluation key");
    }

    /// Make room for `incoming` bytes of `tenant`'s. A tenant over its share evicts its own
    /// least-recently-used keys first; past that, the cache takes from tenants over their share
    /// before anyone else, and least recently used last. Jobs still holding an evicted key keep
    /// it alive through their `Arc` until they finish.
    fn make_room(&mut self, tenant: &str, incoming: u64) {
        let share = self.share(tenant);
        while self.bytes_of(tenant) + incoming > share {
            let Some(own) = self.oldest_of(|t| t == tenant) else {
                break;
            };
            self.evict(&own);
        }
        while self.used_bytes() + incoming > self.capacity_bytes {
            let share = self.share(tenant);
            let over: Vec<String> = {
                let mut tenants: Vec<String> =
                    self.entries.values().map(|e| e.tenant.clone()).collect();
                tenants.sort_unstable();
                tenants.dedup();
                tenants
                    .into_iter()
                    .filter(|t| self.bytes_of(t) > share)
                    .collect()
            };
            let victim = self
                .oldest_of(|t| over.iter().any(|o| o == t))
                .or_else(|| self.oldest_of(|_| true));
            match victim {
                Some(v) => self.evict(&v),
                None => break,
            }
        }
    }
}

impl Actor for KeyCache {
    type Context = Context<Self>;
}

/// The Fourier packing key stored under `key_id`.
#[derive(Message)]
#[rtype(result = "Result<Arc<SessionKey>, JobError>")]
pub struct GetKey {
    pub key_id: String,
    /// The tenant whose job needs it (the key is charged to its share of the cache).
    pub tenant: String,
    /// The job's span (the load is traced under the job that missed first).
    pub parent: tracing::Span,
}

async fn load(broker: Arc<dyn Broker>, key_id: String) -> KeyResult {
    let bytes = broker
        .get_key(&key_id)
        .await
        // The store could not be read: not the job's fault, it is retried later.
        .map_err(|e| JobError::Transient(format!("loading key {key_id}: {e}")))?
        .ok_or_else(|| {
            JobError::KeyMissing(format!(
                "evaluation key {key_id} is not in the store (it expired, or a Redis failover \
                 lost it): open a new session with the same keys"
            ))
        })?;
    tokio::task::spawn_blocking(move || {
        let key: EvaluationKey = decode(&bytes, max_key_bytes())
            .map_err(|e| JobError::BadRequest(format!("stored key {key_id}: {e}")))?;
        Ok(Arc::new(SessionKey::new(&key)))
    })
    .await
    .map_err(|e| JobError::Internal(format!("key transform panicked: {e}")))?
}

/// What the key cache holds now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyCacheStats {
    pub keys: usize,
    pub bytes: u64,
    pub capacity_bytes: u64,
    pub loading: usize,
}

/// Ask the key cache for its [`KeyCacheStats`].
#[derive(Message)]
#[rtype(result = "KeyCacheStats")]
pub struct GetKeyCacheStats;

impl Handler<GetKeyCacheStats> for KeyCache {
    type Result = actix::MessageResult<GetKeyCacheStats>;

    fn handle(&mut self, _: GetKeyCacheStats, _: &mut Context<Self>) -> Self::Result {
        actix::MessageResult(KeyCacheStats {
            keys: self.entries.len(),
            bytes: self.used_bytes(),
            capacity_bytes: self.capacity_bytes,
            loading: self.loading.len(),
        })
    }
}

impl Handler<GetKey> for KeyCache {
    type Result = ResponseFuture<Result<Arc<SessionKey>, JobError>>;

    fn handle(&mut self, msg: GetKey, ctx: &mut Context<Self>) -> Self::Result {
        self.clock += 1;
        if let Some(entry) = self.entries.get_mut(&msg.key_id) {
            entry.last_used = self.clock;
            self.metrics.key_cache_hits.inc();
            let key = entry.key.clone();
            return Box::pin(async move { Ok(key) });
        }
        self.metrics.key_cache_misses.inc();
        let (tx, rx) = oneshot::channel();
        let first = !self.loading.contains_key(&msg.key_id);
        self.loading.entry(msg.key_id.clone()).or_default().push(tx);
        if first {
            let key_id = msg.key_id.clone();
            let tenant = msg.tenant.clone();
            let span = tracing::info_span!(parent: &msg.parent, "key_load", key = %key_id);
            let fut = load(self.broker.clone(), key_id.clone())
                .instrument(span)
                .into_actor(self)
                .map(move |result, act, _| {
                    if let Ok(key) = &result {
                        let bytes = key.size_bytes() as u64;
                        act.make_room(&tenant, bytes);
                        act.clock += 1;
                        act.entries.insert(
                            key_id.clone(),
                            Entry {
                                key: key.clone(),
                                bytes,
                                last_used: act.clock,
                                tenant,
                            },
                        );
                        act.metrics.key_loads.inc();
                        tracing::info!(key = %key_id, bytes, "loaded evaluation key");
                    }
                    act.metrics.key_cache_bytes.set(act.used_bytes());
                    for waiter in act.loading.remove(&key_id).unwrap_or_default() {
                        let _ = waiter.send(result.clone());
                    }
                });
            ctx.spawn(fut);
        }
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(JobError::Internal("key cache stopped".into())))
        })
    }
}
