//! The three encodings (row, blocked, slot): bit-exactness of each across the shapes the row
//! tests cover and at block boundaries, the planner's choices and switch points, bounded working
//! memory, and malformed or mismatched blobs of the new encodings as typed errors.

use hyfhe::fhe::{
    decode, encode, CodecError, Encoding, EncryptedOutputs, EncryptedRows, EvaluationKey, FheError,
    FourierLinearLayer, LayerPlan, Precision, SessionKey, BLOCK_ROWS,
};

use crate::helpers::{random_layer, LayerSpec, KEYS};

const LIMIT: usize = 1 << 30;

fn plan_for(spec: LayerSpec) -> LayerPlan {
    LayerPlan::new(
        "enc",
        Precision::Exact,
        spec.in_features,
        spec.out_features,
        8,
        8,
    )
    .unwrap()
}

/// Encrypt in `encoding`, evaluate under `budget` bytes of working memory, decrypt; every output
/// must equal the integer simulation. Returns the response.
fn assert_exact_as(
    spec: LayerSpec,
    encoding: Encoding,
    budget: usize,
    seed: u64,
) -> EncryptedOutputs {
    let (layer, _, quantized) = random_layer(spec, seed);
    let plan = plan_for(spec);
    let server = FourierLinearLayer::new(plan.clone(), &layer.weights.codes).unwrap();
    let request = KEYS
        .client
        .encrypt_rows_as(&plan, &quantized.values, spec.rows, encoding)
        .unwrap();
    assert_eq!(request.encoding, encoding);
    // Through the wire format, as a worker receives it.
    let request: EncryptedRows = decode(&encode(&request), LIMIT).unwrap();
    let response = server
        .evaluate_within(KEYS.server(Precision::Exact), &request, budget)
        .unwrap();
    let response: EncryptedOutputs = decode(&encode(&response), LIMIT).unwrap();
    assert_eq!(response.encoding, encoding);
    let decrypted = KEYS.client.decrypt_outputs(&plan, &response).unwrap();
    let (expected, _) = layer.simulate(&quantized);
    let wrong = decrypted
        .iter()
        .zip(&expected)
        .filter(|(d, e)| d != e)
        .count();
    assert_eq!(
        wrong,
        0,
        "{encoding}: {wrong} of {} outputs differ for {spec:?}",
        expected.len()
    );
    response
}

/// The shapes of `exactness.rs` (inner dimension below, at and above N; partial packs; odd
/// counts) and the blocks' edges: a block exactly full, one row past it, a partial last feature
/// group and a partial last output group.
const SHAPES: [(usize, usize, usize); 9] = [
    (1, 100, 64),
    (2, 2500, 96),
    (3, 300, 1500),
    (7, 130, 77),
    (16, 130, 77),
    (17, 200, 129),
    (33, 65, 300),
    (128, 64, 40),
    (129, 70, 17),
];

#[test]
fn every_encoding_is_bit_exact_across_the_row_tests_shapes_and_block_edges() {
    for (k, &(rows, cols, out)) in SHAPES.iter().enumerate() {
        for encoding in Encoding::all() {
            assert_exact_as(
                LayerSpec::new(rows, cols, out),
                encoding,
                256 << 20,
                k as u64,
            );
        }
    }
}

#[test]
fn asymmetric_weights_and_dynamic_inputs_are_bit_exact_in_the_blocked_and_slot_encodings() {
    let spec = LayerSpec {
        scheme: hyfhe::quant::WeightScheme::Asymmetric,
        dynamic_inputs: true,
        ..LayerSpec::new(40, 513, 33)
    };
    for encoding in [Encoding::Blocked { rows: 16 }, Encoding::Slot] {
        assert_exact_as(spec, encoding, 256 << 20, 21);
    }
}

#[test]
fn a_tiny_working_memory_budget_slices_the_work_and_stays_exact() {
    // 64 KiB is less than one output group of one batch: the blocked engine then takes one
    // group and one batch at a time, the slot engine one output at a time.
    for encoding in [
        Encoding::Blocked { rows: 16 },
        Encoding::Blocked { rows: 128 },
        Encoding::Slot,
    ] {
        assert_exact_as(LayerSpec::new(300, 150, 70), encoding, 64 << 10, 22);
    }
}

#[test]
fn rows_beyond_one_ring_make_several_slot_batches() {
    // 2100 rows = one full batch of 2048 and one of 52.
    let response = assert_exact_as(LayerSpec::new(2100, 24, 5), Encoding::Slot, 256 << 20, 23);
    assert_eq!(response.packs(), 2 * 5);
}

