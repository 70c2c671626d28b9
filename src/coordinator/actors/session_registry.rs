//! Sessions: created with a tenant's evaluation keys, looked up (and their TTL refreshed) on every
//! compute request, deleted by their client. State lives in the session store, so any
//! coordinator can serve any session.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::{Actor, Context, Handler, Message, ResponseFuture};

use crate::coordinator::error::ApiError;
use crate::hybrid::sha256_hex;
use crate::protocol::{ErrorCode, SessionCreated};
use crate::queue::{
    now_unix_ms, scoped_key_id, Broker, Reserved, SessionQuota, SessionRecord, TenantUsage,
};

pub struct SessionRegistry {
    broker: Arc<dyn Broker>,
    ttl_ms: u64,
}

impl SessionRegistry {
    pub fn new(broker: Arc<dyn Broker>, ttl_s: u64) -> Self {
        Self {
            broker,
            ttl_ms: ttl_s * 1000,
        }
    }
}

impl Actor for SessionRegistry {
    type Context = Context<Self>;
}

/// Open a session; `keys` are (precision name, encoded evaluation key), already validated.
#[derive(Message)]
#[rtype(result = "Result<SessionCreated, ApiError>")]
pub struct CreateSession {
    pub tenant: String,
    pub model: String,
    pub keys: Vec<(String, Vec<u8>)>,
    /// Their total size (the tenant's key-bytes quota).
    pub key_bytes: u64,
    /// What the tenant may hold, checked atomically with the creation.
    pub quota: SessionQuota,
    pub retry_after_s: u64,
}

/// The session `id` if `tenant` owns it and `token` is its token.
#[derive(Message)]
#[rtype(result = "Result<SessionRecord, ApiError>")]
pub struct Authorize {
    pub id: String,
    pub tenant: String,
    pub token: Option<String>,
}

#[derive(Message)]
#[rtype(result = "Result<(), ApiError>")]
pub struct DeleteSession {
    /// As [`Authorize`] returned it.
    pub record: SessionRecord,
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::Rng::fill(&mut rand::rngs::OsRng, buf.as_mut_slice());
    hex::encode(buf)
}

impl Handler<CreateSession> for SessionRegistry {
    type Result = ResponseFuture<Result<SessionCreated, ApiError>>;

    fn handle(&mut self, msg: CreateSession, _: &mut Context<Self>) -> Self::Result {
        let broker = self.broker.clone();
        let ttl_ms = self.ttl_ms;
        Box::pin(async move {
            // Content-addressed within the tenant: a client renewing its session with the same
            // keys reuses the stored blob and the workers' transformed copy.
            let keys: BTreeMap<String, String> = msg
                .keys
                .iter()
                .map(|(precision, bytes)| (precision.clone(), scoped_key_id(&msg.tenant, bytes)))
                .collect();
            let id = random_hex(16);
            let token = random_hex(32);
            let record = SessionRecord {
                id: id.clone(),
                tenant: msg.tenant.clone(),
                model: msg.model,
                token_sha256: sha256_hex(token.as_bytes()),
                keys,
                key_bytes: msg.key_bytes,
                expires_unix_ms: now_unix_ms() + ttl_ms,
            };
            // The quota is reserved first, in one step with the record, so that concurrent
            // creations cannot pass it together; the ~100 MiB blobs are stored after.
            if let Reserved::OverQuota(usage) =
                broker.create_session(&record, ttl_ms, msg.quota).await?
            {
                return Err(over_quota(&msg.tenant, &usage, msg.key_bytes, msg.quota)
                    .retry_after(msg.retry_after_s));
            }
            for (_, bytes) in &msg.keys {
                let key_id = scoped_key_id(&msg.tenant, bytes);
                if let Err(e) = broker.put_key(&key_id, bytes, ttl_ms).await {
                    // A session without its keys would only fail its jobs: take it back.
                    if let Err(e) = broker.delete_session(&record).await {
                        tracing::warn!(error = %e, session = %id, "session without keys left to expire");
                    }
                    return Err(e.into());
                }
            }
            tracing::info!(session = %id, tenant = %record.tenant, model = %record.model, "session opened");
            Ok(SessionCreated {
                session_id: id,
                token,
                expires_unix_ms: record.expires_unix_ms,
                ttl_s: ttl_ms / 1000,
            })
        })
    }
}

/// Which of `quota`'s limits a new session of `key_bytes` would pass, given `usage`.
pub fn over_quota(
    tenant: &str,
    usage: &TenantUsage,
    key_bytes: u64,
    quota: SessionQuota,
) -> ApiError {
    let message = if usage.sessions >= quota.sessions {
        format!(
            "tenant `{tenant}` holds {} sessions, its quota is {}: close one (DELETE /v1/sessions/ID) or wait for one to expire",
            usage.sessions, quota.sessions
        )
    } else {
        format!(
            "tenant `{tenant}` holds {} bytes of evaluation keys; {key_bytes} more would pass its quota of {}",
            usage.key_bytes, quota.key_bytes
        )
    };
    ApiError::new(ErrorCode::QuotaExceeded, message)
}

fn session_not_found(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::SessionNotFound,
        format!("no session {id} (it expired or was closed): open a new one"),
    )
}

impl Handler<Authorize> for SessionRegistry {
    type Result = ResponseFuture<Result<SessionRecord, ApiError>>;

    fn handle(&mut self, msg: Authorize, _: &mut Context<Self>) -> Self::Result {
        let broker = self.broker.clone();
        let ttl_ms = self.ttl_ms;
        Box::pin(async move {
            let mut record = broker
                .get_session(&msg.id)
                .await?
                .ok_or_else(|| session_not_found(&msg.id))?;
            // Another tenant's session is answered as a missing one, word for word: a 403 would
            // tell a tenant that a session id it guessed exists.
            if record.tenant != msg.tenant {
                return Err(session_not_found(&msg.id));
            }
            let token_ok = msg
                .token
                .as_deref()
                .is_some_and(|t| sha256_hex(t.as_bytes()) == record.token_sha256);
            if !token_ok {
                return Err(ApiError::new(
                    ErrorCode::Forbidden,
                    "missing or wrong session token (x-hyfhe-session-token)",
                ));
            }
            // Refresh the TTL once half of it is used, not on every request.
            let now = now_unix_ms();
            if record.expires_unix_ms.saturating_sub(now) < ttl_ms / 2 {
                record.expires_unix_ms = now + ttl_ms;
                broker.put_session(&record, ttl_ms).await?;
            }
            Ok(record)
        })
    }
}

impl Handler<DeleteSession> for SessionRegistry {
    type Result = ResponseFuture<Result<(), ApiError>>;

    fn handle(&mut self, msg: DeleteSession, _: &mut Context<Self>) -> Self::Result {
        let broker = self.broker.clone();
        Box::pin(async move {
            broker.delete_session(&msg.record).await?;
            tracing::info!(session = %msg.record.id, "session closed");
            Ok(())
        })
    }
}
