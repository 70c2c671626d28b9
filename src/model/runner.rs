//! Running a local segment with `tract`: parsed once, optimised per input shape (cached).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tract_onnx::pb::{
    tensor_shape_proto, tensor_shape_proto::dimension, type_proto, GraphProto, ModelProto,
    TensorProto, TensorShapeProto, TypeProto,
};
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable,
    IntoTValue, IntoTensor, TDim, TVec, Tensor, TypedRunnableModel,
};

use super::ModelError;

/// A tensor flowing between stages (any ONNX element type: shapes travel as i64).
pub type Value = Tensor;

/// Per input: its type, shape, and for a small integer tensor (a shape computed by another
/// stage) its values, which the plan bakes in as a constant.
type ShapeKey = Vec<(DatumType, Vec<usize>, Option<Vec<i64>>)>;

/// Integer inputs of at most this many values and rank ≤ 1 are treated as shapes: tract types a
/// `Reshape`/`Expand`/`Range` only when its shape operand is a constant, and exporters compute
/// those operands once and share them across modules, so they cross stage boundaries.
const MAX_BAKED_VALUES: usize = 8;

fn baked_values(t: &Tensor) -> Option<Vec<i64>> {
    if t.rank() > 1 || t.len() > MAX_BAKED_VALUES {
        return None;
    }
    match t.datum_type() {
        DatumType::I64 | DatumType::I32 => t.cast_to::<i64>().ok().and_then(|c| {
            c.try_as_plain_ram()
                .ok()?
                .as_slice::<i64>()
                .ok()
                .map(<[i64]>::to_vec)
        }),
        _ => None,
    }
}

/// Every `CumSum` computed in f64: `CastLike(CumSum(Cast(x, f64), axis), x)`.
///
/// Current `transformers` exports number positions with a `CumSum` over the attention mask (an
/// int64 tensor that depends on the ids). tract types integer tensors that come out of shape
/// and mask arithmetic as symbolic dimensions (`TDim`), and its `CumSum` has no `TDim` kernel:
/// the plan fails with "TDim is not a number" whatever the input. In f64 the op runs on ordinary
/// numbers, and the sum is exact for integers below 2^53 (positions and mask counts are far
/// below); a float `CumSum` only gains precision.
fn cumsum_in_f64(graph: &mut GraphProto) {
    use tract_onnx::pb::{attribute_proto::AttributeType, AttributeProto, NodeProto};
    const DOUBLE: i64 = 11; // TensorProto.DataType.DOUBLE
    let mut nodes = Vec::with_capacity(graph.node.len());
    for mut node in std::mem::take(&mut graph.node) {
        if node.op_type != "CumSum" || !node.domain.is_empty() || node.input.is_empty() {
            nodes.push(node);
            continue;
        }
        let (x, y) = (node.input[0].clone(), node.output[0].clone());
        let (x_f64, y_f64) = (format!("{x}/hyfhe_f64"), format!("{y}/hyfhe_f64"));
        nodes.push(NodeProto {
            name: format!("{}/hyfhe_to_f64", node.name),
            op_type: "Cast".into(),
            input: vec![x.clone()],
            output: vec![x_f64.clone()],
            attribute: vec![AttributeProto {
                name: "to".into(),
                r#type: AttributeType::Int as i32,
                i: DOUBLE,
                ..Default::default()
            }],
            ..Default::default()
        });
        node.input[0] = x_f64;
        node.output[0] = y_f64.clone();
        let back = NodeProto {
            name: format!("{}/hyfhe_back", node.name),
            op_type: "CastLike".into(),
            input: vec![y_f64, x],
            output: vec![y],
            ..Default::default()
        };
        nodes.push(node);
        nodes.push(back);
    }
    graph.node = nodes;
}

/// Optimised plans kept per segment; past it the least recently used is dropped (a service seeing
/// many batch sizes, a decode loop whose cache grows a step at a time).
const MAX_CACHED_SHAPES: usize = 32;

