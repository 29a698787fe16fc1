//! The control plane's metrics: one catalog of what is measured (names, kinds, units, what each
//! means), the instruments built from it, and the names those become in Prometheus text.
//!
//! Instruments record through the OpenTelemetry metrics API; the host (the `codebolt` server)
//! decides where they go (OTLP, `/metrics`). Names are OpenTelemetry style (dotted, unit apart);
//! [`MetricDef::prometheus_name`] gives the name an OTLP-to-Prometheus translation (the
//! collector's, or `/metrics`) produces, which is what dashboards query.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, MeterProvider, UpDownCounter};
use opentelemetry::KeyValue;

/// What kind of instrument a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (`_total` in Prometheus).
    Counter,
    /// Goes up and down (a gauge in Prometheus).
    UpDownCounter,
    /// A value read or set as is.
    Gauge,
    /// A distribution (`_bucket`, `_sum`, `_count` in Prometheus).
    Histogram,
}

/// One metric of the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: MetricKind,
    /// UCUM unit as OpenTelemetry writes it (`s`, `By`, `{run}`).
    pub unit: &'static str,
    pub description: &'static str,
}

impl MetricDef {
    /// The metric's name in Prometheus text: dots become underscores, the unit is appended as a
    /// word (annotations in braces are dropped), counters end in `_total`.
    pub fn prometheus_name(&self) -> String {
        let mut name: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        if let Some(unit) = prometheus_unit(self.unit) {
            if !name.ends_with(&format!("_{unit}")) {
                name.push('_');
                name.push_str(unit);
            }
        }
        if self.kind == MetricKind::Counter {
            name.push_str("_total");
        }
        name
    }

    /// Every series name the metric shows up as in Prometheus text.
    pub fn prometheus_series(&self) -> Vec<String> {
        let base = self.prometheus_name();
        match self.kind {
            MetricKind::Histogram => vec![
                format!("{base}_bucket"),
                format!("{base}_sum"),
                format!("{base}_count"),
            ],
            _ => vec![base],
        }
    }
}

/// The word Prometheus names carry for an OpenTelemetry unit; `None` for dimensionless units
/// and annotations such as `{run}`.
pub fn prometheus_unit(unit: &str) -> Option<&'static str> {
    match unit {
        "s" => Some("seconds"),
        "ms" => Some("milliseconds"),
        "By" => Some("bytes"),
        _ => None,
    }
}

