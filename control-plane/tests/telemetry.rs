//! One run, one trace: an OTLP receiver in-process (the collector's gRPC trace and metrics
//! services), the control plane exporting to it, a real run with tool calls, the spans checked as
//! a tree (the shim's own spans included) and the metrics checked by name, over OTLP and on
//! `/metrics`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use actors::model::RunState;
use codebolt::telemetry::{self, TelemetrySettings};
use common::otlp::{attr, Receiver};
use common::{TestServer, Workspace};
use opentelemetry_proto::tonic::trace::v1::Span;

const AGENT: &str = r#"
read task
printf '%s\n' '{"type":"tool_call","id":"c1","tool":"fs.list_dir","args":{"path":"."}}'
read r1
printf '%s\n' '{"type":"tool_call","id":"c2","tool":"fs.read_file","args":{"path":"README.md"}}'
read r2
printf '%s\n' '{"type":"done","result":"ok"}'
"#;

#[actix_rt::test]
async fn a_run_is_one_trace_with_the_named_spans() {
    let (receiver, addr) = Receiver::start().await;

    let env: HashMap<String, String> = [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_string()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
        ("OTEL_SERVICE_NAME", "codebolt-test".to_string()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "500".to_string()),
        ("RUST_LOG", "info".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let settings = TelemetrySettings::from_env(&env, "info").unwrap();
    let telemetry = telemetry::init(&settings).expect("telemetry installed");
    assert!(telemetry.exporting());

    let server = TestServer::start(Workspace::new().agent("traced", AGENT)).await;
    let run = server.start_run("traced", "trace me").await;
    let done = server.wait_terminal(run.id, Duration::from_secs(30)).await;
    assert_eq!(done.state, RunState::Succeeded, "{:?}", done.failure);
    // Every event names the run's trace.
    let history = server
        .http
        .get(server.url(&format!("/v1/runs/{}/events", run.id)))
        .send()
        .await
        .expect("events")
        .text()
        .await
        .expect("events text");
    let data: Vec<serde_json::Value> = common::parse_sse(&history);
    assert!(!data.is_empty(), "no events: {history}");
    for event in &data {
        assert_eq!(
            event["trace_id"],
            serde_json::json!(done.trace_id),
            "{event}"
        );
    }
    // The same metrics in Prometheus text, names as an OTLP-to-Prometheus translation makes them.
    let text = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    for expected in [
        "codebolt_tool_call_duration_seconds_bucket{gen_ai_tool_name=\"fs.read_file\",le=\"+Inf\"} 1",
        "codebolt_tool_call_duration_seconds_count{gen_ai_tool_name=\"fs.list_dir\"} 1",
        "codebolt_runs_created_total{codebolt_provider=\"local\"} 1",
        "codebolt_runs_finished_total{codebolt_provider=\"local\",codebolt_run_state=\"succeeded\"} 1",
        "# TYPE codebolt_sandbox_spawn_duration_seconds histogram",
        "# TYPE codebolt_sandbox_connect_duration_seconds histogram",
        "codebolt_queue_depth{codebolt_queue=\"run_mailbox\"}",
        "# TYPE codebolt_connections_active gauge",
        "codebolt_provider_healthy{codebolt_provider=\"local\",codebolt_provider_kind=\"local\"} 1",
    ] {
        assert!(text.contains(expected), "no '{expected}' in /metrics:\n{text}");
    }
    server.stop().await;
    // The run actor has stopped, closing the root span; flush what is buffered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();

    check_exported_metrics(&receiver);

    let spans = receiver.spans();
    let trace_id = hex::decode(&done.trace_id).expect("hex trace id");
    let run_spans: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace_id).collect();
    let names: Vec<&str> = run_spans.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "codebolt.run",
        "provider.route",
        "bundle.build",
        "sandbox.create",
        "process.start",
        "sandbox.wait_callback",
        "shim.connect",
        "tool.call",
        "sandbox.cleanup",
        // The shim's own, sent through the control plane.
        "shim.bundle.fetch",
        "shim.agent.start",
        "shim.tool_call",
    ] {
        assert!(names.contains(&expected), "no {expected} span in {names:?}");
    }
    let shim_calls: Vec<Option<String>> = run_spans
        .iter()
        .filter(|s| s.name == "shim.tool_call")
        .map(|s| attr(s, "gen_ai.tool.name"))
        .collect();
    assert_eq!(
        shim_calls.len(),
        2,
        "one shim span per relayed call: {shim_calls:?}"
    );
    assert!(shim_calls.contains(&Some("fs.list_dir".into())));
    assert!(run_spans
        .iter()
        .filter(
            |s| ["shim.bundle.fetch", "shim.agent.start", "shim.tool_call"]
                .contains(&s.name.as_str())
        )
        .all(
            |s| attr(s, "codebolt.source").as_deref() == Some("agent-shim")
                && s.end_time_unix_nano >= s.start_time_unix_nano
        ));
    // One root; every other span's parent is in the same trace.
    let roots: Vec<&&Span> = run_spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "{names:?}");
    assert_eq!(roots[0].name, "codebolt.run");
    assert_eq!(attr(roots[0], "run.state").as_deref(), Some("succeeded"));
    let ids: Vec<&Vec<u8>> = run_spans.iter().map(|s| &s.span_id).collect();
    for span in &run_spans {
        if !span.parent_span_id.is_empty() {
            assert!(
                ids.contains(&&span.parent_span_id),
                "{} has a parent outside the trace",
                span.name
            );
        }
    }
    let tools: Vec<(Option<String>, Option<String>)> = run_spans
        .iter()
        .filter(|s| s.name == "tool.call")
        .map(|s| (attr(s, "tool.name"), attr(s, "outcome")))
        .collect();
    assert_eq!(tools.len(), 2, "{tools:?}");
    assert!(
        tools.contains(&(Some("fs.read_file".into()), Some("ok".into()))),
        "{tools:?}"
    );
    assert!(run_spans
        .iter()
        .filter(|s| s.name == "tool.call")
        .all(|s| attr(s, "tool.result_bytes").is_some()));
}