/// A segment's plans by input shapes (and baked values), the least recently used dropped first:
/// a decode loop adds one shape per step to a segment that reads the KV cache, and clearing
/// them all at the cap would also drop the plans still in use (another batch size, another
/// session's sequence length).
#[derive(Default)]
struct PlanCache {
    plans: HashMap<ShapeKey, (Plan, u64)>,
    clock: u64,
    /// Plans with symbolic dimensions, each checked against a concrete plan before it is kept.
    symbolic: Vec<SymbolicPlan>,
    /// Patterns whose symbolic plan failed to build or disagreed with the concrete one: never
    /// tried again.
    refused: Vec<Vec<Vec<DimPattern>>>,
    /// No symbolic plan is tried any more: the segment parses only with concrete types, or
    /// [`MAX_REFUSED_PATTERNS`] patterns were refused.
    no_symbolic: bool,
}

/// Symbolic plans kept per segment (a decode loop needs one: the past length).
const MAX_SYMBOLIC_PLANS: usize = 4;
/// Refused patterns remembered per segment; past them the segment stops trying.
const MAX_REFUSED_PATTERNS: usize = 16;

impl PlanCache {
    fn get(&mut self, key: &ShapeKey) -> Option<Plan> {
        self.clock += 1;
        let clock = self.clock;
        if let Some((plan, used)) = self.plans.get_mut(key) {
            *used = clock;
            return Some(plan.clone());
        }
        self.symbolic
            .iter()
            .find(|s| s.matches(key))
            .map(|s| s.plan.clone())
    }

    fn insert(&mut self, key: ShapeKey, plan: Plan) {
        if self.plans.len() >= MAX_CACHED_SHAPES && !self.plans.contains_key(&key) {
            let oldest = self
                .plans
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.plans.remove(&k);
            }
        }
        self.clock += 1;
        self.plans.insert(key, (plan, self.clock));
    }

    /// A pattern that covers `key` and a shape planned before, when one exists and was not
    /// refused (and there is room for another symbolic plan).
    fn generalisation(&self, key: &ShapeKey) -> Option<Vec<Vec<DimPattern>>> {
        if self.no_symbolic || self.symbolic.len() >= MAX_SYMBOLIC_PLANS {
            return None;
        }
        // The fewest symbols: a decode step generalises with the step before (one symbol, the
        // past length) better than with the prompt (sequence, past and mask lengths).
        self.plans
            .keys()
            .filter_map(|seen| generalise(seen, key))
            .filter(|pattern| !self.refused.contains(pattern))
            .min_by_key(|pattern| (symbol_count(pattern), pattern.clone()))
    }
}

/// One input dimension of a symbolic plan: a fixed size, or symbol `id` plus `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum DimPattern {
    Fixed(usize),
    Symbol { id: usize, offset: usize },
}

/// A plan for every input shape that fits `dims`, with the dtypes and baked values of `types`.
struct SymbolicPlan {
    types: Vec<(DatumType, Option<Vec<i64>>)>,
    dims: Vec<Vec<DimPattern>>,
    plan: Plan,
}

impl SymbolicPlan {
    fn matches(&self, key: &ShapeKey) -> bool {
        if key.len() != self.types.len() {
            return false;
        }
        let mut values: Vec<Option<usize>> = Vec::new();
        for ((dt, shape, baked), ((want_dt, want_baked), dims)) in
            key.iter().zip(self.types.iter().zip(&self.dims))
        {
            if dt != want_dt || baked != want_baked || shape.len() != dims.len() {
                return false;
            }
            for (&d, pattern) in shape.iter().zip(dims) {
                match *pattern {
                    DimPattern::Fixed(f) if f != d => return false,
                    DimPattern::Fixed(_) => {}
                    DimPattern::Symbol { id, offset } => {
                        // Symbols stand for sizes of at least 2 (`d − offset`): a size of 1
                        // broadcasts, and a plan checked at one size must not serve the other
                        // behaviour (see `generalise`).
                        if d < offset + MIN_SYMBOL {
                            return false;
                        }
                        if values.len() <= id {
                            values.resize(id + 1, None);
                        }
                        match values[id] {
                            Some(v) if v != d - offset => return false,
                            _ => values[id] = Some(d - offset),
                        }
                    }
                }
            }
        }
        true
    }
}

