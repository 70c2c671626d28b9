//! A one-layer model built in code, named the way `torch.onnx.export` names `nn.Linear` `fc`:
//! what the serving benchmark measures at sizes no fixture file should carry (16 MiB of weights).

use rand::{rngs::StdRng, Rng, SeedableRng};
use tract_onnx::pb::{
    attribute_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    TensorProto, ValueInfoProto,
};
use tract_onnx::prelude::DatumType;

use super::runner::tensor_type;
use super::ModelError;

fn float_tensor(name: &str, dims: &[usize], values: Vec<f32>) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: 1,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn value_info(name: &str, shape: &[usize]) -> Result<ValueInfoProto, ModelError> {
    Ok(ValueInfoProto {
        name: name.to_string(),
        r#type: Some(tensor_type(DatumType::F32, shape)?),
        ..Default::default()
    })
}

/// `y = fc(x)` with `fc = nn.Linear(in_features, out_features)`, random weights of
/// PyTorch's default scale, input `[rows, in_features]`.
pub fn linear_model(
    rows: usize,
    in_features: usize,
    out_features: usize,
    seed: u64,
) -> Result<ModelProto, ModelError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let bound = 1.0 / (in_features as f32).sqrt();
    let weight: Vec<f32> = (0..in_features * out_features)
        .map(|_| rng.gen_range(-bound..bound))
        .collect();
    let bias: Vec<f32> = (0..out_features)
        .map(|_| rng.gen_range(-bound..bound))
        .collect();
    let gemm = NodeProto {
        name: "/fc/Gemm".into(),
        op_type: "Gemm".into(),
        input: vec!["input".into(), "fc.weight".into(), "fc.bias".into()],
        output: vec!["output".into()],
        attribute: vec![AttributeProto {
            name: "transB".into(),
            r#type: attribute_proto::AttributeType::Int as i32,
            i: 1,
            ..Default::default()
        }],
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        producer_name: "hyfhe".into(),
        graph: Some(GraphProto {
            name: "linear".into(),
            node: vec![gemm],
            initializer: vec![
                float_tensor("fc.weight", &[out_features, in_features], weight),
                float_tensor("fc.bias", &[out_features], bias),
            ],
            input: vec![value_info("input", &[rows, in_features])?],
            output: vec![value_info("output", &[rows, out_features])?],
            ..Default::default()
        }),
        ..Default::default()
    })
}
