//! The real noise of encrypted outputs against the noise budget documented in `fhe::params`.

use hyfhe::fhe::{Encoding, FourierLinearLayer, LayerPlan, Precision};
use hyfhe::quant::QuantizedWeights;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::helpers::KEYS;

struct Measured {
    std_log2: f64,
    max_log2: f64,
}

/// Worst-case layer for the model: full-scale weights (|w| = 127/128) and inputs (|v| = 255), so
/// the measured noise meets the bound's own assumptions.
///
/// The outputs of one packed GLWE share its mask's modulus-switch rounding (and, with a binary
/// key, that shared part has a non-zero mean), so their errors are correlated: the RMS over one
/// pack is close to a single sample. Measuring over many rows averages over independent packs.
fn measure(precision: Precision, rows: usize, cols: usize, out: usize) -> (Measured, LayerPlan) {
    measure_as(precision, Encoding::Row, rows, cols, out)
}

fn measure_as(
    precision: Precision,
    encoding: Encoding,
    rows: usize,
    cols: usize,
    out: usize,
) -> (Measured, LayerPlan) {
    let mut rng = StdRng::seed_from_u64(11);
    let plan = LayerPlan::new("noise", precision, cols, out, 8, 8).unwrap();
    let codes: Vec<i8> = (0..out * cols)
        .map(|_| if rng.gen() { 127 } else { -128 })
        .collect();
    let values: Vec<i32> = (0..rows * cols)
        .map(|_| if rng.gen() { 255 } else { -255 })
        .collect();
    let weights = QuantizedWeights {
        out_features: out,
        in_features: cols,
        bits: 8,
        codes: codes.clone(),
        scales: vec![1.0],
        zero_points: vec![0],
    };
    let server = FourierLinearLayer::new(plan.clone(), &codes).unwrap();
    let request = KEYS
        .client
        .encrypt_rows_as(&plan, &values, rows, encoding)
        .unwrap();
    let response = server.evaluate(KEYS.server(precision), &request).unwrap();
    let phases = KEYS.client.decrypt_phases(&plan, &response).unwrap();
    let rows_q = hyfhe::quant::QuantizedRows {
        rows,
        cols,
        values,
        quantizers: vec![hyfhe::quant::AffineQuantizer::from_range(0.0, 1.0, 8).unwrap(); rows],
    };
    let expected = hyfhe::quant::integer_matmul(&rows_q, &weights);
    let errors: Vec<f64> = phases
        .iter()
        .zip(&expected)
        .map(|(&p, &e)| p.wrapping_sub((e as u64) << plan.delta_log()) as i64 as f64)
        .collect();
    let var = errors.iter().map(|e| e * e).sum::<f64>() / errors.len() as f64;
    let max = errors.iter().fold(0f64, |m, e| m.max(e.abs()));
    eprintln!(
        "{precision:?} {encoding}: measured std 2^{:.3} (max 2^{:.3}), predicted 2^{:.3}",
        var.sqrt().log2(),
        max.log2(),
        plan.noise_std_log2
    );
    (
        Measured {
            std_log2: var.sqrt().log2(),
            max_log2: max.log2(),
        },
        plan,
    )
}

#[test]
fn exact_output_noise_stays_under_the_documented_bound_with_margin() {
    let (m, plan) = measure(Precision::Exact, 16, 2048, 2048);
    // The model is an upper bound on the standard deviation...
    assert!(
        m.std_log2 <= plan.noise_std_log2,
        "measured std 2^{:.2} above the predicted 2^{:.2}",
        m.std_log2,
        plan.noise_std_log2
    );
    // ...and the worst of 32768 values stays a quarter below the decoding threshold Δ/2.
    let threshold = (plan.delta_log() - 1) as f64;
    assert!(
        m.max_log2 + 1.25f64.log2() <= threshold,
        "max noise 2^{:.2} vs threshold 2^{threshold}",
        m.max_log2
    );
}

#[test]
fn compact_output_noise_stays_under_the_documented_bound() {
    let (m, plan) = measure(Precision::Compact, 16, 2048, 2048);
    assert!(
        m.std_log2 <= plan.noise_std_log2,
        "measured std 2^{:.2} above the predicted 2^{:.2}",
        m.std_log2,
        plan.noise_std_log2
    );
}

/// The blocked and slot encodings are bounded by the row model (the argument is in
/// `fhe::params`): measured on the same worst-case layer, many packs each.
#[test]
fn blocked_and_slot_output_noise_stays_under_the_row_model_with_margin() {
    for (encoding, rows) in [
        (Encoding::Blocked { rows: 16 }, 64),
        (Encoding::Blocked { rows: 128 }, 256),
        (Encoding::Slot, 2048),
    ] {
        let (m, plan) = measure_as(Precision::Exact, encoding, rows, 2048, 2048);
        assert!(
            m.std_log2 <= plan.noise_std_log2,
            "{encoding}: measured std 2^{:.2} above the predicted 2^{:.2}",
            m.std_log2,
            plan.noise_std_log2
        );
        let threshold = (plan.delta_log() - 1) as f64;
        assert!(
            m.max_log2 + 1.25f64.log2() <= threshold,
            "{encoding}: max noise 2^{:.2} vs threshold 2^{threshold}",
            m.max_log2
        );
    }
}
