//! Open-loop load (`--rate R`): forward `i` is due at `t0 + i/R` and goes to session `i % N`.
//!
//! The dispatcher sleeps until each forward's due time, takes one of `--max-outstanding` permits
//! and spawns the forward on a multi-thread runtime. When the permits are all taken (or the
//! generator itself falls behind) the forward starts late and the next ones go out back to back
//! as permits free up, but every latency is measured from the forward's *due* time, not from when
//! it actually started: the wait it spent queued in the generator counts, as it would for a user
//! whose request arrives on schedule (coordinated-omission correction). Forwards still waiting
//! for a permit when the send window ends are reported as `not_sent`; forwards still running
//! `--drain-s` after it as `unfinished`. Neither is in the percentiles, so when either is non-zero
//! the percentiles are a lower bound (the server did not keep up with the rate).

use std::collections::BTreeMap;
use std::error::Error;
use std::io::{LineWriter, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use hyfhe::client::{Client, ClientError, RemoteSession, SessionKeys};
use hyfhe::commands::read_npy;
use hyfhe::hybrid::{ForwardStats, HybridError, HybridModel, Mode};
use hyfhe::model::runner::f32_values;
use hyfhe::model::Value;
use hyfhe::progress::Silent;

use crate::Args;

/// Largest latency the histograms resolve (µs): an hour; longer ones are recorded as an hour.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Sessions set up (keys generated and uploaded, warm-up forward) at once before the load.
const SETUP_CONCURRENCY: usize = 8;
/// `--verify-with`: most base input windows the forwards' distinct inputs are made from.
const MAX_VERIFY_INPUTS: usize = 16;

/// The open-loop summary (`--json` prints it as one object).
#[derive(Serialize)]
pub struct OpenReport {
    /// `--rate`: forwards per second offered.
    target_rate: f64,
    /// Successful forwards per second: `ok / elapsed_s`.
    achieved_rate: f64,
    clients: usize,
    max_outstanding: u32,
    /// The send window (`--duration-s`).
    duration_s: f64,
    /// From the first due time to the last completion (at least `duration_s`; the drain
    /// included).
    elapsed_s: f64,
    /// Forwards due in the send window: `ceil(rate * duration_s)`.
    due: u64,
    /// The first due time, as Unix milliseconds (`--events` times count from it).
    t0_unix_ms: u64,
    /// Forwards started.
    sent: u64,
    /// Forwards that returned a result (with `--verify-with`: the right one).
    ok: u64,
    /// `--verify-with`: forwards that returned a result other than simulate's, bit for bit.
    wrong: u64,
    /// Failed forwards, all codes together.
    errors: u64,
    /// Failed forwards by code: the API error code (`too_many_requests`, `unavailable`,
    /// `deadline_exceeded`, ...), `transport` (no answer from the server) or `other`.
    errors_by_code: BTreeMap<String, u64>,
    /// Compute attempts the clients retried (and the forward went on), by cause: `transport`,
    /// `session_not_found` (renewed) or the refusal's code. Not errors: what the faults cost.
    retried_by_code: BTreeMap<String, u64>,
    /// Due in the window but never started: every permit was still taken when it closed.
    not_sent: u64,
    /// Still running `--drain-s` after the window closed (abandoned).
    unfinished: u64,
    /// Most forwards in flight at once.
    peak_outstanding: u64,
    /// Longest delay between a forward's due time and its start (cap or generator lag).
    start_delay_ms_max: f64,
    module_requests: usize,
    /// Module requests of the sessions' warm-up forwards (before the load: not in
    /// `module_requests`; what the cluster bills includes them).
    warmup_module_requests: usize,
    /// Server round trip per module request (queue + evaluation + HTTP), mean.
    round_trip_ms_mean: f64,
    /// Latency of the successful forwards, from their due time to their result.
    latency_ms_p50: f64,
    latency_ms_p90: f64,
    latency_ms_p99: f64,
    latency_ms_p99_9: f64,
    latency_ms_max: f64,
    latency_ms_mean: f64,
}

/// One `--report-every-s` interval, counted by completion time (one JSON line).
#[derive(Serialize)]
struct Sample {
    /// Seconds from the first due time to the end of this interval.
    t_s: f64,
    interval_s: f64,
    /// Forwards started in the interval.
    sent: u64,
    /// Forwards that succeeded in the interval.
    ok: u64,
    /// Forwards that failed in the interval.
    errors: u64,
    errors_by_code: BTreeMap<String, u64>,
    /// Forwards in flight at the end of the interval.
    in_flight: u64,
    /// Latency of the interval's successful forwards, from their due time.
    latency_ms_p50: f64,
    latency_ms_p90: f64,
    latency_ms_p99: f64,
    latency_ms_max: f64,
}

/// Counters over some span of time (the whole run, or one sample interval).
struct Counts {
    sent: u64,
    ok: u64,
    wrong: u64,
    errors: BTreeMap<String, u64>,
    /// Latencies of the successful forwards, µs.
    latency: Histogram<u64>,
}

impl Counts {
    fn new() -> Self {
        Self {
            sent: 0,
            ok: 0,
            wrong: 0,
            errors: BTreeMap::new(),
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds"),
        }
    }

    fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    fn record(&mut self, outcome: &Result<Duration, String>) {
        match outcome {
            Err(code) if code == WRONG => self.wrong += 1,
            Ok(latency) => {
                self.ok += 1;
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                self.latency.saturating_record(us.max(1));
            }
            Err(code) => *self.errors.entry(code.clone()).or_default() += 1,
        }
    }

    fn ms_at(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1e3
    }
}

/// The outcome recorded for a result that differs from simulate's (`--verify-with`).
const WRONG: &str = "wrong";

struct Stats {
    total: Counts,
    interval: Counts,
    interval_start: Instant,
    module_requests: usize,
    round_trip_ms: f64,
    start_delay_max: Duration,
    last_done: Option<Instant>,
    journal: Arc<Journal>,
}

/// One `--events` line: a finished forward.
#[derive(Serialize)]
struct Event<'a> {
    i: u64,
    /// Seconds from `t0_unix_ms` to the forward's due time, and to its end.
    due_s: f64,
    done_s: f64,
    /// `ok`, `wrong` or the error code.
    outcome: &'a str,
}

