//! `load-tests agent` (hidden): the agent of the `toolcall` scenario. Speaks SPEC §7a on its
//! stdin/stdout, makes tool calls one after the other, times each round trip (tool_call line
//! written → matching tool_result line read) and reports the figures in its `done` line.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use agent_shim::protocol::agent::{FromAgent, ToAgent};
use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::stats::{Budget, Latencies, Summary};

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Measured calls.
    #[arg(long, default_value_t = 2000)]
    pub calls: u64,
    /// Calls made first and left out of the figures.
    #[arg(long, default_value_t = 200)]
    pub warmup: u64,
    /// Measure for this long instead of a number of calls.
    #[arg(long)]
    pub duration_ms: Option<u64>,
    #[arg(long, default_value = "fs.read_file")]
    pub tool: String,
    /// `path` argument of each call.
    #[arg(long, default_value = "README.md")]
    pub path: String,
}

/// What the agent reports as the run's `result`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentReport {
    pub latency: Summary,
    pub calls_per_s: f64,
    pub errors: u64,
    /// Bytes of the first tool_call and tool_result lines, without the newline.
    pub call_line_bytes: usize,
    pub result_line_bytes: usize,
}

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let stdout = std::io::stdout();
    let mut output = stdout.lock();
    let mut line = String::new();

    input.read_line(&mut line).context("task line")?;
    match serde_json::from_str::<ToAgent>(line.trim_end()) {
        Ok(ToAgent::Task { .. }) => {}
        _ => bail!("expected a task line first, got {line:?}"),
    }

    let budget = Budget {
        warmup: args.warmup,
        calls: args.calls,
        duration: args.duration_ms.map(Duration::from_millis),
    };
    let mut latencies = Latencies::default();
    let mut errors = 0;
    let (mut call_line_bytes, mut result_line_bytes) = (0, 0);
    let mut measured_from = Instant::now();
    let mut measured = 0;
    for i in 0.. {
        if i == budget.warmup {
            measured_from = Instant::now();
        }
        if i >= budget.warmup && budget.spent(measured, measured_from) {
            break;
        }
        let id = format!("c{i}");
        let call = serde_json::to_string(&FromAgent::ToolCall {
            id: id.clone(),
            tool: args.tool.clone(),
            args: json!({"path": args.path}),
        })?;
        call_line_bytes = call.len();
        let sent = Instant::now();
        output.write_all(call.as_bytes())?;
        output.write_all(b"\n")?;
        output.flush()?;
        let ok = loop {
            line.clear();
            if input.read_line(&mut line).context("tool result line")? == 0 {
                bail!("stdin closed while waiting for the result of {id}");
            }
            match serde_json::from_str::<ToAgent>(line.trim_end()) {
                Ok(ToAgent::ToolResult { id: got, ok, .. }) if got == id => break ok,
                Ok(other) => eprintln!("ignored line: {other:?}"),
                Err(err) => eprintln!("unreadable line ({err}): {line:?}"),
            }
        };
        let elapsed = sent.elapsed();
        result_line_bytes = line.trim_end().len();
        if !ok {
            errors += 1;
        }
        if i >= budget.warmup {
            latencies.record(elapsed);
            measured += 1;
        }
    }
    let elapsed = measured_from.elapsed();

    let report = AgentReport {
        latency: latencies.summary(),
        calls_per_s: measured as f64 / elapsed.as_secs_f64(),
        errors,
        call_line_bytes,
        result_line_bytes,
    };
    let done = serde_json::to_string(&FromAgent::Done {
        result: serde_json::to_value(&report)?,
    })?;
    output.write_all(done.as_bytes())?;
    output.write_all(b"\n")?;
    output.flush()?;
    Ok(())
}
