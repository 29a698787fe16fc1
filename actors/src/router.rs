//! `ProviderRouter`: one per replica. Owns one provider actor per configured provider, routes
//! sandbox operations to it, and supervises it explicitly: when a provider actor stops (a panic
//! in its backend, say) the router builds a fresh instance from the provider's factory after a
//! backoff, and counts the restart.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use opentelemetry::KeyValue;
use serde::Serialize;
use utoipa::ToSchema;

use crate::metrics::{attr, Metrics};
use crate::model::{Resources, RunId};
use crate::provider::actor::{self, ProviderActor, ProviderExited};
use crate::provider::{
    LogStream, Provider, ProviderError, ProviderHealth, SandboxExit, SandboxHandle, SandboxInfo,
    SpawnRequest,
};

pub type ProviderFactory =
    Arc<dyn Fn() -> Result<Arc<dyn Provider>, ProviderError> + Send + Sync + 'static>;

/// Per-provider billing rates for cost estimates (SPEC §10).
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct CostRates {
    pub per_cpu_hour: Option<f64>,
    pub per_gb_hour: Option<f64>,
    pub per_gpu_hour: Option<f64>,
    pub per_run: Option<f64>,
    pub minimum_billed_minutes: Option<u32>,
}

impl CostRates {
    /// Estimated cost of a run that held `resources` for `seconds`.
    pub fn estimate(&self, resources: &Resources, seconds: f64) -> Option<f64> {
        let any = self.per_cpu_hour.is_some()
            || self.per_gb_hour.is_some()
            || self.per_gpu_hour.is_some()
            || self.per_run.is_some();
        if !any {
            return None;
        }
        let minimum = f64::from(self.minimum_billed_minutes.unwrap_or(0)) * 60.0;
        let hours = seconds.max(minimum) / 3600.0;
        let cpu = resources.cpu.unwrap_or(1.0) * self.per_cpu_hour.unwrap_or(0.0);
        let gb = resources.memory_mb.map_or(0.0, |mb| mb as f64 / 1024.0)
            * self.per_gb_hour.unwrap_or(0.0);
        let gpu = f64::from(resources.gpu_count.unwrap_or(0)) * self.per_gpu_hour.unwrap_or(0.0);
        Some(self.per_run.unwrap_or(0.0) + hours * (cpu + gb + gpu))
    }
}

/// Everything the router needs to run (and re-run) one provider.
#[derive(Clone)]
pub struct ProviderSpec {
    pub name: String,
    pub kind: String,
    pub factory: ProviderFactory,
    pub default_resources: Resources,
    pub max_concurrent_runs: Option<u32>,
    pub cost: CostRates,
}

/// Supervision timings.
#[derive(Debug, Clone, Copy)]
pub struct SupervisorSettings {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub health_interval: Duration,
}

impl Default for SupervisorSettings {
    fn default() -> Self {
        SupervisorSettings {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            health_interval: Duration::from_secs(15),
        }
    }
}

/// A provider as `GET /v1/providers` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ProviderStatus {
    pub name: String,
    pub kind: String,
    pub healthy: bool,
    pub message: Option<String>,
    /// Times the provider actor was restarted after stopping.
    pub restarts: u32,
    pub last_error: Option<String>,
    pub last_restart_at: Option<DateTime<Utc>>,
    pub active_runs: usize,
    pub max_concurrent_runs: Option<u32>,
    pub default_resources: Resources,
}

struct Slot {
    spec: ProviderSpec,
    addr: Option<Addr<ProviderActor>>,
    generation: u64,
    restarts: u32,
    consecutive_failures: u32,
    health: ProviderHealth,
    last_error: Option<String>,
    last_restart_at: Option<DateTime<Utc>>,
    active: HashSet<RunId>,
}

pub struct ProviderRouter {
    slots: BTreeMap<String, Slot>,
    settings: SupervisorSettings,
    metrics: Arc<Metrics>,
}

impl ProviderRouter {
    pub fn new(specs: Vec<ProviderSpec>, settings: SupervisorSettings) -> Self {
        let slots = specs
            .into_iter()
            .map(|spec| {
                (
                    spec.name.clone(),
                    Slot {
                        spec,
                        addr: None,
                        generation: 0,
                        restarts: 0,
                        consecutive_failures: 0,
                        health: ProviderHealth {
                            healthy: false,
                            message: Some("starting".into()),
                        },
                        last_error: None,
                        last_restart_at: None,
                        active: HashSet::new(),
                    },
                )
            })
            .collect();
        ProviderRouter {
            slots,
            settings,
            metrics: Metrics::noop(),
        }
    }

