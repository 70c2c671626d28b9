//! The automorphism encoding (`fhe::auto`, `fhe::automorph`): bit-exactness against the integer
//! simulation across shapes and pack boundaries, its noise against its own model at the
//! worst-case shapes, that a response carries nothing but its outputs (every other coefficient
//! is noise whose distribution does not depend on the weights), its keys' sizes, and its typed
//! errors.

use hyfhe::fhe::{
    decode, encode, AutoKey, CodecError, Encoding, EncryptedOutputs, EncryptedRows, EvaluationKey,
    FheError, FourierLinearLayer, KeyProfile, LayerPlan, Precision, SessionKey,
};
use hyfhe::quant::QuantizedWeights;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::helpers::{random_layer, LayerSpec, KEYS};

const LIMIT: usize = 1 << 30;

fn plan(cols: usize, out: usize) -> LayerPlan {
    LayerPlan::new("auto", Precision::Exact, cols, out, 8, 8).unwrap()
}

fn auto_of(plan: &LayerPlan) -> (Encoding, usize) {
    match plan.auto_encoding() {
        Some(e @ Encoding::Auto { outputs }) => (e, outputs as usize),
        other => panic!(
            "{}×{}: no automorphism encoding ({other:?})",
            plan.in_features, plan.out_features
        ),
    }
}

#[test]
fn automorphism_requests_equal_the_integer_simulation_across_shapes_and_packs() {
    // Inner dimension below, at and above one chunk of N/m; one output; partial output groups;
    // several rows; more leaves than one pack holds (N/m), so several packs and a partial one.
    for (k, (rows, cols, out)) in [
        (1, 100, 64),
        (1, 768, 2304),
        (3, 300, 1500),
        (7, 130, 77),
        (2, 2048, 33),
        (1, 64, 1),
        (5, 64, 1000),
        // Wide enough that the products split their masks in two limbs.
        (2, 3072, 300),
    ]
    .into_iter()
    .enumerate()
    {
        let spec = LayerSpec::new(rows, cols, out);
        let (layer, _, quantized) = random_layer(spec, 70 + k as u64);
        let plan = plan(cols, out);
        let (encoding, _) = auto_of(&plan);
        let server = FourierLinearLayer::new(plan.clone(), &layer.weights.codes).unwrap();
        let request = KEYS
            .client
            .encrypt_rows_as(&plan, &quantized.values, rows, encoding)
            .unwrap();
        assert_eq!(request.encoding, encoding);
        let request: EncryptedRows = decode(&encode(&request), LIMIT).unwrap();
        let response = server
            .evaluate(KEYS.server(Precision::Exact), &request)
            .unwrap();
        let response: EncryptedOutputs = decode(&encode(&response), LIMIT).unwrap();
        let decrypted = KEYS.client.decrypt_outputs(&plan, &response).unwrap();
        let (expected, _) = layer.simulate(&quantized);
        let wrong = decrypted
            .iter()
            .zip(&expected)
            .filter(|(d, e)| d != e)
            .count();
        assert_eq!(
            wrong, 0,
            "{encoding} {rows}×{cols}→{out}: {wrong} outputs differ"
        );
    }
}

/// Full-scale weights (±128/127) and inputs (±255): the model's own worst case.
fn worst_case(rows: usize, cols: usize, out: usize, seed: u64) -> (Vec<i8>, Vec<i32>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let codes = (0..out * cols)
        .map(|_| if rng.gen() { 127 } else { -128 })
        .collect();
    let values = (0..rows * cols)
        .map(|_| if rng.gen() { 255 } else { -255 })
        .collect();
    (codes, values)
}

fn expected(codes: &[i8], values: &[i32], rows: usize, cols: usize, out: usize) -> Vec<i64> {
    let weights = QuantizedWeights {
        out_features: out,
        in_features: cols,
        bits: 8,
        codes: codes.to_vec(),
        scales: vec![1.0],
        zero_points: vec![0],
    };
    let rows_q = hyfhe::quant::QuantizedRows {
        rows,
        cols,
        values: values.to_vec(),
        quantizers: vec![hyfhe::quant::AffineQuantizer::from_range(0.0, 1.0, 8).unwrap(); rows],
    };
    hyfhe::quant::integer_matmul(&rows_q, &weights)
}

