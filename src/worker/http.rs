//! The worker's HTTP surface: `/metrics`, `/health/live`, `/health/ready` (holds shards).

use std::sync::Arc;

use actix_web::{web, HttpResponse};

use super::WorkerMetrics;

/// Routes of a worker's metrics server.
pub fn metrics_app(metrics: Arc<WorkerMetrics>) -> impl Fn(&mut web::ServiceConfig) + Clone {
    move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(web::Data::from(metrics.clone()))
            .route("/metrics", web::get().to(render))
            .route(
                "/health/live",
                web::get().to(|| async { HttpResponse::Ok().body("ok") }),
            )
            .route("/health/ready", web::get().to(ready));
    }
}

async fn render(metrics: web::Data<WorkerMetrics>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(metrics.render())
}

async fn ready(metrics: web::Data<WorkerMetrics>) -> HttpResponse {
    if metrics.shards_owned.get() > 0 {
        HttpResponse::Ok().body("ready")
    } else {
        HttpResponse::ServiceUnavailable().body("no shard leased yet")
    }
}
