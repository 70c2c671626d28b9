//! Tensors that are pure functions of initializers, wherever in the graph their nodes sit.
//!
//! Exporters do not keep a module's constants under the module: the TorchScript exporter
//! de-duplicates equal initializers (every zero bias of a fresh model, equal norm weights, tied
//! tensors) and writes each duplicate as a top-level `Identity` of the one it kept; both
//! exporters cast, reshape, transpose or unsqueeze constants in the graph, and write small ones
//! as `Constant` nodes. Whether a weight or a bias is a constant is a property of its value, not
//! of the scopes of the nodes computing it: [`GraphConstants`] answers it for the whole graph.

use std::collections::HashMap;

use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto, TensorProto};

use super::{float_initializer, ModelError};

/// Most ops between an initializer and the tensor computed from it (a weight is never more than
/// a few ops from its initializer; a malformed graph may loop).
pub(super) const MAX_CHAIN: usize = 16;

/// A constant float tensor and the nodes that computed it (indices into `graph.node`, from the
/// last one back towards the initializer).
#[derive(Clone, Debug)]
pub struct Folded {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    pub nodes: Vec<usize>,
    /// The initializers it was computed from.
    pub roots: Vec<String>,
}

/// The producers and initializers of one graph, for folding constants.
pub struct GraphConstants<'a> {
    pub(super) graph: &'a GraphProto,
    pub(super) inits: HashMap<&'a str, &'a TensorProto>,
    pub(super) producer: HashMap<&'a str, usize>,
}

impl<'a> GraphConstants<'a> {
    pub fn new(graph: &'a GraphProto) -> Self {
        Self {
            graph,
            inits: graph
                .initializer
                .iter()
                .map(|t| (t.name.as_str(), t))
                .collect(),
            producer: graph
                .node
                .iter()
                .enumerate()
                .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
                .collect(),
        }
    }

    /// `name` as a float constant; `None` if it depends on a run-time value or on an op this
    /// folder does not evaluate, `Some(Err)` if a constant on the way is malformed.
    pub fn float(&self, name: &str) -> Option<Result<Folded, ModelError>> {
        self.float_within(name, MAX_CHAIN)
    }

    /// Whether `name` is a float constant this folder evaluates.
    pub fn is_float_constant(&self, name: &str) -> bool {
        matches!(self.float(name), Some(Ok(_)))
    }

