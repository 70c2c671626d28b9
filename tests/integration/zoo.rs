//! The model zoo (tests/fixtures/zoo, written by make_zoo.py): common architectures built with
//! default initialisation, wrapped as users wrap them and exported by both of torch's exporters.
//! Every module that is a linear layer in torch runs remote, all at once.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hyfhe::commands::read_npy;
use hyfhe::hybrid::{CompileOptions, HybridModel, Mode};
use hyfhe::model::OnnxModel;
use hyfhe::progress::Silent;
use serde::Deserialize;

use crate::hybrid::{fixture, values, KEYS};
use crate::serving::bits;

/// Output of the 8-bit model against torch's own float output: ‖ours − torch‖₂ / ‖torch‖₂.
/// Per-tensor 8-bit activations and per-channel 8-bit weights on every linear layer of two
/// blocks give a few percent (the measured values are in the table the test prints and in
/// BENCHMARKS.md); the bound leaves room for the deepest zoo member.
const REL_L2_BOUND: f32 = 0.15;

/// New tokens each decoder generates in simulate and in execute.
const GENERATE_TOKENS: usize = 3;

/// Exports that do not run yet, each with what stops it. The test fails if one of them starts
/// working (so this list stays true) as well as when any other export fails.
const KNOWN_FAILURES: &[(&str, &str, &str)] = &[(
    "bart",
    "dynamo",
    "tract 0.23.9 cannot type the Reshape that merges the attention heads (node_Reshape_446): \
     it finds no grouping for the symbolic dimension expression of its input",
)];

#[derive(Deserialize)]
struct Manifest {
    torch: String,
    transformers: String,
    models: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    name: String,
    family: String,
    modules: Vec<String>,
    exports: BTreeMap<String, Export>,
}

#[derive(Deserialize)]
struct Export {
    file: Option<String>,
    torch_error: Option<String>,
    note: Option<String>,
}

fn zoo(name: &str) -> std::path::PathBuf {
    fixture(&format!("zoo/{name}"))
}

/// One export, all its linear layers remote: compiled, execute == simulate bit for bit, and the
/// relative L2 error of the output against torch's.
/// Also, for a decoder, how many tokens `generate` gave, equal in simulate and execute.
fn run(entry: &Entry, file: &str) -> Result<(usize, f32, Option<usize>), String> {
    let onnx = OnnxModel::load(zoo(file)).map_err(|e| e.to_string())?;
    let remote: Vec<&str> = entry.modules.iter().map(String::as_str).collect();
    let mut m = HybridModel::new(&entry.name, onnx, &remote).map_err(|e| e.to_string())?;
    let calibration = read_npy(&zoo(&format!("{}_calibration.npy", entry.name))).unwrap();
    m.compile(&calibration, &CompileOptions::default(), &Silent)
        .map_err(|e| format!("compile: {e}"))?;
    m.use_keys(KEYS.clone());
    let input = read_npy(&zoo(&format!("{}_input.npy", entry.name))).unwrap();
    let inputs = m.complete_inputs(input).map_err(|e| e.to_string())?;
    let (simulate, _) = m
        .forward_all(inputs.clone(), Mode::Simulate)
        .map_err(|e| format!("simulate: {e}"))?;
    let (execute, stats) = m
        .forward_all(inputs, Mode::Execute)
        .map_err(|e| format!("execute: {e}"))?;
    if bits(&values(&simulate[0])) != bits(&values(&execute[0])) {
        return Err("execute differs from simulate".into());
    }
    // Decoders: greedy generation on the plain export (no KV cache, so every step re-runs
    // the sequence), the same tokens in simulate and execute.
    let mut generated = None;
    if entry.family.starts_with("decoder") {
        let prompt = read_npy(&zoo(&format!("{}_input.npy", entry.name))).unwrap();
        let simulate = m
            .generate(prompt.clone(), GENERATE_TOKENS, Mode::Simulate)
            .map_err(|e| format!("generate (simulate): {e}"))?;
        let execute = m
            .generate(prompt, GENERATE_TOKENS, Mode::Execute)
            .map_err(|e| format!("generate (execute): {e}"))?;
        if simulate.tokens != execute.tokens {
            return Err(format!(
                "generate: execute gave {:?}, simulate {:?}",
                execute.tokens, simulate.tokens
            ));
        }
        generated = Some(simulate.tokens.len());
    }
    let torch = values(&read_npy(&zoo(&format!("{}_torch.npy", entry.name))).unwrap());
    let ours = values(&simulate[0]);
    if ours.len() != torch.len() {
        return Err(format!("{} outputs, torch has {}", ours.len(), torch.len()));
    }
    let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x * x).sum::<f32>().sqrt();
    let rel =
        norm(&mut ours.iter().zip(&torch).map(|(a, b)| a - b)) / norm(&mut torch.iter().copied());
    Ok((stats.requests, rel, generated))
}

