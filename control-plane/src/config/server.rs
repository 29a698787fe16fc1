//! The server configuration file, `codebolt.yaml`, and its environment overrides.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use url::Url;

use super::provider::{read_providers, ProviderConfig, LOCAL_PROVIDER};
use super::yaml::{parse_document, read_document, Fields};
use super::ConfigError;

/// Environment variables that override the file.
pub mod env_vars {
    pub const STORE: &str = "CODEBOLT_STORE";
    pub const PUBLIC_URL: &str = "CODEBOLT_PUBLIC_URL";
    pub const CLUSTER_ID: &str = "CODEBOLT_CLUSTER_ID";
    /// Comma separated.
    pub const API_TOKENS: &str = "CODEBOLT_API_TOKENS";
}

/// Everything `codebolt server` is configured with.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// By name; always holds a `local` provider.
    pub providers: BTreeMap<String, ProviderConfig>,
    pub store: StoreConfig,
    /// The URL sandboxes call back to; derived from the listen address when absent.
    pub public_url: Option<Url>,
    /// An extra listener serving only the sandbox endpoints (shim connect, bundle download),
    /// authorised by run tokens, e.g. on the Docker bridge gateway: `172.17.0.1:7421`.
    pub sandbox_listen: Option<String>,
    /// Labels every sandbox, so replicas of one cluster recognise their own.
    pub cluster_id: String,
    /// Bearer tokens accepted by the API; required for non-loopback binds.
    pub api_tokens: Vec<ApiToken>,
    pub data_dir: Option<PathBuf>,
    pub timeouts: Timeouts,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let mut providers = BTreeMap::new();
        providers.insert(LOCAL_PROVIDER.to_string(), ProviderConfig::local_default());
        ServerConfig {
            providers,
            store: StoreConfig::Memory,
            public_url: None,
            sandbox_listen: None,
            cluster_id: DEFAULT_CLUSTER_ID.to_string(),
            api_tokens: Vec::new(),
            data_dir: None,
            timeouts: Timeouts::default(),
        }
    }
}

const DEFAULT_CLUSTER_ID: &str = "default";

impl ServerConfig {
    /// Reads `path` (defaults when `None`), then applies the `CODEBOLT_*` overrides from `env`.
    ///
    /// `env` is the process environment as read once by the binary; `HOME` from it expands `~`
    /// in paths. Empty override variables count as unset.
    pub fn load(path: Option<&Path>, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let config = match path {
            None => ServerConfig::default(),
            Some(path) => ServerConfig::from_value(read_document(path)?, path, env)?,
        };
        config.with_env_overrides(env)
    }

    /// Parses YAML text as if read from `file` (named in errors), then applies the overrides.
    pub fn from_yaml(
        text: &str,
        file: &Path,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        ServerConfig::from_value(parse_document(text, file)?, file, env)?.with_env_overrides(env)
    }