/// The smallest size a symbol stands for.
const MIN_SYMBOL: usize = 2;

/// The pattern covering two shapes of the same inputs that differ only in some dimensions:
/// dimensions that moved by the same amount share a symbol (a KV cache of length `P` and a mask
/// of `P + 1` both grow by one per decode step), as `symbol + (size − smallest size)`. `None`
/// when the dtypes, ranks or baked values differ, or nothing does.
fn generalise(a: &ShapeKey, b: &ShapeKey) -> Option<Vec<Vec<DimPattern>>> {
    if a.len() != b.len() {
        return None;
    }
    let mut deltas: Vec<(i64, usize)> = Vec::new(); // (delta, smallest size in a)
    for ((dt_a, sa, baked_a), (dt_b, sb, baked_b)) in a.iter().zip(b) {
        if dt_a != dt_b || baked_a != baked_b || sa.len() != sb.len() {
            return None;
        }
        for (&x, &y) in sa.iter().zip(sb) {
            if x == y {
                continue;
            }
            let delta = y as i64 - x as i64;
            match deltas.iter_mut().find(|(d, _)| *d == delta) {
                Some((_, least)) => *least = (*least).min(x),
                None => deltas.push((delta, x)),
            }
        }
    }
    // Every symbol is at least MIN_SYMBOL in both shapes: the plan is checked at the second, and
    // serves only sizes that behave like it (a size of 1 broadcasts; a size of 0 is empty).
    if deltas.is_empty()
        || deltas
            .iter()
            .any(|&(delta, least)| least < MIN_SYMBOL || (least as i64 + delta) < MIN_SYMBOL as i64)
    {
        return None;
    }
    let pattern = a
        .iter()
        .zip(b)
        .map(|((_, sa, _), (_, sb, _))| {
            sa.iter()
                .zip(sb)
                .map(|(&x, &y)| {
                    if x == y {
                        return DimPattern::Fixed(x);
                    }
                    let delta = y as i64 - x as i64;
                    let id = deltas.iter().position(|(d, _)| *d == delta).expect("seen");
                    // In terms of the first shape, so the smallest size is the bare symbol.
                    DimPattern::Symbol {
                        id,
                        offset: x - deltas[id].1,
                    }
                })
                .collect()
        })
        .collect();
    Some(pattern)
}

/// A plain ONNX subgraph and its compiled plans.
pub struct LocalSegment {
    model: ModelProto,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// The segment parsed once (its weights included): each new shape starts from a clone of it,
    /// whose constants are shared, instead of re-reading the protobuf. `Err` when tract cannot
    /// parse it without input types; plans then come from the protobuf each time.
    parsed: OnceLock<Result<InferenceModel, String>>,
    plans: Mutex<PlanCache>,
}

/// An optimised plan, and whether it takes the baked inputs as inputs too (a plan from the
/// parsed model keeps them as sources whose value is fixed; one from the protobuf has them as
/// initializers).
#[derive(Clone)]
struct Plan {
    runnable: Arc<TypedRunnableModel>,
    feeds_baked: bool,
}

impl std::fmt::Debug for LocalSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSegment")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish()
    }
}

impl LocalSegment {
    pub fn new(mut model: ModelProto, inputs: Vec<String>, outputs: Vec<String>) -> Self {
        if let Some(graph) = model.graph.as_mut() {
            cumsum_in_f64(graph);
        }
        Self {
            model,
            inputs,
            outputs,
            parsed: OnceLock::new(),
            plans: Mutex::new(PlanCache::default()),
        }
    }

    pub fn run(&self, inputs: Vec<Value>) -> Result<Vec<Value>, ModelError> {
        self.run_counted(inputs).map(|(out, _)| out)
    }

