//! deploy/k8s (Kubernetes manifests), checked by parsing as the compose file is: images and
//! commands, environment overrides that apply to the config the image ships, ports and probes
//! on the listeners the config opens, memory derived from the config, disruption budgets that
//! select the pods, and the autoscaler's target and ceiling from the queue's settings.

use std::collections::BTreeMap;
use std::path::Path;

use hyfhe::config::Config;
use serde::Deserialize;
use serde_yaml::Value;

fn read(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(name)).unwrap()
}

/// Every document of every manifest, by `kind/name`.
fn manifests() -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for file in [
        "redis.yaml",
        "redis-sentinel.yaml",
        "coordinator.yaml",
        "worker.yaml",
    ] {
        let text = read(&format!("deploy/k8s/{file}"));
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
            let key = format!(
                "{}/{}",
                v["kind"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{file}: no kind")),
                v["metadata"]["name"].as_str().unwrap()
            );
            assert!(out.insert(key.clone(), v).is_none(), "{key} twice");
        }
    }
    out
}

fn port_of(listen: &str) -> u64 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

/// `16Gi`, `512Mi` → bytes.
fn bytes(quantity: &str) -> u64 {
    let (n, unit) = quantity.split_at(quantity.find(|c: char| c.is_alphabetic()).unwrap());
    let shift = match unit {
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        other => panic!("unit {other}"),
    };
    n.parse::<u64>().unwrap() << shift
}

/// The one container of a Deployment, its config with the container's environment applied to
/// docker.toml (the image's config), and its labels.
fn deployment(m: &BTreeMap<String, Value>, name: &str) -> (Value, Config) {
    let d = &m[&format!("Deployment/{name}")];
    let selector = &d["spec"]["selector"]["matchLabels"];
    let labels = &d["spec"]["template"]["metadata"]["labels"];
    for (k, v) in selector.as_mapping().unwrap() {
        assert_eq!(
            &labels[k.as_str().unwrap()],
            v,
            "{name}: the selector picks its pods"
        );
    }
    let containers = d["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap();
    assert_eq!(containers.len(), 1, "{name}");
    let c = containers[0].clone();
    assert_eq!(c["image"].as_str(), Some("hyfhe:latest"), "{name}");
    let mut overrides = BTreeMap::new();
    for e in c["env"].as_sequence().unwrap() {
        let key = e["name"].as_str().unwrap().to_string();
        let value = match e["value"].as_str() {
            Some(v) => v.to_string(),
            // From the pod (its name as the worker id): any value of the right form.
            None => "pod-name-0".to_string(),
        };
        if key == hyfhe::config::TENANTS_FILE_ENV {
            continue; // read by the coordinator at start, checked below
        }
        assert!(key.starts_with("HYFHE__"), "{name}: {key}");
        overrides.insert(key, value);
    }
    let config = Config::from_toml(&read("config/docker.toml"), " docker.toml", &overrides)
        .unwrap_or_else(|e| panic!("{name}'s environment: {e}"));
    (c, config)
}

fn container_port(c: &Value, port_name: &str) -> u64 {
    c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some(port_name))
        .unwrap_or_else(|| panic!("no port {port_name}"))["containerPort"]
        .as_u64()
        .unwrap()
}

