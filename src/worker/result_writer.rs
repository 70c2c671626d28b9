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
}

impl Handler<WriteOutcome> for ResultWriter {
    type Result = ResponseFuture<Result<(), QueueError>>;

    fn handle(&mut self, msg: WriteOutcome, _: &mut Context<Self>) -> Self::Result {
        let broker = self.broker.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            if broker.complete(&msg.delivery, &msg.outcome).await? == Completion::Duplicate {
                // Another worker stored this job first (this one lost its lease mid-job, e.g.
                // paused or cut off): its outcome stands and this one is dropped.
                metrics.duplicate_outcomes.inc();
                tracing::warn!(job = %msg.delivery.job.id, "outcome already stored by another evaluation");
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
