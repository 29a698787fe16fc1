//! Walking a parsed YAML document key by key, so every error names the file and the key path.
//!
//! serde's derived `Deserialize` reports unknown fields without saying where they are; here each
//! mapping is a [`Fields`] that hands out the keys its reader asks for and, at [`Fields::finish`],
//! refuses whatever is left, listing the keys it would have accepted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::ConfigError;

/// Parses YAML text into a value; an empty document is an empty mapping.
pub(crate) fn parse_document(text: &str, file: &Path) -> Result<Value, ConfigError> {
    let value: Value = serde_yaml::from_str(text).map_err(|err| ConfigError::Syntax {
        file: file.to_path_buf(),
        message: err.to_string(),
    })?;
    Ok(value)
}

/// Reads a YAML file into a value.
pub(crate) fn read_document(file: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    parse_document(&text, file)
}

/// One YAML mapping being read, with the dotted path that leads to it.
pub(crate) struct Fields<'f> {
    file: &'f Path,
    path: String,
    entries: Vec<(String, Value)>,
    expected: Vec<&'static str>,
}

impl<'f> Fields<'f> {
    /// A mapping at `path`; a missing or null value reads as an empty mapping.
    pub(crate) fn new(file: &'f Path, path: String, value: Value) -> Result<Self, ConfigError> {
        let mapping = match value {
            Value::Null => serde_yaml::Mapping::new(),
            Value::Mapping(mapping) => mapping,
            other => {
                return Err(invalid(
                    file,
                    &path,
                    format!("expected a mapping, found {}", describe(&other)),
                ))
            }
        };
        let mut entries = Vec::with_capacity(mapping.len());
        for (key, value) in mapping {
            match key {
                Value::String(key) => entries.push((key, value)),
                other => {
                    return Err(invalid(
                        file,
                        &path,
                        format!("keys must be strings, found {}", describe(&other)),
                    ))
                }
            }
        }
        Ok(Fields {
            file,
            path,
            entries,
            expected: Vec::new(),
        })
    }

