//! The control plane's actors: `ProviderRouter` supervising one provider actor per configured
//! provider, one `RunActor` per run, one `SandboxConnection` per shim WebSocket; and the seams they
//! stand on (`Provider`, `RunStore`, `ToolHost`).

pub mod cluster;
pub mod metrics;
pub mod model;
pub mod provider;
pub mod reconciler;
pub mod router;
pub mod run;
pub mod sandbox_connection;
pub mod store;
pub mod token;
pub mod tools;
