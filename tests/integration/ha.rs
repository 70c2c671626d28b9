//! More than one coordinator: they share nothing but Redis, so a session opened through one is
//! served through any other, and behind a real load balancer (nginx, Debian's `nginx-light`,
//! which `.ci/run` installs when missing) losing one costs its clients retries, not answers.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::{config_file, free_port, metric, serial, Cluster};
use crate::hybrid::values;
use crate::serving::{bits, connect, encrypted_zero_row, Api, API_KEY, MODELS, SESSION_KEYS};

/// nginx on a free loopback port, round-robin over `upstreams` (`host:port`). Compute requests
/// carry an idempotency key, so a request whose coordinator died may go to the next one
/// (`non_idempotent`); bodies are streamed, not buffered to disk.
struct Nginx {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(upstreams: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let servers: String = upstreams
            .iter()
            .map(|u| format!("    server {u} max_fails=1 fail_timeout=10s;\n"))
            .collect();
        let d = dir.path().display();
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{}}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             client_max_body_size 0;\n  upstream coordinators {{\n{servers}  }}\n  \
             server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      \
             proxy_pass http://coordinators;\n      proxy_http_version 1.1;\n      \
             proxy_set_header Connection \"\";\n      proxy_request_buffering off;\n      \
             proxy_buffering off;\n      proxy_read_timeout 150s;\n      \
             proxy_next_upstream error timeout non_idempotent;\n    }}\n  }}\n}}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("nginx")
            .args([
                "-c",
                path.to_str().unwrap(),
                "-p",
                dir.path().to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx not found: install Debian's nginx-light (`.ci/run` does)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn host_port(url: &str) -> &str {
    url.trim_start_matches("http://").trim_end_matches('/')
}

#[test]
fn two_coordinators_serve_any_session_and_behind_nginx_losing_one_costs_only_retries() {
    let _serial = serial();
    let config_dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::redis(&MODELS.dir, &config_file(config_dir.path()), 1, &[]);
    let mut second = cluster.another_coordinator();
    let fc = &MODELS.served[0];

    // A session opened through the first coordinator, computed on through the second.
    hyfhe::client::block_on(async {
        let (_dir, model, session) = connect(cluster.url(), fc.name, SESSION_KEYS.clone()).await;
        let api = Api {
            http: reqwest::Client::new(),
            url: second.url.clone(),
        };
        let path = format!("/v1/sessions/{}/modules/seq.0/compute", session.id());
        let (status, body, _) = api
            .send(
                api.post(&path, Some(API_KEY))
                    .header("x-hyfhe-session-token", session.token())
                    .header("idempotency-key", "through-the-other-0001")
                    .body(encrypted_zero_row(&model)),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    });

    // Clients through nginx over both; the second coordinator is killed mid-load.
    let nginx = Nginx::start(&[host_port(cluster.url()), host_port(&second.url)]);
    let m = &MODELS.served[2];
    let first_metrics = cluster.metrics_url().to_string();
    std::thread::scope(|scope| {
        let clients: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    hyfhe::client::block_on(async {
                        let (_dir, model, session) =
                            connect(&nginx.url, m.name, SESSION_KEYS.clone()).await;
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
        // Once both coordinators are answering, kill the second without warning.
        let deadline = Instant::now() + Duration::from_secs(120);
        while metric(
            &second.metrics_url,
            "hyfhe_coordinator_compute_requests_total",
        ) < 1.0
        {
            assert!(Instant::now() < deadline, "nginx never reached the second");
            std::thread::sleep(Duration::from_millis(10));
        }
        second.kill();
        let at_kill = metric(&first_metrics, "hyfhe_coordinator_compute_ok_total");
        for c in clients {
            c.join().unwrap();
        }
        assert!(
            metric(&first_metrics, "hyfhe_coordinator_compute_ok_total") > at_kill,
            "the load went on through the survivor after the kill"
        );
    });
    // The survivor answered the rest, and none of its answers was an error.
    assert!(metric(&first_metrics, "hyfhe_coordinator_compute_ok_total") >= 1.0);
    assert_eq!(
        metric(&first_metrics, "hyfhe_coordinator_compute_errors_total"),
        0.0
    );
}
