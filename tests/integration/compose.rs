//! docker-compose.yml and the Dockerfile, checked by parsing (tests/compose/run.sh runs them for
//! real where a Docker engine answers): the
//! services, commands, ports, volumes and environment must agree with the configuration.

use std::collections::BTreeMap;
use std::path::Path;

use hyfhe::config::Config;
use serde_yaml::Value;

fn read(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(name)).unwrap()
}

fn compose() -> Value {
    serde_yaml::from_str(&read("docker-compose.yml")).unwrap()
}

/// A list of strings, variables resolved to their defaults.
fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
        .iter()
        .map(|s| resolve(s.as_str().unwrap()))
        .collect()
}

/// Every `${VAR:-default}` in `value` as Compose resolves it with VAR unset.
fn resolve(value: &str) -> String {
    resolve_with(value, &BTreeMap::new())
}

/// [`resolve`] with `vars` set (an env file's).
fn resolve_with(value: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed ${") + start;
        let inner = &rest[start + 2..end];
        let (name, default) = inner.split_once(":-").unwrap_or((inner, ""));
        out.push_str(vars.get(name).map_or(default, String::as_str));
        rest = &rest[end + 1..];
    }
    out + rest
}

#[test]
fn variables_resolve_to_their_defaults() {
    assert_eq!(resolve("${A:-./models}:/models:ro"), "./models:/models:ro");
    assert_eq!(resolve("${P:-8080}:8080"), "8080:8080");
    assert_eq!(resolve("${T:-}"), "");
    assert_eq!(resolve("plain"), "plain");
}

/// The service's environment with YAML merge keys (`<<: *anchor`) applied.
fn environment(service: &Value) -> BTreeMap<String, String> {
    environment_with(service, &BTreeMap::new())
}

fn environment_with(service: &Value, vars: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let resolve = |v: &str| resolve_with(v, vars);
    let mut out = BTreeMap::new();
    let Some(env) = service.get("environment").and_then(Value::as_mapping) else {
        return out;
    };
    for (k, v) in env {
        let k = k.as_str().unwrap();
        if k == "<<" {
            for (k2, v2) in v.as_mapping().unwrap() {
                out.insert(k2.as_str().unwrap().into(), resolve(v2.as_str().unwrap()));
            }
        } else {
            out.insert(k.into(), resolve(v.as_str().unwrap()));
        }
    }
    out
}

