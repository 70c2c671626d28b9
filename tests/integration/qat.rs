//! Quantization-aware-trained exports (tests/fixtures/qat, written by make_qat.py): Brevitas's
//! QCDQ export through both of torch's exporters and torch.ao's QAT export. Every QAT layer runs
//! remote with the quantizers it learned (read from its QuantizeLinear/Clip/DequantizeLinear
//! nodes, no calibration for it), and reproduces the QAT model's own output.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hyfhe::commands::read_npy;
use hyfhe::hybrid::{compile_module, Calibration, CompileOptions, HybridModel, Mode};
use hyfhe::model::{runner, OnnxModel};
use hyfhe::progress::Silent;
use hyfhe::quant::InputQuantization;
use prost::Message;
use serde::Deserialize;
use tract_onnx::pb::ModelProto;

use crate::hybrid::{fixture, values, KEYS};
use crate::serving::bits;

/// hyfhe's output against the QAT model's (torch's fake-quantized float forward): the integer
/// products are exact, so what is left is the float summation order of torch's matmul and of
/// the dequantization (`scale_x · scale_w · Σ q_x q_w` + bias vs `Σ (s_x q_x)(s_w q_w)` + bias).
const MAX_ABS_DIFF: f32 = 1e-4;

#[derive(Deserialize)]
struct Manifest {
    torch: String,
    brevitas: String,
    models: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    name: String,
    framework: String,
    arch: String,
    weight_bits: u32,
    input_bits: u32,
    modules: Vec<String>,
    qat_accuracy: f32,
    exports: BTreeMap<String, Export>,
}

#[derive(Deserialize)]
struct Export {
    file: Option<String>,
    torch_error: Option<String>,
}

fn qat(name: &str) -> std::path::PathBuf {
    fixture(&format!("qat/{name}"))
}

struct Outcome {
    accuracy: f32,
    agreement: f32,
    max_diff: f32,
}

/// One export, its QAT layers remote: the learned bits in every spec, execute == simulate bit
/// for bit, and execute against the QAT model's own output.
fn run(entry: &Entry, file: &str, labels: &[i64]) -> Result<Outcome, String> {
    let onnx = OnnxModel::load(qat(file)).map_err(|e| e.to_string())?;
    let remote: Vec<&str> = entry.modules.iter().map(String::as_str).collect();
    let mut m = HybridModel::new(&entry.name, onnx, &remote).map_err(|e| e.to_string())?;
    // Only the float layers around would need calibration: the QAT layers bring their grids.
    let calibration = read_npy(&qat("eval_images.npy")).unwrap();
    let reports = m
        .compile(&calibration, &CompileOptions::default(), &Silent)
        .map_err(|e| format!("compile: {e}"))?;
    for r in &reports {
        let InputQuantization::Static(q) = r.input else {
            return Err(format!("{}: a dynamic input quantizer", r.module));
        };
        if r.plan.weight_bits != entry.weight_bits || q.bits != entry.input_bits {
            return Err(format!(
                "{}: compiled with {}-bit weights and {}-bit inputs, the QAT model learned {} and {}",
                r.module, r.plan.weight_bits, q.bits, entry.weight_bits, entry.input_bits
            ));
        }
    }
    m.use_keys(KEYS.clone());
    let inputs = m.complete_inputs(calibration).map_err(|e| e.to_string())?;
    let (simulate, _) = m
        .forward_all(inputs.clone(), Mode::Simulate)
        .map_err(|e| format!("simulate: {e}"))?;
    let (execute, stats) = m
        .forward_all(inputs, Mode::Execute)
        .map_err(|e| format!("execute: {e}"))?;
    // A conv layer's rows may take several requests; fewer than one per layer means a layer
    // ran in the clear.
    if stats.requests < entry.modules.len() {
        return Err(format!(
            "{} encrypted requests for {} QAT layers",
            stats.requests,
            entry.modules.len()
        ));
    }
    let (simulate, execute) = (values(&simulate[0]), values(&execute[0]));
    if bits(&simulate) != bits(&execute) {
        return Err("execute differs from simulate".into());
    }
    let reference = values(&read_npy(&qat(&format!("{}_output.npy", entry.name))).unwrap());
    if reference.len() != execute.len() {
        return Err(format!(
            "{} outputs, the QAT model has {}",
            execute.len(),
            reference.len()
        ));
    }
    let max_diff = execute
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let classes = reference.len() / labels.len();
    let argmax = |v: &[f32]| -> Vec<usize> {
        v.chunks(classes)
            // The first of equal maxima, as torch's argmax (the torch.ao models quantize their
            // logits, so ties happen).
            .map(|row| (0..classes).fold(0, |best, k| if row[k] > row[best] { k } else { best }))
            .collect()
    };
    let (ours, theirs) = (argmax(&execute), argmax(&reference));
    let n = labels.len() as f32;
    Ok(Outcome {
        accuracy: ours
            .iter()
            .zip(labels)
            .filter(|(p, l)| **p as i64 == **l)
            .count() as f32
            / n,
        agreement: ours.iter().zip(&theirs).filter(|(a, b)| a == b).count() as f32 / n,
        max_diff,
    })
}

