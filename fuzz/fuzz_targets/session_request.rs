//! `POST /v1/sessions`: the msgpack request, then every key blob in it as the coordinator
//! decodes it (evaluation keys; bootstrap keys travel inside them and are decoded alone too).
#![no_main]

#[path = "common.rs"]
mod common;

use hyfhe::fhe::{decode, BootstrapKey, EvaluationKey};
use hyfhe::protocol::CreateSession;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = rmp_serde::from_slice::<CreateSession>(data) {
        for blob in &request.keys {
            let _ = decode::<EvaluationKey>(blob, blob.len());
        }
    }
    let _ = common::decode_both::<EvaluationKey>(data);
    let _ = common::decode_both::<BootstrapKey>(data);
});
