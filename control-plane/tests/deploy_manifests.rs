//! The deployment files of a horizontally scaled control plane: `deploy/cluster/` (Docker
//! Compose, its nginx load balancer, the shared server config) and `deploy/k8s/` (Kustomize).
//! They are parsed, checked against each other, and the server configuration they carry is loaded
//! through the server's own parser, so an unknown key or a bad value fails here.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use codebolt::config::{env_vars, ServerConfig, StoreConfig};
use regex::Regex;
use serde::Deserialize;
use serde_yaml::Value;

const IMAGE: &str = "codebolt/control-plane:latest";
const REPLICAS: [&str; 3] = ["cp-1", "cp-2", "cp-3"];
/// Stands in for the operator's `CODEBOLT_API_TOKENS` when the Compose file is interpolated.
const SAMPLE_TOKENS: &str = "sample-token-1,sample-token-2";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the repository")
        .join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

/// Every YAML document of a file, `<<` merge keys applied; empty documents are skipped.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    yaml_documents_of(&text, path)
}

fn yaml_documents_of(text: &str, path: &Path) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .enumerate()
        .map(|(i, document)| {
            let mut value = Value::deserialize(document).unwrap_or_else(|err| {
                panic!("{}: document {i} is not valid YAML: {err}", path.display())
            });
            value
                .apply_merge()
                .unwrap_or_else(|err| panic!("{}: bad merge key: {err}", path.display()));
            value
        })
        .filter(|value| !value.is_null())
        .collect()
}

/// The value at a dotted path, or a failure naming the file and the path.
fn at<'a>(value: &'a Value, path: &str, file: &str) -> &'a Value {
    path.split('.')
        .fold(value, |node, key| match node.get(key) {
            Some(next) => next,
            None => panic!("{file}: `{path}` is missing (no `{key}`)"),
        })
}

fn text<'a>(value: &'a Value, path: &str, file: &str) -> &'a str {
    at(value, path, file)
        .as_str()
        .unwrap_or_else(|| panic!("{file}: `{path}` is not a string"))
}

fn seq<'a>(value: &'a Value, path: &str, file: &str) -> &'a Vec<Value> {
    at(value, path, file)
        .as_sequence()
        .unwrap_or_else(|| panic!("{file}: `{path}` is not a list"))
}

fn strings(values: &[Value], what: &str) -> Vec<String> {
    values
        .iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => panic!("{what}: expected a string, found {other:?}"),
        })
        .collect()
}

/// The argument following `flag` in a command line.
fn flag_value<'a>(args: &'a [String], flag: &str, what: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{what}: no `{flag}` in {args:?}"));
    args.get(i + 1)
        .unwrap_or_else(|| panic!("{what}: `{flag}` has no value in {args:?}"))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("`{addr}` is not host:port"))
}

