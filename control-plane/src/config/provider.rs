//! Execution providers as configured in `codebolt.yaml` (`providers:`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;

use actors::model::Resources;
use serde::Serialize;
use serde_yaml::Value;
use url::Url;

use super::yaml::{read_resources, Fields};
use super::{check_name, ConfigError};

/// Name of the provider that exists even without a config file.
pub const LOCAL_PROVIDER: &str = "local";

/// The backend a provider drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// The shim as a child process of the control plane.
    Local,
    Docker,
    Kubernetes,
    Ssh,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 4] = [
        ProviderKind::Local,
        ProviderKind::Docker,
        ProviderKind::Kubernetes,
        ProviderKind::Ssh,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Docker => "docker",
            ProviderKind::Kubernetes => "kubernetes",
            ProviderKind::Ssh => "ssh",
        }
    }

    /// The kind a word names: its own name, or `k8s` for Kubernetes.
    pub fn from_word(word: &str) -> Option<ProviderKind> {
        match word {
            "k8s" => Some(ProviderKind::Kubernetes),
            _ => ProviderKind::ALL.into_iter().find(|k| k.as_str() == word),
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One configured provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderConfig {
    /// The key under `providers:`; what runs name in `execution`.
    pub name: String,
    pub backend: BackendConfig,
    /// Resources a run gets when neither the request nor the manifest says otherwise.
    pub default_resources: Resources,
    /// At most this many live runs on this provider; unlimited when absent.
    pub max_concurrent_runs: Option<u32>,
    pub cost: CostRates,
}

impl ProviderConfig {
    pub fn kind(&self) -> ProviderKind {
        self.backend.kind()
    }

    /// The `local` provider with every setting at its default.
    pub fn local_default() -> ProviderConfig {
        ProviderConfig {
            name: LOCAL_PROVIDER.to_string(),
            backend: BackendConfig::Local(LocalConfig::default()),
            default_resources: Resources::default(),
            max_concurrent_runs: None,
            cost: CostRates::default(),
        }
    }
}

/// Settings specific to a provider's kind.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum BackendConfig {
    Local(LocalConfig),
    Docker(DockerConfig),
    Kubernetes(KubernetesConfig),
    Ssh(SshConfig),
}

impl BackendConfig {
    pub fn kind(&self) -> ProviderKind {
        match self {
            BackendConfig::Local(_) => ProviderKind::Local,
            BackendConfig::Docker(_) => ProviderKind::Docker,
            BackendConfig::Kubernetes(_) => ProviderKind::Kubernetes,
            BackendConfig::Ssh(_) => ProviderKind::Ssh,
        }
    }
}

/// `kind: local`: the shim runs as a child process on the control plane's host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LocalConfig {
    /// The shim binary; found next to the `codebolt` binary or on `PATH` when absent.
    pub shim_path: Option<PathBuf>,
    /// Where per-run directories are created; a temporary directory when absent.
    pub work_root: Option<PathBuf>,
}

/// `kind: docker`.
#[derive(Debug, Clone, PartialEq)]
pub struct DockerConfig {
    pub socket: String,
    pub default_image: String,
    /// `bridge`, `host`, `none`, or the name of a Docker network.
    pub network: String,
    /// Remove each container once its exit was read (done by the provider, not by Docker).
    pub auto_remove: bool,
    /// What containers call back to; derived from the network when absent (see README).
    pub callback_url: Option<Url>,
    /// A statically linked agent-shim on the engine's host, bind-mounted read-only into every
    /// container and used as its entrypoint, so images without the shim work too.
    pub shim_path: Option<PathBuf>,
    /// The writable work directory inside the container (a tmpfs).
    pub work_dir: String,
    pub work_dir_size_mb: u64,
    pub hardening: DockerHardening,
}

/// Container hardening, on by default; each setting can be relaxed per provider
/// (`pids_limit: 0` in the file means unlimited, `user: image` the image's own user).
pub use actors::provider::docker::Hardening as DockerHardening;

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            socket: "unix:///var/run/docker.sock".to_string(),
            default_image: "codebolt/agent-base:latest".to_string(),
            network: "bridge".to_string(),
            auto_remove: true,
            callback_url: None,
            shim_path: None,
            work_dir: "/codebolt/work".to_string(),
            work_dir_size_mb: 512,
            hardening: DockerHardening::default(),
        }
    }
}

/// `kind: kubernetes` (or `k8s`).
#[derive(Debug, Clone, PartialEq)]
pub struct KubernetesConfig {
    /// In-cluster configuration or the usual kubeconfig search when absent.
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    pub image_pull_secret: Option<String>,
    pub node_selector: BTreeMap<String, String>,
    pub default_image: Option<String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            kubeconfig: None,
            namespace: "codebolt".to_string(),
            image_pull_secret: None,
            node_selector: BTreeMap::new(),
            default_image: None,
        }
    }
}