#[test]
fn automorphism_noise_stays_under_its_model_at_the_worst_case_shapes() {
    // One row and many; the narrowest input and the widest this encoding accepts
    // (`MAX_AUTO_IN`; wider layers are planned without it); one output up to 8192; plain products
    // (narrow layers) and split ones (wide layers).
    for (rows, cols, out) in [
        (1, 64, 1),
        (1, 64, 8192),
        (1, 768, 2304),
        (1, 2048, 8192),
        (24, 2048, 256),
        (1, 3072, 2048),
        (1, 4096, 8192),
    ] {
        let plan = plan(cols, out);
        if cols <= 768 {
            assert!(!plan.auto_split(), "{cols}");
        }
        if cols >= 3072 {
            assert!(plan.auto_split(), "{cols}");
        }
        let (encoding, _) = auto_of(&plan);
        let (codes, values) = worst_case(rows, cols, out, 5);
        let server = FourierLinearLayer::new(plan.clone(), &codes).unwrap();
        let request = KEYS
            .client
            .encrypt_rows_as(&plan, &values, rows, encoding)
            .unwrap();
        let response = server
            .evaluate(KEYS.server(Precision::Exact), &request)
            .unwrap();
        let phases = KEYS.client.decrypt_phases(&plan, &response).unwrap();
        let want = expected(&codes, &values, rows, cols, out);
        let errors: Vec<f64> = phases
            .iter()
            .zip(&want)
            .map(|(&p, &e)| p.wrapping_sub((e as u64) << plan.delta_log()) as i64 as f64)
            .collect();
        let std = (errors.iter().map(|e| e * e).sum::<f64>() / errors.len() as f64)
            .sqrt()
            .log2();
        let max = errors.iter().fold(0f64, |m, e| m.max(e.abs())).log2();
        let predicted = plan.noise_std_log2_as(encoding);
        eprintln!(
            "{encoding} (split {}) {rows}×{cols}→{out}: measured std 2^{std:.2} (max 2^{max:.2}), predicted 2^{predicted:.2}",
            plan.auto_split()
        );
        // The standard deviation only where there are enough samples to estimate it.
        if errors.len() >= 256 {
            assert!(
                std <= predicted,
                "{rows}×{cols}→{out}: std 2^{std:.2} above the model's 2^{predicted:.2}"
            );
        }
        let threshold = (plan.delta_log() - 1) as f64;
        assert!(
            max + 1.25f64.log2() <= threshold,
            "{rows}×{cols}→{out}: max noise 2^{max:.2} vs threshold 2^{threshold}"
        );
        assert!(
            max <= predicted + 8f64.log2(),
            "{rows}×{cols}→{out}: max 2^{max:.2} beyond 8σ of the model"
        );
    }
}

#[test]
fn a_response_carries_its_outputs_and_noise_independent_of_the_weights_elsewhere() {
    // Few outputs, so that most of each response's coefficients are not outputs; many fresh
    // encryptions of the same inputs.
    const REQUESTS: usize = 32;
    let (rows, cols, out) = (1, 768, 40);
    let plan = plan(cols, out);
    let (encoding, m) = auto_of(&plan);
    let (_, values) = worst_case(rows, cols, out, 8);
    let keys = KEYS.server(Precision::Exact).auto.as_ref().unwrap();
    let bound = 2f64.powf(plan.noise_std_log2_as(encoding)) * 8.0;
    let mut spreads = Vec::new();
    for seed in [1, 2] {
        // Two different weight matrices, full scale, the same inputs.
        let (codes, _) = worst_case(rows, cols, out, 100 + seed);
        let server = FourierLinearLayer::new(plan.clone(), &codes).unwrap();
        let want = expected(&codes, &values, rows, cols, out);
        let mut others = Vec::new();
        for _ in 0..REQUESTS {
            let request = KEYS
                .client
                .encrypt_rows_as(&plan, &values, rows, encoding)
                .unwrap();
            let (layout, glwes) = server.auto_glwes(keys, &request, m).unwrap();
            let phases = KEYS.client.decrypt_exact_glwes(&glwes);
            for (p, phase) in phases.iter().enumerate() {
                let outputs: std::collections::HashMap<usize, (usize, usize)> =
                    layout.slots(p).map(|(c, r, j)| (c, (r, j))).collect();
                for (c, &v) in phase.iter().enumerate() {
                    match outputs.get(&c) {
                        Some(&(r, j)) => {
                            let err =
                                v.wrapping_sub((want[r * out + j] as u64) << plan.delta_log());
                            assert!((err as i64).unsigned_abs() < 1 << (plan.delta_log() - 1));
                        }
                        None => others.push(v as i64 as f64),
                    }
                }
            }
        }
        // Every other coefficient is noise: bounded by 8σ of the output noise model, far below
        // one accumulator unit Δ (a partial sum or any other function of W would be whole
        // multiples of Δ).
        let max = others.iter().fold(0f64, |a, e| a.max(e.abs()));
        let std = (others.iter().map(|e| e * e).sum::<f64>() / others.len() as f64).sqrt();
        eprintln!(
            "W{seed}: {} non-output coefficients, std 2^{:.2}, max 2^{:.2}; Δ = 2^{}, bound 2^{:.2}",
            others.len(),
            std.log2(),
            max.log2(),
            plan.delta_log(),
            bound.log2()
        );
        assert!(others.len() > REQUESTS * 1900, "{}", others.len());
        assert!(
            max < bound,
            "a non-output coefficient of 2^{:.2}",
            max.log2()
        );
        spreads.push(std);
    }
    // The same distribution whatever W: the spreads agree. The coefficients of one response share
    // most of their noise (the last keyswitches touch all of them), so the samples are many
    // responses and the tolerance is loose: a function of W would be off by factors of 2^14.
    let ratio = spreads[0] / spreads[1];
    assert!(
        (0.8..1.25).contains(&ratio),
        "noise spreads differ by {ratio:.3}"
    );
}

