//! What every request handler shares: started once, handed out through `web::Data`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use actix::Addr;
use actors::cluster::ClusterStats;
use actors::router::ProviderRouter;
use actors::run::{RunDeps, RunRegistry};
use actors::store::RunStore;

use crate::bundle::Bundle;
use crate::config::{ApiToken, ServerConfig};
use crate::telemetry::MetricsPipeline;

pub struct AppState {
    pub config: ServerConfig,
    pub workspace: PathBuf,
    pub store: Arc<dyn RunStore>,
    pub router: Addr<ProviderRouter>,
    pub registry: RunRegistry,
    pub run_deps: RunDeps,
    /// Base URL sandboxes call back to.
    pub callback_url: String,
    /// This replica's name, recorded as the owner of the runs it starts.
    pub replica_id: String,
    /// What this replica's keeper did (adoptions, routed commands), for `/metrics`.
    pub cluster_stats: Arc<ClusterStats>,
    /// What `/metrics` renders.
    pub metrics_pipeline: MetricsPipeline,
    /// Bundles by SHA-256 (content addressed, so one copy per distinct agent directory).
    pub bundles: Mutex<HashMap<String, Arc<Bundle>>>,
    /// API bearer tokens; empty means the API is open (loopback binds only).
    pub api_tokens: Vec<ApiToken>,
}

impl AppState {
    pub fn bundle(&self, sha256: &str) -> Option<Arc<Bundle>> {
        self.bundles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sha256)
            .cloned()
    }

    pub fn keep_bundle(&self, bundle: Bundle) -> Arc<Bundle> {
        let mut bundles = self.bundles.lock().unwrap_or_else(|p| p.into_inner());
        bundles
            .entry(bundle.sha256.clone())
            .or_insert_with(|| Arc::new(bundle))
            .clone()
    }
}
