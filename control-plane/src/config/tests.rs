//! Parsing `codebolt.yaml`: defaults, the seed's examples, environment overrides, and error
//! messages that name the file and the key path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use actors::model::Resources;

use super::*;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse(text: &str) -> Result<ServerConfig, ConfigError> {
    ServerConfig::from_yaml(
        text,
        Path::new("codebolt.yaml"),
        &env(&[("HOME", "/home/op")]),
    )
}

fn error(text: &str) -> String {
    match parse(text) {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(err) => err.to_string(),
    }
}

#[test]
fn no_file_gives_defaults_with_a_local_provider() {
    let config = ServerConfig::load(None, &HashMap::new()).unwrap();
    assert_eq!(config, ServerConfig::default());
    assert_eq!(config.store, StoreConfig::Memory);
    assert_eq!(config.cluster_id, "default");
    assert!(config.public_url.is_none());
    assert!(config.api_tokens.is_empty());
    let local = config.provider("local").unwrap();
    assert_eq!(local.kind(), ProviderKind::Local);
    assert_eq!(config.providers.len(), 1);
    let t = &config.timeouts;
    assert_eq!(
        (
            t.startup_s,
            t.tool_call_s,
            t.idle_s,
            t.run_ttl_s,
            t.stop_grace_s
        ),
        (60, 60, 600, None, 10)
    );
    assert_eq!(
        (
            t.lost_after_s,
            t.heartbeat_interval_ms,
            t.token_max_lifetime_s
        ),
        (60, 5000, 86_400)
    );
    assert_eq!(t.heartbeat_interval(), std::time::Duration::from_secs(5));
}

#[test]
fn empty_file_gives_defaults() {
    assert_eq!(parse("").unwrap(), ServerConfig::default());
    assert_eq!(
        parse("# only a comment\n").unwrap(),
        ServerConfig::default()
    );
}

