//! Service configuration: `config/*.toml`, then `HYFHE__SECTION__KEY` environment overrides,
//! then validation. Unknown keys and invalid values fail at start-up, naming the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::queue::QueueSettings;

/// Prefix of environment overrides: `HYFHE__QUEUE__REDIS_URL=redis://…` sets `queue.redis_url`.
pub const ENV_PREFIX: &str = "HYFHE__";
/// A TOML file of `[[tenants]]` entries added to the configuration's: how a deployment keeps its
/// tenants (secrets) out of the shipped configuration.
pub const TENANTS_FILE_ENV: &str = "HYFHE_TENANTS_FILE";
/// Tenants given inline: `name:sha256hex[,name:sha256hex…]`.
pub const TENANTS_ENV: &str = "HYFHE_TENANTS";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid config: `{key}` {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        problem: problem.into(),
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub coordinator: CoordinatorConfig,
    pub worker: WorkerConfig,
    pub queue: QueueConfig,
    pub sessions: SessionConfig,
    pub models: ModelsConfig,
    pub telemetry: TelemetryConfig,
    pub quotas: QuotaConfig,
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    pub listen: String,
    /// Address of the coordinator's `/metrics` (kept off the public API's listener).
    pub metrics_listen: String,
    pub max_in_flight: usize,
    /// Session creations (each reads a ~100 MiB body) admitted at once.
    pub max_session_creations: usize,
    /// Largest `rows × outputs` of one compute request; clients split larger ones.
    pub max_job_values: u64,
    /// Largest compute request body.
    pub max_body_bytes: usize,
    /// Largest session request body (it carries the evaluation keys); 0: what the largest served
    /// model's keys need.
    pub max_session_bytes: usize,
    pub request_timeout_ms: u64,
    /// Time a connection has to send a request head (actix's client request timeout; 408).
    pub header_timeout_ms: u64,
    pub retry_after_s: u64,
    /// PEM certificate chain (leaf first) and private key of the API listener's TLS; both empty:
    /// plain HTTP (behind a terminating proxy, or on a trusted network).
    #[serde(default)]
    pub tls_cert: String,
    #[serde(default)]
    pub tls_key: String,
}

