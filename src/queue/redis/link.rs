//! A Redis connection that is replaced when it stops answering.
//!
//! redis-rs's `ConnectionManager` reconnects when the server closes the connection, but not when
//! a response times out: behind a partition that drops packets without a FIN, every command would
//! time out on the same dead socket forever. A [`Link`] treats a timeout or an I/O error as a dead
//! connection and opens a new one, once, whichever call noticed first.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::RedisError;

use super::endpoint::Endpoint;

use crate::queue::QueueError;

pub(super) fn unavailable(e: RedisError) -> QueueError {
    QueueError::Unavailable(e.to_string())
}

/// Whether `e` means the connection is unusable (rather than the command being refused).
/// A primary demoted by a failover answers writes with `READONLY` (and `MASTERDOWN` while it
/// has lost its own primary): the connection is to the wrong server, so it is replaced, and a
/// sentinel endpoint then finds the new primary.
pub(super) fn is_dead(e: &RedisError) -> bool {
    e.is_timeout()
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(e.code(), Some("READONLY" | "MASTERDOWN"))
        || e.to_string().contains("READONLY")
}

/// How long opening a connection (TCP and handshake) may take before the attempt is abandoned.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) struct Link {
    endpoint: Arc<Endpoint>,
    /// Which link this is, for logs (`commands`, `key blobs`).
    name: &'static str,
    response_timeout: Duration,
    /// (generation, connection): a caller that saw generation `g` fail replaces it only if it is
    /// still `g`, so concurrent failures open one new connection, not one each.
    current: std::sync::Mutex<(u64, ConnectionManager)>,
    replacing: tokio::sync::Mutex<()>,
}

async fn open(
    endpoint: &Endpoint,
    response_timeout: Duration,
) -> Result<ConnectionManager, RedisError> {
    let client = endpoint.client().await?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(1);
    match tokio::time::timeout(
        CONNECT_TIMEOUT * 2,
        client.get_connection_manager_with_config(config),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connecting to redis timed out",
        ))),
    }
}

impl Link {
    pub(super) async fn open(
        endpoint: &Arc<Endpoint>,
        name: &'static str,
        response_timeout: Duration,
    ) -> Result<Self, RedisError> {
        let conn = open(endpoint, response_timeout).await?;
        Ok(Self {
            endpoint: endpoint.clone(),
            name,
            response_timeout,
            current: std::sync::Mutex::new((0, conn)),
            replacing: tokio::sync::Mutex::new(()),
        })
    }

    fn current(&self) -> (u64, ConnectionManager) {
        // Held for a clone only; a panic cannot leave the pair half-written.
        let guard = self.current.lock().unwrap_or_else(|p| p.into_inner());
        (guard.0, guard.1.clone())
    }

    /// Run `f` on the current connection; if it fails because the connection is dead, open a
    /// new one for the next call (this call still fails: the caller decides whether to retry).
    pub(super) async fn run<T, F, Fut>(&self, f: F) -> Result<T, QueueError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let (generation, conn) = self.current();
        match f(conn).await {
            Ok(v) => Ok(v),
            Err(e) => {
                if is_dead(&e) {
                    self.replace(generation).await;
                }
                Err(unavailable(e))
            }
        }
    }

    /// [`Self::run`] for a command that is safe to repeat (a read, a `SET` of the same value):
    /// when it fails on a dead connection and a new one opens, it runs once more on that one.
    /// A connection that died unnoticed (Redis restarted while this link was idle) then costs
    /// this call nothing, instead of failing a job that waits for redelivery.
    pub(super) async fn run_repeatable<T, F, Fut>(&self, f: F) -> Result<T, QueueError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let (generation, _) = self.current();
        match self.run(&f).await {
            // `run` replaced the dead connection: once more on the new one.
            Err(_) if self.current().0 != generation => self.run(f).await,
            done => done,
        }
    }

    async fn replace(&self, failed: u64) {
        let _one_at_a_time = self.replacing.lock().await;
        if self.current().0 != failed {
            return;
        }
        match open(&self.endpoint, self.response_timeout).await {
            Ok(conn) => {
                tracing::warn!(
                    link = self.name,
                    "redis connection stopped answering; reconnected"
                );
                let mut guard = self.current.lock().unwrap_or_else(|p| p.into_inner());
                *guard = (failed + 1, conn);
            }
            Err(e) => {
                tracing::warn!(link = self.name, error = %e, "redis still unreachable");
            }
        }
    }
}