fn load_server_config(path: &Path, env: &HashMap<String, String>) -> ServerConfig {
    ServerConfig::load(Some(path), env).unwrap_or_else(|err| {
        panic!(
            "{} does not load through the server's config parser: {err}",
            path.display()
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Docker Compose

const COMPOSE: &str = "deploy/cluster/compose.yaml";

/// Replaces `${VAR}`, `${VAR:?message}` and `${VAR:-default}` as Compose does: from `vars`, else
/// the default; a variable with neither fails.
fn interpolate(raw: &str, vars: &HashMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = start
            + rest[start..]
                .find('}')
                .unwrap_or_else(|| panic!("{COMPOSE}: unclosed `${{` in {rest:?}"));
        let expr = &rest[start + 2..end];
        let name_len = expr
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(expr.len());
        let (name, modifier) = expr.split_at(name_len);
        let value = match (vars.get(name), modifier.strip_prefix(":-")) {
            (Some(value), _) => value.to_string(),
            (None, Some(default)) => default.to_string(),
            (None, None) => {
                panic!("{COMPOSE}: `${{{expr}}}` needs {name}, which the test does not set")
            }
        };
        out.push_str(&value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The Compose file as Compose sees it with `CODEBOLT_API_TOKENS` set.
fn compose() -> Value {
    let path = deploy_dir().join("cluster/compose.yaml");
    let vars = HashMap::from([(env_vars::API_TOKENS, SAMPLE_TOKENS)]);
    let text = interpolate(&read(&path), &vars);
    let mut documents = yaml_documents_of(&text, &path);
    assert_eq!(documents.len(), 1, "{COMPOSE}: expected one YAML document");
    documents.remove(0)
}

fn services(compose: &Value) -> &serde_yaml::Mapping {
    at(compose, "services", COMPOSE)
        .as_mapping()
        .unwrap_or_else(|| panic!("{COMPOSE}: `services` is not a mapping"))
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    services(compose)
        .get(name)
        .unwrap_or_else(|| panic!("{COMPOSE}: no service `{name}`"))
}

/// Names of the services running the control-plane image.
fn replica_names(compose: &Value) -> Vec<String> {
    let mut names: Vec<String> = services(compose)
        .iter()
        .filter(|(_, s)| s.get("image").and_then(Value::as_str) == Some(IMAGE))
        .map(|(name, _)| {
            name.as_str()
                .expect("service names are strings")
                .to_string()
        })
        .collect();
    names.sort();
    names
}

/// A service's environment, whether written as a mapping or as `KEY=VALUE` items.
fn service_env(service: &Value, what: &str) -> HashMap<String, String> {
    match service.get("environment") {
        None => HashMap::new(),
        Some(Value::Mapping(map)) => map
            .iter()
            .map(|(k, v)| {
                let key = k
                    .as_str()
                    .expect("environment keys are strings")
                    .to_string();
                let value = strings(std::slice::from_ref(v), what).remove(0);
                (key, value)
            })
            .collect(),
        Some(Value::Sequence(items)) => strings(items, what)
            .into_iter()
            .map(|item| match item.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (item, String::new()),
            })
            .collect(),
        Some(other) => panic!("{what}: `environment` is neither a mapping nor a list: {other:?}"),
    }
}

/// A service's short-syntax volumes as (source, target, read-only).
fn volumes(service: &Value, what: &str) -> Vec<(String, String, bool)> {
    let Some(items) = service.get("volumes").and_then(Value::as_sequence) else {
        return Vec::new();
    };
    strings(items, what)
        .into_iter()
        .map(|volume| {
            let parts: Vec<&str> = volume.split(':').collect();
            match parts.as_slice() {
                [source, target] => (source.to_string(), target.to_string(), false),
                [source, target, mode] => (
                    source.to_string(),
                    target.to_string(),
                    mode.split(',').any(|m| m == "ro"),
                ),
                _ => panic!("{what}: volume `{volume}` is not source:target[:mode]"),
            }
        })
        .collect()
}

fn command(service: &Value, what: &str) -> Vec<String> {
    strings(seq(service, "command", what), what)
}

#[test]
fn compose_runs_redis_and_exactly_three_replicas_that_wait_for_it() {
    let compose = compose();
    let redis = service(&compose, "redis");
    let image = text(redis, "image", "compose service redis");
    assert!(
        image.starts_with("redis:7"),
        "{COMPOSE}: redis runs `{image}`"
    );
    let ping = strings(
        seq(redis, "healthcheck.test", "compose service redis"),
        "redis healthcheck",
    )
    .join(" ");
    assert!(
        ping.contains("redis-cli") && ping.contains("ping"),
        "{COMPOSE}: the redis healthcheck is `{ping}`, not `redis-cli ping`"
    );

    assert_eq!(
        replica_names(&compose),
        REPLICAS,
        "{COMPOSE}: the services running {IMAGE}"
    );
    for name in REPLICAS {
        let what = format!("{COMPOSE}: service {name}");
        let replica = service(&compose, name);
        assert_eq!(
            text(replica, "depends_on.redis.condition", &what),
            "service_healthy",
            "{what} must wait for a healthy redis"
        );
        assert!(
            replica.get("ports").is_none(),
            "{what} publishes ports; only the load balancer may"
        );
        let env = service_env(replica, &what);
        assert_eq!(
            env.get(env_vars::API_TOKENS).map(String::as_str),
            Some(SAMPLE_TOKENS),
            "{what}: {} must come from the operator's environment",
            env_vars::API_TOKENS
        );
    }
}

#[test]
fn every_replica_is_healthy_only_when_readyz_answers() {
    let compose = compose();
    for name in REPLICAS {
        let what = format!("{COMPOSE}: service {name}");
        let replica = service(&compose, name);
        let test = strings(seq(replica, "healthcheck.test", &what), &what);
        let listen = flag_value(&command(replica, &what), "--listen", &what).to_string();
        let readyz = format!("127.0.0.1:{}/readyz", port_of(&listen));
        assert!(
            test.iter().any(|arg| arg.contains(&readyz)),
            "{what}: the healthcheck {test:?} does not request {readyz}"
        );
        // The image has no shell and no HTTP client: the probe must be mounted into it.
        assert_eq!(
            test.first().map(String::as_str),
            Some("CMD"),
            "{what}: the image has no shell, so the healthcheck must be an exec (CMD) form"
        );
        let probe = test
            .get(1)
            .unwrap_or_else(|| panic!("{what}: empty healthcheck"));
        let mounts = volumes(replica, &what);
        assert!(
            mounts
                .iter()
                .any(|(_, target, _)| probe.starts_with(&format!("{target}/"))),
            "{what}: the healthcheck runs {probe}, which no volume provides ({mounts:?})"
        );
    }
}

#[test]
fn the_replicas_share_server_yaml_read_only_and_listen_beyond_loopback() {
    let compose = compose();
    for name in REPLICAS {
        let what = format!("{COMPOSE}: service {name}");
        let replica = service(&compose, name);
        let args = command(replica, &what);
        assert_eq!(args.first().map(String::as_str), Some("server"), "{what}");
        let listen = flag_value(&args, "--listen", &what);
        assert!(
            listen.starts_with("0.0.0.0:"),
            "{what}: listens on {listen}, which the load balancer cannot reach"
        );
        let config = flag_value(&args, "--config", &what);
        let mounts = volumes(replica, &what);
        let mount = mounts
            .iter()
            .find(|(_, target, _)| target == config)
            .unwrap_or_else(|| panic!("{what}: --config {config} is not a mounted file"));
        assert_eq!(mount.0, "./server.yaml", "{what}: mounted at {config}");
        assert!(mount.2, "{what}: server.yaml must be mounted read-only");
    }
}

#[test]
fn only_the_load_balancer_publishes_a_port() {
    let compose = compose();
    let what = format!("{COMPOSE}: service lb");
    let lb = service(&compose, "lb");
    assert!(
        text(lb, "image", &what).starts_with("nginx:"),
        "{what} is not nginx"
    );
    assert_eq!(
        strings(seq(lb, "ports", &what), &what),
        ["7420:7420"],
        "{what}: published ports"
    );
    assert!(
        volumes(lb, &what)
            .iter()
            .any(|(source, target, ro)| source == "./nginx.conf"
                && target == "/etc/nginx/nginx.conf"
                && *ro),
        "{what}: nginx.conf is not mounted read-only as /etc/nginx/nginx.conf"
    );
    for name in REPLICAS {
        assert!(
            lb.get("depends_on").and_then(|d| d.get(name)).is_some(),
            "{what} does not depend on {name}"
        );
    }
    for (name, service) in services(&compose) {
        let name = name.as_str().unwrap_or_default();
        if name != "lb" {
            assert!(
                service.get("ports").is_none(),
                "{COMPOSE}: {name} publishes ports"
            );
        }
    }
}

#[test]
fn the_cluster_server_config_loads_through_the_real_parser() {
    let compose = compose();
    let path = deploy_dir().join("cluster/server.yaml");
    for name in REPLICAS {
        let what = format!("{COMPOSE}: service {name}");
        let env = service_env(service(&compose, name), &what);
        let config = load_server_config(&path, &env);
        assert_eq!(
            config.store,
            StoreConfig::Redis {
                url: "redis://redis:6379".into()
            },
            "{}: the store of {name}",
            path.display()
        );
        assert_eq!(
            config.public_url.as_ref().map(url::Url::as_str),
            Some("http://lb:7420/"),
            "{}: sandboxes of {name} must call back through the load balancer",
            path.display()
        );
        assert_eq!(config.cluster_id, "codebolt", "{}", path.display());
        let tokens: Vec<&str> = config.api_tokens.iter().map(|t| t.expose()).collect();
        assert_eq!(
            tokens,
            SAMPLE_TOKENS.split(',').collect::<Vec<_>>(),
            "{name}: API tokens from {}",
            env_vars::API_TOKENS
        );
    }
    // The load balancer it names serves that port.
    let lb = service(&compose, "lb");
    let published = strings(seq(lb, "ports", "compose service lb"), "compose service lb");
    assert!(
        published.iter().any(|p| p.ends_with(":7420")),
        "{COMPOSE}: lb does not serve port 7420 ({published:?})"
    );
    assert_directive(
        &nginx_directives(&nginx_block(&nginx_conf(), "server").replace(['{', '}'], ";")),
        "listen 7420",
        "server",
    );
}

// ---------------------------------------------------------------------------------------------
// nginx

const NGINX: &str = "deploy/cluster/nginx.conf";

fn nginx_conf() -> String {
    read(&deploy_dir().join("cluster/nginx.conf"))
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The body of the block opened by `header` (whitespace-insensitive), up to its matching brace.
fn nginx_block<'a>(conf: &'a str, header: &str) -> &'a str {
    let pattern = header
        .split_whitespace()
        .map(regex::escape)
        .collect::<Vec<_>>()
        .join(r"\s+");
    let open = Regex::new(&format!(r"(?m)^\s*{pattern}\s*\{{"))
        .expect("valid pattern")
        .find(conf)
        .unwrap_or_else(|| panic!("{NGINX}: no block `{header} {{`"));
    let body = &conf[open.end()..];
    let mut depth = 1;
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return &body[..i];
                }
            }
            _ => {}
        }
    }
    panic!("{NGINX}: block `{header}` is not closed")
}

