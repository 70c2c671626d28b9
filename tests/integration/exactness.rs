//! Exact precision: the decrypted accumulators equal the integer simulation bit for bit.

use hyfhe::fhe::{FourierLinearLayer, LayerPlan, Precision};
use hyfhe::quant::{Granularity, WeightScheme};

use crate::helpers::{random_layer, LayerSpec, KEYS};

/// Encrypt, evaluate, decrypt; return (decrypted, simulated) accumulators.
fn run(spec: LayerSpec, precision: Precision, seed: u64) -> (Vec<i64>, Vec<i64>, LayerPlan) {
    let (layer, _, quantized) = random_layer(spec, seed);
    let plan =
        LayerPlan::new("test", precision, spec.in_features, spec.out_features, 8, 8).unwrap();
    let server = FourierLinearLayer::new(plan.clone(), &layer.weights.codes).unwrap();
    let request = KEYS
        .client
        .encrypt_rows(&plan, &quantized.values, spec.rows)
        .unwrap();
    let response = server.evaluate(KEYS.server(precision), &request).unwrap();
    let decrypted = KEYS.client.decrypt_outputs(&plan, &response).unwrap();
    let (expected, _) = layer.simulate(&quantized);
    (decrypted, expected, plan)
}

fn assert_bit_exact(spec: LayerSpec, seed: u64) {
    let (decrypted, expected, _) = run(spec, Precision::Exact, seed);
    assert_eq!(decrypted.len(), expected.len());
    let wrong = decrypted
        .iter()
        .zip(&expected)
        .filter(|(d, e)| d != e)
        .count();
    assert_eq!(
        wrong,
        0,
        "{wrong} of {} outputs differ for {spec:?}",
        expected.len()
    );
}

#[test]
fn inner_dimension_below_n_is_bit_exact() {
    assert_bit_exact(LayerSpec::new(1, 100, 64), 1);
}

#[test]
fn inner_dimension_equal_to_n_is_bit_exact() {
    assert_bit_exact(LayerSpec::new(1, 2048, 256), 2);
}

#[test]
fn inner_dimension_above_n_and_not_a_multiple_is_bit_exact() {
    assert_bit_exact(LayerSpec::new(2, 2500, 96), 3);
}

#[test]
fn outputs_spanning_several_partial_packs_are_bit_exact() {
    // 3 rows × 1500 outputs = 4500 values: two full packs of 2048 and one of 404.
    assert_bit_exact(LayerSpec::new(3, 300, 1500), 4);
}

#[test]
fn many_rows_with_an_odd_output_count_are_bit_exact() {
    assert_bit_exact(LayerSpec::new(7, 130, 77), 5);
}

#[test]
fn per_tensor_asymmetric_weights_with_zero_points_are_bit_exact() {
    let spec = LayerSpec {
        granularity: Granularity::PerTensor,
        scheme: WeightScheme::Asymmetric,
        ..LayerSpec::new(2, 700, 50)
    };
    let (layer, _, quantized) = random_layer(spec, 6);
    assert!(layer.weights.zero_points.iter().any(|&z| z != 0));
    assert!(quantized.quantizers.iter().any(|q| q.zero_point != 0));
    assert!(layer.weights.codes.iter().any(|&w| w < 0));
    assert_bit_exact(spec, 6);
}

#[test]
fn per_channel_asymmetric_weights_with_dynamic_inputs_are_bit_exact() {
    let spec = LayerSpec {
        scheme: WeightScheme::Asymmetric,
        dynamic_inputs: true,
        ..LayerSpec::new(4, 513, 33)
    };
    assert_bit_exact(spec, 7);
}

#[test]
fn dequantized_encrypted_output_matches_the_float_layer_within_quantization_error() {
    let spec = LayerSpec::new(2, 256, 40);
    let (layer, x, quantized) = random_layer(spec, 8);
    let (decrypted, expected, _) = run(spec, Precision::Exact, 8);
    assert_eq!(decrypted, expected);
    let y = layer.dequantize(&decrypted, &quantized);
    let w = |j: usize, i: usize| {
        let s = layer.weights.scale(j);
        s * (layer.weights.row(j)[i] as f32 - layer.weights.zero_point(j) as f32)
    };
    for r in 0..spec.rows {
        for j in 0..spec.out_features {
            let float: f32 = (0..spec.in_features)
                .map(|i| x[r * spec.in_features + i] * w(j, i))
                .sum::<f32>()
                + layer.bias.as_ref().unwrap()[j];
            let got = y[r * spec.out_features + j];
            // 8-bit inputs: each term is off by at most half a step of x times |w|.
            let tolerance = 0.5 * quantized.quantizers[r].scale * spec.in_features as f32 * 1.0;
            assert!(
                (got - float).abs() < tolerance,
                "({r},{j}): {got} vs {float}"
            );
        }
    }
}

#[test]
fn compact_precision_keeps_the_predicted_top_bits() {
    let spec = LayerSpec::new(2, 2048, 1024);
    let (decrypted, expected, plan) = run(spec, Precision::Compact, 9);
    let max_err = decrypted
        .iter()
        .zip(&expected)
        .map(|(d, e)| (d - e).unsigned_abs())
        .max()
        .unwrap();
    let top_bits = plan.acc_bits - (64 - max_err.leading_zeros());
    assert!(top_bits > 12, "only {top_bits} exact top bits");
    assert!(
        top_bits >= plan.predicted_exact_top_bits,
        "measured {top_bits} < predicted {}",
        plan.predicted_exact_top_bits
    );
}
