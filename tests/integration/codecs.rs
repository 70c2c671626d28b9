//! Untrusted blobs: every malformed, truncated, oversized or mismatched input is a typed error.

use hyfhe::fhe::{
    decode, encode, CodecError, EncryptedOutputs, EncryptedRows, EvaluationKey, FheError,
    FourierLinearLayer, LayerPlan, Precision,
};

use crate::helpers::KEYS;

const LIMIT: usize = 256 << 20;

fn plan(precision: Precision) -> LayerPlan {
    LayerPlan::new("codec", precision, 64, 8, 8, 8).unwrap()
}

fn rows_blob(precision: Precision) -> Vec<u8> {
    let values: Vec<i32> = (0..128).map(|i| i % 200 - 100).collect();
    encode(
        &KEYS
            .client
            .encrypt_rows(&plan(precision), &values, 2)
            .unwrap(),
    )
}

#[test]
fn encoded_rows_round_trip_and_evaluate() {
    let rows: EncryptedRows = decode(&rows_blob(Precision::Exact), LIMIT).unwrap();
    let layer = FourierLinearLayer::new(plan(Precision::Exact), &[3i8; 512]).unwrap();
    let out = layer.evaluate(&KEYS.exact_server, &rows).unwrap();
    let out: EncryptedOutputs = decode(&encode(&out), LIMIT).unwrap();
    let acc = KEYS
        .client
        .decrypt_outputs(&plan(Precision::Exact), &out)
        .unwrap();
    let want: i64 = (0..64).map(|i| 3 * (i % 200 - 100) as i64).sum();
    assert_eq!(acc[0], want);
}

#[test]
fn evaluation_key_round_trips_through_its_codec() {
    let blob = encode(&KEYS.compact);
    let key: EvaluationKey = decode(&blob, LIMIT).unwrap();
    assert_eq!(key.bodies, KEYS.compact.bodies);
    assert_eq!(key.blocks.len(), KEYS.compact.blocks.len());
    for (a, b) in key.blocks.iter().zip(&KEYS.compact.blocks) {
        assert_eq!((a.rows, &a.seeds, &a.bodies), (b.rows, &b.seeds, &b.bodies));
    }
    // Field names and length prefixes of the row key and its block keys: a few hundred bytes.
    assert!(blob.len() - key.wire_len() < 512, "envelope overhead");
}

#[test]
fn random_bytes_are_refused_as_not_a_blob() {
    let garbage: Vec<u8> = (0..1000u32).map(|i| (i * 7919 % 251) as u8).collect();
    assert!(matches!(
        decode::<EncryptedRows>(&garbage, LIMIT),
        Err(CodecError::BadMagic { .. })
    ));
}

#[test]
fn malformed_msgpack_after_a_valid_header_is_malformed() {
    let mut blob = rows_blob(Precision::Exact);
    blob.truncate(8);
    blob.extend_from_slice(&[0xc1, 0xff, 0x00]);
    assert!(matches!(
        decode::<EncryptedRows>(&blob, LIMIT),
        Err(CodecError::Malformed { .. })
    ));
}

#[test]
fn truncated_blobs_are_refused_for_every_cut() {
    let blob = rows_blob(Precision::Exact);
    for cut in [0, 3, 8, 20, blob.len() / 2, blob.len() - 1] {
        let err = decode::<EncryptedRows>(&blob[..cut], LIMIT).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::BadMagic { .. } | CodecError::Malformed { .. }
            ),
            "cut {cut}: {err:?}"
        );
    }
    let key = encode(&KEYS.exact);
    let err = decode::<EvaluationKey>(&key[..key.len() - 9], LIMIT).unwrap_err();
    assert!(matches!(err, CodecError::Malformed { .. }), "{err:?}");
}

#[test]
fn oversized_blobs_are_refused_before_parsing() {
    let blob = rows_blob(Precision::Exact);
    let err = decode::<EncryptedRows>(&blob, blob.len() - 1).unwrap_err();
    assert!(matches!(err, CodecError::TooLarge { .. }), "{err:?}");
    assert!(err.to_string().contains("exceeds the limit"));
}