/// The directives of a block without nested blocks, whitespace collapsed.
fn nginx_directives(block: &str) -> Vec<String> {
    block
        .split(';')
        .map(|d| d.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|d| !d.is_empty())
        .collect()
}

fn assert_directive(directives: &[String], expected: &str, block: &str) {
    assert!(
        directives.iter().any(|d| d == expected),
        "{NGINX}: `{block}` lacks `{expected};` (has {directives:?})"
    );
}

#[test]
fn the_load_balancer_spreads_over_the_three_replicas() {
    let conf = nginx_conf();
    let upstream = Regex::new(r"upstream\s+(\S+)\s*\{")
        .expect("valid pattern")
        .captures(&conf)
        .unwrap_or_else(|| panic!("{NGINX}: no upstream block"))[1]
        .to_string();
    let servers: BTreeSet<String> =
        nginx_directives(nginx_block(&conf, &format!("upstream {upstream}")))
            .iter()
            .filter_map(|d| d.strip_prefix("server "))
            .filter_map(|d| d.split_whitespace().next().map(String::from))
            .collect();

    let compose = compose();
    let expected: BTreeSet<String> = replica_names(&compose)
        .iter()
        .map(|name| {
            let what = format!("{COMPOSE}: service {name}");
            let listen =
                flag_value(&command(service(&compose, name), &what), "--listen", &what).to_string();
            format!("{name}:{}", port_of(&listen))
        })
        .collect();
    assert_eq!(
        servers, expected,
        "{NGINX}: servers of upstream `{upstream}`"
    );

    let passes: Vec<String> = nginx_directives(&conf.replace(['{', '}'], ";"))
        .into_iter()
        .filter(|d| d.starts_with("proxy_pass "))
        .collect();
    assert!(!passes.is_empty(), "{NGINX}: no proxy_pass");
    for pass in &passes {
        assert_eq!(
            pass,
            &format!("proxy_pass http://{upstream}"),
            "{NGINX}: a location bypasses the upstream"
        );
    }

    let server = nginx_directives(&nginx_block(&conf, "server").replace(['{', '}'], ";"));
    assert_directive(&server, "listen 7420", "server");
    assert_directive(&server, "proxy_http_version 1.1", "server");
    assert_directive(&server, "proxy_next_upstream error timeout", "server");
}

