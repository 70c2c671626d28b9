//! Module paths as PyTorch's `named_modules()` spells them, recovered from the names the
//! TorchScript ONNX exporter gives nodes and initializers.
//!
//! The exporter names a node `/<scope>/<scope>/…/<OpType>[_k]`, each scope being the
//! *unqualified* name of a module in the call stack: torch drops the qualified prefix but keeps
//! trailing numeric atoms, so a Sequential child is `seq.0` (under `seq`), a ModuleList entry
//! `h.0` (under `transformer`; the ModuleList is never called, so it has no scope of its own) and
//! an attribute `mlp`. Parameters keep their `state_dict` names (`seq.0.weight`), which give the
//! qualified paths of every module that owns one; scopes are resolved against those first.
//!
//! The torch.export ("dynamo") exporter names nodes after the op (`node_linear`) and records the
//! qualified module stack in each node's metadata instead ([`super::proto::node_scopes`]); where
//! that is present it wins over the name.

use std::collections::{BTreeMap, HashMap, HashSet};

use tract_onnx::pb::GraphProto;

use super::ModelError;

/// One module: its path, the nodes under it (itself and its children) and its parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleInfo {
    pub path: String,
    /// Indices into `graph.node`, in graph order.
    pub nodes: Vec<usize>,
    /// Op types of those nodes, in graph order.
    pub op_types: Vec<String>,
    /// Initializers owned by the module or consumed by its nodes: name and shape.
    pub params: Vec<(String, Vec<usize>)>,
    /// How its ops were found when the exporter's scopes disagreed with its parameters' names
    /// (`hyfhe inspect` prints it).
    pub note: Option<String>,
}

/// Every module path of a model, in `named_modules()` order (pre-order, first use).
#[derive(Clone, Debug, Default)]
pub struct ModuleTree {
    modules: Vec<ModuleInfo>,
}

impl ModuleTree {
    /// `scopes[i]`, when given, is node `i`'s module path as its exporter recorded it.
    pub fn build(graph: &GraphProto, scopes: &[Option<String>]) -> Self {
        let shapes: HashMap<&str, Vec<usize>> = graph
            .initializer
            .iter()
            .map(|t| {
                (
                    t.name.as_str(),
                    t.dims.iter().map(|&d| d.max(0) as usize).collect(),
                )
            })
            .collect();
        // Qualified paths of every module that owns a parameter, and their ancestors.
        let mut known = HashSet::new();
        for t in &graph.initializer {
            if let Some((owner, _)) = t.name.rsplit_once('.') {
                if !t.name.starts_with("onnx::") {
                    for prefix in ancestors(owner) {
                        known.insert(prefix);
                    }
                }
            }
        }

        let mut order: Vec<String> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut modules: Vec<ModuleInfo> = Vec::new();
        let mut touch = |path: &str, modules: &mut Vec<ModuleInfo>| -> usize {
            *index.entry(path.to_string()).or_insert_with(|| {
                order.push(path.to_string());
                modules.push(ModuleInfo {
                    path: path.to_string(),
                    nodes: vec![],
                    op_types: vec![],
                    params: vec![],
                    note: None,
                });
                modules.len() - 1
            })
        };
        let recorded = scopes.iter().any(Option::is_some);
        let mut paths: Vec<Option<String>> = graph
            .node
            .iter()
            .enumerate()
            .map(|(i, node)| {
                if recorded {
                    scopes.get(i).cloned().flatten()
                } else {
                    node_module_path(&node.name, &known)
                }
            })
            .collect();
        let notes = resolve_from_parameters(graph, &mut paths, &known);
        for (i, node) in graph.node.iter().enumerate() {
            let Some(path) = paths[i].clone() else {
                continue;
            };
            for prefix in ancestors(&path) {
                let m = touch(&prefix, &mut modules);
                modules[m].nodes.push(i);
                modules[m].op_types.push(node.op_type.clone());
                for input in &node.input {
                    if let Some(shape) = shapes.get(input.as_str()) {
                        let owned = &mut modules[m].params;
                        if !owned.iter().any(|(n, _)| n == input) {
                            owned.push((input.clone(), shape.clone()));
                        }
                    }
                }
            }
        }
        // Parameters no node consumes (unused weights) still show under their module.
        for t in &graph.initializer {
            if let Some((owner, _)) = t.name.rsplit_once('.') {
                if t.name.starts_with("onnx::") {
                    continue;
                }
                for prefix in ancestors(owner) {
                    let m = touch(&prefix, &mut modules);
                    if !modules[m].params.iter().any(|(n, _)| *n == t.name) {
                        modules[m]
                            .params
                            .push((t.name.clone(), shapes[t.name.as_str()].clone()));
                    }
                }
            }
        }
        for m in &mut modules {
            m.note = notes.get(&m.path).cloned();
        }
        Self { modules }
    }

