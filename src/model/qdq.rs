//! Quantizers written into the graph: `QuantizeLinear` → optional `Clip` → `DequantizeLinear`
//! (QCDQ), as Brevitas's `export_onnx_qcdq` and torch's exporters write a quantization-aware-
//! trained model's learned quantizers.
//!
//! Two questions are answered here, both from the graph alone:
//! - **What a dequantized constant is** (a QAT weight): [`GraphConstants`] folds
//!   `DequantizeLinear(Clip(QuantizeLinear(W)))` and `DequantizeLinear(int8 initializer)` into the
//!   float values the model multiplies by, exactly as ONNX defines them (`x / scale` rounded half
//!   to even, plus the zero point, saturated to the integer type, clipped; then
//!   `(q − zero_point) · scale`).
//! - **Which integer grid a tensor lies on** ([`QuantGrid`]): the scale, zero point and code range
//!   of a `DequantizeLinear`, found through the ops that map grid points to grid points (views,
//!   `Relu`, `MaxPool`). The hybrid compiler then uses the learned grid instead of fitting one.

use super::constants::{attr, Folded, GraphConstants, MAX_CHAIN};
use super::ModelError;

/// Ops through which a tensor stays on its grid: they select or rearrange values (`Relu` maps a
/// grid point to itself or to zero, which is a grid point when the zero point is a code).
const GRID_PRESERVING: &[&str] = &[
    "Identity",
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Relu",
    "MaxPool",
];

/// The integer grid of a `DequantizeLinear`'s output: `value = (q − zero_point) · scale` for an
/// integer code `q` in `lo..=hi`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantGrid {
    /// One value per tensor, or one per slice along `axis`.
    pub scale: Vec<f32>,
    pub zero_point: Vec<i64>,
    pub axis: Option<usize>,
    /// The codes the graph can produce: the integer type's range narrowed by a `Clip`.
    pub lo: i64,
    pub hi: i64,
    /// The `DequantizeLinear` node and the `Clip`/`QuantizeLinear` nodes feeding it.
    pub nodes: Vec<usize>,
}

impl QuantGrid {
    /// Bits needed for the code range (`hi − lo + 1` values).
    pub fn bits(&self) -> u32 {
        let values = (self.hi - self.lo + 1).max(1) as u64;
        64 - (values - 1).leading_zeros()
    }

    pub fn per_tensor(&self) -> bool {
        self.scale.len() == 1
    }
}

/// Integer codes of a constant, with the range its type (and any `Clip`) allows.
struct Codes {
    shape: Vec<usize>,
    values: Vec<i64>,
    nodes: Vec<usize>,
    roots: Vec<String>,
}

/// `(lo, hi)` of an ONNX integer type.
fn type_range(data_type: i32) -> Option<(i64, i64)> {
    Some(match data_type {
        2 => (0, u8::MAX as i64),
        3 => (i8::MIN as i64, i8::MAX as i64),
        4 => (0, u16::MAX as i64),
        5 => (i16::MIN as i64, i16::MAX as i64),
        6 => (i32::MIN as i64, i32::MAX as i64),
        _ => return None,
    })
}

/// Which element of a per-axis parameter applies to element `e` of a tensor of `shape`.
fn axis_index(shape: &[usize], axis: Option<usize>, e: usize) -> usize {
    match axis {
        None => 0,
        Some(a) => {
            let stride: usize = shape[a + 1..].iter().product();
            (e / stride.max(1)) % shape[a].max(1)
        }
    }
}

