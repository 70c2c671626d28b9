//! `POST /v1/sessions` and `DELETE /v1/sessions/{id}`.

use actix_web::{web, HttpRequest, HttpResponse};

use super::{read_body, session_token, tenant};
use crate::coordinator::actors::{Authorize, CreateSession, DeleteSession};
use crate::coordinator::error::ApiError;
use crate::coordinator::AppState;
use crate::fhe::{decode, EvaluationKey};
use crate::protocol::{self, ErrorCode};

pub async fn create(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let result = open(&req, &state, payload).await;
    if let Err(e) = &result {
        if matches!(
            e.code,
            ErrorCode::TooManyRequests | ErrorCode::QuotaExceeded
        ) {
            state.metrics.rejected_quota.inc();
        }
    }
    result
}

async fn open(
    req: &HttpRequest,
    state: &AppState,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let tenant = tenant(req, state)?;
    // Both checks before the ~100 MiB body is read.
    let _permit = state.admission.session()?;
    let quota = state.config.quota_of(&tenant);
    let usage = state.broker.tenant_usage(&tenant).await?;
    let retry_after = state.config.coordinator.retry_after_s;
    if usage.sessions >= quota.sessions {
        return Err(ApiError::new(
            ErrorCode::QuotaExceeded,
            format!(
                "tenant `{tenant}` holds {} sessions, its quota is {}: close one (DELETE /v1/sessions/ID) or wait for one to expire",
                usage.sessions, quota.sessions
            ),
        )
        .retry_after(retry_after));
    }
    let limit = state.config.coordinator.max_session_bytes;
    let body = read_body(req, payload, limit).await?;
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
    let key_bytes: u64 = keys.iter().map(|(_, b)| b.len() as u64).sum();
    if usage.key_bytes + key_bytes > quota.key_bytes {
        return Err(ApiError::new(
            ErrorCode::QuotaExceeded,
            format!(
                "tenant `{tenant}` holds {} bytes of evaluation keys; {key_bytes} more would pass its quota of {}",
                usage.key_bytes, quota.key_bytes
            ),
        )
        .retry_after(retry_after));
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
            key_bytes,
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
    let record = state
        .sessions
        .send(Authorize {
            id,
            tenant,
            token: session_token(&req),
        })
        .await??;
    state.sessions.send(DeleteSession { record }).await??;
    state.metrics.sessions_deleted.inc();
    Ok(HttpResponse::NoContent().finish())
}