    pub fn iter(&self) -> impl Iterator<Item = &ModuleInfo> {
        self.modules.iter()
    }

    pub fn get(&self, path: &str) -> Option<&ModuleInfo> {
        self.modules.iter().find(|m| m.path == path)
    }

    /// The module at `path`, or an error listing the closest valid names.
    pub fn resolve(&self, path: &str) -> Result<&ModuleInfo, ModelError> {
        self.get(path).ok_or_else(|| ModelError::UnknownModule {
            name: path.to_string(),
            closest: closest_names(path, self.modules.iter().map(|m| m.path.as_str()), 3),
        })
    }

    /// One line per module, as `hyfhe inspect` prints them.
    pub fn render(&self) -> String {
        self.render_annotated(|_| None)
    }

    /// [`Self::render`] with a line of `annotate`'s under each module it has something to say
    /// about (`hyfhe inspect`: whether the module can run remote, and why not).
    pub fn render_annotated(&self, annotate: impl Fn(&ModuleInfo) -> Option<String>) -> String {
        let mut out = String::new();
        for m in &self.modules {
            let depth = self
                .modules
                .iter()
                .filter(|o| m.path.starts_with(&format!("{}.", o.path)))
                .count();
            let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
            for op in &m.op_types {
                *ops.entry(op).or_default() += 1;
            }
            let ops: Vec<String> = ops
                .iter()
                .map(|(op, n)| {
                    if *n == 1 {
                        op.to_string()
                    } else {
                        format!("{op}×{n}")
                    }
                })
                .collect();
            let leaf = !self
                .modules
                .iter()
                .any(|o| o.path.starts_with(&format!("{}.", m.path)));
            // Folded constants (`onnx::MatMul_*`, dynamo's `val_*`) show under the leaf module
            // that uses them, when they are matrices (not shape constants).
            let params: Vec<String> = m
                .params
                .iter()
                .filter(|(name, shape)| {
                    is_own_param(&m.path, name) || (leaf && is_anonymous(name) && shape.len() >= 2)
                })
                .map(|(name, shape)| format!("{name} {shape:?}"))
                .collect();
            out.push_str(&format!(
                "{:indent$}{}  [{}]{}\n",
                "",
                m.path,
                ops.join(", "),
                if params.is_empty() {
                    String::new()
                } else {
                    format!("  {}", params.join(", "))
                },
                indent = 2 * depth
            ));
            if let Some(note) = &m.note {
                out.push_str(&format!("{:indent$}  ({note})\n", "", indent = 2 * depth));
            }
            if let Some(line) = annotate(m) {
                out.push_str(&format!("{:indent$}  → {line}\n", "", indent = 2 * depth));
            }
        }
        out
    }
}

/// The module owning a `state_dict`-named parameter (`a.b.weight` → `a.b`).
fn owner_of(param: &str) -> Option<&str> {
    if is_anonymous(param) {
        return None;
    }
    param.rsplit_once('.').map(|(owner, _)| owner)
}

