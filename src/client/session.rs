//! A session on a coordinator: the client's secret keys stay here, only evaluation keys go up.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{Method, StatusCode};

use super::{Client, ClientError};
use crate::fhe::{
    decode, encode, ClientKey, EncryptedOutputs, EncryptedRows, KeyProfile, Precision, MAX_ROWS,
};
use crate::hybrid::{BoxFuture, CompiledModules, HybridError, Remote};
use crate::progress::Progress;
use crate::protocol::{
    CreateSession, ErrorCode, SessionCreated, JOB_ID_HEADER, MAX_PAYLOAD_BYTES, MSGPACK,
    SESSION_TOKEN_HEADER, TRACEPARENT_HEADER,
};

/// How hard a compute request tries before giving up.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    /// First back-off; doubles per attempt up to `max_backoff` (a `Retry-After` overrides it).
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Per-request HTTP timeout (then retried with the same job id).
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 30,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            request_timeout: Duration::from_secs(300),
        }
    }
}

/// Called with the cause of every retried compute attempt (`transport`, `session_not_found` or
/// the refusal's API code, e.g. `unavailable`): what a fault looked like to this client, even
/// when the retries hid it (see [`RemoteSession::on_retry`]).
pub type RetryObserver = Arc<dyn Fn(&str) + Send + Sync>;

pub struct RemoteSession {
    client: Client,
    model: String,
    keys: Arc<SessionKeys>,
    current: Mutex<SessionCreated>,
    /// Held while a renewal runs: the requests in flight on a session that is gone all learn it
    /// at once, and one new session (one ~100 MiB key upload) must serve them all, not one each
    /// (each would also spend one of the tenant's session creations).
    renewing: tokio::sync::Mutex<()>,
    retry: RetryPolicy,
    on_retry: Option<RetryObserver>,
    /// Rows per request the server accepts, by module (from its `max_job_values`).
    max_rows: BTreeMap<String, usize>,
}

/// A client's secret key and the encoded evaluation keys derived from it. Generating them takes
/// seconds; one set can open several sessions (and renews an expired one without regenerating).
pub struct SessionKeys {
    key: ClientKey,
    evaluation_keys: Vec<Vec<u8>>,
    precisions: BTreeSet<Precision>,
    profile: KeyProfile,
}

impl SessionKeys {
    /// Fresh keys with an evaluation key for each of `precisions`; with `bootstrap`, the exact
    /// one also carries bootstrapping keys (modules with activations inside).
    pub fn generate_with(
        precisions: &BTreeSet<Precision>,
        bootstrap: bool,
        progress: &dyn Progress,
    ) -> Self {
        Self::generate_as(precisions, bootstrap, KeyProfile::Full, progress)
    }

    /// [`SessionKeys::generate_with`] for a key profile: a lean key carries the automorphism
    /// keys alone (no `bootstrap`: modules with activations need the full key).
    pub fn generate_as(
        precisions: &BTreeSet<Precision>,
        bootstrap: bool,
        profile: KeyProfile,
        progress: &dyn Progress,
    ) -> Self {
        debug_assert!(!(bootstrap && profile == KeyProfile::Lean));
        progress.stage("keygen", 1);
        let key = ClientKey::generate();
        progress.advance(1);
        let mut evaluation_keys = Vec::new();
        for &precision in precisions {
            let n = match profile {
                KeyProfile::Full => crate::fhe::params::INPUT_GLWE.lwe_dimension(),
                KeyProfile::Lean => 1,
            };
            progress.stage(&format!("{precision} evaluation key"), n);
            let mut eval = key.evaluation_key_as(precision, profile, &|k| progress.advance(k));
            if profile == KeyProfile::Lean {
                progress.advance(1);
            }
            if bootstrap && precision == Precision::Exact {
                progress.stage("bootstrap key", 1);
                eval.bootstrap = Some(key.bootstrap_key());
                progress.advance(1);
            }
            evaluation_keys.push(encode(&eval));
        }
        Self {
            key,
            evaluation_keys,
            precisions: precisions.clone(),
            profile,
        }
    }

    /// Fresh keys with an evaluation key for each of `precisions` (linear modules only).
    pub fn generate(precisions: &BTreeSet<Precision>, progress: &dyn Progress) -> Self {
        Self::generate_with(precisions, false, progress)
    }

    /// Fresh keys for everything `model`'s modules need.
    pub fn generate_for(model: &CompiledModules, progress: &dyn Progress) -> Self {
        Self::generate_with(
            &Self::precisions_of(model),
            Self::needs_bootstrap(model),
            progress,
        )
    }

