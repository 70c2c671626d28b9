//! Language models exported by real PyTorch (tests/fixtures/llm, written by
//! make_torch_fixtures.py): tiny GPT-2 and tiny Llama from the TorchScript and the torch.export
//! exporters, with and without a KV cache, every block linear layer remote.

use std::path::PathBuf;
use std::process::Command;
use std::sync::LazyLock;

use hyfhe::commands::read_npy;
use hyfhe::hybrid::{CompileOptions, HybridError, HybridModel, Mode};
use hyfhe::model::{runner, ModelError, OnnxModel, Value};
use hyfhe::progress::Silent;

use crate::cluster::{config_file, metric, serial, serve};
use crate::hybrid::{fixture, values, KEYS};
use crate::serving::{bits, connect, SESSION_KEYS};

const VARIANTS: [&str; 4] = ["kv_dynamo", "kv_ts", "nokv_dynamo", "nokv_ts"];
/// Logits of the 8-bit model against PyTorch's own float logits over the prompt: the relative
/// error ‖ours − torch‖₂ / ‖torch‖₂ (all positions, all vocabulary). Measured values are in
/// BENCHMARKS.md; the bound is what 8-bit per-tensor activations and per-channel weights on 14
/// layers give with margin.
const LOGITS_REL_BOUND: f32 = 0.08;

fn llm(name: &str) -> PathBuf {
    fixture(&format!("llm/{name}"))
}

/// Every linear layer of every block: what Concrete ML's GPT-2 example makes remote.
fn block_linears(family: &str) -> Vec<String> {
    let mut out = Vec::new();
    for layer in 0..2 {
        if family == "gpt2" {
            for m in ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] {
                out.push(format!("transformer.h.{layer}.{m}"));
            }
        } else {
            for m in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ] {
                out.push(format!("model.layers.{layer}.{m}"));
            }
        }
    }
    out
}

fn compile(family: &str, variant: &str) -> HybridModel {
    let onnx = OnnxModel::load(llm(&format!("{family}_{variant}.onnx"))).unwrap();
    let names = block_linears(family);
    let remote: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut m = HybridModel::new(&format!("{family}_{variant}"), onnx, &remote).unwrap();
    m.compile(
        &read_npy(&llm(&format!("{family}_calibration.npy"))).unwrap(),
        &CompileOptions::default(),
        &Silent,
    )
    .unwrap();
    m.use_keys(KEYS.clone());
    m
}

/// The initializer names of the model a client receives.
fn client_initializers(m: &HybridModel) -> Vec<String> {
    let graph = m.client_model().graph.as_ref().unwrap();
    graph.initializer.iter().map(|t| t.name.clone()).collect()
}

fn prompt(family: &str) -> Value {
    read_npy(&llm(&format!("{family}_prompt.npy"))).unwrap()
}

fn torch_tokens(family: &str) -> Vec<i64> {
    let t = read_npy(&llm(&format!("{family}_torch_tokens.npy"))).unwrap();
    runner::i64_values(&t, "tokens").unwrap().to_vec()
}

#[test]
fn tiny_gpt2_and_llama_from_both_exporters_run_every_block_linear_remote_bit_exact() {
    for family in ["gpt2", "llama"] {
        let reference = read_npy(&llm(&format!("{family}_torch_logits.npy"))).unwrap();
        let scale = values(&reference).iter().fold(0f32, |m, v| m.max(v.abs()));
        for variant in VARIANTS {
            let m = compile(family, variant);
            assert_eq!(m.remote_modules().len(), block_linears(family).len());
            // No remote module's weight or bias is left in the client's graph.
            let onnx = OnnxModel::load(llm(&format!("{family}_{variant}.onnx"))).unwrap();
            let client = client_initializers(&m);
            for name in block_linears(family) {
                let module = onnx.linear_module(&name).unwrap();
                assert!(!module.initializers.is_empty(), "{family} {variant} {name}");
                for init in &module.initializers {
                    assert!(!client.contains(init), "{init} of {name} in the client");
                }
            }
            let inputs = m.complete_inputs(prompt(family)).unwrap();
            let (simulate, _) = m.forward_all(inputs.clone(), Mode::Simulate).unwrap();
            let (execute, stats) = m.forward_all(inputs, Mode::Execute).unwrap();
            assert_eq!(stats.requests, block_linears(family).len());
            // Every output, logits and caches, bit for bit.
            for (s, e) in simulate.iter().zip(&execute) {
                assert_eq!(bits(&values(s)), bits(&values(e)), "{family} {variant}");
            }
            let (ours, torch) = (values(&simulate[0]), values(&reference));
            let diff = ours
                .iter()
                .zip(&torch)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x * x).sum::<f32>().sqrt();
            let rel_rms = norm(&mut ours.iter().zip(&torch).map(|(a, b)| a - b))
                / norm(&mut torch.iter().copied());
            eprintln!(
                "{family} {variant}: logits vs torch: max |Δ| = {:.2} % of max |logit|, \
                 ‖Δ‖/‖logits‖ = {:.2} %",
                100.0 * diff / scale,
                100.0 * rel_rms
            );
            assert!(
                rel_rms <= LOGITS_REL_BOUND,
                "{family} {variant}: ‖Δ‖/‖logits‖ = {rel_rms} against torch (max |Δ| {diff})"
            );
        }
    }
}

