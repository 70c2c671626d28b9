//! `hyfhe demo`: the whole system on one machine with nothing to install. Compiles the bundled
//! digits CNN, serves it embedded on loopback (coordinator + worker over the in-memory queue),
//! then acts as a client: downloads the client tree, opens a session and classifies test digits
//! remotely, one image per forward call.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::client::BlockingRemoteModel;
use crate::commands::{accuracy, read_labels, read_npy};
use crate::config::Config;
use crate::hybrid::{CompileOptions, ForwardStats, HybridError, HybridModel};
use crate::model::{ModelError, OnnxModel};
use crate::progress::Progress;

// The test fixtures double as the demo's bundled model and data (written by
// tests/fixtures/make_fixtures.py); compiled in so the binary needs no files.
const MODEL: &[u8] = include_bytes!("../tests/fixtures/digits_cnn.onnx");
const CALIBRATION: &[u8] = include_bytes!("../tests/fixtures/digits_calibration_images.npy");
const TEST_IMAGES: &[u8] = include_bytes!("../tests/fixtures/digits_test_images.npy");
const TEST_LABELS: &[u8] = include_bytes!("../tests/fixtures/digits_test_y.npy");
/// The CNN's linear modules after the first convolution run remotely.
pub const REMOTE_MODULES: &[&str] = &["features.2", "classifier.0", "classifier.2"];
pub const DEMO_API_KEY: &str = "hyfhe-demo-key";

pub struct DemoOptions {
    pub images: usize,
    /// Where to write the compiled model (a temporary directory when `None`).
    pub workdir: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize)]
pub struct DemoReport {
    pub images: usize,
    pub accuracy: f64,
    pub compile_ms: f64,
    pub server_start_ms: f64,
    /// Client tree download, keygen, evaluation keys and the session upload.
    pub session_ms: f64,
    pub evaluation_key_bytes: usize,
    /// Per image, averaged.
    pub forward_ms: f64,
    pub forward_p50_ms: f64,
    pub stats_per_image: ForwardStats,
}

impl DemoReport {
    pub fn render(&self) -> String {
        let s = &self.stats_per_image;
        format!(
            "classified {} digits remotely: accuracy {:.2}%\n\
             setup: compile {:.0} ms, server start {:.0} ms, keys + session {:.0} ms ({:.1} MiB of evaluation keys uploaded)\n\
             per image: {:.1} ms mean, {:.1} ms median\n  \
             local {:.2} ms | quantize {:.2} ms | encrypt {:.2} ms | server round trip {:.2} ms | decrypt {:.2} ms | dequantize {:.2} ms\n  \
             {} requests, {:.1} KiB up, {:.1} KiB down\n",
            self.images,
            self.accuracy * 100.0,
            self.compile_ms,
            self.server_start_ms,
            self.session_ms,
            self.evaluation_key_bytes as f64 / (1 << 20) as f64,
            self.forward_ms,
            self.forward_p50_ms,
            s.local_ms,
            s.quantize_ms,
            s.encrypt_ms,
            s.fhe_ms,
            s.decrypt_ms,
            s.dequantize_ms,
            s.requests,
            s.upload_bytes as f64 / 1024.0,
            s.download_bytes as f64 / 1024.0,
        )
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, HybridError> {
    let path = dir.join(name);
    std::fs::write(&path, bytes).map_err(|e| ModelError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(path)
}

pub fn run(options: &DemoOptions, progress: &dyn Progress) -> Result<DemoReport, HybridError> {
    let temp;
    let root = match &options.workdir {
        Some(d) => d.clone(),
        None => {
            temp = TempDir::new()?;
            temp.0.clone()
        }
    };
    let io = |e: std::io::Error| HybridError::Unsupported(format!("{}: {e}", root.display()));
    std::fs::create_dir_all(&root).map_err(io)?;
    let data = root.join("data");
    std::fs::create_dir_all(&data).map_err(io)?;
    let calibration = read_npy(&write(&data, "calibration.npy", CALIBRATION)?)?;
    let images = read_npy(&write(&data, "test_images.npy", TEST_IMAGES)?)?;
    let labels = read_labels(&write(&data, "test_labels.npy", TEST_LABELS)?)?;
    let n = options.images.clamp(1, labels.len());

    let mut report = DemoReport {
        images: n,
        ..DemoReport::default()
    };
    let t = Instant::now();
    let mut model = HybridModel::new("digits_cnn", OnnxModel::from_bytes(MODEL)?, REMOTE_MODULES)?;
    model.compile(&calibration, &CompileOptions::default(), progress)?;
    let server_dir = root.join("server-side");
    model.save_and_clear_private_info(&server_dir, true)?;
    report.compile_ms = ms(t);

    let t = Instant::now();
    let mut config = Config::load(None).map_err(|e| HybridError::Unsupported(e.to_string()))?;
    config.coordinator.listen = "127.0.0.1:0".into();
    config.coordinator.metrics_listen = "127.0.0.1:0".into();
    let server = crate::service::spawn_embedded(config, server_dir)
        .map_err(|e| HybridError::Remote(e.to_string()))?;
    report.server_start_ms = ms(t);
    let url = format!("http://127.0.0.1:{}", server.port);

    let client_dir = root.join("client-side");
    let _ = std::fs::remove_dir_all(&client_dir);
    let t = Instant::now();
    let remote =
        BlockingRemoteModel::connect(&url, DEMO_API_KEY, "digits_cnn", &client_dir, progress)?;
    report.session_ms = ms(t);
    report.evaluation_key_bytes = remote.session().uploaded_key_bytes();

    progress.stage("classify", n);
    let mut totals = ForwardStats::default();
    let mut times = Vec::with_capacity(n);
    let mut outputs = Vec::with_capacity(n);
    for i in 0..n {
        let x = images.slice(0, i, i + 1).map_err(ModelError::tract)?;
        let t = Instant::now();
        let (y, stats) = remote.forward(x)?;
        times.push(ms(t));
        totals.add(&stats);
        outputs.push(y);
        progress.advance(1);
    }
    let _ = remote.close();
    server.stop();

    let logits =
        tract_onnx::prelude::Tensor::stack_tensors(0, &outputs).map_err(ModelError::tract)?;
    report.accuracy = accuracy(&logits, &labels[..n])?;
    report.forward_ms = times.iter().sum::<f64>() / n as f64;
    times.sort_by(f64::total_cmp);
    report.forward_p50_ms = times[n / 2];
    report.stats_per_image = totals.scaled(1.0 / n as f64);
    Ok(report)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self, HybridError> {
        let path = std::env::temp_dir().join(format!("hyfhe-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
