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
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed ${") + start;
        let inner = &rest[start + 2..end];
        out.push_str(inner.split_once(":-").map_or("", |(_, d)| d));
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
