//! The distributed service end to end: real `hyfhe` coordinator and worker processes over a
//! real redis-server (or `hyfhe serve` on the in-memory queue), real HTTP, real FHE.

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use hyfhe::client::{Client, ClientError, RemoteSession, SessionKeys};
use hyfhe::commands::read_npy;
use hyfhe::fhe::{encode, KeyProfile, LayerPlan, Precision};
use hyfhe::hybrid::{CompileOptions, HybridModel, Mode};
use hyfhe::model::{OnnxModel, Value};
use hyfhe::progress::Silent;

use crate::cluster::{config_file, http_get, metric, serial, settled_count, Cluster, Service};
use crate::hybrid::{fixture, values, KEYS};

pub const API_KEY: &str = "hyfhe-demo-key";

/// A compiled model with the owner's reference outputs on a few samples.
pub struct Served {
    pub name: &'static str,
    pub input: Value,
    pub simulate: Vec<f32>,
    pub execute: Vec<f32>,
}

pub struct Models {
    pub dir: PathBuf,
    pub served: Vec<Served>,
}

/// FCSmall and both digits models, compiled once per test run into the target directory.
pub static MODELS: LazyLock<Models> = LazyLock::new(|| {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serving-models");
    let cases: [(&str, &str, &[&str], &str, &str); 3] = [
        (
            "fc_small",
            "fc_small.onnx",
            &["seq.0"],
            "fc_small_calibration.npy",
            "fc_small_input.npy",
        ),
        (
            "digits_mlp",
            "digits_mlp.onnx",
            &["net.0", "net.2", "net.4"],
            "digits_calibration_x.npy",
            "digits_test_x.npy",
        ),
        (
            "digits_cnn",
            "digits_cnn.onnx",
            &["features.2", "classifier.0", "classifier.2"],
            "digits_calibration_images.npy",
            "digits_test_images.npy",
        ),
    ];
    let mut served = Vec::new();
    for (name, file, remote, calibration, input) in cases {
        let onnx = OnnxModel::load(fixture(file)).unwrap();
        let mut m = HybridModel::new(name, onnx, remote).unwrap();
        m.compile(
            &read_npy(&fixture(calibration)).unwrap(),
            &CompileOptions::default(),
            &Silent,
        )
        .unwrap();
        m.use_keys(KEYS.clone());
        let x = read_npy(&fixture(input)).unwrap();
        let x = x.slice(0, 0, 8.min(x.shape()[0])).unwrap();
        let simulate = values(&m.forward(x.clone(), Mode::Simulate).unwrap().0);
        let execute = values(&m.forward(x.clone(), Mode::Execute).unwrap().0);
        m.save_and_clear_private_info(dir.join(name), true).unwrap();
        served.push(Served {
            name,
            input: x,
            simulate,
            execute,
        });
    }
    Models { dir, served }
});

