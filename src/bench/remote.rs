//! `hyfhe bench remote`: one linear module served over HTTP and the queue, against the same
//! module in `execute` mode (client and server in one process), measured alternately in the same
//! run so machine noise hits both alike.

use std::time::Instant;

use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

use super::{median, ms, Progress};
use crate::client::{block_on, Client, SessionKeys};
use crate::config::{Config, QueueBackend};
use crate::demo::DEMO_API_KEY;
use crate::hybrid::{CompileOptions, HybridError, HybridModel, Mode};
use crate::model::{runner, synthetic, OnnxModel};
use crate::progress::Silent;

#[derive(Clone, Debug)]
pub struct RemoteBenchConfig {
    pub rows: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub repetitions: usize,
    /// Serve over this Redis instead of the in-memory queue.
    pub redis: Option<String>,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RemoteBenchReport {
    pub rows: usize,
    #[serde(rename = "in")]
    pub in_features: usize,
    #[serde(rename = "out")]
    pub out_features: usize,
    pub queue: &'static str,
    /// Medians of whole forward calls (quantize, encrypt, evaluate, decrypt, dequantize).
    pub execute_ms: f64,
    pub remote_ms: f64,
    pub ratio: f64,
    /// Median server evaluation inside `execute`, and the remote round trip that replaces it.
    pub execute_eval_ms: f64,
    pub remote_round_trip_ms: f64,
    pub upload_bytes: usize,
    pub download_bytes: usize,
}

impl RemoteBenchReport {
    pub fn render(&self) -> String {
        format!(
            "linear ({}, {}, {}) over the {} queue, median of whole forward calls:\n  \
             execute {:.1} ms (evaluation {:.1} ms)\n  \
             remote  {:.1} ms (HTTP + queue + evaluation round trip {:.1} ms)\n  \
             remote / execute = {:.3}; {} B up, {} B down per call\n",
            self.rows,
            self.in_features,
            self.out_features,
            self.queue,
            self.execute_ms,
            self.execute_eval_ms,
            self.remote_ms,
            self.remote_round_trip_ms,
            self.ratio,
            self.upload_bytes,
            self.download_bytes
        )
    }
}

pub fn run_remote(
    config: &RemoteBenchConfig,
    progress: &dyn Progress,
) -> Result<RemoteBenchReport, HybridError> {
    let (rows, cols, out) = (config.rows, config.in_features, config.out_features);
    let proto = synthetic::linear_model(rows, cols, out, config.seed)?;
    let mut model = HybridModel::new("bench_linear", OnnxModel::from_proto(proto)?, &["fc"])?;
    let mut rng = StdRng::seed_from_u64(config.seed + 1);
    let mut sample =
        |n: usize| -> Vec<f32> { (0..n * cols).map(|_| rng.gen_range(-1.0..1.0)).collect() };
    let calibration = runner::f32_tensor(&[rows, cols], &sample(rows))?;
    model.compile(&calibration, &CompileOptions::default(), progress)?;
    let x = runner::f32_tensor(&[rows, cols], &sample(rows))?;
    let dir = std::env::temp_dir().join(format!("hyfhe-bench-remote-{}", std::process::id()));
    let result = (|| {
        model.save_and_clear_private_info(&dir, true)?;
        // The owner's copy (client and server trees) runs `execute` in process.
        let owner = HybridModel::load(&dir)?;
        progress.stage("execute keys", 1);
        owner.local_server()?;
        progress.advance(1);
        let mut service =
            Config::load(None).map_err(|e| HybridError::Unsupported(e.to_string()))?;
        service.coordinator.listen = "127.0.0.1:0".into();
        service.coordinator.metrics_listen = "127.0.0.1:0".into();
        let queue = match &config.redis {
            Some(url) => {
                service.queue.backend = QueueBackend::Redis;
                service.queue.redis_url = url.clone();
                "redis"
            }
            None => "memory",
        };
        let server = crate::service::spawn_embedded(service, dir.clone())
            .map_err(|e| HybridError::Remote(e.to_string()))?;
        let client = Client::new(&format!("http://127.0.0.1:{}", server.port), DEMO_API_KEY)?;
        progress.stage("session keys", 1);
        let keys = std::sync::Arc::new(SessionKeys::generate(
            &SessionKeys::precisions_of(owner.compiled()),
            &Silent,
        ));
        let session = block_on(client.open_session_with(owner.compiled(), keys))?;
        progress.advance(1);

        // Warm-up: the worker loads the session key; the local server is already built.
        block_on(owner.forward_remote(x.clone(), &session))?;
        owner.forward(x.clone(), Mode::Execute)?;
        progress.stage("alternating", config.repetitions);
        let (mut execute, mut remote) = (Vec::new(), Vec::new());
        let (mut execute_eval, mut round_trip) = (Vec::new(), Vec::new());
        let mut bytes = (0, 0);
        for _ in 0..config.repetitions {
            let t = Instant::now();
            let (_, stats) = owner.forward(x.clone(), Mode::Execute)?;
            execute.push(ms(t));
            execute_eval.push(stats.fhe_ms);
            let t = Instant::now();
            let (_, stats) = block_on(owner.forward_remote(x.clone(), &session))?;
            remote.push(ms(t));
            round_trip.push(stats.fhe_ms);
            bytes = (stats.upload_bytes, stats.download_bytes);
            progress.advance(1);
        }
        let _ = block_on(session.close());
        server.stop();
        let (execute_ms, remote_ms) = (median(execute), median(remote));
        Ok(RemoteBenchReport {
            rows,
            in_features: cols,
            out_features: out,
            queue,
            execute_ms,
            remote_ms,
            ratio: remote_ms / execute_ms,
            execute_eval_ms: median(execute_eval),
            remote_round_trip_ms: median(round_trip),
            upload_bytes: bytes.0,
            download_bytes: bytes.1,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
