//! The in-process queue of the embedded mode, with the Redis queue's semantics: shards with
//! leases, pending entries with delivery counts, claims, outcomes stored once, TTLs.
//!
//! One `std::sync::Mutex` guards everything: every operation is a few map updates, never held
//! across an `.await`, so a blocking mutex is cheaper than an async one.
//!
//! Nothing grows per request: expired outcomes, markers, sessions and keys are pruned (at most
//! once per [`PRUNE_EVERY`], so a burst of requests does not scan the maps each time), and the
//! dead-letter record keeps the last [`DEAD_LETTER_CAP`] entries without their payloads.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, Notify};

use super::{
    fair_share, grown_shards, shard_of, Begin, BoxFuture, Charge, Completion, CompletionStream,
    Delivery, Job, JobOutcome, JobQueue, Leases, Marker, QueueError, QueueSettings, Reserved,
    SessionQuota, SessionRecord, SessionStore, ShardLag, StoredOutcome, TenantBill, TenantUsage,
};
use crate::protocol::ErrorCode;

/// Expired entries are swept at most this often.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Dead-letter records kept (the Redis stream keeps about 10 000).
pub const DEAD_LETTER_CAP: usize = 1000;

/// What the dead-letter record keeps of a job: enough to find it, not its payload.
#[allow(dead_code)] // read through Debug only, like the Redis stream's fields
#[derive(Debug)]
struct DeadLetter {
    job: String,
    session: String,
    module: String,
    reason: String,
}

#[derive(Default)]
struct Shard {
    next_seq: u64,
    jobs: BTreeMap<u64, Job>,
    unread: VecDeque<u64>,
    pending: HashMap<u64, Pending>,
    /// When each job in `jobs` was enqueued (the backlog's age for autoscaling).
    enqueued_at: HashMap<u64, Instant>,
}

struct Pending {
    delivered_at: Instant,
    deliveries: u32,
}

struct Expiring<T> {
    value: T,
    expires: Instant,
}

impl<T: Clone> Expiring<T> {
    fn live(&self, now: Instant) -> Option<T> {
        (self.expires > now).then(|| self.value.clone())
    }
}

#[derive(Default)]
struct State {
    shards: Vec<Shard>,
    leases: Vec<Option<Expiring<String>>>,
    workers: HashMap<String, Instant>,
    outcomes: HashMap<String, Expiring<StoredOutcome>>,
    /// In-flight markers by job id.
    running: HashMap<String, Expiring<Marker>>,
    sessions: HashMap<String, Expiring<SessionRecord>>,
    keys: HashMap<String, Expiring<Vec<u8>>>,
    /// Key blob id → the sessions that reference it.
    key_refs: HashMap<String, HashSet<String>>,
    dead_letters: VecDeque<DeadLetter>,
    dead_lettered_total: usize,
    last_prune: Option<Instant>,
    read_rotation: usize,
    /// By tenant (tenants come from the configuration, so this is bounded by it).
    bills: HashMap<String, TenantBill>,
    /// (tenant, module) → (window index, rows used in it).
    row_windows: HashMap<(String, String), (u64, u64)>,
    /// By tenant: in-flight request slots and when their leases end.
    slots: HashMap<String, HashMap<String, Instant>>,
}

impl State {
    /// Drop whatever expired, at most once per [`PRUNE_EVERY`].
    fn prune(&mut self, now: Instant) {
        if self
            .last_prune
            .is_some_and(|t| now.duration_since(t) < PRUNE_EVERY)
        {
            return;
        }
        self.last_prune = Some(now);
        self.outcomes.retain(|_, o| o.expires > now);
        self.running.retain(|_, r| r.expires > now);
        self.sessions.retain(|_, s| s.expires > now);
        self.keys.retain(|_, k| k.expires > now);
        let keys = &self.keys;
        self.key_refs.retain(|id, _| keys.contains_key(id));
        self.workers.retain(|_, &mut t| t > now);
    }

