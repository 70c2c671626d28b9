//! `POST /v1/sessions` and `DELETE /v1/sessions/{id}`.

use actix_web::{web, HttpRequest, HttpResponse};

use super::{read_body, session_token, tenant};
use crate::coordinator::actors::{Authorize, CreateSession, DeleteSession};
use crate::coordinator::error::ApiError;
use crate::coordinator::AppState;
use crate::fhe::{decode, EvaluationKey};
use crate::protocol;

pub async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let tenant = tenant(&req, &state)?;
    let limit = state.config.coordinator.max_session_bytes;
    let body = read_body(&req, payload, limit).await?;
    let request: protocol::CreateSession = rmp_serde::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed session request (msgpack): {e}")))?;
    let model = state.catalog.get(&request.model).ok_or_else(|| {
        ApiError::not_found(format!("no model `{}` is served here", request.model))
    })?;
    let mut keys = Vec::new();
    for (i, blob) in request.keys.iter().enumerate() {
        let key: EvaluationKey =
            decode(blob, limit).map_err(|e| ApiError::bad_request(format!("keys[{i}]: {e}")))?;
        keys.push((key.precision.to_string(), blob.to_vec()));
    }
    for precision in model.precisions() {
        if !keys.iter().any(|(p, _)| *p == precision.to_string()) {
            return Err(ApiError::bad_request(format!(
                "model `{}` needs an evaluation key of {precision} precision; none was sent",
                request.model
            )));
        }
    }
    let created = state
        .sessions
        .send(CreateSession {
            tenant,
            model: request.model,
            keys,
        })
        .await??;
    state.metrics.sessions_created.inc();
    Ok(HttpResponse::Created().json(created))
}

pub async fn delete(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let tenant = tenant(&req, &state)?;
    let id = path.into_inner();
    state
        .sessions
        .send(Authorize {
            id: id.clone(),
            tenant,
            token: session_token(&req),
        })
        .await??;
    state.sessions.send(DeleteSession { id }).await??;
    state.metrics.sessions_deleted.inc();
    Ok(HttpResponse::NoContent().finish())
}
