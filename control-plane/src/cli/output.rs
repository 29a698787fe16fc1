//! What the client verbs print: pure functions from API records to text.
//!
//! Times are rendered in the time zone the caller passes (the local one in the binary, UTC in
//! tests); "now" is passed in too, so every function here is deterministic.

use std::fmt::Display;

use actors::model::{EventKind, Failure, Resources, RunEvent, RunRecord, RunState, Usage};
use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use serde_json::Value;

use super::client::ProviderStatus;

/// Width of the `HH:MM:SS ` prefix, to indent continuation lines under it.
const TIME_PREFIX: &str = "         ";

/// One readable line (or a few, for failures and multi-line messages) for a run event, or `None`
/// for events too chatty to show while following (tool calls before their result, usage samples).
pub fn event_line<Tz>(event: &RunEvent, tz: &Tz) -> Option<String>
where
    Tz: TimeZone,
    Tz::Offset: Display,
{
    let text = match &event.kind {
        EventKind::StateChanged { to, failure, .. } => match failure {
            Some(failure) => format!("{to}: {}", failure_text(failure)),
            None => to.to_string(),
        },
        EventKind::ImagePull {
            image,
            status,
            current_bytes,
            total_bytes,
        } => match (current_bytes, total_bytes) {
            (Some(current), Some(total)) if *total > 0 => format!(
                "pulling {image}: {status} {}%",
                current.saturating_mul(100) / total
            ),
            _ => format!("pulling {image}: {status}"),
        },
        EventKind::SandboxCreated {
            sandbox_id,
            remote_host,
        } => format!("sandbox {sandbox_id} created on {remote_host}"),
        EventKind::ShimConnected { host, resumed } => {
            let verb = if *resumed { "reconnected" } else { "connected" };
            format!("shim {verb} from {host}")
        }
        EventKind::ShimDisconnected { reason } => format!("shim disconnected: {reason}"),
        EventKind::AgentStarted { pid } => format!("agent started (pid {pid})"),
        EventKind::AgentMessage { text } => format!("agent: {text}"),
        EventKind::AgentDone { result } => format!("done: {}", value_text(result)),
        EventKind::ToolCall { .. } | EventKind::Usage { .. } => return None,
        EventKind::ToolResult {
            tool,
            ok,
            duration_ms,
            error_code,
            ..
        } => match (ok, error_code) {
            (true, _) => format!("tool {tool} ok {duration_ms}ms"),
            (false, Some(code)) => format!("tool {tool} error {code} {duration_ms}ms"),
            (false, None) => format!("tool {tool} error {duration_ms}ms"),
        },
        EventKind::StopRequested { grace_s } => format!("stop requested (grace {grace_s}s)"),
        EventKind::StopForwarded { grace_s } => {
            format!("SIGTERM sent to the agent (grace {grace_s}s)")
        }
        EventKind::KillRequested { reason } => format!("kill requested: {reason}"),
        EventKind::AgentExited { code, signal } => match (code, signal) {
            (Some(code), _) => format!("agent exited with code {code}"),
            (None, Some(signal)) => format!("agent killed by signal {signal}"),
            (None, None) => "agent exited".to_string(),
        },
        EventKind::Warning { message } => format!("warning: {message}"),
    };
    let time = event.at.with_timezone(tz).format("%H:%M:%S");
    let indent = format!("\n{TIME_PREFIX}");
    Some(format!("{time} {}", sanitize(&text).replace('\n', &indent)))
}

/// `kind: message` and the hint on its own line.
fn failure_text(failure: &Failure) -> String {
    format!(
        "{}: {}\nhint: {}",
        failure.kind, failure.message, failure.hint
    )
}

/// Strings as they are, anything else as compact JSON.
fn value_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Drops control characters (terminal escapes from agents, stray carriage returns) but keeps
/// newlines and tabs.
pub fn sanitize(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .collect()
}

