//! The in-process queue of the embedded mode, with the Redis queue's semantics: shards with
//! leases, pending entries with delivery counts, claims, outcomes stored once, TTLs.
//!
//! One `std::sync::Mutex` guards everything: every operation is a few map updates, never held
//! across an `.await`, so a blocking mutex is cheaper than an async one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, Notify};

use super::{
    fair_share, shard_of, BoxFuture, CompletionStream, Delivery, Job, JobOutcome, JobQueue, Leases,
    QueueError, QueueSettings, SessionRecord, SessionStore,
};

#[derive(Default)]
struct Shard {
    next_seq: u64,
    jobs: BTreeMap<u64, Job>,
    unread: VecDeque<u64>,
    pending: HashMap<u64, Pending>,
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
    outcomes: HashMap<String, Expiring<JobOutcome>>,
    sessions: HashMap<String, Expiring<SessionRecord>>,
    keys: HashMap<String, Expiring<Vec<u8>>>,
    dead_letters: Vec<(Job, String)>,
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
        for &s in shards {
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

    fn store_outcome(&self, delivery: &Delivery, outcome: &JobOutcome) -> Result<(), QueueError> {
        let seq = Self::entry_seq(delivery)?;
        let mut state = self.lock();
        let now = Instant::now();
        let stored = state
            .outcomes
            .get(&delivery.job.id)
            .is_some_and(|o| o.expires > now);
        if !stored {
            state.outcomes.insert(
                delivery.job.id.clone(),
                Expiring {
                    value: outcome.clone(),
                    expires: Self::ttl(self.settings.result_ttl_ms),
                },
            );
        }
        let shard = &mut state.shards[delivery.shard as usize];
        shard.pending.remove(&seq);
        shard.jobs.remove(&seq);
        drop(state);
        // No subscriber is not an error: nobody is waiting.
        let _ = self.completed.send(delivery.job.id.clone());
        Ok(())
    }
}

impl JobQueue for MemoryQueue {
    fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), QueueError>> {
        Box::pin(async { Ok(()) })
    }

    fn enqueue<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let s = shard_of(&job.session, self.settings.shards);
            {
                let mut state = self.lock();
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
                shard.unread.push_back(seq);
            }
            self.new_jobs.notify_waiters();
            Ok(())
        })
    }

    fn outcome<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<JobOutcome>, QueueError>> {
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

    fn heartbeat<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, Result<Leases, QueueError>> {
        Box::pin(async move {
            let ttl = self.settings.lease_ttl_ms;
            let now = Instant::now();
            let mut state = self.lock();
            state.workers.insert(worker.to_string(), Self::ttl(ttl));
            state.workers.retain(|_, &mut t| t > now);
            let target = fair_share(self.settings.shards, state.workers.len());
            let mut leases = Leases::default();
            for (s, lease) in state.leases.iter_mut().enumerate() {
                match lease {
                    Some(l) if l.expires > now && l.value == worker => {
                        if leases.owned.len() < target {
                            l.expires = Self::ttl(ttl);
                            leases.owned.push(s as u32);
                        } else {
                            *lease = None;
                        }
                    }
                    _ => {}
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
    ) -> BoxFuture<'a, Result<Vec<Delivery>, QueueError>> {
        Box::pin(async move {
            let mut state = self.lock();
            let shard_state = &mut state.shards[shard as usize];
            let min_idle = Duration::from_millis(min_idle_ms);
            let mut out = Vec::new();
            for (&seq, pending) in shard_state.pending.iter_mut() {
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

    fn complete<'a>(
        &'a self,
        delivery: &'a Delivery,
        outcome: &'a JobOutcome,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move { self.store_outcome(delivery, outcome) })
    }

    fn dead_letter<'a>(
        &'a self,
        delivery: &'a Delivery,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            self.lock()
                .dead_letters
                .push((delivery.job.clone(), reason.to_string()));
            self.store_outcome(delivery, &JobOutcome::failed(super::DEAD_LETTERED, reason))
        })
    }

    fn dead_letters(&self) -> BoxFuture<'_, Result<usize, QueueError>> {
        Box::pin(async move { Ok(self.lock().dead_letters.len()) })
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

impl SessionStore for MemoryQueue {
    fn put_key<'a>(
        &'a self,
        key_id: &'a str,
        bytes: &'a [u8],
        ttl_ms: u64,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(async move {
            let now = Instant::now();
            let mut state = self.lock();
            state.keys.retain(|_, k| k.expires > now);
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
            state.sessions.retain(|_, s| s.expires > now);
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

    fn delete_session<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, QueueError>> {
        Box::pin(async move {
            let now = Instant::now();
            Ok(self
                .lock()
                .sessions
                .remove(id)
                .is_some_and(|s| s.expires > now))
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
