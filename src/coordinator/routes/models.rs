//! `GET /v1/models` and `GET /v1/models/{model}/client`.

use actix_web::{web, HttpRequest, HttpResponse};

use super::tenant;
use crate::coordinator::catalog::Catalog;
use crate::coordinator::error::ApiError;
use crate::coordinator::AppState;
use crate::protocol::{ModelList, MSGPACK};

pub async fn list(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let tenant = tenant(&req, &state)?;
    let models = state
        .catalog
        .models
        .iter()
        .filter(|(name, _)| state.config.may_use(&tenant, name))
        .map(|(_, m)| {
            let mut info = m.info.clone();
            for module in &mut info.modules {
                module.max_rows = m.specs.get(&module.name).and_then(|spec| {
                    Catalog::module_max_rows(spec, state.config.worker.max_job_bytes)
                        .map(|r| r.min(u32::MAX as usize) as u32)
                });
            }
            info
        })
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
    let tenant = tenant(&req, &state)?;
    let model = state
        .catalog
        .get(&path)
        .filter(|_| state.config.may_use(&tenant, &path))
        .ok_or_else(|| super::sessions::no_such_model(&path))?;
    Ok(HttpResponse::Ok()
        .content_type(MSGPACK)
        .body(model.bundle.clone()))
}
