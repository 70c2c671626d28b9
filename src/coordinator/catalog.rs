//! The models a coordinator serves: their client specs (to check requests) and client trees
//! (to hand to clients). No weights: a coordinator needs only `client/`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_bytes::ByteBuf;

use crate::fhe::{EvaluationKey, Precision};
use crate::hybrid::{ClientSpec, CompiledModules, HybridError, Loaded, Trees};
use crate::protocol::{ClientBundle, ModelInfo, ModuleInfo};

pub struct ServedModel {
    pub specs: BTreeMap<String, ClientSpec>,
    pub info: ModelInfo,
    /// The msgpack-encoded [`ClientBundle`].
    pub bundle: Vec<u8>,
}

impl ServedModel {
    pub fn precisions(&self) -> BTreeSet<Precision> {
        self.specs.values().map(|s| s.plan.precision).collect()
    }

    /// The largest session request for this model: one evaluation key per precision (the exact
    /// one with bootstrapping keys when a module has activations inside) and the envelope.
    pub fn session_bytes(&self) -> usize {
        let bootstrap = self.specs.values().any(|s| s.output_plan.is_some());
        let keys: usize = self
            .precisions()
            .into_iter()
            .map(|p| match (p, bootstrap) {
                (Precision::Exact, true) => EvaluationKey::max_len(p),
                _ => EvaluationKey::expected_len(p),
            })
            .sum();
        keys + SESSION_ENVELOPE_BYTES
    }
}

/// What a session request carries besides its keys (msgpack framing, the model's name), with room.
const SESSION_ENVELOPE_BYTES: usize = 1 << 16;

pub struct Catalog {
    pub models: BTreeMap<String, ServedModel>,
}

impl Catalog {
    pub fn load(dir: &Path) -> Result<Self, HybridError> {
        Self::from_models(&CompiledModules::load_all(dir, Trees::Client)?)
    }

    /// The catalog of models already loaded from their directories (either front: a client
    /// gets the client tree as it is, with the client graph or the torch state).
    pub fn from_models(loaded: &[(PathBuf, Loaded)]) -> Result<Self, HybridError> {
        let mut models = BTreeMap::new();
        for (
            _,
            Loaded {
                modules: model,
                client: tree,
                ..
            },
        ) in loaded
        {
            let mut files: BTreeMap<String, ByteBuf> = tree
                .files
                .iter()
                .map(|(k, v)| (k.clone(), ByteBuf::from(v.clone())))
                .collect();
            let manifest = serde_json::to_vec_pretty(&tree.manifest)
                .map_err(|e| HybridError::Unsupported(e.to_string()))?;
            files.insert(crate::hybrid::MANIFEST.to_string(), ByteBuf::from(manifest));
            let name = model.name().to_string();
            let bundle = rmp_serde::to_vec_named(&ClientBundle {
                model: name.clone(),
                files,
            })
            .expect("msgpack encoding into a Vec");
            let info = ModelInfo {
                name: name.clone(),
                modules: model
                    .specs()
                    .iter()
                    .map(|(m, s)| ModuleInfo {
                        name: m.clone(),
                        precision: s.plan.precision,
                        client_spec_sha256: s.sha256(),
                        max_rows: None,
                    })
                    .collect(),
            };
            models.insert(
                name,
                ServedModel {
                    specs: model.specs().clone(),
                    info,
                    bundle,
                },
            );
        }
        Ok(Self { models })
    }

    /// The rows one request to `spec`'s module may carry when the module has its own limit:
    /// with the workers' `max_job_bytes` (coordinators and workers share one configuration).
    pub fn module_max_rows(spec: &ClientSpec, max_job_bytes: u64) -> Option<usize> {
        spec.chain_width.map(|w| {
            crate::fhe::whole_maps(
                crate::fhe::chain_rows_within(w, max_job_bytes as usize),
                spec.map_pixels(),
            )
        })
    }

    pub fn get(&self, name: &str) -> Option<&ServedModel> {
        self.models.get(name)
    }

    /// The session request body limit when `coordinator.max_session_bytes` is 0: what the
    /// largest model's keys need.
    pub fn max_session_bytes(&self) -> usize {
        self.models
            .values()
            .map(ServedModel::session_bytes)
            .max()
            .unwrap_or(SESSION_ENVELOPE_BYTES)
    }
}