/// The seed's three provider examples, as written there (kind taken from the key where it can be).
#[test]
fn seed_examples_parse() {
    let config = parse(
        r#"
providers:
  docker:
    socket: unix:///var/run/docker.sock
    default_image: codebolt/agent-base:latest
    default_resources:
      memory_mb: 4096
      cpu: 2
    network: bridge
    auto_remove: true
  k8s:
    kubeconfig: ~/.kube/config
    namespace: codebolt
    image_pull_secret: regcred
    default_resources:
      memory_mb: 8192
      cpu: 2
    node_selector:
      codebolt-agents: "true"
  ssh-box:
    kind: ssh
    host: agent-runner.my-org.com
    user: codebolt
    key_file: ~/.ssh/codebolt_ed25519
    work_dir: /var/lib/codebolt
"#,
    )
    .unwrap();
    let names: Vec<&str> = config.providers.keys().map(String::as_str).collect();
    assert_eq!(names, ["docker", "k8s", "local", "ssh-box"]);

    let docker = config.provider("docker").unwrap();
    assert_eq!(docker.kind(), ProviderKind::Docker);
    assert_eq!(
        docker.backend,
        BackendConfig::Docker(DockerConfig {
            socket: "unix:///var/run/docker.sock".into(),
            default_image: "codebolt/agent-base:latest".into(),
            network: "bridge".into(),
            auto_remove: true,
            ..DockerConfig::default()
        })
    );
    assert_eq!(
        docker.default_resources,
        Resources {
            memory_mb: Some(4096),
            cpu: Some(2.0),
            gpu_count: None
        }
    );

    let k8s = config.provider("k8s").unwrap();
    let BackendConfig::Kubernetes(kube) = &k8s.backend else {
        panic!("k8s is not kubernetes: {k8s:?}");
    };
    assert_eq!(
        kube.kubeconfig,
        Some(PathBuf::from("/home/op/.kube/config"))
    );
    assert_eq!(kube.namespace, "codebolt");
    assert_eq!(kube.image_pull_secret.as_deref(), Some("regcred"));
    assert_eq!(
        kube.node_selector
            .get("codebolt-agents")
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(k8s.default_resources.memory_mb, Some(8192));

    let ssh = config.provider("ssh-box").unwrap();
    assert_eq!(
        ssh.backend,
        BackendConfig::Ssh(SshConfig {
            host: "agent-runner.my-org.com".into(),
            port: 22,
            user: "codebolt".into(),
            key_file: PathBuf::from("/home/op/.ssh/codebolt_ed25519"),
            work_dir: "/var/lib/codebolt".into(),
            known_hosts: None,
        })
    );
}

/// SPEC §3 writes the same providers in flow style with an explicit `kind:`.
#[test]
fn spec_flow_style_with_explicit_kind_parses() {
    let config = parse(
        r#"
providers:
  docker:   {kind: docker, socket: unix:///var/run/docker.sock, default_image: codebolt/agent-base:latest,
             default_resources: {memory_mb: 4096, cpu: 2}, network: bridge, auto_remove: true}
  k8s:      {kind: kubernetes, kubeconfig: /etc/kube, namespace: codebolt, image_pull_secret: regcred,
             default_resources: {memory_mb: 8192, cpu: 2}, node_selector: {codebolt-agents: "true"}}
  ssh-box:  {kind: ssh, host: agent-runner.my-org.com, user: codebolt, key_file: /keys/id,
             work_dir: /var/lib/codebolt}
  gpu:      {kind: k8s, max_concurrent_runs: 4, cost: {per_gpu_hour: 2.5, minimum_billed_minutes: 1}}
"#,
    )
    .unwrap();
    assert_eq!(
        config.provider("k8s").unwrap().kind(),
        ProviderKind::Kubernetes
    );
    let gpu = config.provider("gpu").unwrap();
    assert_eq!(gpu.kind(), ProviderKind::Kubernetes);
    assert_eq!(gpu.max_concurrent_runs, Some(4));
    assert_eq!(
        gpu.cost,
        CostRates {
            per_gpu_hour: Some(2.5),
            minimum_billed_minutes: Some(1),
            ..CostRates::default()
        }
    );
}

#[test]
fn kind_defaults_fill_unset_fields() {
    let config = parse(
        "providers:\n  docker: {}\n  kubernetes: {}\n  ssh: {host: h, user: u, key_file: /k}\n",
    )
    .unwrap();
    assert_eq!(
        config.provider("docker").unwrap().backend,
        BackendConfig::Docker(DockerConfig::default())
    );
    assert_eq!(
        config.provider("kubernetes").unwrap().backend,
        BackendConfig::Kubernetes(KubernetesConfig::default())
    );
    let BackendConfig::Ssh(ssh) = &config.provider("ssh").unwrap().backend else {
        panic!("not ssh");
    };
    assert_eq!((ssh.port, ssh.work_dir.as_str()), (22, "/var/lib/codebolt"));
}

#[test]
fn server_level_keys_parse() {
    let config = parse(
        r#"
store: redis://redis:6379/0
public_url: https://codebolt.example.com/
cluster_id: prod-eu
api_tokens: [abc123, def456]
data_dir: ~/codebolt-data
timeouts: {startup_s: 120, run_ttl_s: 3600, stop_grace_s: 0, heartbeat_interval_ms: 500}
providers:
  local: {shim_path: /usr/bin/codebolt-shim, max_concurrent_runs: 2}
"#,
    )
    .unwrap();
    assert_eq!(
        config.store,
        StoreConfig::Redis {
            url: "redis://redis:6379/0".into()
        }
    );
    assert_eq!(
        config.public_url.as_ref().map(|u| u.as_str()),
        Some("https://codebolt.example.com/")
    );
    assert_eq!(config.cluster_id, "prod-eu");
    assert_eq!(config.api_tokens.len(), 2);
    assert!(config.api_tokens[0].matches("abc123"));
    assert!(!config.api_tokens[0].matches("abc124"));
    assert!(!config.api_tokens[0].matches(""));
    assert_eq!(
        config.data_dir,
        Some(PathBuf::from("/home/op/codebolt-data"))
    );
    assert_eq!(config.timeouts.startup_s, 120);
    assert_eq!(config.timeouts.run_ttl_s, Some(3600));
    assert_eq!(config.timeouts.stop_grace_s, 0);
    assert_eq!(config.timeouts.heartbeat_interval_ms, 500);
    assert_eq!(config.timeouts.idle_s, 600);
    let local = config.provider("local").unwrap();
    assert_eq!(local.max_concurrent_runs, Some(2));
    assert_eq!(
        local.backend,
        BackendConfig::Local(LocalConfig {
            shim_path: Some(PathBuf::from("/usr/bin/codebolt-shim")),
            work_root: None,
        })
    );
}

#[test]
fn environment_overrides_the_file() {
    let text = "store: memory\npublic_url: http://a:1\ncluster_id: a\napi_tokens: [t1]\n";
    let config = ServerConfig::from_yaml(
        text,
        Path::new("codebolt.yaml"),
        &env(&[
            ("CODEBOLT_STORE", "rediss://:pw@redis.internal:6380"),
            ("CODEBOLT_PUBLIC_URL", "http://lb.internal:7420"),
            ("CODEBOLT_CLUSTER_ID", "blue"),
            ("CODEBOLT_API_TOKENS", " one, two ,,three "),
        ]),
    )
    .unwrap();
    assert_eq!(
        config.store,
        StoreConfig::Redis {
            url: "rediss://:pw@redis.internal:6380".into()
        }
    );
    assert_eq!(
        config.public_url.unwrap().as_str(),
        "http://lb.internal:7420/"
    );
    assert_eq!(config.cluster_id, "blue");
    let tokens: Vec<&str> = config.api_tokens.iter().map(ApiToken::expose).collect();
    assert_eq!(tokens, ["one", "two", "three"]);
}

#[test]
fn environment_applies_without_a_file_and_empty_values_are_unset() {
    let config = ServerConfig::load(
        None,
        &env(&[("CODEBOLT_STORE", "redis://r"), ("CODEBOLT_CLUSTER_ID", "")]),
    )
    .unwrap();
    assert_eq!(
        config.store,
        StoreConfig::Redis {
            url: "redis://r".into()
        }
    );
    assert_eq!(config.cluster_id, "default");
}

#[test]
fn bad_environment_values_name_the_variable() {
    let err = ServerConfig::load(None, &env(&[("CODEBOLT_STORE", "postgres://db")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("environment variable CODEBOLT_STORE: "),
        "{err}"
    );
    assert!(err.contains("postgres"), "{err}");
    let err = ServerConfig::load(None, &env(&[("CODEBOLT_PUBLIC_URL", "ftp://x")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("environment variable CODEBOLT_PUBLIC_URL: "),
        "{err}"
    );
    let err = ServerConfig::load(None, &env(&[("CODEBOLT_CLUSTER_ID", "has space")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("environment variable CODEBOLT_CLUSTER_ID: "),
        "{err}"
    );
}

#[test]
fn load_reads_the_file_and_names_it_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("codebolt.yaml");
    std::fs::write(&path, "providers:\n  docker:\n    sockett: x\n").unwrap();
    let err = ServerConfig::load(Some(&path), &HashMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "{}: providers.docker.sockett: unknown key",
            path.display()
        )),
        "{err}"
    );

    let missing = dir.path().join("nope.yaml");
    let err = ServerConfig::load(Some(&missing), &HashMap::new()).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.yaml"), "{err}");

    std::fs::write(&path, "store: memory\n").unwrap();
    assert_eq!(
        ServerConfig::load(Some(&path), &HashMap::new()).unwrap(),
        ServerConfig::default()
    );
}

#[test]
fn unknown_keys_name_file_path_and_expected_keys() {
    assert_eq!(
        error("providers:\n  docker:\n    sockett: unix:///x\n"),
        "codebolt.yaml: providers.docker.sockett: unknown key (expected one of: socket, \
         default_image, network, auto_remove, callback_url, shim_path, work_dir, \
         work_dir_size_mb, read_only_rootfs, no_new_privileges, drop_capabilities, cap_add, \
         pids_limit, user, init, default_resources, max_concurrent_runs, cost, kind)"
    );
    assert_eq!(
        error("provider: {}\n"),
        "codebolt.yaml: provider: unknown key (expected one of: providers, store, public_url, \
         sandbox_listen, cluster_id, api_tokens, data_dir, timeouts)"
    );
    let err = error("timeouts: {startup: 3}\n");
    assert!(
        err.starts_with(
            "codebolt.yaml: timeouts.startup: unknown key (expected one of: startup_s,"
        ),
        "{err}"
    );
    let err = error("providers:\n  docker: {default_resources: {memory: 1}}\n");
    assert_eq!(
        err,
        "codebolt.yaml: providers.docker.default_resources.memory: unknown key \
         (expected one of: memory_mb, cpu, gpu_count)"
    );
    let err = error("providers:\n  docker: {cost: {per_hour: 1}}\n");
    assert!(
        err.starts_with("codebolt.yaml: providers.docker.cost.per_hour: unknown key"),
        "{err}"
    );
    // A key of another kind is unknown for this one.
    let err = error("providers:\n  docker: {namespace: x}\n");
    assert!(
        err.starts_with("codebolt.yaml: providers.docker.namespace: unknown key"),
        "{err}"
    );
}

#[test]
fn bad_values_name_the_key_path() {
    let cases = [
        (
            "providers:\n  docker: {auto_remove: yes}\n",
            "providers.docker.auto_remove: ",
        ),
        (
            "providers:\n  docker: {default_resources: {cpu: lots}}\n",
            "providers.docker.default_resources.cpu: ",
        ),
        (
            "providers:\n  docker: {default_resources: {cpu: 0}}\n",
            "providers.docker.default_resources.cpu: ",
        ),
        (
            "providers:\n  docker: {default_resources: {memory_mb: -5}}\n",
            "providers.docker.default_resources.memory_mb: ",
        ),
        (
            "providers:\n  docker: {max_concurrent_runs: 0}\n",
            "providers.docker.max_concurrent_runs: ",
        ),
        (
            "providers:\n  docker: {cost: {per_run: -1}}\n",
            "providers.docker.cost.per_run: ",
        ),
        (
            "providers:\n  docker: {socket: ''}\n",
            "providers.docker.socket: must not be empty",
        ),
        (
            "providers:\n  docker: 3\n",
            "providers.docker: expected a mapping, found a number",
        ),
        (
            "providers:\n  k8s: {node_selector: {a: [1]}}\n",
            "providers.k8s.node_selector.a: expected a string",
        ),
        (
            "providers:\n  ssh: {host: h, user: u, key_file: /k, port: 70000}\n",
            "providers.ssh.port: ",
        ),
        (
            "providers:\n  ssh: {host: h, user: u, key_file: /k, work_dir: rel}\n",
            "providers.ssh.work_dir: ",
        ),
        (
            "providers:\n  docker: {kind: ec2}\n",
            "providers.docker.kind: unknown provider kind `ec2`",
        ),
        (
            "providers:\n  local: {kind: docker}\n",
            "providers.local: the provider named `local` must be of kind local",
        ),
        (
            "providers:\n  'bad/name': {kind: docker}\n",
            "providers.bad/name: invalid provider name",
        ),
        (
            "providers: [docker]\n",
            "providers: expected a mapping, found a list",
        ),
        ("store: mysql://x\n", "store: expected `memory` or a redis"),
        ("store: 'redis://'\n", "store: "),
        ("public_url: not a url\n", "public_url: invalid url"),
        (
            "public_url: ftp://host\n",
            "public_url: invalid url `ftp://host`: the scheme must be http or https",
        ),
        ("cluster_id: -x-\n", "cluster_id: invalid cluster id"),
        (
            "api_tokens: ['ok', 'has space']\n",
            "api_tokens[1]: an api token must not contain whitespace",
        ),
        ("api_tokens: token\n", "api_tokens: invalid type"),
        (
            "timeouts: {startup_s: 0}\n",
            "timeouts.startup_s: must be greater than zero",
        ),
        (
            "timeouts: {idle_s: '60'}\n",
            "timeouts.idle_s: invalid type: string",
        ),
        (
            "- a\n- b\n",
            "(top level): expected a mapping, found a list",
        ),
        ("data_dir: ~other/x\n", "data_dir: cannot expand"),
    ];
    for (text, expected) in cases {
        let err = error(text);
        assert!(
            err.starts_with(&format!("codebolt.yaml: {expected}")),
            "for {text:?}: got {err:?}, expected it to start with {expected:?}"
        );
    }
}

#[test]
fn missing_required_keys_are_named() {
    assert_eq!(
        error("providers:\n  ssh: {user: u, key_file: /k}\n"),
        "codebolt.yaml: providers.ssh.host: missing required key"
    );
    assert_eq!(
        error("providers:\n  ssh: {host: h, user: u}\n"),
        "codebolt.yaml: providers.ssh.key_file: missing required key"
    );
}

#[test]
fn provider_without_kind_whose_name_is_no_kind_is_refused() {
    let err = error("providers:\n  ssh-box: {host: h, user: u, key_file: /k}\n");
    assert!(
        err.starts_with("codebolt.yaml: providers.ssh-box: missing `kind:`"),
        "{err}"
    );
    assert!(err.contains("docker"), "{err}");
}

#[test]
fn syntax_errors_name_the_file() {
    let err = parse("providers: {docker: [\n").unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with("codebolt.yaml: invalid yaml: "),
        "{err}"
    );
    let err = error("store: memory\nstore: memory\n");
    assert!(err.starts_with("codebolt.yaml: invalid yaml: "), "{err}");
}

#[test]
fn tilde_without_home_is_an_error() {
    let err = ServerConfig::from_yaml(
        "providers:\n  k8s: {kubeconfig: ~/.kube/config}\n",
        Path::new("c.yaml"),
        &HashMap::new(),
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "c.yaml: providers.k8s.kubeconfig: cannot expand `~/.kube/config`: HOME is not set"
    );
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let config = ServerConfig::load(
        None,
        &env(&[
            ("CODEBOLT_STORE", "redis://user:hunter2@redis:6379"),
            ("CODEBOLT_API_TOKENS", "s3cr3t-token"),
        ]),
    )
    .unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(!debug.contains("s3cr3t-token"), "{debug}");
    assert!(debug.contains("redis://user:***@redis:6379"), "{debug}");
    assert_eq!(config.api_tokens[0].expose(), "s3cr3t-token");
}

#[test]
fn docker_hardening_and_callback_can_be_overridden() {
    let config = parse(
        "providers:\n  docker:\n    network: codebolt-net\n    callback_url: http://10.1.2.3:7421\n    \
         shim_path: /opt/agent-shim\n    work_dir: /work\n    work_dir_size_mb: 64\n    \
         read_only_rootfs: false\n    no_new_privileges: false\n    drop_capabilities: [NET_RAW]\n    \
         cap_add: [CHOWN]\n    pids_limit: 0\n    user: image\n    init: false\n",
    )
    .unwrap();
    let BackendConfig::Docker(docker) = &config.provider("docker").unwrap().backend else {
        panic!("not docker");
    };
    assert_eq!(docker.network, "codebolt-net");
    assert_eq!(
        docker.callback_url.as_ref().map(|u| u.as_str()),
        Some("http://10.1.2.3:7421/")
    );
    assert_eq!(
        docker.shim_path.as_deref(),
        Some(std::path::Path::new("/opt/agent-shim"))
    );
    assert_eq!(docker.work_dir, "/work");
    assert_eq!(docker.work_dir_size_mb, 64);
    assert_eq!(
        docker.hardening,
        DockerHardening {
            read_only_rootfs: false,
            no_new_privileges: false,
            drop_capabilities: vec!["NET_RAW".into()],
            cap_add: vec!["CHOWN".into()],
            pids_limit: None,
            user: None,
            init: false,
        }
    );
    let defaults = DockerConfig::default();
    assert_eq!(
        defaults.hardening.drop_capabilities,
        vec!["ALL".to_string()]
    );
    assert_eq!(defaults.hardening.pids_limit, Some(512));
    assert!(defaults.hardening.read_only_rootfs && defaults.hardening.no_new_privileges);
}

#[test]
fn bad_docker_values_name_the_key() {
    for (yaml, key) in [
        ("{socket: docker.sock}", "providers.docker.socket"),
        ("{callback_url: 'ftp://x'}", "providers.docker.callback_url"),
        ("{work_dir: relative}", "providers.docker.work_dir"),
        ("{work_dir_size_mb: 0}", "providers.docker.work_dir_size_mb"),
        ("{pids_limit: -1}", "providers.docker.pids_limit"),
        (
            "{read_only_rootfs: maybe}",
            "providers.docker.read_only_rootfs",
        ),
        (
            "{drop_capabilities: ALL}",
            "providers.docker.drop_capabilities",
        ),
        ("{user: ''}", "providers.docker.user"),
        ("{privileged: true}", "providers.docker.privileged"),
    ] {
        let err = error(&format!("providers:\n  docker: {yaml}\n"));
        assert!(
            err.starts_with(&format!("codebolt.yaml: {key}")),
            "{yaml}: {err}"
        );
    }
}

#[test]
fn sandbox_listen_is_an_address() {
    let config = parse("sandbox_listen: 172.17.0.1:7421\n").unwrap();
    assert_eq!(config.sandbox_listen.as_deref(), Some("172.17.0.1:7421"));
    let err = error("sandbox_listen: docker0\n");
    assert!(err.starts_with("codebolt.yaml: sandbox_listen:"), "{err}");
}
