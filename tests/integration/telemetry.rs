//! Traces leave every process over OTLP/HTTP, and one forward call is one trace: the client's
//! quantize/encrypt/request/decrypt, the coordinator's HTTP span and the worker's job and evaluation.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyfhe::fhe::encode;

use crate::cluster::{config_file, serial, serve};
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

/// The length-delimited fields `field` of one protobuf message.
fn submessages(buf: &[u8], field: u64) -> Vec<&[u8]> {
    fn varint(buf: &[u8], i: &mut usize) -> u64 {
        let mut v = 0;
        for shift in (0..64).step_by(7) {
            let b = buf[*i];
            *i += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                break;
            }
        }
        v
    }
    let (mut i, mut out) = (0, Vec::new());
    while i < buf.len() {
        let key = varint(buf, &mut i);
        match key & 7 {
            0 => {
                varint(buf, &mut i);
            }
            1 => i += 8,
            5 => i += 4,
            2 => {
                let len = varint(buf, &mut i) as usize;
                if key >> 3 == field {
                    out.push(&buf[i..i + len]);
                }
                i += len;
            }
            other => panic!("wire type {other}"),
        }
    }
    out
}

/// (trace id, span name) of every span in OTLP `ExportTraceServiceRequest` bodies:
/// resource_spans = 1 → scope_spans = 2 → spans = 2 → trace_id = 1, name = 5.
fn spans(bodies: &[Vec<u8>]) -> Vec<(Vec<u8>, String)> {
    let mut out = Vec::new();
    for body in bodies {
        for resource in submessages(body, 1) {
            for scope in submessages(resource, 2) {
                for span in submessages(scope, 2) {
                    let id = submessages(span, 1)
                        .first()
                        .map(|b| b.to_vec())
                        .unwrap_or_default();
                    let name = submessages(span, 5)
                        .first()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    out.push((id, name));
                }
            }
        }
    }
    out
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

#[test]
fn one_forward_is_one_trace_across_client_coordinator_and_worker() {
    let _serial = serial();
    let (port, bodies) = otlp_sink();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_file(config_dir.path());
    let models = MODELS.dir.clone();
    let endpoint = format!("http://127.0.0.1:{port}/v1/traces");
    let serve = serve(
        &models,
        &config,
        &[
            ("TELEMETRY__EXPORTER", "otlp"),
            ("TELEMETRY__OTLP_ENDPOINT", &endpoint),
            ("TELEMETRY__SERVICE_NAME", "hyfhe-trace-test"),
        ],
    );

    // A caller's trace context, as an instrumented client would send it.
    let trace_id: [u8; 16] = rand::random();
    let traceparent = format!("00-{}-{}-01", hex::encode(trace_id), "00f067aa0ba902b7");
    hyfhe::client::block_on(async {
        let client = hyfhe::client::Client::new(&serve.url, API_KEY).unwrap();
        let dir = tempfile::tempdir().unwrap();
        client.download_model("fc_small", dir.path()).await.unwrap();
        let model = hyfhe::hybrid::HybridModel::load(dir.path()).unwrap();
        let session = client
            .open_session_with(model.compiled(), SESSION_KEYS.clone())
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

    // A client process with tracing on: its forward and the servers' spans are one trace.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hyfhe"))
        .args([
            "run",
            models.join("fc_small").to_str().unwrap(),
            "--mode",
            "remote",
        ])
        .args([
            "--input",
            crate::hybrid::fixture("fc_small_input.npy")
                .to_str()
                .unwrap(),
        ])
        .args(["--server", &serve.url, "--api-key", API_KEY])
        .env("HYFHE__TELEMETRY__EXPORTER", "otlp")
        .env("HYFHE__TELEMETRY__OTLP_ENDPOINT", &endpoint)
        .env("HYFHE__TELEMETRY__LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = spans(&bodies.lock().unwrap());
        let client_trace = all
            .iter()
            .find(|(_, n)| n == "encrypt")
            .map(|(t, _)| t.clone());
        if let Some(trace) = client_trace {
            let in_trace: Vec<&str> = all
                .iter()
                .filter(|(t, _)| *t == trace)
                .map(|(_, n)| n.as_str())
                .collect();
            let want = [
                "forward",
                "remote_module",
                "quantize",
                "encrypt",
                "request",
                "decrypt",
                "http",
                "dispatch",
                "job",
                "evaluate",
                "publish",
            ];
            if want.iter().all(|w| in_trace.contains(w)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the client's trace holds only {in_trace:?}"
            );
        } else {
            assert!(
                Instant::now() < deadline,
                "no client span exported: {all:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