    /// [`LocalSegment::run`], and how many plans it built (0 when one was cached; 1 for a new
    /// shape; 2 when it also built a symbolic plan).
    pub fn run_counted(&self, inputs: Vec<Value>) -> Result<(Vec<Value>, usize), ModelError> {
        let key: ShapeKey = inputs
            .iter()
            .map(|t| (t.datum_type(), t.shape().to_vec(), baked_values(t)))
            .collect();
        let cached = self.plans.lock().expect("plan cache").get(&key);
        if let Some(plan) = cached {
            return Ok((execute(&plan, &key, inputs)?, 0));
        }
        let plan = self.plan(&key)?;
        let pattern = self.plans.lock().expect("plan cache").generalisation(&key);
        let Some(pattern) = pattern else {
            return Ok((execute(&plan, &key, inputs)?, 1));
        };
        // A second shape of the same inputs (a decode step, another batch size): try one plan
        // for the whole family, and keep it only if it answers this input as the concrete plan
        // does (see `agree`).
        let started = std::time::Instant::now();
        let symbolic = self.symbolic_plan(&key, &pattern);
        let out = execute(&plan, &key, inputs.clone())?;
        let agrees = match &symbolic {
            Some(Ok(s)) => execute(s, &key, inputs).is_ok_and(|o| agree(&o, &out)),
            _ => false,
        };
        let mut cache = self.plans.lock().expect("plan cache");
        let room = cache.symbolic.len() < MAX_SYMBOLIC_PLANS
            && !cache.symbolic.iter().any(|s| s.dims == pattern);
        match symbolic {
            // Another thread may have kept the same family meanwhile.
            Some(Ok(_)) if agrees && !room => {}
            Some(Ok(plan)) if agrees => {
                tracing::debug!(
                    inputs = ?self.inputs,
                    ?pattern,
                    ms = started.elapsed().as_millis() as u64,
                    "symbolic plan for a segment"
                );
                cache.symbolic.push(SymbolicPlan {
                    types: key.iter().map(|(dt, _, b)| (*dt, b.clone())).collect(),
                    dims: pattern,
                    plan,
                });
            }
            other => {
                tracing::debug!(
                    inputs = ?self.inputs,
                    ?pattern,
                    why = match &other {
                        Some(Err(e)) => e.to_string(),
                        Some(Ok(_)) => "its results differ from the concrete plan's".into(),
                        None => "the segment does not parse without types".into(),
                    },
                    "no symbolic plan for a segment"
                );
                if other.is_none() {
                    cache.no_symbolic = true;
                }
                cache.refused.push(pattern);
                if cache.refused.len() >= MAX_REFUSED_PATTERNS {
                    cache.no_symbolic = true;
                }
            }
        }
        Ok((out, 2))
    }

    fn plan(&self, key: &ShapeKey) -> Result<Plan, ModelError> {
        let tried = self.plan_from_parsed(key, None);
        let plan = match tried {
            Some(Ok(runnable)) => Plan {
                runnable,
                feeds_baked: true,
            },
            _ => Plan {
                runnable: self.plan_from_proto(key)?,
                feeds_baked: false,
            },
        };
        self.plans
            .lock()
            .expect("plan cache")
            .insert(key.clone(), plan.clone());
        Ok(plan)
    }

    /// A plan of the once-parsed model for every shape that fits `pattern` (`key`'s dtypes and
    /// baked values), or `None` when the segment does not parse without types.
    fn symbolic_plan(
        &self,
        key: &ShapeKey,
        pattern: &[Vec<DimPattern>],
    ) -> Option<Result<Plan, ModelError>> {
        self.plan_from_parsed(key, Some(pattern)).map(|r| {
            r.map(|runnable| Plan {
                runnable,
                feeds_baked: true,
            })
        })
    }