#[test]
fn the_load_balancer_upgrades_the_shim_websocket() {
    let conf = nginx_conf();
    let location = "location = /v1/sandbox/connect";
    let directives = nginx_directives(nginx_block(&conf, location));
    assert_directive(
        &directives,
        "proxy_set_header Upgrade $http_upgrade",
        location,
    );
    let connection = directives
        .iter()
        .find(|d| d.starts_with("proxy_set_header Connection "))
        .unwrap_or_else(|| panic!("{NGINX}: `{location}` does not pass the Connection header"));
    let value = connection.trim_start_matches("proxy_set_header Connection ");
    if let Some(variable) = value.strip_prefix('$') {
        let map = nginx_directives(nginx_block(
            &conf,
            &format!("map $http_upgrade ${variable}"),
        ));
        assert!(
            map.iter().any(|d| d == "default upgrade"),
            "{NGINX}: ${variable} does not default to `upgrade` ({map:?})"
        );
    } else {
        assert_eq!(value, "upgrade", "{NGINX}: `{location}` Connection header");
    }
    assert!(
        directives
            .iter()
            .any(|d| d.starts_with("proxy_read_timeout ")),
        "{NGINX}: `{location}` keeps the 60 s default read timeout; a run outlives it"
    );
}

#[test]
fn the_load_balancer_streams_events_and_logs_unbuffered() {
    let conf = nginx_conf();
    let header = Regex::new(r"location\s+~\s+(\S+)\s*\{")
        .expect("valid pattern")
        .captures_iter(&conf)
        .map(|c| {
            (
                c[0].trim_end_matches('{').trim().to_string(),
                c[1].to_string(),
            )
        })
        .collect::<Vec<_>>();
    let run = "0b6a1f7e-5a9c-4d3e-9f1a-2c3d4e5f6a7b";
    for path in [
        format!("/v1/runs/{run}/events"),
        format!("/v1/runs/{run}/logs"),
    ] {
        let (location, _) = header
            .iter()
            .find(|(_, pattern)| Regex::new(pattern).is_ok_and(|re| re.is_match(&path)))
            .unwrap_or_else(|| panic!("{NGINX}: no regex location matches {path}"));
        let directives = nginx_directives(nginx_block(&conf, location));
        assert_directive(&directives, "proxy_buffering off", location);
        assert!(
            directives
                .iter()
                .any(|d| d.starts_with("proxy_read_timeout ")),
            "{NGINX}: `{location}` keeps the 60 s default read timeout"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

const K8S: &str = "deploy/k8s";

/// Every manifest listed in `kustomization.yaml`, with the file it came from.
fn k8s_manifests() -> Vec<(String, Value)> {
    let dir = deploy_dir().join("k8s");
    let kustomization = yaml_documents(&dir.join("kustomization.yaml")).remove(0);
    let what = format!("{K8S}/kustomization.yaml");
    let resources = strings(seq(&kustomization, "resources", &what), &what);
    assert!(!resources.is_empty(), "{what}: no resources");
    let mut manifests = Vec::new();
    for file in resources {
        let path = dir.join(&file);
        assert!(path.is_file(), "{what} lists {file}, which does not exist");
        let documents = yaml_documents(&path);
        assert!(!documents.is_empty(), "{K8S}/{file}: no manifests");
        for doc in documents {
            let name = format!("{K8S}/{file}");
            for key in ["apiVersion", "kind", "metadata.name"] {
                text(&doc, key, &name);
            }
            manifests.push((name, doc));
        }
    }
    manifests
}

fn find<'a>(manifests: &'a [(String, Value)], kind: &str, name: &str) -> (&'a str, &'a Value) {
    manifests
        .iter()
        .find(|(file, doc)| {
            text(doc, "kind", file) == kind && text(doc, "metadata.name", file) == name
        })
        .map(|(file, doc)| (file.as_str(), doc))
        .unwrap_or_else(|| panic!("{K8S}: no {kind} `{name}` among the kustomization's resources"))
}

/// The Deployment running the control-plane image, and that container.
fn control_plane(manifests: &[(String, Value)]) -> (&str, &Value, &Value) {
    manifests
        .iter()
        .filter(|(file, doc)| text(doc, "kind", file) == "Deployment")
        .find_map(|(file, doc)| {
            seq(doc, "spec.template.spec.containers", file)
                .iter()
                .find(|c| c.get("image").and_then(Value::as_str) == Some(IMAGE))
                .map(|container| (file.as_str(), doc, container))
        })
        .unwrap_or_else(|| panic!("{K8S}: no Deployment runs {IMAGE}"))
}

/// Whether every label of `selector` is on `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_mapping()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The container port a probe or Service names, by name or number.
fn container_port(container: &Value, port: &Value, what: &str) -> u64 {
    if let Some(number) = port.as_u64() {
        return number;
    }
    let name = port
        .as_str()
        .unwrap_or_else(|| panic!("{what}: bad port {port:?}"));
    seq(container, "ports", what)
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
        .and_then(|p| p.get("containerPort").and_then(Value::as_u64))
        .unwrap_or_else(|| panic!("{what}: the container has no port named `{name}`"))
}

#[test]
fn every_file_of_the_kustomization_exists_and_parses() {
    let manifests = k8s_manifests();
    let kinds: BTreeSet<&str> = manifests
        .iter()
        .map(|(file, doc)| text(doc, "kind", file))
        .collect();
    for kind in ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"] {
        assert!(kinds.contains(kind), "{K8S}: no {kind} (found {kinds:?})");
    }
}

#[test]
fn the_deployment_runs_three_replicas_probed_on_readyz_and_healthz() {
    let manifests = k8s_manifests();
    let (file, deployment, container) = control_plane(&manifests);
    let what = format!(
        "{file}: Deployment {}",
        text(deployment, "metadata.name", file)
    );
    assert_eq!(
        at(deployment, "spec.replicas", &what).as_u64(),
        Some(3),
        "{what}: replicas"
    );
    assert!(
        selects(
            at(deployment, "spec.selector.matchLabels", &what),
            at(deployment, "spec.template.metadata.labels", &what)
        ),
        "{what}: the selector does not match the pod labels"
    );
    let listen = flag_value(
        &strings(seq(container, "args", &what), &what),
        "--listen",
        &what,
    )
    .to_string();
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(
            text(container, &format!("{probe}.httpGet.path"), &what),
            path,
            "{what}: {probe}"
        );
        let port = at(container, &format!("{probe}.httpGet.port"), &what);
        assert_eq!(
            container_port(container, port, &what),
            u64::from(port_of(&listen)),
            "{what}: the {probe} port is not the one the server listens on ({listen})"
        );
    }
    at(container, "resources.requests", &what);
    at(container, "resources.limits", &what);
    assert_eq!(
        at(
            deployment,
            "spec.template.spec.securityContext.runAsNonRoot",
            &what
        )
        .as_bool(),
        Some(true),
        "{what}: runAsNonRoot"
    );
    assert_eq!(
        at(container, "securityContext.readOnlyRootFilesystem", &what).as_bool(),
        Some(true),
        "{what}: readOnlyRootFilesystem"
    );
    let tokens = seq(container, "env", &what)
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(env_vars::API_TOKENS))
        .unwrap_or_else(|| panic!("{what}: no {} in env", env_vars::API_TOKENS));
    text(tokens, "valueFrom.secretKeyRef.name", &what);
    text(tokens, "valueFrom.secretKeyRef.key", &what);
}