/// One `--events` line: a compute attempt the client retried (hidden from the forward's outcome).
#[derive(Serialize)]
struct Retry<'a> {
    t_s: f64,
    /// `transport`, `session_not_found` or the refusal's API code.
    retry: &'a str,
}

/// The `--events` file and the retries the sessions report, from the first due time on.
struct Journal {
    t0: std::sync::OnceLock<Instant>,
    file: Mutex<Option<LineWriter<std::fs::File>>>,
    retried: Mutex<BTreeMap<String, u64>>,
}

impl Journal {
    fn write(&self, line: &impl Serialize) {
        let mut file = self.file.lock().expect("events");
        if let Some(f) = file.as_mut() {
            let line = serde_json::to_string(line).expect("plain numbers and strings");
            if let Err(e) = writeln!(f, "{line}") {
                eprintln!("writing --events: {e}; no more events are written");
                *file = None;
            }
        }
    }

    /// A retried attempt (the sessions' [`hyfhe::client::RetryObserver`]); warm-up ones are not
    /// counted.
    fn retried(&self, cause: &str) {
        let Some(t0) = self.t0.get() else { return };
        *self
            .retried
            .lock()
            .expect("retries")
            .entry(cause.to_string())
            .or_default() += 1;
        self.write(&Retry {
            t_s: t0.elapsed().as_secs_f64(),
            retry: cause,
        });
    }
}

impl Stats {
    fn new(t0: Instant, journal: Arc<Journal>) -> Self {
        Self {
            journal,
            total: Counts::new(),
            interval: Counts::new(),
            interval_start: t0,
            module_requests: 0,
            round_trip_ms: 0.0,
            start_delay_max: Duration::ZERO,
            last_done: None,
        }
    }

    fn sent(&mut self) {
        self.total.sent += 1;
        self.interval.sent += 1;
    }