impl GraphConstants<'_> {
    /// An integer tensor given by an initializer or a `Constant` node (through `Identity`):
    /// shape, values and ONNX data type.
    fn int_tensor(&self, name: &str) -> Option<(Vec<usize>, Vec<i64>, i32)> {
        let mut name = name;
        // A bounded walk: a malformed graph may loop through Identity nodes.
        for _ in 0..MAX_CHAIN {
            if let Some(t) = self.inits.get(name) {
                return int_proto(t);
            }
            let &p = self.producer.get(name)?;
            let node = &self.graph.node[p];
            match node.op_type.as_str() {
                "Constant" => return int_proto(attr(node, "value")?.t.as_ref()?),
                "Identity" => name = node.input.first()?,
                _ => return None,
            }
        }
        None
    }

    /// The per-tensor or per-axis layout of a (de)quantizer's scale for a tensor of `shape`.
    fn quant_axis(
        &self,
        node: &tract_onnx::pb::NodeProto,
        shape: &[usize],
        params: usize,
    ) -> Result<Option<usize>, ModelError> {
        if params == 1 {
            return Ok(None);
        }
        let rank = shape.len() as i64;
        let axis = attr(node, "axis").map_or(1, |a| a.i);
        let axis = if axis < 0 { axis + rank } else { axis };
        match usize::try_from(axis).ok().filter(|&a| a < shape.len()) {
            Some(a) if shape[a] == params => Ok(Some(a)),
            _ => Err(ModelError::Decode(format!(
                "{} node `{}`: {params} scales along axis {axis} of a tensor of shape {shape:?}",
                node.op_type, node.name
            ))),
        }
    }

    /// Scale and zero point of a (de)quantizer node, the zero point's type deciding the codes'
    /// range (`uint8` when absent, as ONNX specifies).
    #[allow(clippy::type_complexity)]
    fn quant_params(
        &self,
        node: &tract_onnx::pb::NodeProto,
        depth: usize,
    ) -> Option<Result<(Vec<f32>, Vec<i64>, Option<(i64, i64)>), ModelError>> {
        // Blocked quantization (opset 21) is not read here: refuse it rather than misread it.
        if attr(node, "block_size").is_some_and(|a| a.i != 0) {
            return Some(Err(ModelError::Decode(format!(
                "{} node `{}` uses block_size (blocked quantization), which hyfhe does not read",
                node.op_type, node.name
            ))));
        }
        let scale = match self.float_within(node.input.get(1)?, depth)? {
            Ok(f) if f.shape.len() <= 1 => f.values,
            Ok(f) => {
                return Some(Err(ModelError::Decode(format!(
                    "{} node `{}` has scales of shape {:?}: per tensor or along one axis only",
                    node.op_type, node.name, f.shape
                ))))
            }
            Err(e) => return Some(Err(e)),
        };
        let (zero_point, range) = match node.input.get(2).filter(|s| !s.is_empty()) {
            Some(z) => {
                let (_, values, data_type) = self.int_tensor(z)?;
                (values, type_range(data_type))
            }
            // Without a zero point the type is `output_dtype` (opset 21), else uint8.
            None => {
                let range = match attr(node, "output_dtype").map(|a| a.i as i32) {
                    None | Some(0) => Some((0, u8::MAX as i64)),
                    Some(t) => type_range(t),
                };
                (vec![0; scale.len()], range)
            }
        };
        if scale.is_empty() || zero_point.len() != scale.len() {
            return Some(Err(ModelError::Decode(format!(
                "{} node `{}` has {} scales and {} zero points",
                node.op_type,
                node.name,
                scale.len(),
                zero_point.len()
            ))));
        }
        if let Some(s) = scale.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Some(Err(ModelError::Decode(format!(
                "{} node `{}` has scale {s}: scales must be positive and finite",
                node.op_type, node.name
            ))));
        }
        Some(Ok((scale, zero_point, range)))
    }

    /// The integer codes a constant quantizes to (an integer initializer, `QuantizeLinear` of a
    /// float constant, either through `Clip` and `Identity`).
    fn codes_within(&self, name: &str, depth: usize) -> Option<Result<Codes, ModelError>> {
        if let Some((shape, values, _)) = self
            .inits
            .get(name)
            .and_then(|t| int_proto(t))
            .filter(|(_, _, data_type)| type_range(*data_type).is_some())
        {
            return Some(Ok(Codes {
                shape,
                values,
                nodes: vec![],
                roots: vec![name.to_string()],
            }));
        }
        let &p = self.producer.get(name)?;
        let depth = depth.checked_sub(1)?;
        let node = &self.graph.node[p];
        let push = |mut c: Codes| {
            c.nodes.push(p);
            c
        };
        match node.op_type.as_str() {
            "Constant" => {
                let (shape, values, _) = int_proto(attr(node, "value")?.t.as_ref()?)?;
                Some(Ok(Codes {
                    shape,
                    values,
                    nodes: vec![p],
                    roots: vec![],
                }))
            }
            "Identity" => Some(self.codes_within(node.input.first()?, depth)?.map(push)),
            "Clip" => {
                let mut c = match self.codes_within(node.input.first()?, depth)? {
                    Ok(c) => c,
                    Err(e) => return Some(Err(e)),
                };
                let (lo, hi) = self.clip_bounds(node)?;
                if lo > hi {
                    return Some(Err(ModelError::Decode(format!(
                        "Clip node `{}` has min {lo} above max {hi}",
                        node.name
                    ))));
                }
                for v in &mut c.values {
                    *v = (*v).clamp(lo, hi);
                }
                Some(Ok(push(c)))
            }
            "QuantizeLinear" => {
                let x = match self.float_within(node.input.first()?, depth)? {
                    Ok(f) => f,
                    Err(e) => return Some(Err(e)),
                };
                let (scale, zero_point, range) = match self.quant_params(node, depth)? {
                    Ok(q) => q,
                    Err(e) => return Some(Err(e)),
                };
                let (lo, hi) = range?;
                let axis = match self.quant_axis(node, &x.shape, scale.len()) {
                    Ok(a) => a,
                    Err(e) => return Some(Err(e)),
                };
                let values = x
                    .values
                    .iter()
                    .enumerate()
                    .map(|(e, &v)| {
                        let k = axis_index(&x.shape, axis, e);
                        // ONNX: saturate(round_half_even(x / scale) + zero_point), in f64 so
                        // that a huge or infinite quotient saturates instead of wrapping.
                        let q =
                            (v as f64 / scale[k] as f64).round_ties_even() + zero_point[k] as f64;
                        if q.is_nan() {
                            lo
                        } else {
                            q.clamp(lo as f64, hi as f64) as i64
                        }
                    })
                    .collect();
                let mut nodes = x.nodes;
                nodes.push(p);
                Some(Ok(Codes {
                    shape: x.shape,
                    values,
                    nodes,
                    roots: x.roots,
                }))
            }
            _ => None,
        }
    }

    /// A `Clip` node's integer bounds (an absent bound does not narrow).
    fn clip_bounds(&self, node: &tract_onnx::pb::NodeProto) -> Option<(i64, i64)> {
        let bound = |k: usize, default: i64| -> Option<i64> {
            match node.input.get(k).filter(|s| !s.is_empty()) {
                None => Some(default),
                Some(t) => match self.int_tensor(t)? {
                    (_, v, _) if v.len() == 1 => Some(v[0]),
                    _ => None,
                },
            }
        };
        Some((bound(1, i64::MIN)?, bound(2, i64::MAX)?))
    }

    /// `DequantizeLinear` node `p` of constant codes, folded to floats.
    pub(super) fn dequantize_constant(
        &self,
        p: usize,
        depth: usize,
    ) -> Option<Result<Folded, ModelError>> {
        let node = &self.graph.node[p];
        let codes = match self.codes_within(node.input.first()?, depth)? {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        let (scale, zero_point, _) = match self.quant_params(node, depth)? {
            Ok(q) => q,
            Err(e) => return Some(Err(e)),
        };
        let axis = match self.quant_axis(node, &codes.shape, scale.len()) {
            Ok(a) => a,
            Err(e) => return Some(Err(e)),
        };
        let values = codes
            .values
            .iter()
            .enumerate()
            .map(|(e, &q)| {
                let k = axis_index(&codes.shape, axis, e);
                (q - zero_point[k]) as f32 * scale[k]
            })
            .collect();
        let mut nodes = codes.nodes;
        nodes.push(p);
        Some(Ok(Folded {
            shape: codes.shape,
            values,
            nodes,
            roots: codes.roots,
        }))
    }

    /// The grid of the `DequantizeLinear` node `dq`; `None` if its scale or zero point is not a
    /// constant or its codes do not come from a `QuantizeLinear`, an integer constant or a
    /// `Clip` of either.
    pub fn grid(&self, dq: usize) -> Option<Result<QuantGrid, ModelError>> {
        let node = &self.graph.node[dq];
        if node.op_type != "DequantizeLinear" {
            return None;
        }
        let (scale, zero_point, zp_range) = match self.quant_params(node, MAX_CHAIN)? {
            Ok(q) => q,
            Err(e) => return Some(Err(e)),
        };
        let (mut lo, mut hi) = (i64::MIN, i64::MAX);
        let mut nodes = vec![dq];
        let mut t = node.input.first()?.clone();
        let mut typed = None;
        let mut shape = None;
        for _ in 0..MAX_CHAIN {
            if let Some((s, _, data_type)) = self.int_tensor(&t) {
                typed = type_range(data_type);
                shape = Some(s);
                break;
            }
            let &p = self.producer.get(t.as_str())?;
            let n = &self.graph.node[p];
            match n.op_type.as_str() {
                "Clip" => {
                    let (l, h) = self.clip_bounds(n)?;
                    (lo, hi) = (lo.max(l), hi.min(h));
                }
                "QuantizeLinear" => {
                    let (_, _, range) = match self.quant_params(n, MAX_CHAIN)? {
                        Ok(q) => q,
                        Err(e) => return Some(Err(e)),
                    };
                    typed = range;
                    nodes.push(p);
                    break;
                }
                "Identity" => {}
                _ => return None,
            }
            nodes.push(p);
            t = n.input.first()?.clone();
        }
        let (tl, th) = typed.or(zp_range)?;
        (lo, hi) = (lo.max(tl), hi.min(th));
        if lo > hi {
            return Some(Err(ModelError::Decode(format!(
                "DequantizeLinear node `{}` reads codes clipped to the empty range {lo}..={hi}",
                node.name
            ))));
        }
        let axis = match (scale.len(), shape) {
            (1, _) => None,
            (n, Some(shape)) => match self.quant_axis(node, &shape, n) {
                Ok(a) => a,
                Err(e) => return Some(Err(e)),
            },
            // An activation's per-axis grid: the axis as written (its shape is not known here).
            (_, None) => Some(attr(node, "axis").map_or(1, |a| a.i).max(0) as usize),
        };
        Some(Ok(QuantGrid {
            scale,
            zero_point,
            axis,
            lo,
            hi,
            nodes,
        }))
    }

    /// The per-tensor grid `tensor` lies on: a `DequantizeLinear` reached back through
    /// grid-preserving ops. `None` when there is none (or it is per channel).
    pub fn activation_grid(&self, tensor: &str) -> Option<Result<QuantGrid, ModelError>> {
        let mut t = tensor.to_string();
        let mut through_relu = false;
        for _ in 0..MAX_CHAIN {
            let &p = self.producer.get(t.as_str())?;
            let n = &self.graph.node[p];
            match n.op_type.as_str() {
                "DequantizeLinear" => {
                    let grid = match self.grid(p)? {
                        Ok(g) => g,
                        Err(e) => return Some(Err(e)),
                    };
                    let zero_is_code = (grid.lo..=grid.hi).contains(&grid.zero_point[0]);
                    return (grid.per_tensor() && (!through_relu || zero_is_code))
                        .then_some(Ok(grid));
                }
                op if GRID_PRESERVING.contains(&op) => {
                    through_relu |= op == "Relu";
                    t = n.input.first()?.clone();
                }
                _ => return None,
            }
        }
        None
    }

    /// Whether node `i` is the `Clip` of a quantizer (between a `QuantizeLinear` and a
    /// `DequantizeLinear`), not an activation.
    pub fn is_quantizer_clip(&self, i: usize) -> bool {
        let node = &self.graph.node[i];
        node.op_type == "Clip"
            && (node
                .input
                .first()
                .and_then(|t| self.producer.get(t.as_str()))
                .is_some_and(|&p| self.graph.node[p].op_type == "QuantizeLinear")
                || self
                    .inits
                    .get(node.input.first().map_or("", String::as_str))
                    .is_some_and(|t| int_proto(t).is_some())
                || self.graph.node.iter().any(|n| {
                    n.op_type == "DequantizeLinear" && n.input.first() == node.output.first()
                }))
    }
}

