//! Traces leave the process over OTLP/HTTP, and one compute request is one trace from the
//! coordinator's HTTP span through the worker's job, key load and evaluation.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyfhe::fhe::encode;

use crate::cluster::{base_env, config_file, env, serial, wait_ready, Service};
use crate::serving::{API_KEY, MODELS, SESSION_KEYS};

/// An HTTP endpoint that records every POST body (an OTLP/HTTP receiver's transport; the bytes
/// are the exporter's real protobuf).
fn otlp_sink() -> (u16, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let mut reader = BufReader::new(stream);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_ok() {
                seen.lock().unwrap().push(body);
            }
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (port, bodies)
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

#[test]
fn one_compute_request_is_one_trace_exported_over_otlp() {
    let _serial = serial();
    let (port, bodies) = otlp_sink();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_file(config_dir.path());
    let models = MODELS.dir.clone();
    let mut vars = base_env(&models);
    let endpoint = format!("http://127.0.0.1:{port}/v1/traces");
    vars.extend(env(&[
        ("TELEMETRY__EXPORTER", "otlp"),
        ("TELEMETRY__OTLP_ENDPOINT", &endpoint),
        ("TELEMETRY__SERVICE_NAME", "hyfhe-trace-test"),
    ]));
    let serve = Service::spawn(
        "serve",
        &[
            "serve",
            "--model-dir",
            models.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &vars,
    );
    wait_ready(&serve.url);

    // A caller's trace context, as an instrumented client would send it.
    let trace_id: [u8; 16] = rand::random();
    let traceparent = format!("00-{}-{}-01", hex::encode(trace_id), "00f067aa0ba902b7");
    hyfhe::client::block_on(async {
        let client = hyfhe::client::Client::new(&serve.url, API_KEY).unwrap();
        let dir = tempfile::tempdir().unwrap();
        client.download_model("fc_small", dir.path()).await.unwrap();
        let model = hyfhe::hybrid::HybridModel::load(dir.path()).unwrap();
        let session = client
            .open_session_with(&model, SESSION_KEYS.clone())
            .await
            .unwrap();
        let spec = &model.specs()["seq.0"];
        let rows = SESSION_KEYS
            .client_key()
            .encrypt_rows(&spec.plan, &vec![0; spec.in_features], 1)
            .unwrap();
        let response = reqwest::Client::new()
            .post(format!(
                "{}/v1/sessions/{}/modules/seq.0/compute",
                serve.url,
                session.id()
            ))
            .bearer_auth(API_KEY)
            .header("x-hyfhe-session-token", session.token())
            .header("idempotency-key", "trace-test-0001")
            .header("traceparent", traceparent)
            .body(encode(&rows))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
    });

    // The batch exporter sends within its 5 s schedule.
    let deadline = Instant::now() + Duration::from_secs(30);
    let wanted: [&[u8]; 6] = [
        b"http",
        b"dispatch",
        b"job",
        b"key_load",
        b"evaluate",
        b"publish",
    ];
    loop {
        let all: Vec<u8> = bodies.lock().unwrap().concat();
        let spans_in_trace = count(&all, &trace_id);
        let names_present = wanted.iter().all(|n| count(&all, n) > 0);
        // http, dispatch, enqueue, wait on the coordinator; job, key_load, evaluate, publish on
        // the worker: all eight in the caller's trace.
        if spans_in_trace >= 8 && names_present {
            assert!(
                count(&all, b"hyfhe-trace-test") > 0,
                "service name exported"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "exported {} bodies; {spans_in_trace} spans carry the caller's trace id",
            bodies.lock().unwrap().len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
