//! Admission control, decided before a request body is read: a coordinator-wide bound on compute
//! requests in flight, a per-tenant one (its quota), and a bound on concurrent session creations
//! (each carries ~100 MiB of keys). Refusals are 429 with `Retry-After`, never a queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use crate::protocol::ErrorCode;

pub struct Admission {
    compute: Arc<Semaphore>,
    sessions: Arc<Semaphore>,
    /// One semaphore per tenant that has sent a request; tenants come from the configuration, so
    /// this map is bounded by it.
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
    retry_after_s: u64,
}

/// Held while a compute request runs; dropping it admits the next.
pub struct ComputePermit {
    _global: OwnedSemaphorePermit,
    _tenant: OwnedSemaphorePermit,
}

impl Admission {
    pub fn new(max_in_flight: usize, max_session_creations: usize, retry_after_s: u64) -> Self {
        Self {
            compute: Arc::new(Semaphore::new(max_in_flight)),
            sessions: Arc::new(Semaphore::new(max_session_creations)),
            tenants: Mutex::new(HashMap::new()),
            retry_after_s,
        }
    }

    fn refuse(&self, message: String) -> ApiError {
        ApiError::new(ErrorCode::TooManyRequests, message).retry_after(self.retry_after_s)
    }

    /// A compute slot for `tenant`, whose quota is `tenant_in_flight` requests at once.
    pub fn compute(
        &self,
        tenant: &str,
        tenant_in_flight: usize,
    ) -> Result<ComputePermit, ApiError> {
        let tenant_sem = self
            .tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tenant.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(tenant_in_flight)))
            .clone();
        let tenant_permit = tenant_sem.try_acquire_owned().map_err(|_| {
            self.refuse(format!(
                "tenant `{tenant}` has {tenant_in_flight} requests in flight (its quota); retry later"
            ))
        })?;
        let global = self.compute.clone().try_acquire_owned().map_err(|_| {
            self.refuse("too many requests in flight on this coordinator; retry later".into())
        })?;
        Ok(ComputePermit {
            _global: global,
            _tenant: tenant_permit,
        })
    }

    /// A slot for one session creation.
    pub fn session(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.sessions.clone().try_acquire_owned().map_err(|_| {
            self.refuse(
                "too many sessions being opened at once on this coordinator; retry later".into(),
            )
        })
    }
}