#[test]
fn generation_gives_the_same_tokens_in_simulate_and_execute_and_follows_torch() {
    for family in ["gpt2", "llama"] {
        let torch = torch_tokens(family);
        for variant in VARIANTS {
            let m = compile(family, variant);
            let simulate = m.generate(prompt(family), 8, Mode::Simulate).unwrap();
            let execute = m.generate(prompt(family), 4, Mode::Execute).unwrap();
            assert_eq!(
                execute.tokens,
                simulate.tokens[..4],
                "{family} {variant}: execute and simulate generate the same tokens"
            );
            assert_eq!(simulate.kv_cache, variant.starts_with("kv"));
            // 8-bit quantization may flip a near-tie late in the sequence; the first tokens are
            // PyTorch's own.
            assert_eq!(simulate.tokens[..4], torch[..4], "{family} {variant}");
            let same = simulate
                .tokens
                .iter()
                .zip(&torch)
                .filter(|(a, b)| a == b)
                .count();
            assert!(same >= 6, "{family} {variant}: {same}/8 tokens as torch");
            if execute.kv_cache {
                // One row per module per new token: the upload of a decode step is the size of
                // one row per module, whatever the sequence length. A one-row request may use
                // the automorphism encoding, which sends up to `m` (≤ 16) bodies per input where
                // the prompt's many-row encodings send one, so the bound is 16 prompt rows' worth.
                let prompt_rows = prompt(family).len() as f64;
                let per_prompt_row = execute.prefill.upload_bytes as f64 / prompt_rows;
                let max_m = *hyfhe::fhe::AUTO_OUTPUTS.iter().max().unwrap() as f64;
                assert!(
                    execute.bytes_up_per_token <= max_m * per_prompt_row * 1.1,
                    "{family} {variant}: {} B up per token, {per_prompt_row} per prompt row",
                    execute.bytes_up_per_token
                );
            }
        }
    }
}

#[test]
fn decode_steps_after_the_second_build_no_local_plans_whatever_the_cache_length() {
    // Each decode step feeds the local segments a longer KV cache. The first steps plan those
    // shapes and one symbolic plan per segment; from then on every step reuses it: local ops per
    // token no longer include tract's optimiser. Not yet for every model: without a cache the
    // exporters bake the sequence length into shape tensors, and Llama's cache position (a
    // one-value tensor the plan takes as a constant) changes each step, so those still get a
    // plan per length (3 or 4 segments a step for the tiny Llama).
    for family in ["gpt2"] {
        for variant in ["kv_dynamo", "kv_ts"] {
            let m = compile(family, variant);
            let report = m.generate(prompt(family), 10, Mode::Simulate).unwrap();
            let plans: Vec<usize> = report.decode_steps.iter().map(|s| s.local_plans).collect();
            assert_eq!(plans.len(), 9, "{family} {variant}");
            assert!(
                plans[0] > 0,
                "{family} {variant}: the first decode step plans: {plans:?}"
            );
            assert!(
                plans[2..].iter().all(|&p| p == 0),
                "{family} {variant}: plans built per decode step {plans:?}"
            );
            assert_eq!(
                report.tokens[..4],
                torch_tokens(family)[..4],
                "{family} {variant}"
            );
        }
    }
}

/// The seed's FCSmall from the torch.export exporter, `seq.0` remote, compiled.
fn fc_small_dynamo() -> HybridModel {
    let onnx = OnnxModel::load(fixture("fc_small_dynamo.onnx")).unwrap();
    let mut m = HybridModel::new("fc_small_dynamo", onnx, &["seq.0"]).unwrap();
    m.compile(
        &read_npy(&fixture("fc_small_calibration.npy")).unwrap(),
        &CompileOptions::default(),
        &Silent,
    )
    .unwrap();
    m.use_keys(KEYS.clone());
    m
}

