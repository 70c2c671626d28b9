//! `hyfhe bench linear`: one random quantized layer, timed end to end in one process, against a
//! plaintext f32 matmul of the same shape (`ndarray`'s `dot`) measured in the same run.

use std::time::Instant;

use ndarray::Array2;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

use crate::fhe::{
    self, ClientKey, Encoding, FheError, FourierLinearLayer, KeyProfile, LayerPlan, Precision,
    SessionKey,
};
use crate::quant::{
    AffineQuantizer, Granularity, InputQuantization, QuantizedLinear, QuantizedWeights,
    WeightScheme,
};

/// What to measure.
#[derive(Clone, Debug)]
pub struct LinearBenchConfig {
    pub rows: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub threads: usize,
    pub precision: Precision,
    /// Timed repetitions after one warm-up; the median is reported.
    pub repetitions: usize,
    pub seed: u64,
    /// Forced encoding; `None` lets the planner choose for the row count (among those the
    /// key profile serves).
    pub encoding: Option<Encoding>,
    /// Which packing keys are generated (and timed): full, or lean (automorphism keys only).
    pub key: KeyProfile,
}

/// The measurement; field names are the `--json` contract.
#[derive(Clone, Debug, Serialize)]
pub struct LinearBenchReport {
    pub rows: usize,
    #[serde(rename = "in")]
    pub in_features: usize,
    #[serde(rename = "out")]
    pub out_features: usize,
    pub threads: usize,
    pub precision: Precision,
    /// The encoding the request used (`row`, `blocked16`, ...).
    pub encoding: String,
    /// What the planner picks for this row count (the same as `encoding` unless forced).
    pub planner_choice: String,
    pub keygen_ms: f64,
    pub encrypt_ms: f64,
    pub eval_ms: f64,
    pub decrypt_ms: f64,
    pub plaintext_ms: f64,
    pub ratio: f64,
    pub input_bytes_per_value: f64,
    pub output_bytes_per_value: f64,
    pub eval_key_bytes: usize,
    /// The key profile (`full` or `lean`).
    pub key: KeyProfile,
    pub exact: bool,
    pub exact_top_bits: u32,
    /// Server-side, once per session: seeded key → Fourier key (not part of the JSON contract).
    #[serde(skip)]
    pub key_load_ms: f64,
    /// The server's transformed key: what a session holds in a worker.
    pub fourier_key_bytes: usize,
    #[serde(skip)]
    pub acc_bits: u32,
    #[serde(skip)]
    pub predicted_exact_top_bits: u32,
}

pub use crate::progress::Progress;

pub mod complete;
pub mod remote;

pub fn run_linear(
    config: &LinearBenchConfig,
    progress: &dyn Progress,
) -> Result<LinearBenchReport, FheError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(config.threads)
        .build()
        .map_err(|e| FheError::Shape(format!("cannot start {} threads: {e}", config.threads)))?;
    let (rows, cols, out) = (config.rows, config.in_features, config.out_features);
    let plan = LayerPlan::new("bench", config.precision, cols, out, 8, 8)?;
    if rows == 0 || rows > fhe::MAX_ROWS {
        return Err(FheError::Shape(format!(
            "--rows must be in 1..={}, got {rows}",
            fhe::MAX_ROWS
        )));
    }
    let mut rng = StdRng::seed_from_u64(config.seed);
    let weights: Vec<f32> = (0..out * cols)
        .map(|_| rng.gen_range(-1.0..1.0f32))
        .collect();
    let bias: Vec<f32> = (0..out).map(|_| rng.gen_range(-0.1..0.1f32)).collect();
    let x: Vec<f32> = (0..rows * cols)
        .map(|_| rng.gen_range(-1.0..3.0f32))
        .collect();
    let input = InputQuantization::Static(AffineQuantizer::calibrate(&x, 8).map_err(quant_err)?);
    let layer = QuantizedLinear::new(
        QuantizedWeights::quantize(
            &weights,
            out,
            cols,
            8,
            Granularity::PerChannel,
            WeightScheme::Symmetric,
        )
        .map_err(quant_err)?,
        Some(bias),
        input,
    )
    .map_err(quant_err)?;
    let quantized = layer.quantize_input(&x).map_err(quant_err)?;
    let (expected, _) = layer.simulate(&quantized);

    let planner_choice = Encoding::choose_for(&plan, rows, config.key).ok_or_else(|| {
        FheError::ParameterMismatch(format!(
            "no encoding of this layer serves a {} key",
            config.key
        ))
    })?;
    let encoding = config.encoding.unwrap_or(planner_choice);
    progress.stage("keygen", fhe::EvaluationKey::entries());
    let started = Instant::now();
    let client = ClientKey::generate();
    let eval_key = pool.install(|| {
        client.evaluation_key_as(config.precision, config.key, &|n| progress.advance(n))
    });
    let keygen_ms = ms(started);
    let eval_key_bytes = fhe::encode(&eval_key).len();

    progress.stage("key load", 1);
    let started = Instant::now();
    let server_key = pool.install(|| SessionKey::new(&eval_key));
    let key_load_ms = ms(started);
    progress.advance(1);
    let server_layer =
        pool.install(|| FourierLinearLayer::new(plan.clone(), &layer.weights.codes))?;

    let reps = config.repetitions.max(1);
    progress.stage("encrypted runs", reps + 1);
    let mut encrypt = Vec::new();
    let mut eval = Vec::new();
    let mut decrypt = Vec::new();
    let mut last = None;
    for rep in 0..=reps {
        let started = Instant::now();
        let request = client.encrypt_rows_as(&plan, &quantized.values, rows, encoding)?;
        let t_encrypt = ms(started);
        let started = Instant::now();
        let response = pool.install(|| server_layer.evaluate(&server_key, &request))?;
        let t_eval = ms(started);
        let started = Instant::now();
        let phases = client.decrypt_phases(&plan, &response)?;
        let t_decrypt = ms(started);
        if rep > 0 {
            encrypt.push(t_encrypt);
            eval.push(t_eval);
            decrypt.push(t_decrypt);
        }
        progress.advance(1);
        last = Some((request, response, phases));
    }
    let (request, response, phases) = last.expect("at least one run");

    let plaintext_ms = plaintext_matmul_ms(&x, &weights, rows, cols, out, reps.max(20));

    let delta_log = plan.delta_log();
    let max_err = phases
        .iter()
        .zip(&expected)
        .map(|(&p, &e)| (fhe::decode_phase(p, delta_log) - e).unsigned_abs())
        .max()
        .unwrap_or(0);
    let exact_top_bits = plan.acc_bits.saturating_sub(64 - max_err.leading_zeros());
    let eval_ms = median(eval);
    Ok(LinearBenchReport {
        rows,
        in_features: cols,
        out_features: out,
        threads: config.threads,
        precision: config.precision,
        encoding: encoding.to_string(),
        planner_choice: planner_choice.to_string(),
        keygen_ms,
        encrypt_ms: median(encrypt),
        eval_ms,
        decrypt_ms: median(decrypt),
        plaintext_ms,
        ratio: eval_ms / plaintext_ms,
        input_bytes_per_value: fhe::encode(&request).len() as f64 / (rows * cols) as f64,
        output_bytes_per_value: fhe::encode(&response).len() as f64 / (rows * out) as f64,
        eval_key_bytes,
        key: config.key,
        exact: max_err == 0,
        exact_top_bits,
        key_load_ms,
        fourier_key_bytes: server_key.size_bytes(),
        acc_bits: plan.acc_bits,
        predicted_exact_top_bits: plan.predicted_exact_top_bits,
    })
}

