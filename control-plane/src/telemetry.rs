//! Logs, traces and metrics: a `tracing` subscriber writing text or JSON lines to stderr and, when
//! an OTLP endpoint is configured, exporting spans over OTLP (gRPC or HTTP/protobuf) through
//! `tracing-opentelemetry`; a meter provider read by `/metrics` and exported over OTLP likewise. Settings come from the standard `OTEL_*` variables, read from an
//! explicit environment map.

use std::collections::HashMap;
use std::time::Duration;

use std::sync::OnceLock;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::prometheus::PrometheusReader;

/// Service name when `OTEL_SERVICE_NAME` is not set.
pub const DEFAULT_SERVICE_NAME: &str = "codebolt-control-plane";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    #[error("{var}: {message}")]
    InvalidEnv { var: &'static str, message: String },
    #[error("OTLP exporter to {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("a global subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    /// One JSON object a line, with the current span's fields (run id, trace id).
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OtlpSettings {
    /// Where spans go (for HTTP, the full `/v1/traces` URL).
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub headers: HashMap<String, String>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// `RUST_LOG`-style filter.
    pub filter: String,
    pub service_name: String,
    pub resource_attributes: Vec<(String, String)>,
    /// None: spans are not exported (and nothing complains about a missing collector).
    pub otlp: Option<OtlpSettings>,
    /// None: metrics are not exported over OTLP (`/metrics` serves them either way).
    pub metrics_otlp: Option<OtlpSettings>,
    /// How often metrics are exported (`OTEL_METRIC_EXPORT_INTERVAL`, ms).
    pub metric_interval: Duration,
}

/// The variables and URL path of one OTLP signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
}

struct SignalVars {
    endpoint: &'static str,
    protocol: &'static str,
    headers: &'static str,
    timeout: &'static str,
    path: &'static str,
}

impl Signal {
    fn vars(self) -> SignalVars {
        match self {
            Signal::Traces => SignalVars {
                endpoint: "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                protocol: "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                headers: "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                timeout: "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                path: "/v1/traces",
            },
            Signal::Metrics => SignalVars {
                endpoint: "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                protocol: "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
                headers: "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
                timeout: "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
                path: "/v1/metrics",
            },
        }
    }
}

fn non_empty<'a>(env: &'a HashMap<String, String>, var: &str) -> Option<&'a str> {
    env.get(var).map(|v| v.trim()).filter(|v| !v.is_empty())
}

/// `k1=v1,k2=v2` as the OpenTelemetry variables write lists.
fn key_values(var: &'static str, raw: &str) -> Result<Vec<(String, String)>, TelemetryError> {
    raw.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| TelemetryError::InvalidEnv {
                    var,
                    message: format!("'{pair}' is not key=value"),
                })
        })
        .collect()
}

