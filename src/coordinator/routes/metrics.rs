//! `GET /metrics` (Prometheus text), on the coordinator's metrics listener.

use actix_web::{web, HttpResponse};

use crate::coordinator::AppState;

pub async fn render(state: web::Data<AppState>) -> HttpResponse {
    let depth = state.broker.depth().await.ok();
    let lag = match state.broker.shard_lag().await {
        Ok(lag) => Some(lag),
        Err(e) => {
            // The autoscaler's signal is missing from this scrape: say why.
            tracing::warn!(error = %e, "queue lag unavailable for /metrics");
            None
        }
    };
    let workers = state.broker.live_workers().await.ok();
    let mut bills = Vec::new();
    for tenant in &state.config.tenants {
        if let Ok(bill) = state.broker.bill(&tenant.name).await {
            bills.push((tenant.name.clone(), bill));
        }
    }
    let mut text = state
        .metrics
        .render(depth, lag.as_deref(), workers, &state.usage, &bills);
    if let Some(w) = &state.worker_metrics {
        text.push_str(&w.render());
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text)
}
