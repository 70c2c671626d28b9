//! The second hardening pass of the served path: waiting without spinning, metering where the
//! evaluation completes, key blobs that go with their sessions, tenants kept apart, row budgets.
//! Real coordinator and worker processes, a real redis-server.

use std::time::{Duration, Instant};

use crate::cluster::{
    base_env, config_file, env, metric, serial, settled_count, RedisServer, Service,
};
use crate::serving::{connect, encrypted_zero_row, Api, API_KEY, MODELS, SESSION_KEYS};

/// A coordinator over a fresh Redis with `extra` overrides, and what a worker needs to join it.
struct Stack {
    _redis: RedisServer,
    redis_url: String,
    _config_dir: tempfile::TempDir,
    config: String,
    vars: Vec<(String, String)>,
    coordinator: Service,
}

impl Stack {
    fn start(extra: &[(&str, &str)]) -> Self {
        Self::with_config(extra, "")
    }

    /// With `more` appended to the test configuration file (extra tenants).
    fn with_config(extra: &[(&str, &str)], more: &str) -> Self {
        let redis = RedisServer::start();
        let config_dir = tempfile::tempdir().unwrap();
        let path = config_file(config_dir.path());
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(more);
        std::fs::write(&path, text).unwrap();
        let config = path.to_str().unwrap().to_string();
        let mut vars = base_env(&MODELS.dir);
        let redis_url = redis.url();
        vars.extend(env(&[
            ("QUEUE__BACKEND", "redis"),
            ("QUEUE__REDIS_URL", &redis_url),
        ]));
        vars.extend(env(extra));
        let coordinator =
            Service::spawn("coordinator", &["coordinator", "--config", &config], &vars);
        Self {
            _redis: redis,
            redis_url,
            _config_dir: config_dir,
            config,
            vars,
            coordinator,
        }
    }

    /// Another coordinator over the same Redis and configuration.
    fn coordinator_service(&self, name: &str) -> Service {
        Service::spawn(name, &["coordinator", "--config", &self.config], &self.vars)
    }

    fn worker(&self) -> Service {
        Service::spawn("worker", &["worker", "--config", &self.config], &self.vars)
    }

    fn redis_cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-u", &self.redis_url])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    }
}

#[test]
fn a_joiner_that_outlives_the_first_requests_deadline_waits_idle_and_gets_the_answer() {
    let _serial = serial();
    hyfhe::client::block_on(async {
        let stack = Stack::start(&[("COORDINATOR__REQUEST_TIMEOUT_MS", "12000")]);
        let url = stack.coordinator.url.clone();
        let metrics = stack.coordinator.metrics_url.clone();
        let fc = &MODELS.served[0];
        let (_dir, model, session) = connect(&url, fc.name, SESSION_KEYS.clone()).await;
        let api = Api {
            http: reqwest::Client::new(),
            url: url.clone(),
        };
        let path = format!("/v1/sessions/{}/modules/seq.0/compute", session.id());
        let body = encrypted_zero_row(&model);
        let request = || {
            api.post(&path, Some(API_KEY))
                .header("x-hyfhe-session-token", session.token())
                .header("idempotency-key", "joined-key-0001")
                .body(body.clone())
                .send()
        };
        // No worker: the first request's job waits in the queue until its deadline.
        let first = tokio::spawn(request());
        while metric(&metrics, "hyfhe_coordinator_in_flight") < 1.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The joiner's deadline is 8 s after the first's: time for a worker to start after it.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let joiner = tokio::spawn(request());
        while metric(&metrics, "hyfhe_coordinator_retries_joined_total") < 1.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.status().as_u16(), 504, "the first request's deadline");
        let checks_at_first_deadline = metric(&metrics, "hyfhe_coordinator_outcome_checks_total");
        let after_first = Instant::now();
        // The joiner is alone now. Its wait must cost a re-check every 2 s, not a loop.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle_checks =
            metric(&metrics, "hyfhe_coordinator_outcome_checks_total") - checks_at_first_deadline;
        assert!(
            idle_checks <= 3.0,
            "the joiner read the outcome {idle_checks} times in 2 s"
        );
        // A worker arrives: the first job was dropped at its deadline (no outcome stored), so
        // the joiner takes the run over and gets the answer under its own deadline.
        let worker = stack.worker();
        let answer = joiner.await.unwrap().unwrap();
        assert_eq!(answer.status().as_u16(), 200, "{:?}", answer.text().await);
        let waited = after_first.elapsed().as_secs_f64();
        let checks =
            metric(&metrics, "hyfhe_coordinator_outcome_checks_total") - checks_at_first_deadline;
        assert!(
            checks <= waited / 2.0 + 4.0,
            "{checks} outcome reads over the joiner's last {waited:.1} s"
        );
        assert_eq!(
            settled_count(&[&worker.url], "hyfhe_worker_jobs_done_total", 1.0),
            1.0
        );
        let _ = stack.redis_cli(&["PING"]);
    })
}