impl CoordinatorConfig {
    /// The TLS certificate and key files, when TLS is on.
    pub fn tls_files(&self) -> Option<(&Path, &Path)> {
        (!self.tls_cert.is_empty()).then(|| {
            (
                Path::new(self.tls_cert.as_str()),
                Path::new(self.tls_key.as_str()),
            )
        })
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    pub listen: String,
    /// Empty: `<hostname>-<pid>`.
    pub id: String,
    pub evaluator_threads: usize,
    pub max_pending: usize,
    /// Working memory (digit buffers) of one evaluation, whatever its row count.
    pub max_job_bytes: u64,
    pub key_cache_bytes: u64,
    pub heartbeat_ms: u64,
    pub read_block_ms: u64,
    pub claim_idle_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackend {
    Memory,
    Redis,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub backend: QueueBackend,
    /// `redis://host:port` or, with TLS, `rediss://host:port`.
    pub redis_url: String,
    /// PEM file of the CA that signed Redis's TLS certificate (`rediss://` only); empty: the
    /// system's roots.
    #[serde(default)]
    pub redis_ca_cert: String,
    pub connect_timeout_ms: u64,
    /// The shard count a new cluster starts with; a running cluster's count lives in Redis and
    /// grows with the workers up to `max_shards` (ARCHITECTURE.md, "A capacity model").
    pub shards: u32,
    /// The most shards the count may grow to; equal to `shards`: a fixed count.
    #[serde(default = "default_max_shards")]
    pub max_shards: u32,
    pub max_depth: usize,
    pub max_deliveries: u32,
    pub lease_ttl_ms: u64,
    pub result_ttl_ms: u64,
    /// Replicas that must hold a job's outcome (and its bill) before it is announced: `WAIT`
    /// after the store (0: no wait; Redis with replicas under Sentinel: 1).
    #[serde(default)]
    pub replica_acks: u32,
    /// How long that `WAIT` may take; past it the outcome is announced anyway and counted as
    /// unreplicated (`hyfhe_worker_outcomes_unreplicated_total`).
    #[serde(default = "default_replica_ack_timeout_ms")]
    pub replica_ack_timeout_ms: u64,
}

fn default_max_shards() -> u32 {
    1024
}

fn default_replica_ack_timeout_ms() -> u64 {
    1000
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    pub ttl_s: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    pub dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceExporter {
    Off,
    Stdout,
    Otlp,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    pub log: String,
    pub exporter: TraceExporter,
    /// OTLP/HTTP traces endpoint, `http://` or `https://`.
    pub otlp_endpoint: String,
    /// PEM file of a private CA the `https://` collector's certificate chains to (trusted besides
    /// the system's roots); empty: the system's roots only.
    #[serde(default)]
    pub otlp_ca_cert: String,
    pub service_name: String,
}

/// Per-tenant limits; a tenant entry may override each.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Live sessions per tenant.
    pub sessions: usize,
    /// Compute requests in flight per tenant on one coordinator.
    pub in_flight: usize,
    /// Bytes of evaluation keys held by a tenant's live sessions.
    pub key_bytes: u64,
    /// Rows a tenant may send to each remote module per `row_window_s`, over the cluster (0: no
    /// budget). A linear module gives its weights away to `in + 1` chosen rows: a budget above
    /// that slows extraction, it cannot stop it.
    pub rows_per_module: u64,
    /// The row budget's window.
    pub row_window_s: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// Hex SHA-256 of the tenant's API key (`hyfhe keys hash` prints it).
    pub api_key_sha256: String,
    #[serde(default)]
    pub max_sessions: Option<usize>,
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    #[serde(default)]
    pub max_key_bytes: Option<u64>,
    #[serde(default)]
    pub max_rows_per_module: Option<u64>,
    /// The models this tenant may list, download and open sessions on; absent: every model
    /// served (what configurations written before this key meant).
    #[serde(default)]
    pub models: Option<Vec<String>>,
}

/// A tenant's quotas after its overrides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub sessions: usize,
    pub in_flight: usize,
    pub key_bytes: u64,
    /// 0: no row budget.
    pub rows_per_module: u64,
}

/// Tenants as a `HYFHE_TENANTS_FILE` holds them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    /// An empty file is allowed: compose always mounts one, and the tenants may all come from
    /// `HYFHE_TENANTS`.
    #[serde(default)]
    tenants: Vec<TenantConfig>,
}

/// The configuration compiled into the binary (`config/default.toml`).
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

