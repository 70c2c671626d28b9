//! Weight quantizers: signed codes, per tensor or per output channel, symmetric or with a zero
//! point.

use serde::{Deserialize, Serialize};

use super::{check_bits, check_finite, QuantError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Granularity {
    PerTensor,
    PerChannel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WeightScheme {
    /// `w ≈ s · q`, `q ∈ [−(2^(b−1) − 1), 2^(b−1) − 1]`.
    Symmetric,
    /// `w ≈ s · (q − zp)`, `q ∈ [−2^(b−1), 2^(b−1) − 1]`: uses the full range for skewed weights.
    Asymmetric,
}

/// Quantized weight matrix `out × in` (row j = output channel j).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantizedWeights {
    pub out_features: usize,
    pub in_features: usize,
    pub bits: u32,
    /// Row-major codes; serialized as one byte string (fast to load, 1 byte per weight).
    #[serde(with = "codes_as_bytes")]
    pub codes: Vec<i8>,
    /// One entry (per tensor) or `out_features` entries (per channel).
    pub scales: Vec<f32>,
    pub zero_points: Vec<i32>,
}

impl QuantizedWeights {
    /// Quantize a row-major `out × in` float matrix.
    pub fn quantize(
        weights: &[f32],
        out_features: usize,
        in_features: usize,
        bits: u32,
        granularity: Granularity,
        scheme: WeightScheme,
    ) -> Result<Self, QuantError> {
        check_bits("weight", bits, 2, 8)?;
        if out_features == 0 || in_features == 0 || weights.len() != out_features * in_features {
            return Err(QuantError::Shape(format!(
                "{} weights for a {out_features}×{in_features} layer",
                weights.len()
            )));
        }
        check_finite("weights", weights)?;
        let groups: Vec<&[f32]> = match granularity {
            Granularity::PerTensor => vec![weights],
            Granularity::PerChannel => weights.chunks_exact(in_features).collect(),
        };
        let params: Vec<(f32, i32)> = groups
            .iter()
            .map(|g| group_params(g, bits, scheme))
            .collect();
        let (qmin, qmax) = code_range(bits, scheme);
        let per_row = |j: usize| params[if params.len() == 1 { 0 } else { j }];
        let codes = weights
            .chunks_exact(in_features)
            .enumerate()
            .flat_map(|(j, row)| {
                let (scale, zp) = per_row(j);
                row.iter()
                    .map(move |&w| ((w / scale).round() as i32 + zp).clamp(qmin, qmax) as i8)
            })
            .collect();
        Ok(Self {
            out_features,
            in_features,
            bits,
            codes,
            scales: params.iter().map(|p| p.0).collect(),
            zero_points: params.iter().map(|p| p.1).collect(),
        })
    }

    /// Weights quantized elsewhere (a quantization-aware-trained layer's learned integers): the
    /// codes are taken as they are, after checking they fit `bits` and the scales are usable.
    pub fn from_codes(
        codes: Vec<i8>,
        out_features: usize,
        in_features: usize,
        bits: u32,
        scales: Vec<f32>,
        zero_points: Vec<i32>,
    ) -> Result<Self, QuantError> {
        check_bits("weight", bits, 2, 8)?;
        if out_features == 0 || in_features == 0 || codes.len() != out_features * in_features {
            return Err(QuantError::Shape(format!(
                "{} weight codes for a {out_features}×{in_features} layer",
                codes.len()
            )));
        }
        if !(scales.len() == 1 || scales.len() == out_features) || zero_points.len() != scales.len()
        {
            return Err(QuantError::Shape(format!(
                "{} scales and {} zero points: expected 1 (per tensor) or {out_features} (per \
                 output channel) of each",
                scales.len(),
                zero_points.len()
            )));
        }
        check_finite("weight scales", &scales)?;
        if let Some(s) = scales.iter().find(|s| **s <= 0.0) {
            return Err(QuantError::Shape(format!(
                "weight scale {s} is not positive"
            )));
        }
        let (lo, hi) = code_range(bits, WeightScheme::Asymmetric);
        if let Some((i, c)) = codes
            .iter()
            .map(|&c| c as i32)
            .chain(zero_points.iter().copied())
            .enumerate()
            .find(|(_, c)| !(lo..=hi).contains(c))
        {
            let what = if i < codes.len() {
                "code"
            } else {
                "zero point"
            };
            return Err(QuantError::Shape(format!(
                "weight {what} {c} is outside the {bits}-bit range {lo}..={hi}"
            )));
        }
        Ok(Self {
            out_features,
            in_features,
            bits,
            codes,
            scales,
            zero_points,
        })
    }

    pub fn row(&self, j: usize) -> &[i8] {
        &self.codes[j * self.in_features..(j + 1) * self.in_features]
    }

    pub fn scale(&self, j: usize) -> f32 {
        self.scales[if self.scales.len() == 1 { 0 } else { j }]
    }

    pub fn zero_point(&self, j: usize) -> i32 {
        self.zero_points[if self.zero_points.len() == 1 { 0 } else { j }]
    }

    /// Largest `Σ_i w_ji²` over the rows: the weights' contribution to the product noise.
    pub fn max_row_square_norm(&self) -> u64 {
        (0..self.out_features)
            .map(|j| {
                self.row(j)
                    .iter()
                    .map(|&w| (w as i64 * w as i64) as u64)
                    .sum()
            })
            .max()
            .unwrap_or(0)
    }
}

fn code_range(bits: u32, scheme: WeightScheme) -> (i32, i32) {
    let half = 1i32 << (bits - 1);
    match scheme {
        WeightScheme::Symmetric => (-(half - 1), half - 1),
        WeightScheme::Asymmetric => (-half, half - 1),
    }
}

fn group_params(values: &[f32], bits: u32, scheme: WeightScheme) -> (f32, i32) {
    let (qmin, qmax) = code_range(bits, scheme);
    let (lo, hi) = values
        .iter()
        .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    match scheme {
        WeightScheme::Symmetric => {
            let m = lo.abs().max(hi.abs());
            (if m > 0.0 { m / qmax as f32 } else { 1.0 }, 0)
        }
        WeightScheme::Asymmetric => {
            let scale = if hi > lo {
                (hi - lo) / (qmax - qmin) as f32
            } else {
                1.0
            };
            let zp = (qmin as f32 - lo / scale)
                .round()
                .clamp(qmin as f32, qmax as f32) as i32;
            (scale, zp)
        }
    }
}

/// `Vec<i8>` as a MessagePack byte string instead of an array of integers (where every negative
/// code costs two bytes and decoding goes value by value).
mod codes_as_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(codes: &[i8], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = codes.iter().map(|&c| c as u8).collect();
        s.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i8>, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(d)?;
        Ok(bytes.into_iter().map(|b| b as i8).collect())
    }
}