    /// Reports provider health, restarts and errors to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Records a provider's health as the `codebolt.provider.healthy` gauge.
    fn report_health(&self, name: &str) {
        if let Some(slot) = self.slots.get(name) {
            self.metrics.provider_healthy.record(
                u64::from(slot.health.healthy && slot.addr.is_some()),
                &[
                    KeyValue::new(attr::PROVIDER, name.to_string()),
                    KeyValue::new(attr::PROVIDER_KIND, slot.spec.kind.clone()),
                ],
            );
        }
    }

    /// A provider operation through the provider's actor, its failure counted by kind.
    fn call<M, T>(
        &self,
        provider: &str,
        operation: &'static str,
        msg: M,
    ) -> impl Future<Output = Result<T, ProviderError>> + 'static
    where
        M: Message<Result = Result<T, ProviderError>> + Send + 'static,
        T: Send + 'static,
        ProviderActor: Handler<M>,
    {
        let addr = self.addr(provider);
        let metrics = self.metrics.clone();
        let provider = provider.to_string();
        async move {
            let res = match addr {
                Ok(addr) => match addr.send(msg).await {
                    Ok(res) => res,
                    Err(err) => Err(ProviderError::Operation {
                        operation,
                        message: format!("provider actor unavailable: {err}"),
                    }),
                },
                Err(err) => Err(err),
            };
            if let Err(err) = &res {
                metrics.provider_errors.add(
                    1,
                    &[
                        KeyValue::new(attr::PROVIDER, provider),
                        KeyValue::new(attr::OPERATION, operation),
                        KeyValue::new(attr::ERROR_TYPE, err.kind()),
                    ],
                );
            }
            res
        }
    }

    /// Builds and starts the provider actor of `name` from its factory.
    fn start_provider(&mut self, name: &str, ctx: &mut Context<Self>) {
        let on_exit = ctx.address().recipient();
        let backoff = self.settings;
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        slot.generation += 1;
        match (slot.spec.factory)() {
            Ok(provider) => {
                slot.addr = Some(
                    ProviderActor::new(name.to_string(), slot.generation, provider, on_exit)
                        .start(),
                );
                slot.consecutive_failures = 0;
                slot.health = ProviderHealth {
                    healthy: true,
                    message: None,
                };
                self.report_health(name);
                self.check_health(name, ctx);
            }
            Err(err) => {
                tracing::warn!(provider = name, error = %err, "provider could not be started");
                slot.addr = None;
                slot.last_error = Some(err.to_string());
                slot.health = ProviderHealth {
                    healthy: false,
                    message: Some(err.to_string()),
                };
                slot.consecutive_failures += 1;
                let delay = backoff_delay(backoff, slot.consecutive_failures);
                self.report_health(name);
                let name = name.to_string();
                ctx.run_later(delay, move |act, ctx| act.start_provider(&name, ctx));
            }
        }
    }

    fn check_health(&self, name: &str, ctx: &mut Context<Self>) {
        let Some(addr) = self.slots.get(name).and_then(|s| s.addr.clone()) else {
            return;
        };
        let name = name.to_string();
        ctx.spawn(
            async move { addr.send(actor::CheckHealth).await }
                .into_actor(self)
                .map(move |res, act, _| {
                    if let (Some(slot), Ok(health)) = (act.slots.get_mut(&name), res) {
                        slot.health = health;
                        act.report_health(&name);
                    }
                }),
        );
    }

    fn addr(&self, name: &str) -> Result<Addr<ProviderActor>, ProviderError> {
        let slot = self
            .slots
            .get(name)
            .ok_or_else(|| ProviderError::Unavailable {
                provider: name.to_string(),
                message: format!(
                    "no provider named '{name}' is configured (configured: {})",
                    self.slots.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            })?;
        slot.addr.clone().ok_or_else(|| ProviderError::Unavailable {
            provider: name.to_string(),
            message: slot
                .last_error
                .clone()
                .unwrap_or_else(|| "the provider is restarting".to_string()),
        })
    }
}

fn backoff_delay(settings: SupervisorSettings, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
    settings
        .initial_backoff
        .saturating_mul(factor)
        .min(settings.max_backoff)
}

impl Actor for ProviderRouter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let names: Vec<String> = self.slots.keys().cloned().collect();
        for name in &names {
            self.start_provider(name, ctx);
        }
        ctx.run_interval(self.settings.health_interval, move |act, ctx| {
            let names: Vec<String> = act.slots.keys().cloned().collect();
            for name in &names {
                act.check_health(name, ctx);
            }
        });
    }
}