impl TelemetrySettings {
    /// Reads `CODEBOLT_LOG_FORMAT` (`text` or `json`), `RUST_LOG`, `OTEL_SERVICE_NAME`,
    /// `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]ENDPOINT`, `…_PROTOCOL`
    /// (`grpc`, `http/protobuf`), `…_HEADERS` and `…_TIMEOUT` (ms), `OTEL_METRIC_EXPORT_INTERVAL`
    /// (ms). `OTEL_SDK_DISABLED=true` turns export off, `OTEL_TRACES_EXPORTER=none` and
    /// `OTEL_METRICS_EXPORTER=none` one signal's.
    pub fn from_env(
        env: &HashMap<String, String>,
        default_filter: &str,
    ) -> Result<Self, TelemetryError> {
        let log_format = match non_empty(env, "CODEBOLT_LOG_FORMAT") {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(TelemetryError::InvalidEnv {
                    var: "CODEBOLT_LOG_FORMAT",
                    message: format!("'{other}' is not a log format (expected text or json)"),
                })
            }
        };
        let filter = non_empty(env, "RUST_LOG")
            .unwrap_or(default_filter)
            .to_string();
        let service_name = non_empty(env, "OTEL_SERVICE_NAME")
            .unwrap_or(DEFAULT_SERVICE_NAME)
            .to_string();
        let resource_attributes = match non_empty(env, "OTEL_RESOURCE_ATTRIBUTES") {
            Some(raw) => key_values("OTEL_RESOURCE_ATTRIBUTES", raw)?,
            None => Vec::new(),
        };
        let sdk_disabled = non_empty(env, "OTEL_SDK_DISABLED") == Some("true");
        let otlp = if sdk_disabled || non_empty(env, "OTEL_TRACES_EXPORTER") == Some("none") {
            None
        } else {
            otlp_settings(env, Signal::Traces)?
        };
        let metrics_otlp =
            if sdk_disabled || non_empty(env, "OTEL_METRICS_EXPORTER") == Some("none") {
                None
            } else {
                otlp_settings(env, Signal::Metrics)?
            };
        let interval_var = "OTEL_METRIC_EXPORT_INTERVAL";
        let metric_interval = match non_empty(env, interval_var) {
            None => Duration::from_secs(60),
            Some(raw) => match raw.parse::<u64>() {
                Ok(ms) if ms > 0 => Duration::from_millis(ms),
                _ => {
                    return Err(TelemetryError::InvalidEnv {
                        var: interval_var,
                        message: format!("'{raw}' is not a positive number of milliseconds"),
                    })
                }
            },
        };
        Ok(TelemetrySettings {
            log_format,
            filter,
            service_name,
            resource_attributes,
            otlp,
            metrics_otlp,
            metric_interval,
        })
    }
}

fn otlp_settings(
    env: &HashMap<String, String>,
    signal: Signal,
) -> Result<Option<OtlpSettings>, TelemetryError> {
    let vars = signal.vars();
    let protocol_var = if non_empty(env, vars.protocol).is_some() {
        vars.protocol
    } else {
        "OTEL_EXPORTER_OTLP_PROTOCOL"
    };
    let protocol = match non_empty(env, protocol_var) {
        None | Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
        Some("grpc") => OtlpProtocol::Grpc,
        Some(other) => {
            return Err(TelemetryError::InvalidEnv {
                var: protocol_var,
                message: format!("'{other}' is not supported (expected grpc or http/protobuf)"),
            })
        }
    };
    // The signal-specific endpoint is used as is; the generic one gets the signal's path for HTTP.
    let endpoint = match (
        non_empty(env, vars.endpoint),
        non_empty(env, "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ) {
        (Some(specific), _) => specific.to_string(),
        (None, Some(base)) if protocol == OtlpProtocol::HttpProtobuf => {
            format!("{}{}", base.trim_end_matches('/'), vars.path)
        }
        (None, Some(base)) => base.to_string(),
        (None, None) => return Ok(None),
    };
    let mut headers = HashMap::new();
    for var in ["OTEL_EXPORTER_OTLP_HEADERS", vars.headers] {
        if let Some(raw) = non_empty(env, var) {
            headers.extend(key_values(var, raw)?);
        }
    }
    let timeout_var = if non_empty(env, vars.timeout).is_some() {
        vars.timeout
    } else {
        "OTEL_EXPORTER_OTLP_TIMEOUT"
    };
    let timeout = match non_empty(env, timeout_var) {
        None => Duration::from_secs(10),
        Some(raw) => {
            Duration::from_millis(raw.parse().map_err(|_| TelemetryError::InvalidEnv {
                var: timeout_var,
                message: format!("'{raw}' is not a number of milliseconds"),
            })?)
        }
    };
    Ok(Some(OtlpSettings {
        endpoint,
        protocol,
        headers,
        timeout,
    }))
}

/// Installed telemetry; `shutdown` flushes spans and metrics still buffered.
pub struct Telemetry {
    provider: SdkTracerProvider,
    metrics: MetricsPipeline,
    exporting: bool,
}

impl Telemetry {
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// The process's metrics (what `/metrics` serves and OTLP exports).
    pub fn metrics(&self) -> &MetricsPipeline {
        &self.metrics
    }

    /// Exports what is buffered and stops the exporters.
    pub fn shutdown(self) {
        if let Err(err) = self.provider.force_flush() {
            eprintln!("telemetry: flushing spans failed: {err}");
        }
        if let Err(err) = self.provider.shutdown() {
            eprintln!("telemetry: shutting the span exporter down failed: {err}");
        }
        self.metrics.shutdown();
    }
}

fn resource(settings: &TelemetrySettings) -> Resource {
    Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attributes(
            settings
                .resource_attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build()
}

fn exporter_error(
    otlp: &OtlpSettings,
) -> impl Fn(opentelemetry_otlp::ExporterBuildError) -> TelemetryError + '_ {
    |err| TelemetryError::Exporter {
        endpoint: otlp.endpoint.clone(),
        message: err.to_string(),
    }
}

/// `OTEL_EXPORTER_OTLP_HEADERS` as gRPC metadata.
fn grpc_metadata(otlp: &OtlpSettings) -> Result<tonic::metadata::MetadataMap, TelemetryError> {
    let mut metadata = tonic::metadata::MetadataMap::new();
    for (k, v) in &otlp.headers {
        let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).map_err(|_| {
            TelemetryError::InvalidEnv {
                var: "OTEL_EXPORTER_OTLP_HEADERS",
                message: format!("'{k}' is not a valid header name"),
            }
        })?;
        let value = v.parse().map_err(|_| TelemetryError::InvalidEnv {
            var: "OTEL_EXPORTER_OTLP_HEADERS",
            message: format!("the value of '{k}' is not a valid header value"),
        })?;
        metadata.insert(key, value);
    }
    Ok(metadata)
}