/// The name an OpenTelemetry attribute key gets as a Prometheus label.
pub fn prometheus_label(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Attribute keys, following the OpenTelemetry semantic conventions where one exists.
pub mod attr {
    /// The provider (by configured name) a run or sandbox belongs to.
    pub const PROVIDER: &str = "codebolt.provider";
    /// The provider's kind (`local`, `docker`, …).
    pub const PROVIDER_KIND: &str = "codebolt.provider.kind";
    /// A run's lifecycle state (SPEC §5).
    pub const RUN_STATE: &str = "codebolt.run.state";
    /// Semantic conventions: the class of error an operation ended with.
    pub const ERROR_TYPE: &str = "error.type";
    /// Semantic conventions (GenAI): the tool an agent called.
    pub const TOOL_NAME: &str = "gen_ai.tool.name";
    /// Semantic conventions (database): the database system.
    pub const DB_SYSTEM: &str = "db.system.name";
    /// Semantic conventions (database): the operation (command or script) run.
    pub const DB_OPERATION: &str = "db.operation.name";
    /// Which queue a depth is measured on.
    pub const QUEUE: &str = "codebolt.queue";
    /// What the reconciler did.
    pub const RECONCILER_ACTION: &str = "codebolt.reconciler.action";
    /// A provider operation (`spawn`, `kill`, `logs`, …).
    pub const OPERATION: &str = "codebolt.provider.operation";
}

pub const RUNS_CREATED: MetricDef = MetricDef {
    name: "codebolt.runs.created",
    kind: MetricKind::Counter,
    unit: "{run}",
    description: "Runs created on this replica, by provider.",
};
pub const RUNS_FINISHED: MetricDef = MetricDef {
    name: "codebolt.runs.finished",
    kind: MetricKind::Counter,
    unit: "{run}",
    description: "Runs that reached a terminal state on this replica, by provider, state and (for failures) error.type.",
};
pub const RUNS_ACTIVE: MetricDef = MetricDef {
    name: "codebolt.runs.active",
    kind: MetricKind::UpDownCounter,
    unit: "{run}",
    description: "Runs this replica drives, by provider and state.",
};
pub const SPAWN_DURATION: MetricDef = MetricDef {
    name: "codebolt.sandbox.spawn.duration",
    kind: MetricKind::Histogram,
    unit: "s",
    description:
        "Time a provider took to create and start a run's sandbox, by provider and outcome.",
};
pub const CONNECT_DURATION: MetricDef = MetricDef {
    name: "codebolt.sandbox.connect.duration",
    kind: MetricKind::Histogram,
    unit: "s",
    description: "Time from a sandbox started to its shim's first hello, by provider.",
};
pub const TOOL_CALL_DURATION: MetricDef = MetricDef {
    name: "codebolt.tool_call.duration",
    kind: MetricKind::Histogram,
    unit: "s",
    description:
        "Time the control plane took to execute a tool call, by tool and (for failures) error.type.",
};
pub const CONNECTIONS_ACTIVE: MetricDef = MetricDef {
    name: "codebolt.connections.active",
    kind: MetricKind::UpDownCounter,
    unit: "{connection}",
    description: "Open shim WebSocket connections on this replica.",
};
pub const QUEUE_DEPTH: MetricDef = MetricDef {
    name: "codebolt.queue.depth",
    kind: MetricKind::Gauge,
    unit: "{message}",
    description: "Messages waiting in the fullest queue of each kind (run mailboxes, run store writers, connection outbound queues).",
};
pub const STORE_DURATION: MetricDef = MetricDef {
    name: "db.client.operation.duration",
    kind: MetricKind::Histogram,
    unit: "s",
    description: "Round-trip time of run store operations against Redis, by operation.",
};
pub const STORE_FENCED_WRITES: MetricDef = MetricDef {
    name: "codebolt.store.fenced_writes",
    kind: MetricKind::Counter,
    unit: "{write}",
    description: "Run writes the store refused because another replica holds a newer lease.",
};
pub const RECONCILER_ACTIONS: MetricDef = MetricDef {
    name: "codebolt.reconciler.actions",
    kind: MetricKind::Counter,
    unit: "{action}",
    description: "What the reconciler did: orphaned sandboxes removed, runs failed because their sandbox vanished.",
};
pub const PROVIDER_ERRORS: MetricDef = MetricDef {
    name: "codebolt.provider.errors",
    kind: MetricKind::Counter,
    unit: "{error}",
    description: "Provider operations that failed, by provider, operation and error.type.",
};
pub const PROVIDER_HEALTHY: MetricDef = MetricDef {
    name: "codebolt.provider.healthy",
    kind: MetricKind::Gauge,
    // No unit: a `1` gauge gets a `_ratio` suffix in Prometheus, which this is not.
    unit: "",
    description: "Whether a provider is healthy (1) or not (0).",
};
pub const PROVIDER_RESTARTS: MetricDef = MetricDef {
    name: "codebolt.provider.restarts",
    kind: MetricKind::Counter,
    unit: "{restart}",
    description: "Restarts of a provider actor after it stopped.",
};
pub const REPLICAS_LIVE: MetricDef = MetricDef {
    name: "codebolt.replicas.live",
    kind: MetricKind::Gauge,
    unit: "{replica}",
    description: "Replicas with a current heartbeat in the store, as this replica last saw them.",
};
pub const RUNS_ADOPTED: MetricDef = MetricDef {
    name: "codebolt.runs.adopted",
    kind: MetricKind::Counter,
    unit: "{run}",
    description: "Runs this replica adopted from replicas whose heartbeat lapsed.",
};
pub const RUNS_RELEASED: MetricDef = MetricDef {
    name: "codebolt.runs.released",
    kind: MetricKind::Counter,
    unit: "{run}",
    description: "Runs this replica gave up because another replica took them over.",
};
pub const COMMANDS_ROUTED: MetricDef = MetricDef {
    name: "codebolt.commands.routed",
    kind: MetricKind::Counter,
    unit: "{command}",
    description: "Stop and kill commands from other replicas delivered to this replica's runs.",
};
pub const HEARTBEAT_FAILURES: MetricDef = MetricDef {
    name: "codebolt.heartbeat.failures",
    kind: MetricKind::Counter,
    unit: "{heartbeat}",
    description: "Replica heartbeats the store did not take.",
};

/// Every metric the control plane exports.
pub const CATALOG: &[MetricDef] = &[
    RUNS_CREATED,
    RUNS_FINISHED,
    RUNS_ACTIVE,
    SPAWN_DURATION,
    CONNECT_DURATION,
    TOOL_CALL_DURATION,
    CONNECTIONS_ACTIVE,
    QUEUE_DEPTH,
    STORE_DURATION,
    STORE_FENCED_WRITES,
    RECONCILER_ACTIONS,
    PROVIDER_ERRORS,
    PROVIDER_HEALTHY,
    PROVIDER_RESTARTS,
    REPLICAS_LIVE,
    RUNS_ADOPTED,
    RUNS_RELEASED,
    COMMANDS_ROUTED,
    HEARTBEAT_FAILURES,
];

/// Bucket bounds (seconds) for durations from sub-millisecond tool calls to minute-long pulls.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

/// Kinds of queue whose depth is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    /// Shim frames handed to a run actor and not yet handled.
    RunMailbox,
    /// Writes a run actor queued for its store writer.
    RunWriter,
    /// Frames waiting to be written to a shim's WebSocket.
    ConnectionOutbound,
}