#[test]
fn a_blob_of_another_kind_or_version_is_refused() {
    let blob = rows_blob(Precision::Exact);
    assert!(matches!(
        decode::<EvaluationKey>(&blob, LIMIT),
        Err(CodecError::WrongKind { .. })
    ));
    let mut newer = blob.clone();
    newer[6] = 99;
    assert!(matches!(
        decode::<EncryptedRows>(&newer, LIMIT),
        Err(CodecError::UnsupportedVersion { found: 99, .. })
    ));
}

#[test]
fn rows_whose_body_count_disagrees_with_their_shape_are_invalid() {
    let mut rows: EncryptedRows = decode(&rows_blob(Precision::Exact), LIMIT).unwrap();
    rows.rows = 3;
    let err = decode::<EncryptedRows>(&encode(&rows), LIMIT).unwrap_err();
    assert!(matches!(err, CodecError::Invalid { .. }), "{err:?}");
    rows.rows = 1_000_000;
    assert!(decode::<EncryptedRows>(&encode(&rows), LIMIT).is_err());
}

#[test]
fn an_evaluation_key_with_tampered_parameters_is_invalid() {
    let mut key = KEYS.compact.clone();
    key.params.level_count = 4;
    let err = decode::<EvaluationKey>(&encode(&key), LIMIT).unwrap_err();
    assert!(matches!(err, CodecError::Invalid { .. }), "{err:?}");
    let mut key = KEYS.compact.clone();
    key.precision = Precision::Exact;
    assert!(matches!(
        decode::<EvaluationKey>(&encode(&key), LIMIT),
        Err(CodecError::Invalid { .. })
    ));
}

#[test]
fn rows_encrypted_for_another_precision_or_shape_are_a_parameter_mismatch() {
    let compact_rows: EncryptedRows = decode(&rows_blob(Precision::Compact), LIMIT).unwrap();
    let layer = FourierLinearLayer::new(plan(Precision::Exact), &[1i8; 512]).unwrap();
    assert!(matches!(
        layer.evaluate(&KEYS.exact_server, &compact_rows),
        Err(FheError::ParameterMismatch(_))
    ));
    let exact_rows: EncryptedRows = decode(&rows_blob(Precision::Exact), LIMIT).unwrap();
    assert!(matches!(
        layer.evaluate(&KEYS.compact_server, &exact_rows),
        Err(FheError::ParameterMismatch(_))
    ));
    let wider = FourierLinearLayer::new(
        LayerPlan::new("wider", Precision::Exact, 65, 8, 8, 8).unwrap(),
        &[1i8; 520],
    )
    .unwrap();
    assert!(matches!(
        wider.evaluate(&KEYS.exact_server, &exact_rows),
        Err(FheError::Shape(_))
    ));
}

#[test]
fn outputs_decrypted_with_the_wrong_plan_are_a_parameter_mismatch() {
    let rows: EncryptedRows = decode(&rows_blob(Precision::Exact), LIMIT).unwrap();
    let layer = FourierLinearLayer::new(plan(Precision::Exact), &[1i8; 512]).unwrap();
    let out = layer.evaluate(&KEYS.exact_server, &rows).unwrap();
    let other = LayerPlan::new("other", Precision::Exact, 64, 9, 8, 8).unwrap();
    assert!(matches!(
        KEYS.client.decrypt_outputs(&other, &out),
        Err(FheError::ParameterMismatch(_))
    ));
    let mut short = out.clone();
    short.masks.pop();
    assert!(matches!(
        KEYS.client.decrypt_outputs(&plan(Precision::Exact), &short),
        Err(FheError::Codec(CodecError::Invalid { .. }))
    ));
}

#[test]
fn inputs_and_weights_out_of_range_are_refused() {
    let p = plan(Precision::Exact);
    assert!(matches!(
        KEYS.client.encrypt_rows(&p, &[256; 64], 1),
        Err(FheError::ValueOutOfRange(_))
    ));
    assert!(matches!(
        KEYS.client.encrypt_rows(&p, &[1; 63], 1),
        Err(FheError::Shape(_))
    ));
    let four_bit = LayerPlan::new("w4", Precision::Exact, 64, 8, 8, 4).unwrap();
    assert!(matches!(
        FourierLinearLayer::new(four_bit, &[8i8; 512]),
        Err(FheError::ValueOutOfRange(_))
    ));
}