/// Correct node paths where the exporter's scopes disagree with the parameters' names, which
/// keep the true `named_modules()` paths; returns a note per corrected module.
///
/// Two cases, both general:
/// - scopes that skip a level (`m.decoder.layers.0.fc1` where the parameter is
///   `m.model.decoder.layers.0.fc1.bias`): the scope path is a subsequence of the owner's path
///   ending in the same atom, and the owner has no node of its own. Every prefix of the scope is
///   mapped to the matching prefix of the owner, so the rest of that scope (a softmax beside the
///   projections) moves with it. Two owners mapping one prefix differently cancel that mapping.
/// - an op named after another module (torch.export folds a BatchNorm into the Conv before it
///   and names the fused Conv after the BatchNorm): a node that alone reads a parameter of a
///   module with no node at all belongs to that module.
fn resolve_from_parameters(
    graph: &GraphProto,
    paths: &mut [Option<String>],
    known: &HashSet<String>,
) -> HashMap<String, String> {
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let scoped = |paths: &[Option<String>]| -> HashSet<String> {
        paths.iter().flatten().flat_map(|p| ancestors(p)).collect()
    };
    let mut notes = HashMap::new();
    let mut moved: HashMap<String, String> = HashMap::new();

    // 1. Skipped levels: prefix rewrites from scope paths to their parameters' owners.
    let have_nodes = scoped(paths);
    let mut rewrites: HashMap<String, Option<String>> = HashMap::new();
    for (node, path) in graph.node.iter().zip(paths.iter()) {
        let Some(path) = path else { continue };
        for input in node.input.iter().filter(|t| inits.contains(t.as_str())) {
            let Some(owner) = owner_of(input) else {
                continue;
            };
            if owner == path || have_nodes.contains(owner) {
                continue;
            }
            for (from, to) in align(path, owner).unwrap_or_default() {
                if known.contains(&from) {
                    continue;
                }
                rewrites
                    .entry(from)
                    .and_modify(|t| {
                        if t.as_deref() != Some(to.as_str()) {
                            *t = None;
                        }
                    })
                    .or_insert(Some(to));
            }
        }
    }
    for path in paths.iter_mut().flatten() {
        let atoms: Vec<&str> = path.split('.').collect();
        let rewritten = (1..=atoms.len()).rev().find_map(|end| {
            let prefix = atoms[..end].join(".");
            let to = rewrites.get(&prefix)?.as_ref()?;
            let mut out = to.clone();
            for atom in &atoms[end..] {
                out.push('.');
                out.push_str(atom);
            }
            Some(out)
        });
        if let Some(new) = rewritten {
            moved.entry(new.clone()).or_insert_with(|| path.clone());
            *path = new;
        }
    }
    // One note where a rewrite starts, not one per module under it.
    for (new, old) in &moved {
        let under_another = ancestors(new)
            .iter()
            .rev()
            .skip(1)
            .any(|a| moved.contains_key(a));
        if !under_another {
            notes.insert(
                new.clone(),
                format!(
                    "scopes say `{old}`, and so for everything under it; its parameters give \
                     this named_modules() path"
                ),
            );
        }
    }

    // 2. Ops named after another module: the only reader of a parameter of a module with no node.
    let have_nodes = scoped(paths);
    let mut readers: HashMap<&str, usize> = HashMap::new();
    for node in &graph.node {
        for input in node.input.iter().filter(|t| inits.contains(t.as_str())) {
            *readers.entry(input.as_str()).or_default() += 1;
        }
    }
    for (node, path) in graph.node.iter().zip(paths.iter_mut()) {
        let Some(current) = path.as_deref() else {
            continue;
        };
        let orphan = node.input.iter().find_map(|t| {
            let owner = owner_of(t)?;
            let alone = inits.contains(t.as_str()) && readers.get(t.as_str()) == Some(&1);
            let elsewhere = owner != current && !current.starts_with(&format!("{owner}."));
            (alone && elsewhere && !have_nodes.contains(owner)).then_some((owner, t))
        });
        if let Some((owner, param)) = orphan {
            notes.insert(
                owner.to_string(),
                format!(
                    "{} node `{}` resolved from its parameter `{param}` (scopes say `{current}`: the exporter fused it into that module's op)",
                    node.op_type, node.name
                ),
            );
            *path = Some(owner.to_string());
        }
    }
    notes
}

/// For a scope path whose atoms are a subsequence of `owner`'s ending in the same atom, each
/// of its prefixes that differs from the matching prefix of `owner`, with that prefix.
fn align(path: &str, owner: &str) -> Option<Vec<(String, String)>> {
    let s: Vec<&str> = path.split('.').collect();
    let o: Vec<&str> = owner.split('.').collect();
    if s.last() != o.last() || s.len() >= o.len() {
        return None;
    }
    // Matched from the end: the nearest atoms are the most specific.
    let mut index = vec![0; s.len()];
    let mut j = o.len();
    for i in (0..s.len()).rev() {
        j = (0..j).rev().find(|&k| o[k] == s[i])?;
        index[i] = j;
    }
    Some(
        (0..s.len())
            .map(|i| (s[..=i].join("."), o[..=index[i]].join(".")))
            .filter(|(from, to)| from != to)
            .collect(),
    )
}

