//! The shim's configuration, read once from its environment (SPEC §6).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;

use crate::protocol::{env, CONNECT_PATH};

/// Shim-local tuning knobs (not part of the sandbox contract); any other `CODEBOLT_SHIM_*` is an error.
pub mod tuning {
    /// First reconnect delay in milliseconds (doubles per failed attempt, with jitter).
    pub const RECONNECT_MIN_MS: &str = "CODEBOLT_SHIM_RECONNECT_MIN_MS";
    /// Largest reconnect delay in milliseconds.
    pub const RECONNECT_MAX_MS: &str = "CODEBOLT_SHIM_RECONNECT_MAX_MS";
    /// How long the agent gets between SIGTERM and SIGKILL when the shim gives up.
    pub const KILL_AFTER_MS: &str = "CODEBOLT_SHIM_KILL_AFTER_MS";
    /// How often resource usage is reported.
    pub const USAGE_INTERVAL_MS: &str = "CODEBOLT_SHIM_USAGE_INTERVAL_MS";
    pub(super) const PREFIX: &str = "CODEBOLT_SHIM_";
    pub(super) const ALL: [&str; 4] = [
        RECONNECT_MIN_MS,
        RECONNECT_MAX_MS,
        KILL_AFTER_MS,
        USAGE_INTERVAL_MS,
    ];
}

const DEFAULT_LOST_AFTER_S: u64 = 60;
const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(100);
const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(5);
const DEFAULT_KILL_AFTER: Duration = Duration::from_secs(5);
const DEFAULT_USAGE_INTERVAL: Duration = Duration::from_secs(5);

/// A configuration problem; the shim exits with code 2 and this message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("environment variable {var} is not set")]
    Missing { var: &'static str },
    #[error("environment variable {var} is invalid: {reason}")]
    Invalid { var: String, reason: String },
    #[error("unknown environment variable {var} (known shim settings: {known})")]
    Unknown { var: String, known: String },
}

/// The run token. Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct RunToken(String);

impl RunToken {
    pub fn new(value: impl Into<String>) -> Self {
        RunToken(value.into())
    }

    /// The secret itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RunToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RunToken(<redacted>)")
    }
}

/// Exponential reconnect backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Delay before reconnect attempt number `attempt` (0-based): `min * 2^attempt`, capped at
    /// `max`, then a uniformly random point in its upper half (`jitter` in `[0, 1]`).
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(20));
        let base = self.min.saturating_mul(factor).min(self.max);
        base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub run_id: String,
    /// The control plane's callback URL as given.
    pub callback_url: Url,
    /// `ws(s)://<callback origin>/v1/sandbox/connect`.
    pub connect_url: Url,
    pub token: RunToken,
    /// Until the first `welcome` replaces it.
    pub lost_after: Duration,
    pub work_dir: PathBuf,
    pub traceparent: Option<String>,
    pub reconnect: Backoff,
    pub kill_after: Duration,
    pub usage_interval: Duration,
}

impl Config {
    /// Reads and validates the configuration from an environment map.
    pub fn from_env(vars: &HashMap<String, String>) -> Result<Config, ConfigError> {
        for key in vars.keys() {
            if key.starts_with(tuning::PREFIX) && !tuning::ALL.contains(&key.as_str()) {
                return Err(ConfigError::Unknown {
                    var: key.clone(),
                    known: tuning::ALL.join(", "),
                });
            }
        }
        let run_id = required(vars, env::RUN_ID)?.to_owned();
        if run_id.trim().is_empty() || run_id.contains(['/', '\0']) {
            return Err(invalid(env::RUN_ID, "must be non-empty and contain no '/'"));
        }
        let callback_url = parse_callback_url(required(vars, env::CALLBACK_URL)?)?;
        let connect_url = connect_url(&callback_url)?;
        let token = required(vars, env::RUN_TOKEN)?;
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            // Never echo the value.
            return Err(invalid(
                env::RUN_TOKEN,
                "must be non-empty printable ASCII without spaces",
            ));
        }
        let lost_after = match vars.get(env::LOST_AFTER_S) {
            None => Duration::from_secs(DEFAULT_LOST_AFTER_S),
            Some(v) => Duration::from_secs(positive(env::LOST_AFTER_S, v)?),
        };
        let work_dir = match vars.get(env::WORK_DIR) {
            Some(v) if !v.is_empty() => PathBuf::from(v),
            Some(_) => return Err(invalid(env::WORK_DIR, "must not be empty")),
            None => std::env::temp_dir().join(format!("codebolt-run-{run_id}")),
        };
        let traceparent = vars
            .get(env::TRACEPARENT)
            .filter(|v| !v.is_empty())
            .cloned();
        let millis = |var: &'static str, default: Duration| -> Result<Duration, ConfigError> {
            match vars.get(var) {
                None => Ok(default),
                Some(v) => Ok(Duration::from_millis(positive(var, v)?)),
            }
        };
        let reconnect = Backoff {
            min: millis(tuning::RECONNECT_MIN_MS, DEFAULT_RECONNECT_MIN)?,
            max: millis(tuning::RECONNECT_MAX_MS, DEFAULT_RECONNECT_MAX)?,
        };
        if reconnect.max < reconnect.min {
            return Err(invalid(
                tuning::RECONNECT_MAX_MS,
                "must not be below the minimum reconnect delay",
            ));
        }
        Ok(Config {
            run_id,
            callback_url,
            connect_url,
            token: RunToken::new(token),
            lost_after,
            work_dir,
            traceparent,
            reconnect,
            kill_after: millis(tuning::KILL_AFTER_MS, DEFAULT_KILL_AFTER)?,
            usage_interval: millis(tuning::USAGE_INTERVAL_MS, DEFAULT_USAGE_INTERVAL)?,
        })
    }
}

