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
    let value = bench_json(&["--rows", "1"]);
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
