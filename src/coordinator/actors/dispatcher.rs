//! Enqueue a job once per idempotency key, and wait for its outcome under its deadline.
//!
//! Admission happens before (in the route, before the body is read). Here: [`JobQueue::begin`]
//! finds a stored outcome (answered at once, if the body matches), a run in progress (waited
//! for, not enqueued again) or nothing (the marker is set and the job enqueued).
//!
//! [`JobQueue::begin`]: crate::queue::JobQueue::begin

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Context, Handler, Message, ResponseFuture};
use tracing::Instrument;

use super::result_router::{ResultRouter, Unwatch, Watch};
use crate::coordinator::error::ApiError;
use crate::coordinator::metrics::CoordinatorMetrics;
use crate::protocol::ErrorCode;
use crate::queue::{Begin, Broker, Charge, Job, QueueError, StoredOutcome};

/// Re-check the stored outcome this often even without a completion message (a lost publish
/// must cost latency, not the request).
const RECHECK: Duration = Duration::from_secs(2);
/// How long before the deadline the in-flight marker may be missing because it expired.
const MARKER_MARGIN: Duration = Duration::from_secs(1);

pub struct Dispatcher {
    broker: Arc<dyn Broker>,
    router: Addr<ResultRouter>,
    retry_after_s: u64,
    metrics: Arc<CoordinatorMetrics>,
}

impl Dispatcher {
    pub fn new(
        broker: Arc<dyn Broker>,
        router: Addr<ResultRouter>,
        retry_after_s: u64,
        metrics: Arc<CoordinatorMetrics>,
    ) -> Self {
        Self {
            broker,
            router,
            retry_after_s,
            metrics,
        }
    }
}

impl Actor for Dispatcher {
    type Context = Context<Self>;
}

/// Run `job` (once per id) and wait for its outcome until `timeout`.
#[derive(Message)]
#[rtype(result = "Result<Dispatched, ApiError>")]
pub struct Dispatch {
    pub job: Job,
    pub timeout: Duration,
    /// The tenant's row budget for the job's module, charged when the job is enqueued (not for
    /// a retry answered from the store or joining a run).
    pub row_budget: Option<RowBudget>,
    /// The request's span: actor handlers run outside it.
    pub parent: tracing::Span,
}

/// Rows a tenant may send to one module per window, over the whole cluster.
#[derive(Clone, Debug)]
pub struct RowBudget {
    pub limit: u64,
    pub window_ms: u64,
    /// Whose rows these are: the module itself, or for a backward module the forward module it
    /// transposes (both reveal the same weights, so one budget covers them).
    pub module: String,
}

/// A job's outcome.
pub struct Dispatched {
    pub stored: StoredOutcome,
}

/// Called with no outcome stored: `None` while the job is still queued or running; otherwise the
/// outcome stored meanwhile, or `Unavailable` when the store has neither (it lost the job: Redis
/// restarted without persistence). Nobody would ever answer that job, so waiting out the deadline
/// would only turn an outage of seconds into a `deadline_exceeded` minutes later; a retry under
/// the same key enqueues it again (on a renewed session if the session went with it).
async fn lost_job(broker: &dyn Broker, job_id: &str) -> Option<Result<StoredOutcome, ApiError>> {
    match broker.is_running(job_id).await {
        Ok(true) | Err(_) => None,
        // The outcome and the marker change in one transaction, but between our two reads the
        // job may have completed: look once more.
        Ok(false) => match broker.outcome(job_id).await {
            Ok(Some(stored)) => Some(Ok(stored)),
            Ok(None) => Some(Err(ApiError::new(
                ErrorCode::Unavailable,
                "the queue lost this job (it restarted); retry with the same job id",
            ))),
            Err(_) => None,
        },
    }
}

/// The same idempotency key with another body is a client bug, never silently answered.
fn check_same_request(job: &Job, request_sha256: &str) -> Result<(), ApiError> {
    if request_sha256 == job.request_sha256 {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::IdempotencyConflict,
        format!(
            "idempotency key `{}` was already used for module `{}` of this session with a different request body; use a fresh key for a new request",
            job.client_job_id, job.module
        ),
    ))
}

/// Enqueue `job` under the marker `begin` just gave `owner`, charging its rows to the tenant's
/// budget first; on refusal the marker (and the rows) go back so that a retry can enqueue it.
async fn enqueue(
    broker: &dyn Broker,
    job: &Job,
    owner: &str,
    budget: Option<&RowBudget>,
    metrics: &CoordinatorMetrics,
    retry_after: u64,
) -> Result<(), ApiError> {
    let give_back_marker = || async {
        if let Err(e) = broker.abandon(&job.id, owner).await {
            tracing::warn!(error = %e, "in-flight marker left to expire");
        }
    };
    if let Some(b) = budget {
        let charged = broker
            .charge_rows(
                &job.tenant,
                &b.module,
                job.rows as i64,
                b.limit,
                b.window_ms,
            )
            .await;
        match charged {
            Ok(Charge::Charged { .. }) => {}
            Ok(Charge::Refused { used }) => {
                give_back_marker().await;
                return Err(ApiError::new(
                    ErrorCode::RowBudgetExceeded,
                    format!(
                        "tenant `{}` has sent {used} of its {} rows to module `{}`{} in this {} s window; {} more would pass it (the budget renews with the next window)",
                        job.tenant,
                        b.limit,
                        b.module,
                        if b.module == job.module {
                            String::new()
                        } else {
                            format!(" (forward and backward `{}` together)", job.module)
                        },
                        b.window_ms / 1000,
                        job.rows
                    ),
                ));
            }
            Err(e) => {
                give_back_marker().await;
                return Err(ApiError::from(e).retry_after(retry_after));
            }
        }
    }
    let result = broker
        .enqueue(job)
        .instrument(tracing::info_span!("enqueue"))
        .await;
    let Err(e) = result else {
        return Ok(());
    };
    if let Some(b) = budget {
        if let Err(e) = broker
            .charge_rows(
                &job.tenant,
                &b.module,
                -(job.rows as i64),
                b.limit,
                b.window_ms,
            )
            .await
        {
            tracing::warn!(error = %e, "rows of a job never enqueued stay charged");
        }
    }
    give_back_marker().await;
    Err(match e {
        QueueError::Full { .. } => {
            metrics.rejected_queue_full.inc();
            ApiError::new(ErrorCode::Unavailable, format!("queue full: {e}"))
        }
        e => ApiError::from(e),
    }
    .retry_after(retry_after))
}

