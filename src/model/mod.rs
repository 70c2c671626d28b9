//! ONNX models as `torch.onnx.export` writes them: module paths, the linear modules that can run
//! remotely, cutting them out of the graph, and running what stays local with `tract`.
//!
//! Nothing here knows about encryption: the cut graph holds one placeholder node per remote
//! module ([`graph::REMOTE_OP`]) and [`graph::StagePlan`] splits it into local segments (run by
//! [`runner::LocalSegment`]) and remote steps, which `hybrid` fills with a backend.

pub mod chain;
pub mod constants;
pub mod graph;
pub mod linear;
pub mod modules;
pub mod proto;
pub mod qdq;
pub mod runner;
pub mod synthetic;
mod tensor;

use std::path::Path;

use prost::Message;
use tract_onnx::pb::{GraphProto, ModelProto};

pub use graph::{cut_remote_modules, Stage, StagePlan, REMOTE_DOMAIN, REMOTE_OP};
pub use linear::{ConvGeometry, LinearKind, LinearModule};
pub use modules::{closest_names, ModuleInfo, ModuleTree};
pub use runner::{LocalSegment, Value};
pub use tensor::float_initializer;

/// Largest ONNX file we read (the fixtures are kilobytes; real hybrid models a few hundred MB).
pub const MAX_MODEL_BYTES: usize = 2 << 30;

/// Why a model could not be read, cut or run; each variant names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("not a valid ONNX model: {0}")]
    Decode(String),
    #[error("unknown module `{name}`; closest valid names: {}", .closest.join(", "))]
    UnknownModule { name: String, closest: Vec<String> },
    #[error(
        "module `{module}` contains the non-linear op {op} (node `{node}`); remote modules may \
         only hold Gemm, MatMul (+ bias Add) or Conv for now: pick its linear children instead"
    )]
    NonLinear {
        module: String,
        op: String,
        node: String,
    },
    #[error("module `{module}` cannot run remotely: {reason}")]
    Unsupported { module: String, reason: String },
    #[error("tensor `{name}`: {reason}")]
    Tensor { name: String, reason: String },
    #[error("bad input: {0}")]
    Input(String),
    #[error("tract: {0}")]
    Tract(String),
}

impl ModelError {
    pub(crate) fn tract(e: impl std::fmt::Display) -> Self {
        // tract errors are anyhow chains; `{:#}` keeps the context lines.
        Self::Tract(format!("{e:#}"))
    }
}

/// A parsed ONNX model and its module tree.
#[derive(Clone, Debug)]
pub struct OnnxModel {
    proto: ModelProto,
    modules: ModuleTree,
}

impl OnnxModel {
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let read_err = |reason: String| ModelError::Read {
            path: path.display().to_string(),
            reason,
        };
        let size = std::fs::metadata(path)
            .map_err(|e| read_err(e.to_string()))?
            .len();
        if size > MAX_MODEL_BYTES as u64 {
            return Err(read_err(format!(
                "{size} bytes exceeds the {MAX_MODEL_BYTES}-byte limit"
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| read_err(e.to_string()))?;
        Self::decode(&bytes, path.parent())
    }

    /// A model from its bytes; weights in external files are refused (load it from its path).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        Self::decode(bytes, None)
    }

    fn decode(bytes: &[u8], dir: Option<&Path>) -> Result<Self, ModelError> {
        let mut proto = ModelProto::decode(bytes).map_err(|e| ModelError::Decode(e.to_string()))?;
        proto::inline_external_data(&mut proto, dir)?;
        let scopes = proto::node_scopes(bytes)?;
        Self::with_scopes(proto, &scopes)
    }

    /// A model whose nodes carry no exporter metadata (module paths from node names only).
    pub fn from_proto(proto: ModelProto) -> Result<Self, ModelError> {
        Self::with_scopes(proto, &[])
    }

    fn with_scopes(proto: ModelProto, scopes: &[Option<String>]) -> Result<Self, ModelError> {
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| ModelError::Decode("the model has no graph".into()))?;
        if graph.input.is_empty() || graph.output.is_empty() {
            return Err(ModelError::Decode(
                "the graph has no inputs or no outputs".into(),
            ));
        }
        let modules = ModuleTree::build(graph, scopes);
        Ok(Self { proto, modules })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.proto.encode_to_vec()
    }

    pub fn proto(&self) -> &ModelProto {
        &self.proto
    }

    pub fn graph(&self) -> &GraphProto {
        self.proto.graph.as_ref().expect("checked in from_proto")
    }

    pub fn modules(&self) -> &ModuleTree {
        &self.modules
    }

    /// The linear module at `path`, ready to be quantized (errors name unknown paths, non-linear
    /// ops and unsupported attributes).
    pub fn linear_module(&self, path: &str) -> Result<LinearModule, ModelError> {
        let info = self.modules.resolve(path)?;
        if !chain::ChainModule::applies(self.graph(), info) {
            return LinearModule::extract(self.graph(), info);
        }
        let c = chain::ChainModule::extract(self.graph(), info)?;
        let last = c.layers.last().expect("one layer at least");
        let mut first = c.layers[0].clone();
        first.out_features = last.out_features;
        first.input = c.input.clone();
        first.output = c.output.clone();
        first.nodes = c.nodes.clone();
        first.initializers = c.initializers.clone();
        first.chain = Some(Box::new(c));
        // A chain's layers are quantized by the chain compiler (learned grids are not used
        // there yet): do not present the first layer's as the module's.
        first.learned = None;
        Ok(first)
    }

    /// Names of the graph inputs that are not initializers (what a caller must feed).
    pub fn input_names(&self) -> Vec<String> {
        graph::runtime_inputs(self.graph())
    }
}
