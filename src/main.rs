//! The `hyfhe` command line. Thin: parsing and printing; the work lives in the library.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use std::path::PathBuf;

use hyfhe::bench::{run_linear, LinearBenchConfig, Progress};
use hyfhe::commands::{self, CompileRequest, GenerateRequest, RunRequest};
use hyfhe::config::Config;
use hyfhe::fhe::{KeyProfile, Precision};
use hyfhe::hybrid::{CompileOptions, Mode};
use hyfhe::service;

#[derive(Parser)]
#[command(
    name = "hyfhe",
    version,
    about = "Hybrid neural networks over TFHE: private layers on encrypted activations"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure against a baseline in the same run: the engine vs. plaintext, or a served module
    /// vs. execute.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// List a model's module paths (as PyTorch's named_modules() names them), their ops and
    /// parameter shapes, to pick the remote ones.
    Inspect {
        /// An ONNX model as torch.onnx.export writes it.
        model: PathBuf,
    },
    /// Select remote modules, calibrate, compile, and write client/, server/ and private/.
    Compile(CompileArgs),
    /// Run a compiled model on a .npy input in one mode, with per-stage timings.
    Run(RunArgs),
    /// Greedy text generation with a compiled language model: prefill the prompt, then one token
    /// per step (with a KV cache, each step sends one row per remote module).
    Generate(GenerateArgs),
    /// Coordinator and worker in one process on the in-memory queue (or Redis with --redis):
    /// the embedded server.
    Serve(ServeArgs),
    /// The HTTP API: sessions, admission, routing of encrypted layer requests to the queue.
    Coordinator(ServiceArgs),
    /// A queue worker: holds session keys and evaluates encrypted layers.
    Worker(ServiceArgs),
    /// Compile the bundled digits CNN, serve it on loopback and classify test digits remotely.
    Demo(DemoArgs),
    /// API-key utilities.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Operator checks of the Redis store.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Check what Redis holds for sessions against their key blobs' reference sets, count what a
    /// failover can leave behind (all recoverable) and print every tenant's bill. Exits 1 when a
    /// live session is missing from a reference set. Reads key by key: run it on an idle cluster.
    Audit {
        #[command(flatten)]
        service: ServiceArgs,
        /// Print one JSON object instead of the summary.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// A directory written by `hyfhe compile`, or a directory of them.
    #[arg(long)]
    model_dir: PathBuf,
    /// Use this Redis instead of the in-memory queue (e.g. redis://127.0.0.1:6379).
    #[arg(long)]
    redis: Option<String>,
    /// Configuration file [default: the built-in config/default.toml].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on [default: coordinator.listen from the config].
    #[arg(long)]
    listen: Option<String>,
}

#[derive(Args)]
struct ServiceArgs {
    /// Configuration file (config/default.toml documents every key); HYFHE__SECTION__KEY
    /// environment variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct DemoArgs {
    /// Test digits to classify (at most 360).
    #[arg(long, default_value_t = 40)]
    images: usize,
    /// Keep the compiled model and data here instead of a temporary directory.
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print the SHA-256 of an API key, as `tenants[].api_key_sha256` in the config wants it.
    Hash { key: String },
}

