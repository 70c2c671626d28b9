//! What a client decodes from a server it does not trust: encrypted outputs (decoded, then
//! decrypted against a module's plan), model listings, session answers, the client bundle (its
//! paths are written to disk) and the artefact specs in it.
#![no_main]

use std::sync::LazyLock;

use hyfhe::fhe::{decode, ClientKey, EncryptedOutputs, LayerPlan};
use hyfhe::hybrid::{ClientSpec, ServerModule};
use hyfhe::protocol::{ClientBundle, ModelList, SessionCreated};
use libfuzzer_sys::fuzz_target;

static KEY: LazyLock<ClientKey> = LazyLock::new(ClientKey::generate);

fuzz_target!(|data: &[u8]| {
    if let Ok(outputs) = decode::<EncryptedOutputs>(data, data.len()) {
        // Decryption allocates by the outputs' (validated) shape: keep the fuzzer's inputs small
        // enough that one run stays fast.
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
    let _ = decode::<ClientSpec>(data, data.len());
    let _ = decode::<ServerModule>(data, data.len());
});
