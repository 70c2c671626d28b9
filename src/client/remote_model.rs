//! A served model as one object: what `HybridFHEModel` is to a Concrete ML client.

use std::path::Path;

use super::{Client, ClientError, RemoteSession};
use crate::hybrid::{ForwardStats, HybridError, HybridModel};
use crate::model::Value;
use crate::progress::Progress;

/// The client tree of a served model and an open session on it.
pub struct RemoteModel {
    pub model: HybridModel,
    pub session: RemoteSession,
}

impl RemoteModel {
    /// Download `model`'s client tree into `dir` (verified against its manifest), check its
    /// specs against the server, generate keys and open a session uploading only evaluation keys.
    pub async fn connect(
        url: &str,
        api_key: &str,
        model: &str,
        dir: &Path,
        progress: &dyn Progress,
    ) -> Result<Self, ClientError> {
        let client = Client::new(url, api_key)?;
        client.download_model(model, dir).await?;
        let model = HybridModel::load(dir).map_err(|e| ClientError::Local(e.to_string()))?;
        let session = client.open_session(model.compiled(), progress).await?;
        Ok(Self { model, session })
    }

    /// One forward pass; the remote modules run on the server.
    pub async fn forward(&self, x: Value) -> Result<(Value, ForwardStats), HybridError> {
        self.model.forward_remote(x, &self.session).await
    }
}

/// [`RemoteModel`] for synchronous callers: it owns the runtime its connections live on.
pub struct BlockingRemoteModel {
    runtime: tokio::runtime::Runtime,
    inner: RemoteModel,
}

impl BlockingRemoteModel {
    pub fn connect(
        url: &str,
        api_key: &str,
        model: &str,
        dir: &Path,
        progress: &dyn Progress,
    ) -> Result<Self, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Local(e.to_string()))?;
        let inner = runtime.block_on(RemoteModel::connect(url, api_key, model, dir, progress))?;
        Ok(Self { runtime, inner })
    }

    pub fn forward(&self, x: Value) -> Result<(Value, ForwardStats), HybridError> {
        self.runtime.block_on(self.inner.forward(x))
    }

    pub fn session(&self) -> &RemoteSession {
        &self.inner.session
    }

    /// Close the session on the server.
    pub fn close(self) -> Result<(), ClientError> {
        self.runtime.block_on(self.inner.session.close())
    }
}
