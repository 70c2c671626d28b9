//! What a client decodes from a server it does not trust: encrypted outputs (decoded, then
//! decrypted against a module's plan), model listings, session answers, the client bundle (its
//! paths are written to disk) and the artefact specs in it.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::LazyLock;

use hyfhe::fhe::{ClientKey, EncryptedOutputs, LayerPlan};
use hyfhe::hybrid::{ClientSpec, ServerModule};
use hyfhe::protocol::{ClientBundle, ModelList, SessionCreated};
use libfuzzer_sys::fuzz_target;

static KEY: LazyLock<ClientKey> = LazyLock::new(ClientKey::generate);

fuzz_target!(|data: &[u8]| {
    for outputs in common::decode_both::<EncryptedOutputs>(data)
        .into_iter()
        .flatten()
    {
        // Decryption allocates by the outputs' (validated) shape: keep one run fast.
        if outputs.values() <= 1 << 16 {
            let (i, o) = (16, outputs.out_features as usize);
            if let Ok(plan) = LayerPlan::new("fuzz", outputs.precision, i, o, 8, 8) {
                let _ = KEY.decrypt_outputs(&plan, &outputs);
            }
        }
    }
    let _ = serde_json::from_slice::<ModelList>(data);
    let _ = serde_json::from_slice::<SessionCreated>(data);
    if let Ok(bundle) = rmp_serde::from_slice::<ClientBundle>(data) {
        for path in bundle.files.keys() {
            let _ = ClientBundle::is_safe_path(path);
        }
    }
    let _ = common::decode_both::<ClientSpec>(data);
    let _ = common::decode_both::<ServerModule>(data);
});
