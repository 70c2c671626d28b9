//! TLS with a CA made in the test. HTTPS between client and coordinator: the coordinator's own TLS
//! listener serves a real forward bit for bit; an untrusted or wrong-host certificate and plain
//! HTTP to a TLS port fail with errors that say so. `rediss://` between coordinator, workers and a
//! TLS-only redis-server, and OTLP traces to an `https://` collector, each trusting a private CA.

use std::path::Path;
use std::time::{Duration, Instant};

use hyfhe::client::{Client, ClientError};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use crate::cluster::{
    base_env, config_file, env, redis_cli_tls, sentinel_url, serial, wait_until_replicated,
    wait_until_sentinels_converge, Cluster, RedisServer, Sentinel, Service,
};
use crate::hybrid::values;
use crate::serving::{bits, API_KEY, MODELS, SESSION_KEYS};

/// A CA, and leaf certificates it signs for `hosts`, written as PEM files into `dir`.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new(dir: &Path, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("hyfhe test CA {name}"));
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        Self {
            issuer: Issuer::new(params, key),
        }
    }

    /// `(cert.pem, key.pem)` for `hosts`, signed by this CA.
    fn leaf(&self, dir: &Path, name: &str, hosts: &[&str]) -> (String, String) {
        let params =
            CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{name}-cert.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string())
    }
}