/// One exact-precision key set for the tests that do not test key placement.
pub static SESSION_KEYS: LazyLock<Arc<SessionKeys>> =
    LazyLock::new(|| Arc::new(SessionKeys::generate(&[Precision::Exact].into(), &Silent)));

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Download `name`'s client tree from the server, load it and open a session.
pub async fn connect(
    url: &str,
    name: &str,
    keys: Arc<SessionKeys>,
) -> (tempfile::TempDir, HybridModel, RemoteSession) {
    let client = Client::new(url, API_KEY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    client.download_model(name, dir.path()).await.unwrap();
    let model = HybridModel::load(dir.path()).unwrap();
    let session = client
        .open_session_with(model.compiled(), keys)
        .await
        .unwrap();
    (dir, model, session)
}

/// Remote forward of every served model equals the owner's execute and simulate, bit for bit.
async fn assert_remote_is_exact(url: &str) {
    for m in &MODELS.served {
        let (_dir, model, session) = connect(url, m.name, SESSION_KEYS.clone()).await;
        let (y, stats) = model
            .forward_remote(m.input.clone(), &session)
            .await
            .unwrap();
        assert_eq!(
            bits(&values(&y)),
            bits(&m.simulate),
            "{}: remote vs simulate",
            m.name
        );
        assert_eq!(
            bits(&m.execute),
            bits(&m.simulate),
            "{}: execute vs simulate",
            m.name
        );
        assert!(stats.requests >= 1 && stats.upload_bytes > 0 && stats.download_bytes > 0);
        session.close().await.unwrap();
    }
}

/// `clients` threads, each with its own client and session (and, with `fresh_keys`, its own
/// keys, as separate users would have), all correct.
fn concurrent_clients(url: &str, clients: usize, forwards: usize, fresh_keys: bool) {
    let m = &MODELS.served[1];
    std::thread::scope(|scope| {
        for _ in 0..clients {
            scope.spawn(|| {
                let keys = if fresh_keys {
                    Arc::new(SessionKeys::generate(&[Precision::Exact].into(), &Silent))
                } else {
                    SESSION_KEYS.clone()
                };
                hyfhe::client::block_on(async {
                    let (_dir, model, session) = connect(url, m.name, keys).await;
                    for _ in 0..forwards {
                        let (y, _) = model
                            .forward_remote(m.input.clone(), &session)
                            .await
                            .unwrap();
                        assert_eq!(bits(&values(&y)), bits(&m.simulate));
                    }
                })
            });
        }
    });
}

#[test]
fn remote_forward_is_bit_identical_to_execute_and_simulate_over_redis_with_two_workers() {
    let _serial = serial();
    hyfhe::client::block_on(async {
        let config_dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::redis(&MODELS.dir, &config_file(config_dir.path()), 2, &[]);
        assert_remote_is_exact(cluster.url()).await;
        // Sessions spread over shards, shards over both workers; each request evaluated once.
        let urls: Vec<&str> = cluster.workers.iter().map(|w| w.url.as_str()).collect();
        let total = settled_count(&urls, "hyfhe_worker_jobs_done_total", 7.0);
        let done: Vec<f64> = urls
            .iter()
            .map(|url| metric(url, "hyfhe_worker_jobs_done_total"))
            .collect();
        assert_eq!(total, 7.0, "1 + 3 + 3 module requests: {done:?}");
    })
}

#[test]
fn sixteen_concurrent_clients_with_their_own_sessions_all_get_correct_results() {
    let _serial = serial();
    let config_dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::redis(&MODELS.dir, &config_file(config_dir.path()), 2, &[]);
    concurrent_clients(cluster.url(), 16, 2, true);
    let sessions = metric(
        cluster.metrics_url(),
        "hyfhe_coordinator_sessions_created_total",
    );
    assert_eq!(sessions, 16.0);
    let ok = metric(cluster.metrics_url(), "hyfhe_coordinator_compute_ok_total");
    assert_eq!(ok, 16.0 * 2.0 * 3.0, "16 clients × 2 forwards × 3 modules");
}

#[test]
fn a_sessions_keys_are_loaded_by_one_worker_only() {
    let _serial = serial();
    let config_dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::redis(&MODELS.dir, &config_file(config_dir.path()), 2, &[]);
    let m = &MODELS.served[2];
    let sessions = 3;
    hyfhe::client::block_on(async {
        for _ in 0..sessions {
            // Fresh keys per session: each is its own key in the workers' caches.
            let keys = Arc::new(SessionKeys::generate(&[Precision::Exact].into(), &Silent));
            let (_dir, model, session) = connect(cluster.url(), m.name, keys).await;
            for _ in 0..3 {
                let (y, _) = model
                    .forward_remote(m.input.clone(), &session)
                    .await
                    .unwrap();
                assert_eq!(bits(&values(&y)), bits(&m.simulate));
            }
        }
    });
    let per_worker = |name: &str| -> Vec<f64> {
        cluster
            .workers
            .iter()
            .map(|w| metric(&w.url, name))
            .collect()
    };
    let loads = per_worker("hyfhe_worker_key_loads_total");
    let received = per_worker("hyfhe_worker_jobs_received_total");
    let hits = per_worker("hyfhe_worker_key_cache_hits_total");
    eprintln!("key loads {loads:?}, jobs {received:?}, hits {hits:?}");
    // 3 sessions × 3 forwards × 3 modules = 27 jobs. Without affinity nearly every session's key
    // would be loaded by both workers (6 loads).
    assert_eq!(received.iter().sum::<f64>(), 27.0);
    assert_eq!(
        loads.iter().sum::<f64>(),
        sessions as f64,
        "each key loaded once, by one worker"
    );
    assert_eq!(hits.iter().sum::<f64>(), 27.0 - sessions as f64);
}

#[test]
fn a_worker_killed_with_sigkill_mid_load_loses_no_request() {
    let _serial = serial();
    let config_dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::redis(
        &MODELS.dir,
        &config_file(config_dir.path()),
        2,
        &[("WORKER__MAX_PENDING", "2")],
    );
    let m = &MODELS.served[2];
    let url = cluster.url().to_string();
    let worker_urls: Vec<String> = cluster.workers.iter().map(|w| w.url.clone()).collect();
    let mut survivor = None;
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..6)
            .map(|_| {
                scope.spawn(|| {
                    hyfhe::client::block_on(async {
                        let (_dir, model, session) =
                            connect(&url, m.name, SESSION_KEYS.clone()).await;
                        for _ in 0..4 {
                            let (y, _) = model
                                .forward_remote(m.input.clone(), &session)
                                .await
                                .unwrap();
                            assert_eq!(bits(&values(&y)), bits(&m.simulate));
                        }
                    })
                })
            })
            .collect();
        // Kill whichever worker is first seen holding a job it has not finished.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let victim = loop {
            let busy = worker_urls
                .iter()
                .position(|u| metric(u, "hyfhe_worker_jobs_in_progress") >= 1.0);
            if let Some(i) = busy {
                break i;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no worker ever got a job"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        cluster.workers[victim].kill();
        survivor = Some(worker_urls[1 - victim].clone());
        for c in clients {
            c.join().unwrap();
        }
    });
    let survivor = survivor.unwrap();
    assert_eq!(
        metric(&survivor, "hyfhe_worker_shards_owned"),
        8.0,
        "took every shard"
    );
    assert!(
        metric(&survivor, "hyfhe_worker_jobs_claimed_total") >= 1.0,
        "claimed the victim's entries"
    );
    assert_eq!(
        metric(&survivor, "hyfhe_worker_jobs_dead_lettered_total"),
        0.0
    );
    assert_eq!(
        metric(
            cluster.metrics_url(),
            "hyfhe_coordinator_compute_errors_total"
        ),
        0.0
    );
}