#[test]
fn one_tenants_keys_cannot_push_another_tenants_key_out_of_a_workers_cache() {
    use hyfhe::queue::{MemoryQueue, SessionStore};
    use hyfhe::worker::{GetKey, GetKeyCacheStats, KeyCache, WorkerMetrics};
    use std::sync::Arc;

    let config = hyfhe::config::Config::load(None).unwrap();
    let queue = Arc::new(MemoryQueue::new(config.queue_settings()));
    let blob = SESSION_KEYS.evaluation_key_blobs()[0].clone();
    actix::System::new().block_on(async move {
        use actix::Actor;
        // One real key blob stored under several ids, as several sessions' keys would be.
        for id in ["a1", "a2", "a3", "b1", "probe"] {
            queue.put_key(id, &blob, 600_000).await.unwrap();
        }
        let get = |cache: &actix::Addr<KeyCache>, id: &str, tenant: &str| {
            cache.send(GetKey {
                key_id: id.into(),
                tenant: tenant.into(),
                parent: tracing::Span::none(),
            })
        };
        // How many bytes one transformed key takes.
        let probe =
            KeyCache::new(queue.clone(), u64::MAX, Arc::new(WorkerMetrics::default())).start();
        get(&probe, "probe", "a").await.unwrap().unwrap();
        let one = probe.send(GetKeyCacheStats).await.unwrap().bytes;
        drop(probe);

        // Room for two and a half keys, shared by the tenants holding keys here.
        let metrics = Arc::new(WorkerMetrics::default());
        let cache = KeyCache::new(queue.clone(), one * 5 / 2, metrics.clone()).start();
        get(&cache, "a1", "a").await.unwrap().unwrap();
        get(&cache, "b1", "b").await.unwrap().unwrap();
        // a1 is used again, so b1 is now the least recently used key of the cache.
        get(&cache, "a1", "a").await.unwrap().unwrap();
        for (i, id) in ["a2", "a3"].into_iter().enumerate() {
            get(&cache, id, "a").await.unwrap().unwrap();
            let stats = cache.send(GetKeyCacheStats).await.unwrap();
            assert!(stats.bytes <= stats.capacity_bytes, "{stats:?}");
            assert_eq!(metrics.key_cache_evictions.get(), i as u64 + 1);
            // Tenant a is over its half: it evicted its own key, not b's.
            let loads = metrics.key_loads.get();
            get(&cache, "b1", "b").await.unwrap().unwrap();
            assert_eq!(
                metrics.key_loads.get(),
                loads,
                "b's key stayed cached while a loaded {id}"
            );
        }
    });
}

#[test]
fn closed_sessions_leave_no_key_blob_in_redis_and_a_tenant_sees_only_its_models() {
    let _serial = serial();
    let narrow = format!(
        "\n[[tenants]]\nname = \"narrow\"\napi_key_sha256 = \"{}\"\nmodels = [\"digits_mlp\"]\n",
        hyfhe::config::hash_api_key("narrow-key")
    );
    let stack = Stack::with_config(&[], &narrow);
    hyfhe::client::block_on(async {
        let url = stack.coordinator.url.clone();
        let blobs = || {
            stack
                .redis_cli(&["--scan", "--pattern", "hyfhe:key:*"])
                .lines()
                .count()
        };
        // Three sessions opened and closed, as three `hyfhe run --mode remote` would.
        for _ in 0..3 {
            let (_dir, _model, session) = connect(&url, "fc_small", SESSION_KEYS.clone()).await;
            assert_eq!(blobs(), 1, "the open session's blob");
            session.close().await.unwrap();
            assert_eq!(
                blobs(),
                0,
                "closed: its blob is gone at once, not after the TTL"
            );
        }
        // Two sessions of one tenant with the same keys share one blob until both are closed.
        let (_d1, _m1, one) = connect(&url, "fc_small", SESSION_KEYS.clone()).await;
        let (_d2, _m2, two) = connect(&url, "fc_small", SESSION_KEYS.clone()).await;
        assert_eq!(blobs(), 1);
        one.close().await.unwrap();
        assert_eq!(blobs(), 1, "still used by the second session");
        two.close().await.unwrap();
        assert_eq!(blobs(), 0);

        // A tenant limited to digits_mlp lists only it, and every other model answers as an
        // unknown one does.
        let client = hyfhe::client::Client::new(&url, "narrow-key").unwrap();
        let list = client.models().await.unwrap();
        let names: Vec<&str> = list.models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["digits_mlp"]);
        let dir = tempfile::tempdir().unwrap();
        let refused = client
            .download_model("fc_small", dir.path())
            .await
            .unwrap_err();
        let unknown = client
            .download_model("no_such_model", dir.path())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some(hyfhe::protocol::ErrorCode::NotFound));
        assert_eq!(
            refused.to_string().replace("fc_small", "X"),
            unknown.to_string().replace("no_such_model", "X")
        );
        // Opening a session on it directly (with a client tree from elsewhere) is refused too.
        let (_dir, fc, _session) = connect(&url, "fc_small", SESSION_KEYS.clone()).await;
        let err = client
            .open_session_with(fc.compiled(), SESSION_KEYS.clone())
            .await
            .err()
            .expect("refused");
        assert_eq!(
            err.code(),
            Some(hyfhe::protocol::ErrorCode::NotFound),
            "{err}"
        );
        let (_dir, _model, allowed) = {
            let dir = tempfile::tempdir().unwrap();
            client
                .download_model("digits_mlp", dir.path())
                .await
                .unwrap();
            let model = hyfhe::hybrid::HybridModel::load(dir.path()).unwrap();
            let session = client
                .open_session_with(model.compiled(), SESSION_KEYS.clone())
                .await
                .unwrap();
            (dir, model, session)
        };
        allowed.close().await.unwrap();
    })
}

