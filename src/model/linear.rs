//! Recognising a module as a linear layer `y = x·Wᵀ + b`: what the encrypted engine can evaluate.
//!
//! Accepted exports of a module: exactly one weighted op,
//! - `Gemm(x, W, b)` (`nn.Linear` on 2-D inputs with `transB = 1`; HF's `Conv1D`, whose weight is
//!   stored `[in, out]`, with `transB = 0`; `alpha = beta = 1`);
//! - `MatMul(x, W)` with a constant `W` (in × out), optionally followed by `Add` of a constant bias
//!   (`nn.Linear` on 3-D inputs: torch folds `Wᵀ` into an `onnx::MatMul_*` / `val_*` constant, or
//!   transposes the weight in the graph);
//! - `Conv(x, W, b)` 2-D with `group = 1` (any stride, padding and dilation), evaluated as im2col
//!   rows of `C·kh·kw` features;
//!
//! seen through views of the activation (Reshape, Flatten, Squeeze, Unsqueeze) on either side,
//! with the shape plumbing exporters write to compute those views (Shape, Gather, Slice, Concat,
//! ...) and nothing else. Rows are the leading axes of the module's input; that the cut model
//! still computes the original one is checked on calibration data when compiling.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto, TensorProto};

use super::constants::GraphConstants;
use super::qdq::QuantGrid;
use super::{ModelError, ModuleInfo};

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
    /// The nodes the module takes out of the graph (indices into `graph.node`; shape plumbing
    /// that only reads tensors of the rest of the graph stays) and the initializers only they use.
    pub nodes: Vec<usize>,
    pub initializers: Vec<String>,
    /// For a module with activations inside: all its layers (the first is the one described by
    /// the fields above, whose `out_features` is then the module's output width).
    pub chain: Option<Box<super::chain::ChainModule>>,
    /// The quantizers a quantization-aware-trained export wrote around the weighted op (QCDQ):
    /// used instead of fitted ones when compiling.
    pub learned: Option<LearnedGrid>,
}

/// A QAT layer's learned grids: its weight's, and its input's when the input is a dequantized
/// tensor (directly or through grid-preserving ops).
#[derive(Clone, Debug, PartialEq)]
pub struct LearnedGrid {
    pub weight: QuantGrid,
    pub input: Option<QuantGrid>,
}

/// Ops that change an activation's shape but not the row-major order of its values: a linear
/// layer seen through them is still the same layer on the last axis.
const VIEW_OPS: &[&str] = &["Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"];
/// Ops an exporter writes to compute shapes (`x.view(-1, nx)`, `x.size()[:-1] + (nf,)`): allowed
/// in a remote module as long as what they compute only feeds shape inputs.
const SHAPE_OPS: &[&str] = &[
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Slice",
    "Constant",
    "Cast",
    "Reshape",
    "Identity",
    "Flatten",
];
/// Ops allowed on the path from a weight initializer to the weighted op (dynamo and TorchScript
/// sometimes transpose `nn.Linear.weight` in the graph instead of folding it).
const WEIGHT_OPS: &[&str] = &["Transpose", "Identity"];
/// A quantizer written into the graph (QCDQ): on the weight's path it is folded into the weight
/// (and its grid kept), on the activation's path it stays with the client, like a view.
const QDQ_OPS: &[&str] = &["QuantizeLinear", "Clip", "DequantizeLinear"];