#[test]
fn a_worker_stopped_with_sigterm_hands_its_shards_over_at_once() {
    let _serial = serial();
    let config_dir = tempfile::tempdir().unwrap();
    // Leases that would take 20 s to lapse: only an explicit hand-over is quick.
    let mut cluster = Cluster::redis(
        &MODELS.dir,
        &config_file(config_dir.path()),
        2,
        &[("QUEUE__LEASE_TTL_MS", "20000")],
    );
    let started = std::time::Instant::now();
    let status = cluster.workers[0].terminate();
    assert!(status.success(), "clean exit: {status}");
    let survivor = cluster.workers[1].url.clone();
    while metric(&survivor, "hyfhe_worker_shards_owned") < 8.0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "shards not handed over"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And the cluster still serves.
    hyfhe::client::block_on(async {
        let fc = &MODELS.served[0];
        let (_dir, model, session) = connect(cluster.url(), fc.name, SESSION_KEYS.clone()).await;
        let (y, _) = model
            .forward_remote(fc.input.clone(), &session)
            .await
            .unwrap();
        assert_eq!(bits(&values(&y)), bits(&fc.simulate));
    });
}

#[test]
fn the_shard_count_grows_as_workers_join_a_running_cluster_and_every_answer_stays_exact() {
    let _serial = serial();
    let config_dir = tempfile::tempdir().unwrap();
    // Two shards for one worker; a cluster of three workers wants eight (2 × 3 → 8).
    let mut cluster = Cluster::redis(
        &MODELS.dir,
        &config_file(config_dir.path()),
        1,
        &[("QUEUE__SHARDS", "2"), ("QUEUE__MAX_SHARDS", "64")],
    );
    assert_eq!(metric(cluster.metrics_url(), "hyfhe_queue_shards"), 2.0);
    concurrent_clients(cluster.url(), 4, 1, false);
    cluster.add_worker();
    // Two workers: 2 × 2 → 4 shards.
    assert_eq!(metric(cluster.metrics_url(), "hyfhe_queue_shards"), 4.0);
    cluster.add_worker();
    assert_eq!(metric(cluster.metrics_url(), "hyfhe_queue_shards"), 8.0);
    let owned: Vec<f64> = cluster
        .workers
        .iter()
        .map(|w| metric(&w.url, "hyfhe_worker_shards_owned"))
        .collect();
    assert_eq!(owned.iter().sum::<f64>(), 8.0, "{owned:?}");
    // Sessions opened after the growth are routed over eight shards and served bit-exact.
    concurrent_clients(cluster.url(), 4, 1, false);
    let urls: Vec<&str> = cluster.workers.iter().map(|w| w.url.as_str()).collect();
    assert_eq!(
        settled_count(&urls, "hyfhe_worker_jobs_done_total", 8.0 * 3.0),
        8.0 * 3.0
    );
}

/// Raw HTTP for the error cases.
pub struct Api {
    pub http: reqwest::Client,
    pub url: String,
}

impl Api {
    pub async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> (u16, serde_json::Value, Option<String>) {
        let _ = &self.http;
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let body = r.bytes().await.unwrap();
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status, json, retry)
    }

    pub fn post(&self, path: &str, key: Option<&str>) -> reqwest::RequestBuilder {
        let r = self.http.post(format!("{}{path}", self.url));
        match key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }
}