    /// Fresh keys of `profile` for everything `model`'s modules need; a lean key is refused
    /// for a model with activations inside a module (their bootstraps pack with the row key).
    pub fn generate_for_as(
        model: &CompiledModules,
        profile: KeyProfile,
        progress: &dyn Progress,
    ) -> Result<Self, ClientError> {
        let bootstrap = Self::needs_bootstrap(model);
        if bootstrap && profile == KeyProfile::Lean {
            let chains: Vec<_> = model
                .specs()
                .iter()
                .filter(|(_, s)| s.output_plan.is_some())
                .map(|(name, _)| name.as_str())
                .collect();
            return Err(ClientError::Local(format!(
                "a lean key serves linear modules only; {chains:?} of `{}` have activations \
                 inside and need the full key (--key full)",
                model.name()
            )));
        }
        Ok(Self::generate_as(
            &Self::precisions_of(model),
            bootstrap,
            profile,
            progress,
        ))
    }

    /// Which packing keys these are.
    pub fn profile(&self) -> KeyProfile {
        self.profile
    }

    /// Whether a module of `model` has activations inside.
    pub fn needs_bootstrap(model: &CompiledModules) -> bool {
        model.specs().values().any(|s| s.output_plan.is_some())
    }

    /// The precisions `model`'s modules use.
    pub fn precisions_of(model: &CompiledModules) -> BTreeSet<Precision> {
        model.specs().values().map(|s| s.plan.precision).collect()
    }

    pub fn client_key(&self) -> &ClientKey {
        &self.key
    }

    /// The encoded evaluation keys a session uploads, one per precision.
    pub fn evaluation_key_blobs(&self) -> &[Vec<u8>] {
        &self.evaluation_keys
    }

    /// Bytes of evaluation keys a session uploads.
    pub fn upload_bytes(&self) -> usize {
        self.evaluation_keys.iter().map(Vec::len).sum()
    }
}

impl Client {
    /// Check the server compiled `model` as the local client spec says, generate fresh keys and
    /// open a session uploading only the evaluation keys.
    pub async fn open_session(
        &self,
        model: &CompiledModules,
        progress: &dyn Progress,
    ) -> Result<RemoteSession, ClientError> {
        self.open_session_as(model, KeyProfile::Full, progress)
            .await
    }

    /// [`Client::open_session`] with keys of `profile` (`lean`: the automorphism keys alone,
    /// about 1 MiB instead of 107; linear modules only).
    pub async fn open_session_as(
        &self,
        model: &CompiledModules,
        profile: KeyProfile,
        progress: &dyn Progress,
    ) -> Result<RemoteSession, ClientError> {
        let limits = self.check_specs(model).await?;
        // Seconds of CPU on the caller's task: a client has nothing else to serve meanwhile.
        let keys = SessionKeys::generate_for_as(model, profile, progress)?;
        self.start_session(model, Arc::new(keys), limits).await
    }

    /// Open a session for `model` with existing keys.
    pub async fn open_session_with(
        &self,
        model: &CompiledModules,
        keys: Arc<SessionKeys>,
    ) -> Result<RemoteSession, ClientError> {
        let limits = self.check_specs(model).await?;
        self.start_session(model, keys, limits).await
    }

    async fn start_session(
        &self,
        model: &CompiledModules,
        keys: Arc<SessionKeys>,
        limits: ServedLimits,
    ) -> Result<RemoteSession, ClientError> {
        let missing: Vec<_> = SessionKeys::precisions_of(model)
            .difference(&keys.precisions)
            .map(|p| p.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(ClientError::Local(format!(
                "these keys have no evaluation key for {missing:?} precision, which `{}` uses",
                model.name()
            )));
        }
        let current = self
            .create_session(model.name(), &keys.evaluation_keys)
            .await?;
        Ok(RemoteSession {
            client: self.clone(),
            model: model.name().to_string(),
            keys,
            current: Mutex::new(current),
            renewing: tokio::sync::Mutex::new(()),
            retry: RetryPolicy::default(),
            on_retry: None,
            max_rows: model
                .specs()
                .iter()
                .map(|(name, spec)| {
                    let mut rows = limits.max_job_values / spec.out_features.max(1) as u64;
                    match limits.module_rows.get(name) {
                        Some(&own) => rows = rows.min(own as u64),
                        // A server from before modules published their own limit.
                        None if spec.output_plan.is_some() => {
                            rows = rows.min(CHAIN_ROWS_PER_REQUEST as u64)
                        }
                        None => {}
                    }
                    (name.clone(), rows.clamp(1, MAX_ROWS as u64) as usize)
                })
                .collect(),
        })
    }

