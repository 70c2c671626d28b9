//! The only module that touches `tfhe`: parameters, keys, the encrypted linear-layer engine and the
//! codecs of everything it sends. It knows nothing of HTTP, Redis or models.
//!
//! Client: [`ClientKey::generate`] → [`ClientKey::evaluation_key`] (uploaded) →
//! [`ClientKey::encrypt_rows`] → … → [`ClientKey::decrypt_outputs`].
//! Server: [`SessionKey::new`] (once per session) and [`FourierLinearLayer::new`] (once per
//! layer) → [`FourierLinearLayer::evaluate`] per request.
//!
//! Layers, bottom up (no module uses one above it; a test checks there is no import cycle):
//! `params`, `fourier`, `bitpack`, `codec` → `seeded` (seeded GLWEs, exact phases) → `packing`
//! (LWE → GLWE keyswitch), `pbs` → `automorph` → `keys` (client keys, the uploaded
//! `EvaluationKey`) → `session_key` (a worker's Fourier-domain keys) → `encoding` (one
//! [`Scheme`](encoding) per encoding, the layer, the wire types) → `chain` (non-linear modules).

mod automorph;
pub mod bitpack;
mod chain;
pub mod codec;
mod encoding;
mod fourier;
mod keys;
mod packing;
pub mod params;
pub mod pbs;
mod seeded;
mod session_key;

pub use automorph::{AutoKey, FourierAutoKeys};
pub use chain::{
    chain_rows_within, gain_within_noise, table_input_variance, table_lookup, whole_maps,
    ChainProgram, ChainStage, EncryptedChain, ModuleProgram, MAX_TABLE_GAIN,
};
pub use codec::{decode, encode, CodecError, Wire};
pub use encoding::{
    decode as decode_phase, digit_bytes_per_output, outputs_per_group, AutoLayout, BlockLayout,
    EncryptedOutputs, EncryptedRows, FourierLinearLayer, CIPHERTEXTS_PER_SEED, DEFAULT_JOB_BYTES,
    MAX_ROWS,
};
pub use keys::{BlockKey, ClientKey, EvaluationKey};
pub use packing::FourierPackingKey;
pub use params::{Encoding, KeyProfile, LayerPlan, PlanError, Precision, AUTO_OUTPUTS, BLOCK_ROWS};
pub use pbs::{BootstrapKey, FourierBootstrapKey, PBS_PARAMS};
pub use session_key::SessionKey;

/// Errors of the encrypted engine; each names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum FheError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("value out of range: {0}")]
    ValueOutOfRange(String),
    #[error("parameter mismatch: {0}")]
    ParameterMismatch(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Plan(#[from] PlanError),
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The modules a file's code names through `prefix` (`super::`, `crate::fhe::`), grouped
    /// imports (`super::{a::X, b}`) included.
    fn named_after<'a>(code: &'a str, prefix: &str) -> Vec<&'a str> {
        let ident = |s: &'a str| {
            let s = s.trim_start();
            let end = s
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(s.len());
            &s[..end]
        };
        let mut names = Vec::new();
        let mut rest = code;
        while let Some(at) = rest.find(prefix) {
            let before = &rest[..at];
            rest = &rest[at + prefix.len()..];
            // The end of a longer path (`super::super::x` is not `super::x`).
            if before.ends_with("::") || (prefix == "super::" && rest.starts_with("super::")) {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let mut depth = 0;
                let mut start = 0;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            names.push(ident(&group[start..i]));
                            break;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            names.push(ident(&group[start..i]));
                            start = i + 1;
                        }
                        _ => {}
                    }
                }
            } else {
                names.push(ident(rest));
            }
        }
        names
    }

    /// A file's code without comments and without its tests (the last item, as clippy wants).
    fn code_of(text: &str) -> String {
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        code.lines()
            .map(|line| line.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The engine's modules depend on each other without a cycle (a directory counts as one
    /// module): the encodings use the keys, seeds and packing, none of which use them back.
    #[test]
    fn the_engine_modules_form_no_import_cycle() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/fhe");
        let mut files: BTreeMap<String, Vec<std::path::PathBuf>> = BTreeMap::new();
        for entry in std::fs::read_dir(&root).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                let inner = std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path());
                files.entry(name).or_default().extend(inner);
            } else if name != "mod" {
                files.entry(name).or_default().push(path);
            }
        }
        let modules: BTreeSet<String> = files.keys().cloned().collect();
        assert!(modules.contains("encoding") && modules.contains("keys"));
        let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let root = root.as_path();
        // `super::` names a sibling of `fhe`'s own files and of a directory's `mod.rs`;
        // `super::super::` does from the directory's other files.
        let sources: Vec<(String, &str, String)> = files
            .iter()
            .flat_map(|(m, paths)| {
                paths.iter().map(move |p| {
                    let text = std::fs::read_to_string(p).unwrap();
                    let parent = if p.parent() == Some(root) || p.ends_with("mod.rs") {
                        "super::"
                    } else {
                        "super::super::"
                    };
                    (m.clone(), parent, code_of(&text))
                })
            })
            .collect();
        for (m, parent, code) in &sources {
            let mut names = named_after(code, "crate::fhe::");
            names.extend(named_after(code, parent));
            for name in names {
                if let Some(target) = modules.get(name) {
                    if target != m {
                        edges.entry(m).or_default().insert(target);
                    }
                }
            }
        }
        // Depth-first search; a module met again on the current path closes a cycle.
        fn visit<'a>(
            m: &'a str,
            edges: &BTreeMap<&'a str, BTreeSet<&'a str>>,
            path: &mut Vec<&'a str>,
            done: &mut BTreeSet<&'a str>,
        ) {
            if done.contains(m) {
                return;
            }
            if let Some(at) = path.iter().position(|p| *p == m) {
                panic!("import cycle: {} -> {m}", path[at..].join(" -> "));
            }
            path.push(m);
            for next in edges.get(m).into_iter().flatten() {
                visit(next, edges, path, done);
            }
            path.pop();
            done.insert(m);
        }
        let mut done = BTreeSet::new();
        for m in &modules {
            visit(m, &edges, &mut Vec::new(), &mut done);
        }
        assert!(
            edges["encoding"].contains("keys") && edges["encoding"].contains("packing"),
            "the scan sees imports: {edges:?}"
        );
    }
}
