//! What current exporters put where tract's protobuf types do not look: weights in an external
//! data file (`model.onnx.data`, the torch.export exporter's default) and module paths in each
//! node's `metadata_props` (`pkg.torch.onnx.name_scopes`).

use std::path::{Component, Path};

use prost::Message;
use tract_onnx::pb::ModelProto;

use super::{ModelError, MAX_MODEL_BYTES};

/// `TensorProto.DataLocation.EXTERNAL`.
const EXTERNAL: i32 = 1;
/// The key the torch.export exporter stores a node's module scopes under.
pub const NAME_SCOPES: &str = "pkg.torch.onnx.name_scopes";

/// Just enough of `ModelProto` to read `NodeProto.metadata_props` (field 9, which tract's
/// generated types predate); prost skips every other field.
#[derive(Clone, PartialEq, Message)]
struct MetaModel {
    #[prost(message, optional, tag = "7")]
    graph: Option<MetaGraph>,
}

#[derive(Clone, PartialEq, Message)]
struct MetaGraph {
    #[prost(message, repeated, tag = "1")]
    node: Vec<MetaNode>,
}

#[derive(Clone, PartialEq, Message)]
struct MetaNode {
    #[prost(message, repeated, tag = "9")]
    metadata_props: Vec<MetaEntry>,
}

#[derive(Clone, PartialEq, Message)]
struct MetaEntry {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(string, tag = "2")]
    value: String,
}

/// For each node of the main graph, the qualified module path the torch.export exporter recorded
/// (`None` for nodes at the root or without the metadata, e.g. TorchScript exports).
pub fn node_scopes(bytes: &[u8]) -> Result<Vec<Option<String>>, ModelError> {
    let meta = MetaModel::decode(bytes).map_err(|e| ModelError::Decode(e.to_string()))?;
    Ok(meta
        .graph
        .map(|g| g.node)
        .unwrap_or_default()
        .iter()
        .map(|n| {
            n.metadata_props
                .iter()
                .find(|e| e.key == NAME_SCOPES)
                .and_then(|e| innermost_scope(&e.value))
        })
        .collect())
}

/// The module path of a `name_scopes` value: a Python list literal of the qualified paths of the
/// module stack followed by the node's own name, `['', 'seq', 'seq.0', 'linear']` → `seq.0`.
/// The root (`''`) and the exporter's placeholder for nodes outside any module give `None`.
pub fn innermost_scope(value: &str) -> Option<String> {
    let inner = value.trim().strip_prefix('[')?.strip_suffix(']')?;
    let items: Vec<String> = split_literals(inner);
    let module = items.len().checked_sub(2).map(|i| &items[i])?;
    if module.is_empty() || module.starts_with("_empty_nn_module_stack") {
        None
    } else {
        Some(module.clone())
    }
}

/// The string literals of a Python list body (`'a', "b"`), unescaping `\'` and `\\`.
fn split_literals(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\'' && c != '"' {
            continue;
        }
        let quote = c;
        let mut item = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(next) = chars.next() {
                        item.push(next);
                    }
                }
                c if c == quote => break,
                c => item.push(c),
            }
        }
        out.push(item);
    }
    out
}

/// Read every initializer stored in an external file into the model, so the rest of the crate
/// sees ordinary inline tensors. Locations must be relative paths inside `dir` (an ONNX file is
/// untrusted input: it must not make us read `/etc/shadow`), and the total is bounded.
pub fn inline_external_data(proto: &mut ModelProto, dir: Option<&Path>) -> Result<(), ModelError> {
    let Some(graph) = proto.graph.as_mut() else {
        return Ok(());
    };
    let mut total = 0usize;
    let mut files: std::collections::HashMap<String, Vec<u8>> = Default::default();
    for t in graph.initializer.iter_mut() {
        if t.data_location != Some(EXTERNAL) {
            continue;
        }
        let err = |reason: String| ModelError::Tensor {
            name: t.name.clone(),
            reason,
        };
        let get = |key: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.clone())
        };
        let location =
            get("location").ok_or_else(|| err("external data without a location".into()))?;
        let Some(dir) = dir else {
            return Err(err(format!(
                "its data is in the external file `{location}`: load the model from its path"
            )));
        };
        let rel = Path::new(&location);
        if !rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(err(format!(
                "external data location `{location}` is not a relative path inside the model's \
                 directory"
            )));
        }
        let number = |key: &str| -> Result<Option<usize>, ModelError> {
            get(key)
                .map(|v| {
                    v.parse::<usize>()
                        .map_err(|_| err(format!("external data {key} `{v}` is not a number")))
                })
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let length = number("length")?;
        if !files.contains_key(&location) {
            let path = dir.join(rel);
            let size = std::fs::metadata(&path)
                .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?
                .len() as usize;
            if size > MAX_MODEL_BYTES {
                return Err(err(format!(
                    "{} holds {size} bytes, over the {MAX_MODEL_BYTES}-byte limit",
                    path.display()
                )));
            }
            let bytes = std::fs::read(&path)
                .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
            files.insert(location.clone(), bytes);
        }
        let file = &files[&location];
        let end = match length {
            Some(l) => offset.checked_add(l),
            None => Some(file.len()),
        };
        let Some(slice) = end.and_then(|end| file.get(offset..end)) else {
            return Err(err(format!(
                "external data [{offset}, {}) is outside `{location}` ({} bytes)",
                end.map_or("overflow".into(), |e| e.to_string()),
                file.len()
            )));
        };
        total += slice.len();
        if total > MAX_MODEL_BYTES {
            return Err(err(format!(
                "external data exceeds the {MAX_MODEL_BYTES}-byte limit"
            )));
        }
        t.raw_data = slice.to_vec();
        t.external_data.clear();
        t.data_location = None;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_scopes_give_the_innermost_module() {
        assert_eq!(
            innermost_scope("['', 'seq', 'seq.0', 'linear']").as_deref(),
            Some("seq.0")
        );
        assert_eq!(
            innermost_scope("['', 'transformer', 'transformer.h.0.attn.c_attn', 'view_2']")
                .as_deref(),
            Some("transformer.h.0.attn.c_attn")
        );
        assert_eq!(innermost_scope("['', 'view']"), None);
        assert_eq!(
            innermost_scope("['_empty_nn_module_stack_from_metadata_hook', 'sym_size_int_2']"),
            None
        );
        assert_eq!(innermost_scope("not a list"), None);
    }
}
