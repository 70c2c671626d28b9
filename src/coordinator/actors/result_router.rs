//! One subscription to job completions per coordinator, fanned out to the requests waiting.
//!
//! A waiter registers before its job is enqueued and gets a `watch` receiver, so a completion that
//! arrives before it starts waiting is still seen. When the subscription drops (Redis restart),
//! every waiter is woken to re-check the stored outcome, and the subscription is reopened.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, Handler, Message, WrapFuture};
use futures::StreamExt;
use tokio::sync::watch;

use crate::queue::Broker;

pub struct ResultRouter {
    broker: Arc<dyn Broker>,
    /// Per job: the channel its waiters watch and how many requests watch it. Counted here,
    /// not read off the channel's receiver count: a waiter's receiver may drop before or after
    /// its `Unwatch` arrives, so the receiver count cannot tell whether others still wait.
    waiters: HashMap<String, (watch::Sender<()>, usize)>,
}

impl ResultRouter {
    pub fn new(broker: Arc<dyn Broker>) -> Self {
        Self {
            broker,
            waiters: HashMap::new(),
        }
    }
}

impl Actor for ResultRouter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let broker = self.broker.clone();
        let me = ctx.address();
        ctx.spawn(
            async move {
                loop {
                    match broker.completions().await {
                        Ok(mut stream) => {
                            while let Some(id) = stream.next().await {
                                me.do_send(Completed(id));
                            }
                            tracing::warn!("completion subscription ended; reopening");
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot subscribe to completions"),
                    }
                    // Anything completed while unsubscribed is found by re-checking.
                    me.do_send(Completed(String::new()));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            .into_actor(self),
        );
    }
}

/// Register interest in `job_id`'s completion.
#[derive(Message)]
#[rtype(result = "watch::Receiver<()>")]
pub struct Watch(pub String);

/// Stop watching `job_id`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unwatch(pub String);

/// `job_id` completed; an empty id wakes every waiter.
#[derive(Message)]
#[rtype(result = "()")]
struct Completed(String);

impl Handler<Watch> for ResultRouter {
    type Result = actix::MessageResult<Watch>;

    fn handle(&mut self, msg: Watch, _: &mut Context<Self>) -> Self::Result {
        let (sender, watching) = self
            .waiters
            .entry(msg.0)
            .or_insert_with(|| (watch::channel(()).0, 0));
        *watching += 1;
        actix::MessageResult(sender.subscribe())
    }
}

impl Handler<Unwatch> for ResultRouter {
    type Result = ();

    fn handle(&mut self, msg: Unwatch, _: &mut Context<Self>) {
        if let Some((_, watching)) = self.waiters.get_mut(&msg.0) {
            *watching -= 1;
            if *watching == 0 {
                self.waiters.remove(&msg.0);
            }
        }
    }
}

impl Handler<Completed> for ResultRouter {
    type Result = ();

    fn handle(&mut self, msg: Completed, _: &mut Context<Self>) {
        if msg.0.is_empty() {
            self.waiters.values().for_each(|(s, _)| s.send_replace(()));
        } else if let Some((s, _)) = self.waiters.get(&msg.0) {
            s.send_replace(());
        }
    }
}
