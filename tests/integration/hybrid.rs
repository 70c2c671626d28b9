//! Hybrid models from the ONNX fixtures (tests/fixtures, built by make_fixtures.py): module
//! selection, every mode, im2col convolutions, and the saved artefact trees.

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use hyfhe::commands::{accuracy, read_labels, read_npy};
use hyfhe::fhe::ClientKey;
use hyfhe::hybrid::{ArtefactError, CompileOptions, ExecuteKeys, HybridError, HybridModel, Mode};
use hyfhe::model::{runner, ModelError, OnnxModel, Value};
use hyfhe::progress::Silent;

/// One set of keys for every model here (keygen and evaluation keys take seconds).
pub static KEYS: LazyLock<Arc<ExecuteKeys>> =
    LazyLock::new(|| Arc::new(ExecuteKeys::new(ClientKey::generate())));

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn compiled(
    model: &str,
    remote: &[&str],
    calibration: &str,
    options: &CompileOptions,
) -> HybridModel {
    let onnx = OnnxModel::load(fixture(model)).unwrap();
    let mut m = HybridModel::new(model, onnx, remote).unwrap();
    m.compile(&read_npy(&fixture(calibration)).unwrap(), options, &Silent)
        .unwrap();
    m.use_keys(KEYS.clone());
    m
}

pub fn values(v: &Value) -> Vec<f32> {
    runner::f32_values(v, "test").unwrap().to_vec()
}

