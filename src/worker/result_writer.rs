//! Stores outcomes under their job id, then acknowledges the entry (see [`crate::queue`]).

use std::sync::Arc;

use actix::{Actor, Context, Handler, Message, ResponseFuture};

use super::WorkerMetrics;
use crate::queue::{Broker, Completion, Delivery, JobOutcome, QueueError, StoredOutcome};

pub struct ResultWriter {
    broker: Arc<dyn Broker>,
    metrics: Arc<WorkerMetrics>,
}

impl ResultWriter {
    pub fn new(broker: Arc<dyn Broker>, metrics: Arc<WorkerMetrics>) -> Self {
        Self { broker, metrics }
    }
}

impl Actor for ResultWriter {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "Result<(), QueueError>")]
pub struct WriteOutcome {
    pub delivery: Delivery,
    pub outcome: StoredOutcome,
    /// This worker evaluated the job (rather than finding its outcome stored on a redelivery):
    /// only then is an outcome already there a second evaluation.
    pub evaluated: bool,
}

impl Handler<WriteOutcome> for ResultWriter {
    type Result = ResponseFuture<Result<(), QueueError>>;

    fn handle(&mut self, msg: WriteOutcome, _: &mut Context<Self>) -> Self::Result {
        let broker = self.broker.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let completion = broker.complete(&msg.delivery, &msg.outcome).await?;
            if completion == Completion::Duplicate && msg.evaluated {
                // Another worker stored this job first (this one lost its lease mid-job, e.g.
                // paused or cut off): its outcome stands and this one is dropped.
                metrics.duplicate_outcomes.inc();
                tracing::warn!(job = %msg.delivery.job.id, "outcome already stored by another evaluation");
                // The outcome is stored and the entry acknowledged: a failed count is only logged.
                if let Err(e) = broker.count_duplicate().await {
                    tracing::warn!(error = %e, "counting the duplicate evaluation failed");
                }
                return Ok(());
            }
            if completion == Completion::StoredUnreplicated {
                metrics.outcomes_unreplicated.inc();
            }
            if !msg.evaluated {
                // A redelivery whose outcome was already stored (its first acknowledgement was
                // lost): it was counted when it was evaluated.
                return Ok(());
            }
            match msg.outcome.outcome {
                JobOutcome::Done(_) => metrics.jobs_done.inc(),
                JobOutcome::Failed { .. } => metrics.jobs_failed.inc(),
            }
            Ok(())
        })
    }
}
