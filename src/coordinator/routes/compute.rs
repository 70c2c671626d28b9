//! `POST /v1/sessions/{id}/modules/{module}/compute`: encrypted rows in, encrypted outputs out.

use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};

use super::{read_body, session_token, tenant};
use crate::coordinator::actors::{Authorize, DeleteSession, Dispatch, RowBudget};
use crate::coordinator::catalog::Catalog;
use crate::coordinator::error::ApiError;
use crate::coordinator::AppState;
use crate::fhe::{decode, EncryptedRows};
use crate::hybrid::sha256_hex;
use crate::protocol::{
    check_rows, is_valid_job_id, ErrorCode, JOB_ID_HEADER, MSGPACK, TRACEPARENT_HEADER,
};
use crate::queue::{now_unix_ms, scoped_job_id, Job, JobOutcome};

pub async fn compute(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    state.metrics.compute_requests.inc();
    let result = handle(&req, &state, path.into_inner(), payload).await;
    state
        .metrics
        .compute_seconds
        .observe(start.elapsed().as_secs_f64());
    match &result {
        Ok(_) => state.metrics.compute_ok.inc(),
        Err(e) => {
            state.metrics.compute_errors.inc();
            if e.code == ErrorCode::TooManyRequests {
                state.metrics.rejected_too_many.inc();
            }
        }
    }
    result
}

async fn handle(
    req: &HttpRequest,
    state: &AppState,
    (session_id, module): (String, String),
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let tenant = tenant(req, state)?;
    // Admission before the body is read: a refused request costs no buffer.
    let _permit = state
        .admission
        .compute(&tenant, state.config.quota_of(&tenant).in_flight)
        .await?;
    state.metrics.in_flight.inc();
    let _in_flight = InFlightGauge(state);
    let session = state
        .sessions
        .send(Authorize {
            id: session_id.clone(),
            tenant: tenant.clone(),
            token: session_token(req),
        })
        .await??;
    let model = state.catalog.get(&session.model).ok_or_else(|| {
        ApiError::not_found(format!("model `{}` is no longer served", session.model))
    })?;
    let spec = model.specs.get(&module).ok_or_else(|| {
        ApiError::not_found(format!(
            "model `{}` has no remote module `{module}` (it has {:?})",
            session.model,
            model.specs.keys().collect::<Vec<_>>()
        ))
    })?;
    let client_job_id = req
        .headers()
        .get(JOB_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| is_valid_job_id(id))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "missing or invalid `{JOB_ID_HEADER}` header (8 to 64 of [A-Za-z0-9_-]; reuse it on retries)"
            ))
        })?
        .to_string();
    // The body must arrive within the request timeout too: a trickled upload would otherwise
    // hold its admission permits (and its tenant's slot, leased for twice the timeout) forever.
    let body_timeout = Duration::from_millis(state.config.coordinator.request_timeout_ms);
    let body = tokio::time::timeout(
        body_timeout,
        read_body(req, payload, state.config.coordinator.max_body_bytes),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            ErrorCode::DeadlineExceeded,
            format!(
                "the request body did not arrive within {} ms",
                body_timeout.as_millis()
            ),
        )
    })??;
    let rows: EncryptedRows = decode(&body, state.config.coordinator.max_body_bytes)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    check_rows(&module, &spec.plan, &rows).map_err(ApiError::bad_request)?;
    let values = rows.rows as u64 * spec.plan.out_features as u64;
    let limit = state.config.coordinator.max_job_values;
    if values > limit {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "{} rows × {} outputs = {values} values exceeds this server's max_job_values of {limit}: send at most {} rows per request",
                rows.rows,
                spec.plan.out_features,
                limit / spec.plan.out_features as u64
            ),
        ));
    }
    if let Some(max_rows) = Catalog::module_max_rows(spec, state.config.worker.max_job_bytes) {
        if max_rows == 0 {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "module `{module}` convolves maps of {} pixels, and one map's hidden values exceed the workers' max_job_bytes of {}: this deployment cannot serve it",
                    spec.map_pixels().unwrap_or(0),
                    state.config.worker.max_job_bytes
                ),
            ));
        }
        if rows.rows as usize > max_rows {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "{} rows exceed module `{module}`'s limit of {max_rows} rows per request (its hidden values must fit the workers' max_job_bytes of {}): split the input",
                    rows.rows, state.config.worker.max_job_bytes
                ),
            ));
        }
    }
    let precision = spec.plan.precision.to_string();
    let key_id = session.keys.get(&precision).cloned().ok_or_else(|| {
        ApiError::bad_request(format!("the session holds no {precision} evaluation key"))
    })?;
    let timeout = Duration::from_millis(state.config.coordinator.request_timeout_ms);
    let traceparent = req
        .headers()
        .get(TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(crate::telemetry::current_traceparent);
    let meter = state.usage.tenant(&tenant);
    meter.bytes_in.add(body.len() as u64);
    let record = session.clone();
    let budget_module = spec.backward_of.clone().unwrap_or_else(|| module.clone());
    let job = Job {
        id: scoped_job_id(&tenant, &session.id, &module, &client_job_id),
        client_job_id,
        tenant,
        session: session.id,
        model: session.model,
        module,
        key_id,
        request_sha256: sha256_hex(&body),
        rows: rows.rows,
        deadline_unix_ms: now_unix_ms() + timeout.as_millis() as u64,
        traceparent,
        payload: body.to_vec(),
    };
    drop(body);
    let quota = state.config.quota_of(&job.tenant);
    let dispatch = Dispatch {
        job,
        timeout,
        row_budget: (quota.rows_per_module > 0).then(|| RowBudget {
            limit: quota.rows_per_module,
            window_ms: state.config.quotas.row_window_s * 1000,
            module: budget_module,
        }),
        parent: tracing::Span::current(),
    };
    let dispatched = state.dispatcher.send(dispatch).await?.inspect_err(|e| {
        if e.code == ErrorCode::RowBudgetExceeded {
            meter.row_budget_refusals.inc();
        }
    })?;
    // Rows and FHE time are billed where the outcome is stored (see `usage`), not here: this
    // request may not be the one that enqueued the job, or may not be waiting any more.
    meter.requests.inc();
    match dispatched.stored.outcome {
        JobOutcome::Done(bytes) => {
            meter.bytes_out.add(bytes.len() as u64);
            Ok(HttpResponse::Ok().content_type(MSGPACK).body(bytes))
        }
        JobOutcome::Failed { code, message } => {
            if code == ErrorCode::SessionNotFound {
                // The store holds the record but not its key (a failover, or the blob expired):
                // the client opens a new session; this one goes now, so that it does not count
                // against the tenant's quota until its TTL.
                if let Err(e) = state.sessions.send(DeleteSession { record }).await? {
                    tracing::warn!(error = %e, "a session without its key left to expire");
                }
            }
            Err(ApiError::new(code, message))
        }
    }
}

/// Keeps the in-flight gauge equal to the admitted requests, whichever way the handler returns.
struct InFlightGauge<'a>(&'a AppState);

impl Drop for InFlightGauge<'_> {
    fn drop(&mut self) {
        self.0.metrics.in_flight.dec();
    }
}
