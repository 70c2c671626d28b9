//! The `hyfhe` binary as a user runs it.

use std::process::Command;

fn hyfhe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hyfhe"))
        .args(args)
        .output()
        .expect("run hyfhe")
}

/// Run `hyfhe bench linear --in 2048 --out 2048 --json --repetitions 1 <extra>`, require success
/// and parse stdout as exactly one JSON object.
fn bench_json(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "linear",
        "--in",
        "2048",
        "--out",
        "2048",
        "--json",
        "--repetitions",
        "1",
    ];
    args.extend_from_slice(extra);
    let out = hyfhe(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.trim()).expect("one JSON object")
}

#[test]
fn bench_linear_json_prints_exactly_one_object_with_the_contract_fields() {
    // The row encoding's wire targets (the planner's one-row choice is the automorphism
    // encoding, which sends `m` bodies per input value).
    let value = bench_json(&["--rows", "1", "--encoding", "row"]);
    let fields = [
        "rows",
        "in",
        "out",
        "threads",
        "precision",
        "keygen_ms",
        "encrypt_ms",
        "eval_ms",
        "decrypt_ms",
        "plaintext_ms",
        "ratio",
        "input_bytes_per_value",
        "output_bytes_per_value",
        "eval_key_bytes",
        "exact",
        "exact_top_bits",
    ];
    for f in fields {
        assert!(value.get(f).is_some(), "missing {f} in {value}");
    }
    assert_eq!(value["exact"], true, "{value}");
    assert_eq!(value["exact_top_bits"], 27);
    assert!(value["input_bytes_per_value"].as_f64().unwrap() <= 6.0);
    assert!(value["output_bytes_per_value"].as_f64().unwrap() <= 14.0);
}

#[test]
fn bench_linear_compact_reports_top_bits_and_fits_the_compact_wire_budget() {
    let value = bench_json(&["--compact"]);
    assert_eq!(value["precision"], "compact");
    assert!(value["exact_top_bits"].as_u64().unwrap() > 12, "{value}");
    assert!(
        value["input_bytes_per_value"].as_f64().unwrap() <= 5.0,
        "{value}"
    );
    assert!(
        value["output_bytes_per_value"].as_f64().unwrap() <= 7.0,
        "{value}"
    );
}

#[test]
fn a_layer_that_cannot_fit_is_refused_with_a_message_naming_the_reason() {
    let out = hyfhe(&["bench", "linear", "--in", "0", "--out", "4"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in_features"), "{stderr}");
}

fn fixture(name: &str) -> String {
    crate::hybrid::fixture(name).display().to_string()
}

#[test]
fn inspect_lists_module_paths_with_ops_and_parameter_shapes() {
    let out = hyfhe(&["inspect", &fixture("digits_cnn.onnx")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for line in [
        "features.2  [Conv]  features.2.weight [16, 8, 3, 3], features.2.bias [16]",
        "classifier.1  [Relu]",
        "flatten  [Flatten]",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
}

#[test]
fn compile_then_run_prints_stage_times_and_refuses_a_non_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("fc");
    let out_dir = out_dir.to_str().unwrap();
    let compile = |extra: &[&str]| {
        let mut args = vec![
            "compile",
            "--model",
            "",
            "--remote",
            "seq.0",
            "--remote",
            "seq.2",
            "--calibration",
            "",
            "--out",
            out_dir,
        ];
        let (model, calibration) = (
            fixture("fc_small.onnx"),
            fixture("fc_small_calibration.npy"),
        );
        args[2] = &model;
        args[8] = &calibration;
        args.extend_from_slice(extra);
        hyfhe(&args)
    };
    let out = compile(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = compile(&[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert!(compile(&["--force"]).status.success());

    let output = dir.path().join("y.npy");
    let input = fixture("fc_small_input.npy");
    let out = hyfhe(&[
        "run",
        out_dir,
        "--input",
        &input,
        "--mode",
        "simulate",
        "--compare",
        "torch",
        "--output",
        output.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mode"], "simulate");
    assert_eq!(report["output_shape"], serde_json::json!([8, 10]));
    assert!(report["reference"]["max_abs_diff"].as_f64().unwrap() < 0.05);
    let y = hyfhe::commands::read_npy(&output).unwrap();
    assert_eq!(y.shape(), [8, 10]);

    let out = hyfhe(&[
        "run",
        out_dir,
        "--input",
        &fixture("digits_test_x.npy"),
        "--mode",
        "simulate",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[360, 64]") && err.contains("expects"),
        "{err}"
    );
}
