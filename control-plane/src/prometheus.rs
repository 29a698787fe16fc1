//! `/metrics`: the replica's OpenTelemetry metrics read on demand and written in the Prometheus
//! text format, with the same names an OTLP-to-Prometheus translation produces (see
//! `actors::metrics::MetricDef::prometheus_name`), so dashboards work on either path.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use actors::metrics::{prometheus_label, prometheus_unit};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, Temporality};

/// Appends one formatted line to a `String` (which cannot fail, unlike `writeln!`).
macro_rules! emit {
    ($out:expr, $($arg:tt)*) => {{
        $out.push_str(&format!($($arg)*));
        $out.push('\n');
    }};
}

/// A reader the meter provider owns and `/metrics` shares: collects cumulative values on demand.
#[derive(Debug, Clone)]
pub struct PrometheusReader {
    inner: Arc<ManualReader>,
}

impl Default for PrometheusReader {
    fn default() -> Self {
        PrometheusReader {
            inner: Arc::new(
                ManualReader::builder()
                    .with_temporality(Temporality::Cumulative)
                    .build(),
            ),
        }
    }
}

impl MetricReader for PrometheusReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.inner.register_pipeline(pipeline)
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.inner.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.inner.temporality(kind)
    }
}

impl PrometheusReader {
    /// Collects every instrument (running observed instruments' callbacks) and renders the text.
    pub fn render(&self) -> Result<String, String> {
        let mut rm = ResourceMetrics::default();
        self.inner.collect(&mut rm).map_err(|err| err.to_string())?;
        let mut out = String::new();
        for scope in rm.scope_metrics() {
            for metric in scope.metrics() {
                render_metric(metric, &mut out);
            }
        }
        Ok(out)
    }
}

fn base_name(metric: &Metric) -> String {
    let mut name = prometheus_label(metric.name());
    if let Some(unit) = prometheus_unit(metric.unit()) {
        if !name.ends_with(&format!("_{unit}")) {
            name.push('_');
            name.push_str(unit);
        }
    }
    name
}

fn escape_value(raw: &str) -> String {
    raw.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels<'a>(
    attributes: impl Iterator<Item = &'a KeyValue>,
    extra: Option<(&str, String)>,
) -> String {
    let mut pairs: BTreeMap<String, String> = attributes
        .map(|kv| {
            let value = match &kv.value {
                Value::String(s) => s.as_str().to_string(),
                other => other.to_string(),
            };
            (prometheus_label(kv.key.as_str()), value)
        })
        .collect();
    if let Some((k, v)) = extra {
        pairs.insert(k.to_string(), v);
    }
    if pairs.is_empty() {
        return String::new();
    }
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_value(v)))
        .collect();
    format!("{{{}}}", body.join(","))
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    emit!(out, "# HELP {name} {help}");
    emit!(out, "# TYPE {name} {kind}");
}

trait Number: Copy {
    fn text(self) -> String;
}
impl Number for u64 {
    fn text(self) -> String {
        self.to_string()
    }
}
impl Number for i64 {
    fn text(self) -> String {
        self.to_string()
    }
}
impl Number for f64 {
    fn text(self) -> String {
        if self.is_infinite() {
            if self > 0.0 { "+Inf" } else { "-Inf" }.to_string()
        } else {
            self.to_string()
        }
    }
}

fn render_data<T: Number>(metric: &Metric, data: &MetricData<T>, out: &mut String) {
    let base = base_name(metric);
    match data {
        MetricData::Gauge(gauge) => {
            header(out, &base, "gauge", metric.description());
            for point in gauge.data_points() {
                emit!(
                    out,
                    "{base}{} {}",
                    labels(point.attributes(), None),
                    point.value().text()
                );
            }
        }
        MetricData::Sum(sum) => {
            let (name, kind) = if sum.is_monotonic() {
                (format!("{base}_total"), "counter")
            } else {
                (base, "gauge")
            };
            header(out, &name, kind, metric.description());
            for point in sum.data_points() {
                emit!(
                    out,
                    "{name}{} {}",
                    labels(point.attributes(), None),
                    point.value().text()
                );
            }
        }
        MetricData::Histogram(histogram) => {
            header(out, &base, "histogram", metric.description());
            for point in histogram.data_points() {
                let mut cumulative = 0u64;
                let bounds: Vec<f64> = point.bounds().collect();
                for (i, count) in point.bucket_counts().enumerate() {
                    cumulative += count;
                    let le = bounds.get(i).map_or("+Inf".to_string(), |b| b.text());
                    emit!(
                        out,
                        "{base}_bucket{} {cumulative}",
                        labels(point.attributes(), Some(("le", le)))
                    );
                }
                let plain = labels(point.attributes(), None);
                emit!(out, "{base}_sum{plain} {}", point.sum().text());
                emit!(out, "{base}_count{plain} {}", point.count());
            }
        }
        // Not used by the control plane's instruments.
        MetricData::ExponentialHistogram(_) => {}
    }
}

fn render_metric(metric: &Metric, out: &mut String) {
    match metric.data() {
        AggregatedMetrics::F64(data) => render_data(metric, data, out),
        AggregatedMetrics::U64(data) => render_data(metric, data, out),
        AggregatedMetrics::I64(data) => render_data(metric, data, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::SdkMeterProvider;

    #[test]
    fn counters_gauges_and_histograms_render_in_prometheus_text() {
        let reader = PrometheusReader::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader.clone())
            .build();
        let meter = provider.meter("test");
        let counter = meter
            .u64_counter("codebolt.runs.created")
            .with_unit("{run}")
            .build();
        counter.add(2, &[KeyValue::new("codebolt.provider", "local")]);
        counter.add(1, &[KeyValue::new("codebolt.provider", "dock\"er")]);
        let active = meter.i64_up_down_counter("codebolt.runs.active").build();
        active.add(3, &[]);
        active.add(-1, &[]);
        let histogram = meter
            .f64_histogram("codebolt.tool_call.duration")
            .with_unit("s")
            .with_boundaries(vec![0.01, 0.1])
            .build();
        for v in [0.005, 0.05, 0.5] {
            histogram.record(v, &[KeyValue::new("gen_ai.tool.name", "fs.read_file")]);
        }
        let text = reader.render().unwrap();
        assert!(
            text.contains("# TYPE codebolt_runs_created_total counter"),
            "{text}"
        );
        assert!(
            text.contains("codebolt_runs_created_total{codebolt_provider=\"local\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("codebolt_provider=\"dock\\\"er\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE codebolt_runs_active gauge\n"),
            "{text}"
        );
        assert!(text.contains("codebolt_runs_active 2\n"), "{text}");
        let tool = "gen_ai_tool_name=\"fs.read_file\"";
        for line in [
            format!("codebolt_tool_call_duration_seconds_bucket{{{tool},le=\"0.01\"}} 1"),
            format!("codebolt_tool_call_duration_seconds_bucket{{{tool},le=\"0.1\"}} 2"),
            format!("codebolt_tool_call_duration_seconds_bucket{{{tool},le=\"+Inf\"}} 3"),
            format!("codebolt_tool_call_duration_seconds_count{{{tool}}} 3"),
        ] {
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
    }
}
