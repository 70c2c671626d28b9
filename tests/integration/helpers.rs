//! Shared keys (generated once: keygen takes seconds) and a random-layer fixture.

use std::sync::LazyLock;

use hyfhe::fhe::{ClientKey, EvaluationKey, Precision, SessionKey};
use hyfhe::quant::{
    AffineQuantizer, Granularity, InputQuantization, QuantizedLinear, QuantizedRows,
    QuantizedWeights, WeightScheme,
};
use rand::{rngs::StdRng, Rng, SeedableRng};

pub struct Keys {
    pub client: ClientKey,
    pub exact: EvaluationKey,
    pub compact: EvaluationKey,
    pub exact_server: SessionKey,
    pub compact_server: SessionKey,
}

pub static KEYS: LazyLock<Keys> = LazyLock::new(|| {
    let client = ClientKey::generate();
    let exact = client.evaluation_key(Precision::Exact, &|_| ());
    let compact = client.evaluation_key(Precision::Compact, &|_| ());
    let exact_server = SessionKey::new(&exact);
    let compact_server = SessionKey::new(&compact);
    Keys {
        client,
        exact,
        compact,
        exact_server,
        compact_server,
    }
});

impl Keys {
    pub fn server(&self, precision: Precision) -> &SessionKey {
        match precision {
            Precision::Exact => &self.exact_server,
            Precision::Compact => &self.compact_server,
        }
    }
}

/// How the fixture layer is quantized.
#[derive(Clone, Copy, Debug)]
pub struct LayerSpec {
    pub rows: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub granularity: Granularity,
    pub scheme: WeightScheme,
    pub dynamic_inputs: bool,
}

impl LayerSpec {
    pub fn new(rows: usize, in_features: usize, out_features: usize) -> Self {
        Self {
            rows,
            in_features,
            out_features,
            granularity: Granularity::PerChannel,
            scheme: WeightScheme::Symmetric,
            dynamic_inputs: false,
        }
    }
}

/// A random float layer (weights of both signs, skewed so that asymmetric zero points are
/// non-zero) and random inputs (not centred, so input zero points are non-zero).
pub fn random_layer(spec: LayerSpec, seed: u64) -> (QuantizedLinear, Vec<f32>, QuantizedRows) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (rows, cols, out) = (spec.rows, spec.in_features, spec.out_features);
    let weights: Vec<f32> = (0..out * cols)
        .map(|_| rng.gen_range(-0.6..1.0f32))
        .collect();
    let bias: Vec<f32> = (0..out).map(|_| rng.gen_range(-1.0..1.0f32)).collect();
    let x: Vec<f32> = (0..rows * cols)
        .map(|_| rng.gen_range(-0.5..2.0f32))
        .collect();
    let input = if spec.dynamic_inputs {
        InputQuantization::DynamicPerRow { bits: 8 }
    } else {
        InputQuantization::Static(AffineQuantizer::calibrate(&x, 8).unwrap())
    };
    let layer = QuantizedLinear::new(
        QuantizedWeights::quantize(&weights, out, cols, 8, spec.granularity, spec.scheme).unwrap(),
        Some(bias),
        input,
    )
    .unwrap();
    let quantized = layer.quantize_input(&x).unwrap();
    (layer, x, quantized)
}