#[test]
fn the_seeds_fc_small_exported_by_the_dynamo_exporter_runs_seq_0_remote() {
    let onnx = OnnxModel::load(fixture("fc_small_dynamo.onnx")).unwrap();
    let tree = onnx.modules().render();
    assert!(tree.contains("seq.0  [Gemm]"), "{tree}");
    let m = fc_small_dynamo();
    let x = read_npy(&fixture("fc_small_input.npy")).unwrap();
    let (simulate, _) = m.forward(x.clone(), Mode::Simulate).unwrap();
    let (execute, _) = m.forward(x.clone(), Mode::Execute).unwrap();
    let (torch, _) = m.forward(x, Mode::Torch).unwrap();
    assert_eq!(bits(&values(&simulate)), bits(&values(&execute)));
    let err = values(&simulate)
        .iter()
        .zip(values(&torch))
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err < 0.05, "{err}");
}

#[test]
fn what_is_still_refused_names_the_op_and_bad_prompts_name_the_problem() {
    let onnx = OnnxModel::load(llm("gpt2_kv_dynamo.onnx")).unwrap();
    match HybridModel::new("g", onnx.clone(), &["transformer.h.0.mlp.act"]) {
        Err(HybridError::Model(ModelError::NonLinear { op, node, .. })) => {
            assert!(["Mul", "Pow", "Add", "Tanh"].contains(&op.as_str()), "{op}");
            assert!(node.starts_with("node_"), "{node}");
        }
        other => panic!("the GELU is refused: {:?}", other.err()),
    }
    // Attention holds two weighted ops and arithmetic on activations.
    let err = HybridModel::new("g", onnx.clone(), &["transformer.h.0.attn"])
        .err()
        .expect("attention is not a linear layer")
        .to_string();
    assert!(err.contains("transformer.h.0.attn"), "{err}");

    let m = compile("gpt2", "kv_dynamo");
    let floats = runner::f32_tensor(&[1, 3], &[1.0, 2.0, 3.0]).unwrap();
    let err = m
        .generate(floats, 2, Mode::Simulate)
        .unwrap_err()
        .to_string();
    assert!(err.contains("int64"), "{err}");
    let cube = runner::i64_tensor(&[1, 2, 2], &[1, 2, 3, 4]).unwrap();
    let err = m.generate(cube, 2, Mode::Simulate).unwrap_err().to_string();
    assert!(err.contains("[1, 2, 2]"), "{err}");
    let two = runner::i64_tensor(&[2, 2], &[1, 2, 3, 4]).unwrap();
    let err = m.generate(two, 2, Mode::Simulate).unwrap_err().to_string();
    assert!(err.contains("one sequence"), "{err}");
    let outside = runner::i64_tensor(&[1, 2], &[1, 96]).unwrap();
    let err = m
        .generate(outside, 2, Mode::Simulate)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("token id 96 is outside the vocabulary [0, 96)"),
        "{err}"
    );
    let err = m
        .generate(prompt("gpt2"), 0, Mode::Simulate)
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least 1"), "{err}");
    // A model without input_ids cannot generate.
    let fc = fc_small_dynamo();
    let err = fc
        .generate(prompt("gpt2"), 2, Mode::Simulate)
        .unwrap_err()
        .to_string();
    assert!(err.contains("input_ids"), "{err}");
}

/// Compiled once: a KV-cache GPT-2 (dynamo), a KV-cache Llama (TorchScript) and the dynamo
/// FCSmall, saved for serving, with their simulate references.
struct ServedLms {
    dir: tempfile::TempDir,
    tokens: Vec<(String, &'static str, Vec<i64>)>,
}

static SERVED: LazyLock<ServedLms> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let mut tokens = Vec::new();
    for (family, variant) in [("gpt2", "kv_dynamo"), ("llama", "kv_ts")] {
        let mut m = compile(family, variant);
        let t = m
            .generate(prompt(family), 5, Mode::Simulate)
            .unwrap()
            .tokens;
        let name = format!("{family}_{variant}");
        m.save_and_clear_private_info(dir.path().join(&name), true)
            .unwrap();
        tokens.push((name, family, t));
    }
    let mut fc = fc_small_dynamo();
    fc.save_and_clear_private_info(dir.path().join("fc_small_dynamo"), true)
        .unwrap();
    ServedLms { dir, tokens }
});

