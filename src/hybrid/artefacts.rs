//! The on-disk trees `save_and_clear_private_info` writes, each with a manifest of versions and
//! content hashes, and their checked loading.
//!
//! ```text
//! DIR/client/   manifest.json, model.onnx (remote modules cut out, their weights gone),
//!               modules/<module>.spec            ← what a client downloads
//! DIR/server/   manifest.json, <module>/module.bin ← what a worker loads
//! DIR/private/  manifest.json, model.onnx (the full float model) ← owner only, never served
//! ```
//!
//! Every tree is self-contained (the client tree travels alone), so each carries its own
//! manifest: format name and version, the hyfhe version that wrote it, the model name, the
//! modules and the SHA-256 of every file. Loading refuses another format version, a missing file
//! and any byte that does not match its hash.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::compiled::Front;
use super::spec::sha256_hex;

pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
/// Largest file a tree may list (a model, a module's weights).
const MAX_FILE_BYTES: u64 = 2 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ArtefactError {
    #[error("{0} is not empty; pass --force to overwrite its client/, server/ and private/ trees")]
    NotEmpty(String),
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{0} is missing")]
    Missing(String),
    #[error("{path}: invalid manifest: {reason}")]
    Manifest { path: String, reason: String },
    #[error(
        "{path} is format `{format}` version {found}; this hyfhe ({}) reads `hyfhe-{tree}` \
         version {FORMAT_VERSION}: recompile the model with this version",
        env!("CARGO_PKG_VERSION")
    )]
    Version {
        path: String,
        tree: String,
        format: String,
        found: u32,
    },
    #[error("{path} is corrupted: SHA-256 {found}, the manifest says {expected}")]
    Corrupted {
        path: String,
        expected: String,
        found: String,
    },
    #[error("inconsistent artefacts: {0}")]
    Inconsistent(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub hyfhe_version: String,
    pub model: String,
    pub modules: Vec<String>,
    /// Which front compiled the model (client tree only; absent: ONNX, as before the field).
    #[serde(default, skip_serializing_if = "Front::is_onnx")]
    pub front: Front,
    /// Relative path → SHA-256 (hex).
    pub files: BTreeMap<String, String>,
}

/// Which tree [`write_tree`] writes, of which model.
pub struct TreeInfo<'a> {
    pub tree: &'static str,
    pub model: &'a str,
    pub modules: &'a [String],
    pub front: Front,
}

/// A loaded tree: its manifest and file contents, all verified.
pub struct Tree {
    pub manifest: Manifest,
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Tree {
    pub fn file(&self, name: &str) -> Result<&[u8], ArtefactError> {
        self.files.get(name).map(Vec::as_slice).ok_or_else(|| {
            ArtefactError::Inconsistent(format!("the manifest does not list {name}"))
        })
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ArtefactError + '_ {
    move |e| ArtefactError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Refuse a non-empty `dir` unless `force`, in which case our trees in it are removed.
pub fn prepare_dir(dir: &Path, force: bool) -> Result<(), ArtefactError> {
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(io(dir))?;
        if entries.next().is_some() {
            if !force {
                return Err(ArtefactError::NotEmpty(dir.display().to_string()));
            }
            for tree in ["client", "server", "private"] {
                let p = dir.join(tree);
                if p.exists() {
                    std::fs::remove_dir_all(&p).map_err(io(&p))?;
                }
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))
}

/// Write `files` under `dir/tree` with their manifest.
pub fn write_tree(
    dir: &Path,
    info: TreeInfo<'_>,
    files: &[(String, Vec<u8>)],
) -> Result<(), ArtefactError> {
    let TreeInfo {
        tree,
        model,
        modules,
        front,
    } = info;
    let root = dir.join(tree);
    // Created up front: a tree with no files (a private tree with nothing in it) still gets
    // its manifest, so it loads like any other.
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let mut hashes = BTreeMap::new();
    for (name, bytes) in files {
        let path = root.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(&path, bytes).map_err(io(&path))?;
        hashes.insert(name.clone(), sha256_hex(bytes));
    }
    let manifest = Manifest {
        format: format!("hyfhe-{tree}"),
        format_version: FORMAT_VERSION,
        hyfhe_version: env!("CARGO_PKG_VERSION").into(),
        model: model.into(),
        modules: modules.to_vec(),
        // The server and private trees do not depend on the front: the same module compiled by
        // either front gives byte-identical server trees.
        front: if tree == "client" { front } else { Front::Onnx },
        files: hashes,
    };
    let path = root.join(MANIFEST);
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    std::fs::write(&path, json).map_err(io(&path))
}

/// Read and verify `dir/tree`; `Ok(None)` when the tree is absent.
pub fn read_tree(dir: &Path, tree: &str) -> Result<Option<Tree>, ArtefactError> {
    let root = dir.join(tree);
    if !root.exists() {
        return Ok(None);
    }
    let manifest_path = root.join(MANIFEST);
    if !manifest_path.exists() {
        return Err(ArtefactError::Missing(manifest_path.display().to_string()));
    }
    let text = read_limited(&manifest_path, 16 << 20)?;
    let bad = |reason: String| ArtefactError::Manifest {
        path: manifest_path.display().to_string(),
        reason,
    };
    // The version is checked before the rest, so a future layout reads as a version error.
    let raw: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let format = raw
        .get("format")
        .and_then(|v| v.as_str())
        .unwrap_or("?")
        .to_string();
    let found = raw
        .get("format_version")
        .and_then(|v| v.as_u64())
        .unwrap_or(0) as u32;
    if format != format!("hyfhe-{tree}") || found != FORMAT_VERSION {
        return Err(ArtefactError::Version {
            path: manifest_path.display().to_string(),
            tree: tree.into(),
            format,
            found,
        });
    }
    let manifest: Manifest = serde_json::from_value(raw).map_err(|e| bad(e.to_string()))?;
    let mut files = BTreeMap::new();
    for (name, expected) in &manifest.files {
        let rel = Path::new(name);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(bad(format!("file path `{name}` leaves the tree")));
        }
        let path: PathBuf = root.join(rel);
        if !path.exists() {
            return Err(ArtefactError::Missing(path.display().to_string()));
        }
        let bytes = read_limited(&path, MAX_FILE_BYTES)?;
        let found = sha256_hex(&bytes);
        if &found != expected {
            return Err(ArtefactError::Corrupted {
                path: path.display().to_string(),
                expected: expected.clone(),
                found,
            });
        }
        files.insert(name.clone(), bytes);
    }
    Ok(Some(Tree { manifest, files }))
}

fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, ArtefactError> {
    let size = std::fs::metadata(path).map_err(io(path))?.len();
    if size > limit {
        return Err(ArtefactError::Io {
            path: path.display().to_string(),
            reason: format!("{size} bytes exceeds the {limit}-byte limit"),
        });
    }
    std::fs::read(path).map_err(io(path))
}

/// The compiled model directories under `dir`: `dir` itself when it holds a `client/` tree,
/// otherwise each of its subdirectories that does (sorted by name).
pub fn model_dirs(dir: &Path) -> Result<Vec<std::path::PathBuf>, ArtefactError> {
    if dir.join("client").join(MANIFEST).exists() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut dirs: Vec<_> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("client").join(MANIFEST).exists())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        return Err(ArtefactError::Missing(format!(
            "compiled models in {} (expected the output of `hyfhe compile`, or a directory of them)",
            dir.display()
        )));
    }
    Ok(dirs)
}