    /// The provider configured under `name`.
    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.get(name)
    }

    fn from_value(
        value: serde_yaml::Value,
        file: &Path,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut root = Fields::new(file, String::new(), value)?;
        let providers = read_providers(root.section("providers")?, env)?;
        let store = match root.optional_string("store")? {
            None => StoreConfig::Memory,
            Some(raw) => {
                StoreConfig::parse(&raw).map_err(|message| root.invalid("store", message))?
            }
        };
        let public_url = match root.optional_string("public_url")? {
            None => None,
            Some(raw) => Some(parse_public_url(&raw).map_err(|m| root.invalid("public_url", m))?),
        };
        let sandbox_listen = match root.optional_string("sandbox_listen")? {
            None => None,
            Some(raw) => {
                raw.parse::<std::net::SocketAddr>().map_err(|_| {
                    root.invalid(
                        "sandbox_listen",
                        format!("`{raw}` is not an ip:port address"),
                    )
                })?;
                Some(raw)
            }
        };
        let cluster_id = match root.optional_string("cluster_id")? {
            None => DEFAULT_CLUSTER_ID.to_string(),
            Some(raw) => {
                check_cluster_id(&raw).map_err(|m| root.invalid("cluster_id", m))?;
                raw
            }
        };
        let api_tokens = match root.optional::<Vec<String>>("api_tokens")? {
            None => Vec::new(),
            Some(raw) => raw
                .into_iter()
                .enumerate()
                .map(|(i, token)| {
                    ApiToken::new(token).map_err(|m| {
                        super::yaml::invalid(file, &format!("api_tokens[{i}]"), m.to_string())
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let data_dir = root.optional_path("data_dir", env)?;
        let timeouts = Timeouts::read(root.section("timeouts")?)?;
        root.finish()?;
        Ok(ServerConfig {
            providers,
            store,
            public_url,
            sandbox_listen,
            cluster_id,
            api_tokens,
            data_dir,
            timeouts,
        })
    }

    fn with_env_overrides(mut self, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let var = |name: &str| env.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
        let bad = |name: &str, message: String| ConfigError::InvalidEnv {
            var: name.to_string(),
            message,
        };
        if let Some(raw) = var(env_vars::STORE) {
            self.store = StoreConfig::parse(raw).map_err(|m| bad(env_vars::STORE, m))?;
        }
        if let Some(raw) = var(env_vars::PUBLIC_URL) {
            self.public_url =
                Some(parse_public_url(raw).map_err(|m| bad(env_vars::PUBLIC_URL, m))?);
        }
        if let Some(raw) = var(env_vars::CLUSTER_ID) {
            check_cluster_id(raw).map_err(|m| bad(env_vars::CLUSTER_ID, m))?;
            self.cluster_id = raw.to_string();
        }
        if let Some(raw) = var(env_vars::API_TOKENS) {
            self.api_tokens = raw
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| ApiToken::new(t.to_string()))
                .collect::<Result<_, _>>()
                .map_err(|m| bad(env_vars::API_TOKENS, m.to_string()))?;
        }
        Ok(self)
    }
}

/// Where run records, events and leases live.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// In process; a single replica.
    Memory,
    /// Shared by several replicas; `url` is `redis://…` or `rediss://…`.
    Redis { url: String },
}

impl StoreConfig {
    /// `memory`, or a `redis://` / `rediss://` URL.
    pub fn parse(raw: &str) -> Result<StoreConfig, String> {
        if raw == "memory" {
            return Ok(StoreConfig::Memory);
        }
        let expected = "expected `memory` or a redis://host[:port][/db] url";
        let url = Url::parse(raw).map_err(|err| format!("{expected}: {err}"))?;
        match url.scheme() {
            "redis" | "rediss" if url.host_str().is_some_and(|h| !h.is_empty()) => {
                Ok(StoreConfig::Redis {
                    url: raw.to_string(),
                })
            }
            "redis" | "rediss" => Err(format!("{expected}: the url has no host")),
            other => Err(format!("{expected}, found scheme `{other}`")),
        }
    }

    /// The store as text with any password masked, fit for logs.
    pub fn redacted(&self) -> String {
        match self {
            StoreConfig::Memory => "memory".to_string(),
            StoreConfig::Redis { url } => match Url::parse(url) {
                Ok(mut parsed) if parsed.password().is_some() => {
                    // Fails only for URLs that cannot carry a password, which this one does.
                    match parsed.set_password(Some("***")) {
                        Ok(()) => parsed.to_string(),
                        Err(()) => "redis://***".to_string(),
                    }
                }
                _ => url.clone(),
            },
        }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreConfig::Memory => f.write_str("Memory"),
            StoreConfig::Redis { .. } => f
                .debug_struct("Redis")
                .field("url", &self.redacted())
                .finish(),
        }
    }
}

/// An API bearer token. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl ApiToken {
    /// A token: non-empty, no whitespace, no commas (the environment list separator).
    pub fn new(token: String) -> Result<ApiToken, &'static str> {
        if token.is_empty() {
            return Err("an api token must not be empty");
        }
        if token.chars().any(|c| c.is_whitespace() || c == ',') {
            return Err("an api token must not contain whitespace or commas");
        }
        Ok(ApiToken(token))
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares a presented token without leaking, through timing, how much of it matched.
    pub fn matches(&self, presented: &str) -> bool {
        let ours = Sha256::digest(self.0.as_bytes());
        let theirs = Sha256::digest(presented.as_bytes());
        ours.iter()
            .zip(theirs.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(***)")
    }
}

/// Timing of runs and connections (`timeouts:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// From spawn until the shim connects.
    pub startup_s: u64,
    pub tool_call_s: u64,
    /// Without agent events or tool calls.
    pub idle_s: u64,
    /// Absolute time to live of a run, unless the run asks for its own.
    pub run_ttl_s: Option<u64>,
    /// Default grace period of a stop.
    pub stop_grace_s: u64,
    /// How long a shim may stay disconnected before its run fails with `connection_lost`.
    pub lost_after_s: u64,
    pub heartbeat_interval_ms: u64,
    /// Upper bound on a run token's life, even for a run still going.
    pub token_max_lifetime_s: u64,
    /// How long a replica's heartbeat keeps its runs its own; past it, other replicas adopt
    /// them.
    pub replica_lease_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            startup_s: 60,
            tool_call_s: 60,
            idle_s: 600,
            run_ttl_s: None,
            stop_grace_s: 10,
            lost_after_s: 60,
            heartbeat_interval_ms: 5000,
            token_max_lifetime_s: 86_400,
            replica_lease_ms: 5000,
        }
    }
}