#[test]
fn the_service_and_the_disruption_budget_cover_the_replicas() {
    let manifests = k8s_manifests();
    let (file, deployment, container) = control_plane(&manifests);
    let pod_labels = at(deployment, "spec.template.metadata.labels", file);

    let (file, service) = find(&manifests, "Service", "codebolt");
    assert!(
        selects(at(service, "spec.selector", file), pod_labels),
        "{file}: Service codebolt does not select the control-plane pods"
    );
    let ports = seq(service, "spec.ports", file);
    assert!(
        ports.iter().any(|p| {
            p.get("port").and_then(Value::as_u64) == Some(7420)
                && p.get("targetPort")
                    .is_some_and(|t| container_port(container, t, file) == 7420)
        }),
        "{file}: Service codebolt does not forward port 7420 to the server's port"
    );

    let (file, budget) = find(&manifests, "PodDisruptionBudget", "codebolt");
    assert_eq!(
        at(budget, "spec.minAvailable", file).as_u64(),
        Some(2),
        "{file}: minAvailable"
    );
    assert!(
        selects(at(budget, "spec.selector.matchLabels", file), pod_labels),
        "{file}: the PodDisruptionBudget does not select the control-plane pods"
    );
}

#[test]
fn the_configmap_server_config_loads_through_the_real_parser() {
    let manifests = k8s_manifests();
    let (file, deployment, container) = control_plane(&manifests);
    let what = format!(
        "{file}: Deployment {}",
        text(deployment, "metadata.name", file)
    );

    // The file --config names, through the volume mounted over its directory, to a ConfigMap key.
    let config_arg = flag_value(
        &strings(seq(container, "args", &what), &what),
        "--config",
        &what,
    )
    .to_string();
    let config_path = Path::new(&config_arg);
    let mount = seq(container, "volumeMounts", &what)
        .iter()
        .find(|m| m.get("mountPath").and_then(Value::as_str).map(Path::new) == config_path.parent())
        .unwrap_or_else(|| panic!("{what}: nothing is mounted over {config_arg}'s directory"));
    let volume_name = text(mount, "name", &what);
    let volume = seq(deployment, "spec.template.spec.volumes", &what)
        .iter()
        .find(|v| v.get("name").and_then(Value::as_str) == Some(volume_name))
        .unwrap_or_else(|| panic!("{what}: no volume `{volume_name}`"));
    let config_map = text(volume, "configMap.name", &what);
    let key = config_path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("--config names a file");
    let (cm_file, cm) = find(&manifests, "ConfigMap", config_map);
    let embedded = at(cm, "data", cm_file)
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{cm_file}: ConfigMap {config_map} has no `data.{key}`"));

    // The pod's environment: literal values as written, secrets as a sample token.
    let env: HashMap<String, String> = seq(container, "env", &what)
        .iter()
        .map(|e| {
            let name = text(e, "name", &what).to_string();
            let value = match e.get("value") {
                Some(v) => strings(std::slice::from_ref(v), &what).remove(0),
                None => {
                    text(e, "valueFrom.secretKeyRef.name", &what);
                    "sample-k8s-token".to_string()
                }
            };
            (name, value)
        })
        .collect();

    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(key);
    std::fs::write(&path, embedded).expect("write the embedded config");
    let config = load_server_config(&path, &env);

    let StoreConfig::Redis { url } = &config.store else {
        panic!("{cm_file}: ConfigMap {config_map} does not use a Redis store");
    };
    assert_eq!(url, "redis://redis:6379", "{cm_file}: store");
    let (redis_file, redis) = find(&manifests, "Service", "redis");
    assert!(
        seq(redis, "spec.ports", redis_file)
            .iter()
            .any(|p| p.get("port").and_then(Value::as_u64) == Some(6379)),
        "{redis_file}: Service redis does not serve 6379"
    );
    assert_eq!(
        config.public_url.as_ref().map(url::Url::as_str),
        Some("http://codebolt:7420/"),
        "{cm_file}: sandboxes must call back through the Service"
    );
    find(&manifests, "Service", "codebolt");
    assert_eq!(config.cluster_id, "codebolt", "{cm_file}: cluster_id");
    assert_eq!(
        config
            .api_tokens
            .iter()
            .map(|t| t.expose())
            .collect::<Vec<_>>(),
        ["sample-k8s-token"],
        "{what}: API tokens from {}",
        env_vars::API_TOKENS
    );
}

#[test]
fn an_unknown_key_in_a_deployed_config_fails_the_load() {
    // What the tests above rely on: the loader rejects keys it does not know.
    let original = read(&deploy_dir().join("cluster/server.yaml"));
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("server.yaml");
    std::fs::write(&path, format!("{original}\nstroe: memory\n")).expect("write config");
    let err =
        ServerConfig::load(Some(&path), &HashMap::new()).expect_err("an unknown key must not load");
    assert!(err.to_string().contains("stroe"), "{err}");
}
