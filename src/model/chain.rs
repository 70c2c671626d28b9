//! Recognising a module as a chain of linear layers with element-wise activations between them
//! (`Sequential(Linear, ReLU, Linear)`, an MLP block, ...): what the encrypted engine evaluates with
//! programmable bootstrapping.
//!
//! The module's weighted ops (Gemm, MatMul with a constant, Conv) are found first; each becomes a
//! one-op [`LinearModule`] (same rules as a linear-only module, and an optional
//! `BatchNormalization` right after it is folded into its weights). What lies between two of them
//! must be an element-wise function of one tensor with scalar constants (Relu, LeakyRelu,
//! Sigmoid, Tanh, Gelu, the `Erf`/`Tanh` forms of GELU, SiLU as `x·Sigmoid(x)`, Elu, Softplus,
//! HardSigmoid/HardSwish, Clip, and the arithmetic exporters write around them): it is kept as
//! its ONNX nodes and evaluated point by point ([`Activation::apply`]) when compile builds the
//! lookup tables. Anything else is refused, naming the op.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{GraphProto, NodeProto};

use super::constants::GraphConstants;
use super::linear::{ConvGeometry, LinearKind};
use super::{float_initializer, LinearModule, ModelError, ModuleInfo};

/// Ops allowed inside an activation (element-wise on one tensor, scalar constants).
const ELEMENTWISE: &[&str] = &[
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Gelu",
    "Erf",
    "Elu",
    "Selu",
    "Softplus",
    "HardSigmoid",
    "HardSwish",
    "Clip",
    "Exp",
    "Abs",
    "Neg",
    "Sqrt",
    "Pow",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Identity",
    "Cast",
    "Constant",
];

/// An element-wise function given by the ONNX nodes that compute it from `input` to `output`.
#[derive(Clone, Debug)]
pub struct Activation {
    /// A short name for reports: the distinctive op (`Relu`, `Gelu` from `Erf`, ...).
    pub name: String,
    input: String,
    output: String,
    nodes: Vec<NodeProto>,
    /// Scalar constants the nodes read.
    constants: HashMap<String, f32>,
}

impl Activation {
    /// `f(x)` in f64 (the tables are built from it).
    pub fn apply(&self, x: f64) -> f64 {
        let mut values: HashMap<&str, f64> = HashMap::new();
        values.insert(self.input.as_str(), x);
        for n in &self.nodes {
            let get = |i: usize| -> f64 {
                let name = n.input.get(i).map(String::as_str).unwrap_or("");
                values
                    .get(name)
                    .copied()
                    .or_else(|| self.constants.get(name).map(|&c| c as f64))
                    .unwrap_or(f64::NAN)
            };
            let a = get(0);
            let attr_f = |name: &str, default: f64| {
                n.attribute
                    .iter()
                    .find(|a| a.name == name)
                    .map_or(default, |a| a.f as f64)
            };
            let v = match n.op_type.as_str() {
                "Relu" => a.max(0.0),
                "LeakyRelu" => {
                    if a >= 0.0 {
                        a
                    } else {
                        attr_f("alpha", 0.01) * a
                    }
                }
                "Sigmoid" => 1.0 / (1.0 + (-a).exp()),
                "Tanh" => a.tanh(),
                "Erf" => erf(a),
                "Gelu" => {
                    let tanh_form = n
                        .attribute
                        .iter()
                        .any(|at| at.name == "approximate" && at.s == b"tanh");
                    if tanh_form {
                        0.5 * a
                            * (1.0
                                + ((2.0 / std::f64::consts::PI).sqrt()
                                    * (a + 0.044715 * a.powi(3)))
                                .tanh())
                    } else {
                        0.5 * a * (1.0 + erf(a / std::f64::consts::SQRT_2))
                    }
                }
                "Elu" => {
                    if a >= 0.0 {
                        a
                    } else {
                        attr_f("alpha", 1.0) * (a.exp() - 1.0)
                    }
                }
                "Selu" => {
                    let (alpha, gamma) = (attr_f("alpha", 1.673_263_2), attr_f("gamma", 1.050_701));
                    gamma * if a > 0.0 { a } else { alpha * (a.exp() - 1.0) }
                }
                "Softplus" => a.exp().ln_1p(),
                "HardSigmoid" => (attr_f("alpha", 0.2) * a + attr_f("beta", 0.5)).clamp(0.0, 1.0),
                "HardSwish" => a * (a / 6.0 + 0.5).clamp(0.0, 1.0),
                "Clip" => {
                    let lo = if n.input.len() > 1 && !n.input[1].is_empty() {
                        get(1)
                    } else {
                        f64::NEG_INFINITY
                    };
                    let hi = if n.input.len() > 2 && !n.input[2].is_empty() {
                        get(2)
                    } else {
                        f64::INFINITY
                    };
                    a.clamp(lo, hi)
                }
                "Exp" => a.exp(),
                "Abs" => a.abs(),
                "Neg" => -a,
                "Sqrt" => a.sqrt(),
                "Pow" => a.powf(get(1)),
                "Add" => a + get(1),
                "Sub" => a - get(1),
                "Mul" => a * get(1),
                "Div" => a / get(1),
                "Constant" => continue,
                _ => a, // Identity, Cast (to float: checked when extracted)
            };
            if let Some(o) = n.output.first() {
                values.insert(o.as_str(), v);
            }
        }
        values
            .get(self.output.as_str())
            .copied()
            .unwrap_or(f64::NAN)
    }

