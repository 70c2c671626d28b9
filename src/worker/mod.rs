//! The worker: pulls encrypted layer jobs from the queue and evaluates them.
//!
//! Actors, one file each:
//! - [`QueueReader`]: heartbeats (shard leases), claims a dead worker's pending entries, reads new
//!   jobs, and drives each job through the others; at most `max_pending` jobs at once.
//! - [`KeyCache`]: a session's evaluation key, fetched from the store and Fourier-transformed once,
//!   kept in a byte-bounded LRU; concurrent misses for one key share one load.
//! - [`ModuleCache`]: every served module's weights, Fourier-transformed at start.
//! - [`Evaluator`]: runs FHE evaluation on its own thread pool, never on the actor system's.
//! - [`ResultWriter`]: stores the outcome under the job id and acknowledges the entry.

mod evaluator;
mod http;
mod key_cache;
mod metrics;
mod module_cache;
mod queue_reader;
mod result_writer;

use std::sync::Arc;

use actix::{Actor, Addr};

pub use evaluator::Evaluator;
pub use http::metrics_app;
pub use key_cache::KeyCache;
pub use metrics::WorkerMetrics;
pub use module_cache::{ModuleCache, ModuleSet};
pub use queue_reader::{Leave, QueueReader};
pub use result_writer::ResultWriter;

use crate::config::Config;
use crate::protocol::ErrorCode;
use crate::queue::Broker;

/// Why a job could not be evaluated; becomes a failed outcome with the code's name.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Internal(String),
}

impl JobError {
    pub fn code(&self) -> ErrorCode {
        match self {
            JobError::NotFound(_) => ErrorCode::NotFound,
            JobError::BadRequest(_) => ErrorCode::BadRequest,
            JobError::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// A running worker's actors.
pub struct WorkerHandle {
    pub id: String,
    pub reader: Addr<QueueReader>,
    pub metrics: Arc<WorkerMetrics>,
}

/// Start a worker's actors on the current actix system.
pub fn start(config: &Config, broker: Arc<dyn Broker>, modules: Arc<ModuleSet>) -> WorkerHandle {
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
    let evaluator = Evaluator::new(threads, metrics.clone()).start();
    let writer = ResultWriter::new(broker.clone(), metrics.clone()).start();
    let reader = QueueReader {
        id: id.clone(),
        broker,
        settings: config.worker.clone(),
        max_deliveries: config.queue.max_deliveries,
        keys,
        modules: module_cache,
        evaluator,
        writer,
        metrics: metrics.clone(),
    }
    .start();
    WorkerHandle {
        id,
        reader,
        metrics,
    }
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}