/// `kind: ssh`.
#[derive(Debug, Clone, PartialEq)]
pub struct SshConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Private key on the control plane's host.
    pub key_file: PathBuf,
    /// Directory on the remote host under which run directories are created.
    pub work_dir: String,
    /// `known_hosts` file used to verify the remote host key.
    pub known_hosts: Option<PathBuf>,
}

/// Rates for a run's cost estimate (SPEC §10); absent rates count as zero.
pub use actors::router::CostRates;

/// Reads the `providers:` mapping; adds `local` when it is not configured.
pub(crate) fn read_providers(
    fields: Fields<'_>,
    env: &HashMap<String, String>,
) -> Result<BTreeMap<String, ProviderConfig>, ConfigError> {
    let file = fields.file();
    let path = fields.path().to_string();
    let mut providers = BTreeMap::new();
    for (name, value) in fields.into_entries() {
        let provider_path = super::yaml::join_path(&path, &name);
        if let Err(reason) = check_name(&name) {
            return Err(super::yaml::invalid(
                file,
                &provider_path,
                format!("invalid provider name: {reason}"),
            ));
        }
        let provider = read_provider(Fields::new(file, provider_path, value)?, &name, env)?;
        providers.insert(name, provider);
    }
    match providers.get(LOCAL_PROVIDER) {
        None => {
            providers.insert(LOCAL_PROVIDER.to_string(), ProviderConfig::local_default());
        }
        Some(local) if local.kind() != ProviderKind::Local => {
            return Err(super::yaml::invalid(
                file,
                &super::yaml::join_path(&path, LOCAL_PROVIDER),
                format!(
                    "the provider named `{LOCAL_PROVIDER}` must be of kind local, not {}",
                    local.kind()
                ),
            ));
        }
        Some(_) => {}
    }
    Ok(providers)
}

fn read_provider(
    mut fields: Fields<'_>,
    name: &str,
    env: &HashMap<String, String>,
) -> Result<ProviderConfig, ConfigError> {
    let kind = match fields.take_unlisted("kind") {
        Some(Value::String(word)) => ProviderKind::from_word(&word).ok_or_else(|| {
            fields.invalid(
                "kind",
                format!(
                    "unknown provider kind `{word}` (expected one of: {})",
                    kinds_list()
                ),
            )
        })?,
        Some(_) => {
            return Err(fields.invalid(
                "kind",
                format!("expected a string, one of: {}", kinds_list()),
            ))
        }
        None => ProviderKind::from_word(name).ok_or_else(|| {
            fields.invalid_here(format!(
                "missing `kind:` (the name `{name}` is not a provider kind; expected one of: {})",
                kinds_list()
            ))
        })?,
    };
    let backend = match kind {
        ProviderKind::Local => BackendConfig::Local(LocalConfig {
            shim_path: fields.optional_path("shim_path", env)?,
            work_root: fields.optional_path("work_root", env)?,
        }),
        ProviderKind::Docker => BackendConfig::Docker(read_docker(&mut fields, env)?),
        ProviderKind::Kubernetes => {
            let defaults = KubernetesConfig::default();
            BackendConfig::Kubernetes(KubernetesConfig {
                kubeconfig: fields.optional_path("kubeconfig", env)?,
                namespace: fields
                    .optional_string("namespace")?
                    .unwrap_or(defaults.namespace),
                image_pull_secret: fields.optional_string("image_pull_secret")?,
                node_selector: fields.string_map("node_selector")?.into_iter().collect(),
                default_image: fields.optional_string("default_image")?,
            })
        }
        ProviderKind::Ssh => {
            let host = fields.required_string("host")?;
            let port: u16 = fields.optional("port")?.unwrap_or(22);
            if port == 0 {
                return Err(fields.invalid("port", "must be between 1 and 65535"));
            }
            let user = fields.required_string("user")?;
            let key_file = match fields.optional_path("key_file", env)? {
                Some(path) => path,
                None => {
                    return Err(ConfigError::MissingKey {
                        file: fields.file().to_path_buf(),
                        key: fields.key_path("key_file"),
                    })
                }
            };
            let work_dir = fields
                .optional_string("work_dir")?
                .unwrap_or_else(|| "/var/lib/codebolt".to_string());
            if !work_dir.starts_with('/') {
                return Err(
                    fields.invalid("work_dir", "must be an absolute path on the remote host")
                );
            }
            BackendConfig::Ssh(SshConfig {
                host,
                port,
                user,
                key_file,
                work_dir,
                known_hosts: fields.optional_path("known_hosts", env)?,
            })
        }
    };
    let default_resources = read_resources(&mut fields, "default_resources")?;
    let max_concurrent_runs: Option<u32> = fields.optional("max_concurrent_runs")?;
    if max_concurrent_runs == Some(0) {
        return Err(fields.invalid("max_concurrent_runs", "must be greater than zero"));
    }
    let cost = read_cost(fields.section("cost")?)?;
    fields.accept("kind");
    fields.finish()?;
    Ok(ProviderConfig {
        name: name.to_string(),
        backend,
        default_resources,
        max_concurrent_runs,
        cost,
    })
}