/// An integer tensor's shape, values and data type (INT8/UINT8/INT16/UINT16/INT32/INT64).
fn int_proto(t: &tract_onnx::pb::TensorProto) -> Option<(Vec<usize>, Vec<i64>, i32)> {
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<_>>()?;
    let raw = &t.raw_data;
    let values: Vec<i64> = match t.data_type {
        2 if !raw.is_empty() => raw.iter().map(|&b| b as i64).collect(),
        3 if !raw.is_empty() => raw.iter().map(|&b| b as i8 as i64).collect(),
        4 if !raw.is_empty() => raw
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
            .collect(),
        5 if !raw.is_empty() => raw
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
            .collect(),
        6 if !raw.is_empty() => raw
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        7 if !raw.is_empty() => raw
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        // Types narrower than 32 bits are stored widened in int32_data.
        2..=6 => t.int32_data.iter().map(|&v| v as i64).collect(),
        7 => t.int64_data.clone(),
        _ => return None,
    };
    (values.len() == shape.iter().product::<usize>()).then_some((shape, values, t.data_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_cover_the_code_range() {
        let grid = |lo, hi| QuantGrid {
            scale: vec![1.0],
            zero_point: vec![0],
            axis: None,
            lo,
            hi,
            nodes: vec![],
        };
        assert_eq!(grid(-8, 7).bits(), 4);
        assert_eq!(grid(-7, 7).bits(), 4); // narrow range
        assert_eq!(grid(0, 127).bits(), 7);
        assert_eq!(grid(-128, 127).bits(), 8);
        assert_eq!(grid(0, 255).bits(), 8);
        assert_eq!(grid(-1, 1).bits(), 2);
    }

    use tract_onnx::pb::{GraphProto, NodeProto, TensorProto};

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            name: format!("{op}_{output}"),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    fn tensor(name: &str, dims: &[i64], data_type: i32, raw: Vec<u8>) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type,
            raw_data: raw,
            ..Default::default()
        }
    }

    /// `W` (2×2 floats) quantized by scale 0.5 / int8 zero point 0, clipped by `lo..=hi`, and
    /// dequantized; the zero point may come through `zp_from`.
    fn qcdq(lo: i8, hi: i8, zp_from: &str, extra: Vec<NodeProto>) -> GraphProto {
        let floats = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut nodes = extra;
        nodes.extend([
            node("QuantizeLinear", &["w", "s", zp_from], "q"),
            node("Clip", &["q", "lo", "hi"], "c"),
            node("DequantizeLinear", &["c", "s", "zp"], "y"),
        ]);
        GraphProto {
            node: nodes,
            initializer: vec![
                tensor("w", &[2, 2], 1, floats(&[0.4, -1.0, 3.0, 1e30])),
                tensor("s", &[], 1, floats(&[0.5])),
                tensor("zp", &[], 3, vec![0]),
                tensor("lo", &[], 3, vec![lo as u8]),
                tensor("hi", &[], 3, vec![hi as u8]),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn qcdq_constants_fold_as_onnx_defines_them_and_malformed_ones_are_errors() {
        // round_half_even(0.8) = 1, −2, 6 → clipped to 3, 1e30/0.5 saturates then clips to 3.
        let g = qcdq(-4, 3, "zp", vec![]);
        let f = GraphConstants::new(&g).float("y").unwrap().unwrap();
        assert_eq!(f.values, [0.5, -1.0, 1.5, 1.5]);
        let grid = GraphConstants::new(&g).grid(2).unwrap().unwrap();
        assert_eq!((grid.lo, grid.hi, grid.bits()), (-4, 3, 3));
        // min above max: an error naming the node, not a panic.
        let g = qcdq(3, -4, "zp", vec![]);
        let e = GraphConstants::new(&g).float("y").unwrap().unwrap_err();
        assert!(e.to_string().contains("min 3 above max -4"), "{e}");
        // A zero point behind an Identity loop: not a constant (and no endless walk).
        let looped = vec![node("Identity", &["b"], "a"), node("Identity", &["a"], "b")];
        let g = qcdq(-4, 3, "a", looped);
        assert!(GraphConstants::new(&g).float("y").is_none());
    }

    #[test]
    fn per_axis_parameters_follow_the_axis() {
        // [2, 3] with axis 0: rows; axis 1: columns.
        let rows: Vec<usize> = (0..6).map(|e| axis_index(&[2, 3], Some(0), e)).collect();
        assert_eq!(rows, [0, 0, 0, 1, 1, 1]);
        let cols: Vec<usize> = (0..6).map(|e| axis_index(&[2, 3], Some(1), e)).collect();
        assert_eq!(cols, [0, 1, 2, 0, 1, 2]);
    }
}