    /// Forward `i`, due at `due`, started at `started`, finished now with `outcome`; with
    /// `expected`, a result is right only if it has exactly these bits.
    fn finish(
        &mut self,
        i: u64,
        due: Instant,
        started: Instant,
        outcome: Result<(Value, ForwardStats), HybridError>,
        expected: Option<&[u32]>,
    ) {
        let done = Instant::now();
        self.last_done = Some(done);
        self.start_delay_max = self.start_delay_max.max(started - due);
        let outcome = match outcome {
            Ok((y, stats)) => {
                self.module_requests += stats.requests;
                self.round_trip_ms += stats.fhe_ms;
                match expected {
                    Some(bits) if !same_bits(&y, bits) => Err(WRONG.to_string()),
                    _ => Ok(done - due),
                }
            }
            Err(e) => Err(hybrid_error_code(&e)),
        };
        self.total.record(&outcome);
        self.interval.record(&outcome);
        let t0 = *self.journal.t0.get().expect("set before the first forward");
        self.journal.write(&Event {
            i,
            due_s: (due - t0).as_secs_f64(),
            done_s: (done - t0).as_secs_f64(),
            outcome: outcome.as_ref().map_or_else(|code| code.as_str(), |_| "ok"),
        });
    }

    /// The current interval as a sample; starts the next one.
    fn take_sample(&mut self, t0: Instant, in_flight: u64) -> Sample {
        let now = Instant::now();
        let c = std::mem::replace(&mut self.interval, Counts::new());
        let interval = now - std::mem::replace(&mut self.interval_start, now);
        Sample {
            t_s: (now - t0).as_secs_f64(),
            interval_s: interval.as_secs_f64(),
            sent: c.sent,
            ok: c.ok,
            errors: c.errors_total(),
            in_flight,
            latency_ms_p50: c.ms_at(0.5),
            latency_ms_p90: c.ms_at(0.9),
            latency_ms_p99: c.ms_at(0.99),
            latency_ms_max: c.latency.max() as f64 / 1e3,
            errors_by_code: c.errors,
        }
    }
}

/// Whether `y` is f32 with exactly the bit patterns `bits`.
fn same_bits(y: &Value, bits: &[u32]) -> bool {
    f32_values(y, "the output")
        .is_ok_and(|v| v.len() == bits.len() && v.iter().zip(bits).all(|(a, &b)| a.to_bits() == b))
}

/// The code a failed forward is counted under.
///
/// `forward_remote` reports a server's refusal as [`HybridError::Remote`] holding the
/// [`ClientError`]'s message (`impl From<ClientError> for HybridError`), so the code is read back
/// from that message; the tests below pin the formats this relies on.
fn hybrid_error_code(e: &HybridError) -> String {
    match e {
        HybridError::RemoteRefused { code, .. } if !code.is_empty() => code.clone(),
        HybridError::RemoteUnreachable(_) => "transport".into(),
        HybridError::Remote(message) => remote_message_code(message),
        _ => "other".into(),
    }
}

/// The code of a [`ClientError`] (opening a session fails with one directly).
fn client_error_code(e: &ClientError) -> String {
    match e {
        ClientError::Api { code, .. } => code.clone(),
        // As `HybridError::RemoteUnreachable`, which both become in a forward call.
        ClientError::Transport { .. } | ClientError::Url(_) => "transport".into(),
        _ => "other".into(),
    }
}

/// The code in a [`ClientError`]'s message: `server answered {status} {code}: {message}` for an
/// API error, `cannot reach {url}: {reason}` for a transport one.
fn remote_message_code(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("server answered ") {
        let code = rest
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.strip_suffix(':'));
        if let Some(code) = code.filter(|c| !c.is_empty()) {
            return code.to_string();
        }
    }
    if message.starts_with("cannot reach ") {
        return "transport".into();
    }
    "other".into()
}

/// Where the interval samples go.
enum Sink {
    Stderr,
    File(LineWriter<std::fs::File>),
}

impl Sink {
    fn write(&mut self, bar: &ProgressBar, sample: &Sample) -> std::io::Result<()> {
        let line = serde_json::to_string(sample).expect("plain numbers and strings");
        match self {
            Sink::Stderr => {
                bar.suspend(|| eprintln!("{line}"));
                Ok(())
            }
            Sink::File(f) => writeln!(f, "{line}"),
        }
    }
}

/// What the forwards share.
struct Load {
    model: Arc<HybridModel>,
    /// Forward i sends `inputs[i % len]` (one input unless `--verify-with`, where each forward
    /// sends an input of its own made from that window: [`distinct_input`]).
    inputs: Vec<Arc<Value>>,
    /// `--verify-with`: the owner's model, whose simulate gives each forward's expected output.
    owner: Option<Arc<HybridModel>>,
    sessions: Vec<Arc<RemoteSession>>,
    stats: Arc<Mutex<Stats>>,
    permits: Arc<Semaphore>,
    max_outstanding: u32,
    t0: Instant,
}

