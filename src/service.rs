//! Assembling the services from a [`Config`]: the broker, the coordinator, the worker, and both
//! in one process (`hyfhe serve`). Everything here must run inside an actix `System`.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer};

use crate::config::{Config, QueueBackend};
use crate::coordinator::{Application, Catalog};
use crate::hybrid::HybridError;
use crate::queue::{Broker, MemoryQueue, QueueError, RedisQueue, StoreAudit};
use crate::worker::{self, ModuleSet, WorkerHandle};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("loading models: {0}")]
    Models(#[from] HybridError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the store audit reads Redis; queue.backend is `memory`, which keeps nothing past its process")]
    NotRedis,
    #[error("no tenant is configured, so no client could use this coordinator: add [[tenants]] to the config, or set HYFHE_TENANTS_FILE=path or HYFHE_TENANTS=name:sha256hex (`hyfhe keys hash KEY` prints the hash)")]
    NoTenants,
}

/// The configured queue and session store.
pub async fn connect_broker(config: &Config) -> Result<Arc<dyn Broker>, ServiceError> {
    Ok(match config.queue.backend {
        QueueBackend::Memory => Arc::new(MemoryQueue::new(config.queue_settings())),
        QueueBackend::Redis => Arc::new(connect_redis(config).await?),
    })
}

/// The PEM file of the CA Redis's certificate must chain to; `None`: the system's roots.
fn redis_ca(config: &Config) -> Option<&Path> {
    (!config.queue.redis_ca_cert.is_empty()).then(|| Path::new(&config.queue.redis_ca_cert))
}

async fn connect_redis(config: &Config) -> Result<RedisQueue, ServiceError> {
    Ok(RedisQueue::connect_with_ca(
        &config.queue.redis_url,
        redis_ca(config),
        config.queue_settings(),
        Duration::from_millis(config.queue.connect_timeout_ms),
    )
    .await?)
}

/// `hyfhe store audit`: the configured Redis's sessions, key references and bills.
pub async fn audit_store(config: &Config) -> Result<StoreAudit, ServiceError> {
    if config.queue.backend != QueueBackend::Redis {
        return Err(ServiceError::NotRedis);
    }
    // Read-only: an audit run with another config must not grow the cluster's shards.
    let queue = RedisQueue::connect_read_only(
        &config.queue.redis_url,
        redis_ca(config),
        config.queue_settings(),
        Duration::from_millis(config.queue.connect_timeout_ms),
    )
    .await?;
    Ok(queue.audit().await?)
}

pub fn bind(addr: &str) -> Result<TcpListener, ServiceError> {
    TcpListener::bind(addr).map_err(|source| ServiceError::Listen {
        addr: addr.to_string(),
        source,
    })
}

/// The coordinator on `config.coordinator.listen` (its `/metrics` on `metrics_listen`).
pub async fn coordinator(config: Config) -> Result<Application, ServiceError> {
    if config.tenants.is_empty() {
        return Err(ServiceError::NoTenants);
    }
    let broker = connect_broker(&config).await?;
    let catalog = Arc::new(Catalog::load(&config.models.dir)?);
    let listener = bind(&config.coordinator.listen)?;
    let metrics_listener = bind(&config.coordinator.metrics_listen)?;
    Ok(Application::build(
        config,
        broker,
        catalog,
        listener,
        metrics_listener,
        None,
    )?)
}

/// A worker with its metrics server on `config.worker.listen`; returns its handle and the
/// metrics server (await it to run until stopped).
pub async fn worker(
    config: Config,
) -> Result<(WorkerHandle, actix_web::dev::Server, u16), ServiceError> {
    let broker = connect_broker(&config).await?;
    let dir = config.models.dir.clone();
    let modules = tokio::task::spawn_blocking(move || ModuleSet::load(&dir))
        .await
        .map_err(|e| ServiceError::Io(std::io::Error::other(e)))??;
    tracing::info!(modules = modules.len(), "modules loaded");
    let handle = worker::start(&config, broker, Arc::new(modules));
    let listener = bind(&config.worker.listen)?;
    let port = listener.local_addr()?.port();
    let routes = worker::metrics_app(handle.metrics.clone());
    let server = HttpServer::new(move || App::new().configure(routes.clone()))
        .workers(1)
        .listen(listener)?
        .run();
    Ok((handle, server, port))
}

/// Coordinator and worker in one process over one broker (`hyfhe serve`).
pub struct Embedded {
    pub app: Application,
    pub worker: WorkerHandle,
}

pub async fn embedded(
    config: Config,
    model_dir: &Path,
    listener: TcpListener,
) -> Result<Embedded, ServiceError> {
    if config.tenants.is_empty() {
        return Err(ServiceError::NoTenants);
    }
    let metrics_listener = bind(&config.coordinator.metrics_listen)?;
    let broker = connect_broker(&config).await?;
    let dir = model_dir.to_path_buf();
    let (catalog, modules) = tokio::task::spawn_blocking(move || {
        // Each model is read and verified once, for both roles.
        let models =
            crate::hybrid::CompiledModules::load_all(&dir, crate::hybrid::Trees::ClientAndServer)?;
        Ok::<_, HybridError>((
            Catalog::from_models(&models)?,
            ModuleSet::from_models(&models)?,
        ))
    })
    .await
    .map_err(|e| ServiceError::Io(std::io::Error::other(e)))??;
    let worker = worker::start(&config, broker.clone(), Arc::new(modules));
    let app = Application::build(
        config,
        broker,
        Arc::new(catalog),
        listener,
        metrics_listener,
        Some(worker.metrics.clone()),
    )?;
    Ok(Embedded { app, worker })
}

/// An embedded server on its own thread and actix system, for in-process callers (`hyfhe demo`,
/// benches): its actors never share a thread with the caller's work.
pub struct EmbeddedThread {
    pub port: u16,
    server: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EmbeddedThread {
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            let server = self.server.clone();
            // Stopping the HTTP server ends the thread's `block_on`, which drops its system. The
            // stop future needs a runtime of its own: on a plain thread, so that this also works
            // when dropped inside someone else's runtime.
            let _ = std::thread::spawn(move || {
                actix_web::rt::System::new().block_on(server.stop(true))
            })
            .join();
            let _ = thread.join();
        }
    }
}

impl Drop for EmbeddedThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Start `hyfhe serve`'s coordinator and worker on a new thread; returns once it listens.
pub fn spawn_embedded(
    config: Config,
    model_dir: std::path::PathBuf,
) -> Result<EmbeddedThread, ServiceError> {
    let listener = bind(&config.coordinator.listen)?;
    let port = listener.local_addr()?.port();
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("hyfhe-embedded".into())
        .spawn(move || {
            let system = actix_web::rt::System::with_tokio_rt(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .expect("building a tokio runtime")
            });
            system.block_on(async move {
                match embedded(config, &model_dir, listener).await {
                    Ok(e) => {
                        let _ = tx.send(Ok(e.app.handle()));
                        let _keep_worker = e.worker;
                        let _ = e.app.run_until_stopped().await;
                    }
                    Err(err) => {
                        let _ = tx.send(Err(err));
                    }
                }
            });
        })?;
    let server = rx
        .recv()
        .map_err(|_| ServiceError::Io(std::io::Error::other("embedded server thread died")))??;
    Ok(EmbeddedThread {
        port,
        server,
        thread: Some(thread),
    })
}