pub fn code(v: &serde_json::Value) -> &str {
    v["code"].as_str().unwrap_or("<none>")
}

/// Every refusal the API promises, each with its code, and the server healthy afterwards.
async fn assert_bad_requests_are_refused(url: &str) {
    // This test's own HTTP client may be the process's first (nextest runs each test alone).
    hyfhe::tls::install_provider();
    let api = Api {
        http: reqwest::Client::new(),
        url: url.to_string(),
    };
    let fc = &MODELS.served[0];
    let (_dir, model, session) = connect(url, fc.name, SESSION_KEYS.clone()).await;
    let spec = &model.specs()["seq.0"];
    let rows = encrypted_zero_row(&model);
    let compute = |id: &str, module: &str| format!("/v1/sessions/{id}/modules/{module}/compute");
    let sid = session.id();
    let token = session.token();
    let good = |req: reqwest::RequestBuilder| {
        req.header("x-hyfhe-session-token", token.clone())
            .header("idempotency-key", uuid_like())
            .header("content-type", "application/msgpack")
    };

    // 401: no key, unknown key.
    let (s, b, _) = api
        .send(good(api.post(&compute(&sid, "seq.0"), None)).body(rows.clone()))
        .await;
    assert_eq!((s, code(&b)), (401, "unauthorized"), "{b}");
    let (s, b, _) = api
        .send(good(api.post(&compute(&sid, "seq.0"), Some("nope"))).body(rows.clone()))
        .await;
    assert_eq!((s, code(&b)), (401, "unauthorized"), "{b}");
    // Another tenant's session is answered exactly as a session that does not exist (a 403
    // would confirm a guessed id); a wrong session token of one's own session is a 403.
    let (s, theirs, _) = api
        .send(good(api.post(&compute(&sid, "seq.0"), Some("other-key"))).body(rows.clone()))
        .await;
    assert_eq!((s, code(&theirs)), (404, "session_not_found"), "{theirs}");
    let absent = "0123456789abcdef0123456789abcdef";
    let (_, missing, _) = api
        .send(good(api.post(&compute(absent, "seq.0"), Some("other-key"))).body(rows.clone()))
        .await;
    assert_eq!(
        theirs["message"].as_str().unwrap().replace(&sid, "ID"),
        missing["message"].as_str().unwrap().replace(absent, "ID"),
        "the same words for both"
    );
    let (s, b, _) = api
        .send(
            api.post(&compute(&sid, "seq.0"), Some(API_KEY))
                .header("x-hyfhe-session-token", "wrong")
                .header("idempotency-key", uuid_like())
                .body(rows.clone()),
        )
        .await;
    assert_eq!((s, code(&b)), (403, "forbidden"), "{b}");
    // 404: unknown session, unknown module, unknown model, unknown route.
    let (s, b, _) = api
        .send(
            good(api.post(&compute("0123456789abcdef", "seq.0"), Some(API_KEY))).body(rows.clone()),
        )
        .await;
    assert_eq!((s, code(&b)), (404, "session_not_found"), "{b}");
    let (s, b, _) = api
        .send(good(api.post(&compute(&sid, "seq.9"), Some(API_KEY))).body(rows.clone()))
        .await;
    assert_eq!((s, code(&b)), (404, "not_found"), "{b}");
    assert!(
        b["message"].as_str().unwrap().contains("seq.0"),
        "names the modules there are: {b}"
    );
    let (s, b, _) = api.send(api.post("/v1/nowhere", Some(API_KEY))).await;
    assert_eq!((s, code(&b)), (404, "not_found"), "{b}");
    // 400: malformed msgpack (compute and session), wrong ciphertext dimensions, no job id.
    let (s, b, _) = api
        .send(good(api.post(&compute(&sid, "seq.0"), Some(API_KEY))).body(vec![0xc1, 0x00, 0x13]))
        .await;
    assert_eq!((s, code(&b)), (400, "bad_request"), "{b}");
    let (s, b, _) = api
        .send(
            api.post("/v1/sessions", Some(API_KEY))
                .body(vec![0x93, 0xc1]),
        )
        .await;
    assert_eq!((s, code(&b)), (400, "bad_request"), "{b}");
    let wider = LayerPlan::new(
        "x",
        Precision::Exact,
        spec.in_features + 3,
        spec.out_features,
        spec.plan.input_bits,
        spec.plan.weight_bits,
    )
    .unwrap();
    let wrong = encode(
        &SESSION_KEYS
            .client_key()
            .encrypt_rows(&wider, &vec![1; wider.in_features], 1)
            .unwrap(),
    );
    let (s, b, _) = api
        .send(good(api.post(&compute(&sid, "seq.0"), Some(API_KEY))).body(wrong))
        .await;
    assert_eq!((s, code(&b)), (400, "bad_request"), "{b}");
    assert!(b["message"].as_str().unwrap().contains("features"), "{b}");
    let (s, b, _) = api
        .send(
            api.post(&compute(&sid, "seq.0"), Some(API_KEY))
                .header("x-hyfhe-session-token", token.clone())
                .body(rows.clone()),
        )
        .await;
    assert_eq!((s, code(&b)), (400, "bad_request"), "{b}");
    // 413: a body over coordinator.max_body_bytes (1 MiB in these tests).
    let (s, b, _) = api
        .send(good(api.post(&compute(&sid, "seq.0"), Some(API_KEY))).body(vec![0u8; 2 << 20]))
        .await;
    assert_eq!((s, code(&b)), (413, "payload_too_large"), "{b}");

    // Still healthy, and the session still computes.
    assert_eq!(http_get(&format!("{url}/health/live")).0, 200);
    assert_eq!(http_get(&format!("{url}/health/ready")).0, 200);
    let (y, _) = model
        .forward_remote(fc.input.clone(), &session)
        .await
        .unwrap();
    assert_eq!(bits(&values(&y)), bits(&fc.simulate));
}

