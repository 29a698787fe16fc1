//! Which provider a run goes to and with what resources (SPEC §3). Pure functions.

use actors::model::Resources;

use super::project::{AgentManifest, ProjectSettings};
use super::provider::{ProviderConfig, LOCAL_PROVIDER};

/// The provider for a run: the request's `execution` (CLI or API), else the agent manifest's,
/// else the project default, else `local`.
pub fn resolve_execution(
    requested: Option<&str>,
    manifest: &AgentManifest,
    settings: &ProjectSettings,
) -> String {
    requested
        .or(manifest.execution.provider.as_deref())
        .or(settings.execution.default_provider.as_deref())
        .unwrap_or(LOCAL_PROVIDER)
        .to_string()
}

/// The resources of a run, field by field: the request's, else the manifest's, else the
/// provider's `default_resources`.
pub fn resolve_resources(
    requested: &Resources,
    manifest: &AgentManifest,
    provider: &ProviderConfig,
) -> Resources {
    requested.over(
        &manifest
            .execution
            .resources
            .over(&provider.default_resources),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AgentExecution, ExecutionSettings};

    fn manifest(provider: Option<&str>, resources: Resources) -> AgentManifest {
        AgentManifest {
            name: "a".into(),
            command: "true".into(),
            image: None,
            description: None,
            execution: AgentExecution {
                provider: provider.map(str::to_string),
                resources,
            },
            env: Default::default(),
        }
    }

    fn settings(default_provider: Option<&str>) -> ProjectSettings {
        ProjectSettings {
            execution: ExecutionSettings {
                default_provider: default_provider.map(str::to_string),
            },
        }
    }

    fn res(memory_mb: Option<u64>, cpu: Option<f64>, gpu_count: Option<u32>) -> Resources {
        Resources {
            memory_mb,
            cpu,
            gpu_count,
        }
    }

    #[test]
    fn execution_precedence_request_then_manifest_then_project_then_local() {
        let cases = [
            (Some("docker"), Some("k8s"), Some("ssh-box"), "docker"),
            (Some("docker"), None, Some("ssh-box"), "docker"),
            (Some("docker"), None, None, "docker"),
            (None, Some("k8s"), Some("ssh-box"), "k8s"),
            (None, Some("k8s"), None, "k8s"),
            (None, None, Some("ssh-box"), "ssh-box"),
            (None, None, None, "local"),
        ];
        for (requested, in_manifest, project_default, expected) in cases {
            let got = resolve_execution(
                requested,
                &manifest(in_manifest, Resources::default()),
                &settings(project_default),
            );
            assert_eq!(
                got, expected,
                "requested={requested:?} manifest={in_manifest:?} project={project_default:?}"
            );
        }
    }

    #[test]
    fn resources_merge_field_by_field() {
        let mut provider = ProviderConfig::local_default();
        provider.default_resources = res(Some(4096), Some(2.0), Some(0));

        // Nothing requested anywhere: the provider's defaults.
        assert_eq!(
            resolve_resources(
                &Resources::default(),
                &manifest(None, Resources::default()),
                &provider
            ),
            res(Some(4096), Some(2.0), Some(0))
        );
        // The seed's gpu-heavy-agent: memory and GPUs from the manifest, CPU from the provider.
        let gpu_heavy = manifest(Some("k8s"), res(Some(16384), None, Some(1)));
        assert_eq!(
            resolve_resources(&Resources::default(), &gpu_heavy, &provider),
            res(Some(16384), Some(2.0), Some(1))
        );
        // The request beats both, field by field.
        assert_eq!(
            resolve_resources(&res(None, Some(8.0), None), &gpu_heavy, &provider),
            res(Some(16384), Some(8.0), Some(1))
        );
        assert_eq!(
            resolve_resources(&res(Some(512), Some(0.5), Some(2)), &gpu_heavy, &provider),
            res(Some(512), Some(0.5), Some(2))
        );
        // Fields nobody sets stay unset.
        let bare = ProviderConfig::local_default();
        assert_eq!(
            resolve_resources(
                &res(None, Some(1.0), None),
                &manifest(None, Resources::default()),
                &bare
            ),
            res(None, Some(1.0), None)
        );
    }
}