#[test]
fn the_planner_picks_auto_for_one_row_blocked_for_tens_and_hundreds_slot_for_thousands() {
    for (cols, out) in [(2048, 2048), (768, 3072)] {
        let plan = LayerPlan::new("p", Precision::Exact, cols, out, 8, 8).unwrap();
        let choose = |rows| Encoding::choose(&plan, rows);
        // One row: the automorphism encoding where the layer offers it (both shapes do).
        assert!(
            matches!(choose(1), Encoding::Auto { .. }),
            "{cols}×{out}: {}",
            choose(1)
        );
        assert!(
            matches!(choose(16), Encoding::Blocked { .. }),
            "{cols}×{out}"
        );
        assert!(
            matches!(choose(128), Encoding::Blocked { .. }),
            "{cols}×{out}"
        );
        assert_eq!(choose(2048), Encoding::Slot, "{cols}×{out}");
        for rows in [1, 4, 16, 64, 128, 256, 2048] {
            let bytes = plan.output_bytes_per_value_as(choose(rows), rows);
            assert!(bytes <= 24.0, "{cols}×{out}, {rows} rows: {bytes} B/value");
        }
        // The wire targets: ≤ 14 B per output value at 1 row of 2048 outputs (one full pack;
        // 3072 outputs leave half a pack), ≤ 32 at 128 rows.
        if out == 2048 {
            assert!(plan.output_bytes_per_value_as(choose(1), 1) <= 14.0);
        }
        assert!(plan.output_bytes_per_value_as(choose(128), 128) <= 32.0);
    }
}

#[test]
fn at_every_planner_switch_point_both_sides_are_bit_exact() {
    let (cols, out) = (200, 150);
    let plan = plan_for(LayerSpec::new(1, cols, out));
    let mut switches = Vec::new();
    let mut last = Encoding::choose(&plan, 1);
    for rows in 2..=2200 {
        let now = Encoding::choose(&plan, rows);
        if now != last {
            switches.push((rows, last, now));
            last = now;
        }
    }
    assert!(
        switches.len() >= 2,
        "the planner should switch at least from row to blocked and to slot: {switches:?}"
    );
    assert_eq!(switches.last().unwrap().2, Encoding::Slot, "{switches:?}");
    for (k, &(rows, before, after)) in switches.iter().enumerate() {
        eprintln!("{cols}×{out}: {before} → {after} at {rows} rows");
        assert_exact_as(
            LayerSpec::new(rows - 1, cols, out),
            before,
            256 << 20,
            30 + k as u64,
        );
        assert_exact_as(
            LayerSpec::new(rows, cols, out),
            after,
            256 << 20,
            40 + k as u64,
        );
    }
}

#[test]
fn encoding_names_parse_and_unknown_ones_name_what_is_offered() {
    for encoding in Encoding::all() {
        assert_eq!(encoding.to_string().parse::<Encoding>().unwrap(), encoding);
    }
    let err = "blocked24".parse::<Encoding>().unwrap_err();
    assert!(
        err.contains("blocked24") && err.contains("blocked16") && err.contains("slot"),
        "{err}"
    );
}

fn blocked_request(rows: usize, spec: LayerSpec) -> (EncryptedRows, LayerPlan, FourierLinearLayer) {
    let (layer, _, quantized) = random_layer(spec, 50);
    let plan = plan_for(spec);
    let server = FourierLinearLayer::new(plan.clone(), &layer.weights.codes).unwrap();
    let request = KEYS
        .client
        .encrypt_rows_as(
            &plan,
            &quantized.values,
            spec.rows,
            Encoding::Blocked { rows: rows as u32 },
        )
        .unwrap();
    (request, plan, server)
}

