//! The end-to-end hybrid path on one digits CNN image: `torch` (the float model in tract, the
//! plaintext baseline), `simulate` (quantized, in the clear) and `execute` (real FHE in process),
//! in one run so the ratios hold on a noisy machine.
//!
//! `cargo bench --bench hybrid`

use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use hyfhe::commands::read_npy;
use hyfhe::fhe::ClientKey;
use hyfhe::hybrid::{CompileOptions, ExecuteKeys, HybridModel, Mode};
use hyfhe::model::OnnxModel;
use hyfhe::progress::Silent;

fn digits_cnn(c: &mut Criterion) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let onnx = OnnxModel::load(fixtures.join("digits_cnn.onnx")).unwrap();
    let remote = ["features.2", "classifier.0", "classifier.2"];
    let mut model = HybridModel::new("digits_cnn", onnx, &remote).unwrap();
    let calibration = read_npy(&fixtures.join("digits_calibration_images.npy")).unwrap();
    model
        .compile(&calibration, &CompileOptions::default(), &Silent)
        .unwrap();
    model.use_keys(Arc::new(ExecuteKeys::new(ClientKey::generate())));
    model.local_server().unwrap();
    let images = read_npy(&fixtures.join("digits_test_images.npy")).unwrap();
    let one = images.slice(0, 0, 1).unwrap();

    let mut group = c.benchmark_group("digits_cnn_one_image");
    group.sample_size(10);
    for mode in [Mode::Torch, Mode::Simulate, Mode::Execute] {
        group.bench_function(mode.to_string(), |b| {
            b.iter(|| model.forward(one.clone(), mode).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, digits_cnn);
criterion_main!(benches);
