//! The torch front's trees (no client graph) beside the ONNX front's: one module compiler gives
//! both the same server bytes, and the servers serve either. The Python package drives the torch
//! front from a live model (python/tests); here its Rust half is driven from the same weights.

use std::path::Path;

use hyfhe::client::Client;
use hyfhe::commands::read_npy;
use hyfhe::hybrid::{
    compile_backward, compile_learned, compile_module, linear_from_weights, Calibration,
    CompileOptions, CompiledModules, Front, HybridModel, LearnedQuantizers, Loaded, Mode, Trees,
};
use hyfhe::model::{LinearKind, OnnxModel};
use hyfhe::progress::Silent;
use hyfhe::quant::{AffineQuantizer, InputQuantization, QuantizedWeights};

use crate::cluster::{config_file, Cluster};
use crate::hybrid::{fixture, values};
use crate::serving::{API_KEY, SESSION_KEYS};

/// FCSmall's `seq.0` compiled from its tensors, as the torch front does (dynamic inputs, so no
/// calibration run is needed to match the ONNX front byte for byte).
fn torch_front(dir: &Path, options: &CompileOptions) {
    let onnx = OnnxModel::load(fixture("fc_small.onnx")).unwrap();
    let m = onnx.linear_module("seq.0").unwrap();
    let module = linear_from_weights(
        "seq.0",
        LinearKind::Dense,
        m.in_features,
        m.out_features,
        m.weight.clone(),
        m.bias.clone(),
    )
    .unwrap();
    let mut compiled = CompiledModules::new("fc_small", Front::Torch);
    compiled.insert(compile_module("seq.0", &module, &Calibration::None, options).unwrap());
    let state = b"the client's torch state would be here".to_vec();
    compiled
        .save_and_clear(
            dir,
            vec![("torch/state_dict.pt".into(), state)],
            vec![("torch/remote_modules.pt".into(), b"private".to_vec())],
            false,
        )
        .unwrap();
}

fn tree_files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn both_fronts_write_the_same_server_tree_and_a_torch_tree_is_served_but_not_run_by_the_cli() {
    let options = CompileOptions {
        dynamic_inputs: true,
        ..CompileOptions::default()
    };
    let models = tempfile::tempdir().unwrap();
    let torch_dir = models.path().join("fc_small");
    torch_front(&torch_dir, &options);

    let onnx_dir = tempfile::tempdir().unwrap();
    let calibration = read_npy(&fixture("fc_small_calibration.npy")).unwrap();
    let mut owner = HybridModel::new(
        "fc_small",
        OnnxModel::load(fixture("fc_small.onnx")).unwrap(),
        &["seq.0"],
    )
    .unwrap();
    owner.compile(&calibration, &options, &Silent).unwrap();
    let x = read_npy(&fixture("fc_small_input.npy")).unwrap();
    owner
        .save_and_clear_private_info(onnx_dir.path(), false)
        .unwrap();
    assert_eq!(
        tree_files(&onnx_dir.path().join("server")),
        tree_files(&torch_dir.join("server")),
        "the fronts compiled different server trees from the same weights"
    );

    // The CLI's client runs a graph, which a torch tree does not have: refused by name.
    let refused = HybridModel::load(&torch_dir).err().unwrap().to_string();
    assert!(refused.contains("front `torch`"), "{refused}");

    // Served as it is: remote on the torch tree's module equals the ONNX owner's simulate.
    let config_dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::embedded(models.path(), &config_file(config_dir.path()));
    hyfhe::client::block_on(async {
        let client = Client::new(cluster.url(), API_KEY).unwrap();
        let download = tempfile::tempdir().unwrap();
        client
            .download_model("fc_small", download.path())
            .await
            .unwrap();
        let Loaded {
            modules,
            client: tree,
            ..
        } = CompiledModules::load(download.path(), Trees::Client).unwrap();
        assert_eq!(modules.front(), Front::Torch);
        assert!(modules.server_modules().is_none());
        assert!(tree.file("torch/state_dict.pt").is_ok());
        assert!(tree.file("model.onnx").is_err());
        let session = client
            .open_session_with(&modules, SESSION_KEYS.clone())
            .await
            .unwrap();
        // FCSmall's input is seq.0's input.
        let (y, _) = modules
            .forward_module_remote("seq.0", x.clone(), &session)
            .await
            .unwrap();
        session.close().await.unwrap();
        // The ONNX owner's module in simulate, from its own trees.
        let onnx = CompiledModules::load(onnx_dir.path(), Trees::ClientAndServer).unwrap();
        let (layer, _) = onnx
            .modules
            .forward_module("seq.0", x.clone(), Mode::Simulate)
            .unwrap();
        assert_eq!(values(&y), values(&layer), "remote differs from simulate");
    });
}