/// `hyfhe serve` with its API on TLS (`cert`, `key`); the API URL as `https://localhost:PORT`.
fn serve_tls(config: &Path, cert: &str, key: &str) -> (Service, String) {
    let mut vars = base_env(&MODELS.dir);
    vars.extend(env(&[
        ("COORDINATOR__TLS_CERT", cert),
        ("COORDINATOR__TLS_KEY", key),
    ]));
    let serve = Service::spawn(
        "serve (tls)",
        &[
            "serve",
            "--model-dir",
            MODELS.dir.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &vars,
    );
    assert!(serve.url.starts_with("https://"), "{}", serve.url);
    let url = serve.url.replace("127.0.0.1", "localhost");
    (serve, url)
}

async fn wait_until_listed(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.models().await {
            Ok(_) => return,
            Err(e) => assert!(Instant::now() < deadline, "never answered: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// FCSmall downloaded, a session opened and one forward run through `client`, bit for bit
/// against simulate.
async fn forward_matches_simulate(client: &Client, what: &str) {
    wait_until_listed(client).await;
    let fc = &MODELS.served[0];
    let model_dir = tempfile::tempdir().unwrap();
    client
        .download_model(fc.name, model_dir.path())
        .await
        .unwrap();
    let model = hyfhe::hybrid::HybridModel::load(model_dir.path()).unwrap();
    let session = client
        .open_session_with(model.compiled(), SESSION_KEYS.clone())
        .await
        .unwrap();
    let (y, _) = model
        .forward_remote(fc.input.clone(), &session)
        .await
        .unwrap();
    assert_eq!(bits(&values(&y)), bits(&fc.simulate), "{what} vs simulate");
    session.close().await.unwrap();
}

fn transport_reason(e: ClientError) -> String {
    match e {
        ClientError::Transport { reason, .. } => reason,
        other => panic!("expected a transport error, got {other}"),
    }
}

#[test]
fn https_serves_a_forward_and_untrusted_wrong_host_or_plain_connections_fail_clearly() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path());
    let ca = TestCa::new(dir.path(), "ca");
    let stranger = TestCa::new(dir.path(), "stranger");
    let (cert, key) = ca.leaf(dir.path(), "server", &["localhost"]);
    let (serve, url) = serve_tls(&config, &cert, &key);
    let ca_pem = dir.path().join("ca.pem");
    hyfhe::client::block_on(async {
        // Trusting the test CA: the whole remote path over HTTPS, bit for bit.
        let client = Client::with_ca_cert(&url, API_KEY, Some(&ca_pem)).unwrap();
        forward_matches_simulate(&client, "https remote").await;

        // Without the CA (system roots only) or with another CA: refused, saying why.
        for trusted in [None, Some(dir.path().join("stranger.pem"))] {
            let c = Client::with_ca_cert(&url, API_KEY, trusted.as_deref()).unwrap();
            let reason = transport_reason(c.models().await.unwrap_err());
            assert!(
                reason.contains("certificate") && reason.contains("UnknownIssuer"),
                "{reason}"
            );
        }
        // The right CA, the wrong host name: refused, naming the name problem.
        let by_other_name = url.replace("localhost", "127.0.0.1");
        let c = Client::with_ca_cert(&by_other_name, API_KEY, Some(&ca_pem)).unwrap();
        let reason = transport_reason(c.models().await.unwrap_err());
        assert!(reason.contains("not valid for name"), "{reason}");
        // Plain HTTP to the TLS port: an error at once, not a hang.
        let plain = Client::new(&url.replace("https://", "http://"), API_KEY).unwrap();
        let asked = Instant::now();
        let err = plain.models().await.unwrap_err();
        let reason = transport_reason(err);
        assert!(reason.contains("invalid HTTP version"), "{reason}");
        assert!(asked.elapsed() < Duration::from_secs(10));
    });
    drop(serve);
    drop(stranger);
    // A bad certificate file stops the coordinator at start-up, naming it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hyfhe"))
        .args(["coordinator", "--config", config.to_str().unwrap()])
        .envs(base_env(&MODELS.dir))
        .envs(env(&[
            ("COORDINATOR__TLS_CERT", "/nonexistent/cert.pem"),
            ("COORDINATOR__TLS_KEY", &key),
        ]))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/cert.pem"), "{stderr}");
}

#[test]
fn coordinator_and_workers_reach_a_tls_only_redis_through_a_private_ca_and_refuse_a_stranger() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path());
    let ca = TestCa::new(dir.path(), "ca");
    let _stranger = TestCa::new(dir.path(), "stranger");
    let (cert, key) = ca.leaf(dir.path(), "redis", &["localhost"]);
    let ca_pem = dir.path().join("ca.pem").display().to_string();
    let stranger_pem = dir.path().join("stranger.pem").display().to_string();
    let redis = RedisServer::start_tls(&cert, &key, &ca_pem);
    let url = redis.url();
    assert!(url.starts_with("rediss://"), "{url}");

    // A coordinator that cannot reach Redis gives up after a second: its exit and stderr.
    let coordinator = |redis_url: &str, ca: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hyfhe"))
            .args(["coordinator", "--config", config.to_str().unwrap()])
            .envs(base_env(&MODELS.dir))
            .envs(env(&[
                ("QUEUE__BACKEND", "redis"),
                ("QUEUE__REDIS_URL", redis_url),
                ("QUEUE__REDIS_CA_CERT", ca),
                ("QUEUE__CONNECT_TIMEOUT_MS", "1000"),
            ]))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Trusting another CA: refused at start-up, saying why.
    let (ok, stderr) = coordinator(&url, &stranger_pem);
    assert!(!ok);
    assert!(
        stderr.contains("certificate") && stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
    // Plain redis:// to the TLS port: refused, not a hang.
    let (ok, _) = coordinator(&url.replace("rediss://", "redis://"), "");
    assert!(!ok);

    // Trusting the CA: the queue, sessions, key blobs and outcomes all cross TLS.
    let cluster = Cluster::over(
        redis,
        &MODELS.dir,
        &config,
        1,
        &[("QUEUE__REDIS_CA_CERT", &ca_pem)],
    );
    hyfhe::client::block_on(async {
        let client = Client::new(cluster.url(), API_KEY).unwrap();
        forward_matches_simulate(&client, "remote over rediss").await;
    });
}

/// `rediss+sentinel://`: a TLS-only primary, its TLS replica and three TLS-only sentinels, all
/// with certificates from a private CA for `localhost` (the name every one announces). The queue
/// finds the primary through the sentinels over TLS, follows a failover, and keeps what was
/// replicated; trusting another CA it reaches nothing, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_follows_a_sentinel_failover_over_tls_through_a_private_ca() {
    use hyfhe::queue::{JobQueue, RedisQueue};

    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let _stranger = TestCa::new(dir.path(), "stranger");
    let (cert, key) = ca.leaf(dir.path(), "redis", &["localhost"]);
    let ca_pem = dir.path().join("ca.pem").display().to_string();
    let stranger_pem = dir.path().join("stranger.pem");
    let tls_node = [
        "--tls-replication",
        "yes",
        "--replica-announce-ip",
        "localhost",
    ];
    let primary = RedisServer::start_tls_with(&cert, &key, &ca_pem, &tls_node);
    let primary_port = primary.port().to_string();
    let mut as_replica = tls_node.to_vec();
    as_replica.extend(["--replicaof", "localhost", &primary_port]);
    let replica = RedisServer::start_tls_with(&cert, &key, &ca_pem, &as_replica);
    let cli = |port: u16, args: &[&str]| redis_cli_tls(port, &ca_pem, args);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cli(replica.port(), &["INFO", "replication"]).contains("master_link_status:up") {
        assert!(
            Instant::now() < deadline,
            "the TLS replica did not synchronise"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sentinels: Vec<Sentinel> = (0..3)
        .map(|_| Sentinel::start_tls("hyfhe", &primary, 2, (&cert, &key, &ca_pem)))
        .collect();
    wait_until_sentinels_converge(&sentinels, cli);
    let url = sentinel_url("rediss+sentinel", "localhost", &sentinels);
    let settings = hyfhe::queue::QueueSettings {
        replica_acks: 1,
        ..crate::queue::settings()
    };
    // Trusting another CA: no sentinel answers, and the error says why.
    let e = RedisQueue::connect_with_ca(
        &url,
        Some(&stranger_pem),
        settings.clone(),
        Duration::from_secs(1),
    )
    .await
    .err()
    .expect("a stranger CA reaches nothing");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");

    let q = RedisQueue::connect_with_ca(
        &url,
        Some(Path::new(&ca_pem)),
        settings,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let job = |id: &str| crate::queue::job(id, "s");
    q.enqueue(&job("before-failover")).await.unwrap();
    wait_until_replicated(primary.port(), replica.port(), cli);
    drop(primary); // SIGKILL
    crate::queue::enqueue_through_failover(&q, &job("after-failover")).await;
    assert!(cli(replica.port(), &["ROLE"]).starts_with("master"));
    assert_eq!(
        q.depth().await.unwrap(),
        2,
        "the replicated job and the new one"
    );
}

/// A one-route HTTPS server standing in for an OpenTelemetry collector: counts the OTLP/HTTP
/// trace exports it receives.
fn https_collector(cert: &str, key: &str) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let exports = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = exports.clone();
    let tls = hyfhe::tls::server_config(Path::new(cert), Path::new(key)).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            actix_web::HttpServer::new(move || {
                let counted = counted.clone();
                actix_web::App::new().route(
                    "/v1/traces",
                    actix_web::web::post().to(move |body: actix_web::web::Bytes| {
                        let counted = counted.clone();
                        async move {
                            if !body.is_empty() {
                                counted.fetch_add(1, Ordering::SeqCst);
                            }
                            actix_web::HttpResponse::Ok().finish()
                        }
                    }),
                )
            })
            .workers(1)
            .listen_rustls_0_23(listener, tls)
            .unwrap()
            .run()
            .await
            .unwrap()
        })
    });
    (port, exports)
}

#[test]
fn traces_reach_an_https_collector_through_a_private_ca() {
    use std::sync::atomic::Ordering;
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path());
    let ca = TestCa::new(dir.path(), "ca");
    let (cert, key) = ca.leaf(dir.path(), "collector", &["localhost"]);
    let (port, exports) = https_collector(&cert, &key);
    let ca_pem = dir.path().join("ca.pem").display().to_string();
    let endpoint = format!("https://localhost:{port}/v1/traces");
    let mut serve = crate::cluster::serve(
        &MODELS.dir,
        &config,
        &[
            ("TELEMETRY__EXPORTER", "otlp"),
            ("TELEMETRY__OTLP_ENDPOINT", &endpoint),
            ("TELEMETRY__OTLP_CA_CERT", &ca_pem),
        ],
    );
    hyfhe::client::block_on(async {
        let client = Client::new(&serve.url, API_KEY).unwrap();
        forward_matches_simulate(&client, "remote with traces").await;
    });
    // The batch exporter flushes on a timer and at shutdown: SIGTERM makes it send.
    serve.terminate();
    assert!(
        exports.load(Ordering::SeqCst) > 0,
        "no trace export reached the https collector"
    );
}