/// `850ms`, `12s`, `4m05s`, `2h03m`, `3d04h`.
pub fn format_duration(duration: TimeDelta) -> String {
    let ms = duration.num_milliseconds().max(0);
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `4.0 KiB`, `1.5 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// When the run reached its terminal state, if it has.
fn ended_at(run: &RunRecord) -> Option<DateTime<Utc>> {
    run.state_times
        .iter()
        .filter(|(state, _)| state.is_terminal())
        .map(|(_, at)| *at)
        .min()
}

/// From creation to the end, or to `now` while the run is live.
pub fn run_duration(run: &RunRecord, now: DateTime<Utc>) -> TimeDelta {
    let end = if run.state.is_terminal() {
        ended_at(run).unwrap_or(now)
    } else {
        now
    };
    end - run.created_at
}

/// Columns separated by two spaces, each as wide as its widest cell; the last is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `codebolt agent list`: id, agent, provider, state, created, duration.
pub fn runs_table<Tz>(runs: &[RunRecord], tz: &Tz, now: DateTime<Utc>) -> String
where
    Tz: TimeZone,
    Tz::Offset: Display,
{
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|run| {
            vec![
                run.id.to_string(),
                sanitize(&run.agent),
                sanitize(&run.provider),
                run.state.to_string(),
                run.created_at
                    .with_timezone(tz)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string(),
                format_duration(run_duration(run, now)),
            ]
        })
        .collect();
    table(
        &["ID", "AGENT", "PROVIDER", "STATE", "CREATED", "DURATION"],
        &rows,
    )
}

/// `codebolt providers list`.
pub fn providers_table(providers: &[ProviderStatus]) -> String {
    let rows: Vec<Vec<String>> = providers
        .iter()
        .map(|p| {
            let runs = match p.max_concurrent_runs {
                Some(max) => format!("{}/{max}", p.active_runs),
                None => p.active_runs.to_string(),
            };
            let note = match (&p.message, &p.last_error) {
                (Some(message), _) if !message.is_empty() => message.clone(),
                (_, Some(error)) => format!("last error: {error}"),
                _ => String::new(),
            };
            vec![
                sanitize(&p.name),
                sanitize(&p.kind),
                if p.healthy { "healthy" } else { "unhealthy" }.to_string(),
                runs,
                p.restarts.to_string(),
                sanitize(&note).replace('\n', " "),
            ]
        })
        .collect();
    table(
        &["NAME", "KIND", "HEALTH", "RUNS", "RESTARTS", "MESSAGE"],
        &rows,
    )
}

fn resources_text(resources: &Resources) -> String {
    let mut parts = Vec::new();
    if let Some(memory_mb) = resources.memory_mb {
        parts.push(format!("memory {memory_mb} MB"));
    }
    if let Some(cpu) = resources.cpu {
        parts.push(format!("cpu {cpu}"));
    }
    if let Some(gpus) = resources.gpu_count {
        parts.push(format!("gpu {gpus}"));
    }
    if parts.is_empty() {
        "provider defaults".to_string()
    } else {
        parts.join(", ")
    }
}

fn usage_text<Tz>(usage: &Usage, tz: &Tz) -> Option<String>
where
    Tz: TimeZone,
    Tz::Offset: Display,
{
    let mut parts = Vec::new();
    if let Some(cpu) = usage.cpu_pct {
        parts.push(format!("cpu {cpu:.1}%"));
    }
    if let Some(memory) = usage.memory_bytes {
        parts.push(format!("memory {}", format_bytes(memory)));
    }
    if let Some(peak) = usage.peak_memory_bytes {
        parts.push(format!("peak memory {}", format_bytes(peak)));
    }
    if parts.is_empty() {
        return None;
    }
    let mut text = parts.join(", ");
    if let Some(at) = usage.reported_at {
        text.push_str(&format!(
            " (at {})",
            at.with_timezone(tz).format("%H:%M:%S")
        ));
    }
    Some(text)
}

/// `codebolt agent show` in text form: every field of the record, one per line.
pub fn run_details<Tz>(run: &RunRecord, tz: &Tz, now: DateTime<Utc>) -> String
where
    Tz: TimeZone,
    Tz::Offset: Display,
{
    let stamp = |at: &DateTime<Utc>| {
        at.with_timezone(tz)
            .format("%Y-%m-%d %H:%M:%S%.3f")
            .to_string()
    };
    let none = || "-".to_string();
    let mut fields: Vec<(&str, String)> = vec![
        ("id", run.id.to_string()),
        ("agent", run.agent.clone()),
        ("task", run.task.clone()),
        ("provider", run.provider.clone()),
        ("state", run.state.to_string()),
        ("remote host", run.remote_host.clone().unwrap_or_else(none)),
        ("sandbox", run.sandbox_id.clone().unwrap_or_else(none)),
        ("owner", run.owner.clone()),
        ("trace id", run.trace_id.clone()),
        ("created", stamp(&run.created_at)),
        ("duration", format_duration(run_duration(run, now))),
        (
            "exit code",
            run.exit_code.map(|c| c.to_string()).unwrap_or_else(none),
        ),
    ];
    if let Some(termination) = run.termination {
        let text = serde_json::to_value(termination)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{termination:?}"));
        fields.push(("termination", text.replace('_', " ")));
    }
    if let Some(failure) = &run.failure {
        fields.push(("failure", format!("{}: {}", failure.kind, failure.message)));
        fields.push(("hint", failure.hint.clone()));
    }
    fields.push(("resources", resources_text(&run.resources)));
    fields.push(("usage", usage_text(&run.usage, tz).unwrap_or_else(none)));
    fields.push((
        "cost estimate",
        run.cost_estimate
            .map(|c| format!("{c:.4}"))
            .unwrap_or_else(none),
    ));
    fields.push((
        "timeout",
        run.timeout_s
            .map(|s| format_duration(TimeDelta::seconds(s as i64)))
            .unwrap_or_else(none),
    ));
    if !run.env_names.is_empty() {
        fields.push(("env", run.env_names.join(", ")));
    }
    if let Some(result) = &run.result {
        fields.push(("result", value_text(result)));
    }

    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 3;
    let indent = " ".repeat(width);
    let mut out = String::new();
    for (key, value) in &fields {
        let value = sanitize(value).replace('\n', &format!("\n{indent}"));
        out.push_str(&format!("{:<width$}{value}\n", format!("{key}:")));
    }

    out.push_str("states:\n");
    let mut states: Vec<(&RunState, &DateTime<Utc>)> = run.state_times.iter().collect();
    states.sort_by_key(|(state, at)| (**at, **state));
    for (state, at) in states {
        out.push_str(&format!("  {:<14}{}\n", state.as_str(), stamp(at)));
    }

    if let Some(evidence) = &run.evidence {
        for (title, lines) in [
            ("provider logs", &evidence.provider_logs),
            ("agent logs", &evidence.agent_logs),
        ] {
            if lines.is_empty() {
                continue;
            }
            out.push_str(&format!("last {title}:\n"));
            for line in lines {
                out.push_str(&format!("  {}\n", sanitize(line)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use actors::model::{Evidence, FailureKind, Termination};
    use uuid::Uuid;

    use super::*;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, 1, h, m, s).unwrap()
    }

    fn event(kind: EventKind) -> RunEvent {
        RunEvent {
            index: 1,
            at: at(12, 0, 1),
            kind,
        }
    }

    fn line(kind: EventKind) -> Option<String> {
        event_line(&event(kind), &Utc)
    }

    fn run() -> RunRecord {
        RunRecord {
            id: Uuid::from_u128(0x1234),
            agent: "explorer".into(),
            task: "find TODOs".into(),
            provider: "local".into(),
            state: RunState::Running,
            remote_host: None,
            sandbox_id: None,
            created_at: at(12, 0, 0),
            state_times: BTreeMap::from([
                (RunState::Pending, at(12, 0, 0)),
                (RunState::Running, at(12, 0, 2)),
            ]),
            exit_code: None,
            failure: None,
            termination: None,
            resources: Resources::default(),
            usage: Usage::default(),
            cost_estimate: None,
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            owner: "replica-1".into(),
            timeout_s: None,
            result: None,
            evidence: None,
            env_names: vec![],
        }
    }

    #[test]
    fn state_changes_show_the_new_state() {
        let kind = EventKind::StateChanged {
            from: RunState::Starting,
            to: RunState::Running,
            failure: None,
        };
        assert_eq!(line(kind).unwrap(), "12:00:01 running");
    }

    #[test]
    fn failures_show_kind_message_and_hint() {
        let kind = EventKind::StateChanged {
            from: RunState::Running,
            to: RunState::Failed,
            failure: Some(Failure {
                kind: FailureKind::AgentError,
                message: "agent exited with code 3".into(),
                hint: "see the logs".into(),
            }),
        };
        assert_eq!(
            line(kind).unwrap(),
            "12:00:01 failed: agent_error: agent exited with code 3\n         hint: see the logs"
        );
    }

    #[test]
    fn agent_messages_and_tool_results_are_one_line_each() {
        assert_eq!(
            line(EventKind::AgentMessage {
                text: "hello".into()
            })
            .unwrap(),
            "12:00:01 agent: hello"
        );
        assert_eq!(
            line(EventKind::ToolResult {
                call_id: "c1".into(),
                tool: "fs.read_file".into(),
                ok: true,
                duration_ms: 3,
                error_code: None,
            })
            .unwrap(),
            "12:00:01 tool fs.read_file ok 3ms"
        );
        assert_eq!(
            line(EventKind::ToolResult {
                call_id: "c2".into(),
                tool: "fs.read_file".into(),
                ok: false,
                duration_ms: 1,
                error_code: Some("not_found".into()),
            })
            .unwrap(),
            "12:00:01 tool fs.read_file error not_found 1ms"
        );
    }

    #[test]
    fn chatty_events_are_not_shown() {
        assert_eq!(
            line(EventKind::ToolCall {
                call_id: "c1".into(),
                tool: "fs.list_dir".into()
            }),
            None
        );
        assert_eq!(
            line(EventKind::Usage {
                cpu_pct: Some(1.0),
                memory_bytes: None
            }),
            None
        );
    }

    #[test]
    fn agent_text_is_stripped_of_control_characters_and_indented() {
        let text = line(EventKind::AgentMessage {
            text: "a\u{1b}[31mred\r\nb".into(),
        })
        .unwrap();
        assert_eq!(text, "12:00:01 agent: a[31mred\n         b");
    }

    #[test]
    fn exits_and_done_results_are_readable() {
        assert_eq!(
            line(EventKind::AgentExited {
                code: None,
                signal: Some(9)
            })
            .unwrap(),
            "12:00:01 agent killed by signal 9"
        );
        assert_eq!(
            line(EventKind::AgentDone {
                result: Value::from("wrote report")
            })
            .unwrap(),
            "12:00:01 done: wrote report"
        );
        assert_eq!(
            line(EventKind::AgentDone {
                result: serde_json::json!({"files": 2})
            })
            .unwrap(),
            r#"12:00:01 done: {"files":2}"#
        );
    }

    #[test]
    fn durations_pick_a_readable_unit() {
        assert_eq!(format_duration(TimeDelta::milliseconds(850)), "850ms");
        assert_eq!(format_duration(TimeDelta::seconds(12)), "12s");
        assert_eq!(format_duration(TimeDelta::seconds(245)), "4m05s");
        assert_eq!(format_duration(TimeDelta::seconds(7380)), "2h03m");
        assert_eq!(format_duration(TimeDelta::seconds(273_600)), "3d04h");
        assert_eq!(format_duration(TimeDelta::seconds(-5)), "0ms");
    }

    #[test]
    fn bytes_use_binary_units() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(4096), "4.0 KiB");
        assert_eq!(format_bytes(3 * 1024 * 1024 / 2 * 1024), "1.5 GiB");
    }

    #[test]
    fn live_runs_last_until_now_and_ended_runs_until_their_end() {
        let mut record = run();
        assert_eq!(run_duration(&record, at(12, 1, 0)), TimeDelta::seconds(60));
        record.state = RunState::Succeeded;
        record
            .state_times
            .insert(RunState::Succeeded, at(12, 0, 30));
        assert_eq!(run_duration(&record, at(13, 0, 0)), TimeDelta::seconds(30));
    }

    #[test]
    fn runs_table_aligns_columns() {
        let mut other = run();
        other.id = Uuid::from_u128(0x5678);
        other.agent = "gpu-heavy-agent".into();
        other.provider = "k8s".into();
        other.state = RunState::Failed;
        other.state_times.insert(RunState::Failed, at(12, 4, 5));
        let table = runs_table(&[run(), other], &Utc, at(12, 0, 42));
        assert_eq!(
            table,
            "\
ID                                    AGENT            PROVIDER  STATE    CREATED              DURATION
00000000-0000-0000-0000-000000001234  explorer         local     running  2024-05-01 12:00:00  42s
00000000-0000-0000-0000-000000005678  gpu-heavy-agent  k8s       failed   2024-05-01 12:00:00  4m05s
"
        );
    }

    #[test]
    fn empty_runs_table_is_just_the_header() {
        assert_eq!(
            runs_table(&[], &Utc, at(0, 0, 0)),
            "ID  AGENT  PROVIDER  STATE  CREATED  DURATION\n"
        );
    }

    #[test]
    fn providers_table_shows_health_load_and_errors() {
        let provider = |name: &str, healthy: bool| ProviderStatus {
            name: name.into(),
            kind: name.into(),
            healthy,
            message: None,
            restarts: 0,
            last_error: None,
            active_runs: 1,
            max_concurrent_runs: None,
            extra: Default::default(),
        };
        let mut docker = provider("docker", false);
        docker.restarts = 3;
        docker.max_concurrent_runs = Some(10);
        docker.last_error = Some("cannot connect to the docker socket".into());
        assert_eq!(
            providers_table(&[provider("local", true), docker]),
            "\
NAME    KIND    HEALTH     RUNS  RESTARTS  MESSAGE
local   local   healthy    1     0
docker  docker  unhealthy  1/10  3         last error: cannot connect to the docker socket
"
        );
    }

    #[test]
    fn details_show_every_field_of_a_failed_run() {
        let mut record = run();
        record.state = RunState::Failed;
        record.state_times.insert(RunState::Failed, at(12, 0, 9));
        record.remote_host = Some("agent-runner.my-org.com".into());
        record.sandbox_id = Some("codebolt-run-1234".into());
        record.exit_code = Some(2);
        record.termination = Some(Termination::Exited);
        record.failure = Some(Failure::new(
            FailureKind::AgentError,
            "agent exited with code 2",
        ));
        record.resources = Resources {
            memory_mb: Some(4096),
            cpu: Some(2.0),
            gpu_count: None,
        };
        record.usage = Usage {
            cpu_pct: Some(12.5),
            memory_bytes: Some(64 * 1024 * 1024),
            peak_memory_bytes: None,
            reported_at: Some(at(12, 0, 8)),
        };
        record.cost_estimate = Some(0.00126);
        record.timeout_s = Some(600);
        record.env_names = vec!["API_URL".into()];
        record.evidence = Some(Evidence {
            provider_logs: vec!["container exited".into()],
            agent_logs: vec![],
        });
        let text = run_details(&record, &Utc, at(13, 0, 0));
        for expected in [
            "id:             00000000-0000-0000-0000-000000001234\n",
            "remote host:    agent-runner.my-org.com\n",
            "sandbox:        codebolt-run-1234\n",
            "owner:          replica-1\n",
            "trace id:       4bf92f3577b34da6a3ce929d0e0e4736\n",
            "duration:       9s\n",
            "exit code:      2\n",
            "termination:    exited\n",
            "failure:        agent_error: agent exited with code 2\n",
            "hint:           the agent exited with a non-zero code",
            "resources:      memory 4096 MB, cpu 2\n",
            "usage:          cpu 12.5%, memory 64.0 MiB (at 12:00:08)\n",
            "cost estimate:  0.0013\n",
            "timeout:        10m00s\n",
            "env:            API_URL\n",
            "states:\n  pending       2024-05-01 12:00:00.000\n  running       2024-05-01 12:00:02.000\n  failed        2024-05-01 12:00:09.000\n",
            "last provider logs:\n  container exited\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(!text.contains("last agent logs"), "{text}");
    }

    #[test]
    fn details_of_a_fresh_run_use_placeholders() {
        let text = run_details(&run(), &Utc, at(12, 0, 5));
        assert!(text.contains("remote host:    -\n"), "{text}");
        assert!(
            text.contains("resources:      provider defaults\n"),
            "{text}"
        );
        assert!(text.contains("usage:          -\n"), "{text}");
        assert!(!text.contains("failure:"), "{text}");
    }
}