/// The port of the coordinator's API listener.
fn listen_port(config: &Config) -> String {
    config
        .coordinator
        .listen
        .rsplit(':')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn the_compose_file_matches_the_config_and_the_cli() {
    let doc = compose();
    let services = doc["services"].as_mapping().unwrap();
    for name in [
        "redis",
        "coordinator",
        "worker",
        "otel-collector",
        "jaeger",
        "prometheus",
        "tls-proxy",
    ] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    let docker_toml = read("config/docker.toml");
    for (role, service) in [
        ("coordinator", &doc["services"]["coordinator"]),
        ("worker", &doc["services"]["worker"]),
    ] {
        // The command is a real subcommand with the config the image ships.
        let command = strings(&service["command"]);
        assert_eq!(command, vec![role, "--config", "/etc/hyfhe/docker.toml"]);
        // Every variable is a config override that applies cleanly to docker.toml.
        let mut env = environment(service);
        // The tenants come from a mounted file, never from docker.toml.
        if let Some(inline) = env.remove(hyfhe::config::TENANTS_ENV) {
            assert_eq!(
                (role, inline.as_str()),
                ("coordinator", ""),
                "no tenant by default"
            );
        }
        if let Some(file) = env.remove(hyfhe::config::TENANTS_FILE_ENV) {
            assert_eq!(role, "coordinator");
            let volumes = strings(&service["volumes"]);
            assert!(
                volumes.iter().any(|v| v.ends_with(&format!(":{file}:ro"))),
                "{file} is mounted: {volumes:?}"
            );
        }
        assert!(env.keys().all(|k| k.starts_with("HYFHE__")), "{env:?}");
        let config = Config::from_toml(&docker_toml, " docker.toml", &env)
            .unwrap_or_else(|e| panic!("{role}'s environment: {e}"));
        assert!(config.tenants.is_empty(), "docker.toml ships no tenant");
        assert_eq!(
            service["restart"].as_str(),
            Some("unless-stopped"),
            "{role} restarts"
        );
        let limit = service["deploy"]["resources"]["limits"]["memory"]
            .as_str()
            .unwrap_or_else(|| panic!("{role} has a memory limit"));
        let limit_bytes = limit.trim_end_matches('g').parse::<u64>().unwrap() << 30;
        if role == "worker" {
            // What the config lets a worker hold must fit under its limit.
            let w = &config.worker;
            let per_job = w.max_job_bytes + 3 * config.coordinator.max_body_bytes as u64;
            assert!(
                w.key_cache_bytes + w.max_pending as u64 * per_job < limit_bytes,
                "worker limit {limit} below key cache + job budgets"
            );
            let health = strings(&service["healthcheck"]["test"]);
            assert!(
                health.iter().any(|t| t.ends_with(":9090/health/ready")),
                "{health:?}"
            );
        }
        assert_eq!(
            config.queue.redis_url, "redis://redis:6379",
            "points at the redis service"
        );
        // The model directory is mounted where the config looks for it.
        let volumes = strings(&service["volumes"]);
        let dir = config.models.dir.to_str().unwrap().to_string();
        assert!(
            volumes
                .iter()
                .any(|v| v.split(':').nth(1) == Some(dir.as_str())),
            "{volumes:?} vs {dir}"
        );
        if role == "coordinator" {
            let port = listen_port(&config);
            let ports = strings(&service["ports"]);
            assert!(
                ports.iter().any(|p| p.ends_with(&format!(":{port}"))),
                "{ports:?} vs {port}"
            );
        }
    }
    // The TLS proxy forwards to the coordinator's listen port on the compose network.
    let nginx = read("deploy/nginx-tls.conf");
    let listen_port =
        listen_port(&Config::from_toml(&docker_toml, " docker.toml", &BTreeMap::new()).unwrap());
    assert!(
        nginx.contains(&format!("server coordinator:{listen_port};")),
        "nginx-tls.conf forwards to coordinator:{listen_port}"
    );
    let worker = &doc["services"]["worker"];
    assert_eq!(worker["deploy"]["replicas"].as_u64(), Some(3));
    for optional in ["otel-collector", "jaeger", "prometheus", "tls-proxy"] {
        let profiles = strings(&doc["services"][optional]["profiles"]);
        assert!(!profiles.is_empty(), "{optional} must be behind a profile");
    }
    // Mounted deploy files exist.
    for service in ["otel-collector", "prometheus", "tls-proxy"] {
        for v in strings(&doc["services"][service]["volumes"]) {
            let host = resolve(v.split(':').next().unwrap());
            if host == "./tls" {
                continue; // the operator's certificate, not a file of ours
            }
            assert!(
                Path::new(env!("CARGO_MANIFEST_DIR")).join(&host).exists(),
                "{host}"
            );
        }
    }
}

/// The `ha` profile (deploy/ha.env): the services it adds, what the hyfhe processes are pointed at
/// and what the sentinels monitor, the load balancer's backends, all consistent with the config.
#[test]
fn the_ha_profile_points_every_process_at_the_sentinels_and_balances_both_coordinators() {
    let mut doc = compose();
    doc.apply_merge().unwrap();
    let vars: BTreeMap<String, String> = read("deploy/ha.env")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=value");
            (k.to_string(), v.to_string())
        })
        .collect();
    assert_eq!(vars["COMPOSE_PROFILES"], "ha");
    let ha = [
        "redis-replica",
        "sentinel-1",
        "sentinel-2",
        "sentinel-3",
        "coordinator-2",
        "lb",
    ];
    for name in ha {
        let service = &doc["services"][name];
        assert_eq!(strings(&service["profiles"]), ["ha"], "{name}");
    }
    let docker_toml = read("config/docker.toml");
    let sentinel_url = &vars["HYFHE_REDIS_URL"];
    for role in ["coordinator", "coordinator-2", "worker"] {
        // The tenants' variables are checked above; the rest are config overrides.
        let mut env = environment_with(&doc["services"][role], &vars);
        env.retain(|k, _| k.starts_with("HYFHE__"));
        let config = Config::from_toml(&docker_toml, " docker.toml", &env)
            .unwrap_or_else(|e| panic!("{role}'s environment under ha.env: {e}"));
        assert_eq!(&config.queue.redis_url, sentinel_url, "{role}");
        assert_eq!(config.queue.replica_acks, 1, "{role} waits for the replica");
    }
    // The URL names each sentinel service on its port, and the master they monitor.
    let rest = sentinel_url
        .strip_prefix("redis+sentinel://")
        .expect("a sentinel URL");
    let (hosts, master) = rest.split_once('/').unwrap();
    let hosts: Vec<&str> = hosts.split(',').collect();
    assert_eq!(
        hosts,
        ["sentinel-1:26379", "sentinel-2:26379", "sentinel-3:26379"]
    );
    // Fixed addresses inside the network's subnet, outside its dynamic range: Redis and the
    // sentinels name each other by address (no lookup of a dead container's name).
    let address = |name: &str| {
        resolve(
            doc["services"][name]["networks"]["default"]["ipv4_address"]
                .as_str()
                .unwrap_or_else(|| panic!("{name} has a fixed address")),
        )
    };
    let ipam = &doc["networks"]["default"]["ipam"]["config"][0];
    let subnet = resolve(ipam["subnet"].as_str().unwrap());
    let dynamic = resolve(ipam["ip_range"].as_str().unwrap());
    let prefix = subnet.strip_suffix(".0/24").expect("a /24");
    assert_eq!(dynamic, format!("{prefix}.128/25"));
    let mut fixed = Vec::new();
    for name in [
        "redis",
        "redis-replica",
        "sentinel-1",
        "sentinel-2",
        "sentinel-3",
    ] {
        let ip = address(name);
        let last: u8 = ip
            .strip_prefix(&format!("{prefix}."))
            .unwrap_or_else(|| panic!("{name}: {ip} outside {subnet}"))
            .parse()
            .unwrap();
        assert!(
            (2..128).contains(&last),
            "{name}: {ip} in the dynamic range"
        );
        fixed.push(ip);
    }
    fixed.sort();
    fixed.dedup();
    assert_eq!(fixed.len(), 5, "distinct addresses");
    let primary = address("redis");
    for name in ["sentinel-1", "sentinel-2", "sentinel-3"] {
        let script = strings(&doc["services"][name]["command"]).join("\n");
        assert!(script.contains("port 26379"), "{name}");
        // Quorum 2 of 3: one sentinel may die (the kill-sentinel scenario).
        assert!(
            script.contains(&format!("sentinel monitor {master} {primary} 6379 2")),
            "{name} monitors {master} at the redis service's address: {script}"
        );
    }
    // Both persist with a replica (HYFHE_REDIS_AOF), the replica following the first primary.
    for (name, replicaof) in [("redis", None), ("redis-replica", Some(primary.clone()))] {
        let command: Vec<String> = doc["services"][name]["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|s| resolve_with(s.as_str().unwrap(), &vars))
            .collect();
        let after = |flag: &str| {
            command
                .iter()
                .position(|c| c == flag)
                .map(|i| command[i + 1].clone())
        };
        assert_eq!(after("--appendonly").as_deref(), Some("yes"), "{name}");
        assert_eq!(
            after("--client-output-buffer-limit").as_deref(),
            Some("replica 2gb 1gb 60"),
            "{name}: sized in ARCHITECTURE.md"
        );
        assert_eq!(after("--replicaof"), replicaof, "{name}");
    }
    // HAProxy balances over both coordinators' listen port, health-checking readiness.
    let listen_port =
        listen_port(&Config::from_toml(&docker_toml, " docker.toml", &BTreeMap::new()).unwrap());
    let haproxy = read("deploy/haproxy-ha.cfg");
    for server in ["coordinator", "coordinator-2"] {
        assert!(
            haproxy.contains(&format!("server {server} {server}:{listen_port}")),
            "haproxy-ha.cfg balances {server}:{listen_port}"
        );
    }
    assert!(haproxy.contains("option httpchk GET /health/ready"));
    let lb = &doc["services"]["lb"];
    let port = strings(&lb["ports"]).join(",");
    assert!(haproxy.contains(&format!("bind :{}", port.rsplit(':').next().unwrap())));
    for v in strings(&lb["volumes"]) {
        let host = v.split(':').next().unwrap();
        if host != "./tls" {
            assert!(
                Path::new(env!("CARGO_MANIFEST_DIR")).join(host).exists(),
                "{host}"
            );
        }
    }
    // The second coordinator is the first one behind the balancer: no port of its own.
    let second = &doc["services"]["coordinator-2"];
    assert_eq!(second["command"], doc["services"]["coordinator"]["command"]);
    assert!(second["ports"].as_sequence().unwrap().is_empty());
}

#[test]
fn the_dockerfile_builds_one_image_that_ships_the_configs() {
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.matches("FROM ").count() >= 2, "multi-stage");
    assert!(dockerfile.contains("COPY config /etc/hyfhe"));
    assert!(dockerfile.contains("ENTRYPOINT [\"hyfhe\"]"));
    // Everything the build needs is copied into the build stage.
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "src",
        "config",
        "benches",
        "loadtest",
        "tests/fixtures",
    ] {
        assert!(
            dockerfile.contains(&format!("COPY {path}"))
                || dockerfile.contains(&format!(" {path} ")),
            "{path}"
        );
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(path).exists(),
            "{path}"
        );
    }
}
