//! Hybrid models: the model side of Concrete ML's `HybridFHEModel`.
//!
//! ```text
//! HybridModel::new(onnx, &["seq.0"])      pick modules by their named_modules() path
//!   .compile(&calibration, &options, ..)  calibrate, quantize, plan the crypto (refuses misfits)
//!   .forward(x, Mode::Execute)            one call: local segments in tract, remote modules
//!                                         through the mode's backend
//!   .save_and_clear_private_info(dir)     client/ (no weights), server/, private/
//! HybridModel::load(dir)                  whichever trees are there, verified
//! ```
//!
//! Each remote module is cut out of the graph and replaced by one placeholder node; the graph
//! then splits into local segments and remote steps ([`crate::model::StagePlan`]), and every mode
//! is a [`ModuleBackend`] for those steps: `Torch` (the untouched float model, owner only),
//! `Disable` (quantized values multiplied in f32), `Simulate` (the integer matmul, bit-exact with
//! FHE), `Execute` (real FHE, client and server in this process) and `Remote` (a [`Remote`]
//! server, implemented by the serving layer).

mod artefacts;
mod backend;
mod compile_chain;
mod compile_module;
mod compiled;
mod lm;
mod model_io;
mod onnx_compile;
mod rows;
mod runtime;
mod spec;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use tracing::Instrument;
use tract_onnx::pb::ModelProto;

pub use artefacts::{
    model_dirs, read_tree, ArtefactError, Manifest, Tree, FORMAT_VERSION, MANIFEST,
};
pub use backend::{ExecuteKeys, LocalServer, Remote};
pub use compile_chain::ChainReport;
pub use compile_module::{
    check_learned, compile_backward, compile_learned, compile_module, linear_from_weights,
    Calibration, CompiledModule, LearnedQuantizers, ModuleReport,
};
pub use compiled::{CompiledModules, Front, Loaded};
pub use lm::{GenerateReport, LmSignature};
pub use rows::{from_rows, to_rows, RowLayout};
pub use runtime::{BoxFuture, ForwardStats, ModuleBackend, Runtime};
pub use spec::{sha256_hex, ClientSpec, ServerModule, PROTOCOL_VERSION};

use crate::fhe::{CodecError, FheError, PlanError, Precision};
use crate::model::{cut_remote_modules, runner, LinearModule, ModelError, OnnxModel, Value};
use crate::quant::QuantError;
use backend::{EncryptedBackend, FloatBackend};
use runtime::run_ready;

/// Largest spec or server-module blob we decode from disk.
const MAX_MODULE_BYTES: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum HybridError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("quantization: {0}")]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Fhe(#[from] FheError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Artefact(#[from] ArtefactError),
    #[error("the model is not compiled yet: call compile (or `hyfhe compile`) before mode {0}")]
    NotCompiled(Mode),
    #[error("mode {mode} needs {what}, which this model does not hold{hint}")]
    Missing {
        mode: Mode,
        what: &'static str,
        hint: &'static str,
    },
    #[error("no remote module `{0}` in this model")]
    UnknownRemote(String),
    /// An unknown module, with the closest names the model has.
    #[error("no remote module `{module}` in model `{model}`{hint}")]
    NoSuchModule {
        module: String,
        model: String,
        hint: String,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("remote server: {0}")]
    Remote(String),
    /// The server refused a request (kept apart so that a binding can hand the status and
    /// code to its caller, not only the text).
    #[error("remote server: server answered {status} {code}: {message}")]
    RemoteRefused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("remote server: {0}")]
    RemoteUnreachable(String),
}

/// How `forward` computes the remote modules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "server", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The float model, untouched (owner only: needs the private tree).
    Torch,
    /// Quantized values multiplied in f32, in the clear.
    Disable,
    /// The integer matmul in the clear: bit-exact with `execute` in exact precision.
    Simulate,
    /// Real FHE with client and server in this process.
    Execute,
    /// Real FHE against a server (the serving layer).
    Remote,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Mode::Torch => "torch",
            Mode::Disable => "disable",
            Mode::Simulate => "simulate",
            Mode::Execute => "execute",
            Mode::Remote => "remote",
        };
        f.write_str(s)
    }
}

/// Per-model compile settings (applied to every remote module).
#[derive(Clone, Debug, PartialEq)]
pub struct CompileOptions {
    /// Bits of inputs and weights (Concrete ML's `n_bits`); weights take at most 8.
    pub n_bits: u32,
    /// Quantize inputs per row at run time instead of with the calibrated range.
    pub dynamic_inputs: bool,
    pub precision: Precision,
    /// Top accumulator bits a bootstrap reads between two layers of a non-linear module
    /// (Concrete ML's `rounding_threshold_bits`).
    pub rounding_bits: u32,
}