impl LinearModule {
    /// Recognise the module as one weighted op (Gemm, MatMul with a constant matrix, or Conv),
    /// an optional constant bias `Add`, views of the activation on either side, and the shape
    /// plumbing exporters write around them. Anything else is refused, naming the op and node.
    pub fn extract(graph: &GraphProto, info: &ModuleInfo) -> Result<Self, ModelError> {
        let unsupported = |reason: String| ModelError::Unsupported {
            module: info.path.clone(),
            reason,
        };
        let non_linear = |n: &NodeProto| ModelError::NonLinear {
            module: info.path.clone(),
            op: n.op_type.clone(),
            node: n.name.clone(),
        };
        if let Some(&i) = info.nodes.iter().find(|&&i| {
            let op = graph.node[i].op_type.as_str();
            !(matches!(op, "Gemm" | "MatMul" | "Conv" | "Add")
                || SHAPE_OPS.contains(&op)
                || WEIGHT_OPS.contains(&op)
                || QDQ_OPS.contains(&op))
        }) {
            return Err(non_linear(&graph.node[i]));
        }
        let inits: HashMap<&str, &TensorProto> = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        // Producer of each tensor, among the module's nodes.
        let producer: HashMap<&str, usize> = info
            .nodes
            .iter()
            .flat_map(|&i| graph.node[i].output.iter().map(move |o| (o.as_str(), i)))
            .collect();
        let resolver = Constants {
            folder: GraphConstants::new(graph),
            in_module: info.nodes.iter().copied().collect(),
            outside: Default::default(),
            roots: Default::default(),
        };

        // The one weighted op: Gemm/MatMul/Conv whose second input is a constant.
        let weighted: Vec<usize> = info
            .nodes
            .iter()
            .copied()
            .filter(|&i| matches!(graph.node[i].op_type.as_str(), "Gemm" | "MatMul" | "Conv"))
            .collect();
        let w_node = match weighted[..] {
            [i] => i,
            [] => {
                return Err(unsupported(
                    "it holds no Gemm, MatMul or Conv (nothing to evaluate)".into(),
                ))
            }
            [_, second, ..] => {
                return Err(unsupported(format!(
                    "it holds several weighted ops (the second is {} node `{}`): pick its \
                     children instead",
                    graph.node[second].op_type, graph.node[second].name
                )))
            }
        };
        let n = &graph.node[w_node];
        let weight_name = input_at(n, 1)?;
        let (shape, w, mut weight_nodes) = resolver.resolve(weight_name).ok_or_else(|| {
            unsupported(format!(
                "{} node `{}` multiplies by `{weight_name}`, which is computed at run time, not \
                 a constant weight",
                n.op_type, n.name
            ))
        })??;
        let weight_grid = match weight_nodes
            .iter()
            .chain(resolver.outside.borrow().iter())
            .find(|&&p| graph.node[p].op_type == "DequantizeLinear")
        {
            Some(&dq) => resolver.folder.grid(dq).transpose()?,
            None => None,
        };

        // Backwards from the weighted op's data input: views only. They stay in the client's
        // graph (a reshape reveals nothing), so the remote step sees exactly the op's operand.
        let mut views = Vec::new();
        let input = input_at(n, 0)?.to_string();
        let mut t = input.clone();
        while let Some(&p) = producer.get(t.as_str()) {
            let pn = &graph.node[p];
            if views.contains(&p) {
                return Err(ModelError::Decode(format!(
                    "node `{}` is part of a cycle",
                    pn.name
                )));
            }
            if pn.op_type == "DequantizeLinear" {
                // A learned input quantizer (QuantizeLinear → Clip → DequantizeLinear): the
                // client runs it, and the grid it produces is the module's input quantizer.
                let grid = resolver.folder.grid(p).transpose()?;
                match grid {
                    Some(g)
                        if g.nodes
                            .iter()
                            .any(|q| graph.node[*q].op_type == "QuantizeLinear") =>
                    {
                        views.extend(g.nodes.iter().copied());
                        let q = *g.nodes.last().expect("a DequantizeLinear");
                        t = input_at(&graph.node[q], 0)?.to_string();
                        continue;
                    }
                    _ => {
                        return Err(unsupported(format!(
                            "DequantizeLinear node `{}` before the {} is not a quantizer the \
                             client can run (QuantizeLinear → Clip → DequantizeLinear)",
                            pn.name, n.op_type
                        )))
                    }
                }
            }
            if !VIEW_OPS.contains(&pn.op_type.as_str()) {
                return Err(unsupported(format!(
                    "{} node `{}` transforms the activation before the {} (only reshapes may)",
                    pn.op_type, pn.name, n.op_type
                )));
            }
            views.push(p);
            t = input_at(pn, 0)?.to_string();
        }

        let (kind, in_features, out_features, weight, mut bias) = match n.op_type.as_str() {
            "Gemm" => {
                if attr_i(n, "transA", 0) != 0 {
                    return Err(unsupported("Gemm with transA = 1".into()));
                }
                for name in ["alpha", "beta"] {
                    if attr_f(n, name, 1.0) != 1.0 {
                        return Err(unsupported(format!("Gemm with {name} ≠ 1")));
                    }
                }
                let [a, b] = shape[..] else {
                    return Err(unsupported(format!("Gemm weight of shape {shape:?}")));
                };
                // HF's Conv1D stores its weight [in, out] (transB = 0); nn.Linear [out, in].
                let (out, inp, w) = if attr_i(n, "transB", 0) == 1 {
                    (a, b, w)
                } else {
                    (b, a, transpose(&w, a, b))
                };
                let bias = match n.input.get(2).filter(|s| !s.is_empty()) {
                    Some(name) => {
                        let (b, nodes) = resolver.bias(name, out, &unsupported)?;
                        weight_nodes.extend(nodes);
                        Some(b)
                    }
                    None => None,
                };
                (LinearKind::Dense, inp, out, w, bias)
            }
            "MatMul" => {
                let [inp, out] = shape[..] else {
                    return Err(unsupported(format!(
                        "MatMul weight of shape {shape:?} (a 2-D constant is needed)"
                    )));
                };
                (LinearKind::Dense, inp, out, transpose(&w, inp, out), None)
            }
            _ => {
                if attr_i(n, "group", 1) != 1 {
                    return Err(unsupported("grouped/depthwise Conv (group ≠ 1)".into()));
                }
                if let Some(p) = attr(n, "auto_pad") {
                    let mode = String::from_utf8_lossy(&p.s);
                    if mode != "NOTSET" && mode != "VALID" {
                        return Err(unsupported(format!("Conv auto_pad = {mode}")));
                    }
                }
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
                    Some(name) => {
                        let (b, nodes) = resolver.bias(name, out, &unsupported)?;
                        weight_nodes.extend(nodes);
                        Some(b)
                    }
                    None => None,
                };
                (
                    LinearKind::Conv(geometry),
                    geometry.features(),
                    out,
                    w,
                    bias,
                )
            }
        };

