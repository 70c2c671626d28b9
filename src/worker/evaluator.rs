//! FHE evaluation on a dedicated thread pool.
//!
//! Evaluation takes milliseconds to seconds of CPU; on the actor system's thread it would stall
//! every other actor. The pool's queue is not bounded here: the queue reader admits at most
//! `worker.max_pending` jobs at a time, which is the bound in front of this actor.

use std::sync::Arc;
use std::time::Instant;

use actix::{Actor, Context, Handler, Message, ResponseFuture};
use tokio::sync::oneshot;

use super::{JobError, WorkerMetrics};
use crate::fhe::{EncryptedOutputs, EncryptedRows, FourierPackingKey, ModuleProgram};

pub struct Evaluator {
    pool: Arc<rayon::ThreadPool>,
    /// `worker.max_job_bytes`: digit buffers of one evaluation.
    max_job_bytes: usize,
    metrics: Arc<WorkerMetrics>,
}

impl Evaluator {
    pub fn new(threads: usize, max_job_bytes: usize, metrics: Arc<WorkerMetrics>) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("hyfhe-eval-{i}"))
            .build()
            .expect("spawning evaluator threads");
        Self {
            pool: Arc::new(pool),
            max_job_bytes,
            metrics,
        }
    }
}

impl Actor for Evaluator {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "Result<Evaluated, JobError>")]
pub struct Evaluate {
    pub layer: Arc<ModuleProgram>,
    pub key: Arc<FourierPackingKey>,
    pub rows: EncryptedRows,
    /// The job's span: actor handlers run outside it, so the parent is passed along.
    pub parent: tracing::Span,
}

/// Outputs and the time the evaluation took (metered per tenant).
pub struct Evaluated {
    pub outputs: EncryptedOutputs,
    pub seconds: f64,
}

impl Handler<Evaluate> for Evaluator {
    type Result = ResponseFuture<Result<Evaluated, JobError>>;

    fn handle(&mut self, msg: Evaluate, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        let metrics = self.metrics.clone();
        let span = tracing::info_span!(parent: &msg.parent, "evaluate", rows = msg.rows.rows);
        let budget = self.max_job_bytes;
        self.pool.spawn(move || {
            let _enter = span.enter();
            let start = Instant::now();
            // Parallel iterators inside run on this pool: the caller's thread count holds.
            let result = msg
                .layer
                .evaluate_within(&msg.key, &msg.rows, budget)
                .map_err(|e| JobError::BadRequest(e.to_string()));
            let seconds = start.elapsed().as_secs_f64();
            metrics.fhe_seconds.observe(seconds);
            let _ = tx.send(result.map(|outputs| Evaluated { outputs, seconds }));
        });
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(JobError::Internal("evaluator thread panicked".into())))
        })
    }
}