#[test]
fn the_automorphism_keys_are_small_and_sessions_without_them_refuse_auto_requests_by_name() {
    // Seeded upload and Fourier form (66 GLWEs of 3 polynomials, 2 limbs).
    assert!(
        AutoKey::expected_len() < 2 << 20,
        "{}",
        AutoKey::expected_len()
    );
    let fourier = KEYS
        .server(Precision::Exact)
        .auto
        .as_ref()
        .unwrap()
        .size_bytes();
    assert!(fourier < 9 << 20, "{fourier}");
    assert!(KEYS.compact.auto.is_none());

    // A key made before automorphism keys existed (none inside) still loads, and an auto
    // request on it is a typed error naming the cause.
    let mut old: EvaluationKey = KEYS.exact.clone();
    old.auto = None;
    let old = SessionKey::new(&decode(&encode(&old), LIMIT).unwrap());
    let plan = plan(100, 10);
    let (encoding, _) = auto_of(&plan);
    let server = FourierLinearLayer::new(plan.clone(), &vec![1; 1000]).unwrap();
    let request = KEYS
        .client
        .encrypt_rows_as(&plan, &vec![3; 100], 1, encoding)
        .unwrap();
    match server.evaluate(&old, &request) {
        Err(FheError::ParameterMismatch(msg)) => assert!(msg.contains("automorphism"), "{msg}"),
        other => panic!("{other:?}"),
    }

    // Malformed: an m this build does not offer; bodies of the wrong count.
    let mut bad = request.clone();
    bad.encoding = Encoding::Auto { outputs: 3 };
    assert!(decode::<EncryptedRows>(&encode(&bad), LIMIT).is_err());
    let mut short = request.clone();
    short.bodies.pop();
    assert!(decode::<EncryptedRows>(&encode(&short), LIMIT).is_err());
    // A compact layer has no automorphism encoding.
    let compact = LayerPlan::new("c", Precision::Compact, 100, 10, 8, 8).unwrap();
    assert!(compact.auto_encoding().is_none());
    // Past `MAX_AUTO_IN` a layer is planned without it.
    assert!(plan_wide().auto_encoding().is_none());
    assert!(KEYS
        .client
        .encrypt_rows_as(&compact, &vec![3; 100], 1, encoding)
        .is_err());
    assert_eq!(
        "auto8".parse::<Encoding>().unwrap(),
        Encoding::Auto { outputs: 8 }
    );
    assert!("auto3".parse::<Encoding>().unwrap_err().contains("auto16"));
}

fn plan_wide() -> LayerPlan {
    plan(hyfhe::fhe::params::MAX_AUTO_IN + 1, 8)
}

