//! The coordinator: the HTTP API clients talk to. It authenticates tenants, keeps sessions,
//! admits compute requests, queues them as jobs and answers with the worker's result. It never
//! looks inside a ciphertext beyond checking its dimensions against the module's plan.
//!
//! - [`routes`]: one file per resource.
//! - [`actors`]: [`actors::SessionRegistry`], [`actors::Dispatcher`] (admission, enqueue,
//!   deadline), [`actors::ResultRouter`] (one completion subscription per coordinator).

pub mod actors;
mod catalog;
pub mod error;
mod metrics;
pub mod routes;

use std::net::TcpListener;
use std::sync::Arc;

use actix::Actor;
use actix_web::dev::{Server, Service};
use actix_web::{web, App, HttpServer};
use tracing::Instrument;

pub use catalog::{Catalog, ServedModel};
pub use metrics::CoordinatorMetrics;

use crate::config::Config;
use crate::protocol::TRACEPARENT_HEADER;
use crate::queue::Broker;
use crate::worker::WorkerMetrics;
use actors::{Dispatcher, ResultRouter, SessionRegistry};

/// What every route can reach.
pub struct AppState {
    pub config: Config,
    pub catalog: Arc<Catalog>,
    pub broker: Arc<dyn Broker>,
    pub sessions: actix::Addr<SessionRegistry>,
    pub dispatcher: actix::Addr<Dispatcher>,
    pub metrics: Arc<CoordinatorMetrics>,
    /// In the embedded mode, the in-process worker's metrics are served here too.
    pub worker_metrics: Option<Arc<WorkerMetrics>>,
}

pub struct Application {
    port: u16,
    server: Server,
}

impl Application {
    /// Start the actors on the current actix system and serve on `listener` (port 0 allowed).
    pub fn build(
        config: Config,
        broker: Arc<dyn Broker>,
        catalog: Arc<Catalog>,
        listener: TcpListener,
        worker_metrics: Option<Arc<WorkerMetrics>>,
    ) -> std::io::Result<Self> {
        let port = listener.local_addr()?.port();
        let metrics = Arc::new(CoordinatorMetrics::default());
        let router = ResultRouter::new(broker.clone()).start();
        let dispatcher = Dispatcher::new(
            broker.clone(),
            router,
            config.coordinator.max_in_flight,
            config.coordinator.retry_after_s,
            metrics.clone(),
        )
        .start();
        let sessions = SessionRegistry::new(broker.clone(), config.sessions.ttl_s).start();
        let state = web::Data::new(AppState {
            config,
            catalog,
            broker,
            sessions,
            dispatcher,
            metrics,
            worker_metrics,
        });
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
        .listen(listener)?
        .run();
        Ok(Self { port, server })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

fn routes_config(cfg: &mut web::ServiceConfig) {
    use routes::{compute, health, metrics, models, sessions};
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
        .route("/metrics", web::get().to(metrics::render))
        .default_service(web::to(routes::not_found));
}
