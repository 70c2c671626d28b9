//! `POST /v1/sessions/{id}/modules/{module}/compute`: the encrypted rows as the coordinator
//! decodes them, then the shape check against a module's plan (what it refuses with 400).
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::LazyLock;

use hyfhe::fhe::{EncryptedRows, LayerPlan, Precision};
use hyfhe::protocol::check_rows;
use libfuzzer_sys::fuzz_target;

static PLANS: LazyLock<Vec<LayerPlan>> = LazyLock::new(|| {
    [(Precision::Exact, 64, 10), (Precision::Compact, 784, 128)]
        .into_iter()
        .map(|(p, i, o)| LayerPlan::new("fuzz", p, i, o, 8, 8).expect("a valid plan"))
        .collect()
});

fuzz_target!(|data: &[u8]| {
    for rows in common::decode_both::<EncryptedRows>(data)
        .into_iter()
        .flatten()
    {
        for plan in PLANS.iter() {
            let _ = check_rows("fuzz", plan, &rows);
        }
    }
});