fn quant_err(e: crate::quant::QuantError) -> FheError {
    FheError::Shape(e.to_string())
}

fn plaintext_matmul_ms(
    x: &[f32],
    w: &[f32],
    rows: usize,
    cols: usize,
    out: usize,
    reps: usize,
) -> f64 {
    let x = Array2::from_shape_vec((rows, cols), x.to_vec()).expect("shape checked");
    let w_t = Array2::from_shape_vec((out, cols), w.to_vec())
        .expect("shape checked")
        .reversed_axes()
        .as_standard_layout()
        .into_owned();
    let mut sink = x.dot(&w_t);
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let started = Instant::now();
        sink = x.dot(&w_t);
        times.push(ms(started));
    }
    std::hint::black_box(sink);
    median(times)
}

pub(crate) fn ms(started: Instant) -> f64 {
    started.elapsed().as_secs_f64() * 1e3
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl LinearBenchReport {
    /// Human-readable summary.
    pub fn render(&self) -> String {
        let wire = |b: f64| format!("{b:.2} B");
        format!(
            "linear layer {rows}×{cols} @ {cols}×{out}, {precision} precision, {threads} threads, \
             {encoding} encoding (planner: {planner})\n\
             keygen        {keygen:>10.1} ms   (client: secret keys + seeded packing key)\n\
             key load      {load:>10.1} ms   (server, once per session: Fourier packing key, {fkey:.0} MiB)\n\
             encrypt       {enc:>10.2} ms\n\
             eval          {eval:>10.2} ms   (products + packing + modulus switch)\n\
             decrypt       {dec:>10.2} ms\n\
             plaintext     {plain:>10.3} ms   (ndarray f32 dot, same shape, same process)\n\
             ratio = eval_ms / plaintext_ms = {ratio:.1}\n\
             wire: {inb} per input value, {outb} per output value, evaluation key {ek:.1} MiB\n\
             result: {exact} ({top} of {acc} accumulator bits exact; predicted {pred})",
            rows = self.rows,
            cols = self.in_features,
            out = self.out_features,
            precision = self.precision,
            threads = self.threads,
            encoding = self.encoding,
            planner = self.planner_choice,
            keygen = self.keygen_ms,
            load = self.key_load_ms,
            fkey = self.fourier_key_bytes as f64 / (1 << 20) as f64,
            enc = self.encrypt_ms,
            eval = self.eval_ms,
            dec = self.decrypt_ms,
            plain = self.plaintext_ms,
            ratio = self.ratio,
            inb = wire(self.input_bytes_per_value),
            outb = wire(self.output_bytes_per_value),
            ek = self.eval_key_bytes as f64 / (1 << 20) as f64,
            exact = if self.exact {
                "bit-identical to the integer simulation"
            } else {
                "NOT bit-identical to the integer simulation"
            },
            top = self.exact_top_bits,
            acc = self.acc_bits,
            pred = self.predicted_exact_top_bits,
        )
    }
}