impl Config {
    /// `path` (or the built-in defaults), then environment overrides, then validation.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let vars: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        let mut config = Self::load_file(path, &vars)?;
        let file = std::env::var_os(TENANTS_FILE_ENV).map(PathBuf::from);
        let inline = std::env::var(TENANTS_ENV).ok();
        config.add_tenants(file.as_deref(), inline.as_deref())?;
        Ok(config)
    }

    /// Add the tenants of a `HYFHE_TENANTS_FILE` and of `HYFHE_TENANTS` (`name:sha256,…`), then
    /// validate again.
    pub fn add_tenants(
        &mut self,
        file: Option<&Path>,
        inline: Option<&str>,
    ) -> Result<(), ConfigError> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let parsed: TenantsFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                origin: format!(" {} ({TENANTS_FILE_ENV})", path.display()),
                message: e.to_string(),
            })?;
            self.tenants.extend(parsed.tenants);
        }
        for entry in inline
            .unwrap_or("")
            .split(',')
            .filter(|e| !e.trim().is_empty())
        {
            let (name, hash) = entry.trim().split_once(':').ok_or_else(|| {
                invalid(
                    TENANTS_ENV,
                    format!("entry {entry:?} is not name:sha256hex"),
                )
            })?;
            self.tenants.push(TenantConfig {
                name: name.to_string(),
                api_key_sha256: hash.to_string(),
                max_sessions: None,
                max_in_flight: None,
                max_key_bytes: None,
                max_rows_per_module: None,
                models: None,
            });
        }
        self.validate()
    }

    fn load_file(
        path: Option<&Path>,
        vars: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                Self::from_toml(&text, &format!(" {}", p.display()), vars)
            }
            None => Self::from_toml(DEFAULT_TOML, " (built-in defaults)", vars),
        }
    }

    /// Parse `text`, apply `overrides` (`HYFHE__SECTION__KEY` → value) and validate.
    pub fn from_toml(
        text: &str,
        origin: &str,
        overrides: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            origin: origin.to_string(),
            message,
        };
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        for (var, value) in overrides {
            apply_override(&mut table, var, value)?;
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let addr = |key: &str, v: &str| {
            v.parse::<SocketAddr>()
                .map(|_| ())
                .map_err(|_| invalid(key, format!("must be host:port, got {v:?}")))
        };
        let positive = |key: &str, v: u64| {
            if v == 0 {
                Err(invalid(key, "must be greater than 0"))
            } else {
                Ok(())
            }
        };
        addr("coordinator.listen", &self.coordinator.listen)?;
        addr("worker.listen", &self.worker.listen)?;
        addr(
            "coordinator.metrics_listen",
            &self.coordinator.metrics_listen,
        )?;
        positive(
            "coordinator.max_session_creations",
            self.coordinator.max_session_creations as u64,
        )?;
        let one_pack = crate::fhe::params::packing_params(crate::fhe::Precision::Exact)
            .output
            .polynomial_size as u64;
        if self.coordinator.max_job_values < one_pack {
            return Err(invalid(
                "coordinator.max_job_values",
                format!("must be at least {one_pack} (one packed output ciphertext)"),
            ));
        }
        let min_job = (crate::fhe::outputs_per_group(crate::fhe::Precision::Exact, 0)
            * crate::fhe::digit_bytes_per_output(crate::fhe::Precision::Exact))
            as u64;
        if self.worker.max_job_bytes < min_job {
            return Err(invalid(
                "worker.max_job_bytes",
                format!("must be at least {min_job} (the digits of one packed output group)"),
            ));
        }
        if self.coordinator.tls_cert.is_empty() != self.coordinator.tls_key.is_empty() {
            return Err(invalid(
                "coordinator.tls_cert",
                "and coordinator.tls_key are set together (both PEM files) or both left empty",
            ));
        }
        positive("quotas.sessions", self.quotas.sessions as u64)?;
        positive("quotas.in_flight", self.quotas.in_flight as u64)?;
        positive("quotas.key_bytes", self.quotas.key_bytes)?;
        positive("quotas.row_window_s", self.quotas.row_window_s)?;
        positive(
            "coordinator.max_in_flight",
            self.coordinator.max_in_flight as u64,
        )?;
        positive(
            "coordinator.request_timeout_ms",
            self.coordinator.request_timeout_ms,
        )?;
        positive(
            "coordinator.header_timeout_ms",
            self.coordinator.header_timeout_ms,
        )?;
        if self.coordinator.max_body_bytes < 1 << 16 {
            return Err(invalid(
                "coordinator.max_body_bytes",
                "must be at least 64 KiB",
            ));
        }
        let one_key = crate::fhe::EvaluationKey::expected_len(crate::fhe::Precision::Exact);
        if self.coordinator.max_session_bytes != 0
            && self.coordinator.max_session_bytes < one_key + (1 << 16)
        {
            return Err(invalid(
                "coordinator.max_session_bytes",
                format!(
                    "must be 0 (sized from the served models' keys) or hold at least one evaluation key ({one_key} bytes) plus 64 KiB"
                ),
            ));
        }
        positive("worker.max_pending", self.worker.max_pending as u64)?;
        positive("worker.heartbeat_ms", self.worker.heartbeat_ms)?;
        positive("worker.read_block_ms", self.worker.read_block_ms)?;
        if self.worker.key_cache_bytes < 1 << 28 {
            return Err(invalid(
                "worker.key_cache_bytes",
                "must be at least 256 MiB: one session's Fourier packing key is 384–576 MiB",
            ));
        }
        if !(1..=1024).contains(&self.queue.shards) {
            return Err(invalid("queue.shards", "must be in 1..=1024"));
        }
        if !(self.queue.shards..=1024).contains(&self.queue.max_shards) {
            return Err(invalid(
                "queue.max_shards",
                "must be in queue.shards..=1024 (the count only grows)",
            ));
        }
        positive("queue.max_depth", self.queue.max_depth as u64)?;
        positive("queue.max_deliveries", self.queue.max_deliveries as u64)?;
        positive("queue.result_ttl_ms", self.queue.result_ttl_ms)?;
        // A job completes by its request's deadline at the latest; a client whose response was
        // lost retries within seconds of that. An outcome kept for less than the deadline could
        // be gone before the retry of a request that waited the whole time.
        if self.queue.result_ttl_ms < self.coordinator.request_timeout_ms {
            return Err(invalid(
                "queue.result_ttl_ms",
                format!(
                    "must be at least coordinator.request_timeout_ms ({}): a retry of a request that waited until its deadline must still find the outcome",
                    self.coordinator.request_timeout_ms
                ),
            ));
        }
        if self.queue.replica_acks > 16 {
            return Err(invalid(
                "queue.replica_acks",
                "must be at most 16 (replicas that hold an outcome before it is announced)",
            ));
        }
        if self.queue.replica_acks > 0 {
            if self.queue.backend != QueueBackend::Redis {
                return Err(invalid(
                    "queue.replica_acks",
                    "needs queue.backend = \"redis\": the in-memory queue has no replicas",
                ));
            }
            positive(
                "queue.replica_ack_timeout_ms",
                self.queue.replica_ack_timeout_ms,
            )?;
            if self.queue.replica_ack_timeout_ms.saturating_mul(4)
                > self.coordinator.request_timeout_ms
            {
                return Err(invalid(
                    "queue.replica_ack_timeout_ms",
                    format!(
                        "must be at most a quarter of coordinator.request_timeout_ms ({}): it is added to every job's completion when a replica is slow",
                        self.coordinator.request_timeout_ms
                    ),
                ));
            }
        }
        if self.queue.lease_ttl_ms < 2 * self.worker.heartbeat_ms {
            return Err(invalid(
                "queue.lease_ttl_ms",
                format!(
                    "must be at least twice worker.heartbeat_ms ({}), or leases lapse between heartbeats",
                    self.worker.heartbeat_ms
                ),
            ));
        }
        let redis_tls = self.queue.redis_url.starts_with("rediss://")
            || self.queue.redis_url.starts_with("rediss+sentinel://");
        let redis_schemes = [
            "redis://",
            "rediss://",
            "redis+unix://",
            "unix://",
            "redis+sentinel://",
            "rediss+sentinel://",
        ];
        if self.queue.backend == QueueBackend::Redis
            && !redis_schemes
                .iter()
                .any(|s| self.queue.redis_url.starts_with(s))
        {
            return Err(invalid(
                "queue.redis_url",
                "must be a redis://, rediss:// (TLS), redis+unix:// or \
                 redis+sentinel://host:port,host:port/<master name> URL \
                 (rediss+sentinel:// for TLS to the sentinels and the primary)",
            ));
        }
        if !self.queue.redis_ca_cert.is_empty() && !redis_tls {
            return Err(invalid(
                "queue.redis_ca_cert",
                "is only used with TLS: make queue.redis_url a rediss:// (or rediss+sentinel://) URL, or leave this empty",
            ));
        }
        let otlp_tls = self.telemetry.otlp_endpoint.starts_with("https://");
        if !(otlp_tls || self.telemetry.otlp_endpoint.starts_with("http://")) {
            return Err(invalid(
                "telemetry.otlp_endpoint",
                "must be an http:// or https:// URL",
            ));
        }
        if !self.telemetry.otlp_ca_cert.is_empty() && !otlp_tls {
            return Err(invalid(
                "telemetry.otlp_ca_cert",
                "is only used with TLS: make telemetry.otlp_endpoint an https:// URL, or leave this empty",
            ));
        }
        positive("sessions.ttl_s", self.sessions.ttl_s)?;
        for (i, t) in self.tenants.iter().enumerate() {
            if t.name.is_empty() {
                return Err(invalid(&format!("tenants[{i}].name"), "must not be empty"));
            }
            if self.tenants[..i].iter().any(|o| o.name == t.name) {
                return Err(invalid(
                    &format!("tenants[{i}].name"),
                    format!("tenant {:?} is listed twice", t.name),
                ));
            }
            let ok = t.api_key_sha256.len() == 64
                && t.api_key_sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !ok {
                return Err(invalid(
                    &format!("tenants[{i}].api_key_sha256"),
                    "must be 64 hex digits (the SHA-256 of the key; `hyfhe keys hash KEY`)",
                ));
            }
            // One key, two tenants: the key would act as whichever comes first.
            if let Some(o) = self.tenants[..i]
                .iter()
                .find(|o| o.api_key_sha256.eq_ignore_ascii_case(&t.api_key_sha256))
            {
                return Err(invalid(
                    &format!("tenants[{i}].api_key_sha256"),
                    format!(
                        "tenant {:?} has the same API key as tenant {:?}: give each tenant its own key",
                        t.name, o.name
                    ),
                ));
            }
            if t.models
                .as_ref()
                .is_some_and(|m| m.iter().any(String::is_empty))
            {
                return Err(invalid(
                    &format!("tenants[{i}].models"),
                    "must not hold an empty model name",
                ));
            }
        }
        Ok(())
    }

    pub fn queue_settings(&self) -> QueueSettings {
        QueueSettings {
            shards: self.queue.shards,
            max_shards: self.queue.max_shards,
            max_depth: self.queue.max_depth,
            max_deliveries: self.queue.max_deliveries,
            lease_ttl_ms: self.queue.lease_ttl_ms,
            result_ttl_ms: self.queue.result_ttl_ms,
            read_block_ms: self.worker.read_block_ms,
            replica_acks: self.queue.replica_acks,
            replica_ack_timeout_ms: self.queue.replica_ack_timeout_ms,
        }
    }

    /// `tenant`'s quotas: the `[quotas]` defaults with the tenant's own overrides.
    pub fn quota_of(&self, tenant: &str) -> Quota {
        let t = self.tenants.iter().find(|t| t.name == tenant);
        Quota {
            sessions: t
                .and_then(|t| t.max_sessions)
                .unwrap_or(self.quotas.sessions),
            in_flight: t
                .and_then(|t| t.max_in_flight)
                .unwrap_or(self.quotas.in_flight),
            key_bytes: t
                .and_then(|t| t.max_key_bytes)
                .unwrap_or(self.quotas.key_bytes),
            rows_per_module: t
                .and_then(|t| t.max_rows_per_module)
                .unwrap_or(self.quotas.rows_per_module),
        }
    }

    /// Whether `tenant` may use `model` (list it, download it, open sessions on it).
    pub fn may_use(&self, tenant: &str, model: &str) -> bool {
        self.tenants
            .iter()
            .find(|t| t.name == tenant)
            .and_then(|t| t.models.as_ref())
            .is_none_or(|models| models.iter().any(|m| m == model))
    }

    /// The tenant whose API key this is.
    pub fn tenant_for_key(&self, api_key: &str) -> Option<&TenantConfig> {
        let digest = hash_api_key(api_key);
        self.tenants.iter().find(|t| {
            // Compare every byte: the time taken must not tell how much of a hash matched.
            let a = t.api_key_sha256.to_ascii_lowercase();
            a.len() == digest.len()
                && a.bytes()
                    .zip(digest.bytes())
                    .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                    == 0
        })
    }
}

