//! The worker: pulls encrypted layer jobs from the queue and evaluates them.
//!
//! Actors, one file each:
//! - [`QueueReader`]: reads new jobs from the leased shards and starts each on the job pipeline
//!   (`job_pipeline.rs`: module, key, evaluation, result); at most `max_pending` jobs at once. Its
//!   lease keeper (`lease_keeper.rs`) heartbeats, keeps shards with jobs in flight until they
//!   finish, refreshes those jobs' entries and claims a dead worker's pending ones.
//! - [`KeyCache`]: a session's evaluation key, fetched from the store and Fourier-transformed once,
//!   kept in a byte-bounded LRU; concurrent misses for one key share one load.
//! - [`ModuleCache`]: every served module's weights, Fourier-transformed at start.
//! - [`Evaluator`]: runs FHE evaluation on its own thread pool, never on the actor system's.
//! - [`ResultWriter`]: stores the outcome under the job id and acknowledges the entry.

mod evaluator;
mod http;
mod in_flight;
mod job_pipeline;
mod key_cache;
mod lease_keeper;
mod metrics;
mod module_cache;
mod queue_reader;
mod result_writer;

use std::sync::Arc;

use actix::{Actor, Addr};

pub use evaluator::Evaluator;
pub use http::metrics_app;
pub use key_cache::{GetKey, GetKeyCacheStats, KeyCache, KeyCacheStats};
pub use metrics::WorkerMetrics;
pub use module_cache::{ModuleCache, ModuleSet};
pub use queue_reader::{Leave, QueueReader, ReaderStats, Stats};
pub use result_writer::ResultWriter;

use crate::config::Config;
use crate::protocol::ErrorCode;
use crate::queue::Broker;

/// Why a job could not be evaluated.
#[derive(Clone, Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    NotFound(String),
    /// The session's evaluation key is not in the store although the session is: it expired,
    /// or a Redis failover kept the session record but not the blob stored after it. Answered
    /// as `session_not_found`, so that the client opens a new session with the same keys (which
    /// stores the blob again) and retries.
    #[error("{0}")]
    KeyMissing(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Internal(String),
    /// The evaluation panicked (a bug): final at once, never redelivered.
    #[error("{0}")]
    Panicked(String),
    /// Not the job's fault (Redis unreachable, a key blob that could not be read): the job is
    /// left pending and redelivered, never completed with this.
    #[error("{0}")]
    Transient(String),
}

impl JobError {
    /// The final outcome's code; `None` for a transient failure, which has no final outcome.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            JobError::NotFound(_) => Some(ErrorCode::NotFound),
            JobError::KeyMissing(_) => Some(ErrorCode::SessionNotFound),
            JobError::BadRequest(_) => Some(ErrorCode::BadRequest),
            JobError::Internal(_) | JobError::Panicked(_) => Some(ErrorCode::Internal),
            JobError::Transient(_) => None,
        }
    }
}

/// A running worker's actors.
pub struct WorkerHandle {
    pub id: String,
    pub reader: Addr<QueueReader>,
    pub keys: Addr<KeyCache>,
    pub metrics: Arc<WorkerMetrics>,
}

/// Faults a test injects into a worker (never set by a served path).
#[doc(hidden)]
#[derive(Clone, Debug, Default)]
pub struct TestHooks {
    /// Evaluating this module panics on the evaluator's thread, as a bug in an engine would.
    pub panic_on_module: Option<String>,
}

/// Start a worker's actors on the current actix system.
pub fn start(config: &Config, broker: Arc<dyn Broker>, modules: Arc<ModuleSet>) -> WorkerHandle {
    start_with_hooks(config, broker, modules, TestHooks::default())
}

/// [`start`] with injected faults.
#[doc(hidden)]
pub fn start_with_hooks(
    config: &Config,
    broker: Arc<dyn Broker>,
    modules: Arc<ModuleSet>,
    hooks: TestHooks,
) -> WorkerHandle {
    let id = if config.worker.id.is_empty() {
        default_worker_id()
    } else {
        config.worker.id.clone()
    };
    let metrics = Arc::new(WorkerMetrics::default());
    let threads = match config.worker.evaluator_threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let keys = KeyCache::new(
        broker.clone(),
        config.worker.key_cache_bytes,
        metrics.clone(),
    )
    .start();
    let module_cache = ModuleCache::new(modules).start();
    let evaluator = Evaluator::new(
        threads,
        config.worker.max_job_bytes as usize,
        metrics.clone(),
        hooks,
    )
    .start();
    let writer = ResultWriter::new(broker.clone(), metrics.clone()).start();
    let reader = QueueReader::new(
        id.clone(),
        broker,
        config.worker.clone(),
        config.queue.max_deliveries,
        keys.clone(),
        module_cache,
        evaluator,
        writer,
        metrics.clone(),
    )
    .start();
    WorkerHandle {
        id,
        reader,
        keys,
        metrics,
    }
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}