/// One encrypted all-zero row for FCSmall's `seq.0`, as a compute body.
pub fn encrypted_zero_row(model: &HybridModel) -> Vec<u8> {
    let spec = &model.specs()["seq.0"];
    let rows = SESSION_KEYS
        .client_key()
        .encrypt_rows(&spec.plan, &vec![0; spec.in_features], 1)
        .unwrap();
    encode(&rows)
}

pub fn uuid_like() -> String {
    format!("test-{:016x}", rand::random::<u64>())
}

#[test]
fn bad_requests_get_their_4xx_code_and_the_server_stays_healthy() {
    let _serial = serial();
    hyfhe::client::block_on(async {
        let config_dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::redis(
            &MODELS.dir,
            &config_file(config_dir.path()),
            2,
            &[("COORDINATOR__MAX_BODY_BYTES", "1048576")],
        );
        assert_bad_requests_are_refused(cluster.url()).await;
    })
}

/// A coordinator over a fresh Redis with no worker (nothing drains the queue), with `extra`
/// config overrides; the Redis server and config folder live as long as the caller keeps them.
fn coordinator_without_workers(
    extra: &[(&str, &str)],
) -> (crate::cluster::RedisServer, tempfile::TempDir, Service) {
    let redis = crate::cluster::RedisServer::start();
    let config_dir = tempfile::tempdir().unwrap();
    let mut env = crate::cluster::base_env(&MODELS.dir);
    let url = redis.url();
    let mut pairs = vec![
        ("QUEUE__BACKEND", "redis"),
        ("QUEUE__REDIS_URL", url.as_str()),
    ];
    pairs.extend_from_slice(extra);
    env.extend(crate::cluster::env(&pairs));
    let config = config_file(config_dir.path());
    let coordinator = Service::spawn(
        "coordinator",
        &["coordinator", "--config", config.to_str().unwrap()],
        &env,
    );
    (redis, config_dir, coordinator)
}