    /// A plan from the once-parsed model: baked inputs become sources of a known value, which
    /// tract propagates like constants. `None` when the segment could not be parsed that way.
    fn plan_from_parsed(
        &self,
        key: &ShapeKey,
        pattern: Option<&[Vec<DimPattern>]>,
    ) -> Option<Result<Arc<TypedRunnableModel>, ModelError>> {
        let base = self
            .parsed
            .get_or_init(|| {
                // tract needs input types to parse; the first call's do (each call then sets
                // its own facts on a clone).
                let mut proto = self.model.clone();
                if let Some(graph) = proto.graph.as_mut() {
                    for (vi, (dt, shape, _)) in graph.input.iter_mut().zip(key) {
                        vi.r#type = tensor_type(*dt, shape).ok();
                    }
                }
                tract_onnx::onnx()
                    .model_for_proto_model(&proto)
                    .map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .ok()?;
        let plan = (|| {
            let mut model = base.clone();
            let symbols: Vec<TDim> = (0..pattern.map_or(0, symbol_count))
                .map(|id| model.symbols.sym(&format!("hyfhe_s{id}")).into())
                .collect();
            for (i, (dt, shape, baked)) in key.iter().enumerate() {
                let fact = match (baked, pattern) {
                    (Some(values), _) => {
                        let t = Tensor::from_shape(shape, values).map_err(ModelError::tract)?;
                        InferenceFact::from(
                            t.cast_to_dt(*dt).map_err(ModelError::tract)?.into_owned(),
                        )
                    }
                    (None, Some(pattern)) => {
                        let dims: Vec<TDim> = pattern[i]
                            .iter()
                            .map(|p| match *p {
                                DimPattern::Fixed(d) => TDim::from(d as i64),
                                DimPattern::Symbol { id, offset } => {
                                    symbols[id].clone() + offset as i64
                                }
                            })
                            .collect();
                        InferenceFact::dt_shape(*dt, dims)
                    }
                    (None, None) => InferenceFact::dt_shape(*dt, shape.as_slice()),
                };
                model.set_input_fact(i, fact).map_err(ModelError::tract)?;
            }
            model
                .into_optimized()
                .and_then(|m| m.into_runnable())
                .map_err(ModelError::tract)
        })();
        Some(plan)
    }

    /// A plan from the protobuf with this call's types declared and baked inputs written as
    /// initializers.
    fn plan_from_proto(&self, key: &ShapeKey) -> Result<Arc<TypedRunnableModel>, ModelError> {
        // Segment inputs produced by other stages have no declared type; tract wants one, so the
        // proto gets the actual types and shapes of this call.
        let mut proto = self.model.clone();
        let graph = proto.graph.as_mut().expect("segments have a graph");
        let mut inputs = Vec::new();
        for (mut vi, (dt, shape, baked)) in std::mem::take(&mut graph.input).into_iter().zip(key) {
            match baked {
                Some(values) => graph.initializer.push(if *dt == DatumType::I32 {
                    TensorProto {
                        name: vi.name.clone(),
                        dims: shape.iter().map(|&d| d as i64).collect(),
                        data_type: 6, // INT32
                        int32_data: values.iter().map(|&v| v as i32).collect(),
                        ..Default::default()
                    }
                } else {
                    TensorProto {
                        name: vi.name.clone(),
                        dims: shape.iter().map(|&d| d as i64).collect(),
                        data_type: 7, // INT64
                        int64_data: values.clone(),
                        ..Default::default()
                    }
                }),
                None => {
                    vi.r#type = Some(tensor_type(*dt, shape)?);
                    inputs.push(vi);
                }
            }
        }
        graph.input = inputs;
        let mut model = tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .map_err(ModelError::tract)?;
        let fed = key.iter().filter(|(_, _, baked)| baked.is_none());
        for (i, (dt, shape, _)) in fed.enumerate() {
            model
                .set_input_fact(i, InferenceFact::dt_shape(*dt, shape.as_slice()))
                .map_err(ModelError::tract)?;
        }
        model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(ModelError::tract)
    }
}

/// Run `plan` on `inputs` (shaped as `key`): a panic inside tract is an input error, and shapes
/// leave as int64.
fn execute(plan: &Plan, key: &ShapeKey, inputs: Vec<Value>) -> Result<Vec<Value>, ModelError> {
    let values: TVec<_> = inputs
        .into_iter()
        .zip(key)
        .filter(|(_, (_, _, baked))| plan.feeds_baked || baked.is_none())
        .map(|(t, _)| t.into_tvalue())
        .collect();
    // tract indexes some operands unchecked (a Gather past its table panics): a bad input
    // must be an error, not a crash of the server or client holding this segment.
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| plan.runnable.run(values)))
        .map_err(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            ModelError::Input(format!(
                "a local segment failed on this input (an index out of range?): {what}"
            ))
        })?
        .map_err(ModelError::tract)?;
    out.into_iter()
        .map(|v| {
            let t = v.into_tensor();
            // Shapes computed by Shape ops are TDim in tract; every dimension is concrete at
            // run time, and ONNX's own type for them is int64, so that is what crosses a
            // stage boundary (a symbolic dimension cannot be declared on the next segment).
            if t.datum_type() == DatumType::TDim {
                t.cast_to::<i64>()
                    .map(|c| c.into_owned())
                    .map_err(ModelError::tract)
            } else {
                Ok(t)
            }
        })
        .collect()
}

