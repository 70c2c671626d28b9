//! The served path under ordinary misuse and faults: idempotency keys reused where they mean
//! nothing, retries of running jobs, a partitioned worker, requests above the job budget, tenant
//! quotas and metering. Real coordinator and worker processes, a real redis-server.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyfhe::client::{Client, RemoteSession};
use hyfhe::fhe::{decode, encode, EncryptedOutputs, EncryptedRows};
use hyfhe::hybrid::{BoxFuture, HybridError, HybridModel, Mode, Remote};

use crate::cluster::{
    base_env, config_file, env, http_get, metric, serial, serve, settled_count, wait_ready,
    Cluster, RedisServer, Service,
};
use crate::hybrid::values;
use crate::serving::{
    bits, code, connect, encrypted_zero_row, uuid_like, Api, API_KEY, MODELS, SESSION_KEYS,
};

/// A [`Remote`] that sends every request of a forward under one fixed idempotency key, as a
/// careless client (or one that derives keys from a request counter it resets) would.
struct FixedKey<'a> {
    session: &'a RemoteSession,
    key: &'a str,
}

impl Remote for FixedKey<'_> {
    fn client_key(&self) -> &hyfhe::fhe::ClientKey {
        self.session.client_key()
    }

    fn compute<'a>(
        &'a self,
        module: &'a str,
        request: EncryptedRows,
    ) -> BoxFuture<'a, Result<EncryptedOutputs, HybridError>> {
        Box::pin(async move {
            let bytes = self
                .session
                .compute_with_job_id(module, encode(&request), self.key)
                .await?;
            Ok(decode(&bytes, usize::MAX)?)
        })
    }
}

#[test]
fn one_idempotency_key_reused_across_modules_sessions_and_tenants_gives_each_its_own_result() {
    let _serial = serial();
    hyfhe::client::block_on(async {
        let config_dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::redis(&MODELS.dir, &config_file(config_dir.path()), 1, &[]);
        let m = &MODELS.served[1]; // digits MLP: three remote modules in one forward
        let (_d1, model, first) = connect(cluster.url(), m.name, SESSION_KEYS.clone()).await;
        let (_d2, _, second) = connect(cluster.url(), m.name, SESSION_KEYS.clone()).await;
        let other_tenant = Client::new(cluster.url(), "other-key").unwrap();
        let third = other_tenant
            .open_session_with(model.compiled(), SESSION_KEYS.clone())
            .await
            .unwrap();
        for session in [&first, &second, &third] {
            let remote = FixedKey {
                session,
                key: "reused-key-0001",
            };
            let (y, stats) = model
                .forward_remote(m.input.clone(), &remote)
                .await
                .unwrap();
            assert_eq!(
                bits(&values(&y)),
                bits(&m.simulate),
                "session {}",
                session.id()
            );
            assert_eq!(stats.requests, 3);
        }
        // Three sessions × three modules: nine distinct jobs, each evaluated.
        let done = settled_count(
            &[&cluster.workers[0].url],
            "hyfhe_worker_jobs_done_total",
            9.0,
        );
        assert_eq!(done, 9.0);

        // The same key, module and session with another body is a conflict, not a stale answer.
        let api = Api {
            http: reqwest::Client::new(),
            url: cluster.url().to_string(),
        };
        let fc = &MODELS.served[0];
        let (_d3, fc_model, session) = connect(cluster.url(), fc.name, SESSION_KEYS.clone()).await;
        let path = format!("/v1/sessions/{}/modules/seq.0/compute", session.id());
        let send = |body: Vec<u8>| {
            api.post(&path, Some(API_KEY))
                .header("x-hyfhe-session-token", session.token())
                .header("idempotency-key", "conflict-key-0001")
                .body(body)
        };
        let body = encrypted_zero_row(&fc_model);
        let (s, _, _) = api.send(send(body.clone())).await;
        assert_eq!(s, 200);
        let (s, _, _) = api.send(send(body)).await;
        assert_eq!(s, 200, "a true retry gets the stored result");
        let (s, b, _) = api.send(send(encrypted_zero_row(&fc_model))).await;
        assert_eq!((s, code(&b)), (409, "idempotency_conflict"), "{b}");
        assert!(
            b["message"].as_str().unwrap().contains("conflict-key-0001"),
            "{b}"
        );
    })
}

