//! A model's compiled remote modules, whatever front compiled them: the client specs, the server
//! modules when this side holds them, and their artefact trees.
//!
//! The ONNX front ([`super::HybridModel`]) adds a client graph around these (`client/model.onnx`);
//! the torch front (the Python package) has none, because its client runs the live PyTorch model,
//! and writes its own client files (the torch state without the remote weights) beside the specs.
//! The client manifest says which front wrote the tree (`"front"`; absent means ONNX, as before the
//! field existed), and coordinators and workers serve both: they need only the specs and the
//! server modules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::artefacts::{self, model_dirs, ArtefactError, Manifest, Tree};
use super::backend::{ClearBackend, EncryptedBackend, ExecuteKeys, LocalServer, Remote};
use super::compile_module::CompiledModule;
use super::runtime::{run_ready, ForwardStats, ModuleBackend};
use super::spec::{ClientSpec, ServerModule};
use super::{HybridError, Mode, Trees, MAX_MODULE_BYTES};
use crate::fhe::{decode, encode, ClientKey};
use crate::model::Value;
use crate::quant::InputQuantization;

/// Which front compiled a model, and so what its client runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Front {
    /// `hyfhe compile` over an ONNX export: the client runs `client/model.onnx` in tract.
    #[default]
    Onnx,
    /// `hyfhe.torch.HybridFHEModel`: the client runs the live torch model (its state, without
    /// the remote modules' weights, is in `client/torch/`).
    Torch,
}

impl Front {
    pub fn is_onnx(&self) -> bool {
        *self == Front::Onnx
    }
}

impl std::fmt::Display for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Front::Onnx => "onnx",
            Front::Torch => "torch",
        })
    }
}

/// The compiled modules of one model.
pub struct CompiledModules {
    name: String,
    front: Front,
    /// Module names in the order they were added (execution order for the ONNX front).
    order: Vec<String>,
    specs: BTreeMap<String, ClientSpec>,
    server: Option<BTreeMap<String, ServerModule>>,
    keys: Mutex<Option<Arc<ExecuteKeys>>>,
    local_server: Mutex<Option<Arc<LocalServer>>>,
}

impl CompiledModules {
    /// No modules yet; [`Self::insert`] adds them.
    pub fn new(name: &str, front: Front) -> Self {
        Self {
            name: name.to_string(),
            front,
            order: Vec::new(),
            specs: BTreeMap::new(),
            server: None,
            keys: Mutex::new(None),
            local_server: Mutex::new(None),
        }
    }

    /// Add (or replace) a compiled module; this side then holds its server module too.
    pub fn insert(&mut self, module: CompiledModule) {
        let name = module.spec.module.clone();
        if !self.order.contains(&name) {
            self.order.push(name.clone());
        }
        self.specs.insert(name.clone(), module.spec);
        self.server
            .get_or_insert_with(BTreeMap::new)
            .insert(name, module.server);
        *self.local_server.lock().expect("server") = None;
    }

