//! An OTLP/gRPC receiver on loopback: the collector's trace and metrics services, counting the
//! spans and metric data points it is sent and discarding them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::Metric;

#[derive(Default)]
struct Counters {
    spans: AtomicU64,
    span_requests: AtomicU64,
    points: AtomicU64,
    metric_requests: AtomicU64,
}

/// What arrived since the counters were last taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    pub spans: u64,
    /// Export calls of the trace service (batches).
    pub span_requests: u64,
    pub metric_points: u64,
    pub metric_requests: u64,
}

#[derive(Clone, Default)]
pub struct Receiver {
    counters: Arc<Counters>,
}

/// Data points of one metric, whatever its kind.
fn points(metric: &Metric) -> usize {
    match &metric.data {
        Some(Data::Gauge(g)) => g.data_points.len(),
        Some(Data::Sum(s)) => s.data_points.len(),
        Some(Data::Histogram(h)) => h.data_points.len(),
        Some(Data::ExponentialHistogram(e)) => e.data_points.len(),
        Some(Data::Summary(s)) => s.data_points.len(),
        None => 0,
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.counters
            .spans
            .fetch_add(spans as u64, Ordering::Relaxed);
        self.counters.span_requests.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let n: usize = request
            .get_ref()
            .resource_metrics
            .iter()
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .map(points)
            .sum();
        self.counters.points.fetch_add(n as u64, Ordering::Relaxed);
        self.counters
            .metric_requests
            .fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Serves on a free loopback port, on the current tokio runtime; returns the receiver and
    /// its address.
    pub async fn start() -> anyhow::Result<(Receiver, SocketAddr)> {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the OTLP receiver")?;
        let addr = listener.local_addr()?;
        let traces = TraceServiceServer::new(receiver.clone());
        let metrics = MetricsServiceServer::new(receiver.clone());
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(traces)
                .add_service(metrics)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
            if let Err(err) = served {
                eprintln!("OTLP receiver stopped: {err}");
            }
        });
        Ok((receiver, addr))
    }

    /// Serves on a free loopback port from a thread of its own in the idle scheduling class
    /// (`SCHED_IDLE`): it stands in for a collector on another machine, so it takes only the CPU
    /// time the measured processes leave unused instead of competing with them for the cores.
    pub fn start_idle() -> anyhow::Result<(Receiver, SocketAddr)> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("otlp-receiver".into())
            .spawn(move || {
                let started = idle_class()
                    .and_then(|()| crate::runtime().context("the OTLP receiver's runtime"));
                let runtime = match started {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        if tx.send(Err(err)).is_err() {
                            eprintln!("OTLP receiver: nobody waits for it");
                        }
                        return;
                    }
                };
                runtime.block_on(async move {
                    if tx.send(Receiver::start().await).is_err() {
                        eprintln!("OTLP receiver: nobody waits for it");
                        return;
                    }
                    // Serves until the process ends.
                    std::future::pending::<()>().await;
                });
            })
            .context("start the OTLP receiver's thread")?;
        rx.recv()
            .context("the OTLP receiver's thread ended before it served")?
    }

    /// The counts since the last call, and zeroes them.
    pub fn take(&self) -> Received {
        let c = &self.counters;
        Received {
            spans: c.spans.swap(0, Ordering::Relaxed),
            span_requests: c.span_requests.swap(0, Ordering::Relaxed),
            metric_points: c.points.swap(0, Ordering::Relaxed),
            metric_requests: c.metric_requests.swap(0, Ordering::Relaxed),
        }
    }
}

/// Moves the calling thread to the idle scheduling class.
fn idle_class() -> anyhow::Result<()> {
    use thread_priority::unix::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
        ThreadSchedulePolicy,
    };
    set_thread_priority_and_policy(
        thread_native_id(),
        thread_priority::ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    )
    .map_err(|err| anyhow::anyhow!("cannot move the OTLP receiver to SCHED_IDLE: {err:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::metrics::v1::{Gauge, NumberDataPoint, Sum};

    #[test]
    fn points_are_counted_whatever_the_kind() {
        let gauge = Metric {
            data: Some(Data::Gauge(Gauge {
                data_points: vec![NumberDataPoint::default(); 2],
            })),
            ..Default::default()
        };
        let sum = Metric {
            data: Some(Data::Sum(Sum {
                data_points: vec![NumberDataPoint::default(); 3],
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(points(&gauge), 2);
        assert_eq!(points(&sum), 3);
        assert_eq!(points(&Metric::default()), 0);
    }

    #[tokio::test]
    async fn spans_sent_are_counted_then_zeroed() {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

        let (receiver, addr) = Receiver::start().await.unwrap();
        let mut client = TraceServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let scope = |n| ScopeSpans {
            spans: vec![Span::default(); n],
            ..Default::default()
        };
        client
            .export(ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    scope_spans: vec![scope(2), scope(3)],
                    ..Default::default()
                }],
            })
            .await
            .unwrap();
        let got = receiver.take();
        assert_eq!((got.spans, got.span_requests), (5, 1));
        assert_eq!(receiver.take(), Received::default());
    }

    #[test]
    fn the_idle_receiver_runs_in_the_idle_class_and_counts() {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

        let (receiver, addr) = Receiver::start_idle().unwrap();
        let policy = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|task| {
                let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
                let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
                // Field 41 of stat (the 39th after the name) is the scheduling policy.
                (name == "otlp-receiver").then(|| rest.split(' ').nth(38).map(str::to_string))?
            })
            .next();
        // SCHED_IDLE is 5.
        assert_eq!(policy.as_deref(), Some("5"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut client = TraceServiceClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            client
                .export(ExportTraceServiceRequest {
                    resource_spans: vec![ResourceSpans {
                        scope_spans: vec![ScopeSpans {
                            spans: vec![Span::default(); 4],
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                })
                .await
                .unwrap();
        });
        assert_eq!(receiver.take().spans, 4);
    }
}
