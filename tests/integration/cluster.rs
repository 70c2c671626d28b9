//! Real servers for the serving tests: a `redis-server` on a free port, and `hyfhe` coordinator,
//! worker and serve processes. Everything is killed when its handle drops.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Serving tests run one at a time: each cluster holds several 576 MiB keys and all the cores.
static SERVING: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERVING.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct RedisServer {
    child: Child,
    port: u16,
    tls: bool,
}

impl RedisServer {
    /// `redis-server` on a free port, keeping nothing on disk. `.ci/run` installs Debian's
    /// package when the binary is missing.
    pub fn start() -> Self {
        let port = free_port();
        Self::spawn(port, false, &["--port", &port.to_string()])
    }

    /// `redis-server` speaking only TLS on a free port, with the PEM certificate `cert` and key
    /// `key` (clients are not asked for certificates).
    pub fn start_tls(cert: &str, key: &str, ca: &str) -> Self {
        Self::start_tls_with(cert, key, ca, &[])
    }

    /// [`Self::start_tls`] with more arguments (`--tls-replication yes`, `--replicaof …`).
    pub fn start_tls_with(cert: &str, key: &str, ca: &str, more: &[&str]) -> Self {
        let port = free_port();
        let tls_port = port.to_string();
        #[rustfmt::skip]
        let mut args = vec![
            "--port", "0", "--tls-port", &tls_port, "--tls-cert-file", cert,
            "--tls-key-file", key, "--tls-ca-cert-file", ca, "--tls-auth-clients", "no",
        ];
        args.extend_from_slice(more);
        Self::spawn(port, true, &args)
    }

    /// A replica of `primary` on a free port, once it has synchronised.
    pub fn start_replica_of(primary: &RedisServer) -> Self {
        let port = free_port();
        #[rustfmt::skip]
        let args = [
            "--port", &port.to_string(), "--replicaof", "127.0.0.1", &primary.port.to_string(),
        ];
        let replica = Self::spawn(port, false, &args);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !redis_cli(port, &["INFO", "replication"]).contains("master_link_status:up") {
            assert!(Instant::now() < deadline, "the replica did not synchronise");
            std::thread::sleep(Duration::from_millis(50));
        }
        replica
    }

