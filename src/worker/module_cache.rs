//! Served modules, their weights Fourier-transformed once at start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix::{Actor, Context, Handler, Message};

use super::JobError;
use crate::fhe::ModuleProgram;
use crate::hybrid::{CompiledModules, HybridError, Loaded, Trees};

/// Every (model, module) this worker can evaluate.
pub struct ModuleSet {
    layers: HashMap<(String, String), Arc<ModuleProgram>>,
}

impl ModuleSet {
    /// The server trees of the compiled models under `dir` (one model, or a directory of them).
    pub fn load(dir: &Path) -> Result<Self, HybridError> {
        Self::from_models(&CompiledModules::load_all(dir, Trees::ClientAndServer)?)
    }

    /// The server modules of models already loaded from their directories (either front).
    pub fn from_models(loaded: &[(PathBuf, Loaded)]) -> Result<Self, HybridError> {
        let mut layers = HashMap::new();
        for (model_dir, Loaded { modules: model, .. }) in loaded {
            let server = model.server_modules().ok_or_else(|| {
                HybridError::Unsupported(format!(
                    "{} has no server/ tree: a worker needs the output of `hyfhe compile`",
                    model_dir.display()
                ))
            })?;
            for (name, m) in server {
                let layer = ModuleProgram::new(m.plan.clone(), &m.weights.codes, m.chain.as_ref())?;
                layers.insert((model.name().to_string(), name.clone()), Arc::new(layer));
            }
        }
        Ok(Self { layers })
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    pub fn get(&self, model: &str, module: &str) -> Option<Arc<ModuleProgram>> {
        self.layers
            .get(&(model.to_string(), module.to_string()))
            .cloned()
    }
}

pub struct ModuleCache {
    modules: Arc<ModuleSet>,
}

impl ModuleCache {
    pub fn new(modules: Arc<ModuleSet>) -> Self {
        Self { modules }
    }
}

impl Actor for ModuleCache {
    type Context = Context<Self>;
}

/// The layer of `model`/`module`.
#[derive(Message)]
#[rtype(result = "Result<Arc<ModuleProgram>, JobError>")]
pub struct GetModule {
    pub model: String,
    pub module: String,
}

impl Handler<GetModule> for ModuleCache {
    type Result = Result<Arc<ModuleProgram>, JobError>;

    fn handle(&mut self, msg: GetModule, _: &mut Context<Self>) -> Self::Result {
        self.modules.get(&msg.model, &msg.module).ok_or_else(|| {
            JobError::NotFound(format!(
                "this worker serves no module `{}` of model `{}`",
                msg.module, msg.model
            ))
        })
    }
}
