//! Configuration: every shipped file loads, environment overrides apply, and mistakes stop the
//! service naming the key.

use std::collections::BTreeMap;
use std::path::Path;

use hyfhe::config::{Config, QueueBackend, DEFAULT_TOML};

fn file(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(name)).unwrap()
}

fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn error(text: &str, overrides: &[(&str, &str)]) -> String {
    Config::from_toml(text, " test", &vars(overrides))
        .unwrap_err()
        .to_string()
}

#[test]
fn the_shipped_configs_load_and_docker_uses_redis() {
    let default = Config::from_toml(DEFAULT_TOML, "", &BTreeMap::new()).unwrap();
    assert_eq!(default.queue.backend, QueueBackend::Memory);
    assert_eq!(default.tenants.len(), 1);
    assert!(default.tenant_for_key("hyfhe-demo-key").is_some());
    assert!(default.tenant_for_key("hyfhe-demo-kez").is_none());
    let docker = Config::from_toml(&file("config/docker.toml"), "", &BTreeMap::new()).unwrap();
    assert_eq!(docker.queue.backend, QueueBackend::Redis);
    assert_eq!(docker.queue.redis_url, "redis://redis:6379");
}

#[test]
fn environment_overrides_take_the_type_of_the_key_they_replace() {
    let c = Config::from_toml(
        DEFAULT_TOML,
        "",
        &vars(&[
            ("HYFHE__QUEUE__BACKEND", "redis"),
            ("HYFHE__QUEUE__REDIS_URL", "redis://cache:6380"),
            ("HYFHE__WORKER__MAX_PENDING", "7"),
        ]),
    )
    .unwrap();
    assert_eq!(c.queue.backend, QueueBackend::Redis);
    assert_eq!(c.queue.redis_url, "redis://cache:6380");
    assert_eq!(c.worker.max_pending, 7);
}

#[test]
fn unknown_keys_and_bad_values_fail_naming_the_key() {
    let e = error(&format!("{DEFAULT_TOML}\n[extra]\nx = 1\n"), &[]);
    assert!(e.contains("extra"), "{e}");
    let typo = DEFAULT_TOML.replace("max_in_flight = 64", "max_in_flite = 64");
    let e = error(&typo, &[]);
    assert!(e.contains("max_in_flite"), "{e}");
    let e = error(DEFAULT_TOML, &[("HYFHE__WORKER__MAX_PENDNG", "3")]);
    assert!(
        e.contains("worker.max_pendng") && e.contains("not a known key"),
        "{e}"
    );
    let e = error(DEFAULT_TOML, &[("HYFHE__WORKER__MAX_PENDING", "many")]);
    assert!(
        e.contains("worker.max_pending") && e.contains("integer"),
        "{e}"
    );
    let e = error(DEFAULT_TOML, &[("HYFHE__QUEUE__SHARDS", "0")]);
    assert!(e.contains("queue.shards"), "{e}");
    let e = error(DEFAULT_TOML, &[("HYFHE__QUEUE__MAX_SHARDS", "8")]);
    assert!(
        e.contains("queue.max_shards") && e.contains("only grows"),
        "{e}"
    );
    let e = error(
        DEFAULT_TOML,
        &[("HYFHE__COORDINATOR__LISTEN", "everywhere")],
    );
    assert!(e.contains("coordinator.listen"), "{e}");
    let e = error(DEFAULT_TOML, &[("HYFHE__QUEUE__LEASE_TTL_MS", "1500")]);
    assert!(
        e.contains("queue.lease_ttl_ms") && e.contains("heartbeat"),
        "{e}"
    );
    let e = error(DEFAULT_TOML, &[("HYFHE__QUEUE__BACKEND", "kafka")]);
    assert!(e.contains("kafka"), "{e}");
    let bad_hash = DEFAULT_TOML.replace(
        "889e795705ba97234307b5c3bfcf4c07a923208b7ff1433840afc510d8da1901",
        "hyfhe-demo-key",
    );
    let e = error(&bad_hash, &[]);
    assert!(e.contains("tenants[0].api_key_sha256"), "{e}");
    // One API key for two tenants would act as whichever is listed first: refused at start.
    let twice = format!(
        "{DEFAULT_TOML}\n[[tenants]]\nname = \"copy\"\napi_key_sha256 = \"889E795705BA97234307B5C3BFCF4C07A923208B7FF1433840AFC510D8DA1901\"\n"
    );
    let e = error(&twice, &[]);
    assert!(
        e.contains("tenants[1].api_key_sha256") && e.contains("\"demo\""),
        "{e}"
    );
    // Outcomes must outlive the deadline of the request that waits for them.
    let e = error(
        DEFAULT_TOML,
        &[
            ("HYFHE__QUEUE__RESULT_TTL_MS", "60000"),
            ("HYFHE__COORDINATOR__REQUEST_TIMEOUT_MS", "120000"),
        ],
    );
    assert!(
        e.contains("queue.result_ttl_ms") && e.contains("request_timeout_ms"),
        "{e}"
    );
}

#[test]
fn a_tenant_may_be_limited_to_some_models_and_is_allowed_all_by_default() {
    let text = format!(
        "{DEFAULT_TOML}\n[[tenants]]\nname = \"narrow\"\napi_key_sha256 = \"{}\"\nmodels = [\"digits_mlp\"]\n",
        hyfhe::config::hash_api_key("narrow-key")
    );
    let config = Config::from_toml(&text, "", &Default::default()).unwrap();
    assert!(config.may_use("narrow", "digits_mlp"));
    assert!(!config.may_use("narrow", "fc_small"));
    assert!(config.may_use("demo", "fc_small"), "no list: every model");
}

#[test]
fn a_service_with_a_bad_config_exits_with_the_key_in_its_message() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hyfhe"))
        .args(["coordinator"])
        .env("HYFHE__COORDINATOR__MAX_IN_FLIGHT", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("coordinator.max_in_flight"), "{stderr}");
}