impl Timeouts {
    pub fn startup(&self) -> Duration {
        Duration::from_secs(self.startup_s)
    }
    pub fn tool_call(&self) -> Duration {
        Duration::from_secs(self.tool_call_s)
    }
    pub fn idle(&self) -> Duration {
        Duration::from_secs(self.idle_s)
    }
    pub fn run_ttl(&self) -> Option<Duration> {
        self.run_ttl_s.map(Duration::from_secs)
    }
    pub fn stop_grace(&self) -> Duration {
        Duration::from_secs(self.stop_grace_s)
    }
    pub fn lost_after(&self) -> Duration {
        Duration::from_secs(self.lost_after_s)
    }
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    pub fn token_max_lifetime(&self) -> Duration {
        Duration::from_secs(self.token_max_lifetime_s)
    }
    pub fn replica_lease(&self) -> Duration {
        Duration::from_millis(self.replica_lease_ms)
    }

    fn read(mut fields: Fields<'_>) -> Result<Timeouts, ConfigError> {
        let defaults = Timeouts::default();
        let positive = |fields: &mut Fields<'_>,
                        key: &'static str,
                        default: u64|
         -> Result<u64, ConfigError> {
            match fields.optional::<u64>(key)? {
                Some(0) => Err(fields.invalid(key, "must be greater than zero")),
                Some(v) => Ok(v),
                None => Ok(default),
            }
        };
        let timeouts = Timeouts {
            startup_s: positive(&mut fields, "startup_s", defaults.startup_s)?,
            tool_call_s: positive(&mut fields, "tool_call_s", defaults.tool_call_s)?,
            idle_s: positive(&mut fields, "idle_s", defaults.idle_s)?,
            run_ttl_s: match fields.optional::<u64>("run_ttl_s")? {
                Some(0) => return Err(fields.invalid("run_ttl_s", "must be greater than zero")),
                other => other,
            },
            stop_grace_s: fields
                .optional("stop_grace_s")?
                .unwrap_or(defaults.stop_grace_s),
            lost_after_s: positive(&mut fields, "lost_after_s", defaults.lost_after_s)?,
            heartbeat_interval_ms: positive(
                &mut fields,
                "heartbeat_interval_ms",
                defaults.heartbeat_interval_ms,
            )?,
            token_max_lifetime_s: positive(
                &mut fields,
                "token_max_lifetime_s",
                defaults.token_max_lifetime_s,
            )?,
            replica_lease_ms: match fields.optional::<u64>("replica_lease_ms")? {
                Some(ms) if ms < 300 => {
                    return Err(fields.invalid("replica_lease_ms", "must be at least 300"))
                }
                Some(ms) => ms,
                None => defaults.replica_lease_ms,
            },
        };
        fields.finish()?;
        Ok(timeouts)
    }
}

fn parse_public_url(raw: &str) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|err| format!("invalid url `{raw}`: {err}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "invalid url `{raw}`: the scheme must be http or https, not {}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("invalid url `{raw}`: no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "invalid url `{raw}`: a query or fragment is not allowed"
        ));
    }
    Ok(url)
}

/// Cluster ids label sandboxes, so they follow the rules of a Kubernetes label value.
fn check_cluster_id(raw: &str) -> Result<(), String> {
    let valid_chars = raw
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let valid_ends = raw.starts_with(|c: char| c.is_ascii_alphanumeric())
        && raw.ends_with(|c: char| c.is_ascii_alphanumeric());
    if raw.len() <= 63 && valid_chars && valid_ends {
        Ok(())
    } else {
        Err(format!(
            "invalid cluster id `{raw}`: use at most 63 letters, digits, `-`, `_` or `.`, starting and ending with a letter or digit"
        ))
    }
}
