//! The coordinator: the HTTP API clients talk to. It authenticates tenants, keeps sessions,
//! admits compute requests, queues them as jobs and answers with the worker's result. It never
//! looks inside a ciphertext beyond checking its dimensions against the module's plan.
//!
//! - [`routes`]: one file per resource.
//! - [`actors`]: [`actors::SessionRegistry`], [`actors::Dispatcher`] (once per idempotency key,
//!   enqueue, deadline), [`actors::ResultRouter`] (one completion subscription per coordinator).
//! - `admission`: in-flight and session-creation bounds, global and per tenant, decided before a
//!   body is read.
//! - `usage`: per-tenant metering on `/metrics`.
//!
//! `/metrics` is served on its own listener (`coordinator.metrics_listen`), never on the API's.

pub mod actors;
mod admission;
mod catalog;
pub mod error;
mod metrics;
pub mod routes;
mod usage;

use std::net::TcpListener;
use std::sync::Arc;

use actix::Actor;
use actix_web::dev::{Server, Service};
use actix_web::{web, App, HttpServer};
use tracing::Instrument;

pub use admission::{Admission, ComputePermit};
pub use catalog::{Catalog, ServedModel};
pub use metrics::CoordinatorMetrics;
pub use usage::{TenantMeter, UsageMeters};

use crate::config::Config;
use crate::protocol::TRACEPARENT_HEADER;
use crate::queue::Broker;
use crate::worker::WorkerMetrics;

use actors::{Dispatcher, ResultRouter, SessionRegistry};

/// How long a tenant's in-flight slot outlives a request's longest life (twice the request
/// timeout: body read, then the wait).
const SLOT_LEASE_MARGIN_MS: u64 = 5_000;

/// What every route can reach.
pub struct AppState {
    pub config: Config,
    pub catalog: Arc<Catalog>,
    pub broker: Arc<dyn Broker>,
    pub sessions: actix::Addr<SessionRegistry>,
    pub dispatcher: actix::Addr<Dispatcher>,
    pub metrics: Arc<CoordinatorMetrics>,
    pub admission: Admission,
    pub usage: UsageMeters,
    /// In the embedded mode, the in-process worker's metrics are served here too.
    pub worker_metrics: Option<Arc<WorkerMetrics>>,
}

impl AppState {
    /// The session request body limit: `coordinator.max_session_bytes`, or when that is 0 what
    /// the served models' keys need.
    pub fn session_bytes_limit(&self) -> usize {
        match self.config.coordinator.max_session_bytes {
            0 => self.catalog.max_session_bytes(),
            n => n,
        }
    }
}

pub struct Application {
    port: u16,
    tls: bool,
    metrics_port: u16,
    server: Server,
    metrics_server: actix_web::dev::ServerHandle,
}

impl Application {
    /// Start the actors on the current actix system and serve the API on `listener` and
    /// `/metrics` on `metrics_listener` (port 0 allowed for both).
    pub fn build(
        config: Config,
        broker: Arc<dyn Broker>,
        catalog: Arc<Catalog>,
        listener: TcpListener,
        metrics_listener: TcpListener,
        worker_metrics: Option<Arc<WorkerMetrics>>,
    ) -> std::io::Result<Self> {
        let port = listener.local_addr()?.port();
        // TLS on the API listener itself when configured (or behind a terminating proxy).
        let tls = match config.coordinator.tls_files() {
            Some((cert, key)) => Some(
                crate::tls::server_config(cert, key)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            ),
            None => None,
        };
        let metrics_port = metrics_listener.local_addr()?.port();
        let metrics = Arc::new(CoordinatorMetrics::default());
        let router = ResultRouter::new(broker.clone()).start();
        let dispatcher = Dispatcher::new(
            broker.clone(),
            router,
            config.coordinator.retry_after_s,
            metrics.clone(),
        )
        .start();
        let admission = Admission::new(
            config.coordinator.max_in_flight,
            config.coordinator.max_session_creations,
            broker.clone(),
            // A request's body read and its wait are each bounded by the request timeout; the
            // lease outlives both by a margin for the give-back.
            2 * config.coordinator.request_timeout_ms + SLOT_LEASE_MARGIN_MS,
            config.coordinator.retry_after_s,
        );
        let sessions = SessionRegistry::new(broker.clone(), config.sessions.ttl_s).start();
        let header_timeout = std::time::Duration::from_millis(config.coordinator.header_timeout_ms);
        let state = web::Data::new(AppState {
            config,
            catalog,
            broker,
            sessions,
            dispatcher,
            metrics,
            admission,
            usage: UsageMeters::default(),
            worker_metrics,
        });
        let metrics_state = state.clone();
        let metrics_server = HttpServer::new(move || {
            App::new()
                .app_data(metrics_state.clone())
                .route("/metrics", web::get().to(routes::metrics::render))
                .default_service(web::to(routes::not_found))
        })
        .workers(1)
        .listen(metrics_listener)?
        .run();
        // A server runs once polled: the metrics one on its own task, the API one when the
        // caller awaits `run_until_stopped`.
        let metrics_handle = metrics_server.handle();
        actix_web::rt::spawn(metrics_server);
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .wrap_fn(|req, srv| {
                    // One span per request, child of the caller's trace when it sent one.
                    let span =
                        tracing::info_span!("http", method = %req.method(), path = %req.path());
                    let parent = req
                        .headers()
                        .get(TRACEPARENT_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    crate::telemetry::set_parent(&span, parent.as_deref());
                    srv.call(req).instrument(span)
                })
                .configure(routes_config)
        })
        // actix's default (5 s) is too short on a saturated machine: the only 408 this server
        // sends came back to a test with 16 clients generating keys on 2 cores, whose request
        // heads the server's threads did not get to read in time.
        .client_request_timeout(header_timeout);
        let served = tls.is_some();
        let server = match tls {
            Some(tls) => server.listen_rustls_0_23(listener, tls)?,
            None => server.listen(listener)?,
        }
        .run();
        Ok(Self {
            port,
            tls: served,
            metrics_port,
            server,
            metrics_server: metrics_handle,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https` when the API listener speaks TLS itself, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    /// Stops the API server; the metrics server stops with it (see [`Self::run_until_stopped`]).
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        self.metrics_server.stop(true).await;
        result
    }
}

fn routes_config(cfg: &mut web::ServiceConfig) {
    use routes::{compute, health, models, sessions};
    cfg.route("/v1/models", web::get().to(models::list))
        .route(
            "/v1/models/{model}/client",
            web::get().to(models::client_tree),
        )
        .route("/v1/sessions", web::post().to(sessions::create))
        .route("/v1/sessions/{id}", web::delete().to(sessions::delete))
        .route(
            "/v1/sessions/{id}/modules/{module}/compute",
            web::post().to(compute::compute),
        )
        .route("/health/live", web::get().to(health::live))
        .route("/health/ready", web::get().to(health::ready))
        .default_service(web::to(routes::not_found));
}