        let zero_kernel = matches!(kind, LinearKind::Conv(g) if g.kernel.contains(&0));
        if in_features == 0 || out_features == 0 || zero_kernel {
            return Err(unsupported(format!(
                "its weight of shape {shape:?} has an empty dimension"
            )));
        }

        // Forwards from its output: at most one constant bias Add (removed with the op), then
        // views (kept, like those before it).
        let mut removed: HashSet<usize> = weight_nodes.iter().copied().collect();
        removed.insert(w_node);
        let mut output = output_of(n)?.to_string();
        let mut t = output.clone();
        loop {
            let readers: Vec<usize> = info
                .nodes
                .iter()
                .copied()
                .filter(|i| {
                    !removed.contains(i) && !views.contains(i) && graph.node[*i].input.contains(&t)
                })
                .collect();
            let r = match readers[..] {
                [] => break,
                [r] => r,
                [_, r, ..] => {
                    return Err(unsupported(format!(
                        "its result `{t}` is read by several nodes inside it (the second is {} \
                         node `{}`)",
                        graph.node[r].op_type, graph.node[r].name
                    )))
                }
            };
            let rn = &graph.node[r];
            let position = rn.input.iter().position(|i| *i == t);
            let is_view = VIEW_OPS.contains(&rn.op_type.as_str()) && position == Some(0);
            match (rn.op_type.as_str(), position) {
                ("Add", Some(pos))
                    if bias.is_none() && t == output && !matches!(kind, LinearKind::Conv(_)) =>
                {
                    let other = input_at(rn, 1 - pos.min(1))?;
                    let (b, nodes) = resolver.bias(other, out_features, &unsupported)?;
                    bias = Some(b);
                    removed.extend(nodes);
                    removed.insert(r);
                    output = output_of(rn)?.to_string();
                }
                _ if is_view => views.push(r),
                // Shape(y) and the like: plumbing, checked below.
                ("Shape", _) => break,
                _ => return Err(non_linear(rn)),
            }
            t = output_of(rn)?.to_string();
        }
        // Everything else must be shape plumbing: never on the activation's path. Plumbing
        // that reads only what exists outside the module stays in the client's graph (exporters
        // share shape computations between modules, and shapes reveal nothing private); the
        // rest goes with the module.
        // The constants the weighted op and its bias read: whatever else reads them inside the
        // module (even a Shape) goes with it, so the client's graph never needs them.
        let private: HashSet<&str> = removed
            .iter()
            .flat_map(|&i| graph.node[i].input.iter().map(String::as_str))
            .filter(|t| inits.contains_key(t))
            .collect();
        for &i in &info.nodes {
            if removed.contains(&i) || views.contains(&i) {
                continue;
            }
            let node = &graph.node[i];
            if !SHAPE_OPS.contains(&node.op_type.as_str()) {
                return Err(non_linear(node));
            }
            if node.input.iter().any(|t| private.contains(t.as_str())) {
                removed.insert(i);
                continue;
            }
            // The module's output still exists after the cut (the remote step produces it).
            let reads_removed = node.input.iter().any(|t| {
                *t != output
                    && producer
                        .get(t.as_str())
                        .is_some_and(|p| removed.contains(p))
            });
            if reads_removed {
                removed.insert(i);
            }
        }
        let mut nodes: Vec<usize> = removed.iter().copied().collect();
        nodes.sort_unstable();

