//! The `hyfhe` command line. Thin: parsing and printing; the work lives in the library.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use hyfhe::bench::{run_linear, LinearBenchConfig, Progress};
use hyfhe::fhe::Precision;

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
    /// Measure the encrypted engine against a plaintext baseline in the same process.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// One random quantized linear layer (8-bit inputs and weights): keygen, encrypt, evaluate,
    /// decrypt, vs. an ndarray f32 matmul of the same shape.
    Linear(LinearArgs),
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
    /// Print exactly one JSON object on stdout instead of the summary.
    #[arg(long)]
    json: bool,
    /// Timed repetitions after one warm-up (the median is reported).
    #[arg(long, default_value_t = 5)]
    repetitions: usize,
    /// Seed of the random layer and inputs.
    #[arg(long, default_value_t = 42)]
    seed: u64,
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
    }
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