    /// Check every module's client spec against the server's; returns the server's row limits.
    async fn check_specs(&self, model: &CompiledModules) -> Result<ServedLimits, ClientError> {
        let list = self.models().await?;
        let served = list
            .models
            .iter()
            .find(|m| m.name == model.name())
            .ok_or_else(|| ClientError::Api {
                status: 404,
                code: "not_found".into(),
                message: format!(
                    "the server does not serve model `{}` (it serves {:?})",
                    model.name(),
                    list.models.iter().map(|m| &m.name).collect::<Vec<_>>()
                ),
            })?;
        for (name, spec) in model.specs() {
            let local = spec.sha256();
            let server = served
                .modules
                .iter()
                .find(|m| &m.name == name)
                .map(|m| m.client_spec_sha256.clone())
                .unwrap_or_else(|| "none".into());
            if server != local {
                return Err(ClientError::SpecMismatch {
                    model: model.name().into(),
                    module: name.clone(),
                    server,
                    local,
                });
            }
        }
        Ok(ServedLimits {
            max_job_values: list.max_job_values,
            module_rows: served
                .modules
                .iter()
                .filter_map(|m| m.max_rows.map(|r| (m.name.clone(), r)))
                .collect(),
        })
    }

    async fn create_session(
        &self,
        model: &str,
        keys: &[Vec<u8>],
    ) -> Result<SessionCreated, ClientError> {
        let body = rmp_serde::to_vec_named(&CreateSession {
            model: model.to_string(),
            keys: keys
                .iter()
                .map(|k| serde_bytes::ByteBuf::from(k.clone()))
                .collect(),
        })
        .expect("msgpack encoding into a Vec");
        let body = bytes::Bytes::from(body);
        let policy = RetryPolicy::default();
        let mut backoff = policy.backoff;
        let mut last = None;
        // Retried: a refusal for load (429/503, after `Retry-After`), and a connection that
        // broke before an answer (a pooled connection the server closed while keys were being
        // generated). A session created twice costs an extra record until its TTL.
        let started = std::time::Instant::now();
        while started.elapsed() < SESSION_RETRY_FOR {
            let sent = self
                .request(Method::POST, "/v1/sessions")
                .header("content-type", MSGPACK)
                .body(body.clone())
                .send()
                .await;
            let wait = match sent {
                Err(e) if e.is_connect() || e.is_request() => {
                    last = Some(self.transport(e));
                    backoff
                }
                Err(e) => return Err(self.transport(e)),
                Ok(response) => {
                    let retry_after = retry_after(&response);
                    match self.body(response, 1 << 20).await {
                        Ok(bytes) => {
                            return serde_json::from_slice(&bytes)
                                .map_err(|e| ClientError::Protocol(e.to_string()))
                        }
                        Err(e) if e.code().is_some_and(ErrorCode::is_retryable) => {
                            last = Some(e);
                            retry_after.unwrap_or(backoff)
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(policy.max_backoff);
        }
        Err(last.unwrap_or_else(|| ClientError::Local("no attempt made".into())))
    }
}

/// Rows per request of a module with activations inside, against a server that does not publish
/// its limit (within the default job budget for hidden layers up to 256 wide).
const CHAIN_ROWS_PER_REQUEST: usize = 31;

/// The row limits a server publishes for a model.
struct ServedLimits {
    max_job_values: u64,
    /// Modules with a limit of their own (non-linear ones).
    module_rows: BTreeMap<String, u32>,
}

/// How long opening a session is retried before its refusal is reported (many clients opening
/// sessions at once queue behind `max_session_creations`, each upload ~100 MiB).
const SESSION_RETRY_FOR: Duration = Duration::from_secs(180);

/// The W3C `traceparent` of the current span, where this build exports traces (the wheel's
/// client-only build has no OpenTelemetry).
fn traceparent() -> Option<String> {
    #[cfg(feature = "server")]
    return crate::telemetry::current_traceparent();
    #[cfg(not(feature = "server"))]
    None
}

/// The `Retry-After` of a refusal, in seconds.
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs)
}

impl RemoteSession {
    /// Call `observer` with the cause of each retried compute attempt.
    pub fn on_retry(mut self, observer: RetryObserver) -> Self {
        self.on_retry = Some(observer);
        self
    }

    fn retried(&self, cause: &str) {
        if let Some(observer) = &self.on_retry {
            observer(cause);
        }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn id(&self) -> String {
        self.current.lock().expect("session").session_id.clone()
    }

    /// The session token (sent as `x-hyfhe-session-token`).
    pub fn token(&self) -> String {
        self.current.lock().expect("session").token.clone()
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// Bytes of evaluation keys uploaded per session.
    pub fn uploaded_key_bytes(&self) -> usize {
        self.keys.upload_bytes()
    }

    /// Close the session on the server: its record goes at once, and its key blobs with it
    /// unless another live session of the same tenant uploaded the same keys. A worker's
    /// transformed copy leaves its cache as the cache needs room (LRU within the tenant's share).
    pub async fn close(&self) -> Result<(), ClientError> {
        let s = self.current.lock().expect("session").clone();
        let response = self
            .client
            .request(Method::DELETE, &format!("/v1/sessions/{}", s.session_id))
            .header(SESSION_TOKEN_HEADER, &s.token)
            .send()
            .await
            .map_err(|e| self.client.transport(e))?;
        self.client.body(response, 1 << 20).await.map(|_| ())
    }

    /// Open a new session with the same keys in place of `gone`, unless another request has
    /// already replaced it.
    async fn renew(&self, gone: &str) -> Result<(), ClientError> {
        let _one_at_a_time = self.renewing.lock().await;
        if self.current.lock().expect("session").session_id != gone {
            return Ok(());
        }
        let fresh = self
            .client
            .create_session(&self.model, &self.keys.evaluation_keys)
            .await?;
        tracing::info!(session = %fresh.session_id, "session renewed");
        *self.current.lock().expect("session") = fresh;
        Ok(())
    }

    /// One compute call with retries under a fresh job id (fixed for all attempts).
    pub async fn compute_bytes(&self, module: &str, body: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        let job_id = uuid::Uuid::new_v4().simple().to_string();
        self.compute_with_job_id(module, body, &job_id).await
    }

    /// One compute call with retries under `job_id` (the idempotency key): a caller that retries
    /// across process restarts keeps its own ids. An id means something only for this session
    /// and module; reusing it with another body is refused (`idempotency_conflict`).
    pub async fn compute_with_job_id(
        &self,
        module: &str,
        body: Vec<u8>,
        job_id: &str,
    ) -> Result<Vec<u8>, ClientError> {
        let body = bytes::Bytes::from(body);
        let mut backoff = self.retry.backoff;
        let mut last = None;
        for _ in 0..self.retry.attempts {
            let s = self.current.lock().expect("session").clone();
            let path = format!("/v1/sessions/{}/modules/{module}/compute", s.session_id);
            let mut request = self
                .client
                .request(Method::POST, &path)
                .header(SESSION_TOKEN_HEADER, &s.token)
                .header(JOB_ID_HEADER, job_id)
                .header("content-type", MSGPACK)
                .timeout(self.retry.request_timeout)
                .body(body.clone());
            if let Some(tp) = traceparent() {
                request = request.header(TRACEPARENT_HEADER, tp);
            }
            let wait = match request.send().await {
                Err(e) if e.is_timeout() || e.is_connect() || e.is_request() => {
                    self.retried("transport");
                    last = Some(self.client.transport(e));
                    backoff
                }
                Err(e) => return Err(self.client.transport(e)),
                Ok(response) => {
                    let status = response.status();
                    let retry_after = retry_after(&response);
                    match self.client.body(response, MAX_PAYLOAD_BYTES).await {
                        Ok(bytes) => return Ok(bytes),
                        // The connection broke while the answer was coming: same job id again.
                        Err(e @ ClientError::Transport { .. }) => {
                            self.retried("transport");
                            last = Some(e);
                            backoff
                        }
                        Err(e) if e.code() == Some(ErrorCode::SessionNotFound) => {
                            self.retried("session_not_found");
                            self.renew(&s.session_id).await?;
                            last = Some(e);
                            continue;
                        }
                        // Load refusals are retried; a spent quota or row budget (429 too) is
                        // final: waiting a moment does not renew it.
                        Err(e @ ClientError::Api { .. })
                            if status == StatusCode::SERVICE_UNAVAILABLE
                                || e.code().is_some_and(ErrorCode::is_retryable) =>
                        {
                            if let ClientError::Api { code, .. } = &e {
                                self.retried(code);
                            }
                            last = Some(e);
                            retry_after.unwrap_or(backoff)
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(self.retry.max_backoff);
        }
        Err(last.unwrap_or_else(|| ClientError::Local("no attempt made".into())))
    }
}

impl Remote for RemoteSession {
    fn client_key(&self) -> &ClientKey {
        &self.keys.key
    }

    fn max_rows(&self, module: &str) -> usize {
        self.max_rows.get(module).copied().unwrap_or(MAX_ROWS)
    }

    fn key_profile(&self) -> KeyProfile {
        self.keys.profile
    }

    fn compute<'a>(
        &'a self,
        module: &'a str,
        request: EncryptedRows,
    ) -> BoxFuture<'a, Result<EncryptedOutputs, HybridError>> {
        Box::pin(async move {
            let bytes = self.compute_bytes(module, encode(&request)).await?;
            Ok(decode(&bytes, MAX_PAYLOAD_BYTES)?)
        })
    }
}