fn max_abs_diff(a: &Value, b: &Value) -> f32 {
    assert_eq!(a.shape(), b.shape());
    values(a)
        .iter()
        .zip(values(b))
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn max_abs(a: &Value) -> f32 {
    values(a).iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn rms(a: &Value) -> f32 {
    let v = values(a);
    (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt()
}

fn rms_diff(a: &Value, b: &Value) -> f32 {
    let (a, b) = (values(a), values(b));
    (a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        / a.len() as f32)
        .sqrt()
}

fn assert_bit_identical(a: &Value, b: &Value) {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (values(a), values(b));
    let differing = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(differing, 0, "{differing} of {} values differ", a.len());
}

fn first_rows(v: &Value, n: usize) -> Value {
    v.slice(0, 0, n).unwrap()
}

#[test]
fn fc_small_execute_is_bit_identical_to_simulate_and_close_to_torch() {
    let m = fc_small();
    let x = read_npy(&fixture("fc_small_input.npy")).unwrap();
    let (execute, stats) = m.forward(x.clone(), Mode::Execute).unwrap();
    let (simulate, _) = m.forward(x.clone(), Mode::Simulate).unwrap();
    let (torch, _) = m.forward(x.clone(), Mode::Torch).unwrap();
    let (disable, _) = m.forward(x, Mode::Disable).unwrap();
    assert_bit_identical(&execute, &simulate);
    let err = max_abs_diff(&execute, &torch);
    eprintln!(
        "FCSmall seq.0: |execute − torch| ≤ {err:.3e} (outputs up to {:.3})",
        max_abs(&torch)
    );
    assert!(err < 0.02 * max_abs(&torch), "{err}");
    assert!(max_abs_diff(&disable, &simulate) < 1e-4);
    assert_eq!(stats.requests, 1);
    assert!(stats.upload_bytes > 0 && stats.download_bytes > 0);
}

#[test]
fn unknown_module_names_are_refused_with_the_closest_valid_names() {
    let onnx = OnnxModel::load(fixture("fc_small.onnx")).unwrap();
    let err = HybridModel::new("fc", onnx, &["seq.3"]).err().unwrap();
    let HybridError::Model(ModelError::UnknownModule { name, closest }) = &err else {
        panic!("{err}")
    };
    assert_eq!(name, "seq.3");
    assert_eq!(closest, &["seq.0", "seq.1", "seq.2"]);
    assert!(
        err.to_string()
            .contains("closest valid names: seq.0, seq.1, seq.2"),
        "{err}"
    );

    let onnx = OnnxModel::load(fixture("llm/gpt2_nokv_ts.onnx")).unwrap();
    let err = HybridModel::new("t", onnx, &["transformer.h.0.mlp.c_fx"])
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("transformer.h.0.mlp.c_fc"),
        "{err}"
    );
}

#[test]
fn nested_module_paths_resolve_and_a_parent_with_a_non_linear_op_is_refused() {
    // HF GPT-2 exported by the TorchScript exporter: ModuleList entries (`h.0`) have no scope of
    // their own, so the paths are rebuilt from node scopes and parameter names.
    let onnx = OnnxModel::load(fixture("llm/gpt2_nokv_ts.onnx")).unwrap();
    let paths: Vec<&str> = onnx.modules().iter().map(|m| m.path.as_str()).collect();
    for expected in [
        "transformer",
        "transformer.h.0",
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.mlp",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.act",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_proj",
        "lm_head",
    ] {
        assert!(paths.contains(&expected), "{expected} in {paths:?}");
    }
    let err = HybridModel::new("t", onnx.clone(), &["transformer.h.0.mlp"])
        .err()
        .unwrap();
    match &err {
        // Two layers with a GELU between them is a non-linear module, but HF's Conv1D views
        // the activation (`x.view(-1, nx)`) between them: the reshape is named.
        HybridError::Model(ModelError::Unsupported { module, reason }) => {
            assert_eq!(module, "transformer.h.0.mlp");
            assert!(
                reason.contains("Reshape") && reason.contains("not an element-wise activation"),
                "{reason}"
            );
        }
        other => panic!("{other}"),
    }
    let err = HybridModel::new("t", onnx, &["transformer.h.0.mlp.c_fc", "transformer.h.0"])
        .err()
        .unwrap();
    assert!(err.to_string().contains("inside"), "{err}");
}

#[test]
fn conv_as_im2col_matches_the_float_conv_and_execute_is_bit_exact() {
    for dynamic in [false, true] {
        let options = CompileOptions {
            dynamic_inputs: dynamic,
            ..CompileOptions::default()
        };
        let m = compiled(
            "conv_geometry.onnx",
            &["dilated", "head"],
            "conv_geometry_calibration.npy",
            &options,
        );
        let x = read_npy(&fixture("conv_geometry_input.npy")).unwrap();
        let (torch, _) = m.forward(x.clone(), Mode::Torch).unwrap();
        // im2col with float weights: equal to tract's Conv up to f32 rounding (stride 2,
        // padding 2, dilation 2, then a 2×2 kernel without padding).
        let float = m.forward_float(x.clone()).unwrap();
        assert_eq!(float.shape(), torch.shape());
        assert!(
            max_abs_diff(&float, &torch) < 1e-5,
            "{}",
            max_abs_diff(&float, &torch)
        );
        // Quantized (two 8-bit convs in a row): within quantization error of the float convs.
        let (simulate, _) = m.forward(x.clone(), Mode::Simulate).unwrap();
        let err = max_abs_diff(&simulate, &torch);
        let rel_rms = rms_diff(&simulate, &torch) / rms(&torch);
        eprintln!(
            "conv (dynamic {dynamic}): |simulate − torch| ≤ {err:.3e} of {:.3}, relative RMS {rel_rms:.4}",
            max_abs(&torch)
        );
        assert!(rel_rms < 0.02, "{rel_rms}");
        assert!(err < 0.06 * max_abs(&torch), "{err}");
        let (execute, _) = m.forward(x, Mode::Execute).unwrap();
        assert_bit_identical(&execute, &simulate);
    }
}

#[test]
fn digits_models_keep_float_accuracy_and_execute_equals_simulate() {
    let labels = read_labels(&fixture("digits_test_y.npy")).unwrap();
    let cases = [
        (
            "digits_mlp.onnx",
            vec!["net.0", "net.2", "net.4"],
            "digits_calibration_x.npy",
            "digits_test_x.npy",
        ),
        (
            "digits_cnn.onnx",
            vec!["features.2", "classifier.0", "classifier.2"],
            "digits_calibration_images.npy",
            "digits_test_images.npy",
        ),
    ];
    for (model, remote, calibration, test) in cases {
        let m = compiled(model, &remote, calibration, &CompileOptions::default());
        let x = read_npy(&fixture(test)).unwrap();
        let (torch, _) = m.forward(x.clone(), Mode::Torch).unwrap();
        let (simulate, _) = m.forward(x.clone(), Mode::Simulate).unwrap();
        let (a_torch, a_sim) = (
            accuracy(&torch, &labels).unwrap(),
            accuracy(&simulate, &labels).unwrap(),
        );
        eprintln!("{model}: torch {a_torch:.4}, simulate {a_sim:.4}");
        assert!(a_torch > 0.94, "{a_torch}");
        assert!(a_sim >= a_torch - 0.01, "{a_sim} vs {a_torch}");
        // Execute on a slice (the full split is BENCHMARKS.md's job).
        let few = first_rows(&x, 24);
        let (execute, _) = m.forward(few.clone(), Mode::Execute).unwrap();
        let (simulate, _) = m.forward(few, Mode::Simulate).unwrap();
        assert_bit_identical(&execute, &simulate);
    }
}

#[test]
fn a_wrong_input_shape_is_a_clear_error() {
    let m = fc_small();
    let x = runner::f32_tensor(&[2, 7], &[0.0; 14]).unwrap();
    let err = m.forward(x, Mode::Simulate).err().unwrap().to_string();
    assert!(err.contains("[2, 7]") && err.contains("[?, 10]"), "{err}");
}

/// FCSmall with `seq.0` remote, compiled with the defaults.
fn fc_small() -> HybridModel {
    compiled(
        "fc_small.onnx",
        &["seq.0"],
        "fc_small_calibration.npy",
        &CompileOptions::default(),
    )
}

/// Compile FCSmall and save it into a fresh directory.
fn saved_fc_small() -> (tempfile::TempDir, HybridModel) {
    let mut m = fc_small();
    let dir = tempfile::tempdir().unwrap();
    m.save_and_clear_private_info(dir.path(), false).unwrap();
    (dir, m)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_private_weights_bytes_appear_nowhere_under_client() {
    let (dir, cleared) = saved_fc_small();
    // After saving, the in-memory model is client-only.
    let x = read_npy(&fixture("fc_small_input.npy")).unwrap();
    assert!(matches!(
        cleared.forward(x, Mode::Torch),
        Err(HybridError::Missing { .. })
    ));

    let onnx = OnnxModel::load(fixture("fc_small.onnx")).unwrap();
    let weight = onnx.linear_module("seq.0").unwrap().weight;
    let loaded = HybridModel::load(dir.path()).unwrap();
    let codes = &loaded.server_modules().unwrap()["seq.0"].weights.codes;
    // Needles: every weight row as f32 LE bytes, and every row of quantized codes.
    let mut needles: Vec<Vec<u8>> = weight
        .chunks(10)
        .map(|row| row.iter().flat_map(|w| w.to_le_bytes()).collect())
        .collect();
    needles.extend(
        codes
            .chunks(10)
            .map(|row| row.iter().map(|&c| c as u8).collect()),
    );
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);

    let client_files = files_under(&dir.path().join("client"));
    assert!(client_files.len() >= 3, "{client_files:?}");
    for f in &client_files {
        let bytes = std::fs::read(f).unwrap();
        for n in &needles {
            assert!(
                !contains(&bytes, n),
                "{} holds private weight bytes",
                f.display()
            );
        }
    }
    // The test can fail: the private and server trees do hold them.
    let private = std::fs::read(dir.path().join("private/model.onnx")).unwrap();
    assert!(contains(&private, &needles[0]));
    let server = std::fs::read(dir.path().join("server/seq.0/module.bin")).unwrap();
    assert!(needles[10..].iter().any(|n| contains(&server, n)));
}

#[test]
fn saved_trees_load_back_and_run_every_mode_they_hold() {
    let (dir, _) = saved_fc_small();
    let x = read_npy(&fixture("fc_small_input.npy")).unwrap();
    let full = HybridModel::load(dir.path()).unwrap();
    full.use_keys(KEYS.clone());
    let (sim, _) = full.forward(x.clone(), Mode::Simulate).unwrap();
    let (exe, _) = full.forward(x.clone(), Mode::Execute).unwrap();
    assert_bit_identical(&exe, &sim);
    full.forward(x.clone(), Mode::Torch).unwrap();

    // A client holds only client/: the owner's modes name what is missing.
    std::fs::remove_dir_all(dir.path().join("server")).unwrap();
    std::fs::remove_dir_all(dir.path().join("private")).unwrap();
    let client = HybridModel::load(dir.path()).unwrap();
    let err = client
        .forward(x.clone(), Mode::Torch)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("private/"), "{err}");
    let err = client.forward(x, Mode::Simulate).err().unwrap().to_string();
    assert!(err.contains("server/"), "{err}");
}

#[test]
fn a_corrupted_artefact_is_refused_naming_the_file() {
    let (dir, _) = saved_fc_small();
    let path = dir.path().join("server/seq.0/module.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    match HybridModel::load(dir.path()) {
        Err(HybridError::Artefact(ArtefactError::Corrupted { path, .. })) => {
            assert!(path.ends_with("server/seq.0/module.bin"), "{path}")
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a corrupted module loaded"),
    }
}

#[test]
fn a_format_version_mismatch_is_refused() {
    let (dir, _) = saved_fc_small();
    let path = dir.path().join("client/manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("\"format_version\": 1", "\"format_version\": 2"),
    )
    .unwrap();
    let err = HybridModel::load(dir.path()).err().unwrap();
    assert!(
        matches!(
            err,
            HybridError::Artefact(ArtefactError::Version { found: 2, .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("recompile"), "{err}");
}

#[test]
fn saving_into_a_non_empty_directory_needs_force() {
    let mut m = fc_small();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    let err = m
        .save_and_clear_private_info(dir.path(), false)
        .err()
        .unwrap();
    assert!(
        matches!(err, HybridError::Artefact(ArtefactError::NotEmpty(_))),
        "{err}"
    );
    assert!(err.to_string().contains("--force"));
    m.save_and_clear_private_info(dir.path(), true).unwrap();
    assert!(
        dir.path().join("notes.txt").exists(),
        "--force only replaces our own trees"
    );
    HybridModel::load(dir.path()).unwrap();
}

#[test]
fn malformed_models_and_inputs_are_typed_errors() {
    // Not protobuf at all.
    let err = OnnxModel::from_bytes(b"definitely not an onnx model")
        .err()
        .unwrap();
    assert!(matches!(err, ModelError::Decode(_)), "{err}");
    // A truncated real model.
    let bytes = std::fs::read(fixture("digits_cnn.onnx")).unwrap();
    assert!(OnnxModel::from_bytes(&bytes[..bytes.len() / 2]).is_err());
    // A missing file names the path.
    let err = OnnxModel::load(fixture("nope.onnx"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope.onnx"), "{err}");

    // A NaN in the input of a remote module.
    let m = fc_small();
    let mut v = vec![0.5f32; 10];
    v[3] = f32::NAN;
    let x = runner::f32_tensor(&[1, 10], &v).unwrap();
    let err = m.forward(x, Mode::Simulate).err().unwrap().to_string();
    assert!(err.contains("non-finite"), "{err}");
    // Too many bits for the weights.
    let onnx = OnnxModel::load(fixture("fc_small.onnx")).unwrap();
    let mut m = HybridModel::new("fc", onnx, &["seq.0"]).unwrap();
    let options = CompileOptions {
        n_bits: 12,
        ..CompileOptions::default()
    };
    let calibration = read_npy(&fixture("fc_small_calibration.npy")).unwrap();
    let err = m
        .compile(&calibration, &options, &Silent)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("weight bits must be in 2..=8, got 12"),
        "{err}"
    );
}

#[test]
fn a_tampered_client_spec_is_refused_even_with_a_matching_hash() {
    use hyfhe::fhe::{decode, encode};
    use hyfhe::hybrid::ClientSpec;
    let (dir, _) = saved_fc_small();
    let spec_path = dir.path().join("client/modules/seq.0.spec");
    let mut spec: ClientSpec = decode(&std::fs::read(&spec_path).unwrap(), 1 << 20).unwrap();
    spec.in_features = 11; // disagrees with its plan
    let bytes = encode(&spec);
    std::fs::write(&spec_path, &bytes).unwrap();
    // Re-hash so only the content check can catch it.
    let manifest_path = dir.path().join("client/manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["files"]["modules/seq.0.spec"] = hyfhe::hybrid::sha256_hex(&bytes).into();
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let err = HybridModel::load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("invalid client spec"), "{err}");
}
