//! The verbs: each turns its arguments into API calls and prints what comes back.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use actors::model::{EventKind, Resources, RunId, RunState};
use anyhow::Context;
use chrono::{Local, Utc};
use futures_util::StreamExt;

use super::client::{ApiClient, ClientError, CreateRun, RunFilter};
use super::{
    exit, output, AgentCommand, ConnectionArgs, ListArgs, LogsArgs, ProvidersCommand, ServerArgs,
    StartArgs, TableOrJson, TextOrJson,
};

/// A followed stream that stays silent this long is reopened, in case the connection died
/// without the socket noticing.
const IDLE_RECONNECT: Duration = Duration::from_secs(120);
/// Consecutive failed attempts to (re)open a followed stream before giving up.
const MAX_RECONNECTS: u32 = 8;
/// Largest page `codebolt agent list --limit` asks for.
const PAGE_SIZE: usize = 100;

pub async fn server(args: ServerArgs) -> anyhow::Result<u8> {
    let options = codebolt::server::ServerOptions {
        listen: args.listen,
        config: args.config,
        workspace: args.workspace,
        env: std::env::vars().collect(),
        ..Default::default()
    };
    match codebolt::server::run_until_signal(options).await {
        Ok(()) => Ok(exit::SUCCESS),
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            Ok(exit::FAILED)
        }
    }
}

pub async fn agent(connection: ConnectionArgs, command: AgentCommand) -> anyhow::Result<u8> {
    let client = ApiClient::new(&connection.server, connection.api_token)?;
    match command {
        AgentCommand::Start(args) => start(&client, args).await,
        AgentCommand::Stop(args) => {
            client.stop_run(args.run_id, args.grace).await?;
            print_state(&client, args.run_id).await
        }
        AgentCommand::Kill(args) => {
            client.kill_run(args.run_id).await?;
            print_state(&client, args.run_id).await
        }
        AgentCommand::Logs(args) => logs(&client, args).await,
        AgentCommand::List(args) => list(&client, args).await,
        AgentCommand::Show(args) => {
            let run = client.get_run(args.run_id).await?;
            match args.output {
                TextOrJson::Text => emit(&output::run_details(&run, &Local, Utc::now()))?,
                TextOrJson::Json => emit_json(&run)?,
            }
            Ok(exit::SUCCESS)
        }
    }
}

pub async fn providers(
    connection: ConnectionArgs,
    command: ProvidersCommand,
) -> anyhow::Result<u8> {
    let client = ApiClient::new(&connection.server, connection.api_token)?;
    match command {
        ProvidersCommand::List { output } => {
            let providers = client.providers().await?;
            match output {
                TableOrJson::Table => emit(&output::providers_table(&providers))?,
                TableOrJson::Json => emit_json(&providers)?,
            }
            Ok(exit::SUCCESS)
        }
    }
}

async fn start(client: &ApiClient, args: StartArgs) -> anyhow::Result<u8> {
    let resources = (args.memory_mb.is_some() || args.cpu.is_some()).then_some(Resources {
        memory_mb: args.memory_mb,
        cpu: args.cpu,
        gpu_count: None,
    });
    let env: BTreeMap<String, String> = args.env.into_iter().collect();
    let body = CreateRun {
        agent: args.agent,
        task: args.task,
        execution: args.execution,
        resources,
        env: (!env.is_empty()).then_some(env),
        timeout_s: args.timeout,
    };
    let run = client
        .create_run(&body, args.idempotency_key.as_deref())
        .await?;
    emit(&format!("{}\n", run.id))?;
    if args.detach {
        return Ok(exit::SUCCESS);
    }
    tokio::select! {
        state = follow_events(client, run.id) => {
            let state = state?;
            Ok(exit::for_state(state).unwrap_or(exit::USAGE_OR_CONNECTION))
        }
        Ok(()) = tokio::signal::ctrl_c() => {
            eprintln!(
                "stopped following run {id}; it keeps running (stop it with `codebolt agent stop {id}`)",
                id = run.id
            );
            Ok(exit::INTERRUPTED)
        }
    }
}

/// Prints the run's events until its terminal state change, reopening the stream when it breaks
/// and skipping the events the server replays that were already printed.
async fn follow_events(client: &ApiClient, id: RunId) -> anyhow::Result<RunState> {
    let mut last: Option<u64> = None;
    let mut reconnect = Reconnect::default();
    loop {
        let mut stream = match client.events(id, true, last).await {
            Ok(stream) => stream,
            Err(err) => {
                reconnect.after("event stream", err).await?;
                continue;
            }
        };
        let interruption = loop {
            let item = match tokio::time::timeout(IDLE_RECONNECT, stream.next()).await {
                Ok(item) => item,
                Err(_) => break None,
            };
            match item {
                None => {
                    break Some(ClientError::StreamBroken {
                        url: format!("/v1/runs/{id}/events"),
                        reason: "the server closed it before the run ended".to_string(),
                    })
                }
                Some(Err(err @ ClientError::Decode { .. })) => {
                    eprintln!("warning: skipping an event: {err}");
                }
                Some(Err(err)) => break Some(err),
                Some(Ok(event)) => {
                    if last.is_some_and(|last| event.index <= last) {
                        continue;
                    }
                    last = Some(event.index);
                    reconnect.progressed();
                    if let Some(line) = output::event_line(&event, &Local) {
                        emit(&format!("{line}\n"))?;
                    }
                    if let EventKind::StateChanged { to, .. } = event.kind {
                        if to.is_terminal() {
                            return Ok(to);
                        }
                    }
                }
            }
        };
        match interruption {
            Some(err) => reconnect.after("event stream", err).await?,
            // Idle: reopen at once; silence is not a failure.
            None => tracing::debug!(run_id = %id, "event stream idle, reopening"),
        }
    }
}