/// An OTLP exporter of one signal (`SpanExporter`, `MetricExporter`: their builders differ in
/// type only) for `otlp`'s protocol, endpoint, timeout and headers.
macro_rules! otlp_exporter {
    ($exporter:path, $otlp:expr) => {{
        let otlp: &OtlpSettings = $otlp;
        match otlp.protocol {
            OtlpProtocol::Grpc => <$exporter>::builder()
                .with_tonic()
                .with_endpoint(otlp.endpoint.clone())
                .with_timeout(otlp.timeout)
                .with_metadata(grpc_metadata(otlp)?)
                .build()
                .map_err(exporter_error(otlp))?,
            OtlpProtocol::HttpProtobuf => <$exporter>::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(otlp.endpoint.clone())
                .with_timeout(otlp.timeout)
                .with_headers(otlp.headers.clone())
                .build()
                .map_err(exporter_error(otlp))?,
        }
    }};
}

fn build_provider(settings: &TelemetrySettings) -> Result<SdkTracerProvider, TelemetryError> {
    let mut builder = SdkTracerProvider::builder().with_resource(resource(settings));
    if let Some(otlp) = &settings.otlp {
        let exporter = otlp_exporter!(opentelemetry_otlp::SpanExporter, otlp);
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// The metrics of a process: one meter provider read by `/metrics` on demand and, when
/// configured, exported over OTLP periodically.
#[derive(Debug, Clone)]
pub struct MetricsPipeline {
    provider: SdkMeterProvider,
    prometheus: PrometheusReader,
}

impl MetricsPipeline {
    /// Metrics for `/metrics` only (no OTLP export).
    pub fn local() -> MetricsPipeline {
        let prometheus = PrometheusReader::default();
        MetricsPipeline {
            provider: SdkMeterProvider::builder()
                .with_reader(prometheus.clone())
                .build(),
            prometheus,
        }
    }

    fn build(settings: &TelemetrySettings) -> Result<MetricsPipeline, TelemetryError> {
        let prometheus = PrometheusReader::default();
        let mut builder = SdkMeterProvider::builder()
            .with_resource(resource(settings))
            .with_reader(prometheus.clone());
        if let Some(otlp) = &settings.metrics_otlp {
            let exporter = otlp_exporter!(opentelemetry_otlp::MetricExporter, otlp);
            builder = builder.with_reader(
                PeriodicReader::builder(exporter)
                    .with_interval(settings.metric_interval)
                    .build(),
            );
        }
        Ok(MetricsPipeline {
            provider: builder.build(),
            prometheus,
        })
    }

    /// The control plane's meter.
    pub fn meter(&self) -> opentelemetry::metrics::Meter {
        self.provider.meter("codebolt")
    }

    /// Every instrument's current value in the Prometheus text format.
    pub fn render(&self) -> Result<String, String> {
        self.prometheus.render()
    }

    /// Exports what is pending and stops the exporter.
    pub fn shutdown(&self) {
        if let Err(err) = self.provider.force_flush() {
            eprintln!("telemetry: flushing metrics failed: {err}");
        }
        if let Err(err) = self.provider.shutdown() {
            eprintln!("telemetry: shutting the metric exporter down failed: {err}");
        }
    }
}

static INSTALLED_METRICS: OnceLock<MetricsPipeline> = OnceLock::new();

/// Exports the spans shims send (set by `init` when it exports spans over OTLP).
static SHIM_TRACER: OnceLock<opentelemetry_sdk::trace::SdkTracer> = OnceLock::new();

/// The span context a W3C `traceparent` names, as a remote parent; `None` if unreadable.
fn remote_parent(traceparent: &str) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    let mut parts = traceparent.split('-');
    let (_, trace, parent) = (parts.next(), parts.next(), parts.next());
    let trace_id = TraceId::from_hex(trace?).ok()?;
    let span_id = SpanId::from_hex(parent?).ok()?;
    let remote = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    Some(opentelemetry::Context::new().with_remote_span_context(remote))
}

/// What the run actors do with the spans shims send: export them when `init` set up span
/// export, and otherwise nothing (shims are then told to record none).
pub fn shim_span_export() -> Option<actors::run::ExportSpans> {
    SHIM_TRACER
        .get()
        .map(|_| export_shim_spans as actors::run::ExportSpans)
}

/// Exports the spans a run's shim finished (`actors::run::ExportSpans`) as children of the
/// `traceparent` its sandbox was given, so they join the run's trace. Shims send their spans to
/// the control plane rather than to a collector: a sandbox reaches only its callback URL, holds no
/// collector credentials, and cannot put spans into another run's trace.
pub fn export_shim_spans(traceparent: &str, spans: Vec<agent_shim::protocol::ShimSpan>) {
    use opentelemetry::trace::{Span as _, Status, Tracer as _};
    let Some(tracer) = SHIM_TRACER.get() else {
        return;
    };
    let Some(parent) = remote_parent(traceparent) else {
        tracing::debug!(traceparent, "unreadable traceparent; shim spans dropped");
        return;
    };
    let at = |nanos: u64| std::time::UNIX_EPOCH + Duration::from_nanos(nanos);
    for shim_span in spans {
        let mut attributes: Vec<KeyValue> = shim_span
            .attributes
            .into_iter()
            .map(|(k, v)| KeyValue::new(k, v))
            .collect();
        attributes.push(KeyValue::new("codebolt.source", "agent-shim"));
        let mut span = tracer
            .span_builder(shim_span.name)
            .with_start_time(at(shim_span.start_unix_nano))
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        if let Some(error) = shim_span.error {
            span.set_status(Status::error(error));
        }
        span.end_with_timestamp(at(shim_span.end_unix_nano.max(shim_span.start_unix_nano)));
    }
}

/// The metrics pipeline `init` installed for this process, if it did.
pub fn installed_metrics() -> Option<MetricsPipeline> {
    INSTALLED_METRICS.get().cloned()
}

/// Installs the global subscriber: log lines to stderr and, with OTLP settings, span export; and
/// the process's metrics pipeline. Spans always carry OpenTelemetry trace ids (so runs have one),
/// exported or not.
pub fn init(settings: &TelemetrySettings) -> Result<Telemetry, TelemetryError> {
    let provider = build_provider(settings)?;
    let metrics = MetricsPipeline::build(settings)?;
    let tracer = provider.tracer("codebolt");
    let shim_tracer = provider.tracer("agent-shim");
    let filter =
        EnvFilter::try_new(&settings.filter).map_err(|err| TelemetryError::InvalidEnv {
            var: "RUST_LOG",
            message: err.to_string(),
        })?;
    let fmt = match settings.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            // The run's root span (run id, trace id) is in the list on every line within a run.
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                // Seven attributes per span that a span's name already implies (source file,
                // line, module, target) or that say how the process ran it (thread, busy and
                // idle times, which also cost two clock reads per poll): every tool call
                // carried them, about half of its exported bytes.
                .with_location(false)
                .with_target(false)
                .with_threads(false)
                .with_tracked_inactivity(false),
        )
        .try_init()
        .map_err(|err| TelemetryError::AlreadyInstalled(err.to_string()))?;
    if settings.otlp.is_some() && SHIM_TRACER.set(shim_tracer).is_err() {
        return Err(TelemetryError::AlreadyInstalled(
            "a tracer for shim spans is already installed".into(),
        ));
    }
    if INSTALLED_METRICS.set(metrics.clone()).is_err() {
        return Err(TelemetryError::AlreadyInstalled(
            "a metrics pipeline is already installed".into(),
        ));
    }
    Ok(Telemetry {
        exporting: settings.otlp.is_some(),
        provider,
        metrics,
    })
}

