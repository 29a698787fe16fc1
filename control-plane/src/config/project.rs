//! The project workspace's `.codebolt/` directory: settings and agent manifests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use actors::model::Resources;

use super::yaml::{read_document, read_resources, Fields};
use super::{check_name, ConfigError};

/// Directory of project files inside the workspace.
pub const PROJECT_DIR: &str = ".codebolt";
/// Manifest file inside an agent's directory.
pub const MANIFEST_FILE: &str = "agent.yaml";

/// A workspace and its `.codebolt/settings.yaml`.
#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    root: PathBuf,
    settings: ProjectSettings,
}

/// `.codebolt/settings.yaml`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProjectSettings {
    pub execution: ExecutionSettings,
}

/// `execution:` in the project settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutionSettings {
    /// Provider for agents whose manifest names none.
    pub default_provider: Option<String>,
}

/// `.codebolt/agents/<name>/agent.yaml`.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentManifest {
    pub name: String,
    /// Run with `sh -c` in the unpacked bundle directory.
    pub command: String,
    pub image: Option<String>,
    pub description: Option<String>,
    pub execution: AgentExecution,
    /// Extra environment for the agent process.
    pub env: BTreeMap<String, String>,
}

/// `execution:` in an agent manifest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentExecution {
    pub provider: Option<String>,
    pub resources: Resources,
}

