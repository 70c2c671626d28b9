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
    // One image: layer1.0 bootstraps 24 values per pixel (8 hidden, 8 identity, 8 outputs) on
    // 64 pixels, layer2.0 48 (16 each) on 16: 2304 bootstraps, ~11 ms each on 2 cores.
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
    // About 8 % of the hidden values round to a neighbour code (the rate `pbs.rs` checks), each
    // moving the sums after it by one step times a weight: over two blocks that moves logits
    // (spanning ±17, median top-two margin 7.9) by one to three units (1.7 and 2.6 seen), as the digits MLP's
    // (2.3). A wrong gather, gain or key moves them by the logits' own size.
    assert!(max_diff(&execute, &simulate) < 6.0);
}

#[test]
fn inspect_says_each_block_runs_remote_with_its_kind_of_shortcut() {
    for file in EXPORTS {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hyfhe"))
            .args(["inspect", fixture(file).to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let verdict = |module: &str| -> String {
            let mut lines = text
                .lines()
                .skip_while(|l| l.trim_start().split(' ').next() != Some(module));
            lines.nth(1).unwrap_or_default().trim().to_string()
        };
        assert!(
            verdict("layer1.0").contains("residual: identity"),
            "{file}: {}",
            verdict("layer1.0")
        );
        assert!(
            verdict("layer2.0").contains("residual: 1×1 projection"),
            "{file}: {}",
            verdict("layer2.0")
        );
    }
}

#[test]
fn residual_blocks_the_engine_cannot_run_are_refused_with_the_reason() {
    for (file, reason) in [
        (
            "resnet/shortcut_around_three.onnx",
            "a residual block of 3 layers",
        ),
        (
            "resnet/no_relu_after_add.onnx",
            "residual Add is not followed by an activation",
        ),
    ] {
        let onnx = OnnxModel::load(fixture(file)).unwrap();
        let err = match HybridModel::new("refused", onnx, &["block"]) {
            Err(e) => e.to_string(),
            Ok(mut m) => m
                .compile(
                    &images("digits_calibration_images.npy"),
                    &CompileOptions::default(),
                    &Silent,
                )
                .expect_err(file)
                .to_string(),
        };
        assert!(
            err.contains("`block`") && err.contains(reason),
            "{file}: {err}"
        );
    }
}