#[test]
fn every_zoo_export_runs_all_its_linear_layers_remote_exact_and_close_to_torch() {
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(zoo("manifest.json")).unwrap()).unwrap();
    let mut table = format!(
        "zoo (torch {}, transformers {}): all linear layers remote\n\
         | model | family | exporter | modules | result | rel. L2 vs torch | generate |\n|---|---|---|---|---|---|---|\n",
        manifest.torch, manifest.transformers
    );
    let mut failures = Vec::new();
    for entry in &manifest.models {
        for (exporter, export) in &entry.exports {
            let result = match (&export.file, &export.torch_error) {
                (Some(file), _) => run(entry, file),
                (None, Some(e)) => {
                    let _ = writeln!(
                        table,
                        "| {} | {} | {exporter} | {} | torch refused: {e} | | |",
                        entry.name,
                        entry.family,
                        entry.modules.len()
                    );
                    continue;
                }
                (None, None) => panic!("{} {exporter}: no file and no error", entry.name),
            };
            let note = export
                .note
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default();
            let known = KNOWN_FAILURES
                .iter()
                .find(|(m, e, _)| *m == entry.name && *e == exporter.as_str());
            match (result, known) {
                (Err(e), Some((_, _, why))) => {
                    let _ = writeln!(
                        table,
                        "| {} | {} | {exporter}{note} | {} | known failure ({why}): {} | | |",
                        entry.name,
                        entry.family,
                        entry.modules.len(),
                        e.replace('|', "/")
                    );
                }
                (Ok(_), Some(_)) => failures.push(format!(
                    "{} {exporter} now runs: take it off KNOWN_FAILURES",
                    entry.name
                )),
                (Ok((requests, rel, generated)), None) => {
                    let generate = generated
                        .map(|n| format!("{n} tokens, same in simulate and execute"))
                        .unwrap_or_default();
                    let _ = writeln!(
                        table,
                        "| {} | {} | {exporter}{note} | {} | exact, {requests} requests | {:.2} % | {generate} |",
                        entry.name,
                        entry.family,
                        entry.modules.len(),
                        100.0 * rel
                    );
                    if requests != entry.modules.len() {
                        failures.push(format!(
                            "{} {exporter}: {requests} remote requests for {} modules",
                            entry.name,
                            entry.modules.len()
                        ));
                    }
                    if rel > REL_L2_BOUND {
                        failures.push(format!(
                            "{} {exporter}: relative L2 {rel:.3} vs torch exceeds {REL_L2_BOUND}",
                            entry.name
                        ));
                    }
                }
                (Err(e), None) => {
                    let _ = writeln!(
                        table,
                        "| {} | {} | {exporter}{note} | {} | FAILED: {} | | |",
                        entry.name,
                        entry.family,
                        entry.modules.len(),
                        e.replace('|', "/")
                    );
                    failures.push(format!("{} {exporter}: {e}", entry.name));
                }
            }
        }
    }
    eprintln!("{table}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