    pub(super) fn float_within(
        &self,
        name: &str,
        depth: usize,
    ) -> Option<Result<Folded, ModelError>> {
        if let Some(t) = self.inits.get(name) {
            return Some(float_initializer(t).map(|(shape, values)| Folded {
                shape,
                values,
                nodes: vec![],
                roots: vec![name.to_string()],
            }));
        }
        let &p = self.producer.get(name)?;
        let depth = depth.checked_sub(1)?;
        let node = &self.graph.node[p];
        let inner = |k: usize| -> Option<Result<Folded, ModelError>> {
            let input = node.input.get(k).filter(|s| !s.is_empty())?;
            self.float_within(input, depth)
        };
        let with_node = |mut f: Folded, shape: Vec<usize>, values: Vec<f32>| {
            f.shape = shape;
            f.values = values;
            f.nodes.push(p);
            f
        };
        match node.op_type.as_str() {
            "Constant" => {
                let t = attr(node, "value").and_then(|a| a.t.as_ref())?;
                Some(float_initializer(t).map(|(shape, values)| Folded {
                    shape,
                    values,
                    nodes: vec![p],
                    roots: vec![],
                }))
            }
            // Casts between float types (the values are kept as f32 either way).
            "Cast" if matches!(attr(node, "to").map(|a| a.i), Some(1 | 10 | 11 | 16)) => {
                Some(inner(0)?.map(|f| {
                    let (s, v) = (f.shape.clone(), f.values.clone());
                    with_node(f, s, v)
                }))
            }
            "Identity" => Some(inner(0)?.map(|f| {
                let (s, v) = (f.shape.clone(), f.values.clone());
                with_node(f, s, v)
            })),
            "Transpose" => {
                let f = match inner(0)? {
                    Ok(f) => f,
                    Err(e) => return Some(Err(e)),
                };
                let rank = f.shape.len();
                let perm =
                    attr_ints(node, "perm").unwrap_or_else(|| (0..rank as i64).rev().collect());
                let perm: Option<Vec<usize>> = perm
                    .iter()
                    .map(|&a| usize::try_from(a).ok().filter(|&a| a < rank))
                    .collect();
                let perm = perm.filter(|p| {
                    let mut seen = vec![false; rank];
                    p.len() == rank && p.iter().all(|&a| !std::mem::replace(&mut seen[a], true))
                });
                let Some(perm) = perm else {
                    return Some(Err(ModelError::Decode(format!(
                        "Transpose node `{}` has an invalid perm for rank {rank}",
                        node.name
                    ))));
                };
                let (shape, values) = transpose(&f.shape, &f.values, &perm);
                Some(Ok(with_node(f, shape, values)))
            }
            // Views: the values keep their row-major order, only the shape changes.
            "Reshape" | "Unsqueeze" | "Squeeze" | "Flatten" => {
                let f = match inner(0)? {
                    Ok(f) => f,
                    Err(e) => return Some(Err(e)),
                };
                let shape = self.view_shape(node, &f.shape, depth)?;
                if shape.iter().product::<usize>() != f.values.len() {
                    return Some(Err(ModelError::Decode(format!(
                        "{} node `{}` gives shape {shape:?} to {} values",
                        node.op_type,
                        node.name,
                        f.values.len()
                    ))));
                }
                let values = f.values.clone();
                Some(Ok(with_node(f, shape, values)))
            }
            // A quantization-aware-trained weight: its learned integers, dequantized (`qdq.rs`).
            "DequantizeLinear" => self.dequantize_constant(p, depth),
            _ => None,
        }
    }

    /// The output shape of a view node applied to a constant of shape `input`; `None` if it is
    /// not computable from constants.
    fn view_shape(&self, node: &NodeProto, input: &[usize], depth: usize) -> Option<Vec<usize>> {
        let axes = || -> Option<Vec<i64>> {
            match attr_ints(node, "axes") {
                Some(a) => Some(a),
                None => match node.input.get(1).filter(|s| !s.is_empty()) {
                    Some(t) => self.ints_within(t, depth),
                    None => Some(vec![]),
                },
            }
        };
        let norm = |a: i64, rank: usize| -> Option<usize> {
            let a = if a < 0 { a + rank as i64 } else { a };
            usize::try_from(a).ok().filter(|&a| a < rank)
        };
        match node.op_type.as_str() {
            "Reshape" => {
                let target = self.ints_within(node.input.get(1)?, depth)?;
                let allow_zero = attr(node, "allowzero").is_some_and(|a| a.i != 0);
                let total: usize = input.iter().product();
                let mut out = Vec::with_capacity(target.len());
                let mut infer = None;
                for (k, &d) in target.iter().enumerate() {
                    match d {
                        -1 if infer.is_none() => {
                            infer = Some(k);
                            out.push(1);
                        }
                        0 if !allow_zero => out.push(*input.get(k)?),
                        d if d >= 0 => out.push(d as usize),
                        _ => return None,
                    }
                }
                if let Some(k) = infer {
                    let known: usize = out.iter().product();
                    if known == 0 || !total.is_multiple_of(known) {
                        return None;
                    }
                    out[k] = total / known;
                }
                Some(out)
            }
            "Unsqueeze" => {
                let axes = axes()?;
                let rank = input.len() + axes.len();
                let mut axes: Vec<usize> =
                    axes.iter().map(|&a| norm(a, rank)).collect::<Option<_>>()?;
                axes.sort_unstable();
                let mut out = input.to_vec();
                for a in axes {
                    if a > out.len() {
                        return None;
                    }
                    out.insert(a, 1);
                }
                Some(out)
            }
            "Squeeze" => {
                let axes = axes()?;
                if axes.is_empty() {
                    return Some(input.iter().copied().filter(|&d| d != 1).collect());
                }
                let axes: Vec<usize> = axes
                    .iter()
                    .map(|&a| norm(a, input.len()))
                    .collect::<Option<_>>()?;
                if axes.iter().any(|&a| input[a] != 1) {
                    return None;
                }
                Some(
                    input
                        .iter()
                        .enumerate()
                        .filter(|(k, _)| !axes.contains(k))
                        .map(|(_, &d)| d)
                        .collect(),
                )
            }
            _ => {
                let axis = attr(node, "axis").map_or(1, |a| a.i);
                let axis = if axis < 0 {
                    axis + input.len() as i64
                } else {
                    axis
                };
                let axis = usize::try_from(axis).ok().filter(|&a| a <= input.len())?;
                Some(vec![
                    input[..axis].iter().product(),
                    input[axis..].iter().product(),
                ])
            }
        }
    }

