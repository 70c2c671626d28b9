//! HTTP routes, one file per resource, and the request helpers they share.

pub mod compute;
pub mod health;
pub mod metrics;
pub mod models;
pub mod sessions;

use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;

use super::error::ApiError;
use super::AppState;
use crate::protocol::{ErrorCode, SESSION_TOKEN_HEADER};

/// The tenant whose API key is in `Authorization: Bearer …`.
pub fn tenant(req: &HttpRequest, state: &AppState) -> Result<String, ApiError> {
    let key = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "missing API key: send `Authorization: Bearer <key>`",
            )
        })?;
    state
        .config
        .tenant_for_key(key.trim())
        .map(|t| t.name.clone())
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "unknown API key"))
}

pub fn session_token(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get(SESSION_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The request body, refused with 413 as soon as it passes `limit` (declared or streamed), so
/// an oversized upload is never buffered whole.
pub async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    let too_large = |n: usize| {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("request body of {n} bytes exceeds the limit of {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = declared.filter(|&n| n > limit) {
        return Err(too_large(n));
    }
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large(body.len() + chunk.len()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Unknown routes answer in the API's error format too.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        ErrorCode::NotFound,
        format!("no route {} {}", req.method(), req.path()),
    ))
}