#[derive(Args)]
struct CompileArgs {
    /// The ONNX model (opset >= 13), e.g. from torch.onnx.export.
    #[arg(long)]
    model: PathBuf,
    /// A module path to run remotely on encrypted data (repeat for several).
    #[arg(long = "remote", required = true)]
    remote: Vec<String>,
    /// Calibration inputs (.npy, f32, samples along axis 0).
    #[arg(long)]
    calibration: PathBuf,
    /// Output directory (must be empty unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Bits of inputs and weights (weights: at most 8).
    #[arg(long, default_value_t = 8)]
    n_bits: u32,
    /// Quantize inputs per row at run time instead of from the calibrated range.
    #[arg(long)]
    dynamic: bool,
    /// Compact output precision (fewer bytes; only the top accumulator bits exact).
    #[arg(long)]
    compact: bool,
    /// Top accumulator bits each bootstrap reads inside a module with activations (2..=6;
    /// Concrete ML's rounding_threshold_bits). More bits: closer to float, more neighbour errors.
    #[arg(long, default_value_t = hyfhe::fhe::pbs::DEFAULT_ROUNDING_BITS)]
    rounding_bits: u32,
    /// Overwrite the client/, server/ and private/ trees of a non-empty --out.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// A directory written by `hyfhe compile` from a language model (an `input_ids` input).
    dir: PathBuf,
    /// Prompt token ids (.npy, int64 or int32), shape [tokens] or [1, tokens].
    #[arg(long)]
    prompt: PathBuf,
    /// Tokens to generate.
    #[arg(long, default_value_t = 8)]
    max_new_tokens: usize,
    #[arg(long, value_enum, default_value_t = Mode::Execute)]
    mode: Mode,
    /// Print one JSON object (tokens, prefill_ms, decode_ms_per_token, bytes per token, ...).
    #[arg(long)]
    json: bool,
    /// Coordinator URL for --mode remote (e.g. http://127.0.0.1:8080).
    #[arg(long)]
    server: Option<String>,
    /// Tenant API key for --mode remote.
    #[arg(long, env = "HYFHE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Which packing keys the session (remote) or the in-process server (execute) gets: `full`
    /// (every encoding; ~107 MiB uploaded) or `lean` (the automorphism keys alone, ~1 MiB: auto
    /// and slot requests, linear modules only; for single-row traffic and many tenants).
    #[arg(long, default_value = "full")]
    key: KeyProfile,
}

#[derive(Args)]
struct RunArgs {
    /// A directory written by `hyfhe compile`.
    dir: PathBuf,
    /// Input (.npy, f32), batch along axis 0.
    #[arg(long)]
    input: PathBuf,
    #[arg(long, value_enum, default_value_t = Mode::Execute)]
    mode: Mode,
    /// Write the output here (.npy, f32).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Integer class labels (.npy): print top-1 accuracy.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Also run this mode and print the largest difference (e.g. simulate, torch).
    #[arg(long, value_enum)]
    compare: Option<Mode>,
    /// Only the first N samples of the input (and labels).
    #[arg(long)]
    first: Option<usize>,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
    /// Coordinator URL for --mode remote (e.g. http://127.0.0.1:8080).
    #[arg(long)]
    server: Option<String>,
    /// Tenant API key for --mode remote.
    #[arg(long, env = "HYFHE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Which packing keys the session (remote) or the in-process server (execute) gets: `full`
    /// (every encoding; ~107 MiB uploaded) or `lean` (the automorphism keys alone, ~1 MiB: auto
    /// and slot requests, linear modules only; for single-row traffic and many tenants).
    #[arg(long, default_value = "full")]
    key: KeyProfile,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// One random quantized linear layer (8-bit inputs and weights): keygen, encrypt, evaluate,
    /// decrypt, vs. an ndarray f32 matmul of the same shape.
    Linear(LinearArgs),
    /// One linear module served over HTTP and a queue vs. the same module in `execute` mode,
    /// alternating in one run.
    Remote(RemoteArgs),
    /// What `queue.replica_acks` costs a job: storing outcomes on a Redis primary with replicas,
    /// announced at once vs. after `WAIT`, alternating in one run (writes throwaway jobs and
    /// bills: use a Redis of its own, e.g. loadtest/replica_wait.sh).
    Complete(CompleteArgs),
}