impl Load {
    fn in_flight(&self) -> u64 {
        (self.max_outstanding as usize - self.permits.available_permits()) as u64
    }
}

/// What the dispatcher counted.
struct Dispatched {
    due: u64,
    unfinished: u64,
    peak_outstanding: u64,
    end: Instant,
}

pub fn run(args: &Args, rate: f64) -> Result<OpenReport, Box<dyn Error>> {
    if args.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    let mut sink = match &args.samples {
        Some(path) => Sink::File(LineWriter::new(
            std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?,
        )),
        None => Sink::Stderr,
    };
    let threads = match args.threads {
        Some(t) => t as usize,
        None => std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let client = Client::new(&args.server, &args.api_key)?;
    let dir = tempfile::tempdir()?;
    runtime.block_on(client.download_model(&args.model, dir.path()))?;
    let model = Arc::new(HybridModel::load(dir.path())?);
    let input = read_npy(&args.input)?;
    let n = input.shape().first().copied().unwrap_or(0);
    let batch = args.batch.min(n);
    if batch == 0 {
        return Err(format!("{}: no samples", args.input.display()).into());
    }
    let windows = if args.verify_with.is_some() {
        (n / batch).clamp(1, MAX_VERIFY_INPUTS)
    } else {
        1
    };
    let inputs = (0..windows)
        .map(|k| Ok(Arc::new(input.slice(0, k * batch, (k + 1) * batch)?)))
        .collect::<Result<Vec<_>, Box<dyn Error>>>()?;
    let owner = match &args.verify_with {
        Some(dir) => {
            let owner = HybridModel::load(dir)?;
            if owner.specs() != model.specs() {
                return Err(format!(
                    "--verify-with: the served `{}` was compiled differently from the model there",
                    args.model
                )
                .into());
            }
            Some(Arc::new(owner))
        }
        None => None,
    };
    let file = match &args.events {
        Some(path) => Some(LineWriter::new(
            std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?,
        )),
        None => None,
    };
    let journal = Arc::new(Journal {
        t0: std::sync::OnceLock::new(),
        file: Mutex::new(file),
        retried: Mutex::new(BTreeMap::new()),
    });

    let (sessions, warmup_module_requests) =
        runtime.block_on(open_sessions(args, &client, &model, &inputs[0], &journal))?;
    let window = Duration::from_secs(args.duration_s);
    let t0 = Instant::now();
    journal.t0.set(t0).expect("set once");
    let t0_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let load = Load {
        model,
        inputs,
        owner,
        sessions,
        stats: Arc::new(Mutex::new(Stats::new(t0, journal.clone()))),
        permits: Arc::new(Semaphore::new(args.max_outstanding as usize)),
        max_outstanding: args.max_outstanding,
        t0,
    };
    let bar = ProgressBar::new(args.duration_s).with_prefix("load");
    bar.set_style(ProgressStyle::with_template(
        "{prefix:>10} [{bar:30}] {pos}/{len} s  {msg}",
    )?);
    let every = args.report_every_s.map(Duration::from_secs_f64);
    let dispatched = runtime.block_on(async {
        let (stop, stopped) = oneshot::channel();
        let reporter = report(&load, every, &mut sink, &bar, stopped);
        let drive = async {
            let d = drive(&load, rate, window, Duration::from_secs(args.drain_s), &bar).await;
            let _ = stop.send(());
            d
        };
        let (d, reported) = tokio::join!(drive, reporter);
        reported.map_err(|e| format!("writing the samples: {e}"))?;
        d
    })?;
    bar.finish_and_clear();
    runtime.block_on(async {
        let mut closing = JoinSet::new();
        for s in &load.sessions {
            let s = s.clone();
            closing.spawn(async move { s.close().await });
        }
        closing.join_all().await
    });

    let stats = load.stats.lock().expect("stats");
    let c = &stats.total;
    let window_s = window.as_secs_f64();
    let elapsed_s = match (dispatched.unfinished, stats.last_done) {
        (0, Some(last)) => (last - t0).as_secs_f64().max(window_s),
        _ => (dispatched.end - t0).as_secs_f64().max(window_s),
    };
    let report = OpenReport {
        target_rate: rate,
        achieved_rate: if elapsed_s > 0.0 {
            c.ok as f64 / elapsed_s
        } else {
            0.0
        },
        clients: args.clients,
        max_outstanding: args.max_outstanding,
        duration_s: window_s,
        elapsed_s,
        due: dispatched.due,
        t0_unix_ms,
        sent: c.sent,
        ok: c.ok,
        wrong: c.wrong,
        errors: c.errors_total(),
        errors_by_code: c.errors.clone(),
        retried_by_code: journal.retried.lock().expect("retries").clone(),
        not_sent: dispatched.due - c.sent,
        unfinished: dispatched.unfinished,
        peak_outstanding: dispatched.peak_outstanding,
        start_delay_ms_max: stats.start_delay_max.as_secs_f64() * 1e3,
        module_requests: stats.module_requests,
        warmup_module_requests,
        round_trip_ms_mean: stats.round_trip_ms / stats.module_requests.max(1) as f64,
        latency_ms_p50: c.ms_at(0.5),
        latency_ms_p90: c.ms_at(0.9),
        latency_ms_p99: c.ms_at(0.99),
        latency_ms_p99_9: c.ms_at(0.999),
        latency_ms_max: c.latency.max() as f64 / 1e3,
        latency_ms_mean: c.latency.mean() / 1e3,
    };
    if report.not_sent > 0 || report.unfinished > 0 {
        eprintln!(
            "warning: the server did not keep up with {rate}/s: {} forwards were never sent and \
             {} never finished; the percentiles leave them out, so they are a lower bound",
            report.not_sent, report.unfinished
        );
    }
    Ok(report)
}

/// Open `--clients` sessions (keys shared unless `--distinct-keys`), each warmed up with one
/// forward (the worker loads a session's keys on its first request); with the module requests
/// those warm-up forwards answered.
async fn open_sessions(
    args: &Args,
    client: &Client,
    model: &Arc<HybridModel>,
    x: &Arc<Value>,
    journal: &Arc<Journal>,
) -> Result<(Vec<Arc<RemoteSession>>, usize), Box<dyn Error>> {
    let bar = ProgressBar::new(args.clients as u64).with_message("sessions");
    bar.set_style(ProgressStyle::with_template(
        "{msg:>10} [{bar:30}] {pos}/{len} {elapsed}",
    )?);
    let precisions = SessionKeys::precisions_of(model.compiled());
    let shared = if args.distinct_keys {
        None
    } else {
        let precisions = precisions.clone();
        let profile = args.key;
        Some(
            tokio::task::spawn_blocking(move || {
                Arc::new(SessionKeys::generate_as(
                    &precisions,
                    false,
                    profile,
                    &Silent,
                ))
            })
            .await?,
        )
    };
    let setup = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut tasks = JoinSet::new();
    for k in 0..args.clients {
        let (client, model, x, setup, bar) = (
            client.clone(),
            model.clone(),
            x.clone(),
            setup.clone(),
            bar.clone(),
        );
        let (shared, precisions, profile) = (shared.clone(), precisions.clone(), args.key);
        let journal = journal.clone();
        tasks.spawn(async move {
            let _permit = setup.acquire_owned().await.expect("never closed");
            let keys = match shared {
                Some(keys) => keys,
                None => tokio::task::spawn_blocking(move || {
                    Arc::new(SessionKeys::generate_as(
                        &precisions,
                        false,
                        profile,
                        &Silent,
                    ))
                })
                .await
                .expect("keygen does not panic"),
            };
            let session = client
                .open_session_with(model.compiled(), keys)
                .await
                .map_err(|e| {
                    format!(
                        "opening session {k} failed ({}): {e}",
                        client_error_code(&e)
                    )
                })?;
            let session = session.on_retry(Arc::new(move |cause: &str| journal.retried(cause)));
            let warm_requests = match model.forward_remote((*x).clone(), &session).await {
                Ok((_, stats)) => stats.requests,
                Err(e) => {
                    bar.suspend(|| eprintln!("warm-up forward of session {k} failed: {e}"));
                    0
                }
            };
            bar.inc(1);
            Ok::<_, String>((k, Arc::new(session), warm_requests))
        });
    }
    let mut sessions = Vec::with_capacity(args.clients);
    while let Some(joined) = tasks.join_next().await {
        sessions.push(joined??);
    }
    bar.finish_and_clear();
    sessions.sort_by_key(|(k, _, _)| *k);
    let warm_requests = sessions.iter().map(|(_, _, r)| r).sum();
    Ok((
        sessions.into_iter().map(|(_, s, _)| s).collect(),
        warm_requests,
    ))
}

/// Send the forwards due in `window`, then wait up to `drain` for those in flight.
async fn drive(
    load: &Load,
    rate: f64,
    window: Duration,
    drain: Duration,
    bar: &ProgressBar,
) -> Result<Dispatched, Box<dyn Error>> {
    let end = load.t0 + window;
    // Forward i is due at i / rate: those with i / rate < window.
    let due = (window.as_secs_f64() * rate).ceil() as u64;
    let mut peak_outstanding = 0;
    let mut tasks = JoinSet::new();
    for i in 0..due {
        let due_at = load.t0 + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due_at).await;
        // Past the cap this waits, and the forward starts late; its latency still counts from
        // `due_at`. A forward still waiting when the window closes is not sent.
        let Ok(permit) = tokio::time::timeout_at(end, load.permits.clone().acquire_owned()).await
        else {
            break;
        };
        let permit = permit.expect("the semaphore is never closed");
        peak_outstanding = peak_outstanding.max(load.in_flight());
        load.stats.lock().expect("stats").sent();
        let (model, stats) = (load.model.clone(), load.stats.clone());
        let k = i as usize % load.inputs.len();
        let base = load.inputs[k].clone();
        let owner = load.owner.clone();
        let session = load.sessions[i as usize % load.sessions.len()].clone();
        tasks.spawn(async move {
            let started = Instant::now();
            // With --verify-with every forward sends an input no other forward sends, and its
            // own simulate output is what it must get back: a result delivered to the wrong
            // forward cannot pass.
            let (x, expected) = match owner {
                Some(owner) => {
                    let x = Arc::new(distinct_input(&base, i));
                    let sent = x.clone();
                    let expected =
                        tokio::task::spawn_blocking(move || expected_bits(&owner, &sent))
                            .await
                            .expect("simulate does not panic");
                    (x, Some(expected))
                }
                None => (base, None),
            };
            let (outcome, expected) = match expected {
                Some(Err(e)) => (Err(e), None),
                expected => (
                    model.forward_remote((*x).clone(), &*session).await,
                    expected.and_then(Result::ok),
                ),
            };
            drop(permit);
            stats
                .lock()
                .expect("stats")
                .finish(i, due_at, started, outcome, expected.as_deref());
        });
        while let Some(joined) = tasks.try_join_next() {
            rethrow(joined);
        }
    }
    bar.set_prefix("draining");
    let drained = tokio::time::timeout(drain, async {
        while let Some(joined) = tasks.join_next().await {
            rethrow(joined);
        }
    })
    .await;
    let unfinished = if drained.is_err() {
        let n = tasks.len() as u64;
        tasks.shutdown().await;
        n
    } else {
        0
    };
    Ok(Dispatched {
        due,
        unfinished,
        peak_outstanding,
        end: Instant::now(),
    })
}