impl Handler<ProviderExited> for ProviderRouter {
    type Result = ();
    fn handle(&mut self, msg: ProviderExited, ctx: &mut Context<Self>) {
        let settings = self.settings;
        let Some(slot) = self.slots.get_mut(&msg.name) else {
            return;
        };
        if slot.generation != msg.generation {
            return;
        }
        slot.addr = None;
        slot.restarts += 1;
        slot.consecutive_failures += 1;
        slot.last_restart_at = Some(Utc::now());
        slot.last_error = Some("provider actor stopped unexpectedly".to_string());
        slot.health = ProviderHealth {
            healthy: false,
            message: Some("restarting".into()),
        };
        let delay = backoff_delay(settings, slot.consecutive_failures);
        self.metrics
            .provider_restarts
            .add(1, &[KeyValue::new(attr::PROVIDER, msg.name.clone())]);
        tracing::error!(provider = %msg.name, restarts = slot.restarts, delay_ms = delay.as_millis() as u64, "provider actor stopped; restarting");
        self.report_health(&msg.name);
        let name = msg.name;
        ctx.run_later(delay, move |act, ctx| act.start_provider(&name, ctx));
    }
}

/// The providers and their state.
#[derive(Message)]
#[rtype(result = "Vec<ProviderStatus>")]
pub struct ListProviders;

impl Handler<ListProviders> for ProviderRouter {
    type Result = MessageResult<ListProviders>;
    fn handle(&mut self, _: ListProviders, _: &mut Context<Self>) -> Self::Result {
        MessageResult(
            self.slots
                .iter()
                .map(|(name, slot)| ProviderStatus {
                    name: name.clone(),
                    kind: slot.spec.kind.clone(),
                    healthy: slot.health.healthy && slot.addr.is_some(),
                    message: slot.health.message.clone(),
                    restarts: slot.restarts,
                    last_error: slot.last_error.clone(),
                    last_restart_at: slot.last_restart_at,
                    active_runs: slot.active.len(),
                    max_concurrent_runs: slot.spec.max_concurrent_runs,
                    default_resources: slot.spec.default_resources.clone(),
                })
                .collect(),
        )
    }
}

/// Cost rates of a provider (for a run's cost estimate).
#[derive(Message)]
#[rtype(result = "Option<CostRates>")]
pub struct ProviderCost(pub String);

impl Handler<ProviderCost> for ProviderRouter {
    type Result = MessageResult<ProviderCost>;
    fn handle(&mut self, msg: ProviderCost, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.slots.get(&msg.0).map(|s| s.spec.cost.clone()))
    }
}

/// Routes a spawn to the named provider.
#[derive(Message)]
#[rtype(result = "Result<SandboxHandle, ProviderError>")]
pub struct SpawnSandbox {
    pub provider: String,
    pub request: SpawnRequest,
}

impl Handler<SpawnSandbox> for ProviderRouter {
    type Result = ResponseActFuture<Self, Result<SandboxHandle, ProviderError>>;
    fn handle(&mut self, msg: SpawnSandbox, _: &mut Context<Self>) -> Self::Result {
        let provider = msg.provider;
        let run_id = msg.request.run_id;
        Box::pin(
            self.call(&provider, "spawn", actor::Spawn(msg.request))
                .into_actor(self)
                .map(move |res, act, _| {
                    if let (Ok(_), Some(slot)) = (&res, act.slots.get_mut(&provider)) {
                        slot.active.insert(run_id);
                    }
                    res
                }),
        )
    }
}

/// Sandbox operations addressed by provider name.
#[derive(Message)]
#[rtype(result = "Result<SandboxExit, ProviderError>")]
pub struct WaitSandbox {
    pub provider: String,
    pub sandbox: SandboxHandle,
}

#[derive(Message)]
#[rtype(result = "Result<(), ProviderError>")]
pub struct TerminateSandbox {
    pub provider: String,
    pub sandbox: SandboxHandle,
}

