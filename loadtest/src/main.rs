//! `hyfhe-loadtest`: a load generator for a hyfhe coordinator, in one of two modes.
//!
//! - **Closed loop** (default): `--clients N` clients, each with its own session, call `forward`
//!   back to back for `--duration-s`; prints throughput and latency percentiles. The offered load
//!   follows the server (a slow answer delays the next request), so this measures capacity.
//! - **Open loop** (`--rate R`): forwards arrive at a constant rate whatever the server does:
//!   forward `i` is due at `t0 + i/R` and goes to session `i % N` of the `--clients N` sessions;
//!   at most `--max-outstanding` run at once. A forward held back by that cap (or by a busy
//!   generator) starts late, but its latency is still measured from its *due* time, so queueing
//!   shows up in the percentiles instead of silently lowering the offered load (no coordinated
//!   omission). Latencies go into an HDR histogram; the report has the target and achieved rate,
//!   errors by API code (`too_many_requests`, `unavailable`, `deadline_exceeded`, ...,
//!   `transport`, `other`) and p50/p90/p99/p99.9/max. `--report-every-s S` adds one sample per
//!   interval (JSON lines, on stderr or into `--samples FILE`) for long soak runs
//!   (`loadtest/soak.sh`).
//!
//! With `--verify-with DIR` every result is compared bit for bit with what `simulate` gives for the same
//! input (`wrong` in the report), and `--events FILE` records each forward's outcome and times, so
//! a fault injected from outside can be lined up with what clients saw (`tests/compose/run.sh`).
//!
//! `--json` prints exactly one JSON object on stdout; progress and diagnostics go to stderr.
//!
//! Uses the public client API only (download the client tree, open sessions, forward), so what
//! it measures is what an application sees.

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use hyfhe::client::{block_on, Client, SessionKeys};
use hyfhe::commands::read_npy;
use hyfhe::hybrid::HybridModel;
use hyfhe::progress::Silent;

mod open_loop;

#[derive(Parser)]
#[command(
    name = "hyfhe-loadtest",
    version,
    about = "Load generator for a hyfhe coordinator"
)]
struct Args {
    /// Coordinator URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Tenant API key.
    #[arg(long, env = "HYFHE_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Served model name (see GET /v1/models).
    #[arg(long)]
    model: String,
    /// Input samples (.npy, f32); each forward sends the first --batch of them.
    #[arg(long)]
    input: PathBuf,
    /// Samples per forward.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Clients, each with its own session (closed loop: each runs forwards back to back; open
    /// loop: forward i goes to session i % N).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Seconds of load after the warm-up forward of every session (open loop: the window in
    /// which forwards are sent; those in flight at its end are still waited for, see --drain-s).
    #[arg(long, default_value_t = 20)]
    duration_s: u64,
    /// Generate a key set per client (as separate users would) instead of sharing one.
    #[arg(long)]
    distinct_keys: bool,
    /// Packing keys of every session: `full` (every encoding, ~107 MiB each) or `lean` (the
    /// automorphism keys alone, ~1 MiB; linear modules only).
    #[arg(long, default_value = "full")]
    key: hyfhe::fhe::KeyProfile,
    /// Print one JSON object on stdout instead of the summary.
    #[arg(long)]
    json: bool,
    /// Open loop: send forwards at this constant rate (per second; forward i is due at
    /// t0 + i/RATE whatever happened to earlier ones). Without it the load is closed loop.
    #[arg(long, value_name = "RATE", value_parser = positive_f64)]
    rate: Option<f64>,
    /// Open loop: most forwards in flight at once. A forward past the cap starts late, but its
    /// latency still counts from its due time.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    max_outstanding: u32,
    /// Open loop: after the send window, wait this many seconds for forwards still in flight;
    /// those still running then are reported as `unfinished`.
    #[arg(long, default_value_t = 120)]
    drain_s: u64,
    /// Open loop: also report every S seconds the interval's own p50/p90/p99/max, ok and errors
    /// (one JSON line per interval, on stderr unless --samples is given).
    #[arg(long, value_name = "S", value_parser = positive_f64, requires = "rate")]
    report_every_s: Option<f64>,
    /// Open loop: write the --report-every-s samples to this file (JSON lines) instead of stderr.
    #[arg(long, value_name = "FILE", requires = "report_every_s")]
    samples: Option<PathBuf>,
    /// Open loop: threads of the async runtime that runs the forwards (their encryption and
    /// decryption included) [default: the number of CPUs].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Open loop: check every result bit for bit against `simulate` run on DIR, the compiled
    /// model as `hyfhe compile` wrote it (simulate needs its server/ tree, which the downloaded
    /// client tree lacks). Forward i then sends an input of its own, window i % K (K windows of
    /// --batch samples, at most 16) with each value scaled by a factor drawn from a hash of i, and
    /// its result is checked against simulate of that input: a result delivered to another
    /// forward cannot pass. Mismatches are counted as `wrong`.
    #[arg(long, value_name = "DIR", requires = "rate")]
    verify_with: Option<PathBuf>,
    /// Open loop: write one JSON line per finished forward (its index, due and completion time in
    /// seconds from the report's `t0_unix_ms`, and `ok`, `wrong` or the error code) to FILE.
    #[arg(long, value_name = "FILE", requires = "rate")]
    events: Option<PathBuf>,
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(_) => Err("expected a positive number".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Serialize)]
struct Report {
    clients: usize,
    duration_s: f64,
    forwards: usize,
    module_requests: usize,
    errors: usize,
    forwards_per_s: f64,
    requests_per_s: f64,
    latency_ms_p50: f64,
    latency_ms_p95: f64,
    latency_ms_p99: f64,
    /// Server round trip per module request (queue + evaluation + HTTP), mean.
    round_trip_ms_mean: f64,
}