    fn record_dead_letter(&mut self, letter: DeadLetter) {
        if self.dead_letters.len() == DEAD_LETTER_CAP {
            self.dead_letters.pop_front();
        }
        self.dead_letters.push_back(letter);
        self.dead_lettered_total += 1;
    }

    /// Sizes of every map: what a test checks to see that nothing grows per request.
    fn sizes(&self) -> MemoryQueueSizes {
        MemoryQueueSizes {
            jobs: self.shards.iter().map(|s| s.jobs.len()).sum(),
            outcomes: self.outcomes.len(),
            running: self.running.len(),
            sessions: self.sessions.len(),
            keys: self.keys.len(),
            dead_letters: self.dead_letters.len(),
        }
    }
}

/// Entries held by a [`MemoryQueue`], map by map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryQueueSizes {
    pub jobs: usize,
    pub outcomes: usize,
    pub running: usize,
    pub sessions: usize,
    pub keys: usize,
    pub dead_letters: usize,
}

pub struct MemoryQueue {
    settings: QueueSettings,
    state: Mutex<State>,
    new_jobs: Notify,
    completed: broadcast::Sender<String>,
}

impl MemoryQueue {
    pub fn new(settings: QueueSettings) -> Self {
        let shards = settings.shards as usize;
        let state = State {
            shards: (0..shards).map(|_| Shard::default()).collect(),
            leases: (0..shards).map(|_| None).collect(),
            ..State::default()
        };
        Self {
            settings,
            state: Mutex::new(state),
            new_jobs: Notify::new(),
            completed: broadcast::channel(4096).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves maps that are still consistent (each update is
        // a single insert/remove), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ttl(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    fn take_unread(&self, shards: &[u32], count: usize) -> Vec<Delivery> {
        let mut state = self.lock();
        let mut out = Vec::new();
        if shards.is_empty() {
            return out;
        }
        // Start at a rotating shard, as the Redis queue does, so a busy shard cannot starve the rest.
        state.read_rotation = state.read_rotation.wrapping_add(1);
        let start = state.read_rotation % shards.len();
        for &s in shards[start..].iter().chain(&shards[..start]) {
            let shard = &mut state.shards[s as usize];
            while out.len() < count {
                let Some(seq) = shard.unread.pop_front() else {
                    break;
                };
                shard.pending.insert(
                    seq,
                    Pending {
                        delivered_at: Instant::now(),
                        deliveries: 1,
                    },
                );
                out.push(Delivery {
                    shard: s,
                    entry_id: seq.to_string(),
                    deliveries: 1,
                    job: shard.jobs[&seq].clone(),
                });
            }
        }
        out
    }

    fn entry_seq(delivery: &Delivery) -> Result<u64, QueueError> {
        delivery
            .entry_id
            .parse()
            .map_err(|_| QueueError::Corrupt(format!("entry id {}", delivery.entry_id)))
    }

    /// Entries held now, map by map (after pruning what expired).
    pub fn sizes(&self) -> MemoryQueueSizes {
        let mut state = self.lock();
        state.last_prune = None;
        state.prune(Instant::now());
        state.sizes()
    }

    fn store_outcome(
        &self,
        delivery: &Delivery,
        outcome: &StoredOutcome,
    ) -> Result<Completion, QueueError> {
        let seq = Self::entry_seq(delivery)?;
        let mut state = self.lock();
        let now = Instant::now();
        state.prune(now);
        let id = &delivery.job.id;
        let stored = state.outcomes.get(id).is_some_and(|o| o.expires > now);
        if !stored {
            if outcome.outcome.billable() {
                let bill = state.bills.entry(delivery.job.tenant.clone()).or_default();
                bill.jobs += 1;
                if matches!(outcome.outcome, JobOutcome::Done(_)) {
                    bill.rows += delivery.job.rows as u64;
                }
                bill.fhe_micros += (outcome.fhe_seconds.max(0.0) * 1e6).round() as u64;
            }
            state.outcomes.insert(
                id.clone(),
                Expiring {
                    value: outcome.clone(),
                    expires: Self::ttl(self.settings.result_ttl_ms),
                },
            );
        }
        state.running.remove(id);
        let shard = &mut state.shards[delivery.shard as usize];
        shard.pending.remove(&seq);
        shard.jobs.remove(&seq);
        shard.enqueued_at.remove(&seq);
        drop(state);
        // No subscriber is not an error: nobody is waiting.
        let _ = self.completed.send(id.clone());
        Ok(if stored {
            Completion::Duplicate
        } else {
            Completion::Stored
        })
    }
}

impl JobQueue for MemoryQueue {
    fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), QueueError>> {
        Box::pin(async { Ok(()) })
    }

    fn begin<'a>(
        &'a self,
        job: &'a Job,
        ttl_ms: u64,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<Begin, QueueError>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut state = self.lock();
            state.prune(now);
            if let Some(done) = state.outcomes.get(&job.id).and_then(|o| o.live(now)) {
                return Ok(Begin::Done(done));
            }
            if let Some(marker) = state.running.get(&job.id).and_then(|r| r.live(now)) {
                return Ok(Begin::Running {
                    request_sha256: marker.request_sha256,
                });
            }
            state.running.insert(
                job.id.clone(),
                Expiring {
                    value: Marker {
                        request_sha256: job.request_sha256.clone(),
                        owner: owner.to_string(),
                    },
                    expires: Self::ttl(ttl_ms),
                },
            );
            Ok(Begin::Started)
        })
    }

    fn abandon<'a>(
        &'a self,
        job_id: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut state = self.lock();
            if state
                .running
                .get(job_id)
                .is_some_and(|m| m.value.owner == owner)
            {
                state.running.remove(job_id);
            }
            Ok(())
        })
    }

    fn enqueue<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            {
                let mut state = self.lock();
                let s = shard_of(&job.session, state.shards.len() as u32);
                let shard = &mut state.shards[s as usize];
                if shard.jobs.len() >= self.settings.max_depth {
                    return Err(QueueError::Full {
                        shard: s,
                        depth: shard.jobs.len(),
                        cap: self.settings.max_depth,
                    });
                }
                let seq = shard.next_seq;
                shard.next_seq += 1;
                shard.jobs.insert(seq, job.clone());
                shard.enqueued_at.insert(seq, Instant::now());
                shard.unread.push_back(seq);
            }
            self.new_jobs.notify_waiters();
            Ok(())
        })
    }

    fn is_running<'a>(&'a self, job_id: &'a str) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(async move {
            let now = Instant::now();
            Ok(self
                .lock()
                .running
                .get(job_id)
                .is_some_and(|r| r.expires > now))
        })
    }

    fn outcome<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredOutcome>, QueueError>> {
        Box::pin(async move {
            let now = Instant::now();
            Ok(self.lock().outcomes.get(job_id).and_then(|o| o.live(now)))
        })
    }

    fn completions(&self) -> BoxFuture<'_, Result<CompletionStream, QueueError>> {
        Box::pin(async move { Ok(completion_stream(self.completed.subscribe())) })
    }

    fn live_workers(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(async move {
            let now = Instant::now();
            Ok(self.lock().workers.values().filter(|&&t| t > now).count())
        })
    }

    fn depth(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(async move { Ok(self.lock().shards.iter().map(|s| s.jobs.len()).sum()) })
    }

    fn shard_lag(&self) -> BoxFuture<'_, Result<Vec<ShardLag>, QueueError>> {
        Box::pin(async move {
            let now = Instant::now();
            let state = self.lock();
            Ok(state
                .shards
                .iter()
                .enumerate()
                .map(|(i, s)| ShardLag {
                    shard: i as u32,
                    unread: s.unread.len() as u64,
                    pending: s.pending.len() as u64,
                    oldest_ms: s
                        .jobs
                        .keys()
                        .next()
                        .and_then(|seq| s.enqueued_at.get(seq))
                        .map_or(0, |t| now.duration_since(*t).as_millis() as u64),
                })
                .collect())
        })
    }

    fn heartbeat<'a>(
        &'a self,
        worker: &'a str,
        busy: &'a [u32],
    ) -> BoxFuture<'a, Result<Leases, QueueError>> {
        Box::pin(async move {
            let ttl = self.settings.lease_ttl_ms;
            let now = Instant::now();
            let mut state = self.lock();
            state.workers.insert(worker.to_string(), Self::ttl(ttl));
            state.workers.retain(|_, &mut t| t > now);
            // The shards follow the workers, as on Redis (only ever grown).
            let shards = grown_shards(
                state.shards.len() as u32,
                state.workers.len(),
                self.settings.max_shards,
            ) as usize;
            state.shards.resize_with(shards, Shard::default);
            state.leases.resize_with(shards, || None);
            let target = fair_share(shards as u32, state.workers.len());
            let mut leases = Leases::default();
            // Busy shards first, so that the fair share keeps them rather than idle ones.
            let mut held: Vec<usize> = (0..state.leases.len())
                .filter(|&s| {
                    state.leases[s]
                        .as_ref()
                        .is_some_and(|l| l.expires > now && l.value == worker)
                })
                .collect();
            held.sort_by_key(|&s| !busy.contains(&(s as u32)));
            for s in held {
                let keep = leases.owned.len() < target;
                let lease = &mut state.leases[s];
                if keep || busy.contains(&(s as u32)) {
                    if let Some(l) = lease {
                        l.expires = Self::ttl(ttl);
                    }
                    if keep {
                        leases.owned.push(s as u32);
                    } else {
                        leases.draining.push(s as u32);
                    }
                } else {
                    *lease = None;
                }
            }
            for (s, lease) in state.leases.iter_mut().enumerate() {
                if leases.owned.len() >= target {
                    break;
                }
                if lease.as_ref().is_none_or(|l| l.expires <= now) {
                    *lease = Some(Expiring {
                        value: worker.to_string(),
                        expires: Self::ttl(ttl),
                    });
                    leases.owned.push(s as u32);
                    leases.acquired.push(s as u32);
                }
            }
            leases.owned.sort_unstable();
            Ok(leases)
        })
    }

    fn read<'a>(
        &'a self,
        _worker: &'a str,
        shards: &'a [u32],
        count: usize,
        block_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, QueueError>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(block_ms);
            loop {
                // Register interest before looking, so a job enqueued in between wakes us.
                let notified = self.new_jobs.notified();
                let out = self.take_unread(shards, count);
                if !out.is_empty() {
                    return Ok(out);
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return Ok(Vec::new());
                }
            }
        })
    }

    fn claim<'a>(
        &'a self,
        _worker: &'a str,
        shard: u32,
        min_idle_ms: u64,
        count: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, QueueError>> {
        Box::pin(async move {
            let mut state = self.lock();
            let shard_state = &mut state.shards[shard as usize];
            let min_idle = Duration::from_millis(min_idle_ms);
            let mut out = Vec::new();
            // Oldest first, like XAUTOCLAIM's scan from 0-0.
            let mut seqs: Vec<u64> = shard_state.pending.keys().copied().collect();
            seqs.sort_unstable();
            for seq in seqs {
                if out.len() >= count {
                    break;
                }
                let pending = shard_state.pending.get_mut(&seq).expect("listed above");
                if pending.delivered_at.elapsed() >= min_idle {
                    pending.delivered_at = Instant::now();
                    pending.deliveries += 1;
                    out.push(Delivery {
                        shard,
                        entry_id: seq.to_string(),
                        deliveries: pending.deliveries,
                        job: shard_state.jobs[&seq].clone(),
                    });
                }
            }
            Ok(out)
        })
    }

    fn refresh<'a>(
        &'a self,
        _worker: &'a str,
        shard: u32,
        entries: &'a [String],
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut state = self.lock();
            let shard = &mut state.shards[shard as usize];
            for seq in entries.iter().filter_map(|e| e.parse::<u64>().ok()) {
                if let Some(p) = shard.pending.get_mut(&seq) {
                    p.delivered_at = Instant::now();
                }
            }
            Ok(())
        })
    }

    fn complete<'a>(
        &'a self,
        delivery: &'a Delivery,
        outcome: &'a StoredOutcome,
    ) -> BoxFuture<'a, Result<Completion, QueueError>> {
        Box::pin(async move { self.store_outcome(delivery, outcome) })
    }

    fn bill<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, Result<TenantBill, QueueError>> {
        Box::pin(async move { Ok(self.lock().bills.get(tenant).copied().unwrap_or_default()) })
    }

    fn charge_rows<'a>(
        &'a self,
        tenant: &'a str,
        module: &'a str,
        rows: i64,
        limit: u64,
        window_ms: u64,
    ) -> BoxFuture<'a, Result<Charge, QueueError>> {
        Box::pin(async move {
            let window = super::now_unix_ms() / window_ms.max(1);
            let mut state = self.lock();
            let entry = state
                .row_windows
                .entry((tenant.to_string(), module.to_string()))
                .or_insert((window, 0));
            if entry.0 != window {
                *entry = (window, 0);
            }
            if rows > 0 && entry.1 + rows as u64 > limit {
                return Ok(Charge::Refused { used: entry.1 });
            }
            entry.1 = entry.1.saturating_add_signed(rows);
            Ok(Charge::Charged { used: entry.1 })
        })
    }

    fn discard<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let seq = Self::entry_seq(delivery)?;
            let mut state = self.lock();
            let shard = &mut state.shards[delivery.shard as usize];
            shard.pending.remove(&seq);
            shard.jobs.remove(&seq);
            shard.enqueued_at.remove(&seq);
            Ok(())
        })
    }

    fn dead_letter<'a>(
        &'a self,
        delivery: &'a Delivery,
        code: ErrorCode,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let job = &delivery.job;
            self.lock().record_dead_letter(DeadLetter {
                job: job.client_job_id.clone(),
                session: job.session.clone(),
                module: job.module.clone(),
                reason: reason.to_string(),
            });
            let outcome = StoredOutcome {
                request_sha256: job.request_sha256.clone(),
                fhe_seconds: 0.0,
                outcome: JobOutcome::failed(code, reason),
            };
            self.store_outcome(delivery, &outcome).map(|_| ())
        })
    }

    fn dead_letters(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(async move { Ok(self.lock().dead_lettered_total) })
    }

    fn leave<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut state = self.lock();
            state.workers.remove(worker);
            for lease in state.leases.iter_mut() {
                if lease.as_ref().is_some_and(|l| l.value == worker) {
                    *lease = None;
                }
            }
            Ok(())
        })
    }
}

