//! The shim's own trace spans. Finished spans wait here until a connection takes them to the
//! control plane (`spans` frames), which exports them into the run's trace. Without a
//! `TRACEPARENT` nothing is recorded.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::protocol::ShimSpan;

/// Spans kept while no connection takes them; the oldest go first beyond this.
pub const MAX_PENDING: usize = 1024;
/// A batch is sent once this many spans wait (otherwise with the next heartbeat).
pub const BATCH: usize = 64;

fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

/// Finished spans waiting to be sent, and tool calls whose span is open.
#[derive(Debug)]
pub struct SpanRecorder {
    /// The sandbox got a `TRACEPARENT`.
    traced: bool,
    /// Spans are recorded: traced, and the control plane has not said it does not want them.
    enabled: bool,
    pending: VecDeque<ShimSpan>,
    calls: HashMap<String, (SystemTime, String)>,
    dropped: u64,
}

impl SpanRecorder {
    /// Records spans only when the run is traced (the sandbox got a `TRACEPARENT`).
    pub fn new(traceparent: Option<&str>) -> SpanRecorder {
        let traced = traceparent.is_some_and(|t| !t.trim().is_empty());
        SpanRecorder {
            traced,
            enabled: traced,
            pending: VecDeque::new(),
            calls: HashMap::new(),
            dropped: 0,
        }
    }

    /// The control plane says whether it exports the shim's spans (in every `welcome`). Until
    /// the first welcome they are kept; once they are not wanted, the kept ones are dropped and
    /// no more are recorded.
    pub fn set_wanted(&mut self, wanted: bool) {
        self.enabled = wanted && self.traced;
        if !self.enabled {
            self.pending.clear();
            self.calls.clear();
        }
    }

    /// Keeps a finished span.
    pub fn finish(
        &mut self,
        name: &str,
        started: SystemTime,
        attributes: BTreeMap<String, String>,
        error: Option<String>,
    ) {
        if !self.enabled {
            return;
        }
        if self.pending.len() == MAX_PENDING {
            self.pending.pop_front();
            self.dropped += 1;
        }
        self.pending.push_back(ShimSpan {
            name: name.to_string(),
            start_unix_nano: unix_nanos(started),
            end_unix_nano: unix_nanos(SystemTime::now()),
            attributes,
            error,
        });
    }

    /// A tool call the agent made, relayed to the control plane: its span opens now.
    pub fn call_started(&mut self, call_id: &str, tool: &str) {
        if self.enabled {
            self.calls
                .insert(call_id.to_string(), (SystemTime::now(), tool.to_string()));
        }
    }

    /// The call's answer reached the agent: its span closes.
    pub fn call_answered(&mut self, call_id: &str, error: Option<&str>) {
        let Some((started, tool)) = self.calls.remove(call_id) else {
            return;
        };
        let attributes = BTreeMap::from([
            ("gen_ai.tool.name".to_string(), tool),
            ("tool.call_id".to_string(), call_id.to_string()),
            ("outcome".to_string(), error.unwrap_or("ok").to_string()),
        ]);
        self.finish(
            "shim.tool_call",
            started,
            attributes,
            error.map(|code| format!("tool call failed: {code}")),
        );
    }

    /// Whether a batch is due now (without waiting for the next heartbeat).
    pub fn batch_due(&self) -> bool {
        self.pending.len() >= BATCH
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Spans dropped because none could be sent for too long.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Takes the waiting spans for one frame.
    pub fn take(&mut self) -> Vec<ShimSpan> {
        self.pending.drain(..).collect()
    }

    /// Puts spans back that could not be sent (ahead of newer ones).
    pub fn restore(&mut self, spans: Vec<ShimSpan>) {
        for span in spans.into_iter().rev() {
            if self.pending.len() == MAX_PENDING {
                self.dropped += 1;
                continue;
            }
            self.pending.push_front(span);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_recorded_without_a_traceparent() {
        let mut spans = SpanRecorder::new(None);
        spans.finish("shim.agent.start", SystemTime::now(), BTreeMap::new(), None);
        spans.call_started("c1", "fs.read_file");
        spans.call_answered("c1", None);
        assert!(spans.is_empty());
    }

    #[test]
    fn nothing_is_recorded_once_the_control_plane_does_not_want_spans() {
        let mut spans = SpanRecorder::new(Some(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ));
        spans.finish(
            "shim.bundle.fetch",
            SystemTime::now(),
            BTreeMap::new(),
            None,
        );
        spans.call_started("c1", "fs.read_file");
        spans.set_wanted(false);
        spans.call_answered("c1", None);
        spans.call_started("c2", "fs.read_file");
        spans.call_answered("c2", None);
        assert!(
            spans.is_empty(),
            "kept spans are dropped, no new ones recorded"
        );

        spans.set_wanted(true);
        spans.call_started("c3", "fs.read_file");
        spans.call_answered("c3", None);
        assert_eq!(spans.take().len(), 1, "wanted again (a later welcome)");

        let mut untraced = SpanRecorder::new(None);
        untraced.set_wanted(true);
        untraced.call_started("c1", "fs.read_file");
        untraced.call_answered("c1", None);
        assert!(
            untraced.is_empty(),
            "wanted, but the run has no trace to join"
        );
    }

    #[test]
    fn a_tool_call_span_spans_the_relay_and_names_the_tool_and_outcome() {
        let mut spans = SpanRecorder::new(Some(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ));
        spans.call_started("c1", "fs.read_file");
        spans.call_started("c2", "fs.search");
        spans.call_answered("c2", Some("not_found"));
        spans.call_answered("c1", None);
        spans.call_answered("c1", None);
        let taken = spans.take();
        assert_eq!(taken.len(), 2, "{taken:?}");
        assert_eq!(taken[0].attributes["gen_ai.tool.name"], "fs.search");
        assert_eq!(taken[0].attributes["outcome"], "not_found");
        assert!(taken[0].error.is_some());
        assert_eq!(taken[1].attributes["outcome"], "ok");
        assert!(taken[1].end_unix_nano >= taken[1].start_unix_nano);
        assert!(spans.is_empty());
    }

    #[test]
    fn unsent_spans_go_back_in_order_and_the_oldest_are_dropped_beyond_the_cap() {
        let mut spans = SpanRecorder::new(Some(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ));
        for i in 0..3 {
            spans.finish(&format!("s{i}"), SystemTime::now(), BTreeMap::new(), None);
        }
        let taken = spans.take();
        spans.finish("s3", SystemTime::now(), BTreeMap::new(), None);
        spans.restore(taken);
        let names: Vec<String> = spans.take().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["s0", "s1", "s2", "s3"]);

        for i in 0..MAX_PENDING + 5 {
            spans.finish(&format!("x{i}"), SystemTime::now(), BTreeMap::new(), None);
        }
        assert_eq!(spans.dropped(), 5);
        assert!(spans.batch_due());
        assert_eq!(spans.take()[0].name, "x5");
    }
}