    /// `x ↦ x` (two linear layers with nothing between them).
    fn identity(tensor: &str) -> Self {
        Self {
            name: "Identity".into(),
            input: tensor.into(),
            output: tensor.into(),
            nodes: vec![],
            constants: HashMap::new(),
        }
    }
}

/// `erf` to about 1e-7 (Abramowitz–Stegun 7.1.26 is too coarse for a 2^-6 table; this is the
/// series for small `|x|` and the continued fraction's asymptote beyond).
fn erf(x: f64) -> f64 {
    if x.abs() < 3.0 {
        let mut sum = 0.0;
        let mut term = x;
        for k in 0..80 {
            sum += term / (2 * k + 1) as f64;
            term *= -x * x / (k + 1) as f64;
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        let t = 1.0 / (x.abs() * x.abs());
        let tail = (-x * x).exp() / (x.abs() * std::f64::consts::PI.sqrt())
            * (1.0 - 0.5 * t + 0.75 * t * t);
        x.signum() * (1.0 - tail)
    }
}

/// What a residual block adds to its last layer's result before the final activation.
#[derive(Clone, Debug)]
pub enum Shortcut {
    /// The block's input itself (same channels, same map).
    Identity,
    /// A 1×1 convolution of the block's input (ResNet's `downsample`, its BatchNorm folded), with
    /// the first convolution's stride.
    Projection(Box<LinearModule>),
}

/// A chain module: its linear layers in order and the activation after each (the last layer's is
/// `None` when the module ends with a linear layer).
#[derive(Clone, Debug)]
pub struct ChainModule {
    pub layers: Vec<LinearModule>,
    /// `activations[k]` follows `layers[k]` (for the last layer, after the shortcut is added).
    pub activations: Vec<Option<Activation>>,
    /// A residual block's shortcut, added to the last layer's result (two convolutions only).
    pub shortcut: Option<Shortcut>,
    pub input: String,
    pub output: String,
    pub nodes: Vec<usize>,
    pub initializers: Vec<String>,
}

impl ChainModule {
    /// Whether a later layer convolves the first one's map: the server then gathers patches of
    /// whole images, and the module is compiled for one map size.
    pub fn convolves(&self) -> bool {
        self.layers.len() > 1
            && self
                .layers
                .iter()
                .all(|l| matches!(l.kind, LinearKind::Conv(_)))
    }
}

impl ChainModule {
    /// Whether a module holds more than one weighted op or an op a linear module refuses: then
    /// it is extracted as a chain.
    pub fn applies(graph: &GraphProto, info: &ModuleInfo) -> bool {
        let weighted = info
            .nodes
            .iter()
            .filter(|&&i| is_weighted(&graph.node[i]))
            .count();
        // A quantizer's Clip (QCDQ) is not an activation.
        let quantizer_clip = |i: usize| {
            graph.node[i].op_type == "Clip" && GraphConstants::new(graph).is_quantizer_clip(i)
        };
        weighted > 1
            || weighted == 1
                && info.nodes.iter().any(|&i| {
                    let op = graph.node[i].op_type.as_str();
                    ELEMENTWISE.contains(&op)
                        && !matches!(op, "Add" | "Identity" | "Constant" | "Cast")
                        && !quantizer_clip(i)
                        || op == "BatchNormalization"
                })
    }

    pub fn extract(graph: &GraphProto, info: &ModuleInfo) -> Result<Self, ModelError> {
        let unsupported = |reason: String| ModelError::Unsupported {
            module: info.path.clone(),
            reason,
        };
        let in_module: HashSet<usize> = info.nodes.iter().copied().collect();
        let producer: HashMap<&str, usize> = info
            .nodes
            .iter()
            .flat_map(|&i| graph.node[i].output.iter().map(move |o| (o.as_str(), i)))
            .collect();
        let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let folder = GraphConstants::new(graph);

        // 1. One segment per weighted op: the op, the nodes computing its constant operands,
        //    a bias Add right after it and a BatchNormalization after that.
        let weighted: Vec<usize> = info
            .nodes
            .iter()
            .copied()
            .filter(|&i| is_weighted(&graph.node[i]))
            .collect();
        if weighted.is_empty() {
            return Err(unsupported(
                "it holds no Gemm, MatMul or Conv (nothing to evaluate)".into(),
            ));
        }
        let mut taken: HashSet<usize> = HashSet::new();
        let mut layers = Vec::new();
        let mut batch_norms: Vec<Option<usize>> = Vec::new();
        for &w in &weighted {
            let mut seg = vec![w];
            for input in graph.node[w].input.iter().skip(1) {
                constant_producers(input, &folder, &in_module, &mut seg);
            }
            let mut out = graph.node[w].output[0].clone();
            // A bias Add (MatMul exports) and a BatchNormalization reading the op's result.
            let readers = |t: &str| -> Vec<usize> {
                info.nodes
                    .iter()
                    .copied()
                    .filter(|&i| graph.node[i].input.iter().any(|x| x == t))
                    .collect()
            };
            if let [r] = readers(&out)[..] {
                let n = &graph.node[r];
                if n.op_type == "Add" && graph.node[w].op_type == "MatMul" {
                    let other = n
                        .input
                        .iter()
                        .find(|x| **x != out)
                        .cloned()
                        .unwrap_or_default();
                    let mut bias_nodes = vec![];
                    if inits.contains(other.as_str())
                        || constant_producers(&other, &folder, &in_module, &mut bias_nodes)
                    {
                        seg.push(r);
                        seg.extend(bias_nodes);
                        out = n.output[0].clone();
                    }
                }
            }
            let mut bn = None;
            if let [r] = readers(&out)[..] {
                if graph.node[r].op_type == "BatchNormalization" {
                    bn = Some(r);
                }
            }
            let sub = ModuleInfo {
                path: info.path.clone(),
                nodes: {
                    let mut s = seg.clone();
                    s.sort_unstable();
                    s.dedup();
                    s
                },
                op_types: vec![],
                params: vec![],
                note: None,
            };
            let mut layer = LinearModule::extract(graph, &sub)?;
            if let Some(r) = bn {
                fold_batch_norm(graph, &graph.node[r], &mut layer, &unsupported)?;
                layer.output = graph.node[r].output[0].clone();
                seg.push(r);
                for input in graph.node[r].input.iter().skip(1) {
                    constant_producers(input, &folder, &in_module, &mut seg);
                }
            }
            taken.extend(seg.iter().copied());
            batch_norms.push(bn);
            layers.push(layer);
        }

        // 2. Between consecutive layers and after the last: an element-wise function.
        let shortcut =
            residual(graph, info, &folder, &mut layers, &mut taken).map_err(unsupported)?;
        let mut activations = Vec::new();
        for k in 0..layers.len() {
            let mut from = layers[k].output.clone();
            if k + 1 == layers.len() {
                if let Some((_, add)) = &shortcut {
                    from = graph.node[*add].output[0].clone();
                }
            }
            let to = layers.get(k + 1).map(|l| l.input.clone());
            let act = activation_between(graph, info, &in_module, &taken, &from, to.as_deref())
                .map_err(unsupported)?;
            if let Some(a) = &act {
                for &i in &a.1 {
                    taken.insert(i);
                }
            }
            if k + 1 < layers.len() && act.is_none() {
                activations.push(Some(Activation::identity(&from)));
            } else {
                activations.push(act.map(|a| a.0));
            }
        }
        check_conv_chain(&layers, shortcut.as_ref().map(|s| &s.0), &activations)
            .map_err(unsupported)?;

        // 3. Everything else must be shape plumbing that stays with the client, or a view of
        //    the input before the first layer.
        for &i in &info.nodes {
            if taken.contains(&i) {
                continue;
            }
            let n = &graph.node[i];
            let op = n.op_type.as_str();
            let plumbing = matches!(
                op,
                "Shape"
                    | "Gather"
                    | "Unsqueeze"
                    | "Squeeze"
                    | "Concat"
                    | "Slice"
                    | "Constant"
                    | "Cast"
                    | "Reshape"
                    | "Identity"
                    | "Flatten"
            );
            let reads_taken = n
                .input
                .iter()
                .any(|t| producer.get(t.as_str()).is_some_and(|p| taken.contains(p)));
            if !plumbing || reads_taken {
                return Err(ModelError::NonLinear {
                    module: info.path.clone(),
                    op: n.op_type.clone(),
                    node: n.name.clone(),
                });
            }
        }
        let output = match activations.last() {
            Some(Some(a)) => a.output.clone(),
            _ => layers.last().expect("one layer at least").output.clone(),
        };
        // One output, as for a linear module: nothing outside reads an intermediate.
        let produced: HashSet<&str> = taken
            .iter()
            .flat_map(|&i| graph.node[i].output.iter().map(String::as_str))
            .collect();
        let leak = graph
            .node
            .iter()
            .enumerate()
            .filter(|(i, _)| !taken.contains(i))
            .flat_map(|(_, n)| n.input.iter().map(String::as_str))
            .chain(graph.output.iter().map(|o| o.name.as_str()))
            .find(|t| produced.contains(t) && *t != output);
        if let Some(t) = leak {
            return Err(unsupported(format!(
                "its intermediate `{t}` is used outside it (one output per remote module)"
            )));
        }
        let mut nodes: Vec<usize> = taken.into_iter().collect();
        nodes.sort_unstable();
        let mut initializers: Vec<String> = layers
            .iter()
            .flat_map(|l| l.initializers.iter().cloned())
            .collect();
        for &r in batch_norms.iter().flatten() {
            for t in graph.node[r].input.iter().skip(1) {
                if inits.contains(t.as_str()) && !initializers.contains(t) {
                    initializers.push(t.clone());
                }
            }
        }
        if let Some((Shortcut::Projection(p), _)) = &shortcut {
            for t in &p.initializers {
                if !initializers.contains(t) {
                    initializers.push(t.clone());
                }
            }
        }
        Ok(Self {
            input: layers[0].input.clone(),
            output,
            layers,
            activations,
            shortcut: shortcut.map(|s| s.0),
            nodes,
            initializers,
        })
    }
}

/// Find a residual `Add` (two run-time operands: the last layer's result and the block's input
/// or a 1×1 projection of it), take it and the projection out of the layer list, and return the
/// shortcut with the Add's node.
fn residual(
    graph: &GraphProto,
    info: &ModuleInfo,
    folder: &GraphConstants,
    layers: &mut Vec<LinearModule>,
    taken: &mut HashSet<usize>,
) -> Result<Option<(Shortcut, usize)>, String> {
    let produced_by = |t: &str| layers.iter().position(|l| l.output == t);
    // The block's input: what a layer reads that no node of the module computes.
    let inside: HashSet<&str> = info
        .nodes
        .iter()
        .flat_map(|&i| graph.node[i].output.iter().map(String::as_str))
        .collect();
    let Some(block_input) = layers
        .iter()
        .map(|l| l.input.as_str())
        .find(|t| !inside.contains(t))
        .map(str::to_string)
    else {
        return Ok(None);
    };
    // A residual Add sums a layer's result with the block's input, or with the result of a
    // layer that reads the block's input (a projection). Any other Add of two run-time tensors
    // (the cube term of tanh-form GELU, `x + 0.044715·x³`) is element-wise work between
    // layers, left to the activation it belongs to.
    let reads_input = |i: usize| layers[i].input == block_input;
    let shape = |a: &str, b: &str| -> Option<(usize, Option<usize>)> {
        match (produced_by(a), produced_by(b)) {
            (Some(i), None) if b == block_input => Some((i, None)),
            (None, Some(j)) if a == block_input => Some((j, None)),
            (Some(i), Some(j)) if reads_input(i) != reads_input(j) => Some(if reads_input(i) {
                (j, Some(i))
            } else {
                (i, Some(j))
            }),
            _ => None,
        }
    };
    let Some((add, (main, other))) = info.nodes.iter().copied().find_map(|i| {
        let n = &graph.node[i];
        if taken.contains(&i)
            || n.op_type != "Add"
            || n.input.len() != 2
            || n.input.iter().any(|t| folder.is_float_constant(t))
        {
            return None;
        }
        shape(&n.input[0], &n.input[1]).map(|found| (i, found))
    }) else {
        return Ok(None);
    };
    let n = &graph.node[add];
    let shortcut = match other {
        Some(j) => {
            let p = layers.remove(j);
            Shortcut::Projection(Box::new(p))
        }
        None => Shortcut::Identity,
    };
    let main = if other.is_some_and(|j| j < main) {
        main - 1
    } else {
        main
    };
    if main + 1 != layers.len() {
        return Err(format!(
            "the residual Add node `{}` follows a layer in the middle of the module",
            n.name
        ));
    }
    taken.insert(add);
    Ok(Some((shortcut, add)))
}

/// A chain with a convolution after its first layer, and a residual block, in the forms the
/// encrypted engine evaluates: every layer a convolution, the later ones stride 1 with padding
/// that keeps the map's size (their rows are the first convolution's output pixels); a shortcut
/// over exactly two convolutions, whose map it must match.
fn check_conv_chain(
    layers: &[LinearModule],
    shortcut: Option<&Shortcut>,
    activations: &[Option<Activation>],
) -> Result<(), String> {
    let convs: Vec<Option<&ConvGeometry>> = layers
        .iter()
        .map(|l| match &l.kind {
            LinearKind::Conv(g) => Some(g),
            LinearKind::Dense => None,
        })
        .collect();
    let same = |g: &ConvGeometry| {
        g.dilation == [1, 1]
            && g.pads[0] + g.pads[2] + 1 == g.kernel[0]
            && g.pads[1] + g.pads[3] + 1 == g.kernel[1]
    };
    if layers.len() > 1 && convs.iter().any(Option::is_some) {
        if let Some(k) = convs.iter().position(Option::is_none) {
            return Err(format!(
                "layer {k} is dense after a convolution inside one non-linear module (convolutions \
                 chain with convolutions; flatten outside the module)"
            ));
        }
        for (k, g) in convs.iter().enumerate().skip(1) {
            let g = g.expect("all convolutions");
            if g.stride != [1, 1] || !same(g) {
                return Err(format!(
                    "its convolution {k} has stride {:?}, dilation {:?}, pads {:?} on a {:?} kernel: \
                     a convolution after the first must keep the map's size (stride 1, padding \
                     (k − 1)/2)",
                    g.stride, g.dilation, g.pads, g.kernel
                ));
            }
            if g.in_channels != layers[k - 1].out_features {
                return Err(format!(
                    "its convolution {k} reads {} channels after a layer of {}",
                    g.in_channels,
                    layers[k - 1].out_features
                ));
            }
        }
    }
    let Some(shortcut) = shortcut else {
        return Ok(());
    };
    let (Some(Some(first)), 2) = (convs.first(), layers.len()) else {
        return Err(format!(
            "a residual block of {} layers{}: the encrypted engine runs a block of two \
             convolutions (ResNet's BasicBlock)",
            layers.len(),
            if convs.iter().all(Option::is_none) {
                ", dense"
            } else {
                ""
            }
        ));
    };
    if activations.last().is_none_or(Option::is_none) {
        return Err("its residual Add is not followed by an activation".into());
    }
    if !same(first) {
        return Err(format!(
            "its first convolution (pads {:?}, dilation {:?}, {:?} kernel) does not centre its \
             kernel on the pixel a shortcut reads",
            first.pads, first.dilation, first.kernel
        ));
    }
    let out = layers[1].out_features;
    match shortcut {
        Shortcut::Identity => {
            if first.stride != [1, 1] || first.in_channels != out {
                return Err(format!(
                    "its identity shortcut adds {} input channels at stride {:?} to {out} output \
                     channels (a stride or a channel change needs a projection)",
                    first.in_channels, first.stride
                ));
            }
        }
        Shortcut::Projection(p) => {
            let ok = match &p.kind {
                LinearKind::Conv(g) => {
                    g.kernel == [1, 1]
                        && g.pads == [0; 4]
                        && g.stride == first.stride
                        && g.in_channels == first.in_channels
                        && p.out_features == out
                }
                LinearKind::Dense => false,
            };
            if !ok {
                return Err(format!(
                    "its shortcut layer is {:?} with {} outputs: a projection shortcut is a 1×1 \
                     convolution without padding, with the first convolution's stride {:?}, \
                     onto the block's {out} output channels",
                    p.kind, p.out_features, first.stride
                ));
            }
        }
    }
    Ok(())
}

fn is_weighted(n: &NodeProto) -> bool {
    matches!(n.op_type.as_str(), "Gemm" | "MatMul" | "Conv")
}

/// Add to `out` the module nodes that compute the constant `name` (any pure function of
/// initializers: [`GraphConstants`]; nodes outside the module stay where they are); `true` if
/// it is a constant.
fn constant_producers(
    name: &str,
    folder: &GraphConstants,
    in_module: &HashSet<usize>,
    out: &mut Vec<usize>,
) -> bool {
    match folder.float(name) {
        Some(Ok(f)) => {
            out.extend(f.nodes.into_iter().filter(|p| in_module.contains(p)));
            true
        }
        _ => false,
    }
}

/// The element-wise nodes from tensor `from` to `to` (or to the end of the module when `to` is
/// `None`); `None` if there are none.
fn activation_between(
    graph: &GraphProto,
    info: &ModuleInfo,
    in_module: &HashSet<usize>,
    taken: &HashSet<usize>,
    from: &str,
    to: Option<&str>,
) -> Result<Option<(Activation, Vec<usize>)>, String> {
    if to == Some(from) {
        return Ok(None);
    }
    // Forward closure of `from` over untaken module nodes, in graph order.
    let mut live: HashSet<String> = [from.to_string()].into();
    let mut nodes = Vec::new();
    for &i in &info.nodes {
        if taken.contains(&i) || !in_module.contains(&i) {
            continue;
        }
        let n = &graph.node[i];
        if n.input.iter().any(|t| live.contains(t)) {
            if !ELEMENTWISE.contains(&n.op_type.as_str()) {
                return Err(format!(
                    "{} node `{}` between its layers is not an element-wise activation \
                     (supported: {})",
                    n.op_type,
                    n.name,
                    ELEMENTWISE[..12].join(", ")
                ));
            }
            live.extend(n.output.iter().cloned());
            nodes.push(i);
        }
    }
    if nodes.is_empty() {
        return match to {
            Some(t) => Err(format!(
                "its layer reading `{t}` does not read the previous layer's result `{from}`"
            )),
            None => Ok(None),
        };
    }
    let output = match to {
        Some(t) if live.contains(t) => t.to_string(),
        Some(t) => {
            return Err(format!(
                "its layer reading `{t}` is not fed by the activation after `{from}`"
            ))
        }
        None => graph.node[*nodes.last().expect("non-empty")].output[0].clone(),
    };
    // Constants: scalars only (a per-channel constant is not element-wise).
    let mut constants = HashMap::new();
    let mut extra = Vec::new();
    for &i in &nodes {
        let n = &graph.node[i];
        if n.op_type == "Cast" {
            let to = n
                .attribute
                .iter()
                .find(|a| a.name == "to")
                .map_or(1, |a| a.i);
            if to != 1 && to != 11 {
                return Err(format!("Cast node `{}` to a non-float type", n.name));
            }
        }
        if n.op_type == "Constant" {
            let v = n
                .attribute
                .iter()
                .find(|a| a.name == "value")
                .and_then(|a| a.t.as_ref())
                .ok_or_else(|| format!("Constant node `{}` without a tensor value", n.name))?;
            let (_, values) = float_initializer(v).map_err(|e| e.to_string())?;
            if let [c] = values[..] {
                constants.insert(n.output[0].clone(), c);
            }
            continue;
        }
        for t in n
            .input
            .iter()
            .filter(|t| !t.is_empty() && !live.contains(*t))
        {
            let init = graph.initializer.iter().find(|x| &x.name == t).or_else(|| {
                // A Constant node of the module (TorchScript writes GELU's √2 and ½ that way).
                let p = info.nodes.iter().copied().find(|&i| {
                    graph.node[i].op_type == "Constant" && graph.node[i].output.contains(t)
                })?;
                extra.push(p);
                graph.node[p]
                    .attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.as_ref())
            });
            match init.map(float_initializer) {
                Some(Ok((_, values))) if values.len() == 1 => {
                    constants.insert(t.clone(), values[0]);
                }
                _ => {
                    return Err(format!(
                        "{} node `{}` reads `{t}`, which is not a scalar constant (activations \
                         between layers must be element-wise)",
                        n.op_type, n.name
                    ))
                }
            }
        }
    }
    let distinctive = [
        "Gelu",
        "Erf",
        "LeakyRelu",
        "Relu",
        "Sigmoid",
        "Tanh",
        "Elu",
        "Selu",
        "Softplus",
        "HardSwish",
        "HardSigmoid",
        "Clip",
    ];
    let ops: Vec<&str> = nodes
        .iter()
        .map(|&i| graph.node[i].op_type.as_str())
        .collect();
    let name = distinctive
        .iter()
        .find(|d| ops.contains(d))
        .map(|d| match *d {
            "Erf" => "Gelu".to_string(),
            "Sigmoid" if ops.contains(&"Mul") => "Silu".to_string(),
            other => other.to_string(),
        })
        .unwrap_or_else(|| ops.join("+"));
    nodes.extend(extra);
    nodes.sort_unstable();
    nodes.dedup();
    let act = Activation {
        name,
        input: from.to_string(),
        output,
        nodes: nodes.iter().map(|&i| graph.node[i].clone()).collect(),
        constants,
    };
    Ok(Some((act, nodes)))
}