#[derive(Args)]
struct CompleteArgs {
    /// The primary, e.g. redis://127.0.0.1:6379 (or a redis+sentinel:// URL).
    #[arg(long)]
    redis_url: String,
    /// Replicas the waiting side asks for.
    #[arg(long, default_value_t = 1)]
    replica_acks: u32,
    /// Longest wait for them (ms).
    #[arg(long, default_value_t = 1000)]
    replica_ack_timeout_ms: u64,
    /// Jobs completed on each side.
    #[arg(long, default_value_t = 2000)]
    jobs: usize,
    /// Bytes per stored outcome.
    #[arg(long, default_value_t = 10 * 1024)]
    outcome_bytes: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RemoteArgs {
    /// Rows (tokens / batch) per request.
    #[arg(long, default_value_t = 1)]
    rows: usize,
    /// Input features.
    #[arg(long = "in", default_value_t = 2048)]
    in_features: usize,
    /// Output features.
    #[arg(long = "out", default_value_t = 2048)]
    out_features: usize,
    /// Timed repetitions of each mode (medians are reported).
    #[arg(long, default_value_t = 10)]
    repetitions: usize,
    /// Serve over this Redis (e.g. redis://127.0.0.1:6379) instead of the in-memory queue.
    #[arg(long)]
    redis: Option<String>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LinearArgs {
    /// Rows (tokens / batch) per request.
    #[arg(long, default_value_t = 1)]
    rows: usize,
    /// Input features (inner dimension).
    #[arg(long = "in", default_value_t = 2048)]
    in_features: usize,
    /// Output features.
    #[arg(long = "out", default_value_t = 2048)]
    out_features: usize,
    /// Worker threads for key generation and evaluation [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Compact output precision (fewer bytes, only the top bits exact) instead of exact.
    #[arg(long)]
    compact: bool,
    /// Force an encoding (`row`, `blocked16|32|64|128`, `slot`, `auto1|2|4|8|16`; a layer offers
    /// one `auto` size) instead of the planner's choice for the row count.
    #[arg(long)]
    encoding: Option<hyfhe::fhe::Encoding>,
    /// Print exactly one JSON object on stdout instead of the summary.
    #[arg(long)]
    json: bool,
    /// Timed repetitions after one warm-up (the median is reported).
    #[arg(long, default_value_t = 5)]
    repetitions: usize,
    /// Seed of the random layer and inputs.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Which packing keys to generate and time: `full` (every encoding) or `lean` (the
    /// automorphism keys alone; the planner then chooses among auto and slot).
    #[arg(long, default_value = "full")]
    key: KeyProfile,
}

struct Bars(std::sync::Mutex<Option<ProgressBar>>);

impl Progress for Bars {
    fn stage(&self, name: &str, total: usize) {
        let bar = ProgressBar::new(total as u64).with_message(name.to_string());
        bar.set_style(
            ProgressStyle::with_template("{msg:>16} [{bar:40}] {pos}/{len} {elapsed}")
                .expect("static template")
                .progress_chars("=> "),
        );
        if let Some(old) = self.0.lock().expect("progress lock").replace(bar) {
            old.finish_and_clear();
        }
    }

    fn advance(&self, n: usize) {
        if let Some(bar) = self.0.lock().expect("progress lock").as_ref() {
            bar.inc(n as u64);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(BenchCommand::Linear(args)) => bench_linear(args),
        Command::Bench(BenchCommand::Remote(args)) => bench_remote(args),
        Command::Bench(BenchCommand::Complete(args)) => bench_complete(args),
        Command::Inspect { model } => report(commands::inspect(&model)),
        Command::Compile(args) => compile(args),
        Command::Run(args) => run(args),
        Command::Generate(args) => generate(args),
        Command::Serve(args) => serve(args),
        Command::Coordinator(args) => coordinator(args),
        Command::Worker(args) => worker(args),
        Command::Demo(args) => demo(args),
        Command::Keys(KeysCommand::Hash { key }) => {
            println!("{}", hyfhe::config::hash_api_key(&key));
            ExitCode::SUCCESS
        }
        Command::Store(StoreCommand::Audit { service, json }) => audit_store(service, json),
    }
}

fn audit_store(args: ServiceArgs, json: bool) -> ExitCode {
    let config = match load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a tokio runtime");
    let audit = match runtime.block_on(service::audit_store(&config)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&audit).expect("an audit is plain data")
        );
    } else {
        println!(
            "sessions {}, key blobs {}; sessions without their blob {} (re-uploaded by their \
             clients), stale references {}, unreferenced blobs {}, stale quota entries {}",
            audit.sessions,
            audit.key_blobs,
            audit.sessions_without_blob,
            audit.stale_references,
            audit.unreferenced_blobs,
            audit.stale_quota_entries
        );
        for (tenant, bill) in &audit.bills {
            println!("bill {tenant}: {bill:?}");
        }
        for miss in &audit.unreferenced_uses {
            println!("MISSING REFERENCE: {miss}");
        }
    }
    if audit.is_consistent() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn load_config(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}

/// Run `service` inside an actix system on a multi-threaded tokio runtime (actors need the
/// system; a plain `#[tokio::main]` would panic on the first actor).
fn run_system<F>(config: &Config, service: F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), String>>,
{
    let _telemetry = hyfhe::telemetry::init(&config.telemetry);
    let system = actix_web::rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("building a tokio runtime")
    });
    match system.block_on(service) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let mut config = match load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(url) = args.redis {
        config.queue.backend = hyfhe::config::QueueBackend::Redis;
        config.queue.redis_url = url;
    }
    if let Some(listen) = args.listen {
        config.coordinator.listen = listen;
    }
    if let Err(e) = config.validate() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let service_config = config.clone();
    run_system(&config, async move {
        let listener =
            service::bind(&service_config.coordinator.listen).map_err(|e| e.to_string())?;
        let embedded = service::embedded(service_config, &args.model_dir, listener)
            .await
            .map_err(|e| e.to_string())?;
        // Tests and scripts read the port from this line.
        println!(
            "listening on {}://127.0.0.1:{}",
            embedded.app.scheme(),
            embedded.app.port()
        );
        println!(
            "metrics on http://127.0.0.1:{}",
            embedded.app.metrics_port()
        );
        tracing::info!(port = embedded.app.port(), worker = %embedded.worker.id, "serving");
        embedded
            .app
            .run_until_stopped()
            .await
            .map_err(|e| e.to_string())
    })
}