impl QueueKind {
    pub const ALL: [QueueKind; 3] = [
        QueueKind::RunMailbox,
        QueueKind::RunWriter,
        QueueKind::ConnectionOutbound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            QueueKind::RunMailbox => "run_mailbox",
            QueueKind::RunWriter => "run_writer",
            QueueKind::ConnectionOutbound => "connection_outbound",
        }
    }
}

/// Reads the depth of one queue; `None` once the queue is gone.
pub type DepthProbe = Box<dyn Fn() -> Option<usize> + Send + Sync>;

/// The queues of one kind, so the deepest can be reported.
#[derive(Default)]
pub struct QueueWatch {
    probes: Mutex<Vec<DepthProbe>>,
}

impl QueueWatch {
    /// Watches a queue until its probe answers `None`.
    pub fn watch(&self, probe: DepthProbe) {
        self.probes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(probe);
    }

    /// A counter of messages in flight, watched until the returned handle is dropped.
    pub fn counter(&self) -> QueueCounter {
        let counter = QueueCounter(Arc::new(AtomicI64::new(0)));
        let weak: Weak<AtomicI64> = Arc::downgrade(&counter.0);
        self.watch(Box::new(move || {
            weak.upgrade()
                .map(|c| usize::try_from(c.load(Ordering::Relaxed)).unwrap_or(0))
        }));
        counter
    }

    /// Watches a tokio channel through a weak sender (the watch keeps no queue open).
    pub fn channel<T: Send + 'static>(&self, sender: &tokio::sync::mpsc::Sender<T>) {
        let weak = sender.downgrade();
        self.watch(Box::new(move || {
            weak.upgrade()
                .map(|s| s.max_capacity().saturating_sub(s.capacity()))
        }));
    }

    /// The depth of the fullest live queue (0 with none); forgets queues that are gone.
    pub fn deepest(&self) -> usize {
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        let mut deepest = 0;
        probes.retain(|probe| match probe() {
            Some(depth) => {
                deepest = deepest.max(depth);
                true
            }
            None => false,
        });
        deepest
    }
}

/// Messages a queue holds, counted by who sends into it and who takes out of it.
#[derive(Clone)]
pub struct QueueCounter(Arc<AtomicI64>);

impl QueueCounter {
    /// Counts one message in, until the returned guard is dropped (when it was handled).
    pub fn enter(&self) -> QueuedMessage {
        self.0.fetch_add(1, Ordering::Relaxed);
        QueuedMessage(self.0.clone())
    }
}

/// One message counted in a queue; leaves it when dropped.
pub struct QueuedMessage(Arc<AtomicI64>);

impl Drop for QueuedMessage {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for QueuedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueuedMessage")
    }
}