    pub(crate) fn file(&self) -> &'f Path {
        self.file
    }

    /// Dotted path of this mapping.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// An error about this mapping as a whole.
    pub(crate) fn invalid_here(&self, message: impl Into<String>) -> ConfigError {
        invalid(self.file, &self.path, message.into())
    }

    /// Dotted path of `key` inside this mapping.
    pub(crate) fn key_path(&self, key: &str) -> String {
        join_path(&self.path, key)
    }

    /// An error about the value of `key`.
    pub(crate) fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        invalid(self.file, &self.key_path(key), message.into())
    }

    /// Records `key` as accepted without reading it (it was read another way).
    pub(crate) fn accept(&mut self, key: &'static str) {
        if !self.expected.contains(&key) {
            self.expected.push(key);
        }
    }

    /// Removes and returns the value of `key`; null counts as absent.
    pub(crate) fn take(&mut self, key: &'static str) -> Option<Value> {
        self.accept(key);
        self.take_unlisted(key)
    }

    /// Like [`Fields::take`] without listing `key` among the expected keys yet, so a reader can
    /// list it in the place it reads best.
    pub(crate) fn take_unlisted(&mut self, key: &str) -> Option<Value> {
        let index = self.entries.iter().position(|(k, _)| k == key)?;
        let (_, value) = self.entries.remove(index);
        if value.is_null() {
            None
        } else {
            Some(value)
        }
    }

    /// The value of `key` converted to `T`, if present.
    pub(crate) fn optional<T: DeserializeOwned>(
        &mut self,
        key: &'static str,
    ) -> Result<Option<T>, ConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(value) => serde_yaml::from_value(value)
                .map(Some)
                .map_err(|err| self.invalid(key, err.to_string())),
        }
    }

    /// A non-empty string.
    pub(crate) fn optional_string(
        &mut self,
        key: &'static str,
    ) -> Result<Option<String>, ConfigError> {
        match self.optional::<String>(key)? {
            Some(value) if value.trim().is_empty() => Err(self.invalid(key, "must not be empty")),
            other => Ok(other),
        }
    }

    /// A non-empty string; absent is an error.
    pub(crate) fn required_string(&mut self, key: &'static str) -> Result<String, ConfigError> {
        self.optional_string(key)?
            .ok_or_else(|| ConfigError::MissingKey {
                file: self.file.to_path_buf(),
                key: self.key_path(key),
            })
    }

    /// A local path; a leading `~` expands to `HOME` from `env`.
    pub(crate) fn optional_path(
        &mut self,
        key: &'static str,
        env: &HashMap<String, String>,
    ) -> Result<Option<PathBuf>, ConfigError> {
        match self.optional_string(key)? {
            None => Ok(None),
            Some(raw) => expand_home(&raw, env)
                .map(Some)
                .map_err(|message| self.invalid(key, message)),
        }
    }

    /// The nested mapping under `key` (empty when absent).
    pub(crate) fn section(&mut self, key: &'static str) -> Result<Fields<'f>, ConfigError> {
        let value = self.take(key).unwrap_or(Value::Null);
        Fields::new(self.file, self.key_path(key), value)
    }

    /// A mapping from free-form names to strings; numbers and booleans are taken as their text.
    pub(crate) fn string_map(
        &mut self,
        key: &'static str,
    ) -> Result<Vec<(String, String)>, ConfigError> {
        let section = self.section(key)?;
        let file = section.file;
        let path = section.path.clone();
        section
            .into_entries()
            .into_iter()
            .map(|(name, value)| {
                let text = match value {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => {
                        return Err(invalid(
                            file,
                            &join_path(&path, &name),
                            format!("expected a string, found {}", describe(&other)),
                        ))
                    }
                };
                Ok((name, text))
            })
            .collect()
    }

    /// The remaining entries, for mappings whose keys are names rather than a fixed set.
    pub(crate) fn into_entries(self) -> Vec<(String, Value)> {
        self.entries
    }

    /// Refuses any key nobody asked for.
    pub(crate) fn finish(self) -> Result<(), ConfigError> {
        match self.entries.into_iter().next() {
            None => Ok(()),
            Some((key, _)) => Err(ConfigError::UnknownKey {
                file: self.file.to_path_buf(),
                key: join_path(&self.path, &key),
                expected: self.expected.iter().map(|k| (*k).to_string()).collect(),
            }),
        }
    }
}

pub(crate) fn join_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

pub(crate) fn invalid(file: &Path, key: &str, message: String) -> ConfigError {
    ConfigError::InvalidValue {
        file: file.to_path_buf(),
        key: if key.is_empty() {
            "(top level)".to_string()
        } else {
            key.to_string()
        },
        message,
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Expands a leading `~` or `~/` with `HOME` from `env`.
pub(crate) fn expand_home(raw: &str, env: &HashMap<String, String>) -> Result<PathBuf, String> {
    let rest = match raw.strip_prefix('~') {
        None => return Ok(PathBuf::from(raw)),
        Some(rest) => rest,
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        return Err(format!(
            "cannot expand `{raw}`: only `~` and `~/…` are supported"
        ));
    }
    match env.get("HOME").filter(|home| !home.is_empty()) {
        Some(home) => Ok(PathBuf::from(format!("{home}{rest}"))),
        None => Err(format!("cannot expand `{raw}`: HOME is not set")),
    }
}

/// Reads a `resources: {memory_mb, cpu, gpu_count}` mapping.
pub(crate) fn read_resources(
    parent: &mut Fields<'_>,
    key: &'static str,
) -> Result<actors::model::Resources, ConfigError> {
    let mut fields = parent.section(key)?;
    let memory_mb: Option<u64> = fields.optional("memory_mb")?;
    if memory_mb == Some(0) {
        return Err(fields.invalid("memory_mb", "must be greater than zero"));
    }
    let cpu: Option<f64> = fields.optional("cpu")?;
    if let Some(cpu) = cpu {
        if !(cpu.is_finite() && cpu > 0.0) {
            return Err(fields.invalid("cpu", "must be a number greater than zero"));
        }
    }
    let gpu_count: Option<u32> = fields.optional("gpu_count")?;
    fields.finish()?;
    Ok(actors::model::Resources {
        memory_mb,
        cpu,
        gpu_count,
    })
}
