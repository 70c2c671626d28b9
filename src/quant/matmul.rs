//! The clear integer path ("simulation"): what the encrypted evaluation must equal bit for bit.

use serde::{Deserialize, Serialize};

use super::{QuantError, QuantizedRows, QuantizedWeights};

/// `acc_rj = Σ_i v_ri · w_ji` with exact 64-bit integer arithmetic (row-major `rows × out`).
pub fn integer_matmul(rows: &QuantizedRows, weights: &QuantizedWeights) -> Vec<i64> {
    assert_eq!(rows.cols, weights.in_features, "caller checks shapes");
    let mut acc = Vec::with_capacity(rows.rows * weights.out_features);
    for r in 0..rows.rows {
        let x = rows.row(r);
        acc.extend((0..weights.out_features).map(|j| {
            x.iter()
                .zip(weights.row(j))
                .map(|(&v, &w)| v as i64 * w as i64)
                .sum::<i64>()
        }));
    }
    acc
}

/// What the client needs to turn accumulators into floats: per-output-channel weight scales and
/// zero points and the float bias — O(out) numbers, never the O(in·out) weight matrix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputDequantizer {
    pub out_features: usize,
    /// One entry (per tensor) or `out_features` entries (per channel).
    pub scales: Vec<f32>,
    pub zero_points: Vec<i32>,
    pub bias: Option<Vec<f32>>,
    /// The scale of what the server multiplied, when it is not the client's row quantizer: the
    /// last hidden quantizer of a non-linear module (its codes are centred: no zero point).
    #[serde(default)]
    pub input_scale: Option<f32>,
}

impl OutputDequantizer {
    pub fn new(weights: &QuantizedWeights, bias: Option<Vec<f32>>) -> Self {
        Self {
            out_features: weights.out_features,
            scales: weights.scales.clone(),
            zero_points: weights.zero_points.clone(),
            bias,
            input_scale: None,
        }
    }

    /// Shapes are consistent (a decoded spec is checked with this).
    pub fn check(&self) -> Result<(), QuantError> {
        let per = |n: usize| n == 1 || n == self.out_features;
        let bias_ok = self
            .bias
            .as_ref()
            .is_none_or(|b| b.len() == self.out_features);
        if self.out_features > 0 && per(self.scales.len()) && per(self.zero_points.len()) && bias_ok
        {
            Ok(())
        } else {
            Err(QuantError::Shape(format!(
                "dequantizer for {} outputs has {} scales, {} zero points and {:?} biases",
                self.out_features,
                self.scales.len(),
                self.zero_points.len(),
                self.bias.as_ref().map(Vec::len)
            )))
        }
    }

    fn pick<T: Copy>(v: &[T], j: usize) -> T {
        v[if v.len() == 1 { 0 } else { j }]
    }

    /// `s_x · s_w · (acc − zp_w·Σv) + b` for every row (row-major `rows × out`).
    pub fn apply(&self, acc: &[i64], rows: &QuantizedRows) -> Result<Vec<f32>, QuantError> {
        let out = self.out_features;
        if acc.len() != rows.rows * out {
            return Err(QuantError::Shape(format!(
                "{} accumulators for {} rows of {out} outputs",
                acc.len(),
                rows.rows
            )));
        }
        let mut y = Vec::with_capacity(acc.len());
        for r in 0..rows.rows {
            let (row_sum, s_x) = match self.input_scale {
                Some(s) => (0, s as f64),
                None => (
                    rows.row(r).iter().map(|&v| v as i64).sum(),
                    rows.quantizers[r].scale as f64,
                ),
            };
            for j in 0..out {
                let zp = Self::pick(&self.zero_points, j) as i64;
                let corrected = acc[r * out + j] - zp * row_sum;
                let b = self.bias.as_ref().map_or(0.0, |b| b[j] as f64);
                let s_w = Self::pick(&self.scales, j) as f64;
                y.push((s_x * s_w * corrected as f64 + b) as f32);
            }
        }
        Ok(y)
    }
}

/// Apply the weight zero-point correction and dequantize: `s_x · s_w · (acc − zp_w·Σv) + b`.
///
/// `acc` is what the server computed (clear or decrypted); the correction uses only values the
/// client holds.
pub fn correct_and_dequantize(
    acc: &[i64],
    rows: &QuantizedRows,
    weights: &QuantizedWeights,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(
        acc.len(),
        rows.rows * weights.out_features,
        "caller checks shapes"
    );
    OutputDequantizer::new(weights, bias.map(<[f32]>::to_vec))
        .apply(acc, rows)
        .expect("shapes checked above")
}
