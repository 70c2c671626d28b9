//! The stable error codes of the API and their HTTP statuses: the one place they are mapped.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    /// No such session: it never existed, expired or was closed. Clients open a new one.
    SessionNotFound,
    /// The idempotency key was used before with another request body.
    IdempotencyConflict,
    PayloadTooLarge,
    TooManyRequests,
    /// A tenant quota that waiting a moment will not free (live sessions, key bytes): 429 too,
    /// but clients do not retry it.
    QuotaExceeded,
    /// The tenant's row budget for this module over the current window is spent: 429, final
    /// (the budget renews with the next window, not in a moment).
    RowBudgetExceeded,
    Unavailable,
    DeadlineExceeded,
    /// The job failed `max_deliveries` times and was moved to the dead-letter stream.
    DeadLettered,
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound | ErrorCode::SessionNotFound => 404,
            ErrorCode::IdempotencyConflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::TooManyRequests
            | ErrorCode::QuotaExceeded
            | ErrorCode::RowBudgetExceeded => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::DeadlineExceeded => 504,
            ErrorCode::DeadLettered | ErrorCode::Internal => 500,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::SessionNotFound => "session_not_found",
            ErrorCode::IdempotencyConflict => "idempotency_conflict",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::TooManyRequests => "too_many_requests",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::RowBudgetExceeded => "row_budget_exceeded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::DeadLettered => "dead_lettered",
            ErrorCode::Internal => "internal",
        }
    }

    /// Whether a client should retry the same request later.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::TooManyRequests | ErrorCode::Unavailable)
    }
}

/// Body of every error response (JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}
