//! HTTPS between client and coordinator, with a CA made in the test: the coordinator's own TLS
//! listener serves a real forward bit for bit; an untrusted or wrong-host certificate and plain
//! HTTP to a TLS port fail with errors that say so.

use std::path::Path;
use std::time::{Duration, Instant};

use hyfhe::client::{Client, ClientError};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use crate::cluster::{base_env, config_file, env, serial, Service};
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
        wait_until_listed(&client).await;
        let fc = &MODELS.served[0];
        let model_dir = tempfile::tempdir().unwrap();
        client
            .download_model(fc.name, model_dir.path())
            .await
            .unwrap();
        let model = hyfhe::hybrid::HybridModel::load(model_dir.path()).unwrap();
        let session = client
            .open_session_with(&model, SESSION_KEYS.clone())
            .await
            .unwrap();
        let (y, _) = model
            .forward_remote(fc.input.clone(), &session)
            .await
            .unwrap();
        assert_eq!(
            bits(&values(&y)),
            bits(&fc.simulate),
            "https remote vs simulate"
        );
        session.close().await.unwrap();

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