impl Project {
    /// Opens the workspace at `workspace`, reading its settings if it has any.
    pub fn load(workspace: &Path) -> Result<Project, ConfigError> {
        if !workspace.is_dir() {
            return Err(ConfigError::WorkspaceNotFound {
                path: workspace.to_path_buf(),
            });
        }
        let settings_file = workspace.join(PROJECT_DIR).join("settings.yaml");
        let settings = if settings_file.exists() {
            ProjectSettings::from_value(read_document(&settings_file)?, &settings_file)?
        } else {
            ProjectSettings::default()
        };
        Ok(Project {
            root: workspace.to_path_buf(),
            settings,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn settings(&self) -> &ProjectSettings {
        &self.settings
    }

    /// Directory of the agent `name`, whether or not it exists.
    pub fn agent_dir(&self, name: &str) -> Result<PathBuf, ConfigError> {
        validate_agent_name(name)?;
        Ok(self.root.join(PROJECT_DIR).join("agents").join(name))
    }

    /// Reads the manifest of the agent `name`.
    pub fn agent(&self, name: &str) -> Result<AgentManifest, ConfigError> {
        let file = self.agent_dir(name)?.join(MANIFEST_FILE);
        if !file.is_file() {
            return Err(ConfigError::AgentNotFound {
                name: name.to_string(),
                path: file,
            });
        }
        AgentManifest::from_value(name, read_document(&file)?, &file)
    }
}

impl ProjectSettings {
    /// Parses settings YAML as if read from `file` (named in errors).
    pub fn from_yaml(text: &str, file: &Path) -> Result<ProjectSettings, ConfigError> {
        ProjectSettings::from_value(super::yaml::parse_document(text, file)?, file)
    }

    fn from_value(value: serde_yaml::Value, file: &Path) -> Result<ProjectSettings, ConfigError> {
        let mut root = Fields::new(file, String::new(), value)?;
        let mut execution = root.section("execution")?;
        let default_provider = read_provider_name(&mut execution, "default_provider")?;
        execution.finish()?;
        root.finish()?;
        Ok(ProjectSettings {
            execution: ExecutionSettings { default_provider },
        })
    }
}

impl AgentManifest {
    /// Parses manifest YAML for agent `name` as if read from `file` (named in errors).
    pub fn from_yaml(name: &str, text: &str, file: &Path) -> Result<AgentManifest, ConfigError> {
        AgentManifest::from_value(name, super::yaml::parse_document(text, file)?, file)
    }

    fn from_value(
        name: &str,
        value: serde_yaml::Value,
        file: &Path,
    ) -> Result<AgentManifest, ConfigError> {
        validate_agent_name(name)?;
        let mut root = Fields::new(file, String::new(), value)?;
        let description = root.optional_string("description")?;
        let command = root.required_string("command")?;
        let image = root.optional_string("image")?;
        let mut execution = root.section("execution")?;
        let provider = read_provider_name(&mut execution, "provider")?;
        let resources = read_resources(&mut execution, "resources")?;
        execution.finish()?;
        let env_path = root.key_path("env");
        let env = root
            .string_map("env")?
            .into_iter()
            .map(|(key, value)| match check_env_name(&key) {
                Ok(()) => Ok((key, value)),
                Err(message) => Err(super::yaml::invalid(
                    file,
                    &super::yaml::join_path(&env_path, &key),
                    message,
                )),
            })
            .collect::<Result<_, _>>()?;
        root.finish()?;
        Ok(AgentManifest {
            name: name.to_string(),
            command,
            image,
            description,
            execution: AgentExecution {
                provider,
                resources,
            },
            env,
        })
    }
}

/// Agent names are one path component: letters, digits, `.`, `_`, `-`, and not `.` or `..`.
pub fn validate_agent_name(name: &str) -> Result<(), ConfigError> {
    check_name(name).map_err(|reason| ConfigError::InvalidAgentName {
        name: name.to_string(),
        reason,
    })
}

fn read_provider_name(
    fields: &mut Fields<'_>,
    key: &'static str,
) -> Result<Option<String>, ConfigError> {
    let name = fields.optional_string(key)?;
    if let Some(name) = &name {
        check_name(name)
            .map_err(|reason| fields.invalid(key, format!("invalid provider name: {reason}")))?;
    }
    Ok(name)
}

fn check_env_name(name: &str) -> Result<(), String> {
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "invalid environment variable name `{name}`: use letters, digits and `_`, not starting with a digit"
        ));
    }
    if name.starts_with("CODEBOLT_") || name == "TRACEPARENT" {
        return Err(format!(
            "`{name}` is reserved: the control plane sets CODEBOLT_* and TRACEPARENT itself"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn write(root: &Path, rel: &str, text: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn workspace_without_codebolt_dir_has_default_settings() {
        let ws = workspace();
        let project = Project::load(ws.path()).unwrap();
        assert_eq!(project.settings(), &ProjectSettings::default());
        assert_eq!(project.root(), ws.path());
    }

    #[test]
    fn missing_workspace_is_an_error() {
        let ws = workspace();
        let err = Project::load(&ws.path().join("nope")).unwrap_err();
        assert!(
            matches!(err, ConfigError::WorkspaceNotFound { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn seed_project_settings_parse() {
        let ws = workspace();
        write(
            ws.path(),
            ".codebolt/settings.yaml",
            "execution:\n  default_provider: k8s\n",
        );
        let project = Project::load(ws.path()).unwrap();
        assert_eq!(
            project.settings().execution.default_provider.as_deref(),
            Some("k8s")
        );
    }

    #[test]
    fn settings_errors_name_file_and_key() {
        let ws = workspace();
        write(
            ws.path(),
            ".codebolt/settings.yaml",
            "execution:\n  default: k8s\n",
        );
        let err = Project::load(ws.path()).unwrap_err().to_string();
        let file = ws.path().join(".codebolt/settings.yaml");
        assert_eq!(
            err,
            format!(
                "{}: execution.default: unknown key (expected one of: default_provider)",
                file.display()
            )
        );
        let err = ProjectSettings::from_yaml("execution: {default_provider: '../x'}", &file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("execution.default_provider: invalid provider name"),
            "{err}"
        );
    }

    #[test]
    fn seed_agent_manifest_parses() {
        let ws = workspace();
        write(
            ws.path(),
            ".codebolt/agents/gpu-heavy-agent/agent.yaml",
            "# .codebolt/agents/gpu-heavy-agent/agent.yaml\n\
             description: trains things\n\
             command: python3 agent.py\n\
             image: pytorch/pytorch:latest\n\
             execution:\n  provider: k8s\n  resources:\n    memory_mb: 16384\n    gpu_count: 1\n\
             env:\n  MODEL: small\n  RETRIES: 3\n  VERBOSE: true\n",
        );
        let project = Project::load(ws.path()).unwrap();
        let manifest = project.agent("gpu-heavy-agent").unwrap();
        assert_eq!(manifest.name, "gpu-heavy-agent");
        assert_eq!(manifest.command, "python3 agent.py");
        assert_eq!(manifest.image.as_deref(), Some("pytorch/pytorch:latest"));
        assert_eq!(manifest.description.as_deref(), Some("trains things"));
        assert_eq!(manifest.execution.provider.as_deref(), Some("k8s"));
        assert_eq!(
            manifest.execution.resources,
            Resources {
                memory_mb: Some(16384),
                cpu: None,
                gpu_count: Some(1)
            }
        );
        let env: Vec<(&str, &str)> = manifest
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [("MODEL", "small"), ("RETRIES", "3"), ("VERBOSE", "true")]
        );
        assert_eq!(
            project.agent_dir("gpu-heavy-agent").unwrap(),
            ws.path().join(".codebolt/agents/gpu-heavy-agent")
        );
    }

    #[test]
    fn minimal_manifest_needs_only_a_command() {
        let manifest =
            AgentManifest::from_yaml("a", "command: ./run.sh\n", Path::new("agent.yaml")).unwrap();
        assert_eq!(manifest.command, "./run.sh");
        assert_eq!(manifest.execution, AgentExecution::default());
        assert!(manifest.env.is_empty());
    }

    #[test]
    fn manifest_errors_name_file_and_key() {
        let file = Path::new("agents/a/agent.yaml");
        let cases = [
            ("image: x\n", "agents/a/agent.yaml: command: missing required key"),
            ("command: ''\n", "agents/a/agent.yaml: command: must not be empty"),
            ("command: x\ncomand: y\n", "agents/a/agent.yaml: comand: unknown key (expected one of: description, command, image, execution, env)"),
            ("command: x\nexecution: {provider: k8s, resources: {gpus: 1}}\n", "agents/a/agent.yaml: execution.resources.gpus: unknown key (expected one of: memory_mb, cpu, gpu_count)"),
            ("command: x\nexecution: {resources: {memory_mb: lots}}\n", "agents/a/agent.yaml: execution.resources.memory_mb: invalid type"),
            ("command: x\nexecution: {region: eu}\n", "agents/a/agent.yaml: execution.region: unknown key (expected one of: provider, resources)"),
            ("command: x\nenv: {CODEBOLT_RUN_TOKEN: x}\n", "agents/a/agent.yaml: env.CODEBOLT_RUN_TOKEN: `CODEBOLT_RUN_TOKEN` is reserved"),
            ("command: x\nenv: {'1BAD': x}\n", "agents/a/agent.yaml: env.1BAD: invalid environment variable name"),
            ("command: x\nenv: {A: {b: c}}\n", "agents/a/agent.yaml: env.A: expected a string, found a mapping"),
            ("command: [a, b]\n", "agents/a/agent.yaml: command: invalid type: sequence"),
        ];
        for (text, expected) in cases {
            let err = AgentManifest::from_yaml("a", text, file)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(expected), "for {text:?}: got {err:?}");
        }
    }

    #[test]
    fn missing_agent_is_agent_not_found() {
        let ws = workspace();
        let project = Project::load(ws.path()).unwrap();
        match project.agent("ghost") {
            Err(ConfigError::AgentNotFound { name, path }) => {
                assert_eq!(name, "ghost");
                assert_eq!(path, ws.path().join(".codebolt/agents/ghost/agent.yaml"));
            }
            other => panic!("expected AgentNotFound, got {other:?}"),
        }
        // A directory without a manifest is not an agent either.
        std::fs::create_dir_all(ws.path().join(".codebolt/agents/empty")).unwrap();
        assert!(matches!(
            project.agent("empty"),
            Err(ConfigError::AgentNotFound { .. })
        ));
    }

    #[test]
    fn agent_names_that_are_not_one_plain_component_are_refused() {
        let ws = workspace();
        write(ws.path(), ".codebolt/secret/agent.yaml", "command: x\n");
        let project = Project::load(ws.path()).unwrap();
        for name in [
            "..",
            ".",
            "",
            "../secret",
            "a/b",
            "/etc",
            "a\\b",
            "a b",
            "ä",
            "a\0b",
        ] {
            match project.agent(name) {
                Err(ConfigError::InvalidAgentName { name: bad, .. }) => assert_eq!(bad, name),
                other => panic!("{name:?}: expected InvalidAgentName, got {other:?}"),
            }
            assert!(project.agent_dir(name).is_err(), "{name:?}");
        }
        let err = project.agent("../secret").unwrap_err().to_string();
        assert!(err.starts_with("invalid agent name `../secret`: "), "{err}");
        for name in ["a", "my-agent", "v1.2_x", "..a"] {
            assert!(validate_agent_name(name).is_ok(), "{name}");
        }
    }
}
