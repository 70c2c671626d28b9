//! Admission control, enqueue, and the wait for a job's outcome under its deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Context, Handler, Message, ResponseFuture};
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::result_router::{ResultRouter, Unwatch, Watch};
use crate::coordinator::error::ApiError;
use crate::coordinator::metrics::CoordinatorMetrics;
use crate::protocol::ErrorCode;
use crate::queue::{Broker, Job, JobOutcome, QueueError};

/// Re-check the stored outcome this often even without a completion message (a lost publish
/// must cost latency, not the request).
const RECHECK: Duration = Duration::from_secs(2);

pub struct Dispatcher {
    broker: Arc<dyn Broker>,
    router: Addr<ResultRouter>,
    /// `max_in_flight` permits; none left → 429.
    admission: Arc<Semaphore>,
    retry_after_s: u64,
    metrics: Arc<CoordinatorMetrics>,
}

impl Dispatcher {
    pub fn new(
        broker: Arc<dyn Broker>,
        router: Addr<ResultRouter>,
        max_in_flight: usize,
        retry_after_s: u64,
        metrics: Arc<CoordinatorMetrics>,
    ) -> Self {
        Self {
            broker,
            router,
            admission: Arc::new(Semaphore::new(max_in_flight)),
            retry_after_s,
            metrics,
        }
    }
}

impl Actor for Dispatcher {
    type Context = Context<Self>;
}

/// Run `job` and wait for its outcome until `timeout`.
#[derive(Message)]
#[rtype(result = "Result<JobOutcome, ApiError>")]
pub struct Dispatch {
    pub job: Job,
    pub timeout: Duration,
    /// The request's span: actor handlers run outside it.
    pub parent: tracing::Span,
}

struct InFlight(Arc<CoordinatorMetrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

impl Handler<Dispatch> for Dispatcher {
    type Result = ResponseFuture<Result<JobOutcome, ApiError>>;

    fn handle(&mut self, msg: Dispatch, _: &mut Context<Self>) -> Self::Result {
        let retry_after = self.retry_after_s;
        let Ok(permit) = self.admission.clone().try_acquire_owned() else {
            self.metrics.rejected_too_many.inc();
            let err = ApiError::new(
                ErrorCode::TooManyRequests,
                "too many requests in flight on this coordinator; retry later",
            )
            .retry_after(retry_after);
            return Box::pin(async move { Err(err) });
        };
        self.metrics.in_flight.inc();
        let in_flight = InFlight(self.metrics.clone());
        let broker = self.broker.clone();
        let router = self.router.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let _permit = permit;
            let _in_flight = in_flight;
            let job = msg.job;
            let parent = msg.parent;
            let deadline = Instant::now() + msg.timeout;
            let mut done = router.send(Watch(job.id.clone())).await?;
            let result = async {
                // A retry of a finished job id: answer from the stored outcome.
                if let Some(outcome) = broker.outcome(&job.id).await? {
                    return Ok(outcome);
                }
                let enqueued = broker
                    .enqueue(&job)
                    .instrument(tracing::info_span!("enqueue"))
                    .await;
                match enqueued {
                    Err(e @ QueueError::Full { .. }) => {
                        metrics.rejected_queue_full.inc();
                        return Err(ApiError::new(
                            ErrorCode::Unavailable,
                            format!("queue full: {e}"),
                        )
                        .retry_after(retry_after));
                    }
                    Err(e) => return Err(ApiError::from(e).retry_after(retry_after)),
                    Ok(()) => {}
                }
                async {
                    loop {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(ApiError::new(
                                ErrorCode::DeadlineExceeded,
                                format!("no result within {} ms", msg.timeout.as_millis()),
                            ));
                        }
                        let _ = tokio::time::timeout(left.min(RECHECK), done.changed()).await;
                        if let Some(outcome) = broker.outcome(&job.id).await? {
                            return Ok(outcome);
                        }
                    }
                }
                .instrument(tracing::info_span!("wait"))
                .await
            }
            .instrument(tracing::info_span!(parent: &parent, "dispatch", job = %job.id))
            .await;
            router.do_send(Unwatch(job.id.clone()));
            result
        })
    }
}