    /// Send `signal` (`STOP`, `CONT`, …) to the server process: a stopped replica stands for
    /// one that lags.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn spawn(port: u16, tls: bool, listen: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args(listen)
            .args(["--save", "", "--appendonly", "no"])
            .args(["--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: install Debian's redis-server (`.ci/run` does)");
        let server = Self { child, port, tls };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://localhost:PORT` for TLS (the name its
    /// certificate is for).
    pub fn url(&self) -> String {
        if self.tls {
            format!("rediss://localhost:{}", self.port)
        } else {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }
}

/// `redis-cli -p PORT args...`'s output (empty when it fails).
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// `redis-cli --tls` against `localhost:PORT`, trusting `ca` (empty when it fails).
pub fn redis_cli_tls(port: u16, ca: &str, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args([
            "--tls",
            "--cacert",
            ca,
            "-h",
            "localhost",
            "-p",
            &port.to_string(),
        ])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Redis Sentinel (`redis-server --sentinel`, Debian's redis-server package) on a free port,
/// watching `primary` as `master` with quorum `quorum` and a fast failure detection.
pub struct Sentinel {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    pub fn start(master: &str, primary: &RedisServer, quorum: u32) -> Self {
        let port = free_port();
        let listen = format!("port {port}\n");
        let monitor = format!(
            "sentinel monitor {master} 127.0.0.1 {} {quorum}\n",
            primary.port
        );
        Self::spawn(port, master, &(listen + &monitor))
    }

    /// A sentinel speaking TLS only (`cert` for `localhost`, clients not asked for one), to
    /// clients and to the Redis servers it watches (`tls-replication`), announcing hostnames:
    /// it names the primary `localhost`, the host its certificate is for.
    pub fn start_tls(
        master: &str,
        primary: &RedisServer,
        quorum: u32,
        (cert, key, ca): (&str, &str, &str),
    ) -> Self {
        let port = free_port();
        let conf = format!(
            "port 0\ntls-port {port}\ntls-cert-file {cert}\ntls-key-file {key}\n\
             tls-ca-cert-file {ca}\ntls-auth-clients no\ntls-replication yes\n\
             sentinel resolve-hostnames yes\nsentinel announce-hostnames yes\n\
             sentinel announce-ip localhost\n\
             sentinel monitor {master} localhost {} {quorum}\n",
            primary.port
        );
        Self::spawn(port, master, &conf)
    }

    fn spawn(port: u16, master: &str, head: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Sentinel rewrites its config file, so each gets its own.
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "{head}bind 127.0.0.1\ndir {}\n\
                 sentinel down-after-milliseconds {master} 500\n\
                 sentinel failover-timeout {master} 3000\n\
                 sentinel parallel-syncs {master} 1\n",
                dir.path().display(),
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sentinel did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }
}

/// `scheme://host:p1,host:p2,…/hyfhe`: a queue URL naming `sentinels` on `host`.
pub fn sentinel_url(scheme: &str, host: &str, sentinels: &[Sentinel]) -> String {
    let hosts: Vec<String> = sentinels
        .iter()
        .map(|s| format!("{host}:{}", s.port))
        .collect();
    format!("{scheme}://{}/hyfhe", hosts.join(","))
}

/// Wait until every sentinel knows the replica and the other sentinels (found through INFO and
/// hello messages every ~2 s): before that, a failover could stall on a loaded machine. `cli`
/// runs a command against a sentinel's port.
pub fn wait_until_sentinels_converge(sentinels: &[Sentinel], cli: impl Fn(u16, &[&str]) -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let others = (sentinels.len() - 1).to_string();
    for s in sentinels {
        loop {
            let info = cli(s.port, &["SENTINEL", "MASTER", "hyfhe"]);
            let field = |name: &str| {
                let mut lines = info.lines();
                lines.find(|l| l.trim() == name);
                lines.next().map(|v| v.trim().to_string())
            };
            if field("num-slaves").as_deref() == Some("1")
                && field("num-other-sentinels").as_deref() == Some(others.as_str())
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sentinel {} never saw the replica and its peers: {info}",
                s.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Wait until the replica has applied everything the primary has written so far (its
/// `slave_repl_offset` reaches the primary's `master_repl_offset`). A `WAIT` from `redis-cli`
/// would not do: it counts only its own connection's writes, none. `cli` runs a command against
/// a port.
pub fn wait_until_replicated(primary: u16, replica: u16, cli: impl Fn(u16, &[&str]) -> String) {
    let offset = |port: u16, field: &str| -> u64 {
        cli(port, &["INFO", "replication"])
            .lines()
            .find_map(|l| l.trim().strip_prefix(field)?.parse().ok())
            .unwrap_or(0)
    };
    let target = offset(primary, "master_repl_offset:");
    assert!(target > 0, "the primary has written nothing");
    let deadline = Instant::now() + Duration::from_secs(10);
    while offset(replica, "slave_repl_offset:") < target {
        assert!(Instant::now() < deadline, "the replica never caught up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `hyfhe` child process whose `http://` (or `https://`) lines on stdout tell where it listens: a coordinator
/// (or `serve`) prints its API (`listening on …`) and its metrics (`metrics on …`) addresses, a
/// worker only its metrics and health address.
pub struct Service {
    child: Child,
    pub url: String,
    /// Where its `/metrics` is (the same as `url` for a worker).
    pub metrics_url: String,
}

impl Service {
    pub fn spawn(name: &str, args: &[&str], env: &[(String, String)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hyfhe"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(at) = line.find("http://").or_else(|| line.find("https://")) {
                    let _ = tx.send((line.starts_with("listening"), line[at..].trim().to_string()));
                }
            }
        });
        let is_worker = args.first() == Some(&"worker");
        let (mut url, mut metrics_url) = (None, None);
        while url.is_none() || metrics_url.is_none() {
            let (api, at) = rx
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("{name} did not start (args {args:?})"));
            if api {
                url = Some(at);
            } else {
                if is_worker {
                    url = Some(at.clone());
                }
                metrics_url = Some(at);
            }
        }
        Self {
            child,
            url: url.unwrap(),
            metrics_url: metrics_url.unwrap(),
        }
    }

    /// SIGTERM: the graceful stop a container runtime sends; waits for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        self.child.wait().unwrap()
    }

    /// SIGKILL: no shutdown code runs, leases are left to expire.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test configuration file: the defaults plus a second tenant ("other", key "other-key").
pub fn config_file(dir: &Path) -> PathBuf {
    let mut text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"))
            .unwrap();
    text.push_str(&format!(
        "\n[[tenants]]\nname = \"other\"\napi_key_sha256 = \"{}\"\n",
        hyfhe::config::hash_api_key("other-key")
    ));
    let path = dir.join("test.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (format!("HYFHE__{k}"), v.to_string()))
        .collect()
}

/// Settings every serving test shares: quick leases, quiet logs, loopback on free ports.
pub fn base_env(models: &Path) -> Vec<(String, String)> {
    env(&[
        ("MODELS__DIR", models.to_str().unwrap()),
        ("COORDINATOR__LISTEN", "127.0.0.1:0"),
        ("COORDINATOR__METRICS_LISTEN", "127.0.0.1:0"),
        ("WORKER__LISTEN", "127.0.0.1:0"),
        ("WORKER__HEARTBEAT_MS", "250"),
        // Takeover waits for this, but a loaded CI machine must never let a lease lapse between
        // heartbeats (a moved shard reloads keys, which some tests count).
        ("QUEUE__LEASE_TTL_MS", "4000"),
        ("QUEUE__SHARDS", "8"),
        ("TELEMETRY__LOG", "warn"),
    ])
}

pub struct Cluster {
    pub coordinator: Service,
    pub workers: Vec<Service>,
    /// Held so the server lives as long as the cluster.
    _redis: Option<RedisServer>,
    /// What the services were started with (to start more of them alike).
    env: Vec<(String, String)>,
    config: PathBuf,
}

impl Cluster {
    /// A coordinator and `workers` worker processes over a fresh redis-server.
    pub fn redis(models: &Path, config: &Path, workers: usize, extra: &[(&str, &str)]) -> Self {
        Self::over(RedisServer::start(), models, config, workers, extra)
    }

    /// A coordinator and `workers` worker processes over `redis`.
    pub fn over(
        redis: RedisServer,
        models: &Path,
        config: &Path,
        workers: usize,
        extra: &[(&str, &str)],
    ) -> Self {
        let mut env = base_env(models);
        env.extend(self::env(&[
            ("QUEUE__BACKEND", "redis"),
            ("QUEUE__REDIS_URL", &redis.url()),
            ("WORKER__EVALUATOR_THREADS", "1"),
        ]));
        env.extend(self::env(extra));
        let config = config.to_str().unwrap();
        let coordinator = Service::spawn("coordinator", &["coordinator", "--config", config], &env);
        let workers = (0..workers)
            .map(|i| {
                Service::spawn(
                    &format!("worker-{i}"),
                    &["worker", "--config", config],
                    &env,
                )
            })
            .collect();
        let cluster = Self {
            coordinator,
            workers,
            _redis: Some(redis),
            env,
            config: config.into(),
        };
        cluster.wait_for_stable_leases();
        cluster
    }

    /// One more worker, configured as the others; returns once it holds a shard.
    pub fn add_worker(&mut self) {
        let name = format!("worker-{}", self.workers.len());
        let config = self.config.to_str().unwrap();
        self.workers.push(Service::spawn(
            &name,
            &["worker", "--config", config],
            &self.env,
        ));
        self.wait_for_stable_leases();
    }

    /// `hyfhe serve`: coordinator and worker in one process on the in-memory queue.
    pub fn embedded(models: &Path, config: &Path) -> Self {
        Self {
            coordinator: serve(models, config, &[]),
            workers: Vec::new(),
            _redis: None,
            env: Vec::new(),
            config: config.into(),
        }
    }

    /// One more coordinator over the same Redis, configured as the first.
    pub fn another_coordinator(&self) -> Service {
        let config = self.config.to_str().unwrap();
        Service::spawn(
            "coordinator-2",
            &["coordinator", "--config", config],
            &self.env,
        )
    }

    pub fn url(&self) -> &str {
        &self.coordinator.url
    }

    /// The Redis server the cluster runs on (none for `hyfhe serve`).
    pub fn redis_server(&self) -> &RedisServer {
        self._redis.as_ref().expect("a cluster over Redis")
    }

    /// The coordinator's (or `serve`'s) metrics address.
    pub fn metrics_url(&self) -> &str {
        &self.coordinator.metrics_url
    }

    /// Every shard (as many as the coordinator routes over) leased and each worker holding
    /// some, so a session's shard has settled.
    pub fn wait_for_stable_leases(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let shards = metric(self.metrics_url(), "hyfhe_queue_shards") as u64;
            let owned: Vec<u64> = self
                .workers
                .iter()
                .map(|w| metric(&w.url, "hyfhe_worker_shards_owned") as u64)
                .collect();
            if owned.iter().sum::<u64>() == shards && owned.iter().all(|&o| o > 0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "leases never settled: {owned:?} of {shards}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `hyfhe serve` on `models` with the shared test settings plus `extra` overrides (names
/// without the `HYFHE__` prefix); returns once it is ready.
pub fn serve(models: &Path, config: &Path, extra: &[(&str, &str)]) -> Service {
    let mut vars = base_env(models);
    vars.extend(env(extra));
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
    serve
}

/// Poll `/health/ready` until it answers 200 (the first worker heartbeat has landed).
pub fn wait_ready(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(&format!("{base}/health/ready")).0 != 200 {
        assert!(Instant::now() < deadline, "{base} never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One sample of a service's /metrics (0 when absent).
pub fn metric(base: &str, name: &str) -> f64 {
    let text = http_get(&format!("{base}/metrics")).1;
    hyfhe::telemetry::metrics::sample(&text, name).unwrap_or(0.0)
}

/// A counter summed over `bases` once it has reached `want` (or 10 s passed) and a moment more:
/// a worker counts a job just after storing its outcome, so a client can hold the answer before
/// the count moves, and an extra count (a second evaluation) shows up above `want`.
pub fn settled_count(bases: &[&str], name: &str, want: f64) -> f64 {
    let total = || bases.iter().map(|base| metric(base, name)).sum::<f64>();
    let deadline = Instant::now() + Duration::from_secs(10);
    while total() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    total()
}

/// A blocking GET without an async runtime: status and body.
pub fn http_get(url: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}