#[test]
fn a_retry_of_a_running_job_waits_for_that_run_and_the_job_is_evaluated_once() {
    let _serial = serial();
    hyfhe::client::block_on(async {
        let redis = RedisServer::start();
        let config_dir = tempfile::tempdir().unwrap();
        let config = config_file(config_dir.path());
        let config = config.to_str().unwrap();
        let mut vars = base_env(&MODELS.dir);
        vars.extend(env(&[
            ("QUEUE__BACKEND", "redis"),
            ("QUEUE__REDIS_URL", &redis.url()),
        ]));
        // No worker yet: the first request's job waits in the queue while its retry arrives.
        let coordinator =
            Service::spawn("coordinator", &["coordinator", "--config", config], &vars);
        let fc = &MODELS.served[0];
        let (_dir, model, session) = connect(&coordinator.url, fc.name, SESSION_KEYS.clone()).await;
        let api = Api {
            http: reqwest::Client::new(),
            url: coordinator.url.clone(),
        };
        let path = format!("/v1/sessions/{}/modules/seq.0/compute", session.id());
        let body = encrypted_zero_row(&model);
        let request = || {
            api.post(&path, Some(API_KEY))
                .header("x-hyfhe-session-token", session.token())
                .header("idempotency-key", "retried-key-0001")
                .body(body.clone())
                .send()
        };
        let first = tokio::spawn(request());
        while metric(&coordinator.metrics_url, "hyfhe_coordinator_in_flight") < 1.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let retry = tokio::spawn(request());
        while metric(
            &coordinator.metrics_url,
            "hyfhe_coordinator_retries_joined_total",
        ) < 1.0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The autoscaling signals see the job waiting unread, and aging, with no worker.
        // (The retry joins once `begin` has returned, which may be just before the enqueue.)
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(&coordinator.metrics_url, "hyfhe_queue_lag") < 1.0 {
            assert!(
                Instant::now() < deadline,
                "the waiting job never showed as lag"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(metric(&coordinator.metrics_url, "hyfhe_queue_lag"), 1.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let age = metric(&coordinator.metrics_url, "hyfhe_queue_oldest_age_seconds");
        assert!((0.04..60.0).contains(&age), "oldest age {age} s");
        let worker = Service::spawn("worker", &["worker", "--config", config], &vars);
        let a = first.await.unwrap().unwrap();
        let b = retry.await.unwrap().unwrap();
        assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
        assert_eq!(a.bytes().await.unwrap(), b.bytes().await.unwrap());
        assert_eq!(metric(&worker.url, "hyfhe_worker_jobs_received_total"), 1.0);
        assert_eq!(
            settled_count(&[&worker.url], "hyfhe_worker_jobs_done_total", 1.0),
            1.0
        );
        assert_eq!(metric(&coordinator.metrics_url, "hyfhe_queue_depth"), 0.0);
        assert_eq!(metric(&coordinator.metrics_url, "hyfhe_queue_lag"), 0.0);
        assert_eq!(
            metric(&coordinator.metrics_url, "hyfhe_queue_oldest_age_seconds"),
            0.0
        );
    })
}

/// A TCP proxy to `upstream` that can be made to stop forwarding without closing anything, as a
/// partition that drops packets does. Connections that saw the blackhole stay dead for good
/// (their bytes are discarded, their sockets left open); new ones work once it heals.
struct BlackholeProxy {
    port: u16,
    blackholed: Arc<AtomicBool>,
}

impl BlackholeProxy {
    fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let blackholed = Arc::new(AtomicBool::new(false));
        let flag = blackholed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let dead = Arc::new(AtomicBool::new(flag.load(Ordering::SeqCst)));
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let (flag, dead) = (flag.clone(), dead.clone());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 64 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                return;
                            }
                            if flag.load(Ordering::SeqCst) {
                                dead.store(true, Ordering::SeqCst);
                            }
                            if !dead.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self { port, blackholed }
    }

    fn set_blackholed(&self, on: bool) {
        self.blackholed.store(on, Ordering::SeqCst);
    }
}

#[test]
fn a_worker_whose_redis_link_is_blackholed_recovers_when_it_heals_and_loses_no_job() {
    let _serial = serial();
    let redis = RedisServer::start();
    let redis_port: u16 = redis.url().rsplit(':').next().unwrap().parse().unwrap();
    let proxy = BlackholeProxy::start(redis_port);
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_file(config_dir.path());
    let config = config.to_str().unwrap();
    let mut vars = base_env(&MODELS.dir);
    vars.extend(env(&[
        ("QUEUE__BACKEND", "redis"),
        ("QUEUE__REDIS_URL", &redis.url()),
        ("WORKER__EVALUATOR_THREADS", "1"),
    ]));
    let coordinator = Service::spawn("coordinator", &["coordinator", "--config", config], &vars);
    vars.extend(env(&[(
        "QUEUE__REDIS_URL",
        &format!("redis://127.0.0.1:{}", proxy.port),
    )]));
    let worker = Service::spawn("worker", &["worker", "--config", config], &vars);
    wait_ready(&worker.url);
    let m = &MODELS.served[1];
    hyfhe::client::block_on(async {
        let (_dir, model, session) = connect(&coordinator.url, m.name, SESSION_KEYS.clone()).await;
        // Warm: the worker holds the session's key.
        let (y, _) = model
            .forward_remote(m.input.clone(), &session)
            .await
            .unwrap();
        assert_eq!(bits(&values(&y)), bits(&m.simulate));
        let done_before = settled_count(&[&worker.url], "hyfhe_worker_jobs_done_total", 3.0);
        assert_eq!(done_before, 3.0, "the warm forward's 3 modules, each once");

        proxy.set_blackholed(true);
        let cut = Instant::now();
        let forwards: Vec<_> = (0..2)
            .map(|_| {
                let model = &model;
                let session = &session;
                async move { model.forward_remote(m.input.clone(), session).await }
            })
            .collect();
        let heal = async {
            // Past the lease TTL (4 s) and the blocking read's timeout (0.5 s + slack).
            tokio::time::sleep(Duration::from_secs(8)).await;
            proxy.set_blackholed(false);
        };
        let (results, ()) = futures::join!(futures::future::join_all(forwards), heal);
        for result in results {
            let (y, _) = result.expect("a forward sent during the partition completes");
            assert_eq!(bits(&values(&y)), bits(&m.simulate));
        }
        eprintln!(
            "partition of 8 s: forwards done {:.1} s after the cut",
            cut.elapsed().as_secs_f64()
        );
        let done_after = settled_count(
            &[&worker.url],
            "hyfhe_worker_jobs_done_total",
            done_before + 6.0,
        );
        assert_eq!(
            done_after - done_before,
            6.0,
            "2 forwards × 3 modules, each once"
        );
        // And it keeps serving.
        let (y, _) = model
            .forward_remote(m.input.clone(), &session)
            .await
            .unwrap();
        assert_eq!(bits(&values(&y)), bits(&m.simulate));
    });
    assert_eq!(metric(&worker.url, "hyfhe_worker_shards_owned"), 8.0);
    drop(redis);
}

#[test]
fn a_request_above_the_job_budget_gets_413_and_the_client_splits_its_input_by_the_limit() {
    let _serial = serial();
    let config_dir = tempfile::tempdir().unwrap();
    // 2048 values: 204 rows of FCSmall's 10 outputs.
    let server = serve(
        &MODELS.dir,
        &config_file(config_dir.path()),
        &[("COORDINATOR__MAX_JOB_VALUES", "2048")],
    );
    hyfhe::client::block_on(async {
        let fc = &MODELS.served[0];
        let (_dir, model, session) = connect(&server.url, fc.name, SESSION_KEYS.clone()).await;
        let spec = &model.specs()["seq.0"];
        let rows = 300;
        let big = SESSION_KEYS
            .client_key()
            .encrypt_rows(&spec.plan, &vec![0; rows * spec.in_features], rows)
            .unwrap();
        let api = Api {
            http: reqwest::Client::new(),
            url: server.url.clone(),
        };
        let path = format!("/v1/sessions/{}/modules/seq.0/compute", session.id());
        let (s, b, _) = api
            .send(
                api.post(&path, Some(API_KEY))
                    .header("x-hyfhe-session-token", session.token())
                    .header("idempotency-key", uuid_like())
                    .body(encode(&big)),
            )
            .await;
        assert_eq!((s, code(&b)), (413, "payload_too_large"), "{b}");
        let message = b["message"].as_str().unwrap();
        assert!(
            message.contains("max_job_values of 2048") && message.contains("at most 204 rows"),
            "{message}"
        );

        // The client reads the limit from the model listing and splits: still bit-exact.
        let x: Vec<f32> = values(&fc.input)
            .iter()
            .cycle()
            .take(rows * 10)
            .copied()
            .collect();
        let x = hyfhe::hybrid::tensor(&[rows, 10], &x).unwrap();
        let owner = HybridModel::load(MODELS.dir.join(fc.name)).unwrap();
        let simulate = values(&owner.forward(x.clone(), Mode::Simulate).unwrap().0);
        let (y, stats) = model.forward_remote(x, &session).await.unwrap();
        assert_eq!(bits(&values(&y)), bits(&simulate));
        assert_eq!(stats.requests, 2, "300 rows as 204 + 96");
    });
}

#[test]
fn tenant_quotas_refuse_with_429_and_usage_is_metered_per_tenant_on_its_own_listener() {
    let _serial = serial();
    let config_dir = tempfile::tempdir().unwrap();
    let server = serve(
        &MODELS.dir,
        &config_file(config_dir.path()),
        &[
            ("QUOTAS__SESSIONS", "1"),
            ("COORDINATOR__RETRY_AFTER_S", "3"),
        ],
    );
    hyfhe::client::block_on(async {
        let fc = &MODELS.served[0];
        let (_dir, model, session) = connect(&server.url, fc.name, SESSION_KEYS.clone()).await;
        let client = Client::new(&server.url, API_KEY).unwrap();
        let refused = client
            .open_session_with(model.compiled(), SESSION_KEYS.clone())
            .await
            .err()
            .expect("a second session is over the quota");
        assert_eq!(
            refused.code(),
            Some(hyfhe::protocol::ErrorCode::QuotaExceeded)
        );
        assert!(refused.to_string().contains("quota is 1"), "{refused}");
        // Another tenant has its own quota.
        let other = Client::new(&server.url, "other-key").unwrap();
        let theirs = other
            .open_session_with(model.compiled(), SESSION_KEYS.clone())
            .await
            .unwrap();
        // Usage is metered per tenant.
        let (y, _) = model
            .forward_remote(fc.input.clone(), &session)
            .await
            .unwrap();
        assert_eq!(bits(&values(&y)), bits(&fc.simulate));
        let rows = metric(
            &server.metrics_url,
            "hyfhe_tenant_rows_total{tenant=\"demo\"}",
        );
        assert_eq!(rows, fc.input.shape()[0] as f64);
        assert!(
            metric(
                &server.metrics_url,
                "hyfhe_tenant_fhe_seconds_total{tenant=\"demo\"}"
            ) > 0.0
        );
        assert!(
            metric(
                &server.metrics_url,
                "hyfhe_tenant_bytes_in_total{tenant=\"demo\"}"
            ) > 0.0
        );
        assert_eq!(
            metric(
                &server.metrics_url,
                "hyfhe_tenant_requests_total{tenant=\"other\"}"
            ),
            0.0
        );
        // A closed session frees its place.
        session.close().await.unwrap();
        let again = client
            .open_session_with(model.compiled(), SESSION_KEYS.clone())
            .await
            .unwrap();
        again.close().await.unwrap();
        theirs.close().await.unwrap();
    });
    // /metrics is not on the public API's listener.
    assert_eq!(http_get(&format!("{}/metrics", server.url)).0, 404);
}