impl Default for CompileOptions {
    fn default() -> Self {
        Self {
            n_bits: 8,
            dynamic_inputs: false,
            precision: Precision::Exact,
            rounding_bits: crate::fhe::pbs::DEFAULT_ROUNDING_BITS,
        }
    }
}

/// Which artefact trees [`HybridModel::load_trees`] reads (the client tree always).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trees {
    /// What a coordinator serves: client specs and the client model, no weights.
    Client,
    /// What a worker evaluates: also the quantized weights of `server/`.
    ClientAndServer,
    /// Also the owner's float model of `private/` (`torch` mode).
    All,
}

/// A model with some modules remote; see the module docs.
pub struct HybridModel {
    /// The full float model (owner only; `Torch` mode).
    private: Option<ModelProto>,
    /// Float parameters of the remote modules (owner only, until saved).
    linear: HashMap<String, LinearModule>,
    client_model: ModelProto,
    runtime: Runtime,
    /// The specs (and, owner and workers, the server modules) of the remote modules.
    compiled: CompiledModules,
    torch: OnceLock<Runtime>,
}

impl HybridModel {
    /// Select the remote modules by path. Unknown paths, nested selections and modules that are
    /// not a single linear layer are refused with the reason.
    pub fn new(name: &str, onnx: OnnxModel, remote: &[&str]) -> Result<Self, HybridError> {
        if remote.is_empty() {
            return Err(HybridError::Unsupported(
                "no remote module selected (hyfhe inspect lists the module paths)".into(),
            ));
        }
        let mut linear = HashMap::new();
        let mut modules = Vec::new();
        for &path in remote {
            if let Some(other) = remote.iter().find(|o| path.starts_with(&format!("{o}."))) {
                return Err(HybridError::Unsupported(format!(
                    "`{path}` is inside `{other}`: select each module once"
                )));
            }
            if linear.contains_key(path) {
                return Err(HybridError::Unsupported(format!(
                    "`{path}` is selected twice"
                )));
            }
            let m = onnx.linear_module(path)?;
            modules.push(m.clone());
            linear.insert(path.to_string(), m);
        }
        let client_model = cut_remote_modules(onnx.proto(), &modules);
        let runtime = Runtime::new(&client_model)?;
        Ok(Self {
            private: Some(onnx.proto().clone()),
            linear,
            client_model,
            runtime,
            compiled: CompiledModules::new(name, Front::Onnx),
            torch: OnceLock::new(),
        })
    }

    pub fn name(&self) -> &str {
        self.compiled.name()
    }

    /// The compiled modules alone (what a client session and the servers need).
    pub fn compiled(&self) -> &CompiledModules {
        &self.compiled
    }

    /// Remote modules in execution order.
    pub fn remote_modules(&self) -> Vec<String> {
        self.runtime
            .remote_modules()
            .into_iter()
            .map(String::from)
            .collect()
    }

    pub fn specs(&self) -> &BTreeMap<String, ClientSpec> {
        self.compiled.specs()
    }

    pub fn server_modules(&self) -> Option<&BTreeMap<String, ServerModule>> {
        self.compiled.server_modules()
    }

    pub fn is_compiled(&self) -> bool {
        self.compiled.is_compiled()
    }

    /// Use these keys for `execute` (models can share one set; key generation takes seconds).
    pub fn use_keys(&self, keys: Arc<ExecuteKeys>) {
        self.compiled.use_keys(keys);
    }

    fn client_graph(&self) -> &tract_onnx::pb::GraphProto {
        self.client_model.graph.as_ref().expect("validated model")
    }

    /// The model's language-model roles (`input_ids`, caches, logits), if it is one.
    pub fn lm_signature(&self) -> Result<Option<LmSignature>, HybridError> {
        LmSignature::detect(self.client_graph(), &self.runtime)
    }

    /// The graph inputs a caller feeds, in order.
    pub fn input_names(&self) -> &[String] {
        &self.runtime.inputs
    }

    /// Every input from the first one: itself for a one-input model; for a language model, token
    /// ids completed with an all-ones attention mask, positions and empty caches.
    pub fn complete_inputs(&self, first: Value) -> Result<Vec<Value>, HybridError> {
        let sig = self.lm_signature()?;
        if self.runtime.inputs.len() == 1 {
            // Token ids are checked against the vocabulary before tract gathers with them.
            return match sig {
                Some(sig) => sig.feeds(1, sig.check_ids(&first)?, None),
                None => Ok(vec![first]),
            };
        }
        let sig = sig.ok_or_else(|| {
            HybridError::Unsupported(format!(
                "the model has inputs {:?}: with several inputs, hybrid models must be language \
                 models (input_ids, attention_mask, position_ids, past_key_values.*)",
                self.runtime.inputs
            ))
        })?;
        let ids = sig.check_ids(&first)?;
        sig.feeds(self.runtime.inputs.len(), ids, None)
    }