pub fn hash_api_key(api_key: &str) -> String {
    hex::encode(Sha256::digest(api_key.as_bytes()))
}

/// `HYFHE__QUEUE__REDIS_URL=v` → `table.queue.redis_url = v`, typed like the value it replaces.
fn apply_override(table: &mut toml::Table, var: &str, raw: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect();
    let [section, key] = path.as_slice() else {
        return Err(invalid(
            var,
            "environment overrides take the form HYFHE__SECTION__KEY",
        ));
    };
    let name = format!("{section}.{key}");
    let section_table = table
        .get_mut(section)
        .and_then(|v| v.as_table_mut())
        .ok_or_else(|| invalid(&name, format!("(from {var}): no section [{section}]")))?;
    let value = match section_table.get(key) {
        Some(toml::Value::String(_)) => toml::Value::String(raw.to_string()),
        Some(toml::Value::Integer(_)) => {
            raw.parse::<i64>().map(toml::Value::Integer).map_err(|_| {
                invalid(
                    &name,
                    format!("(from {var}) must be an integer, got {raw:?}"),
                )
            })?
        }
        Some(toml::Value::Boolean(_)) => raw
            .parse::<bool>()
            .map(toml::Value::Boolean)
            .map_err(|_| invalid(&name, format!("(from {var}) must be true or false")))?,
        Some(_) => return Err(invalid(&name, format!("(from {var}) cannot be overridden"))),
        None => return Err(invalid(&name, format!("(from {var}) is not a known key"))),
    };
    section_table.insert(key.clone(), value);
    Ok(())
}