/// Float outputs equal within a few units in the last place, everything else equal.
///
/// A symbolic plan may pick other kernels than a concrete one (another summation order in an
/// attention product): measured on GPT-2 small, its outputs differ from the concrete plan's by
/// 2^-23 to 2^-22 relative, which the concrete plans of two sequence lengths differ by too. Each
/// element may differ by 2^-16 of its own magnitude plus 2^-16 of the tensor's median magnitude
/// (a floor for values that cancel; a median, so that outlier features and a mask's `f32::MIN`
/// do not widen it), and non-finite values must be identical. A plan that is wrong (a broadcast or a slice resolved against the wrong symbol)
/// differs by far more, or in shape, and is refused.
fn agree(a: &[Value], b: &[Value]) -> bool {
    const REL: f32 = 1.0 / 65536.0;
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            if x.datum_type() != y.datum_type() || x.shape() != y.shape() {
                return false;
            }
            match (f32_values(x, "x"), f32_values(y, "y")) {
                (Ok(p), Ok(q)) => {
                    let mut magnitudes: Vec<f32> = q
                        .iter()
                        .filter(|v| v.is_finite())
                        .map(|v| v.abs())
                        .collect();
                    magnitudes.sort_by(f32::total_cmp);
                    let median = magnitudes.get(magnitudes.len() / 2).copied().unwrap_or(0.0);
                    p.iter().zip(q).all(|(&u, &v)| {
                        if !u.is_finite() || !v.is_finite() {
                            return u.to_bits() == v.to_bits() || (u.is_nan() && v.is_nan());
                        }
                        (u - v).abs() <= REL * (u.abs().max(v.abs()) + median)
                    })
                }
                _ => x == y,
            }
        })
}

fn symbol_count(pattern: &[Vec<DimPattern>]) -> usize {
    pattern
        .iter()
        .flatten()
        .filter_map(|p| match p {
            DimPattern::Symbol { id, .. } => Some(id + 1),
            DimPattern::Fixed(_) => None,
        })
        .max()
        .unwrap_or(0)
}

