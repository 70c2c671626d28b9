//! `GET /v1/models` and `GET /v1/models/{model}/client`.

use actix_web::{web, HttpRequest, HttpResponse};

use super::tenant;
use crate::coordinator::error::ApiError;
use crate::coordinator::AppState;
use crate::protocol::{ModelList, MSGPACK};

pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    tenant(&req, &state)?;
    let models = state
        .catalog
        .models
        .values()
        .map(|m| m.info.clone())
        .collect();
    Ok(HttpResponse::Ok().json(ModelList {
        models,
        max_job_values: state.config.coordinator.max_job_values,
    }))
}

pub async fn client_tree(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    tenant(&req, &state)?;
    let model = state
        .catalog
        .get(&path)
        .ok_or_else(|| ApiError::not_found(format!("no model `{path}` is served here")))?;
    Ok(HttpResponse::Ok()
        .content_type(MSGPACK)
        .body(model.bundle.clone()))
}
