//! Input (activation) quantizers: unsigned codes with a zero point, either fixed from calibration
//! data (static, per tensor) or computed for every row at run time (dynamic, per row).

use serde::{Deserialize, Serialize};

use super::{check_bits, check_finite, QuantError};

/// Unsigned affine quantizer: `x ≈ scale · (q − zero_point)`, `q ∈ [0, 2^bits − 1]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AffineQuantizer {
    pub bits: u32,
    pub scale: f32,
    pub zero_point: i32,
}

impl AffineQuantizer {
    /// The quantizer covering `[min, max]` (widened to contain 0, so that 0 is exact — padding
    /// and ReLU outputs stay exactly zero).
    pub fn from_range(min: f32, max: f32, bits: u32) -> Result<Self, QuantError> {
        check_bits("input", bits, 2, 16)?;
        check_finite("input range", &[min, max])?;
        let (min, max) = (min.min(0.0), max.max(0.0));
        let levels = ((1u32 << bits) - 1) as f32;
        let scale = if max > min { (max - min) / levels } else { 1.0 };
        let zero_point = (-min / scale).round().clamp(0.0, levels) as i32;
        Ok(Self {
            bits,
            scale,
            zero_point,
        })
    }

    /// A quantizer learned elsewhere (a quantization-aware-trained layer's input quantizer),
    /// checked: `zero_point` must be a code, `scale` positive and finite.
    pub fn new(bits: u32, scale: f32, zero_point: i32) -> Result<Self, QuantError> {
        check_bits("input", bits, 2, 16)?;
        check_finite("input scale", &[scale])?;
        if scale <= 0.0 {
            return Err(QuantError::Shape(format!(
                "input scale {scale} is not positive"
            )));
        }
        let max = (1i64 << bits) - 1;
        if !(0..=max).contains(&(zero_point as i64)) {
            return Err(QuantError::Shape(format!(
                "input zero point {zero_point} is outside the {bits}-bit codes 0..={max}"
            )));
        }
        Ok(Self {
            bits,
            scale,
            zero_point,
        })
    }

    /// Calibrate from sample values (static per-tensor quantization).
    pub fn calibrate(samples: &[f32], bits: u32) -> Result<Self, QuantError> {
        if samples.is_empty() {
            return Err(QuantError::EmptyCalibration);
        }
        check_finite("calibration data", samples)?;
        let (min, max) = min_max(samples);
        Self::from_range(min, max, bits)
    }

    /// Centred code `q − zero_point`, in `[−(2^bits − 1), 2^bits − 1]`.
    pub fn centred_code(&self, x: f32) -> i32 {
        let max = ((1u32 << self.bits) - 1) as f32;
        let q = ((x / self.scale).round() + self.zero_point as f32).clamp(0.0, max) as i32;
        q - self.zero_point
    }
}

/// Smallest and largest value (`(+inf, −inf)` for an empty slice).
pub fn min_max(values: &[f32]) -> (f32, f32) {
    values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// How a layer's input rows are quantized.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum InputQuantization {
    /// One quantizer for every row, fixed at compile time from calibration data.
    Static(AffineQuantizer),
    /// A quantizer computed from each row's own range at run time.
    DynamicPerRow { bits: u32 },
}

impl InputQuantization {
    pub fn bits(&self) -> u32 {
        match self {
            Self::Static(q) => q.bits,
            Self::DynamicPerRow { bits } => *bits,
        }
    }

    /// Quantize a row-major `rows × cols` matrix.
    pub fn quantize(&self, x: &[f32], cols: usize) -> Result<QuantizedRows, QuantError> {
        if cols == 0 || !x.len().is_multiple_of(cols) {
            return Err(QuantError::Shape(format!(
                "{} input values do not form rows of {cols}",
                x.len()
            )));
        }
        check_finite("input", x)?;
        let rows = x.len() / cols;
        let mut quantizers = Vec::with_capacity(rows);
        let mut values = Vec::with_capacity(x.len());
        for row in x.chunks_exact(cols) {
            let q = match *self {
                Self::Static(q) => q,
                Self::DynamicPerRow { bits } => {
                    let (min, max) = min_max(row);
                    AffineQuantizer::from_range(min, max, bits)?
                }
            };
            values.extend(row.iter().map(|&v| q.centred_code(v)));
            quantizers.push(q);
        }
        Ok(QuantizedRows {
            rows,
            cols,
            values,
            quantizers,
        })
    }
}

/// Quantized input rows: centred codes plus the quantizer each row used.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedRows {
    pub rows: usize,
    pub cols: usize,
    /// Row-major centred codes `q − zero_point`.
    pub values: Vec<i32>,
    pub quantizers: Vec<AffineQuantizer>,
}

impl QuantizedRows {
    pub fn row(&self, r: usize) -> &[i32] {
        &self.values[r * self.cols..(r + 1) * self.cols]
    }
}
