//! Reading float initializers without going through tract (whose loader panics on some exotic
//! types): only FLOAT and DOUBLE, inline, are accepted, anything else is a named error.

use tract_onnx::pb::TensorProto;

use super::ModelError;

const FLOAT: i32 = 1;
const DOUBLE: i32 = 11;

/// An initializer's shape and values as `f32`.
pub fn float_initializer(t: &TensorProto) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
    let err = |reason: String| ModelError::Tensor {
        name: t.name.clone(),
        reason,
    };
    let shape: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| err(format!("negative dimension {d}"))))
        .collect::<Result<_, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| err("element count overflows".into()))?;
    let values: Vec<f32> = match t.data_type {
        FLOAT if !t.raw_data.is_empty() => t
            .raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        FLOAT => t.float_data.clone(),
        DOUBLE if !t.raw_data.is_empty() => t
            .raw_data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk")) as f32)
            .collect(),
        DOUBLE => t.double_data.iter().map(|&v| v as f32).collect(),
        other => {
            return Err(err(format!(
                "ONNX data type {other} is not a float type (weights must be FLOAT or DOUBLE)"
            )))
        }
    };
    if values.len() != count {
        return Err(err(format!("{} values for shape {shape:?}", values.len())));
    }
    Ok((shape, values))
}
