//! `POST /v1/sessions`: the msgpack request, then every key blob in it as the coordinator
//! decodes it (evaluation keys) and as a worker would (bootstrap keys travel inside them).
#![no_main]

use hyfhe::fhe::{decode, BootstrapKey, EvaluationKey};
use hyfhe::protocol::CreateSession;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limit = data.len();
    if let Ok(request) = rmp_serde::from_slice::<CreateSession>(data) {
        for blob in &request.keys {
            let _ = decode::<EvaluationKey>(blob, limit);
        }
    }
    // The blobs alone, so the fuzzer need not build a msgpack request around each.
    let _ = decode::<EvaluationKey>(data, limit);
    let _ = decode::<BootstrapKey>(data, limit);
});