#[test]
fn qat_exports_run_remote_with_their_learned_quantizers_and_reproduce_the_qat_model() {
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(qat("manifest.json")).unwrap()).unwrap();
    let labels = read_npy(&qat("eval_labels.npy")).unwrap();
    let labels = runner::i64_values(&labels, "labels").unwrap().to_vec();
    let mut table = format!(
        "QAT exports (torch {}, Brevitas {}): every QAT layer remote with its learned quantizers\n\
         | model | framework | weight / input bits | exporter | QAT accuracy | hyfhe execute accuracy | top-1 agreement | max \\|execute − QAT\\| |\n\
         |---|---|---|---|---:|---:|---:|---:|\n",
        manifest.torch, manifest.brevitas
    );
    let mut failures = Vec::new();
    let mut ran = 0;
    for entry in &manifest.models {
        for (exporter, export) in &entry.exports {
            let head = format!(
                "| {} ({}) | {} | {} / {} | {exporter} | {:.1} % |",
                entry.name,
                entry.arch,
                entry.framework,
                entry.weight_bits,
                entry.input_bits,
                100.0 * entry.qat_accuracy
            );
            let file = match (&export.file, &export.torch_error) {
                (Some(file), _) => file,
                (None, _) => {
                    let why = export.torch_error.as_deref().unwrap_or("no file");
                    let why: String = why.chars().take(120).collect();
                    let _ = writeln!(
                        table,
                        "{head} torch refused: {} | | |",
                        why.replace('|', "/")
                    );
                    continue;
                }
            };
            match run(entry, file, &labels) {
                Ok(o) => {
                    ran += 1;
                    let _ = writeln!(
                        table,
                        "{head} {:.1} % | {:.1} % | {:.1e} |",
                        100.0 * o.accuracy,
                        100.0 * o.agreement,
                        o.max_diff
                    );
                    if o.max_diff > MAX_ABS_DIFF {
                        failures.push(format!(
                            "{} {exporter}: max |execute − QAT| = {:.2e} > {MAX_ABS_DIFF}",
                            entry.name, o.max_diff
                        ));
                    }
                }
                Err(e) => {
                    let _ = writeln!(table, "{head} FAILED: {} | | |", e.replace('|', "/"));
                    failures.push(format!("{} {exporter}: {e}", entry.name));
                }
            }
        }
    }
    eprintln!("{table}");
    assert!(ran >= 10, "only {ran} QAT exports ran");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn learned_weights_wider_than_the_engine_multiplies_are_refused_naming_the_limit() {
    // The 8-bit MLP's fc1 codes stored as int16 without their Clip: a 16-bit grid (QCDQ in
    // int16 is valid ONNX from opset 21; no torch exporter writes it yet).
    let bytes = std::fs::read(qat("brevitas_mlp_8_ts.onnx")).unwrap();
    let mut proto = ModelProto::decode(&bytes[..]).unwrap();
    let graph = proto.graph.as_mut().unwrap();
    let gemm = graph
        .node
        .iter()
        .position(|n| n.op_type == "Gemm" && n.name.contains("fc1"))
        .expect("fc1's Gemm");
    let dq_out = graph.node[gemm].input[1].clone();
    let dq = graph
        .node
        .iter()
        .position(|n| n.output[0] == dq_out)
        .unwrap();
    let clip_out = graph.node[dq].input[0].clone();
    let clip = graph
        .node
        .iter()
        .position(|n| n.output[0] == clip_out)
        .unwrap();
    assert_eq!(graph.node[clip].op_type, "Clip");
    let codes = graph.node[clip].input[0].clone();
    graph.node[dq].input[0] = codes.clone();
    graph.node.remove(clip);
    let init = graph
        .initializer
        .iter_mut()
        .find(|t| t.name == codes)
        .unwrap();
    assert_eq!(init.data_type, 3, "int8 codes");
    init.raw_data = init
        .raw_data
        .iter()
        .flat_map(|&b| ((b as i8 as i16) * 4).to_le_bytes())
        .collect();
    init.data_type = 5; // INT16
    let onnx = OnnxModel::from_proto(proto).unwrap();
    let m = onnx.linear_module("fc1").unwrap();
    let grid = m.learned.as_ref().expect("a learned grid");
    assert_eq!(grid.weight.bits(), 16);
    let err = compile_module(
        "fc1",
        &m,
        &Calibration::Range(0.0, 1.0),
        &CompileOptions::default(),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        err.contains("fc1") && err.contains("16 bits") && err.contains("2- to 8-bit"),
        "{err}"
    );
}

#[test]
fn inspect_says_which_modules_run_remote_with_learned_quantizers_and_why_not_for_the_rest() {
    let out = hyfhe::commands::inspect(&qat("brevitas_cnn_4_ts.onnx")).unwrap();
    assert!(
        out.contains(
            "→ remote: linear 9→8, learned quantizers: 4-bit weights (per tensor), input 4-bit grid"
        ),
        "{out}"
    );
    assert!(out.contains("→ remote: linear 512→10"), "{out}");
    // The whole model is a chain of both layers; a module with no weighted op gets no verdict.
    let mut lines = out.lines().skip_while(|l| !l.starts_with("relu "));
    assert!(lines.next().is_some(), "a relu module: {out}");
    assert!(!lines.next().unwrap_or("").contains('→'), "{out}");
    let torch = hyfhe::commands::inspect(&fixture("fc_small.onnx")).unwrap();
    assert!(
        torch.contains("→ remote: 2 layers with activations (Relu), 10→10"),
        "{torch}"
    );
}