/// `BatchNormalization(y)` after a linear layer, folded into it: per output channel
/// `y' = (y − μ)·γ/√(σ² + ε) + β`.
fn fold_batch_norm(
    graph: &GraphProto,
    bn: &NodeProto,
    layer: &mut LinearModule,
    unsupported: &dyn Fn(String) -> ModelError,
) -> Result<(), ModelError> {
    let value = |i: usize| -> Result<Vec<f32>, ModelError> {
        let name = bn.input.get(i).cloned().unwrap_or_default();
        let t = graph
            .initializer
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| {
                unsupported(format!(
                    "BatchNormalization node `{}` reads `{name}`, not a constant",
                    bn.name
                ))
            })?;
        let (_, v) = float_initializer(t)?;
        if v.len() != layer.out_features {
            return Err(unsupported(format!(
                "BatchNormalization node `{}` has {} channels, its layer {}",
                bn.name,
                v.len(),
                layer.out_features
            )));
        }
        Ok(v)
    };
    let (gamma, beta, mean, var) = (value(1)?, value(2)?, value(3)?, value(4)?);
    let eps = bn
        .attribute
        .iter()
        .find(|a| a.name == "epsilon")
        .map_or(1e-5, |a| a.f);
    let cols = layer.in_features;
    let mut bias = layer
        .bias
        .take()
        .unwrap_or_else(|| vec![0.0; layer.out_features]);
    for j in 0..layer.out_features {
        let k = gamma[j] / (var[j] + eps).sqrt();
        layer.weight[j * cols..(j + 1) * cols]
            .iter_mut()
            .for_each(|w| *w *= k);
        bias[j] = (bias[j] - mean[j]) * k + beta[j];
    }
    layer.bias = Some(bias);
    Ok(())
}