fn read_docker(
    fields: &mut Fields<'_>,
    env: &HashMap<String, String>,
) -> Result<DockerConfig, ConfigError> {
    let defaults = DockerConfig::default();
    let socket = fields.optional_string("socket")?.unwrap_or(defaults.socket);
    let socket_ok = ["unix://", "tcp://", "http://", "/"]
        .iter()
        .any(|prefix| socket.starts_with(prefix));
    if !socket_ok {
        return Err(fields.invalid(
            "socket",
            format!("`{socket}` is not unix:///path, /path or tcp://host:port"),
        ));
    }
    let default_image = fields
        .optional_string("default_image")?
        .unwrap_or(defaults.default_image);
    let network = fields
        .optional_string("network")?
        .unwrap_or(defaults.network);
    if network.trim().is_empty() {
        return Err(fields.invalid("network", "must not be empty"));
    }
    let auto_remove = fields
        .optional("auto_remove")?
        .unwrap_or(defaults.auto_remove);
    let callback_url = match fields.optional_string("callback_url")? {
        None => None,
        Some(raw) => match Url::parse(&raw) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {
                Some(url)
            }
            Ok(_) => {
                return Err(fields.invalid("callback_url", "expected an http(s) URL with a host"))
            }
            Err(err) => return Err(fields.invalid("callback_url", err.to_string())),
        },
    };
    let shim_path = fields.optional_path("shim_path", env)?;
    let work_dir = fields
        .optional_string("work_dir")?
        .unwrap_or(defaults.work_dir);
    if !work_dir.starts_with('/') || work_dir == "/" {
        return Err(fields.invalid(
            "work_dir",
            "must be an absolute path inside the container, not /",
        ));
    }
    let work_dir_size_mb: u64 = fields
        .optional("work_dir_size_mb")?
        .unwrap_or(defaults.work_dir_size_mb);
    if work_dir_size_mb == 0 {
        return Err(fields.invalid("work_dir_size_mb", "must be greater than zero"));
    }
    let hd = DockerHardening::default();
    let read_only_rootfs = fields
        .optional("read_only_rootfs")?
        .unwrap_or(hd.read_only_rootfs);
    let no_new_privileges = fields
        .optional("no_new_privileges")?
        .unwrap_or(hd.no_new_privileges);
    let drop_capabilities = fields
        .optional("drop_capabilities")?
        .unwrap_or(hd.drop_capabilities);
    let cap_add = fields.optional("cap_add")?.unwrap_or(hd.cap_add);
    let pids_limit = match fields.optional::<u32>("pids_limit")? {
        None => hd.pids_limit,
        Some(0) => None,
        Some(n) => Some(i64::from(n)),
    };
    let user = match fields.optional_string("user")? {
        None => hd.user,
        Some(u) if u == "image" => None,
        Some(u) if u.trim().is_empty() => {
            return Err(fields.invalid(
                "user",
                "must not be empty (use `image` for the image's user)",
            ))
        }
        Some(u) => Some(u),
    };
    let init = fields.optional("init")?.unwrap_or(hd.init);
    Ok(DockerConfig {
        socket,
        default_image,
        network,
        auto_remove,
        callback_url,
        shim_path,
        work_dir,
        work_dir_size_mb,
        hardening: DockerHardening {
            read_only_rootfs,
            no_new_privileges,
            drop_capabilities,
            cap_add,
            pids_limit,
            user,
            init,
        },
    })
}

fn read_cost(mut fields: Fields<'_>) -> Result<CostRates, ConfigError> {
    let rate = |fields: &mut Fields<'_>, key: &'static str| -> Result<Option<f64>, ConfigError> {
        let value: Option<f64> = fields.optional(key)?;
        match value {
            Some(v) if !(v.is_finite() && v >= 0.0) => {
                Err(fields.invalid(key, "must be a number of zero or more"))
            }
            other => Ok(other),
        }
    };
    let cost = CostRates {
        per_cpu_hour: rate(&mut fields, "per_cpu_hour")?,
        per_gb_hour: rate(&mut fields, "per_gb_hour")?,
        per_gpu_hour: rate(&mut fields, "per_gpu_hour")?,
        per_run: rate(&mut fields, "per_run")?,
        minimum_billed_minutes: fields.optional("minimum_billed_minutes")?,
    };
    fields.finish()?;
    Ok(cost)
}

fn kinds_list() -> String {
    let mut words: Vec<&str> = ProviderKind::ALL.iter().map(|k| k.as_str()).collect();
    words.push("k8s");
    words.join(", ")
}