/// The instruments of one replica. Cheap to share (`Arc`); a no-op set when nothing reads them.
pub struct Metrics {
    meter: Meter,
    pub runs_created: Counter<u64>,
    pub runs_finished: Counter<u64>,
    pub runs_active: UpDownCounter<i64>,
    pub spawn_duration: Histogram<f64>,
    pub connect_duration: Histogram<f64>,
    pub tool_call_duration: Histogram<f64>,
    pub connections_active: UpDownCounter<i64>,
    pub store_duration: Histogram<f64>,
    pub reconciler_actions: Counter<u64>,
    pub provider_errors: Counter<u64>,
    pub provider_healthy: Gauge<u64>,
    pub provider_restarts: Counter<u64>,
    pub replicas_live: Gauge<u64>,
    queues: Arc<[QueueWatch; 3]>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn histogram(meter: &Meter, def: MetricDef) -> Histogram<f64> {
    meter
        .f64_histogram(def.name)
        .with_unit(def.unit)
        .with_description(def.description)
        .with_boundaries(SECONDS_BUCKETS.to_vec())
        .build()
}

fn counter(meter: &Meter, def: MetricDef) -> Counter<u64> {
    meter
        .u64_counter(def.name)
        .with_unit(def.unit)
        .with_description(def.description)
        .build()
}

fn up_down(meter: &Meter, def: MetricDef) -> UpDownCounter<i64> {
    meter
        .i64_up_down_counter(def.name)
        .with_unit(def.unit)
        .with_description(def.description)
        .build()
}

fn gauge(meter: &Meter, def: MetricDef) -> Gauge<u64> {
    meter
        .u64_gauge(def.name)
        .with_unit(def.unit)
        .with_description(def.description)
        .build()
}

impl Metrics {
    /// Instruments on `meter`, plus the observed queue depths.
    pub fn new(meter: Meter) -> Metrics {
        let queues: Arc<[QueueWatch; 3]> = Arc::new(Default::default());
        let observed = queues.clone();
        meter
            .u64_observable_gauge(QUEUE_DEPTH.name)
            .with_unit(QUEUE_DEPTH.unit)
            .with_description(QUEUE_DEPTH.description)
            .with_callback(move |gauge| {
                for kind in QueueKind::ALL {
                    gauge.observe(
                        observed[kind as usize].deepest() as u64,
                        &[KeyValue::new(attr::QUEUE, kind.as_str())],
                    );
                }
            })
            .build();
        Metrics {
            runs_created: counter(&meter, RUNS_CREATED),
            runs_finished: counter(&meter, RUNS_FINISHED),
            runs_active: up_down(&meter, RUNS_ACTIVE),
            spawn_duration: histogram(&meter, SPAWN_DURATION),
            connect_duration: histogram(&meter, CONNECT_DURATION),
            tool_call_duration: histogram(&meter, TOOL_CALL_DURATION),
            connections_active: up_down(&meter, CONNECTIONS_ACTIVE),
            store_duration: histogram(&meter, STORE_DURATION),
            reconciler_actions: counter(&meter, RECONCILER_ACTIONS),
            provider_errors: counter(&meter, PROVIDER_ERRORS),
            provider_healthy: gauge(&meter, PROVIDER_HEALTHY),
            provider_restarts: counter(&meter, PROVIDER_RESTARTS),
            replicas_live: gauge(&meter, REPLICAS_LIVE),
            queues,
            meter,
        }
    }

    /// Instruments that record nothing (for hosts without a metrics pipeline).
    pub fn noop() -> Arc<Metrics> {
        Arc::new(Metrics::new(
            opentelemetry::metrics::NoopMeterProvider::new().meter("codebolt"),
        ))
    }

    /// The meter the instruments come from (for observed instruments the host adds).
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// The watched queues of one kind.
    pub fn queue(&self, kind: QueueKind) -> &QueueWatch {
        &self.queues[kind as usize]
    }

    /// Records a duration in seconds.
    pub fn record(histogram: &Histogram<f64>, took: Duration, attributes: &[KeyValue]) {
        histogram.record(took.as_secs_f64(), attributes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_names_follow_the_otlp_translation() {
        assert_eq!(
            TOOL_CALL_DURATION.prometheus_name(),
            "codebolt_tool_call_duration_seconds"
        );
        assert_eq!(
            STORE_DURATION.prometheus_series(),
            [
                "db_client_operation_duration_seconds_bucket",
                "db_client_operation_duration_seconds_sum",
                "db_client_operation_duration_seconds_count"
            ]
        );
        assert_eq!(
            RUNS_CREATED.prometheus_name(),
            "codebolt_runs_created_total"
        );
        assert_eq!(RUNS_ACTIVE.prometheus_name(), "codebolt_runs_active");
        assert_eq!(
            PROVIDER_HEALTHY.prometheus_name(),
            "codebolt_provider_healthy"
        );
        assert_eq!(prometheus_label(attr::TOOL_NAME), "gen_ai_tool_name");
    }

    #[test]
    fn catalog_names_are_unique() {
        let mut names: Vec<_> = CATALOG.iter().map(|m| m.prometheus_name()).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }

    #[test]
    fn the_deepest_live_queue_is_reported_and_gone_queues_forgotten() {
        let watch = QueueWatch::default();
        let a = watch.counter();
        let b = watch.counter();
        let _one = a.enter();
        let two = [b.enter(), b.enter(), b.enter()];
        assert_eq!(watch.deepest(), 3);
        drop(two);
        assert_eq!(watch.deepest(), 1);
        drop(b);
        drop(a);
        assert_eq!(watch.deepest(), 1, "a guard keeps its counter alive");
        drop(_one);
        assert_eq!(watch.deepest(), 0);
        assert!(watch.probes.lock().unwrap().is_empty());

        let (tx, _rx) = tokio::sync::mpsc::channel::<u8>(8);
        watch.channel(&tx);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(watch.deepest(), 2);
        drop(tx);
        assert_eq!(watch.deepest(), 0);
        assert!(watch.probes.lock().unwrap().is_empty());
    }
}
