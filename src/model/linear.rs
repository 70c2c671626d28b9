//! Recognising a module as a linear layer `y = x·Wᵀ + b`: what the encrypted engine can evaluate.
//!
//! Accepted exports of a module (and nothing else in it):
//! - `Gemm(x, W, b)` (`nn.Linear` on 2-D inputs; `transB` either way, `alpha = beta = 1`);
//! - `MatMul(x, W)` with a constant `W` (in × out), optionally followed by `Add` of a constant bias
//!   (`nn.Linear` on 3-D inputs: torch folds `Wᵀ` into an `onnx::MatMul_*` constant);
//! - `Conv(x, W, b)` 2-D with `group = 1` (any stride, padding and dilation), evaluated as im2col
//!   rows of `C·kh·kw` features.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto, TensorProto};

use super::{float_initializer, ModelError, ModuleInfo};

/// Geometry of a 2-D convolution; `pads` are `[top, left, bottom, right]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvGeometry {
    pub in_channels: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pads: [usize; 4],
    pub dilation: [usize; 2],
}

impl ConvGeometry {
    /// Output height and width for an input of `h × w`, or `None` if the kernel does not fit.
    pub fn output_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let out = |size: usize, pad: usize, k: usize, d: usize, s: usize| {
            let span = d * (k - 1) + 1;
            (size + pad >= span).then(|| (size + pad - span) / s + 1)
        };
        Some((
            out(
                h,
                self.pads[0] + self.pads[2],
                self.kernel[0],
                self.dilation[0],
                self.stride[0],
            )?,
            out(
                w,
                self.pads[1] + self.pads[3],
                self.kernel[1],
                self.dilation[1],
                self.stride[1],
            )?,
        ))
    }

    pub fn features(&self) -> usize {
        self.in_channels * self.kernel[0] * self.kernel[1]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinearKind {
    /// Rows are the input's leading dimensions (`[..., in]`).
    Dense,
    /// Rows are output pixels; features `C·kh·kw` in the order of a flattened Conv weight.
    Conv(ConvGeometry),
}

/// A linear module extracted from the graph, with its float parameters (owner side only).
#[derive(Clone, Debug)]
pub struct LinearModule {
    pub path: String,
    pub kind: LinearKind,
    pub in_features: usize,
    pub out_features: usize,
    /// Row-major `out × in` (for a Conv: `out × C·kh·kw`).
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    /// The single tensor the module reads and the single one it produces.
    pub input: String,
    pub output: String,
    /// Its nodes (indices into `graph.node`) and the initializers only they use.
    pub nodes: Vec<usize>,
    pub initializers: Vec<String>,
}

impl LinearModule {
    pub fn extract(graph: &GraphProto, info: &ModuleInfo) -> Result<Self, ModelError> {
        let unsupported = |reason: String| ModelError::Unsupported {
            module: info.path.clone(),
            reason,
        };
        let nodes: Vec<&NodeProto> = info.nodes.iter().map(|&i| &graph.node[i]).collect();
        if let Some(n) = nodes
            .iter()
            .find(|n| !matches!(n.op_type.as_str(), "Gemm" | "MatMul" | "Add" | "Conv"))
        {
            return Err(ModelError::NonLinear {
                module: info.path.clone(),
                op: n.op_type.clone(),
                node: n.name.clone(),
            });
        }
        let inits: HashMap<&str, &TensorProto> = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let constant = |name: &str| -> Result<(Vec<usize>, Vec<f32>), ModelError> {
            let t = inits.get(name).ok_or_else(|| {
                unsupported(format!(
                    "`{name}` is computed at run time, not a constant weight"
                ))
            })?;
            float_initializer(t)
        };

        let ops: Vec<&str> = nodes.iter().map(|n| n.op_type.as_str()).collect();
        let (kind, in_features, out_features, weight, bias, input, output) = match ops.as_slice() {
            ["Gemm"] => {
                let n = nodes[0];
                if attr_i(n, "transA", 0) != 0 {
                    return Err(unsupported("Gemm with transA = 1".into()));
                }
                for name in ["alpha", "beta"] {
                    if attr_f(n, name, 1.0) != 1.0 {
                        return Err(unsupported(format!("Gemm with {name} ≠ 1")));
                    }
                }
                let (shape, w) = constant(input_at(n, 1)?)?;
                let [a, b] = shape[..] else {
                    return Err(unsupported(format!("Gemm weight of shape {shape:?}")));
                };
                let (out, inp, w) = if attr_i(n, "transB", 0) == 1 {
                    (a, b, w)
                } else {
                    (b, a, transpose(&w, a, b))
                };
                let bias = match n.input.get(2).filter(|s| !s.is_empty()) {
                    Some(name) => Some(bias_vector(constant(name)?, out, &unsupported)?),
                    None => None,
                };
                (
                    LinearKind::Dense,
                    inp,
                    out,
                    w,
                    bias,
                    n.input[0].clone(),
                    n.output[0].clone(),
                )
            }
            ["MatMul"] | ["MatMul", "Add"] => {
                let mm = nodes[0];
                let (shape, w) = constant(input_at(mm, 1)?)?;
                let [inp, out] = shape[..] else {
                    return Err(unsupported(format!(
                        "MatMul weight of shape {shape:?} (a 2-D constant is needed)"
                    )));
                };
                let (bias, output) = if let Some(add) = nodes.get(1) {
                    let other = match add.input.iter().position(|i| *i == mm.output[0]) {
                        Some(0) => input_at(add, 1)?,
                        Some(1) => input_at(add, 0)?,
                        _ => {
                            return Err(unsupported(
                                "its Add does not consume the MatMul output".into(),
                            ))
                        }
                    };
                    (
                        Some(bias_vector(constant(other)?, out, &unsupported)?),
                        add.output[0].clone(),
                    )
                } else {
                    (None, mm.output[0].clone())
                };
                let w = transpose(&w, inp, out);
                (
                    LinearKind::Dense,
                    inp,
                    out,
                    w,
                    bias,
                    mm.input[0].clone(),
                    output,
                )
            }
            ["Conv"] => {
                let n = nodes[0];
                if attr_i(n, "group", 1) != 1 {
                    return Err(unsupported("grouped/depthwise Conv (group ≠ 1)".into()));
                }
                if let Some(p) = attr(n, "auto_pad") {
                    let mode = String::from_utf8_lossy(&p.s);
                    if mode != "NOTSET" && mode != "VALID" {
                        return Err(unsupported(format!("Conv auto_pad = {mode}")));
                    }
                }
                let (shape, w) = constant(input_at(n, 1)?)?;
                let [out, c, kh, kw] = shape[..] else {
                    return Err(unsupported(format!(
                        "Conv weight of shape {shape:?} (only 2-D convolutions)"
                    )));
                };
                let two = |name: &str| -> Result<[usize; 2], ModelError> {
                    match attr_ints(n, name).as_deref() {
                        None => Ok([1, 1]),
                        Some([a, b]) if *a > 0 && *b > 0 => Ok([*a as usize, *b as usize]),
                        Some(v) => Err(unsupported(format!("Conv {name} = {v:?}"))),
                    }
                };
                let pads = match attr_ints(n, "pads").as_deref() {
                    None => [0; 4],
                    Some([t, l, b, r]) if [t, l, b, r].iter().all(|&&p| p >= 0) => {
                        [*t as usize, *l as usize, *b as usize, *r as usize]
                    }
                    Some(v) => return Err(unsupported(format!("Conv pads = {v:?}"))),
                };
                let geometry = ConvGeometry {
                    in_channels: c,
                    kernel: [kh, kw],
                    stride: two("strides")?,
                    pads,
                    dilation: two("dilations")?,
                };
                let bias = match n.input.get(2).filter(|s| !s.is_empty()) {
                    Some(name) => Some(bias_vector(constant(name)?, out, &unsupported)?),
                    None => None,
                };
                (
                    LinearKind::Conv(geometry),
                    geometry.features(),
                    out,
                    w,
                    bias,
                    n.input[0].clone(),
                    n.output[0].clone(),
                )
            }
            other => {
                return Err(unsupported(format!(
                    "its ops {other:?} are not one Gemm, MatMul (+ Add) or Conv"
                )))
            }
        };

        // One input, one output, as in Concrete ML: nothing outside may read an intermediate.
        let inside: HashSet<usize> = info.nodes.iter().copied().collect();
        let produced: HashSet<&str> = nodes
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str))
            .collect();
        let leaks: Vec<&str> = graph
            .node
            .iter()
            .enumerate()
            .filter(|(i, _)| !inside.contains(i))
            .flat_map(|(_, n)| n.input.iter().map(String::as_str))
            .chain(graph.output.iter().map(|o| o.name.as_str()))
            .filter(|t| produced.contains(t) && *t != output)
            .collect();
        if let Some(t) = leaks.first() {
            return Err(unsupported(format!(
                "its intermediate `{t}` is used outside it (one output per remote module)"
            )));
        }
        // Initializers that only this module reads: removed from the client's graph.
        let outside_uses: HashSet<&str> = graph
            .node
            .iter()
            .enumerate()
            .filter(|(i, _)| !inside.contains(i))
            .flat_map(|(_, n)| n.input.iter().map(String::as_str))
            .collect();
        let initializers = nodes
            .iter()
            .flat_map(|n| n.input.iter())
            .filter(|i| inits.contains_key(i.as_str()) && !outside_uses.contains(i.as_str()))
            .cloned()
            .collect();
        Ok(Self {
            path: info.path.clone(),
            kind,
            in_features,
            out_features,
            weight,
            bias,
            input,
            output,
            nodes: info.nodes.clone(),
            initializers,
        })
    }
}

fn input_at(n: &NodeProto, i: usize) -> Result<&str, ModelError> {
    n.input
        .get(i)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ModelError::Decode(format!("node `{}` lacks input {i}", n.name)))
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

fn attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    attr(n, name).map_or(default, |a| a.i)
}

fn attr_f(n: &NodeProto, name: &str, default: f32) -> f32 {
    attr(n, name).map_or(default, |a| a.f)
}

fn attr_ints(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

fn bias_vector(
    (shape, values): (Vec<usize>, Vec<f32>),
    out: usize,
    unsupported: &dyn Fn(String) -> ModelError,
) -> Result<Vec<f32>, ModelError> {
    if values.len() == out && shape.iter().rev().skip(1).all(|&d| d == 1) {
        Ok(values)
    } else {
        Err(unsupported(format!(
            "bias of shape {shape:?} for {out} outputs"
        )))
    }
}

/// `rows × cols` row-major → `cols × rows` row-major.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}
