//! The client side of `remote` mode: an HTTP client for the coordinator and a [`RemoteSession`]
//! that implements [`crate::hybrid::Remote`], so `HybridModel::forward_remote` runs against a
//! server exactly as `execute` runs in process.
//!
//! ```text
//! let remote = RemoteModel::connect(url, api_key, "digits_cnn", dir, &progress).await?;
//! let (y, stats) = remote.forward(x).await?;           // BlockingRemoteModel: the same, sync
//!
//! // or step by step:
//! let client = Client::new(url, api_key)?;
//! client.download_model("digits", dir).await?;          // optional: the client tree
//! let model = HybridModel::load(dir)?;
//! let session = client.open_session(&model, &progress).await?;   // keygen, upload eval keys
//! let (y, stats) = model.forward_remote(x, &session).await?;
//! ```
//!
//! Retries: 429 and 503 (honouring `Retry-After`), timeouts and dropped connections are retried
//! with the *same* job id, which the server treats as the same job. An expired session is renewed
//! with the same keys and the request retried.

mod remote_model;
mod session;

use std::path::Path;
use std::time::Duration;

use crate::hybrid::HybridError;
use crate::protocol::{ClientBundle, ErrorBody, ErrorCode, ModelList};

pub use remote_model::{BlockingRemoteModel, RemoteModel};
pub use session::{RemoteSession, RetryObserver, RetryPolicy, SessionKeys};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server URL {0:?}: expected http://host:port or https://host:port")]
    Url(String),
    #[error("cannot reach {url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("server answered {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected response from the server: {0}")]
    Protocol(String),
    #[error("the server's `{module}` of model `{model}` was compiled differently from the local client spec (hash {server} vs {local}): download the client tree again")]
    SpecMismatch {
        model: String,
        module: String,
        server: String,
        local: String,
    },
    #[error("{0}")]
    Local(String),
}

impl ClientError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => {
                serde_json::from_value(serde_json::Value::String(code.clone())).ok()
            }
            _ => None,
        }
    }
}

impl From<ClientError> for HybridError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Api {
                status,
                code,
                message,
            } => HybridError::RemoteRefused {
                status,
                code,
                message,
            },
            e @ (ClientError::Transport { .. } | ClientError::Url(_)) => {
                HybridError::RemoteUnreachable(e.to_string())
            }
            other => HybridError::Remote(other.to_string()),
        }
    }
}

/// A connection to a coordinator with one tenant's API key.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    api_key: String,
    /// A private CA an `https://` server's certificate chains to (besides the system's roots).
    ca_cert: Option<std::path::PathBuf>,
}

/// The environment variable [`Client::new`] reads a private CA's PEM file from.
pub const CA_CERT_ENV: &str = "HYFHE_CA_CERT";

/// Largest client tree accepted from a server.
const MAX_BUNDLE_BYTES: usize = 256 << 20;

/// Tries of an idempotent `GET` whose connection broke before an answer.
const GET_ATTEMPTS: u32 = 3;

impl Client {
    /// A client of `url` (`http://` or `https://`); an `https://` server's certificate must
    /// chain to the system's roots or to the CA in `$HYFHE_CA_CERT` (a PEM file).
    pub fn new(url: &str, api_key: &str) -> Result<Self, ClientError> {
        let ca = std::env::var_os(CA_CERT_ENV).map(std::path::PathBuf::from);
        Self::with_ca_cert(url, api_key, ca.as_deref())
    }

    /// [`Client::new`] trusting `ca_cert` (a PEM file) besides the system's roots.
    pub fn with_ca_cert(
        url: &str,
        api_key: &str,
        ca_cert: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let base = url.trim_end_matches('/').to_string();
        let https = base.starts_with("https://");
        if !base.starts_with("http://") && !https {
            return Err(ClientError::Url(url.to_string()));
        }
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
        if https {
            let tls = crate::tls::client_config(ca_cert)
                .map_err(|e| ClientError::Local(e.to_string()))?;
            builder = builder.tls_backend_preconfigured(tls);
        } else {
            // Plain HTTP: the crate's TLS backend is never needed, but reqwest builds one.
            crate::tls::install_provider();
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Local(e.to_string()))?;
        Ok(Self {
            http,
            base,
            api_key: api_key.to_string(),
            ca_cert: ca_cert.map(Path::to_path_buf),
        })
    }