/// The lean key (`KeyProfile::Lean`): the automorphism keys alone. It is small in both forms,
/// round-trips through the codec (version 2; version-1 full keys still load), refuses row and
/// blocked requests by name, serves auto and slot requests bit-exactly, and the planner never
/// picks an encoding it cannot serve, whatever the row count.
#[test]
fn a_lean_key_is_a_mebibyte_serves_auto_and_slot_exactly_and_refuses_the_rest_by_name() {
    let lean = KEYS
        .client
        .evaluation_key_as(Precision::Exact, KeyProfile::Lean, &|_| ());
    let blob = encode(&lean);
    assert!(blob.len() < 3 << 19, "lean key upload {} bytes", blob.len());
    let lean: EvaluationKey = decode(&blob, LIMIT).unwrap();
    assert_eq!(lean.profile, KeyProfile::Lean);
    let server_key = SessionKey::new(&lean);
    assert!(
        server_key.size_bytes() < 8 << 20,
        "lean key in the worker: {} bytes",
        server_key.size_bytes()
    );
    eprintln!(
        "lean key: {} bytes uploaded, {} bytes in Fourier form",
        blob.len(),
        server_key.size_bytes()
    );

    // A lean key with anything else in it is invalid; a compact lean key has no auto keys.
    let mut stray = lean.clone();
    stray.blocks = KEYS.exact.blocks.clone();
    match decode::<EvaluationKey>(&encode(&stray), LIMIT) {
        Err(CodecError::Invalid { reason, .. }) => assert!(reason.contains("lean"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let compact = KEYS
        .client
        .evaluation_key_as(Precision::Compact, KeyProfile::Lean, &|_| ());
    assert!(compact.auto.is_none());
    decode::<EvaluationKey>(&encode(&compact), LIMIT).unwrap();

    // Version 1 (before lean keys) still loads as a full key when it has no automorphism keys;
    // one with the first layout's automorphism keys is refused with what to do; a version from
    // the future names the versions this build reads.
    let mut exact_v1 = encode(&KEYS.exact);
    exact_v1[6..8].copy_from_slice(&1u16.to_le_bytes());
    match decode::<EvaluationKey>(&exact_v1, LIMIT) {
        Err(CodecError::Invalid { reason, .. }) => {
            assert!(
                reason.contains("version 1") && reason.contains("current client"),
                "{reason}"
            )
        }
        other => panic!("{:?}", other.map(|k| k.profile)),
    }
    let mut v1 = encode(&KEYS.compact);
    v1[6..8].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(
        decode::<EvaluationKey>(&v1, LIMIT).unwrap().profile,
        KeyProfile::Full
    );
    v1[6..8].copy_from_slice(&3u16.to_le_bytes());
    let err = decode::<EvaluationKey>(&v1, LIMIT).unwrap_err().to_string();
    assert!(err.contains("version 3") && err.contains("1 to 2"), "{err}");

    for (k, (rows, cols, out)) in [(1, 768, 300), (3, 200, 40), (40, 64, 96)]
        .into_iter()
        .enumerate()
    {
        let spec = LayerSpec::new(rows, cols, out);
        let (layer, _, quantized) = random_layer(spec, 300 + k as u64);
        let plan = plan(cols, out);
        let server = FourierLinearLayer::new(plan.clone(), &layer.weights.codes).unwrap();
        let (expected, _) = layer.simulate(&quantized);
        let chosen = Encoding::choose_for(&plan, rows, KeyProfile::Lean).unwrap();
        for encoding in plan.encodings.iter().copied() {
            let request = KEYS
                .client
                .encrypt_rows_as(&plan, &quantized.values, rows, encoding)
                .unwrap();
            match server.evaluate(&server_key, &request) {
                Ok(response) => {
                    assert!(encoding.served_by(KeyProfile::Lean), "{encoding}");
                    let decrypted = KEYS.client.decrypt_outputs(&plan, &response).unwrap();
                    assert_eq!(decrypted, expected, "{encoding} {rows}×{cols}→{out}");
                }
                Err(FheError::ParameterMismatch(msg)) => {
                    assert!(!encoding.served_by(KeyProfile::Lean), "{encoding}: {msg}");
                    assert!(
                        msg.contains("lean") && msg.contains(&encoding.to_string()),
                        "{msg}"
                    );
                }
                Err(other) => panic!("{encoding}: {other:?}"),
            }
        }
        assert!(chosen.served_by(KeyProfile::Lean));
        eprintln!("lean planner, {rows}×{cols}→{out}: {chosen}");
    }
    // Whatever the rows, the lean planner stays within what the key serves.
    let wide = plan(2048, 2048);
    for rows in [1, 2, 7, 16, 100, 500, 2048, 4096] {
        let e = Encoding::choose_for(&wide, rows, KeyProfile::Lean).unwrap();
        assert!(e.served_by(KeyProfile::Lean), "{rows} rows: {e}");
        assert_eq!(
            Encoding::choose_for(&wide, rows, KeyProfile::Full),
            Some(Encoding::choose(&wide, rows))
        );
    }
}

/// A plan compiled by an earlier build is checked against this build's automorphism noise model
/// at load: fresh plans pass; one whose `auto` no longer fits its stored input width (as GPT-2's
/// 3072-input layers compiled before `β = 15`) is refused with "recompile", in the client spec
/// and the server module alike.
#[test]
fn a_stored_plan_whose_auto_no_longer_fits_is_refused_with_recompile() {
    for (cols, out) in [(64, 8), (768, 2304), (2048, 2048), (3072, 768), (4096, 64)] {
        plan(cols, out).check_auto().unwrap();
    }
    let mut stale = plan(3072, 768);
    assert!(stale.auto_encoding().is_some());
    stale.input_body_bits -= 4;
    let err = stale.check_auto().unwrap_err();
    assert!(err.contains("recompile") && err.contains("auto8"), "{err}");
    // Without an automorphism encoding there is nothing to check.
    let compact = LayerPlan::new("c", Precision::Compact, 3072, 768, 8, 8).unwrap();
    compact.check_auto().unwrap();
}