pub(crate) fn tensor_type(dt: DatumType, shape: &[usize]) -> Result<TypeProto, ModelError> {
    let elem_type = match dt {
        DatumType::F32 => 1,
        DatumType::U8 => 2,
        DatumType::I8 => 3,
        DatumType::U16 => 4,
        DatumType::I16 => 5,
        DatumType::I32 => 6,
        DatumType::I64 => 7,
        DatumType::Bool => 9,
        DatumType::F16 => 10,
        DatumType::F64 => 11,
        DatumType::U32 => 12,
        DatumType::U64 => 13,
        other => {
            return Err(ModelError::Input(format!(
                "a {other:?} tensor cannot cross between stages"
            )))
        }
    };
    Ok(TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type,
            shape: Some(TensorShapeProto {
                dim: shape
                    .iter()
                    .map(|&d| tensor_shape_proto::Dimension {
                        value: Some(dimension::Value::DimValue(d as i64)),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    })
}

/// The declared shape of a graph input (`None` for a symbolic dimension such as `batch`).
pub fn declared_shape(graph: &GraphProto, name: &str) -> Option<Vec<Option<usize>>> {
    let vi = graph.input.iter().find(|v| v.name == name)?;
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    Some(
        t.shape
            .as_ref()?
            .dim
            .iter()
            .map(|d| match d.value {
                Some(dimension::Value::DimValue(v)) if v > 0 => Some(v as usize),
                _ => None,
            })
            .collect(),
    )
}

/// Check a caller's input against the graph's declared element type, naming both on mismatch.
pub fn check_input_type(graph: &GraphProto, name: &str, dt: DatumType) -> Result<(), ModelError> {
    let Some(vi) = graph.input.iter().find(|v| v.name == name) else {
        return Ok(());
    };
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Ok(());
    };
    if t.elem_type == 0 {
        return Ok(());
    }
    let expected = tensor_type(dt, &[]).ok().and_then(|tp| match tp.value {
        Some(type_proto::Value::TensorType(t)) => Some(t.elem_type),
        _ => None,
    });
    if expected == Some(t.elem_type) {
        Ok(())
    } else {
        Err(ModelError::Input(format!(
            "input `{name}` is {dt:?}, the model expects {}",
            onnx_type_name(t.elem_type)
        )))
    }
}

fn onnx_type_name(elem: i32) -> String {
    match elem {
        1 => "float32".into(),
        2 => "uint8".into(),
        3 => "int8".into(),
        6 => "int32".into(),
        7 => "int64".into(),
        9 => "bool".into(),
        10 => "float16".into(),
        11 => "float64".into(),
        other => format!("ONNX type {other}"),
    }
}

/// Check a caller's input against the graph's declared shape, naming both on mismatch.
pub fn check_input_shape(
    graph: &GraphProto,
    name: &str,
    shape: &[usize],
) -> Result<(), ModelError> {
    let Some(declared) = declared_shape(graph, name) else {
        return Ok(());
    };
    let fits = declared.len() == shape.len()
        && declared
            .iter()
            .zip(shape)
            .all(|(d, &s)| d.is_none_or(|d| d == s));
    if fits {
        Ok(())
    } else {
        let show: Vec<String> = declared
            .iter()
            .map(|d| d.map_or("?".into(), |d| d.to_string()))
            .collect();
        Err(ModelError::Input(format!(
            "input `{name}` has shape {shape:?}, the model expects [{}]",
            show.join(", ")
        )))
    }
}

/// An f32 tensor from a shape and row-major values.
pub fn f32_tensor(shape: &[usize], values: &[f32]) -> Result<Value, ModelError> {
    Tensor::from_shape(shape, values).map_err(ModelError::tract)
}

/// An int64 tensor from a shape and row-major values (token ids).
pub fn i64_tensor(shape: &[usize], values: &[i64]) -> Result<Value, ModelError> {
    Tensor::from_shape(shape, values).map_err(ModelError::tract)
}

/// The values of an int64 tensor (a named error for any other type).
pub fn i64_values<'a>(t: &'a Value, what: &str) -> Result<&'a [i64], ModelError> {
    t.try_as_plain_ram()
        .and_then(|v| v.as_slice::<i64>())
        .map_err(|_| ModelError::Input(format!("{what} is {:?}, not int64", t.datum_type())))
}