async fn logs(client: &ApiClient, args: LogsArgs) -> anyhow::Result<u8> {
    let source = args.source.as_str();
    let mut last: Option<u64> = None;
    let mut reconnect = Reconnect::default();
    loop {
        let mut stream = match client.logs(args.run_id, source, args.follow, last).await {
            Ok(stream) => stream,
            Err(err) if args.follow => {
                reconnect.after("log stream", err).await?;
                continue;
            }
            Err(err) => return Err(err.into()),
        };
        let interruption = loop {
            let item = if args.follow {
                match tokio::time::timeout(IDLE_RECONNECT, stream.next()).await {
                    Ok(item) => item,
                    Err(_) => break None,
                }
            } else {
                stream.next().await
            };
            match item {
                None if !args.follow => return Ok(exit::SUCCESS),
                None => {
                    // A followed log ends with its run; anything else is a broken stream.
                    if client.get_run(args.run_id).await?.state.is_terminal() {
                        return Ok(exit::SUCCESS);
                    }
                    break Some(ClientError::StreamBroken {
                        url: format!("/v1/runs/{}/logs", args.run_id),
                        reason: "the server closed it before the run ended".to_string(),
                    });
                }
                Some(Err(err @ ClientError::Decode { .. })) => {
                    eprintln!("warning: skipping a log line: {err}");
                }
                Some(Err(err)) if args.follow => break Some(err),
                Some(Err(err)) => return Err(err.into()),
                Some(Ok(line)) => {
                    if last.is_some_and(|last| line.index <= last) {
                        continue;
                    }
                    last = Some(line.index);
                    reconnect.progressed();
                    emit(&format!("{}\n", line.line))?;
                }
            }
        };
        if let Some(err) = interruption {
            reconnect.after("log stream", err).await?;
        }
    }
}

async fn list(client: &ApiClient, args: ListArgs) -> anyhow::Result<u8> {
    let filter = RunFilter {
        state: args.state,
        agent: args.agent,
        provider: args.provider,
    };
    let mut runs = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        // Pages of at most PAGE_SIZE when a limit is given; the server's default page otherwise.
        let remaining = args.limit.map(|limit| (limit - runs.len()).min(PAGE_SIZE));
        let page = client
            .list_runs(&filter, remaining, cursor.as_deref())
            .await?;
        runs.extend(page.runs);
        if let Some(limit) = args.limit {
            if runs.len() >= limit {
                runs.truncate(limit);
                break;
            }
        }
        match page.next_cursor {
            Some(next) if cursor.as_deref() != Some(next.as_str()) => cursor = Some(next),
            Some(next) => anyhow::bail!("the server returned the same page cursor twice ({next})"),
            None => break,
        }
    }
    match args.output {
        TableOrJson::Table => emit(&output::runs_table(&runs, &Local, Utc::now()))?,
        TableOrJson::Json => emit_json(&runs)?,
    }
    Ok(exit::SUCCESS)
}

async fn print_state(client: &ApiClient, id: RunId) -> anyhow::Result<u8> {
    let run = client.get_run(id).await?;
    emit(&format!("{} {}\n", run.id, run.state))?;
    Ok(exit::SUCCESS)
}

/// Backoff between attempts to reopen a followed stream; gives up after [`MAX_RECONNECTS`]
/// failures in a row or at once on errors that retrying cannot fix (404, 401, …).
#[derive(Debug, Default)]
struct Reconnect {
    failures: u32,
}

impl Reconnect {
    fn progressed(&mut self) {
        self.failures = 0;
    }

    async fn after(&mut self, what: &str, err: ClientError) -> Result<(), ClientError> {
        if !err.is_retryable() || self.failures >= MAX_RECONNECTS {
            return Err(err);
        }
        self.failures += 1;
        let delay = Duration::from_millis(250 << self.failures.min(5)).min(Duration::from_secs(5));
        eprintln!(
            "{what} interrupted ({}); reconnecting in {}ms",
            error_chain(&err),
            delay.as_millis()
        );
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

/// An error and its causes on one line.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

/// Writes to stdout; a closed pipe (`codebolt agent list | head`) ends the command quietly.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()) {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        result => result.context("cannot write to stdout"),
    }
}

fn emit_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("cannot encode JSON")?;
    text.push('\n');
    emit(&text)
}
