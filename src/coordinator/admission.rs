//! Admission control, decided before a request body is read: a coordinator-wide bound on compute
//! requests in flight, a per-tenant one (its quota) held in the broker so that it counts the
//! tenant's requests on every coordinator, and a bound on concurrent session creations (each
//! carries ~100 MiB of keys). Refusals are 429 with `Retry-After`, never a queue.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use crate::protocol::ErrorCode;
use crate::queue::Broker;

pub struct Admission {
    compute: Arc<Semaphore>,
    sessions: Arc<Semaphore>,
    broker: Arc<dyn Broker>,
    /// How long a tenant slot outlives a coordinator that dies holding it.
    slot_lease_ms: u64,
    retry_after_s: u64,
}

/// Held while a compute request runs; dropping it admits the next, here and (its tenant slot,
/// given back in the background) on every coordinator.
pub struct ComputePermit {
    _global: OwnedSemaphorePermit,
    _slot: TenantSlot,
}

/// A tenant slot being taken or held: armed from before the broker is asked, so a request
/// cancelled mid-acquisition still gives back what the broker may have granted.
struct TenantSlot {
    broker: Arc<dyn Broker>,
    tenant: String,
    id: String,
    armed: bool,
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (broker, tenant, id) = (
            self.broker.clone(),
            std::mem::take(&mut self.tenant),
            std::mem::take(&mut self.id),
        );
        // A failed give-back is not lost: the slot's lease ends it.
        let give_back = async move {
            if let Err(e) = broker.release_slot(&tenant, &id).await {
                tracing::warn!(%tenant, error = %e, "in-flight slot not given back; its lease will end it");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(give_back);
            }
            Err(_) => {
                tracing::warn!("no runtime to give back an in-flight slot; its lease will end it")
            }
        }
    }
}

impl Admission {
    /// `slot_lease_ms`: at least the longest a request may hold its slot (its body read and its
    /// wait, each bounded by the request timeout), so a live request never loses it.
    pub fn new(
        max_in_flight: usize,
        max_session_creations: usize,
        broker: Arc<dyn Broker>,
        slot_lease_ms: u64,
        retry_after_s: u64,
    ) -> Self {
        Self {
            compute: Arc::new(Semaphore::new(max_in_flight)),
            sessions: Arc::new(Semaphore::new(max_session_creations)),
            broker,
            slot_lease_ms,
            retry_after_s,
        }
    }

    fn refuse(&self, message: String) -> ApiError {
        ApiError::new(ErrorCode::TooManyRequests, message).retry_after(self.retry_after_s)
    }

    /// A compute slot for `tenant`, whose quota is `tenant_in_flight` requests at once across
    /// the cluster. The coordinator's own bound is checked first: a request it would refuse
    /// anyway costs no broker round trip.
    pub async fn compute(
        &self,
        tenant: &str,
        tenant_in_flight: usize,
    ) -> Result<ComputePermit, ApiError> {
        let global = self.compute.clone().try_acquire_owned().map_err(|_| {
            self.refuse("too many requests in flight on this coordinator; retry later".into())
        })?;
        let mut slot = TenantSlot {
            broker: self.broker.clone(),
            tenant: tenant.to_string(),
            id: uuid::Uuid::new_v4().simple().to_string(),
            armed: true,
        };
        let taken = self
            .broker
            .acquire_slot(tenant, &slot.id, tenant_in_flight, self.slot_lease_ms)
            .await?;
        if !taken {
            slot.armed = false;
            return Err(self.refuse(format!(
                "tenant `{tenant}` has {tenant_in_flight} requests in flight (its quota, across all coordinators); retry later"
            )));
        }
        Ok(ComputePermit {
            _global: global,
            _slot: slot,
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