fn coordinator(args: ServiceArgs) -> ExitCode {
    let config = match load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    run_system(&config.clone(), async move {
        let app = service::coordinator(config)
            .await
            .map_err(|e| e.to_string())?;
        println!("listening on {}://127.0.0.1:{}", app.scheme(), app.port());
        println!("metrics on http://127.0.0.1:{}", app.metrics_port());
        tracing::info!(port = app.port(), "coordinator serving");
        app.run_until_stopped().await.map_err(|e| e.to_string())
    })
}

fn worker(args: ServiceArgs) -> ExitCode {
    let config = match load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    run_system(&config.clone(), async move {
        let (handle, server, port) = service::worker(config).await.map_err(|e| e.to_string())?;
        println!("worker {} metrics on http://127.0.0.1:{port}", handle.id);
        let stopper = server.handle();
        let reader = handle.reader.clone();
        // On SIGINT/SIGTERM the metrics server stops; give the shard leases back first so
        // another worker takes them at once instead of after the lease TTL.
        actix_web::rt::spawn(async move {
            shutdown_signal().await;
            let _ = reader.send(hyfhe::worker::Leave).await;
            stopper.stop(true).await;
        });
        server.await.map_err(|e| e.to_string())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn bench_remote(args: RemoteArgs) -> ExitCode {
    let config = hyfhe::bench::remote::RemoteBenchConfig {
        rows: args.rows,
        in_features: args.in_features,
        out_features: args.out_features,
        repetitions: args.repetitions.max(1),
        redis: args.redis,
        seed: args.seed,
    };
    let bars = bars();
    let result = hyfhe::bench::remote::run_remote(&config, &bars);
    bars.finish();
    report(result.map(|r| summary(&r, args.json, |r| r.render())))
}

fn bench_complete(args: CompleteArgs) -> ExitCode {
    let config = hyfhe::bench::complete::CompleteBenchConfig {
        redis_url: args.redis_url,
        replica_acks: args.replica_acks,
        replica_ack_timeout_ms: args.replica_ack_timeout_ms,
        jobs: args.jobs,
        outcome_bytes: args.outcome_bytes,
    };
    let result = hyfhe::bench::complete::run_complete(&config);
    report(result.map(|r| summary(&r, args.json, |r| r.render())))
}

fn demo(args: DemoArgs) -> ExitCode {
    let bars = bars();
    let result = hyfhe::demo::run(
        &hyfhe::demo::DemoOptions {
            images: args.images,
            workdir: args.workdir,
        },
        &bars,
    );
    bars.finish();
    report(result.map(|r| summary(&r, args.json, |r| r.render())))
}

fn report<E: std::fmt::Display>(result: Result<String, E>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One JSON object (`--json`) or the human-readable summary.
fn summary<T: serde::Serialize>(
    value: &T,
    json: bool,
    render: impl FnOnce(&T) -> String,
) -> String {
    if json {
        format!("{}\n", serde_json::to_string(value).expect("plain data"))
    } else {
        render(value)
    }
}

fn bars() -> Bars {
    Bars(std::sync::Mutex::new(None))
}

impl Bars {
    fn finish(&self) {
        if let Some(bar) = self.0.lock().expect("progress lock").take() {
            bar.finish_and_clear();
        }
    }
}

fn compile(args: CompileArgs) -> ExitCode {
    let request = CompileRequest {
        model: &args.model,
        remote: args.remote,
        calibration: &args.calibration,
        out: &args.out,
        options: CompileOptions {
            n_bits: args.n_bits,
            dynamic_inputs: args.dynamic,
            precision: if args.compact {
                Precision::Compact
            } else {
                Precision::Exact
            },
            rounding_bits: args.rounding_bits,
        },
        force: args.force,
    };
    let bars = bars();
    let result = commands::compile(&request, &bars);
    bars.finish();
    report(result)
}

/// The client's spans (quantize, encrypt, request, decrypt) follow `telemetry` from the built-in
/// config and HYFHE__TELEMETRY__* overrides; off by default. `None` (reported) on a bad config.
fn client_telemetry() -> Option<hyfhe::telemetry::TelemetryGuard> {
    match Config::load(None) {
        Ok(config) => Some(hyfhe::telemetry::init(&config.telemetry)),
        Err(e) => {
            eprintln!("error: {e}");
            None
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let Some(_telemetry) = client_telemetry() else {
        return ExitCode::FAILURE;
    };
    let request = RunRequest {
        dir: &args.dir,
        input: &args.input,
        mode: args.mode,
        output: args.output,
        labels: args.labels,
        reference: args.compare,
        first: args.first,
        server: args
            .server
            .map(|url| (url, args.api_key.unwrap_or_default())),
        key: args.key,
    };
    let bars = bars();
    let result = commands::run(&request, &bars);
    bars.finish();
    report(result.map(|(r, _)| summary(&r, args.json, |r| r.render())))
}

fn generate(args: GenerateArgs) -> ExitCode {
    let Some(_telemetry) = client_telemetry() else {
        return ExitCode::FAILURE;
    };
    let request = GenerateRequest {
        dir: &args.dir,
        prompt: &args.prompt,
        max_new_tokens: args.max_new_tokens,
        mode: args.mode,
        server: args
            .server
            .map(|url| (url, args.api_key.unwrap_or_default())),
        key: args.key,
    };
    let bars = bars();
    let result = commands::generate(&request, &bars);
    bars.finish();
    report(result.map(|r| summary(&r, args.json, |r| r.render())))
}

fn bench_linear(args: LinearArgs) -> ExitCode {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let config = LinearBenchConfig {
        rows: args.rows,
        in_features: args.in_features,
        out_features: args.out_features,
        threads,
        precision: if args.compact {
            Precision::Compact
        } else {
            Precision::Exact
        },
        repetitions: args.repetitions,
        seed: args.seed,
        encoding: args.encoding,
        key: args.key,
    };
    let bars = Bars(std::sync::Mutex::new(None));
    let result = run_linear(&config, &bars);
    if let Some(bar) = bars.0.lock().expect("progress lock").take() {
        bar.finish_and_clear();
    }
    match result {
        Ok(report) if args.json => {
            println!("{}", serde_json::to_string(&report).expect("plain numbers"));
            ExitCode::SUCCESS
        }
        Ok(report) => {
            println!("{}", report.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