fn required<'a>(
    vars: &'a HashMap<String, String>,
    var: &'static str,
) -> Result<&'a str, ConfigError> {
    vars.get(var)
        .map(String::as_str)
        .ok_or(ConfigError::Missing { var })
}

fn invalid(var: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var: var.to_owned(),
        reason: reason.into(),
    }
}

fn positive(var: &str, value: &str) -> Result<u64, ConfigError> {
    match value.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(invalid(
            var,
            format!("expected a positive integer, got {value:?}"),
        )),
    }
}

fn parse_callback_url(value: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(value).map_err(|e| invalid(env::CALLBACK_URL, e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(
            env::CALLBACK_URL,
            format!("scheme must be http or https, got {:?}", url.scheme()),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(env::CALLBACK_URL, "has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(env::CALLBACK_URL, "must not contain credentials"));
    }
    Ok(url)
}

/// Same origin as the callback URL, with the WebSocket scheme and [`CONNECT_PATH`].
fn connect_url(callback: &Url) -> Result<Url, ConfigError> {
    let scheme = if callback.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    let host = callback.host_str().unwrap_or_default();
    let authority = match callback.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    Url::parse(&format!("{scheme}://{authority}{CONNECT_PATH}"))
        .map_err(|e| invalid(env::CALLBACK_URL, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> HashMap<String, String> {
        [
            (env::RUN_ID, "run-1"),
            (env::CALLBACK_URL, "http://10.0.0.1:7420"),
            (env::RUN_TOKEN, "s3cret-token"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn with(key: &str, value: &str) -> HashMap<String, String> {
        let mut vars = base();
        vars.insert(key.to_owned(), value.to_owned());
        vars
    }

    #[test]
    fn defaults_are_applied() {
        let config = Config::from_env(&base()).unwrap();
        assert_eq!(config.run_id, "run-1");
        assert_eq!(
            config.connect_url.as_str(),
            "ws://10.0.0.1:7420/v1/sandbox/connect"
        );
        assert_eq!(config.lost_after, Duration::from_secs(60));
        assert!(config.work_dir.ends_with("codebolt-run-run-1"));
        assert_eq!(config.traceparent, None);
        assert_eq!(config.reconnect.min, Duration::from_millis(100));
    }

    #[test]
    fn https_prefix_maps_to_wss_origin() {
        let config =
            Config::from_env(&with(env::CALLBACK_URL, "https://cp.example.com/prefix/")).unwrap();
        assert_eq!(
            config.connect_url.as_str(),
            "wss://cp.example.com/v1/sandbox/connect"
        );
    }

    #[test]
    fn missing_and_invalid_values_name_the_variable() {
        let mut vars = base();
        vars.remove(env::RUN_TOKEN);
        let err = Config::from_env(&vars).unwrap_err().to_string();
        assert!(err.contains(env::RUN_TOKEN), "{err}");

        let err = Config::from_env(&with(env::CALLBACK_URL, "ftp://x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(env::CALLBACK_URL), "{err}");

        let err = Config::from_env(&with(env::LOST_AFTER_S, "soon"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(env::LOST_AFTER_S), "{err}");

        let err = Config::from_env(&with("CODEBOLT_SHIM_TYPO", "1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("CODEBOLT_SHIM_TYPO"), "{err}");
    }

    #[test]
    fn token_is_never_displayed() {
        let err = Config::from_env(&with(env::RUN_TOKEN, "bad token"))
            .unwrap_err()
            .to_string();
        assert!(!err.contains("bad token"), "{err}");
        let config = Config::from_env(&base()).unwrap();
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay(3, 1.0), Duration::from_millis(800));
        assert_eq!(b.delay(30, 1.0), Duration::from_secs(5));
        assert_eq!(b.delay(30, 0.0), Duration::from_millis(2500));
    }
}
