//! Executing a [`StagePlan`]: local segments in `tract`, remote steps through a backend.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use serde::Serialize;
use tract_onnx::pb::ModelProto;

use super::HybridError;
use crate::model::{LocalSegment, Stage, StagePlan, Value};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where the time of one forward call went, and what crossed the wire.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ForwardStats {
    /// Local ONNX segments (tract).
    pub local_ms: f64,
    /// Plans the local segments built for shapes they had not seen (a decode loop builds them
    /// in its first steps; a symbolic plan then serves every later past length).
    pub local_plans: usize,
    /// Building rows (im2col) and quantizing the remote modules' inputs.
    pub quantize_ms: f64,
    pub encrypt_ms: f64,
    /// Server-side evaluation (in process for `execute`, a round trip for `remote`).
    pub fhe_ms: f64,
    pub decrypt_ms: f64,
    /// Zero-point correction, dequantization and un-im2col of the results.
    pub dequantize_ms: f64,
    /// The whole module computation in the clear modes (`disable`, `simulate`).
    pub clear_ms: f64,
    pub requests: usize,
    pub upload_bytes: usize,
    pub download_bytes: usize,
}

impl ForwardStats {
    pub fn add(&mut self, other: &ForwardStats) {
        self.local_ms += other.local_ms;
        self.local_plans += other.local_plans;
        self.quantize_ms += other.quantize_ms;
        self.encrypt_ms += other.encrypt_ms;
        self.fhe_ms += other.fhe_ms;
        self.decrypt_ms += other.decrypt_ms;
        self.dequantize_ms += other.dequantize_ms;
        self.clear_ms += other.clear_ms;
        self.requests += other.requests;
        self.upload_bytes += other.upload_bytes;
        self.download_bytes += other.download_bytes;
    }

    /// Every figure times `factor` (per-item averages from totals).
    pub fn scaled(&self, factor: f64) -> Self {
        let count = |n: usize| (n as f64 * factor).round() as usize;
        Self {
            local_ms: self.local_ms * factor,
            local_plans: count(self.local_plans),
            quantize_ms: self.quantize_ms * factor,
            encrypt_ms: self.encrypt_ms * factor,
            fhe_ms: self.fhe_ms * factor,
            decrypt_ms: self.decrypt_ms * factor,
            dequantize_ms: self.dequantize_ms * factor,
            clear_ms: self.clear_ms * factor,
            requests: count(self.requests),
            upload_bytes: count(self.upload_bytes),
            download_bytes: count(self.download_bytes),
        }
    }
}

pub(crate) fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Computes one remote module's output from its input.
pub trait ModuleBackend: Send + Sync {
    fn compute<'a>(
        &'a self,
        module: &'a str,
        input: Value,
        stats: &'a Mutex<ForwardStats>,
    ) -> BoxFuture<'a, Result<Value, HybridError>>;
}

enum RuntimeStage {
    Local(Box<LocalSegment>),
    Remote {
        module: String,
        input: String,
        output: String,
    },
}

/// A model split into stages, with each local segment's compiled plans cached.
pub struct Runtime {
    /// The graph inputs a caller feeds, in graph order (language models: `input_ids`,
    /// `attention_mask`, `past_key_values.*`).
    pub inputs: Vec<String>,
    /// The graph outputs, in graph order.
    pub outputs: Vec<String>,
    stages: Vec<RuntimeStage>,
}

impl Runtime {
    pub fn new(model: &ModelProto) -> Result<Self, HybridError> {
        let plan = StagePlan::new(model)?;
        if plan.outputs.is_empty() {
            return Err(HybridError::Unsupported("the model has no output".into()));
        }
        if plan.inputs.is_empty() {
            return Err(HybridError::Unsupported(
                "the model has no runtime input (every graph input is an initializer)".into(),
            ));
        }
        let stages = plan
            .stages
            .into_iter()
            .map(|s| match s {
                Stage::Local {
                    model,
                    inputs,
                    outputs,
                } => RuntimeStage::Local(Box::new(LocalSegment::new(*model, inputs, outputs))),
                Stage::Remote {
                    module,
                    input,
                    output,
                } => RuntimeStage::Remote {
                    module,
                    input,
                    output,
                },
            })
            .collect();
        Ok(Self {
            inputs: plan.inputs,
            outputs: plan.outputs,
            stages,
        })
    }

    pub fn remote_modules(&self) -> Vec<&str> {
        self.stages
            .iter()
            .filter_map(|s| match s {
                RuntimeStage::Remote { module, .. } => Some(module.as_str()),
                RuntimeStage::Local(_) => None,
            })
            .collect()
    }

    /// The first output of a model fed one input (the others, if any, must be optional).
    pub async fn run(
        &self,
        input: Value,
        backend: &dyn ModuleBackend,
        stats: &Mutex<ForwardStats>,
    ) -> Result<Value, HybridError> {
        let mut out = self.run_all(vec![input], backend, stats).await?;
        Ok(out.swap_remove(0))
    }

    /// Every output, from one value per input (in [`Self::inputs`] order).
    pub async fn run_all(
        &self,
        inputs: Vec<Value>,
        backend: &dyn ModuleBackend,
        stats: &Mutex<ForwardStats>,
    ) -> Result<Vec<Value>, HybridError> {
        if inputs.len() != self.inputs.len() {
            return Err(HybridError::Model(crate::model::ModelError::Input(
                format!(
                    "{} input tensors for a model with inputs {:?}",
                    inputs.len(),
                    self.inputs
                ),
            )));
        }
        let mut env: HashMap<&str, Value> = HashMap::new();
        for (name, v) in self.inputs.iter().zip(inputs) {
            env.insert(name, v);
        }
        let take = |env: &HashMap<&str, Value>, name: &str| {
            env.get(name).cloned().ok_or_else(|| {
                HybridError::Unsupported(format!("tensor `{name}` is read before it is produced"))
            })
        };
        for stage in &self.stages {
            match stage {
                RuntimeStage::Local(seg) => {
                    let start = Instant::now();
                    let inputs = seg
                        .inputs
                        .iter()
                        .map(|n| take(&env, n))
                        .collect::<Result<Vec<_>, _>>()?;
                    let (outputs, built) = seg.run_counted(inputs)?;
                    for (name, v) in seg.outputs.iter().zip(outputs) {
                        env.insert(name, v);
                    }
                    let mut stats = stats.lock().expect("stats");
                    stats.local_ms += ms_since(start);
                    stats.local_plans += built;
                }
                RuntimeStage::Remote {
                    module,
                    input,
                    output,
                } => {
                    let x = take(&env, input)?;
                    let y = backend.compute(module, x, stats).await?;
                    env.insert(output, y);
                }
            }
        }
        self.outputs
            .iter()
            .map(|o| {
                env.get(o.as_str()).cloned().ok_or_else(|| {
                    HybridError::Unsupported(format!("the output `{o}` was never produced"))
                })
            })
            .collect()
    }
}

/// Drive a future that never waits (every backend but a network one): poll it once.
pub(crate) fn run_ready<T>(
    fut: impl Future<Output = Result<T, HybridError>>,
) -> Result<T, HybridError> {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => Err(HybridError::Unsupported(
            "this backend waits on I/O: call forward_remote from an async runtime".into(),
        )),
    }
}