    /// Drop every module (a recompile replaces them all; the execute keys stay).
    pub fn clear_modules(&mut self) {
        self.order.clear();
        self.specs.clear();
        self.server = None;
        *self.local_server.lock().expect("server") = None;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn front(&self) -> Front {
        self.front
    }

    /// Module names in order.
    pub fn module_names(&self) -> &[String] {
        &self.order
    }

    pub fn specs(&self) -> &BTreeMap<String, ClientSpec> {
        &self.specs
    }

    pub fn spec(&self, module: &str) -> Result<&ClientSpec, HybridError> {
        self.specs.get(module).ok_or_else(|| self.unknown(module))
    }

    /// An unknown module, named with the closest ones this model has.
    pub fn unknown(&self, module: &str) -> HybridError {
        let close = crate::model::closest_names(module, self.order.iter().map(String::as_str), 3);
        HybridError::NoSuchModule {
            module: module.to_string(),
            model: self.name.clone(),
            hint: if close.is_empty() {
                String::new()
            } else {
                format!(" (closest: {})", close.join(", "))
            },
        }
    }

    pub fn server_modules(&self) -> Option<&BTreeMap<String, ServerModule>> {
        self.server.as_ref()
    }

    pub fn is_compiled(&self) -> bool {
        !self.specs.is_empty()
    }

    /// Use these keys for `execute` (models can share one set; key generation takes seconds).
    pub fn use_keys(&self, keys: Arc<ExecuteKeys>) {
        *self.keys.lock().expect("keys") = Some(keys);
        *self.local_server.lock().expect("server") = None;
    }

    /// The quantized weights `mode` needs, or why this side has none.
    pub(super) fn server_for(
        &self,
        mode: Mode,
    ) -> Result<&BTreeMap<String, ServerModule>, HybridError> {
        if !self.is_compiled() {
            return Err(HybridError::NotCompiled(mode));
        }
        self.server.as_ref().ok_or(HybridError::Missing {
            mode,
            what: "the quantized weights",
            hint: " (the server/ tree: only the model owner and workers have it)",
        })
    }

    /// The in-process server of `execute`, built on first use (keygen, Fourier keys).
    pub fn local_server(&self) -> Result<Arc<LocalServer>, HybridError> {
        let server = self.server_for(Mode::Execute)?;
        let mut slot = self.local_server.lock().expect("server");
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let key = self
            .keys
            .lock()
            .expect("keys")
            .get_or_insert_with(|| Arc::new(ExecuteKeys::new(ClientKey::generate())))
            .clone();
        let s = Arc::new(LocalServer::new(key, server)?);
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Run `f` with the backend of `mode` (`disable`, `simulate` or `execute`).
    pub(super) fn with_backend<T>(
        &self,
        mode: Mode,
        f: impl FnOnce(&dyn ModuleBackend) -> Result<T, HybridError>,
    ) -> Result<T, HybridError> {
        match mode {
            Mode::Disable | Mode::Simulate => f(&ClearBackend {
                specs: &self.specs,
                server: self.server_for(mode)?,
                integer: mode == Mode::Simulate,
            }),
            Mode::Execute => {
                let server = self.local_server()?;
                f(&EncryptedBackend {
                    specs: &self.specs,
                    remote: server.as_ref(),
                })
            }
            Mode::Torch | Mode::Remote => Err(HybridError::Unsupported(format!(
                "mode {mode} has no module backend here: torch runs the float model, remote \
                 needs a server session"
            ))),
        }
    }

    /// One module on `x` (its input tensor: `[..., in]`, or NCHW for a conv) in `mode`
    /// (`disable`, `simulate` or `execute`).
    pub fn forward_module(
        &self,
        module: &str,
        x: Value,
        mode: Mode,
    ) -> Result<(Value, ForwardStats), HybridError> {
        self.spec(module)?;
        let stats = Mutex::new(ForwardStats::default());
        let y = self.with_backend(mode, |backend| {
            run_ready(backend.compute(module, x, &stats))
        })?;
        Ok((y, stats.into_inner().expect("stats")))
    }

    /// One module on `x` against a server.
    pub async fn forward_module_remote(
        &self,
        module: &str,
        x: Value,
        remote: &dyn Remote,
    ) -> Result<(Value, ForwardStats), HybridError> {
        self.spec(module)?;
        let stats = Mutex::new(ForwardStats::default());
        let backend = EncryptedBackend {
            specs: &self.specs,
            remote,
        };
        let y = backend.compute(module, x, &stats).await?;
        Ok((y, stats.into_inner().expect("stats")))
    }

    /// Write `dir/client` (the specs and `client_files`), `dir/server` and `dir/private`
    /// (`private_files`), then drop the server modules from this instance.
    pub fn save_and_clear(
        &mut self,
        dir: &Path,
        client_files: Vec<(String, Vec<u8>)>,
        private_files: Vec<(String, Vec<u8>)>,
        force: bool,
    ) -> Result<(), HybridError> {
        let server = self.server_for(Mode::Execute)?;
        artefacts::prepare_dir(dir, force)?;
        let mut files = client_files;
        for (name, spec) in &self.specs {
            files.push((format!("modules/{name}.spec"), encode(spec)));
        }
        let tree = |tree: &'static str| artefacts::TreeInfo {
            tree,
            model: &self.name,
            modules: &self.order,
            front: self.front,
        };
        artefacts::write_tree(dir, tree("client"), &files)?;
        let server_files: Vec<(String, Vec<u8>)> = server
            .iter()
            .map(|(name, m)| (format!("{name}/module.bin"), encode(m)))
            .collect();
        artefacts::write_tree(dir, tree("server"), &server_files)?;
        artefacts::write_tree(dir, tree("private"), &private_files)?;
        self.server = None;
        *self.local_server.lock().expect("server") = None;
        Ok(())
    }

    /// Load the specs of `dir/client` (required) and, unless `trees` is [`Trees::Client`], the
    /// server modules of `dir/server`, checking versions, hashes and that the trees come from
    /// one compilation. Also returns the verified client tree (its other files: the client
    /// graph, the torch state) and the private tree when `trees` is [`Trees::All`].
    pub fn load(dir: &Path, trees: Trees) -> Result<Loaded, HybridError> {
        let client = artefacts::read_tree(dir, "client")?.ok_or_else(|| {
            ArtefactError::Missing(format!(
                "{} (a directory written by `hyfhe compile` or save_and_clear_private_info)",
                dir.join("client").display()
            ))
        })?;
        let mut modules = Self::new(&client.manifest.model, client.manifest.front);
        modules.order = client.manifest.modules.clone();
        for module in &client.manifest.modules {
            let spec: ClientSpec = decode(
                client.file(&format!("modules/{module}.spec"))?,
                MAX_MODULE_BYTES,
            )?;
            if spec.module != *module {
                return Err(ArtefactError::Inconsistent(format!(
                    "spec file of `{module}` describes `{}`",
                    spec.module
                ))
                .into());
            }
            modules.specs.insert(module.clone(), spec);
        }
        check_backward_modules(&modules.specs)?;
        if trees != Trees::Client {
            if let Some(tree) = artefacts::read_tree(dir, "server")? {
                check_same_model(&client.manifest, &tree.manifest)?;
                let mut server = BTreeMap::new();
                for (name, spec) in &modules.specs {
                    let m: ServerModule =
                        decode(tree.file(&format!("{name}/module.bin"))?, MAX_MODULE_BYTES)?;
                    if m.client_spec_sha256 != spec.sha256() || m.plan != spec.plan {
                        return Err(ArtefactError::Inconsistent(format!(
                            "server module `{name}` was compiled with another client spec"
                        ))
                        .into());
                    }
                    server.insert(name.clone(), m);
                }
                modules.server = Some(server);
            }
        }
        let private = match trees {
            Trees::All => artefacts::read_tree(dir, "private")?,
            _ => None,
        };
        if let Some(p) = &private {
            check_same_model(&client.manifest, &p.manifest)?;
        }
        Ok(Loaded {
            modules,
            client,
            private,
        })
    }

    /// Every compiled model under `dir` (one model, or a directory of them), with its directory.
    pub fn load_all(dir: &Path, trees: Trees) -> Result<Vec<(PathBuf, Loaded)>, HybridError> {
        model_dirs(dir)?
            .into_iter()
            .map(|d| Ok((d.clone(), Self::load(&d, trees)?)))
            .collect()
    }
}

/// What [`CompiledModules::load`] read.
pub struct Loaded {
    pub modules: CompiledModules,
    pub client: Tree,
    pub private: Option<Tree>,
}

/// Every backward module transposes a dense module of the same model (a tree edited by hand, or
/// from another compilation, is refused before anything is served from it).
fn check_backward_modules(specs: &BTreeMap<String, ClientSpec>) -> Result<(), ArtefactError> {
    for (name, spec) in specs {
        let Some(forward) = &spec.backward_of else {
            continue;
        };
        // What the client tree can show: the shapes, and that both are plain dense products,
        // the backward one quantizing its gradients per row. The weights themselves are the
        // owner's compile output in the server tree and are not compared here.
        let fits = specs.get(forward).is_some_and(|f| {
            f.is_plain_dense()
                && f.in_features == spec.out_features
                && f.out_features == spec.in_features
        });
        if !fits {
            return Err(ArtefactError::Inconsistent(format!(
                "backward module `{name}` ({}→{}) does not transpose a dense module `{forward}` \
                 of this model",
                spec.in_features, spec.out_features
            )));
        }
        let plain = spec.output_plan.is_none()
            && matches!(spec.kind, crate::model::LinearKind::Dense)
            && matches!(spec.input, InputQuantization::DynamicPerRow { .. });
        if !plain {
            return Err(ArtefactError::Inconsistent(format!(
                "backward module `{name}` is not a dense product with per-row gradient \
                 quantization, as compile_backward builds it"
            )));
        }
    }
    Ok(())
}

fn check_same_model(client: &Manifest, other: &Manifest) -> Result<(), ArtefactError> {
    if client.model != other.model || client.modules != other.modules {
        return Err(ArtefactError::Inconsistent(format!(
            "{} tree is for model `{}` with modules {:?}, the client tree for `{}` with {:?}",
            other.format, other.model, other.modules, client.model, client.modules
        )));
    }
    Ok(())
}