    /// Check each input against its declared element type and shape, naming the first misfit.
    fn check_inputs(&self, inputs: &[Value]) -> Result<(), HybridError> {
        if inputs.len() != self.runtime.inputs.len() {
            return Err(ModelError::Input(format!(
                "{} input tensors for a model with inputs {:?}",
                inputs.len(),
                self.runtime.inputs
            ))
            .into());
        }
        for (name, x) in self.runtime.inputs.iter().zip(inputs) {
            runner::check_input_type(self.client_graph(), name, x.datum_type())?;
            runner::check_input_shape(self.client_graph(), name, x.shape())?;
        }
        Ok(())
    }

    /// Run `f` with the runtime and backend of `mode` (every mode but `Remote`).
    fn with_mode<T>(
        &self,
        mode: Mode,
        f: impl FnOnce(&Runtime, &dyn ModuleBackend) -> Result<T, HybridError>,
    ) -> Result<T, HybridError> {
        match mode {
            Mode::Torch => {
                let runtime = self.torch_runtime()?;
                let backend = FloatBackend {
                    modules: &self.linear,
                    ranges: Mutex::new(HashMap::new()),
                    samples: None,
                };
                f(runtime, &backend)
            }
            Mode::Disable | Mode::Simulate | Mode::Execute => self
                .compiled
                .with_backend(mode, |backend| f(&self.runtime, backend)),
            Mode::Remote => Err(HybridError::Unsupported(
                "mode remote needs a server session: HybridModel::forward_remote with a \
                 client::RemoteSession (`hyfhe run DIR --mode remote --server URL \
                 --api-key KEY`)"
                    .into(),
            )),
        }
    }

    /// One forward pass in `mode` (every mode but `Remote`, which needs a server: see
    /// [`Self::forward_remote`]). A language model may be fed its token ids alone.
    pub fn forward(&self, x: Value, mode: Mode) -> Result<(Value, ForwardStats), HybridError> {
        let inputs = self.complete_inputs(x)?;
        let (mut y, stats) = self.forward_all(inputs, mode)?;
        Ok((y.swap_remove(0), stats))
    }

    /// One forward pass from every input (in [`Self::input_names`] order) to every output.
    pub fn forward_all(
        &self,
        inputs: Vec<Value>,
        mode: Mode,
    ) -> Result<(Vec<Value>, ForwardStats), HybridError> {
        self.check_inputs(&inputs)?;
        let stats = Mutex::new(ForwardStats::default());
        let y = self.with_mode(mode, |runtime, backend| {
            run_ready(runtime.run_all(inputs, backend, &stats))
        })?;
        Ok((y, stats.into_inner().expect("stats")))
    }

    /// The cut graph with the remote modules computed in float from the original weights (owner
    /// only, before saving): equals `Torch` up to f32 rounding when the cut and im2col are right.
    pub fn forward_float(&self, x: Value) -> Result<Value, HybridError> {
        let inputs = self.complete_inputs(x)?;
        Ok(self.forward_float_all(inputs)?.swap_remove(0))
    }

    fn forward_float_all(&self, inputs: Vec<Value>) -> Result<Vec<Value>, HybridError> {
        if self.linear.is_empty() {
            return Err(HybridError::Missing {
                mode: Mode::Torch,
                what: "the float weights of the remote modules",
                hint: " (cleared by save_and_clear_private_info)",
            });
        }
        self.check_inputs(&inputs)?;
        let backend = FloatBackend {
            modules: &self.linear,
            ranges: Mutex::new(HashMap::new()),
            samples: None,
        };
        run_ready(
            self.runtime
                .run_all(inputs, &backend, &Mutex::new(ForwardStats::default())),
        )
    }

    /// Check that cutting the remote modules out left the model's function unchanged: the cut
    /// graph with float modules against the original graph, on `x`. This is what makes the
    /// liberal recognition of exporters' shape plumbing safe.
    fn verify_cut(&self, x: &Value) -> Result<(), HybridError> {
        let inputs = self.complete_inputs(x.clone())?;
        let cut = self.forward_float_all(inputs.clone())?;
        let (original, _) = self.forward_all(inputs, Mode::Torch)?;
        for ((name, a), b) in self.runtime.outputs.iter().zip(&cut).zip(&original) {
            if a.shape() != b.shape() {
                return Err(HybridError::Unsupported(format!(
                    "cutting the remote modules changes output `{name}`: shape {:?} instead of \
                     {:?} (a remote module is not the linear layer it looks like)",
                    a.shape(),
                    b.shape()
                )));
            }
            let (Ok(a), Ok(b)) = (runner::f32_values(a, name), runner::f32_values(b, name)) else {
                if a != b {
                    return Err(HybridError::Unsupported(format!(
                        "cutting the remote modules changes output `{name}` ({:?}): a remote \
                         module is not the linear layer it looks like",
                        a.datum_type()
                    )));
                }
                continue;
            };
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let nan_mismatch = a.iter().zip(b).any(|(x, y)| x.is_nan() != y.is_nan());
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            if nan_mismatch || diff > 1e-3 * (1.0 + scale) {
                return Err(HybridError::Unsupported(format!(
                    "cutting the remote modules changes output `{name}` by up to {diff:.3e} \
                     (values up to {scale:.3e}): a remote module is not the linear layer it looks \
                     like"
                )));
            }
        }
        Ok(())
    }

