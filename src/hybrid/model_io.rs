//! Saving a compiled ONNX-front model as its three trees and loading it back.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use prost::Message;
use tract_onnx::pb::ModelProto;

use super::{
    model_dirs, ArtefactError, CompiledModules, Front, HybridError, HybridModel, Loaded, Mode,
    Runtime, Trees,
};
use crate::model::ModelError;

impl HybridModel {
    /// Write `dir/client`, `dir/server` and `dir/private`, then drop everything private from
    /// this instance: afterwards it can only run `Remote` (load the directory for the rest).
    pub fn save_and_clear_private_info(
        &mut self,
        dir: impl AsRef<Path>,
        force: bool,
    ) -> Result<(), HybridError> {
        let private = self.private.as_ref().ok_or(HybridError::Missing {
            mode: Mode::Torch,
            what: "the full float model",
            hint: "",
        })?;
        self.compiled.save_and_clear(
            dir.as_ref(),
            vec![("model.onnx".to_string(), self.client_model.encode_to_vec())],
            vec![("model.onnx".to_string(), private.encode_to_vec())],
            force,
        )?;
        self.private = None;
        // The float runtime holds the whole private model (compile's cut check builds it).
        self.torch = OnceLock::new();
        self.linear.clear();
        Ok(())
    }

    /// Load whichever of `dir/client` (required), `dir/server` and `dir/private` exist, checking
    /// versions, hashes and that the trees come from one compilation.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, HybridError> {
        Self::load_trees(dir, Trees::All)
    }

    /// Load `trees` of a `hyfhe compile` output: a coordinator needs only the client tree and
    /// must never hold weights; a worker needs the server tree, never the private one.
    pub fn load_trees(dir: impl AsRef<Path>, trees: Trees) -> Result<Self, HybridError> {
        let dir = dir.as_ref();
        let Loaded {
            modules,
            client,
            private,
        } = CompiledModules::load(dir, trees)?;
        if modules.front() != Front::Onnx {
            return Err(HybridError::Unsupported(format!(
                "{} was compiled from a live PyTorch model (front `{}`): its client runs in \
                 PyTorch (hyfhe.torch.HybridFHEModel), so there is no client graph for \
                 `hyfhe run`; servers serve it as it is",
                dir.display(),
                modules.front()
            )));
        }
        let client_model = ModelProto::decode(client.file("model.onnx")?)
            .map_err(|e| ModelError::Decode(e.to_string()))?;
        let runtime = Runtime::new(&client_model)?;
        let mut in_graph = runtime.remote_modules();
        in_graph.sort_unstable();
        if in_graph
            != modules
                .specs()
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
        {
            return Err(ArtefactError::Inconsistent(format!(
                "the client model cuts {in_graph:?}, the manifest lists {:?}",
                client.manifest.modules
            ))
            .into());
        }
        let private = private
            .map(|tree| {
                ModelProto::decode(tree.file("model.onnx")?)
                    .map_err(|e| HybridError::from(ModelError::Decode(e.to_string())))
            })
            .transpose()?;
        Ok(Self {
            private,
            linear: HashMap::new(),
            client_model,
            runtime,
            compiled: modules,
            torch: OnceLock::new(),
        })
    }

    /// Every compiled model under `dir` (one model, or a directory of them), with its directory.
    pub fn load_all(
        dir: &Path,
        trees: Trees,
    ) -> Result<Vec<(std::path::PathBuf, Self)>, HybridError> {
        model_dirs(dir)?
            .into_iter()
            .map(|d| Ok((d.clone(), Self::load_trees(&d, trees)?)))
            .collect()
    }
}