#[test]
fn work_is_billed_once_where_it_completes_and_row_budgets_hold_over_every_coordinator() {
    let _serial = serial();
    let stack = Stack::start(&[("QUOTAS__ROWS_PER_MODULE", "3")]);
    // A second coordinator on the same store: budgets and bills are the cluster's, not one
    // process's.
    let second = Service::spawn(
        "coordinator-2",
        &["coordinator", "--config", &stack.config],
        &stack.vars,
    );
    hyfhe::client::block_on(async {
        let url = stack.coordinator.url.clone();
        let metrics = stack.coordinator.metrics_url.clone();
        let fc = &MODELS.served[0];
        let (_dir, model, session) = connect(&url, fc.name, SESSION_KEYS.clone()).await;
        let body = encrypted_zero_row(&model);
        let path = format!("/v1/sessions/{}/modules/seq.0/compute", session.id());
        let send = |base: &str, key: &str, timeout: Duration| {
            reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .unwrap()
                .post(format!("{base}{path}"))
                .bearer_auth(API_KEY)
                .header("x-hyfhe-session-token", session.token())
                .header("idempotency-key", key.to_string())
                .body(body.clone())
                .send()
        };
        // Send, then disconnect before any worker exists: the job stays queued.
        let gone = send(&url, "billed-once-0001", Duration::from_millis(500)).await;
        assert!(gone.is_err(), "the client gave up: {gone:?}");
        let worker = stack.worker();
        let started = Instant::now();
        while metric(&worker.url, "hyfhe_worker_jobs_done_total") < 1.0 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "never evaluated"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let rows = |m: &str| metric(m, "hyfhe_tenant_rows_total{tenant=\"demo\"}");
        let jobs = |m: &str| metric(m, "hyfhe_tenant_jobs_total{tenant=\"demo\"}");
        assert_eq!(
            (rows(&metrics), jobs(&metrics)),
            (1.0, 1.0),
            "billed with nobody waiting"
        );
        assert!(metric(&metrics, "hyfhe_tenant_fhe_seconds_total{tenant=\"demo\"}") > 0.0);
        // The retries are answered from the store, on either coordinator, and not billed again.
        for base in [&url, &second.url] {
            let retry = send(base, "billed-once-0001", Duration::from_secs(30))
                .await
                .unwrap();
            assert_eq!(retry.status().as_u16(), 200);
        }
        assert_eq!((rows(&metrics), jobs(&metrics)), (1.0, 1.0));
        assert_eq!(
            rows(&second.metrics_url),
            1.0,
            "the same bill on every coordinator"
        );

        // Row budget: 3 rows per module. One is spent; two more pass, one on each coordinator.
        for (i, base) in [&url, &second.url].into_iter().enumerate() {
            let ok = send(base, &format!("budget-{i:04}"), Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!(ok.status().as_u16(), 200);
        }
        let refused = send(&second.url, "budget-0009", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(refused.status().as_u16(), 429);
        let text = refused.text().await.unwrap();
        assert!(
            text.contains("row_budget_exceeded") && text.contains("3 of its 3 rows"),
            "{text}"
        );
        // The client library takes it as final: no retries, at once.
        let asked = Instant::now();
        let err = session
            .compute_bytes("seq.0", body.clone())
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(hyfhe::protocol::ErrorCode::RowBudgetExceeded),
            "{err}"
        );
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "retried: {:?}",
            asked.elapsed()
        );
        // A retry of a job that ran is still answered (it costs no new rows).
        let stored = send(&url, "billed-once-0001", Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(stored.status().as_u16(), 200);
        assert_eq!(
            metric(
                &second.metrics_url,
                "hyfhe_tenant_row_budget_refusals_total{tenant=\"demo\"}"
            ),
            1.0
        );
        assert_eq!(rows(&metrics), 3.0);
        assert_eq!(
            settled_count(&[&worker.url], "hyfhe_worker_jobs_done_total", 3.0),
            3.0
        );
    })
}

#[test]
fn a_tenants_in_flight_quota_holds_across_coordinators_and_a_dead_ones_slots_expire() {
    let _serial = serial();
    // Quota 1; no worker, so a request holds its slot until its 6 s deadline.
    let stack = Stack::start(&[
        ("QUOTAS__IN_FLIGHT", "1"),
        ("COORDINATOR__REQUEST_TIMEOUT_MS", "6000"),
    ]);
    let mut first = stack.coordinator_service("coordinator-a");
    let second = stack.coordinator_service("coordinator-b");
    hyfhe::client::block_on(async {
        let fc = &MODELS.served[0];
        let (_dir, model, session) =
            connect(&stack.coordinator.url, fc.name, SESSION_KEYS.clone()).await;
        let body = encrypted_zero_row(&model);
        let path = format!("/v1/sessions/{}/modules/seq.0/compute", session.id());
        let send = |url: &str, key: &str| {
            let api = Api {
                http: reqwest::Client::new(),
                url: url.to_string(),
            };
            api.post(&path, Some(API_KEY))
                .header("x-hyfhe-session-token", session.token())
                .header("idempotency-key", key)
                .body(body.clone())
                .send()
        };
        let held = tokio::spawn(send(&first.url, "held-by-a-0001"));
        while metric(&first.metrics_url, "hyfhe_coordinator_in_flight") < 1.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The tenant's one slot is taken on coordinator a: b refuses, naming the quota.
        let refused = send(&second.url, "refused-by-b-0001").await.unwrap();
        assert_eq!(refused.status().as_u16(), 429);
        assert!(refused.headers().contains_key("retry-after"));
        let text = refused.text().await.unwrap();
        assert!(text.contains("across all coordinators"), "{text}");
        // The held request ends at its deadline and gives its slot back (in the background,
        // within moments, long before its lease would end it): b admits the next.
        assert_eq!(held.await.unwrap().unwrap().status().as_u16(), 504);
        let ended = Instant::now();
        let worker = stack.worker();
        while metric(&worker.url, "hyfhe_worker_shards_owned") < 1.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        loop {
            let admitted = send(&second.url, "admitted-by-b-0001").await.unwrap();
            if admitted.status().as_u16() == 429 && ended.elapsed() < Duration::from_secs(3) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            assert_eq!(
                admitted.status().as_u16(),
                200,
                "{:?}",
                admitted.text().await
            );
            break;
        }
        drop(worker);

        // A coordinator killed while holding the slot: its lease (2 × 6 s + 5 s) frees it.
        // b gives its slot back in the background, moments after its answer: a may refuse the
        // first try, so try again (under a new key) until a holds the slot.
        let tried = Instant::now();
        let mut attempt = 2;
        let stuck = loop {
            let stuck = tokio::spawn(send(&first.url, &format!("held-by-a-{attempt:04}")));
            while metric(&first.metrics_url, "hyfhe_coordinator_in_flight") < 1.0
                && !stuck.is_finished()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !stuck.is_finished() {
                break stuck;
            }
            let status = stuck.await.unwrap().unwrap().status().as_u16();
            assert!(
                status == 429 && tried.elapsed() < Duration::from_secs(5),
                "coordinator a never held the slot (last answer {status})"
            );
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let killed = Instant::now();
        first.kill();
        let _ = stuck.await;
        let refused = send(&second.url, "refused-by-b-0002").await.unwrap();
        assert_eq!(
            refused.status().as_u16(),
            429,
            "the dead coordinator's slot is leased"
        );
        let worker = stack.worker();
        while metric(&worker.url, "hyfhe_worker_shards_owned") < 1.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        loop {
            let r = send(&second.url, "after-the-lease-0001").await.unwrap();
            match r.status().as_u16() {
                429 => {
                    assert!(
                        killed.elapsed() < Duration::from_secs(30),
                        "the lease never ended"
                    );
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                status => {
                    assert_eq!(status, 200, "{:?}", r.text().await);
                    break;
                }
            }
        }
        let freed = killed.elapsed();
        eprintln!("a killed coordinator's in-flight slot was free again after {freed:.1?}");
        assert!(freed >= Duration::from_secs(10), "{freed:?}");
        drop(worker);
    })
}
