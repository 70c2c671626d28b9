//! A residual block as one remote module: torchvision's `BasicBlock` (conv–bn–relu–conv–bn,
//! plus the identity or a 1×1 downsample, then ReLU) in a ResNet trained on the digits, exported
//! by both of torch's exporters. The server gathers the hidden map's im2col patches from the
//! bootstrapped LWEs; the shortcut rides as extra channels of the first convolution.

use hyfhe::commands::{accuracy, read_labels, read_npy};
use hyfhe::hybrid::{CompileOptions, HybridModel, Mode};
use hyfhe::model::{OnnxModel, Value};
use hyfhe::progress::Silent;

use crate::hybrid::{fixture, values, KEYS};

const EXPORTS: [&str; 2] = [
    "resnet/digits_resnet.onnx",
    "resnet/digits_resnet_dynamo.onnx",
];

fn resnet(file: &str, remote: &[&str]) -> HybridModel {
    let onnx = OnnxModel::load(fixture(file)).unwrap();
    let mut m = HybridModel::new("digits_resnet", onnx, remote).unwrap();
    m.compile(
        &images("digits_calibration_images.npy"),
        &CompileOptions::default(),
        &Silent,
    )
    .unwrap_or_else(|e| panic!("{file} {remote:?}: {e}"));
    m.use_keys(KEYS.clone());
    m
}

fn images(name: &str) -> Value {
    read_npy(&fixture(name)).unwrap()
}

fn argmax(v: &[f32]) -> Vec<usize> {
    v.chunks(10)
        .map(|r| (0..10).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap())
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn residual_blocks_compile_remote_from_both_exporters_and_keep_float_accuracy() {
    let x = images("digits_test_images.npy");
    let labels = read_labels(&fixture("digits_test_y.npy")).unwrap();
    let torch_logits = read_npy(&fixture("resnet/float_output.npy")).unwrap();
    for file in EXPORTS {
        for remote in [&["layer1.0"][..], &["layer2.0"], &["layer1.0", "layer2.0"]] {
            let m = resnet(file, remote);
            let torch = m.forward(x.clone(), Mode::Torch).unwrap().0;
            // The clear path is the export itself: it matches torch's own logits.
            let clear_vs_torch = max_diff(&values(&torch), &values(&torch_logits));
            assert!(clear_vs_torch < 1e-3, "{file}: {clear_vs_torch}");
            let simulate = m.forward(x.clone(), Mode::Simulate).unwrap().0;
            let (a_float, a_sim) = (
                accuracy(&torch, &labels).unwrap(),
                accuracy(&simulate, &labels).unwrap(),
            );
            eprintln!("{file} {remote:?}: float {a_float:.4}, simulate {a_sim:.4}");
            assert!(
                a_sim >= a_float - 0.02,
                "{file} {remote:?}: {a_sim} vs {a_float}"
            );
        }
    }
}

#[test]
fn both_residual_blocks_run_encrypted_with_the_classes_simulate_gives() {
    // One image: layer1.0 bootstraps 8 channels × 64 pixels of its hidden map plus the
    // identity's 8 (1024), layer2.0 16 + 16 channels × 16 pixels (512), ~11 ms each.
    let x = images("digits_test_images.npy").slice(0, 0, 1).unwrap();
    let m = resnet(EXPORTS[0], &["layer1.0", "layer2.0"]);
    let simulate = values(&m.forward(x.clone(), Mode::Simulate).unwrap().0);
    let (y, stats) = m.forward(x, Mode::Execute).unwrap();
    let execute = values(&y);
    eprintln!(
        "ResNet, both blocks encrypted: execute vs simulate logits {:.3e}, {} requests",
        max_diff(&execute, &simulate),
        stats.requests
    );
    assert_eq!(stats.requests, 2);
    assert_eq!(argmax(&execute), argmax(&simulate));
    // A bootstrap rounds to a neighbour code now and then (the rate `pbs.rs` checks); each
    // moves a logit by one hidden step times a weight, so the logits agree to a few tenths.
    assert!(max_diff(&execute, &simulate) < 1.0);
}