/// A QAT layer's quantizers (Brevitas, through the Python package) go through
/// `compile_learned`: given the very quantizers `compile_module` would fit, it writes the same
/// bytes, so a learned layer is served like any other; quantizers that cannot be served are
/// refused naming the value.
#[test]
fn learned_quantizers_compile_to_the_same_bytes_and_bad_ones_are_refused_by_value() {
    let onnx = OnnxModel::load(fixture("fc_small.onnx")).unwrap();
    let m = onnx.linear_module("seq.0").unwrap();
    let options = CompileOptions::default();
    let fitted = compile_module("seq.0", &m, &Calibration::Range(-2.5, 3.0), &options).unwrap();
    let InputQuantization::Static(input) = fitted.spec.input else {
        panic!("a calibrated range gives a static quantizer")
    };
    let w = &fitted.server.weights;
    let weights = QuantizedWeights::from_codes(
        w.codes.clone(),
        w.out_features,
        w.in_features,
        w.bits,
        w.scales.clone(),
        w.zero_points.clone(),
    )
    .unwrap();
    let learned = LearnedQuantizers {
        weights,
        input: AffineQuantizer::new(input.bits, input.scale, input.zero_point).unwrap(),
    };
    let same = compile_learned("seq.0", &m, learned, &options).unwrap();
    assert_eq!(same.spec.sha256(), fitted.spec.sha256());
    assert_eq!(
        rmp_serde::to_vec(&same.server).unwrap(),
        rmp_serde::to_vec(&fitted.server).unwrap()
    );

    // 4-bit codes run from -8 to 7; one past either end is refused with its value.
    let codes = |bad: i8| {
        let mut c = vec![1i8; 6];
        c[4] = bad;
        QuantizedWeights::from_codes(c, 2, 3, 4, vec![0.1], vec![0])
    };
    assert!(codes(-8).is_ok() && codes(7).is_ok());
    let err = codes(8).unwrap_err().to_string();
    assert!(
        err.contains("weight code 8 is outside the 4-bit range -8..=7"),
        "{err}"
    );
    let err = QuantizedWeights::from_codes(vec![0; 6], 2, 3, 4, vec![0.1; 3], vec![0; 3])
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 scales and 3 zero points"), "{err}");
    let err = QuantizedWeights::from_codes(vec![0; 6], 2, 3, 4, vec![0.1, -0.2], vec![0, 0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("weight scale -0.2 is not positive"), "{err}");
    let err = AffineQuantizer::new(4, 0.5, 16).unwrap_err().to_string();
    assert!(
        err.contains("zero point 16 is outside the 4-bit codes 0..=15"),
        "{err}"
    );
    assert!(AffineQuantizer::new(4, f32::NAN, 8).is_err());
    // Learned weights of another shape than the module's.
    let other = LearnedQuantizers {
        weights: QuantizedWeights::from_codes(vec![0; 6], 2, 3, 4, vec![0.1], vec![0]).unwrap(),
        input: AffineQuantizer::new(4, 0.5, 8).unwrap(),
    };
    let err = compile_learned("seq.0", &m, other, &options)
        .err()
        .expect("a shape mismatch is refused")
        .to_string();
    assert!(err.contains("learned weights are 2×3"), "{err}");
}

/// A backward module (training opted in) holds `Wᵀ`: on a gradient `g` it gives `g·W` within
/// its per-row quantization, exactly the same in simulate and execute; it carries no weights to
/// the client, and a tree whose backward module does not transpose its forward one is refused.
#[test]
fn a_backward_module_gives_the_input_gradient_exactly_in_fhe_and_must_transpose_its_forward() {
    let (n_in, n_out) = (24, 40);
    let weight: Vec<f32> = (0..n_in * n_out)
        .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3)
        .collect();
    let forward =
        linear_from_weights("fc", LinearKind::Dense, n_in, n_out, weight.clone(), None).unwrap();
    let options = CompileOptions::default();
    let mut compiled = CompiledModules::new("trainable", Front::Torch);
    compiled
        .insert(compile_module("fc", &forward, &Calibration::Range(-1.0, 1.0), &options).unwrap());
    let backward = compile_backward("fc@grad", "fc", &forward, &options).unwrap();
    assert_eq!(backward.report.backward_of.as_deref(), Some("fc"));
    assert!(backward
        .report
        .exposure()
        .contains(&format!("from {n_out} rows")));
    assert_eq!(
        (backward.spec.in_features, backward.spec.out_features),
        (n_out, n_in)
    );
    compiled.insert(backward);
    compiled.use_keys(crate::hybrid::KEYS.clone());

    let rows = 5;
    let g: Vec<f32> = (0..rows * n_out)
        .map(|i| ((i * 13 % 29) as f32 - 14.0) / 9.0)
        .collect();
    let x = hyfhe::model::runner::f32_tensor(&[rows, n_out], &g).unwrap();
    let simulate = values(
        &compiled
            .forward_module("fc@grad", x.clone(), Mode::Simulate)
            .unwrap()
            .0,
    );
    let execute = values(
        &compiled
            .forward_module("fc@grad", x, Mode::Execute)
            .unwrap()
            .0,
    );
    assert_eq!(simulate, execute, "execute == simulate bit for bit");
    for r in 0..rows {
        let gr = &g[r * n_out..(r + 1) * n_out];
        let want: Vec<f32> = (0..n_in)
            .map(|i| (0..n_out).map(|o| gr[o] * weight[o * n_in + i]).sum())
            .collect();
        let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt();
        let err = want
            .iter()
            .zip(&simulate[r * n_in..(r + 1) * n_in])
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            .sqrt();
        assert!(
            err < 0.02 * norm,
            "row {r}: |g·W - simulate| = {err}, |g·W| = {norm}"
        );
    }

    // Saved and loaded; then a tree whose `fc` is compiled with the swapped shape, so the
    // backward module no longer transposes it: refused at load.
    let dir = tempfile::tempdir().unwrap();
    compiled
        .save_and_clear(dir.path(), vec![], vec![], false)
        .unwrap();
    let loaded = CompiledModules::load(dir.path(), Trees::All).unwrap();
    assert_eq!(
        loaded
            .modules
            .spec("fc@grad")
            .unwrap()
            .backward_of
            .as_deref(),
        Some("fc")
    );
    let other = linear_from_weights("fc", LinearKind::Dense, n_out, n_in, weight, None).unwrap();
    let mut bad = CompiledModules::new("trainable", Front::Torch);
    bad.insert(
        compile_module(
            "fc",
            &other,
            &Calibration::None,
            &CompileOptions {
                dynamic_inputs: true,
                ..options.clone()
            },
        )
        .unwrap(),
    );
    bad.insert(compile_backward("fc@grad", "fc", &forward, &options).unwrap());
    let bad_dir = tempfile::tempdir().unwrap();
    bad.save_and_clear(bad_dir.path(), vec![], vec![], false)
        .unwrap();
    let err = CompiledModules::load(bad_dir.path(), Trees::Client)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("does not transpose"), "{err}");
}