#[test]
fn remote_generation_matches_simulate_and_sends_one_row_per_module_per_new_token() {
    let _serial = serial();
    let config_dir = tempfile::tempdir().unwrap();
    let server = serve(SERVED.dir.path(), &config_file(config_dir.path()), &[]);
    hyfhe::client::block_on(async {
        let rows = || {
            metric(
                &server.metrics_url,
                "hyfhe_tenant_rows_total{tenant=\"demo\"}",
            )
        };
        let requests = || {
            metric(
                &server.metrics_url,
                "hyfhe_tenant_requests_total{tenant=\"demo\"}",
            )
        };
        for (name, family, simulate) in &SERVED.tokens {
            let (_dir, model, session) = connect(&server.url, name, SESSION_KEYS.clone()).await;
            let modules = model.remote_modules().len() as f64;
            let prompt_len = prompt(family).shape()[1] as f64;
            let (rows0, requests0) = (rows(), requests());
            let report = model
                .generate_remote(prompt(family), 5, &session)
                .await
                .unwrap();
            assert_eq!(&report.tokens, simulate, "{name}: remote == simulate");
            assert!(report.kv_cache);
            // The prompt once, then one row per module for each of the 4 later tokens: counted
            // by the server, not assumed.
            assert_eq!(rows() - rows0, modules * (prompt_len + 4.0), "{name}");
            assert_eq!(requests() - requests0, modules * 5.0, "{name}");
            session.close().await.unwrap();
        }
        // The dynamo FCSmall through the served path.
        let (_dir, model, session) =
            connect(&server.url, "fc_small_dynamo", SESSION_KEYS.clone()).await;
        let x = read_npy(&fixture("fc_small_input.npy")).unwrap();
        let (y, _) = model.forward_remote(x.clone(), &session).await.unwrap();
        let local = HybridModel::load(SERVED.dir.path().join("fc_small_dynamo")).unwrap();
        let (simulate, _) = local.forward(x, Mode::Simulate).unwrap();
        assert_eq!(bits(&values(&y)), bits(&values(&simulate)));
        session.close().await.unwrap();
    });
}

#[test]
fn hyfhe_generate_json_prints_one_object_with_tokens_and_per_token_costs() {
    let dir = &SERVED.dir.path().join("gpt2_kv_dynamo");
    let out = Command::new(env!("CARGO_BIN_EXE_hyfhe"))
        .args(["generate", dir.to_str().unwrap(), "--prompt"])
        .arg(llm("gpt2_prompt.npy"))
        .args(["--max-new-tokens", "3", "--mode", "simulate", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in [
        "tokens",
        "prefill_ms",
        "decode_ms_per_token",
        "bytes_up_per_token",
        "bytes_down_per_token",
    ] {
        assert!(v.get(key).is_some(), "{key} in {text}");
    }
    let tokens: Vec<i64> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(tokens, SERVED.tokens[0].2[..3]);
    // A float prompt is refused with a clear message.
    let bad = tempfile::NamedTempFile::new().unwrap();
    hyfhe::commands::write_npy(
        bad.path(),
        &runner::f32_tensor(&[1, 2], &[1.0, 2.0]).unwrap(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hyfhe"))
        .args(["generate", dir.to_str().unwrap(), "--prompt"])
        .arg(bad.path())
        .args(["--mode", "simulate"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("int64"), "{err}");
}

#[test]
fn lm_heads_tied_and_untied_run_remote_and_leave_the_client_without_their_matrix() {
    for (family, variant) in [
        ("gpt2", "kv_dynamo"),
        ("gpt2", "nokv_ts"),
        ("llama", "kv_ts"),
    ] {
        let onnx = OnnxModel::load(llm(&format!("{family}_{variant}.onnx"))).unwrap();
        let head = onnx.linear_module("lm_head").unwrap();
        assert_eq!((head.in_features, head.out_features), (32, 96));
        // The head's own (transposed, anonymous) copy of the matrix is private to it.
        assert!(!head.initializers.is_empty(), "{family} {variant}");
        let mut m = HybridModel::new(family, onnx, &["lm_head"]).unwrap();
        m.compile(
            &read_npy(&llm(&format!("{family}_calibration.npy"))).unwrap(),
            &CompileOptions::default(),
            &Silent,
        )
        .unwrap();
        m.use_keys(KEYS.clone());
        let client = client_initializers(&m);
        for name in &head.initializers {
            assert!(!client.contains(name), "{name} left in the client model");
        }
        let (s, _) = m.forward(prompt(family), Mode::Simulate).unwrap();
        let (e, _) = m.forward(prompt(family), Mode::Execute).unwrap();
        assert_eq!(bits(&values(&s)), bits(&values(&e)), "{family} {variant}");
    }
}