    /// One forward pass whose remote modules run on `remote`.
    pub async fn forward_remote(
        &self,
        x: Value,
        remote: &dyn Remote,
    ) -> Result<(Value, ForwardStats), HybridError> {
        let inputs = self.complete_inputs(x)?;
        let (mut y, stats) = self.forward_remote_all(inputs, remote).await?;
        Ok((y.swap_remove(0), stats))
    }

    /// [`Self::forward_all`] against a server.
    pub async fn forward_remote_all(
        &self,
        inputs: Vec<Value>,
        remote: &dyn Remote,
    ) -> Result<(Vec<Value>, ForwardStats), HybridError> {
        if !self.is_compiled() {
            return Err(HybridError::NotCompiled(Mode::Remote));
        }
        self.check_inputs(&inputs)?;
        let stats = Mutex::new(ForwardStats::default());
        let backend = EncryptedBackend {
            specs: self.compiled.specs(),
            remote,
        };
        let y = self
            .runtime
            .run_all(inputs, &backend, &stats)
            .instrument(tracing::info_span!("forward", model = %self.name()))
            .await?;
        Ok((y, stats.into_inner().expect("stats")))
    }

    fn lm(&self) -> Result<LmSignature, HybridError> {
        self.lm_signature()?.ok_or_else(|| {
            HybridError::Unsupported(format!(
                "generate needs a language model (an `input_ids` input); this one takes {:?}",
                self.runtime.inputs
            ))
        })
    }

    /// Greedy generation of `max_new` tokens after `prompt` (`[1, n]` or `[n]` int64/int32) in
    /// `mode` (every mode but `Remote`: see [`Self::generate_remote`]).
    pub fn generate(
        &self,
        prompt: Value,
        max_new: usize,
        mode: Mode,
    ) -> Result<GenerateReport, HybridError> {
        let sig = self.lm()?;
        let prompt = as_sequence(prompt)?;
        self.with_mode(mode, |runtime, backend| {
            run_ready(lm::generate(&sig, runtime, backend, prompt, max_new))
        })
    }

    /// [`Self::generate`] with the remote modules on `remote`.
    pub async fn generate_remote(
        &self,
        prompt: Value,
        max_new: usize,
        remote: &dyn Remote,
    ) -> Result<GenerateReport, HybridError> {
        if !self.is_compiled() {
            return Err(HybridError::NotCompiled(Mode::Remote));
        }
        let sig = self.lm()?;
        let prompt = as_sequence(prompt)?;
        let backend = EncryptedBackend {
            specs: self.compiled.specs(),
            remote,
        };
        lm::generate(&sig, &self.runtime, &backend, prompt, max_new)
            .instrument(tracing::info_span!("generate", model = %self.name()))
            .await
    }

    fn torch_runtime(&self) -> Result<&Runtime, HybridError> {
        if let Some(r) = self.torch.get() {
            return Ok(r);
        }
        let private = self.private.as_ref().ok_or(HybridError::Missing {
            mode: Mode::Torch,
            what: "the full float model",
            hint: " (it lives in the private/ tree, which is never served)",
        })?;
        let runtime = Runtime::new(private)?;
        Ok(self.torch.get_or_init(|| runtime))
    }

    /// The in-process server of `execute`, built on first use (keygen, Fourier keys).
    pub fn local_server(&self) -> Result<Arc<LocalServer>, HybridError> {
        self.compiled.local_server()
    }

    /// The client tree's model: remote modules replaced by placeholders, no private weights.
    pub fn client_model(&self) -> &ModelProto {
        &self.client_model
    }
}

/// A prompt of shape `[n]` as `[1, n]`.
fn as_sequence(prompt: Value) -> Result<Value, HybridError> {
    if prompt.rank() == 1 {
        let n = prompt.shape()[0];
        return Ok(prompt.into_shape(&[1, n]).map_err(ModelError::tract)?);
    }
    Ok(prompt)
}

/// Everything `Torch` mode needs from an f32 numpy array's shape and values.
pub fn tensor(shape: &[usize], values: &[f32]) -> Result<Value, HybridError> {
    Ok(runner::f32_tensor(shape, values)?)
}