    /// The same server and key with a connection pool of its own (for use on another runtime).
    pub fn clone_fresh(&self) -> Self {
        Self::with_ca_cert(&self.base, &self.api_key, self.ca_cert.as_deref())
            .expect("this URL and CA were accepted before")
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.api_key)
    }

    /// An idempotent `GET`, sent again when the connection failed before an answer: a pooled
    /// connection the server closed for idling (its keep-alive ran out while this process was
    /// busy, say generating keys) fails the first request sent on it, and a GET is safe to repeat.
    pub(crate) async fn get(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.request(reqwest::Method::GET, path).send().await {
                Ok(response) => return Ok(response),
                Err(e) if attempt < GET_ATTEMPTS && (e.is_connect() || e.is_request()) => {
                    tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
                }
                Err(e) => return Err(self.transport(e)),
            }
        }
    }

    pub(crate) fn transport(&self, e: reqwest::Error) -> ClientError {
        // The cause is in the chain (a refused certificate, a reset connection), not in the
        // top error's "error sending request".
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            source = s.source();
        }
        ClientError::Transport {
            url: self.base.clone(),
            reason,
        }
    }

    /// The body of a successful response, or the server's error as [`ClientError::Api`].
    pub(crate) async fn body(
        &self,
        response: reqwest::Response,
        limit: usize,
    ) -> Result<Vec<u8>, ClientError> {
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| self.transport(e))?;
        if !status.is_success() {
            return Err(api_error(status.as_u16(), &bytes));
        }
        if bytes.len() > limit {
            return Err(ClientError::Protocol(format!(
                "response of {} bytes exceeds {limit}",
                bytes.len()
            )));
        }
        Ok(bytes.to_vec())
    }

    /// `GET /v1/models`.
    pub async fn models(&self) -> Result<ModelList, ClientError> {
        let response = self.get("/v1/models").await?;
        let body = self.body(response, 16 << 20).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Download `model`'s client tree into `dir/client` (then `HybridModel::load(dir)` verifies
    /// every file against the manifest's hashes).
    pub async fn download_model(&self, model: &str, dir: &Path) -> Result<(), ClientError> {
        let response = self.get(&format!("/v1/models/{model}/client")).await?;
        let body = self.body(response, MAX_BUNDLE_BYTES).await?;
        let bundle: ClientBundle =
            rmp_serde::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let root = dir.join("client");
        for (path, bytes) in &bundle.files {
            if !ClientBundle::is_safe_path(path) {
                return Err(ClientError::Protocol(format!(
                    "client tree holds an unsafe path {path:?}"
                )));
            }
            let target = root.join(path);
            let io = |e: std::io::Error| ClientError::Local(format!("{}: {e}", target.display()));
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            std::fs::write(&target, bytes).map_err(io)?;
        }
        Ok(())
    }
}

fn api_error(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ClientError::Api {
            status,
            code: e.code.as_str().to_string(),
            message: e.message,
        },
        // Not ours: a load balancer's or proxy's own page. Its 502, 503 and 504 say that the
        // coordinator behind it failed or is gone (killed, restarting, unready): retried like
        // the coordinator's own 503, which is safe since a compute retry keeps its job id.
        Err(_) => ClientError::Api {
            status,
            code: match status {
                502..=504 => ErrorCode::Unavailable.as_str().to_string(),
                _ => "unknown".into(),
            },
            message: format!(
                "{}{}",
                if (502..=504).contains(&status) {
                    "the proxy in front of the coordinator answered: "
                } else {
                    ""
                },
                String::from_utf8_lossy(&body[..body.len().min(512)])
            ),
        },
    }
}

/// Run `future` to completion on a fresh current-thread runtime: the blocking wrapper for
/// callers without an async runtime.
///
/// A [`Client`]'s pooled connections belong to the runtime that opened them: a caller making
/// many calls should keep one runtime (and open its session on it) rather than call this per
/// request.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a tokio runtime")
        .block_on(future)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxys_gateway_errors_are_retried_and_other_foreign_pages_are_not() {
        for status in [502, 503, 504] {
            let e = api_error(status, b"<html>502 Bad Gateway</html>");
            assert_eq!(e.code(), Some(ErrorCode::Unavailable), "{status}");
            assert!(e.to_string().contains("proxy"), "{e}");
        }
        for status in [400, 404, 500] {
            assert_eq!(api_error(status, b"<html></html>").code(), None, "{status}");
        }
    }
}