/// Metrics exported over OTLP: every instrument a successful local run touches, with its unit and
/// attributes, names taken from the catalog the control plane builds its instruments from.
fn check_exported_metrics(receiver: &Receiver) {
    use actors::metrics as m;
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    let metrics = receiver.metrics();
    let names: std::collections::BTreeSet<&str> =
        metrics.iter().map(|metric| metric.name.as_str()).collect();
    // Redis round trips, provider errors and restarts, and live replicas need a store, a failure
    // or a cluster; everything else shows up after one run.
    let not_here = [
        m::STORE_DURATION.name,
        m::PROVIDER_ERRORS.name,
        m::PROVIDER_RESTARTS.name,
        m::REPLICAS_LIVE.name,
    ];
    for def in m::CATALOG.iter().filter(|d| !not_here.contains(&d.name)) {
        assert!(
            names.contains(def.name),
            "{} not exported; got {names:?}",
            def.name
        );
    }
    let tool_calls = metrics
        .iter()
        .rfind(|metric| metric.name == m::TOOL_CALL_DURATION.name)
        .expect("tool-call histogram");
    assert_eq!(tool_calls.unit, "s");
    let Some(Data::Histogram(histogram)) = &tool_calls.data else {
        panic!("tool-call duration is not a histogram: {tool_calls:?}");
    };
    let tools: std::collections::BTreeSet<String> = histogram
        .data_points
        .iter()
        .filter_map(|point| {
            point
                .attributes
                .iter()
                .find(|kv| kv.key == m::attr::TOOL_NAME)
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
        })
        .collect();
    assert_eq!(tools.len(), 2, "{tools:?}");
    let total: u64 = histogram.data_points.iter().map(|p| p.count).sum();
    assert_eq!(total, 2, "two tool calls measured");
}