/// Root span of a run adopted from another replica: a child of the run's trace, through the
/// W3C `traceparent` the run was given at creation, so the adopter's spans join the same trace.
pub fn adopted_run_span(record: &actors::model::RunRecord, traceparent: &str) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!(
        parent: None,
        "codebolt.run.adopted",
        run.id = %record.id,
        trace_id = %record.trace_id,
        run.agent = %record.agent,
        run.provider = %record.provider,
        run.state = tracing::field::Empty,
        run.failure = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    match remote_parent(traceparent) {
        Some(context) => {
            if let Err(err) = span.set_parent(context) {
                tracing::debug!(run_id = %record.id, error = %err, "adopted run's span not joined to its trace");
            }
        }
        None => {
            tracing::warn!(run_id = %record.id, traceparent, "unreadable traceparent; the adopted run starts a trace of its own")
        }
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_endpoint_means_no_export() {
        let s = TelemetrySettings::from_env(&env(&[]), "info").unwrap();
        assert_eq!(s.otlp, None);
        assert_eq!(s.service_name, DEFAULT_SERVICE_NAME);
        assert_eq!(s.log_format, LogFormat::Text);
    }

    #[test]
    fn the_generic_http_endpoint_gets_the_traces_path() {
        let s = TelemetrySettings::from_env(
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=abc, tenant = t1"),
                ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod"),
                ("OTEL_SERVICE_NAME", "cp-a"),
            ]),
            "info",
        )
        .unwrap();
        let otlp = s.otlp.unwrap();
        assert_eq!(otlp.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(otlp.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(otlp.headers.get("tenant").map(String::as_str), Some("t1"));
        assert_eq!(s.service_name, "cp-a");
        assert_eq!(
            s.resource_attributes,
            vec![("deployment.environment".into(), "prod".into())]
        );
    }

    #[test]
    fn grpc_and_signal_specific_endpoints_are_used_as_given() {
        let s = TelemetrySettings::from_env(
            &env(&[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ]),
            "info",
        )
        .unwrap();
        assert_eq!(s.otlp.unwrap().endpoint, "http://collector:4317");
        let s = TelemetrySettings::from_env(
            &env(&[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4318/custom"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
            ]),
            "info",
        )
        .unwrap();
        assert_eq!(s.otlp.unwrap().endpoint, "http://c:4318/custom");
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (pairs, var) in [
            (vec![("CODEBOLT_LOG_FORMAT", "xml")], "CODEBOLT_LOG_FORMAT"),
            (
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon"),
                ],
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (
                vec![("OTEL_RESOURCE_ATTRIBUTES", "novalue")],
                "OTEL_RESOURCE_ATTRIBUTES",
            ),
        ] {
            let err = TelemetrySettings::from_env(&env(&pairs), "info").unwrap_err();
            assert!(err.to_string().starts_with(var), "{err}");
        }
    }

    #[test]
    fn disabled_sdk_exports_nothing() {
        let s = TelemetrySettings::from_env(
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_SDK_DISABLED", "true"),
            ]),
            "info",
        )
        .unwrap();
        assert_eq!(s.otlp, None);
    }
}
