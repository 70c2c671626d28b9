//! `GET /health/live` (the process answers) and `GET /health/ready` (the queue is reachable and at
//! least one worker is alive).

use actix_web::{web, HttpResponse};

use crate::coordinator::error::ApiError;
use crate::coordinator::AppState;
use crate::protocol::ErrorCode;

pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "live" }))
}

pub async fn ready(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state.broker.ping().await?;
    let workers = state.broker.live_workers().await?;
    if workers == 0 {
        return Err(ApiError::new(ErrorCode::Unavailable, "no live worker").retry_after(1));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ready", "workers": workers })))
}
