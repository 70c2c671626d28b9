//! Quantization: the integer view of a linear layer that the FHE path must reproduce bit for bit.
//!
//! A float layer `y = x·Wᵀ + b` becomes
//! `y_rj = s_x(r) · s_w(j) · (Σ_i v_ri · w_ji − zp_w(j) · Σ_i v_ri) + b_j`
//! where `v = q_x − zp_x` are the *centred* input codes (what the client encrypts) and `w` the signed
//! weight codes (what the server holds). The server only ever computes `Σ v·w`
//! ([`integer_matmul`]); the weight zero-point correction needs `Σ_i v_ri`, which the client knows in
//! the clear, so no weight row sums ever leave the server.

mod input;
mod linear;
mod matmul;
mod weight;

pub use input::{min_max, AffineQuantizer, InputQuantization, QuantizedRows};
pub use linear::QuantizedLinear;
pub use matmul::{correct_and_dequantize, integer_matmul, OutputDequantizer};
pub use weight::{Granularity, QuantizedWeights, WeightScheme};

/// Why a tensor could not be quantized.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QuantError {
    #[error("{what} bits must be in {min}..={max}, got {got}")]
    Bits {
        what: &'static str,
        min: u32,
        max: u32,
        got: u32,
    },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("{0} contains a non-finite value (NaN or infinity)")]
    NonFinite(&'static str),
    #[error("calibration data is empty")]
    EmptyCalibration,
}

pub(crate) fn check_bits(
    what: &'static str,
    bits: u32,
    min: u32,
    max: u32,
) -> Result<(), QuantError> {
    if (min..=max).contains(&bits) {
        Ok(())
    } else {
        Err(QuantError::Bits {
            what,
            min,
            max,
            got: bits,
        })
    }
}

pub(crate) fn check_finite(what: &'static str, values: &[f32]) -> Result<(), QuantError> {
    if values.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(QuantError::NonFinite(what))
    }
}