#[test]
fn a_full_queue_or_too_many_in_flight_requests_get_503_or_429_with_retry_after() {
    let _serial = serial();
    hyfhe::client::block_on(async {
        // A coordinator with no worker: nothing drains the queue.
        let (_redis, _config_dir, coordinator) = coordinator_without_workers(&[
            ("COORDINATOR__MAX_IN_FLIGHT", "1"),
            ("COORDINATOR__REQUEST_TIMEOUT_MS", "3000"),
            ("COORDINATOR__RETRY_AFTER_S", "2"),
            ("QUEUE__MAX_DEPTH", "1"),
        ]);
        let url = coordinator.url.clone();
        assert_eq!(
            http_get(&format!("{url}/health/ready")).0,
            503,
            "no worker: not ready"
        );

        let fc = &MODELS.served[0];
        let (_dir, model, session) = connect(&url, fc.name, SESSION_KEYS.clone()).await;
        let api = Api {
            http: reqwest::Client::new(),
            url: url.clone(),
        };
        let rows = encrypted_zero_row(&model);
        let path = format!("/v1/sessions/{}/modules/seq.0/compute", session.id());
        let request = || {
            api.post(&path, Some(API_KEY))
                .header("x-hyfhe-session-token", session.token())
                .header("idempotency-key", uuid_like())
                .body(rows.clone())
        };
        // The first request is admitted and waits in the queue; the second finds no room in flight.
        let first = tokio::spawn(request().send());
        let admitted = std::time::Instant::now();
        while metric(&coordinator.metrics_url, "hyfhe_coordinator_in_flight") < 1.0 {
            assert!(
                admitted.elapsed() < Duration::from_secs(30),
                "first request never admitted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (s, b, retry) = api.send(request()).await;
        assert_eq!((s, code(&b)), (429, "too_many_requests"), "{b}");
        assert_eq!(retry.as_deref(), Some("2"));
        // The first times out (its job is still queued), leaving the shard at its cap.
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.status().as_u16(), 504);
        let (s, b, retry) = api.send(request()).await;
        assert_eq!((s, code(&b)), (503, "unavailable"), "{b}");
        assert!(b["message"].as_str().unwrap().contains("queue full"), "{b}");
        assert_eq!(retry.as_deref(), Some("2"));
        assert_eq!(http_get(&format!("{url}/health/live")).0, 200);
        // The client library retries 429/503 with the same job id and then reports the refusal.
        let quick = session.with_retry(hyfhe::client::RetryPolicy {
            attempts: 2,
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            request_timeout: Duration::from_secs(10),
        });
        let err = quick
            .compute_bytes("seq.0", rows.clone())
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Api { status: 503, .. }), "{err}");
    })
}

