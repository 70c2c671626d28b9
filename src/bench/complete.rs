//! `hyfhe bench complete`: what `queue.replica_acks` costs a job. The same Redis primary (with
//! its replicas) stores outcomes through two queues, one that announces at once
//! (`replica_acks = 0`) and one that first waits for the replicas (`WAIT`), alternating job by
//! job in one run so that both see the same machine; the time of `complete` (store + bill +
//! acknowledge + announce, and the wait) is reported for each.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::queue::{
    Completion, Job, JobOutcome, JobQueue, QueueSettings, RedisQueue, StoredOutcome,
};

#[derive(Clone, Debug)]
pub struct CompleteBenchConfig {
    /// The primary (or `redis+sentinel://…`).
    pub redis_url: String,
    /// Replicas the waiting queue asks for.
    pub replica_acks: u32,
    pub replica_ack_timeout_ms: u64,
    /// Jobs completed by each queue.
    pub jobs: usize,
    /// Size of each stored outcome (a 768-wide single-row result is ~10 KiB).
    pub outcome_bytes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub replica_acks: u32,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    /// Completions announced before enough replicas acknowledged them.
    pub unreplicated: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct CompleteBenchResult {
    pub jobs: usize,
    pub outcome_bytes: usize,
    pub replicas_online: usize,
    pub immediate: Timing,
    pub waiting: Timing,
    /// Median added by the wait.
    pub added_median_ms: f64,
}

impl CompleteBenchResult {
    pub fn render(&self) -> String {
        let row = |t: &Timing| {
            format!(
                "| {} | {:.3} | {:.3} | {:.3} | {} |\n",
                t.replica_acks, t.median_ms, t.p99_ms, t.mean_ms, t.unreplicated
            )
        };
        format!(
            "{} jobs per queue, {}-byte outcomes, {} replica(s) online\n\n\
             | replica_acks | median (ms) | p99 (ms) | mean (ms) | unreplicated |\n\
             |---|---|---|---|---|\n{}{}\nthe wait adds {:.3} ms per job (median)\n",
            self.jobs,
            self.outcome_bytes,
            self.replicas_online,
            row(&self.immediate),
            row(&self.waiting),
            self.added_median_ms
        )
    }
}

fn settings(replica_acks: u32, replica_ack_timeout_ms: u64) -> QueueSettings {
    QueueSettings {
        shards: 1,
        max_shards: 1,
        max_depth: usize::MAX / 2,
        max_deliveries: 3,
        lease_ttl_ms: 5000,
        result_ttl_ms: 60_000,
        read_block_ms: 100,
        replica_acks,
        replica_ack_timeout_ms,
    }
}

fn timing(replica_acks: u32, mut ms: Vec<f64>, unreplicated: usize) -> Timing {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    Timing {
        replica_acks,
        median_ms: at(0.5),
        p99_ms: at(0.99),
        mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
        unreplicated,
    }
}

pub fn run_complete(config: &CompleteBenchConfig) -> Result<CompleteBenchResult, String> {
    if config.jobs == 0 || config.replica_acks == 0 || config.replica_ack_timeout_ms == 0 {
        return Err(
            "--jobs, --replica-acks and --replica-ack-timeout-ms must be at least 1 (a WAIT with timeout 0 waits forever)"
                .into(),
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let connect = |acks| {
            RedisQueue::connect(
                &config.redis_url,
                settings(acks, config.replica_ack_timeout_ms),
                Duration::from_secs(10),
            )
        };
        let immediate = connect(0).await.map_err(|e| e.to_string())?;
        let waiting = connect(config.replica_acks)
            .await
            .map_err(|e| e.to_string())?;
        let replicas_online = immediate
            .replicas_online()
            .await
            .map_err(|e| e.to_string())?;
        let run = format!("{:x}", rand::random::<u64>());
        let outcome = StoredOutcome {
            request_sha256: String::new(),
            fhe_seconds: 0.0,
            outcome: JobOutcome::Done(vec![0x5a; config.outcome_bytes]),
        };
        let mut times = [Vec::new(), Vec::new()];
        let mut unreplicated = [0, 0];
        for i in 0..config.jobs {
            for (k, q) in [&immediate, &waiting].into_iter().enumerate() {
                let id = format!("bench-complete-{run}-{k}-{i}");
                let job = Job {
                    id: id.clone(),
                    client_job_id: id,
                    tenant: format!("bench-complete-{run}"),
                    session: "bench".into(),
                    model: "bench".into(),
                    module: "bench".into(),
                    key_id: "bench".into(),
                    request_sha256: String::new(),
                    rows: 1,
                    deadline_unix_ms: u64::MAX,
                    traceparent: None,
                    payload: vec![0; 64],
                };
                q.enqueue(&job).await.map_err(|e| e.to_string())?;
                let delivery = q
                    .read("bench", &[0], 1, 100)
                    .await
                    .map_err(|e| e.to_string())?
                    .pop()
                    .ok_or("the job just enqueued was not read")?;
                let started = Instant::now();
                let done = q
                    .complete(&delivery, &outcome)
                    .await
                    .map_err(|e| e.to_string())?;
                times[k].push(started.elapsed().as_secs_f64() * 1e3);
                if done == Completion::StoredUnreplicated {
                    unreplicated[k] += 1;
                }
            }
        }
        let [a, b] = times;
        let immediate = timing(0, a, unreplicated[0]);
        let waiting = timing(config.replica_acks, b, unreplicated[1]);
        Ok(CompleteBenchResult {
            jobs: config.jobs,
            outcome_bytes: config.outcome_bytes,
            replicas_online,
            added_median_ms: waiting.median_ms - immediate.median_ms,
            immediate,
            waiting,
        })
    })
}
