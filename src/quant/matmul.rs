//! The clear integer path ("simulation"): what the encrypted evaluation must equal bit for bit.

use super::{QuantizedRows, QuantizedWeights};

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
    let out = weights.out_features;
    assert_eq!(acc.len(), rows.rows * out, "caller checks shapes");
    let mut y = Vec::with_capacity(acc.len());
    for r in 0..rows.rows {
        let row_sum: i64 = rows.row(r).iter().map(|&v| v as i64).sum();
        let s_x = rows.quantizers[r].scale as f64;
        for j in 0..out {
            let corrected = acc[r * out + j] - weights.zero_point(j) as i64 * row_sum;
            let b = bias.map_or(0.0, |b| b[j] as f64);
            y.push((s_x * weights.scale(j) as f64 * corrected as f64 + b) as f32);
        }
    }
    y
}