#[test]
fn a_job_the_queue_lost_is_answered_503_at_once_not_at_the_deadline() {
    let _serial = serial();
    hyfhe::client::block_on(async {
        // No worker, a long deadline: the request waits on its queued job until Redis loses it
        // (FLUSHALL: what a restart without persistence does).
        let (redis, _config_dir, coordinator) =
            coordinator_without_workers(&[("COORDINATOR__REQUEST_TIMEOUT_MS", "60000")]);
        let url = coordinator.url.clone();
        let fc = &MODELS.served[0];
        let (_dir, model, session) = connect(&url, fc.name, SESSION_KEYS.clone()).await;
        let api = Api {
            http: reqwest::Client::new(),
            url: url.clone(),
        };
        let path = format!("/v1/sessions/{}/modules/seq.0/compute", session.id());
        let waiting = tokio::spawn(
            api.post(&path, Some(API_KEY))
                .header("x-hyfhe-session-token", session.token())
                .header("idempotency-key", uuid_like())
                .body(encrypted_zero_row(&model))
                .send(),
        );
        // Admission comes before the body is read and the job begun: wait for the job's marker.
        let admitted = std::time::Instant::now();
        loop {
            let scan = std::process::Command::new("redis-cli")
                .args(["-u", &redis.url(), "--scan", "--pattern", "hyfhe:running:*"])
                .output()
                .unwrap();
            if !scan.stdout.is_empty() {
                break;
            }
            assert!(
                admitted.elapsed() < Duration::from_secs(30),
                "job never begun"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let flushed = std::process::Command::new("redis-cli")
            .args(["-u", &redis.url(), "FLUSHALL"])
            .output()
            .unwrap();
        assert!(flushed.status.success(), "{flushed:?}");
        let lost_at = std::time::Instant::now();
        let answer = waiting.await.unwrap().unwrap();
        let waited = lost_at.elapsed();
        assert_eq!(answer.status().as_u16(), 503);
        assert!(answer.headers().contains_key("retry-after"));
        let body: serde_json::Value =
            serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap();
        assert_eq!(code(&body), "unavailable", "{body}");
        assert!(body["message"].as_str().unwrap().contains("lost"), "{body}");
        // Found at the next re-check (2 s), far from the 60 s deadline.
        assert!(
            waited < Duration::from_secs(10),
            "answered after {waited:?}"
        );
    })
}

#[test]
fn the_embedded_server_passes_the_same_end_to_end_test_without_redis() {
    let _serial = serial();
    hyfhe::client::block_on(async {
        let config_dir = tempfile::tempdir().unwrap();
        let config = config_file(config_dir.path());
        let cluster = Cluster::embedded(&MODELS.dir, &config);
        let url = cluster.url().to_string();
        assert_eq!(http_get(&format!("{url}/health/ready")).0, 200);
        // Four clients with one key set hit a fresh worker at once: their misses share a load.
        let clients_url = url.clone();
        tokio::task::spawn_blocking(move || concurrent_clients(&clients_url, 4, 1, false))
            .await
            .unwrap();
        assert_remote_is_exact(&url).await;
        let misses = metric(cluster.metrics_url(), "hyfhe_worker_key_cache_misses_total");
        eprintln!("key cache misses of the first, concurrent requests: {misses}");
        assert_eq!(
            metric(cluster.metrics_url(), "hyfhe_worker_key_loads_total"),
            1.0,
            "one key, loaded once however many requests missed"
        );
    })
}

#[test]
fn the_embedded_server_refuses_bad_requests_with_their_codes() {
    let _serial = serial();
    hyfhe::client::block_on(async {
        let config_dir = tempfile::tempdir().unwrap();
        let config = config_file(config_dir.path());
        let serve = crate::cluster::serve(
            &MODELS.dir,
            &config,
            &[("COORDINATOR__MAX_BODY_BYTES", "1048576")],
        );
        assert_bad_requests_are_refused(&serve.url).await;
    })
}

#[test]
fn an_expired_session_is_renewed_once_with_the_same_keys_for_all_the_requests_in_flight() {
    let _serial = serial();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_file(config_dir.path());
    let serve = crate::cluster::serve(&MODELS.dir, &config, &[("SESSIONS__TTL_S", "2")]);
    hyfhe::client::block_on(async {
        let fc = &MODELS.served[0];
        let (_dir, model, session) = connect(&serve.url, fc.name, SESSION_KEYS.clone()).await;
        let before = session.id();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        // Six forwards in flight when they learn the session is gone: one new session (one key
        // upload) serves them all, rather than one each (which would also spend the tenant's
        // session creations and be refused 429 past `max_session_creations`).
        let forwards = (0..6).map(|_| model.forward_remote(fc.input.clone(), &session));
        for result in futures::future::join_all(forwards).await {
            let (y, _) = result.unwrap();
            assert_eq!(bits(&values(&y)), bits(&fc.simulate));
        }
        assert_ne!(session.id(), before, "renewed");
    });
    assert_eq!(
        metric(
            &serve.metrics_url,
            "hyfhe_coordinator_sessions_created_total"
        ),
        2.0
    );
}

#[test]
fn a_session_whose_key_blob_the_store_lost_is_renewed_by_the_client_with_the_same_keys() {
    let _serial = serial();
    let config_dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::redis(&MODELS.dir, &config_file(config_dir.path()), 1, &[]);
    hyfhe::client::block_on(async {
        let fc = &MODELS.served[0];
        let (_dir, model, session) = connect(cluster.url(), fc.name, SESSION_KEYS.clone()).await;
        let before = session.id();
        // What a failover between the session record and its blob leaves (the record is
        // written first): the session is there, its key is not.
        let port = cluster.redis_server().port();
        let blobs = crate::cluster::redis_cli(port, &["--scan", "--pattern", "hyfhe:key:*"]);
        let blobs: Vec<&str> = blobs.lines().collect();
        assert_eq!(blobs.len(), 1, "{blobs:?}");
        crate::cluster::redis_cli(port, &["DEL", blobs[0]]);
        let (y, _) = model
            .forward_remote(fc.input.clone(), &session)
            .await
            .unwrap();
        assert_eq!(bits(&values(&y)), bits(&fc.simulate));
        assert_ne!(session.id(), before, "renewed");
        // The session without its key was deleted (it no longer counts against the quota),
        // and the job that found no key was not billed: one forward, one module, one job.
        let sessions = crate::cluster::redis_cli(port, &["--scan", "--pattern", "hyfhe:session:*"]);
        assert_eq!(sessions.lines().count(), 1, "{sessions}");
        let bills = crate::cluster::redis_cli(port, &["--scan", "--pattern", "hyfhe:bill:*"]);
        let bill = crate::cluster::redis_cli(port, &["HGET", bills.trim(), "jobs"]);
        assert_eq!(bill.trim(), "1", "FCSmall has one remote module: {bills}");
    });
    assert_eq!(
        metric(
            cluster.metrics_url(),
            "hyfhe_coordinator_sessions_created_total"
        ),
        2.0
    );
}

#[test]
fn the_key_cache_evicts_least_recently_used_keys_to_stay_under_its_byte_bound() {
    let _serial = serial();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_file(config_dir.path());
    // 256 MiB: less than one exact key (576 MiB), so each new key evicts the previous one.
    let serve = crate::cluster::serve(
        &MODELS.dir,
        &config,
        &[("WORKER__KEY_CACHE_BYTES", "268435456")],
    );
    let fc = &MODELS.served[0];
    hyfhe::client::block_on(async {
        let other = Arc::new(SessionKeys::generate(&[Precision::Exact].into(), &Silent));
        let (_d1, model, a) = connect(&serve.url, fc.name, SESSION_KEYS.clone()).await;
        let (_d2, _, b) = connect(&serve.url, fc.name, other).await;
        for session in [&a, &b, &a] {
            let (y, _) = model
                .forward_remote(fc.input.clone(), session)
                .await
                .unwrap();
            assert_eq!(bits(&values(&y)), bits(&fc.simulate));
        }
    });
    assert_eq!(
        metric(&serve.metrics_url, "hyfhe_worker_key_loads_total"),
        3.0
    );
    assert_eq!(
        metric(&serve.metrics_url, "hyfhe_worker_key_cache_evictions_total"),
        2.0
    );
    let bytes = metric(&serve.metrics_url, "hyfhe_worker_key_cache_bytes");
    assert!(
        bytes > 0.0 && bytes < 2.0 * 576.0 * 1024.0 * 1024.0,
        "one key held: {bytes}"
    );
}

#[test]
fn hyfhe_run_in_remote_mode_matches_simulate_and_the_demo_classifies_digits() {
    let _serial = serial();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_file(config_dir.path());
    let cluster = Cluster::embedded(&MODELS.dir, &config);
    let dir = MODELS.dir.join("fc_small");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hyfhe"))
        .args([
            "run",
            dir.to_str().unwrap(),
            "--mode",
            "remote",
            "--compare",
            "simulate",
            "--json",
        ])
        .args(["--input", fixture("fc_small_input.npy").to_str().unwrap()])
        .args(["--server", cluster.url()])
        .env("HYFHE_API_KEY", API_KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["mode"], "remote");
    assert_eq!(report["reference"]["bit_identical"], true, "{report}");
    assert!(report["stats"]["upload_bytes"].as_u64().unwrap() > 0);
    // Without a key the server's refusal is reported, not a panic.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hyfhe"))
        .args([
            "run",
            dir.to_str().unwrap(),
            "--mode",
            "remote",
            "--server",
            cluster.url(),
        ])
        .args(["--input", fixture("fc_small_input.npy").to_str().unwrap()])
        .env_remove("HYFHE_API_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("API key"),
        "{stderr}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hyfhe"))
        .args(["demo", "--images", "4", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["images"], 4);
    assert!(report["accuracy"].as_f64().unwrap() >= 0.5, "{report}");
    assert_eq!(
        report["stats_per_image"]["requests"], 3,
        "three remote modules per image"
    );
}

/// A lean session (`KeyProfile::Lean`: the automorphism keys alone) over real HTTP to
/// `hyfhe serve`: about a MiB uploaded instead of ~107, single digits of MiB in the worker's key
/// cache, every linear module's forward bit-identical to simulate (auto and slot requests), and a
/// model with activations inside refused before anything is uploaded.
#[test]
fn a_lean_session_uploads_a_mebibyte_holds_a_few_in_the_worker_and_stays_exact() {
    let _serial = serial();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_file(config_dir.path());
    let serve = crate::cluster::serve(&MODELS.dir, &config, &[]);
    hyfhe::client::block_on(async {
        let client = Client::new(&serve.url, API_KEY).unwrap();
        let mut lean = 0usize;
        for m in &MODELS.served {
            let dir = tempfile::tempdir().unwrap();
            client.download_model(m.name, dir.path()).await.unwrap();
            let model = HybridModel::load(dir.path()).unwrap();
            let opened = client
                .open_session_as(model.compiled(), KeyProfile::Lean, &Silent)
                .await;
            if SessionKeys::needs_bootstrap(model.compiled()) {
                let err = opened
                    .err()
                    .expect("a lean key for activations")
                    .to_string();
                assert!(err.contains("linear modules only"), "{err}");
                continue;
            }
            let session = opened.unwrap();
            let uploaded = session.uploaded_key_bytes();
            assert!(uploaded < 2 << 20, "{}: {uploaded} bytes uploaded", m.name);
            let (y, _) = model
                .forward_remote(m.input.clone(), &session)
                .await
                .unwrap();
            assert_eq!(bits(&values(&y)), bits(&m.simulate), "{}: lean", m.name);
            // This server has only ever held this test's lean keys.
            lean += 1;
            let held = metric(&serve.metrics_url, "hyfhe_worker_key_cache_bytes");
            eprintln!(
                "{}: lean key {uploaded} bytes uploaded; the worker holds {held} bytes of keys \
                 for {lean} lean sessions",
                m.name
            );
            assert!(
                held > 0.0 && held <= (lean * (16 << 20)) as f64,
                "{}: {held}",
                m.name
            );
            session.close().await.unwrap();
        }
    });
}