impl Handler<Dispatch> for Dispatcher {
    type Result = ResponseFuture<Result<Dispatched, ApiError>>;

    fn handle(&mut self, msg: Dispatch, _: &mut Context<Self>) -> Self::Result {
        let retry_after = self.retry_after_s;
        let broker = self.broker.clone();
        let router = self.router.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let job = msg.job;
            let parent = msg.parent;
            let budget = msg.row_budget;
            let deadline = Instant::now() + msg.timeout;
            // Whose in-flight marker this request sets, if it sets one.
            let owner = format!("{:032x}", rand::random::<u128>());
            let mut done = router.send(Watch(job.id.clone())).await?;
            let result = async {
                let ttl_ms = msg.timeout.as_millis() as u64;
                let mut enqueued = false;
                match broker.begin(&job, ttl_ms, &owner).await {
                    // A retry of a finished job: answer from the stored outcome.
                    Ok(Begin::Done(stored)) => {
                        check_same_request(&job, &stored.request_sha256)?;
                        return Ok(Dispatched { stored });
                    }
                    // A retry of a running job: wait for that run.
                    Ok(Begin::Running { request_sha256 }) => {
                        check_same_request(&job, &request_sha256)?;
                        metrics.retries_joined.inc();
                    }
                    Ok(Begin::Started) => {
                        enqueue(&*broker, &job, &owner, budget.as_ref(), &metrics, retry_after).await?;
                        enqueued = true;
                    }
                    Err(e) => return Err(ApiError::from(e).retry_after(retry_after)),
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
                        let wait = left.min(RECHECK);
                        match tokio::time::timeout(wait, done.changed()).await {
                            // Woken by a completion, or the periodic re-check.
                            Ok(Ok(())) | Err(_) => {}
                            // The router holds a sender for as long as this request is counted
                            // among the job's waiters, so this should not happen; if it does,
                            // wait out the re-check period rather than spin on a closed channel.
                            Ok(Err(_)) => {
                                tracing::warn!("completion channel closed; re-checking on a timer");
                                tokio::time::sleep(wait).await;
                            }
                        }
                        metrics.outcome_checks.inc();
                        match broker.outcome(&job.id).await {
                            Ok(Some(stored)) => return Ok(Dispatched { stored }),
                            // Only the request that set the marker knows its lifetime: it was
                            // set with this request's timeout, so until shortly before our
                            // deadline its absence means the store lost the job, not that the
                            // marker expired.
                            Ok(None)
                                if enqueued
                                    && deadline.saturating_duration_since(Instant::now())
                                        > MARKER_MARGIN =>
                            {
                                if let Some(lost) = lost_job(&*broker, &job.id).await {
                                    return lost
                                        .map(|stored| Dispatched { stored })
                                        .map_err(|e| e.retry_after(retry_after));
                                }
                            }
                            // A retry that joined another request's run: when that run is gone
                            // without an outcome (its request could not enqueue it and gave the
                            // marker back, its job was dropped past that request's deadline, or
                            // the store lost it), nobody will answer; this request takes it over.
                            Ok(None) if !enqueued => {
                                if let Ok(false) = broker.is_running(&job.id).await {
                                    let ttl_ms = left.as_millis() as u64;
                                    match broker.begin(&job, ttl_ms, &owner).await {
                                        Ok(Begin::Started) => {
                                            enqueue(
                                                &*broker,
                                                &job,
                                                &owner,
                                                budget.as_ref(),
                                                &metrics,
                                                retry_after,
                                            )
                                            .await?;
                                            enqueued = true;
                                        }
                                        Ok(Begin::Done(stored)) => {
                                            check_same_request(&job, &stored.request_sha256)?;
                                            return Ok(Dispatched { stored });
                                        }
                                        Ok(Begin::Running { .. }) => {}
                                        Err(e) => tracing::warn!(error = %e, "re-begin failed; still waiting"),
                                    }
                                }
                            }
                            Ok(None) => {}
                            // The job is queued or running: a store that blinks must cost
                            // latency, not the request.
                            Err(e) => {
                                tracing::warn!(error = %e, "outcome check failed; still waiting")
                            }
                        }
                    }
                }
                .instrument(tracing::info_span!("wait"))
                .await
            }
            .instrument(tracing::info_span!(parent: &parent, "dispatch", job = %job.client_job_id))
            .await;
            router.do_send(Unwatch(job.id.clone()));
            result
        })
    }
}
