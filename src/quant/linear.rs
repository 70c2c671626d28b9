//! A quantized linear layer in the clear: float reference, quantization and simulation together.

use super::{
    correct_and_dequantize, integer_matmul, InputQuantization, QuantError, QuantizedRows,
    QuantizedWeights,
};

/// `y = x·Wᵀ + b` with its quantized form.
#[derive(Clone, Debug)]
pub struct QuantizedLinear {
    pub weights: QuantizedWeights,
    pub bias: Option<Vec<f32>>,
    pub input: InputQuantization,
}

impl QuantizedLinear {
    /// Bundle quantized weights, an optional float bias (one per output) and the input
    /// quantization.
    pub fn new(
        weights: QuantizedWeights,
        bias: Option<Vec<f32>>,
        input: InputQuantization,
    ) -> Result<Self, QuantError> {
        let out_features = weights.out_features;
        if let Some(b) = &bias {
            if b.len() != out_features {
                return Err(QuantError::Shape(format!(
                    "bias has {} values for {out_features} outputs",
                    b.len()
                )));
            }
        }
        Ok(Self {
            weights,
            bias,
            input,
        })
    }

    pub fn quantize_input(&self, x: &[f32]) -> Result<QuantizedRows, QuantError> {
        self.input.quantize(x, self.weights.in_features)
    }

    /// Integer simulation followed by dequantization: the float output the FHE path reproduces.
    pub fn simulate(&self, rows: &QuantizedRows) -> (Vec<i64>, Vec<f32>) {
        let acc = integer_matmul(rows, &self.weights);
        let y = self.dequantize(&acc, rows);
        (acc, y)
    }

    pub fn dequantize(&self, acc: &[i64], rows: &QuantizedRows) -> Vec<f32> {
        correct_and_dequantize(acc, rows, &self.weights, self.bias.as_deref())
    }
}
