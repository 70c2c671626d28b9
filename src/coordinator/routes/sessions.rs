//! `POST /v1/sessions` and `DELETE /v1/sessions/{id}`.

use actix_web::{web, HttpRequest, HttpResponse};

use super::{read_body, session_token, tenant};
use crate::coordinator::actors::{over_quota, Authorize, CreateSession, DeleteSession};
use crate::coordinator::error::ApiError;
use crate::coordinator::AppState;
use crate::fhe::{decode, EvaluationKey};
use crate::protocol::{self, ErrorCode};
use crate::queue::SessionQuota;

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
    // Both checks before the ~100 MiB body is read (the quota is checked again, atomically with
    // the creation, once the body is in).
    let _permit = state.admission.session()?;
    let quota = state.config.quota_of(&tenant);
    let quota = SessionQuota {
        sessions: quota.sessions,
        key_bytes: quota.key_bytes,
    };
    let usage = state.broker.tenant_usage(&tenant).await?;
    let retry_after = state.config.coordinator.retry_after_s;
    if usage.sessions >= quota.sessions {
        return Err(over_quota(&tenant, &usage, 0, quota).retry_after(retry_after));
    }
    let limit = state.session_bytes_limit();
    let body = read_body(req, payload, limit).await.map_err(|e| {
        if e.code != ErrorCode::PayloadTooLarge {
            return e;
        }
        let needs: Vec<String> = state
            .catalog
            .models
            .iter()
            .map(|(name, m)| format!("`{name}` {} bytes", m.session_bytes()))
            .collect();
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "{}; a session request carries the model's evaluation keys, which need at most: {} (coordinator.max_session_bytes, 0 = sized from the served models)",
                e.message,
                needs.join(", ")
            ),
        )
    })?;
    let request: protocol::CreateSession = rmp_serde::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("malformed session request (msgpack): {e}")))?;
    let model = state
        .catalog
        .get(&request.model)
        .filter(|_| state.config.may_use(&tenant, &request.model))
        .ok_or_else(|| no_such_model(&request.model))?;
    let mut keys = Vec::new();
    for (i, blob) in request.keys.iter().enumerate() {
        let key: EvaluationKey =
            decode(blob, limit).map_err(|e| ApiError::bad_request(format!("keys[{i}]: {e}")))?;
        keys.push((key.precision.to_string(), blob.to_vec()));
    }
    let key_bytes: u64 = keys.iter().map(|(_, b)| b.len() as u64).sum();
    if usage.key_bytes + key_bytes > quota.key_bytes {
        return Err(over_quota(&tenant, &usage, key_bytes, quota).retry_after(retry_after));
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
            quota,
            retry_after_s: retry_after,
        })
        .await??;
    state.metrics.sessions_created.inc();
    Ok(HttpResponse::Created().json(created))
}

/// The same answer for a model that is not served and one the tenant may not use: a tenant
/// learns nothing of other tenants' models.
pub fn no_such_model(name: &str) -> ApiError {
    ApiError::not_found(format!("no model `{name}` is served here"))
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