#[test]
fn malformed_blocked_and_slot_requests_are_typed_errors() {
    let (request, plan, _) = blocked_request(16, LayerSpec::new(20, 64, 10));
    // A block size this build does not offer.
    let mut bad = request.clone();
    bad.encoding = Encoding::Blocked { rows: 24 };
    match decode::<EncryptedRows>(&encode(&bad), LIMIT) {
        Err(CodecError::Invalid { reason, .. }) => assert!(reason.contains("24 rows"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Bodies cut short.
    let mut short = request.clone();
    short.encoding = Encoding::Slot;
    short.bodies.truncate(short.bodies.len() - 3);
    assert!(matches!(
        decode::<EncryptedRows>(&encode(&short), LIMIT),
        Err(CodecError::Invalid { .. })
    ));
    // Encrypting in an unknown block size.
    let (layer, _, quantized) = random_layer(LayerSpec::new(2, 64, 10), 51);
    let _ = layer;
    let err = KEYS
        .client
        .encrypt_rows_as(&plan, &quantized.values, 2, Encoding::Blocked { rows: 3 })
        .unwrap_err();
    assert!(
        matches!(err, FheError::ParameterMismatch(ref m) if m.contains("3 rows")),
        "{err}"
    );
}

#[test]
fn a_session_key_without_block_keys_refuses_blocked_requests_by_name_and_still_serves_rows() {
    let mut key = KEYS.exact.clone();
    key.blocks.clear();
    let key: EvaluationKey = decode(&encode(&key), LIMIT).unwrap();
    let server_key = SessionKey::new(&key);
    assert!(server_key.packing.block_sizes().is_empty());
    let spec = LayerSpec::new(20, 64, 10);
    let (request, _, server) = blocked_request(16, spec);
    let err = server.evaluate(&server_key, &request).unwrap_err();
    assert!(
        matches!(err, FheError::ParameterMismatch(ref m) if m.contains("blocks of 16 rows")),
        "{err}"
    );
    // Slot requests need no key at all; row requests use the row key.
    let (layer, _, quantized) = random_layer(spec, 50);
    let plan = plan_for(spec);
    for encoding in [Encoding::Slot, Encoding::Row] {
        let request = KEYS
            .client
            .encrypt_rows_as(&plan, &quantized.values, spec.rows, encoding)
            .unwrap();
        let response = server.evaluate(&server_key, &request).unwrap();
        let decrypted = KEYS.client.decrypt_outputs(&plan, &response).unwrap();
        assert_eq!(decrypted, layer.simulate(&quantized).0, "{encoding}");
    }
}

#[test]
fn a_layer_whose_spec_accepts_rows_only_refuses_other_encodings_and_its_client_sends_rows() {
    // Specs written before encodings existed deserialize with `encodings: [row]`.
    let spec = LayerSpec::new(20, 64, 10);
    let (layer, _, quantized) = random_layer(spec, 52);
    let mut plan = plan_for(spec);
    plan.encodings = vec![Encoding::Row];
    let old: LayerPlan = serde_json::from_value({
        let mut v = serde_json::to_value(&plan).unwrap();
        v.as_object_mut().unwrap().remove("encodings");
        v
    })
    .unwrap();
    assert_eq!(old.encodings, vec![Encoding::Row]);
    assert_eq!(Encoding::choose(&old, 2000), Encoding::Row);
    let server = FourierLinearLayer::new(plan.clone(), &layer.weights.codes).unwrap();
    let request = KEYS
        .client
        .encrypt_rows_as(&plan, &quantized.values, spec.rows, Encoding::Slot)
        .unwrap();
    let err = server
        .evaluate(KEYS.server(Precision::Exact), &request)
        .unwrap_err();
    assert!(
        matches!(err, FheError::ParameterMismatch(ref m) if m.contains("not slot")),
        "{err}"
    );
}

#[test]
fn malformed_block_keys_are_typed_errors() {
    let mut key = KEYS.exact.clone();
    assert_eq!(key.blocks.len(), BLOCK_ROWS.len());
    key.blocks[0].bodies.pop();
    match decode::<EvaluationKey>(&encode(&key), LIMIT) {
        Err(CodecError::Invalid { reason, .. }) => {
            assert!(reason.contains("block key for 16 rows"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let mut key = KEYS.exact.clone();
    key.blocks[1].rows = 24;
    assert!(matches!(
        decode::<EvaluationKey>(&encode(&key), LIMIT),
        Err(CodecError::Invalid { .. })
    ));
    let mut key = KEYS.exact.clone();
    let first = key.blocks[0].clone();
    key.blocks.push(first);
    match decode::<EvaluationKey>(&encode(&key), LIMIT) {
        Err(CodecError::Invalid { reason, .. }) => {
            assert!(reason.contains("each once"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // What the worker's upload limit is derived from: the row key and every block key.
    assert_eq!(
        KEYS.exact.wire_len(),
        EvaluationKey::expected_len(Precision::Exact)
    );
    assert_eq!(
        KEYS.compact.wire_len(),
        EvaluationKey::expected_len(Precision::Compact)
    );
}

#[test]
fn mismatched_outputs_of_the_new_encodings_are_typed_errors() {
    let spec = LayerSpec::new(20, 64, 10);
    let (request, plan, server) = blocked_request(16, spec);
    let response = server
        .evaluate(KEYS.server(Precision::Exact), &request)
        .unwrap();
    // Read as a slot response: the mask length no longer matches.
    let mut as_slot = response.clone();
    as_slot.encoding = Encoding::Slot;
    assert!(matches!(
        decode::<EncryptedOutputs>(&encode(&as_slot), LIMIT),
        Err(CodecError::Invalid { .. })
    ));
    assert!(KEYS.client.decrypt_outputs(&plan, &as_slot).is_err());
    // Read as another block size: the pack count no longer matches.
    let mut other = response.clone();
    other.encoding = Encoding::Blocked { rows: 64 };
    assert!(KEYS.client.decrypt_outputs(&plan, &other).is_err());
    let mut unknown = response;
    unknown.encoding = Encoding::Blocked { rows: 5 };
    match decode::<EncryptedOutputs>(&encode(&unknown), LIMIT) {
        Err(CodecError::Invalid { reason, .. }) => assert!(reason.contains("5 rows"), "{reason}"),
        other => panic!("{other:?}"),
    }
}
