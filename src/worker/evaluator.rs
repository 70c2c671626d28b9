//! FHE evaluation on a dedicated thread pool.
//!
//! Evaluation takes milliseconds to seconds of CPU; on the actor system's thread it would stall
//! every other actor. The pool's queue is not bounded here: the queue reader admits at most
//! `worker.max_pending` jobs at a time, which is the bound in front of this actor.

use std::sync::Arc;
use std::time::Instant;

use actix::{Actor, Context, Handler, Message, ResponseFuture};
use tokio::sync::oneshot;

use super::{JobError, TestHooks, WorkerMetrics};
use crate::fhe::{EncryptedOutputs, EncryptedRows, ModuleProgram, SessionKey};

pub struct Evaluator {
    pool: Arc<rayon::ThreadPool>,
    /// `worker.max_job_bytes`: digit buffers of one evaluation.
    max_job_bytes: usize,
    metrics: Arc<WorkerMetrics>,
    hooks: Arc<TestHooks>,
}

impl Evaluator {
    pub fn new(
        threads: usize,
        max_job_bytes: usize,
        metrics: Arc<WorkerMetrics>,
        hooks: TestHooks,
    ) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("hyfhe-eval-{i}"))
            .build()
            .expect("spawning evaluator threads");
        Self {
            pool: Arc::new(pool),
            max_job_bytes,
            metrics,
            hooks: Arc::new(hooks),
        }
    }
}

impl Actor for Evaluator {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "Result<Evaluated, JobError>")]
pub struct Evaluate {
    /// The module's name (logs and injected faults).
    pub module: String,
    pub layer: Arc<ModuleProgram>,
    pub key: Arc<SessionKey>,
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
        let hooks = self.hooks.clone();
        self.pool.spawn(move || {
            let _enter = span.enter();
            let start = Instant::now();
            // A panic on a pool thread without a handler aborts the process (every job of the
            // worker lost, and the poison job redelivered to the next worker): catch it per job.
            // Nothing is shared mutably across the call, so unwinding leaves no broken state.
            let evaluation = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if hooks.panic_on_module.as_deref() == Some(msg.module.as_str()) {
                    panic!("injected fault evaluating `{}`", msg.module);
                }
                // Parallel iterators inside run on this pool: the caller's thread count holds.
                msg.layer.evaluate_within(&msg.key, &msg.rows, budget)
            }));
            let result = match evaluation {
                Ok(r) => r.map_err(|e| JobError::BadRequest(e.to_string())),
                Err(panic) => Err(JobError::Panicked(panic_message(panic.as_ref()))),
            };
            let seconds = start.elapsed().as_secs_f64();
            metrics.fhe_seconds.observe(seconds);
            let _ = tx.send(result.map(|outputs| Evaluated { outputs, seconds }));
        });
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(JobError::Internal("evaluator stopped".into())))
        })
    }
}

/// The text a panic was raised with.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