struct ClientResult {
    latencies_ms: Vec<f64>,
    requests: usize,
    round_trip_ms: f64,
    errors: usize,
}

#[allow(clippy::too_many_arguments)]
async fn client_loop(
    model: &HybridModel,
    x: &hyfhe::model::Value,
    client: &Client,
    keys: Arc<SessionKeys>,
    ready: &Barrier,
    start: &std::sync::OnceLock<Instant>,
    bar: &ProgressBar,
    duration: Duration,
) -> ClientResult {
    let mut r = ClientResult {
        latencies_ms: Vec::new(),
        requests: 0,
        round_trip_ms: 0.0,
        errors: 0,
    };
    // A client per thread: its connection pool lives on this thread's runtime.
    let client = client.clone_fresh();
    let session = match client.open_session_with(model.compiled(), keys).await {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("opening a session failed: {e}");
            None
        }
    };
    // Warm-up: the worker loads this session's key on its first request.
    if let Some(s) = &session {
        if let Err(e) = model.forward_remote(x.clone(), s).await {
            eprintln!("warm-up forward failed: {e}");
        }
    }
    bar.inc(1);
    ready.wait();
    let start = *start.get_or_init(Instant::now);
    let Some(session) = session else {
        r.errors += 1;
        return r;
    };
    while start.elapsed() < duration {
        let t = Instant::now();
        match model.forward_remote(x.clone(), &session).await {
            Ok((_, stats)) => {
                r.latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
                r.requests += stats.requests;
                r.round_trip_ms += stats.fhe_ms;
            }
            Err(e) => {
                eprintln!("forward failed: {e}");
                r.errors += 1;
            }
        }
    }
    let _ = session.close().await;
    r
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let outcome = match args.rate {
        None => run(&args).map(|r| print_closed(&r, args.json)),
        Some(rate) => open_loop::run(&args, rate).map(|r| r.print(args.json)),
    };
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_closed(r: &Report, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).expect("plain numbers"));
        return;
    }
    println!(
        "{} clients for {:.1} s: {} forwards ({:.2}/s), {} module requests ({:.2}/s), {} errors\n\
         forward latency p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms; server round trip per request {:.1} ms",
        r.clients, r.duration_s, r.forwards, r.forwards_per_s, r.module_requests,
        r.requests_per_s, r.errors, r.latency_ms_p50, r.latency_ms_p95, r.latency_ms_p99,
        r.round_trip_ms_mean
    );
}

fn run(args: &Args) -> Result<Report, Box<dyn std::error::Error>> {
    let client = Client::new(&args.server, &args.api_key)?;
    let dir = tempfile::tempdir()?;
    block_on(client.download_model(&args.model, dir.path()))?;
    let model = HybridModel::load(dir.path())?;
    let input = read_npy(&args.input)?;
    let x = input.slice(0, 0, args.batch.min(input.shape()[0]))?;

    let bar = ProgressBar::new(args.clients as u64).with_message("sessions");
    bar.set_style(ProgressStyle::with_template(
        "{msg:>10} [{bar:30}] {pos}/{len} {elapsed}",
    )?);
    let precisions = SessionKeys::precisions_of(model.compiled());
    let shared = Arc::new(SessionKeys::generate_as(
        &precisions,
        false,
        args.key,
        &Silent,
    ));
    let duration = Duration::from_secs(args.duration_s);
    // Everyone starts the timed phase together, after every session's warm-up forward.
    let ready = Barrier::new(args.clients + 1);
    let start = std::sync::OnceLock::new();
    let results: Vec<ClientResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..args.clients)
            .map(|_| {
                let (model, x, client, ready, start, bar) =
                    (&model, &x, &client, &ready, &start, &bar);
                let keys = if args.distinct_keys {
                    Arc::new(SessionKeys::generate_as(
                        &precisions,
                        false,
                        args.key,
                        &Silent,
                    ))
                } else {
                    shared.clone()
                };
                scope.spawn(move || {
                    // One runtime per client thread, for its whole life: pooled connections
                    // belong to the runtime that opened them.
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("tokio runtime");
                    runtime.block_on(client_loop(
                        model, x, client, keys, ready, start, bar, duration,
                    ))
                })
            })
            .collect();
        ready.wait();
        bar.finish_and_clear();
        let started = *start.get_or_init(Instant::now);
        let load = ProgressBar::new(args.duration_s).with_message("load");
        load.set_style(
            ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} s").expect("template"),
        );
        while started.elapsed() < duration {
            load.set_position(started.elapsed().as_secs());
            std::thread::sleep(Duration::from_millis(200));
        }
        load.finish_and_clear();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let start = *start.get().expect("started");
    let elapsed = start.elapsed().as_secs_f64();
    let mut latencies: Vec<f64> = results
        .iter()
        .flat_map(|r| r.latencies_ms.clone())
        .collect();
    latencies.sort_by(f64::total_cmp);
    let requests: usize = results.iter().map(|r| r.requests).sum();
    Ok(Report {
        clients: args.clients,
        duration_s: elapsed,
        forwards: latencies.len(),
        module_requests: requests,
        errors: results.iter().map(|r| r.errors).sum(),
        forwards_per_s: latencies.len() as f64 / elapsed,
        requests_per_s: requests as f64 / elapsed,
        latency_ms_p50: percentile(&latencies, 0.5),
        latency_ms_p95: percentile(&latencies, 0.95),
        latency_ms_p99: percentile(&latencies, 0.99),
        round_trip_ms_mean: results.iter().map(|r| r.round_trip_ms).sum::<f64>()
            / requests.max(1) as f64,
    })
}