    /// An integer constant (a shape or an axes list): an INT64/INT32 initializer or `Constant`,
    /// possibly through `Identity`/`Cast`.
    fn ints_within(&self, name: &str, depth: usize) -> Option<Vec<i64>> {
        if let Some(t) = self.inits.get(name) {
            return int_values(t);
        }
        let &p = self.producer.get(name)?;
        let depth = depth.checked_sub(1)?;
        let node = &self.graph.node[p];
        match node.op_type.as_str() {
            "Constant" => int_values(attr(node, "value").and_then(|a| a.t.as_ref())?),
            "Identity" | "Cast" => self.ints_within(node.input.first()?, depth),
            _ => None,
        }
    }
}

fn int_values(t: &TensorProto) -> Option<Vec<i64>> {
    const INT32: i32 = 6;
    const INT64: i32 = 7;
    match t.data_type {
        INT64 if !t.raw_data.is_empty() => Some(
            t.raw_data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ),
        INT64 => Some(t.int64_data.clone()),
        INT32 if !t.raw_data.is_empty() => Some(
            t.raw_data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
        ),
        INT32 => Some(t.int32_data.iter().map(|&v| v as i64).collect()),
        _ => None,
    }
}

pub(super) fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

/// Row-major `values` of `shape` with its axes permuted (`out axis k` = `in axis perm[k]`).
fn transpose(shape: &[usize], values: &[f32], perm: &[usize]) -> (Vec<usize>, Vec<f32>) {
    let rank = shape.len();
    let out_shape: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
    let mut in_strides = vec![1usize; rank];
    for k in (0..rank.saturating_sub(1)).rev() {
        in_strides[k] = in_strides[k + 1] * shape[k + 1];
    }
    let mut out = Vec::with_capacity(values.len());
    let mut index = vec![0usize; rank];
    for _ in 0..values.len() {
        let src: usize = (0..rank).map(|k| index[k] * in_strides[perm[k]]).sum();
        out.push(values[src]);
        for k in (0..rank).rev() {
            index[k] += 1;
            if index[k] < out_shape[k] {
                break;
            }
            index[k] = 0;
        }
    }
    (out_shape, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_follow_onnx_perm_semantics() {
        // [2, 3] → [3, 2]
        let (s, v) = transpose(&[2, 3], &[0., 1., 2., 3., 4., 5.], &[1, 0]);
        assert_eq!(s, [3, 2]);
        assert_eq!(v, [0., 3., 1., 4., 2., 5.]);
        // [1, 2, 2] with perm [2, 0, 1]: out[k][i][j] = in[i][j][k]
        let (s, v) = transpose(&[1, 2, 2], &[0., 1., 2., 3.], &[2, 0, 1]);
        assert_eq!(s, [2, 1, 2]);
        assert_eq!(v, [0., 2., 1., 3.]);
    }
}
