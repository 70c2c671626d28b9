//! Running a local segment with `tract`: parsed once, optimised per input shape (cached).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use tract_onnx::pb::{
    tensor_shape_proto, tensor_shape_proto::dimension, type_proto, GraphProto, ModelProto,
    TensorProto, TensorShapeProto, TypeProto,
};
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable,
    IntoTValue, IntoTensor, TVec, Tensor, TypedRunnableModel,
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
}

impl PlanCache {
    fn get(&mut self, key: &ShapeKey) -> Option<Plan> {
        self.clock += 1;
        let clock = self.clock;
        self.plans.get_mut(key).map(|(plan, used)| {
            *used = clock;
            plan.clone()
        })
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
        let key: ShapeKey = inputs
            .iter()
            .map(|t| (t.datum_type(), t.shape().to_vec(), baked_values(t)))
            .collect();
        let Plan {
            runnable: plan,
            feeds_baked,
        } = self.plan(&key)?;
        let values: TVec<_> = inputs
            .into_iter()
            .zip(&key)
            .filter(|(_, (_, _, baked))| feeds_baked || baked.is_none())
            .map(|(t, _)| t.into_tvalue())
            .collect();
        // tract indexes some operands unchecked (a Gather past its table panics): a bad input
        // must be an error, not a crash of the server or client holding this segment.
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| plan.run(values)))
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

    fn plan(&self, key: &ShapeKey) -> Result<Plan, ModelError> {
        if let Some(p) = self.plans.lock().expect("plan cache").get(key) {
            return Ok(p);
        }
        let tried = self.plan_from_parsed(key);
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

    /// A plan from the once-parsed model: baked inputs become sources of a known value, which
    /// tract propagates like constants. `None` when the segment could not be parsed that way.
    fn plan_from_parsed(
        &self,
        key: &ShapeKey,
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
            for (i, (dt, shape, baked)) in key.iter().enumerate() {
                let fact = match baked {
                    Some(values) => {
                        let t = Tensor::from_shape(shape, values).map_err(ModelError::tract)?;
                        InferenceFact::from(
                            t.cast_to_dt(*dt).map_err(ModelError::tract)?.into_owned(),
                        )
                    }
                    None => InferenceFact::dt_shape(*dt, shape.as_slice()),
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