#[derive(Message)]
#[rtype(result = "Result<(), ProviderError>")]
pub struct KillSandbox {
    pub provider: String,
    pub run_id: RunId,
    pub sandbox: SandboxHandle,
}

#[derive(Message)]
#[rtype(result = "Result<LogStream, ProviderError>")]
pub struct SandboxLogs {
    pub provider: String,
    pub sandbox: SandboxHandle,
    pub follow: bool,
}

#[derive(Message)]
#[rtype(result = "Result<Option<crate::model::Usage>, ProviderError>")]
pub struct SandboxUsage {
    pub provider: String,
    pub sandbox: SandboxHandle,
}

#[derive(Message)]
#[rtype(result = "Result<Vec<SandboxInfo>, ProviderError>")]
pub struct ListSandboxes {
    pub provider: String,
    pub labels: BTreeMap<String, String>,
}

impl Handler<WaitSandbox> for ProviderRouter {
    type Result = ResponseFuture<Result<SandboxExit, ProviderError>>;
    fn handle(&mut self, msg: WaitSandbox, _: &mut Context<Self>) -> Self::Result {
        Box::pin(self.call(&msg.provider, "wait", actor::Wait(msg.sandbox)))
    }
}

impl Handler<TerminateSandbox> for ProviderRouter {
    type Result = ResponseFuture<Result<(), ProviderError>>;
    fn handle(&mut self, msg: TerminateSandbox, _: &mut Context<Self>) -> Self::Result {
        Box::pin(self.call(&msg.provider, "stop", actor::Terminate(msg.sandbox)))
    }
}

impl Handler<KillSandbox> for ProviderRouter {
    type Result = ResponseFuture<Result<(), ProviderError>>;
    fn handle(&mut self, msg: KillSandbox, _: &mut Context<Self>) -> Self::Result {
        if let Some(slot) = self.slots.get_mut(&msg.provider) {
            slot.active.remove(&msg.run_id);
        }
        Box::pin(self.call(&msg.provider, "kill", actor::Kill(msg.sandbox)))
    }
}

impl Handler<SandboxLogs> for ProviderRouter {
    type Result = ResponseFuture<Result<LogStream, ProviderError>>;
    fn handle(&mut self, msg: SandboxLogs, _: &mut Context<Self>) -> Self::Result {
        Box::pin(self.call(
            &msg.provider,
            "logs",
            actor::Logs {
                sandbox: msg.sandbox,
                follow: msg.follow,
            },
        ))
    }
}

impl Handler<SandboxUsage> for ProviderRouter {
    type Result = ResponseFuture<Result<Option<crate::model::Usage>, ProviderError>>;
    fn handle(&mut self, msg: SandboxUsage, _: &mut Context<Self>) -> Self::Result {
        Box::pin(self.call(&msg.provider, "usage", actor::ReadUsage(msg.sandbox)))
    }
}

impl Handler<ListSandboxes> for ProviderRouter {
    type Result = ResponseFuture<Result<Vec<SandboxInfo>, ProviderError>>;
    fn handle(&mut self, msg: ListSandboxes, _: &mut Context<Self>) -> Self::Result {
        Box::pin(self.call(&msg.provider, "list", actor::List(msg.labels)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = SupervisorSettings {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            health_interval: Duration::from_secs(1),
        };
        assert_eq!(backoff_delay(s, 1), Duration::from_millis(100));
        assert_eq!(backoff_delay(s, 2), Duration::from_millis(200));
        assert_eq!(backoff_delay(s, 3), Duration::from_millis(400));
        assert_eq!(backoff_delay(s, 9), Duration::from_millis(500));
    }

    #[test]
    fn cost_uses_minimum_billed_minutes() {
        let rates = CostRates {
            per_cpu_hour: Some(1.0),
            per_gb_hour: Some(0.5),
            per_gpu_hour: None,
            per_run: Some(0.01),
            minimum_billed_minutes: Some(60),
        };
        let res = Resources {
            memory_mb: Some(2048),
            cpu: Some(2.0),
            gpu_count: None,
        };
        let cost = rates.estimate(&res, 10.0).unwrap();
        assert!((cost - (0.01 + 2.0 + 1.0)).abs() < 1e-9, "{cost}");
        assert_eq!(CostRates::default().estimate(&res, 10.0), None);
    }
}