fn is_own_param(path: &str, name: &str) -> bool {
    name.strip_prefix(path)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|rest| !rest.contains('.'))
}

/// A constant the exporter named itself rather than after a `state_dict` entry.
fn is_anonymous(name: &str) -> bool {
    name.starts_with("onnx::") || !name.contains('.')
}

fn is_numeric(atom: &str) -> bool {
    !atom.is_empty() && atom.bytes().all(|b| b.is_ascii_digit())
}

/// `a.b.c` → `a`, `a.b`, `a.b.c`.
fn ancestors(path: &str) -> Vec<String> {
    let atoms: Vec<&str> = path.split('.').collect();
    let mut out = Vec::new();
    for end in 1..=atoms.len() {
        out.push(atoms[..end].join("."));
    }
    out
}

/// The qualified module path of a node named by the TorchScript exporter, or `None` for nodes
/// at the root (`/Flatten`) or named by another convention.
pub fn node_module_path(name: &str, known: &HashSet<String>) -> Option<String> {
    let rest = name.strip_prefix('/')?;
    let mut scopes: Vec<&str> = rest.split('/').collect();
    scopes.pop(); // the op type
    if scopes.is_empty() {
        return None;
    }
    let mut path = String::new();
    for scope in scopes {
        if path.is_empty() {
            path = scope.to_string();
            continue;
        }
        let joined = format!("{path}.{scope}");
        // A container child: the scope repeats the container's attribute name, then numbers.
        let merged = scope.split_once('.').and_then(|(head, tail)| {
            let last = path.rsplit('.').next().unwrap_or(&path);
            (head == last && tail.split('.').all(is_numeric)).then(|| format!("{path}.{tail}"))
        });
        path = match merged {
            _ if known.contains(&joined) => joined,
            Some(m) => m,
            None => joined,
        };
    }
    Some(path)
}

/// Up to `n` names closest to `name` (edit distance, then shared prefix), for error messages.
pub fn closest_names<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
    n: usize,
) -> Vec<String> {
    let mut scored: Vec<(usize, usize, &str)> = candidates
        .map(|c| {
            let prefix = name
                .bytes()
                .zip(c.bytes())
                .take_while(|(a, b)| a == b)
                .count();
            (levenshtein(name, c), usize::MAX - prefix, c)
        })
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(n)
        .map(|(_, _, c)| c.to_string())
        .collect()
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(paths: &[&str]) -> HashSet<String> {
        paths.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn torch_scopes_map_back_to_qualified_paths() {
        let k = known(&[
            "seq",
            "seq.0",
            "seq.2",
            "transformer",
            "transformer.h.0",
            "transformer.h.0.mlp",
            "transformer.h.0.mlp.c_fc",
        ]);
        assert_eq!(
            node_module_path("/seq/seq.0/Gemm", &k).as_deref(),
            Some("seq.0")
        );
        // A parameterless child of a Sequential (ReLU) is still `seq.1`, not `seq.seq.1`.
        assert_eq!(
            node_module_path("/seq/seq.1/Relu", &k).as_deref(),
            Some("seq.1")
        );
        assert_eq!(
            node_module_path("/transformer/h.0/mlp/c_fc/MatMul", &k).as_deref(),
            Some("transformer.h.0.mlp.c_fc")
        );
        assert_eq!(
            node_module_path("/transformer/h.0/mlp/act/Relu", &k).as_deref(),
            Some("transformer.h.0.mlp.act")
        );
        // A ModuleList entry under an unrelated parent (BERT's encoder.layer.0).
        assert_eq!(
            node_module_path("/encoder/layer.0/attention/self/query/MatMul", &known(&[]))
                .as_deref(),
            Some("encoder.layer.0.attention.self.query")
        );
        assert_eq!(node_module_path("/Flatten", &k), None);
        assert_eq!(node_module_path("Gemm_0", &k), None);
    }

    #[test]
    fn closest_names_rank_by_edit_distance() {
        let names = ["seq", "seq.0", "seq.1", "seq.2", "features.0"];
        assert_eq!(
            closest_names("seq.3", names.into_iter(), 3),
            ["seq.0", "seq.1", "seq.2"]
        );
        assert_eq!(
            closest_names("feature.0", names.into_iter(), 1),
            ["features.0"]
        );
    }
}