#[test]
fn the_kubernetes_manifests_agree_with_the_config_and_the_cli() {
    let m = manifests();
    let redis_port = m["Service/redis"]["spec"]["ports"][0]["port"]
        .as_u64()
        .unwrap();

    for (name, role) in [
        ("hyfhe-coordinator", "coordinator"),
        ("hyfhe-worker", "worker"),
    ] {
        let (c, config) = deployment(&m, name);
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args, [role, "--config", "/etc/hyfhe/docker.toml"]);
        assert_eq!(
            config.queue.redis_url,
            format!("redis://redis:{redis_port}"),
            "{name} points at the redis Service"
        );
        // The models are mounted where the config reads them.
        let dir = config.models.dir.to_str().unwrap();
        assert!(
            c["volumeMounts"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|v| v["mountPath"].as_str() == Some(dir)),
            "{name}: {dir} mounted"
        );
        // Probes on the health routes of the listener the config opens.
        let (listen, port_name) = match role {
            "coordinator" => (&config.coordinator.listen, "api"),
            _ => (&config.worker.listen, "http"),
        };
        assert_eq!(container_port(&c, port_name), port_of(listen), "{name}");
        for (probe, path) in [
            ("readinessProbe", "/health/ready"),
            ("livenessProbe", "/health/live"),
        ] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{name} {probe}");
            assert_eq!(get["port"].as_str(), Some(port_name), "{name} {probe}");
        }
        let limit = bytes(c["resources"]["limits"]["memory"].as_str().unwrap());
        let request = bytes(c["resources"]["requests"]["memory"].as_str().unwrap());
        assert!(
            request <= limit,
            "{name}: request {request} over limit {limit}"
        );
        // A disruption budget selecting these pods.
        let pdb = &m[&format!("PodDisruptionBudget/{name}")];
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"],
            m[&format!("Deployment/{name}")]["spec"]["selector"]["matchLabels"],
            "{name}'s budget selects its pods"
        );
        if role == "coordinator" {
            assert_eq!(
                container_port(&c, "metrics"),
                port_of(&config.coordinator.metrics_listen)
            );
            let service = &m["Service/hyfhe-coordinator"];
            assert_eq!(
                service["spec"]["ports"][0]["targetPort"].as_str(),
                Some("api")
            );
            let replicas = m["Deployment/hyfhe-coordinator"]["spec"]["replicas"]
                .as_u64()
                .unwrap();
            assert!(replicas >= 2, "more than one front door");
            assert!(pdb["spec"]["minAvailable"].as_u64().unwrap() < replicas);
            let tenants = c["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|e| e["name"].as_str() == Some(hyfhe::config::TENANTS_FILE_ENV))
                .and_then(|e| e["value"].as_str())
                .expect("tenants from a file");
            let mount = c["volumeMounts"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| v["name"].as_str() == Some("tenants"))
                .and_then(|v| v["mountPath"].as_str())
                .unwrap();
            assert!(
                tenants.starts_with(&format!("{mount}/")),
                "{tenants} under {mount}"
            );
        } else {
            // What the config lets a worker hold is requested (a node never overcommits
            // workers) and fits under the limit: the compose file's memory model.
            let w = &config.worker;
            let per_job = w.max_job_bytes + 3 * config.coordinator.max_body_bytes as u64;
            let model = w.key_cache_bytes + w.max_pending as u64 * per_job;
            assert!(model <= request, "worker request {request} below {model}");
            assert!(model < limit);
            // The pod waits out the drain before it is killed.
            let grace = m["Deployment/hyfhe-worker"]["spec"]["template"]["spec"]
                ["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap();
            assert!(grace > 60, "grace {grace} s covers the 60 s drain");
            let id = c["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|e| e["name"].as_str() == Some("HYFHE__WORKER__ID"))
                .expect("a worker id per pod");
            assert_eq!(
                id["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
                Some("metadata.name")
            );
            // The autoscaler: the cluster-wide backlog over what one worker holds, never past
            // what the shard count can grow to with two shards per worker (a shard is read by
            // one worker at a time; `grown_shards`).
            let so = &m["ScaledObject/hyfhe-worker"];
            assert_eq!(
                so["spec"]["scaleTargetRef"]["name"].as_str(),
                Some("hyfhe-worker")
            );
            let max = so["spec"]["maxReplicaCount"].as_u64().unwrap();
            let q = &config.queue;
            assert!(
                max > q.shards as u64 && 2 * max <= q.max_shards as u64,
                "{max} workers"
            );
            assert_eq!(
                hyfhe::queue::grown_shards(q.shards, max as usize, q.max_shards) as u64,
                2 * max,
                "each of the most workers keeps two shards"
            );
            let trigger = &so["spec"]["triggers"][0];
            assert_eq!(trigger["type"].as_str(), Some("prometheus"));
            assert!(trigger["metadata"]["query"]
                .as_str()
                .unwrap()
                .contains("hyfhe_queue_lag"));
            assert_eq!(
                trigger["metadata"]["threshold"].as_str(),
                Some(w.max_pending.to_string().as_str())
            );
            // The comment names the streams and group the lag is read from: keep them true.
            let text = read("deploy/k8s/worker.yaml");
            let stream = hyfhe::queue::job_stream(0);
            assert!(
                text.contains(&format!("`{}{{shard}}`", stream.trim_end_matches('0')))
                    && text.contains(&format!(
                        "consumer group `{}`",
                        hyfhe::queue::CONSUMER_GROUP
                    )),
                "worker.yaml names the job streams and consumer group"
            );
        }
    }
}

/// The size `client-output-buffer-limit replica` must hold at least: one burst of session
/// creations on every coordinator, each with the largest keys a session uploads (~170 MiB,
/// BENCHMARKS.md).
const LARGEST_SESSION_KEYS: u64 = 170 << 20;

#[test]
fn the_sentinel_manifests_monitor_what_the_documented_url_names_with_a_quorum() {
    let m = manifests();
    let conf = &m["ConfigMap/redis-ha"]["data"];
    let sentinel = conf["sentinel.conf"].as_str().unwrap();
    let monitor: Vec<&str> = sentinel
        .lines()
        .find(|l| l.starts_with("sentinel monitor "))
        .expect("a monitored master")
        .split_whitespace()
        .collect();
    let (master, quorum) = (monitor[2], monitor[5].parse::<u64>().unwrap());
    let sentinels = m["Deployment/redis-sentinel"]["spec"]["replicas"]
        .as_u64()
        .unwrap();
    assert!(
        2 * quorum > sentinels && quorum <= sentinels,
        "quorum {quorum} of {sentinels}"
    );
    let pdb = m["PodDisruptionBudget/redis-sentinel"]["spec"]["minAvailable"]
        .as_u64()
        .unwrap();
    assert!(pdb >= quorum, "a disruption leaves a quorum");
    // The monitored primary is pod 0 of the StatefulSet, through its headless Service.
    assert_eq!(monitor[3], "redis-ha-0.redis-ha");
    assert_eq!(
        m["Service/redis-ha"]["spec"]["clusterIP"].as_str(),
        Some("None")
    );
    // The URL the file tells operators to use names this Service, port and master, and the
    // config accepts it.
    let port = m["Service/redis-sentinel"]["spec"]["ports"][0]["port"]
        .as_u64()
        .unwrap();
    let url = format!("redis+sentinel://redis-sentinel:{port}/{master}");
    let text = read("deploy/k8s/redis-sentinel.yaml");
    assert!(
        text.contains(&format!("HYFHE__QUEUE__REDIS_URL={url}")),
        "{url}"
    );
    let overrides = BTreeMap::from([("HYFHE__QUEUE__REDIS_URL".to_string(), url.clone())]);
    let config = Config::from_toml(&read("config/docker.toml"), " docker.toml", &overrides)
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    // Replica output buffers hold a burst of session creations on every coordinator.
    let limit = conf["redis.conf"]
        .as_str()
        .unwrap()
        .lines()
        .find(|l| l.starts_with("client-output-buffer-limit replica "))
        .expect("a replica output-buffer limit")
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string();
    let hard = limit.trim_end_matches("gb").parse::<u64>().unwrap() << 30;
    let coordinators = m["Deployment/hyfhe-coordinator"]["spec"]["replicas"]
        .as_u64()
        .unwrap();
    let burst =
        coordinators * config.coordinator.max_session_creations as u64 * LARGEST_SESSION_KEYS;
    assert!(hard >= burst, "replica buffer {limit} below {burst} bytes");
}