/// The values of an f32 tensor (a named error for any other type).
pub fn f32_values<'a>(t: &'a Value, what: &str) -> Result<&'a [f32], ModelError> {
    t.try_as_plain_ram()
        .and_then(|v| v.as_slice::<f32>())
        .map_err(|_| {
            ModelError::Input(format!(
                "{what} is {:?}, remote modules take f32 tensors",
                t.datum_type()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(shapes: &[&[usize]]) -> ShapeKey {
        shapes
            .iter()
            .map(|s| (DatumType::F32, s.to_vec(), None))
            .collect()
    }

    #[test]
    fn a_decode_step_generalises_to_one_symbol_with_offsets() {
        // Past keys [1, 12, P, 64] and a mask [1, P + 1], at P = 7 and then 8.
        let a = key(&[&[1, 12, 7, 64], &[1, 8]]);
        let b = key(&[&[1, 12, 8, 64], &[1, 9]]);
        let pattern = generalise(&a, &b).expect("one family");
        let sym = |offset| DimPattern::Symbol { id: 0, offset };
        assert_eq!(pattern[0][2], sym(0));
        assert_eq!(pattern[1][1], sym(1));
        assert_eq!(pattern[0][1], DimPattern::Fixed(12));
        let plan = |dims| SymbolicPlan {
            types: a.iter().map(|(dt, _, b)| (*dt, b.clone())).collect(),
            dims,
            plan: Plan {
                runnable: tract_onnx::prelude::TypedModel::default()
                    .into_runnable()
                    .expect("an empty model runs"),
                feeds_baked: true,
            },
        };
        let family = plan(pattern);
        assert!(family.matches(&a) && family.matches(&b));
        assert!(family.matches(&key(&[&[1, 12, 300, 64], &[1, 301]])));
        // The mask no longer one longer than the cache, another head count, another rank.
        assert!(!family.matches(&key(&[&[1, 12, 300, 64], &[1, 300]])));
        assert!(!family.matches(&key(&[&[1, 6, 300, 64], &[1, 301]])));
        assert!(!family.matches(&key(&[&[12, 300, 64], &[1, 301]])));
    }

    #[test]
    fn shapes_with_other_baked_values_or_dtypes_do_not_generalise() {
        let a = key(&[&[1, 4]]);
        assert!(generalise(&a, &a).is_none(), "nothing differs");
        let mut b = key(&[&[1, 5]]);
        b[0].0 = DatumType::F64;
        assert!(generalise(&a, &b).is_none());
        let baked = |v: i64| vec![(DatumType::I64, vec![2], Some(vec![1, v]))];
        assert!(generalise(&baked(3), &baked(4)).is_none());
        // Dimensions moving by different amounts get different symbols.
        // A size of 1 broadcasts and 0 is empty: no family through them (a prompt of 8 tokens,
        // then one-token decode steps; a first decode step after an empty cache).
        assert!(generalise(&key(&[&[1, 8, 768]]), &key(&[&[1, 1, 768]])).is_none());
        assert!(generalise(&key(&[&[1, 12, 0, 64]]), &key(&[&[1, 12, 8, 64]])).is_none());
        let p = generalise(&key(&[&[2, 7]]), &key(&[&[4, 8]])).expect("a family");
        assert_eq!(
            p[0],
            vec![
                DimPattern::Symbol { id: 0, offset: 0 },
                DimPattern::Symbol { id: 1, offset: 0 }
            ]
        );
    }

    #[test]
    fn agreement_is_per_element_and_exact_for_non_finite_values() {
        let t = |v: &[f32]| vec![f32_tensor(&[v.len()], v).unwrap()];
        // A few ulps apart: agree. A relative error of 2^-10 on a small value next to a large
        // one: disagree (a tolerance scaled by the largest value would have hidden it).
        let (x, y) = ([1.0, 0.5, 2.0, 3000.0], [1.0 + 2e-7, 0.5, 2.0, 3000.0]);
        assert!(agree(&t(&x), &t(&y)));
        assert!(!agree(&t(&x), &t(&[1.001, 0.5, 2.0, 3000.0])));
        // A mask's f32::MIN neither widens the tolerance nor fails the check.
        let mask = [0.5, 0.25, f32::MIN];
        assert!(agree(&t(&mask), &t(&mask)));
        assert!(!agree(&t(&mask), &t(&[0.6, 0.25, f32::MIN])));
        assert!(agree(
            &t(&[f32::NEG_INFINITY, 1.0]),
            &t(&[f32::NEG_INFINITY, 1.0])
        ));
        assert!(!agree(&t(&[f32::INFINITY, 1.0]), &t(&[f32::MAX, 1.0])));
        assert!(!agree(&t(&[1.0, 2.0]), &t(&[1.0])));
    }
}