        // One input, one output, as in Concrete ML: nothing outside may read an intermediate.
        let produced: HashSet<&str> = nodes
            .iter()
            .flat_map(|&i| graph.node[i].output.iter().map(String::as_str))
            .collect();
        let outside_uses: HashSet<&str> = graph
            .node
            .iter()
            .enumerate()
            .filter(|(i, _)| !removed.contains(i))
            .flat_map(|(_, n)| n.input.iter().map(String::as_str))
            .collect();
        let leak = outside_uses
            .iter()
            .copied()
            .chain(graph.output.iter().map(|o| o.name.as_str()))
            .find(|t| produced.contains(t) && *t != output);
        if let Some(t) = leak {
            return Err(unsupported(format!(
                "its intermediate `{t}` is used outside it (one output per remote module)"
            )));
        }
        for name in private.iter().filter(|t| outside_uses.contains(*t)) {
            // A weight shared with the local graph (a tied embedding) cannot be taken away.
            tracing::warn!(
                module = %info.path,
                "`{name}` is also read outside the module: it stays in the client's model"
            );
        }
        // Initializers that only the removed nodes read: removed from the client's graph.
        let mut initializers: Vec<String> = Vec::new();
        for &i in &nodes {
            for t in &graph.node[i].input {
                if inits.contains_key(t.as_str())
                    && !outside_uses.contains(t.as_str())
                    && !initializers.contains(t)
                {
                    initializers.push(t.clone());
                }
            }
        }
        // And those computed into its constants by nodes outside it (a de-duplicated bias behind
        // a top-level Identity), when nothing else reads them: the cut drops those nodes with
        // their last reader.
        let outside = resolver.outside.borrow();
        for root in resolver.roots.borrow().iter() {
            if !initializers.contains(root) && only_feeds(graph, root, &removed, &outside) {
                initializers.push(root.clone());
            }
        }
        let learned = match weight_grid {
            Some(weight) => Some(LearnedGrid {
                weight,
                input: resolver.folder.activation_grid(&input).transpose()?,
            }),
            None => None,
        };
        Ok(Self {
            path: info.path.clone(),
            kind,
            in_features,
            out_features,
            weight,
            bias,
            input,
            output,
            nodes,
            initializers,
            chain: None,
            learned,
        })
    }
}

/// A module's constants: any pure function of initializers the graph computes (wherever its
/// nodes sit: [`GraphConstants`]), with the module's own nodes among those that computed it
/// (they go with the module; nodes outside it stay, and the cut drops them once nothing reads
/// them).
struct Constants<'a> {
    folder: GraphConstants<'a>,
    in_module: HashSet<usize>,
    /// What the resolved constants were computed from: nodes outside the module, initializers.
    outside: std::cell::RefCell<HashSet<usize>>,
    roots: std::cell::RefCell<Vec<String>>,
}

type Resolved = Result<(Vec<usize>, Vec<f32>, Vec<usize>), ModelError>;

impl Constants<'_> {
    /// `name`'s shape and values, with the module nodes that computed it; `None` if it depends
    /// on a run-time value.
    fn resolve(&self, name: &str) -> Option<Resolved> {
        Some(self.folder.float(name)?.map(|f| {
            let (nodes, outside): (Vec<usize>, Vec<usize>) = f
                .nodes
                .into_iter()
                .partition(|p| self.in_module.contains(p));
            self.outside.borrow_mut().extend(outside);
            self.roots.borrow_mut().extend(f.roots);
            (f.shape, f.values, nodes)
        }))
    }

    fn bias(
        &self,
        name: &str,
        out: usize,
        unsupported: &dyn Fn(String) -> ModelError,
    ) -> Result<(Vec<f32>, Vec<usize>), ModelError> {
        let (shape, values, nodes) = self.resolve(name).ok_or_else(|| {
            unsupported(format!(
                "its Add reads `{name}`, computed at run time, not a constant bias"
            ))
        })??;
        Ok((bias_vector((shape, values), out, unsupported)?, nodes))
    }
}

/// Whether every reader of `tensor` is in `sinks`, or in `through` with all its outputs read
/// only that way (and no graph output on the way).
fn only_feeds(
    graph: &GraphProto,
    tensor: &str,
    sinks: &HashSet<usize>,
    through: &HashSet<usize>,
) -> bool {
    let mut stack = vec![tensor.to_string()];
    let mut seen = HashSet::new();
    while let Some(t) = stack.pop() {
        if graph.output.iter().any(|o| o.name == t) {
            return false;
        }
        if !seen.insert(t.clone()) {
            continue;
        }
        for (i, n) in graph.node.iter().enumerate() {
            if !n.input.contains(&t) || sinks.contains(&i) {
                continue;
            }
            if !through.contains(&i) {
                return false;
            }
            stack.extend(n.output.iter().cloned());
        }
    }
    true
}

fn output_of(n: &NodeProto) -> Result<&str, ModelError> {
    n.output
        .first()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ModelError::Decode(format!("node `{}` has no output", n.name)))
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