/// Forward `i`'s own input: `base` with every value scaled by a factor in [0.5, 1.5) drawn from a
/// hash of (`i`, position), so no two forwards send the same tensor (nor the same quantized one,
/// but by a negligible chance).
fn distinct_input(base: &Value, i: u64) -> Value {
    let values = f32_values(base, "the input").expect("checked when the load was set up");
    let scaled: Vec<f32> = values
        .iter()
        .enumerate()
        .map(|(j, v)| {
            let mut h = (i ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            h ^= (j as u64).wrapping_mul(0x94d0_49bb_1331_11eb);
            h ^= h >> 31;
            v * (0.5 + (h % 1000) as f32 / 1000.0)
        })
        .collect();
    Value::from_shape(base.shape(), &scaled).expect("same shape as its base")
}

/// Simulate's output for `x`, as f32 bits.
fn expected_bits(owner: &HybridModel, x: &Value) -> Result<Vec<u32>, HybridError> {
    let (y, _) = owner.forward(x.clone(), Mode::Simulate)?;
    Ok(f32_values(&y, "the output")?
        .iter()
        .map(|v| v.to_bits())
        .collect())
}

fn rethrow(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}

/// Keep the progress bar current and write a sample every `every`, until `stop`; then write the
/// last (partial) interval.
async fn report(
    load: &Load,
    every: Option<Duration>,
    sink: &mut Sink,
    bar: &ProgressBar,
    mut stop: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let mut redraw = tokio::time::interval(Duration::from_millis(250));
    let mut sampling = every.map(|e| {
        let mut t = tokio::time::interval_at(load.t0 + e, e);
        t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        t
    });
    loop {
        let next_sample = async {
            match &mut sampling {
                Some(t) => t.tick().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut stop => break,
            _ = redraw.tick() => {
                let stats = load.stats.lock().expect("stats");
                bar.set_position(load.t0.elapsed().as_secs().min(bar.length().unwrap_or(0)));
                bar.set_message(format!(
                    "ok {}, errors {}, in flight {}",
                    stats.total.ok,
                    stats.total.errors_total(),
                    load.in_flight()
                ));
            }
            _ = next_sample => {
                let sample = load.stats.lock().expect("stats").take_sample(load.t0, load.in_flight());
                sink.write(bar, &sample)?;
            }
        }
    }
    if every.is_some() {
        let sample = load
            .stats
            .lock()
            .expect("stats")
            .take_sample(load.t0, load.in_flight());
        if sample.interval_s >= 1e-3 {
            sink.write(bar, &sample)?;
        }
    }
    Ok(())
}

impl OpenReport {
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string(self).expect("plain numbers"));
            return;
        }
        let errors = if self.errors_by_code.is_empty() {
            String::new()
        } else {
            let by_code: Vec<_> = self
                .errors_by_code
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect();
            format!(" ({})", by_code.join(", "))
        };
        println!(
            "open loop at {:.2}/s over {} sessions (at most {} in flight) for {:.1} s:\n\
             sent {} of {} due, ok {} ({:.2}/s over {:.1} s), wrong {}, errors {}{}, \
             unfinished {}\n\
             latency from the due time p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms, \
             max {:.1} ms\n\
             start delay max {:.1} ms, peak in flight {}, server round trip per request {:.1} ms",
            self.target_rate,
            self.clients,
            self.max_outstanding,
            self.duration_s,
            self.sent,
            self.due,
            self.ok,
            self.achieved_rate,
            self.elapsed_s,
            self.wrong,
            self.errors,
            errors,
            self.unfinished,
            self.latency_ms_p50,
            self.latency_ms_p90,
            self.latency_ms_p99,
            self.latency_ms_p99_9,
            self.latency_ms_max,
            self.start_delay_ms_max,
            self.peak_outstanding,
            self.round_trip_ms_mean,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(e: ClientError) -> String {
        hybrid_error_code(&HybridError::from(e))
    }

    #[test]
    fn api_errors_keep_their_code_through_hybrid_error() {
        for code in [
            "too_many_requests",
            "unavailable",
            "deadline_exceeded",
            "unknown",
        ] {
            let e = ClientError::Api {
                status: 503,
                code: code.into(),
                message: "busy: try again: later".into(),
            };
            assert_eq!(code_of(e), code);
        }
    }

    #[test]
    fn transport_and_other_errors() {
        let e = ClientError::Transport {
            url: "http://127.0.0.1:1".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(client_error_code(&e), "transport");
        assert_eq!(code_of(e), "transport");
        assert_eq!(code_of(ClientError::Protocol("garbage".into())), "other");
        assert_eq!(
            hybrid_error_code(&HybridError::Unsupported("x".into())),
            "other"
        );
    }

    #[test]
    fn counts_record_latencies_and_codes() {
        let mut c = Counts::new();
        for ms in 1..=100 {
            c.record(&Ok(Duration::from_millis(ms)));
        }
        c.record(&Err("unavailable".into()));
        c.record(&Err("unavailable".into()));
        assert_eq!(c.ok, 100);
        assert_eq!(c.errors_total(), 2);
        assert!((c.ms_at(0.5) - 50.0).abs() < 0.1, "{}", c.ms_at(0.5));
        assert!((c.ms_at(0.99) - 99.0).abs() < 0.1, "{}", c.ms_at(0.99));
        assert!((c.latency.max() as f64 / 1e3 - 100.0).abs() < 0.1);
    }
}