impl State {
    fn usage_of(&self, tenant: &str, now: Instant) -> TenantUsage {
        let mut usage = TenantUsage::default();
        for s in self.sessions.values().filter(|s| s.expires > now) {
            if s.value.tenant == tenant {
                usage.sessions += 1;
                usage.key_bytes += s.value.key_bytes;
            }
        }
        usage
    }
}

impl SessionStore for MemoryQueue {
    fn create_session<'a>(
        &'a self,
        record: &'a SessionRecord,
        ttl_ms: u64,
        quota: SessionQuota,
    ) -> BoxFuture<'a, Result<Reserved, QueueError>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut state = self.lock();
            let usage = state.usage_of(&record.tenant, now);
            if usage.sessions >= quota.sessions
                || usage.key_bytes + record.key_bytes > quota.key_bytes
            {
                return Ok(Reserved::OverQuota(usage));
            }
            for key_id in record.keys.values() {
                state
                    .key_refs
                    .entry(key_id.clone())
                    .or_default()
                    .insert(record.id.clone());
            }
            state.sessions.insert(
                record.id.clone(),
                Expiring {
                    value: record.clone(),
                    expires: Self::ttl(ttl_ms),
                },
            );
            Ok(Reserved::Created)
        })
    }

    fn put_key<'a>(
        &'a self,
        key_id: &'a str,
        bytes: &'a [u8],
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut state = self.lock();
            state.prune(Instant::now());
            state.keys.insert(
                key_id.to_string(),
                Expiring {
                    value: bytes.to_vec(),
                    expires: Self::ttl(ttl_ms),
                },
            );
            Ok(())
        })
    }

    fn get_key<'a>(
        &'a self,
        key_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, QueueError>> {
        Box::pin(async move {
            let now = Instant::now();
            Ok(self.lock().keys.get(key_id).and_then(|k| k.live(now)))
        })
    }

    fn put_session<'a>(
        &'a self,
        record: &'a SessionRecord,
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut state = self.lock();
            state.prune(now);
            // A session deleted (or expired) since it was read stays gone.
            if !state.sessions.contains_key(&record.id) {
                return Ok(());
            }
            for key_id in record.keys.values() {
                if let Some(k) = state.keys.get_mut(key_id) {
                    k.expires = k.expires.max(Self::ttl(ttl_ms));
                }
            }
            state.sessions.insert(
                record.id.clone(),
                Expiring {
                    value: record.clone(),
                    expires: Self::ttl(ttl_ms),
                },
            );
            Ok(())
        })
    }

    fn get_session<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SessionRecord>, QueueError>> {
        Box::pin(async move {
            let now = Instant::now();
            Ok(self.lock().sessions.get(id).and_then(|s| s.live(now)))
        })
    }

    fn delete_session<'a>(
        &'a self,
        record: &'a SessionRecord,
    ) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut state = self.lock();
            let deleted = state
                .sessions
                .remove(&record.id)
                .is_some_and(|s| s.expires > now);
            for key_id in record.keys.values() {
                let State {
                    key_refs,
                    sessions,
                    keys,
                    ..
                } = &mut *state;
                let Some(refs) = key_refs.get_mut(key_id) else {
                    continue;
                };
                refs.remove(&record.id);
                refs.retain(|s| sessions.get(s).is_some_and(|s| s.expires > now));
                if refs.is_empty() {
                    key_refs.remove(key_id);
                    keys.remove(key_id);
                }
            }
            Ok(deleted)
        })
    }

    fn tenant_usage<'a>(
        &'a self,
        tenant: &'a str,
    ) -> BoxFuture<'a, Result<TenantUsage, QueueError>> {
        Box::pin(async move { Ok(self.lock().usage_of(tenant, Instant::now())) })
    }

    fn acquire_slot<'a>(
        &'a self,
        tenant: &'a str,
        slot: &'a str,
        limit: usize,
        lease_ms: u64,
    ) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut state = self.lock();
            let held = state.slots.entry(tenant.to_string()).or_default();
            held.retain(|_, until| *until > now);
            if held.len() >= limit {
                return Ok(false);
            }
            held.insert(slot.to_string(), now + Duration::from_millis(lease_ms));
            Ok(true)
        })
    }

    fn release_slot<'a>(
        &'a self,
        tenant: &'a str,
        slot: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let mut state = self.lock();
            if let Some(held) = state.slots.get_mut(tenant) {
                held.remove(slot);
                if held.is_empty() {
                    state.slots.remove(tenant);
                }
            }
            Ok(())
        })
    }
}

/// Completed job ids as a stream. A lagging receiver yields an empty id, which the result router
/// takes as "re-check every waiter" rather than losing a completion.
fn completion_stream(rx: broadcast::Receiver<String>) -> CompletionStream {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(id) => Some((id, rx)),
            Err(RecvError::Lagged(_)) => Some((String::new(), rx)),
            Err(RecvError::Closed) => None,
        }
    }))
}
