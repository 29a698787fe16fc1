//! The agent process: started in its own process group, its stdout/stderr read line by line
//! and its stdin fed by a writer task. This is the seam for other agent-facing protocols.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::protocol::{env, LogStream, MAX_AGENT_LINE_BYTES};

/// File in the work dir holding the agent's pid (= its process group id) for the local provider.
pub const PID_FILE: &str = "agent.pid";

/// Lines buffered between the output readers and the relay; small, so the outbox bound governs.
const OUTPUT_CHANNEL: usize = 64;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("could not start the agent command: {source}")]
    Spawn {
        #[source]
        source: io::Error,
    },
    #[error("could not write {path:?}: {source}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What to start.
#[derive(Debug, Clone)]
pub struct AgentSpec<'a> {
    pub command: &'a str,
    pub work_dir: &'a Path,
    pub run_id: &'a str,
    pub task: &'a str,
    pub traceparent: Option<&'a str>,
}

/// One line of agent output. `original_len` exceeds `line.len()` when it was truncated.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputLine {
    pub stream: LogStream,
    pub line: String,
    pub original_len: usize,
}

impl OutputLine {
    pub fn truncated(&self) -> bool {
        self.original_len > self.line.len()
    }
}

/// A running agent.
#[derive(Debug)]
pub struct AgentProcess {
    pub pid: u32,
    child: Child,
    stdin: mpsc::UnboundedSender<String>,
}

impl AgentProcess {
    /// Starts `sh -c <command>` in its own process group and returns it with its output lines.
    pub fn spawn(
        spec: &AgentSpec<'_>,
    ) -> Result<(AgentProcess, mpsc::Receiver<OutputLine>), AgentError> {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(wrap_command(spec.command))
            .current_dir(spec.work_dir)
            .env_remove(env::RUN_TOKEN)
            .env(env::RUN_ID, spec.run_id)
            .env(env::TASK, spec.task)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        match spec.traceparent {
            Some(tp) => command.env(env::TRACEPARENT, tp),
            None => command.env_remove(env::TRACEPARENT),
        };
        let mut child = command
            .spawn()
            .map_err(|source| AgentError::Spawn { source })?;
        let pid = child.id().ok_or_else(|| AgentError::Spawn {
            source: io::Error::other("the agent exited before its pid was known"),
        })?;
        let pid_path = spec.work_dir.join(PID_FILE);
        if let Err(source) = std::fs::write(&pid_path, format!("{pid}\n")) {
            signal_group(pid, Signal::SIGKILL);
            return Err(AgentError::PidFile {
                path: pid_path,
                source,
            });
        }

        let (out_tx, out_rx) = mpsc::channel(OUTPUT_CHANNEL);
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(read_lines(stdout, LogStream::Stdout, out_tx.clone()));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(read_lines(stderr, LogStream::Stderr, out_tx));
        }
        let (in_tx, mut in_rx) = mpsc::unbounded_channel::<String>();
        if let Some(mut stdin) = child.stdin.take() {
            tokio::spawn(async move {
                while let Some(mut line) = in_rx.recv().await {
                    line.push('\n');
                    let written = async {
                        stdin.write_all(line.as_bytes()).await?;
                        stdin.flush().await
                    };
                    if let Err(e) = written.await {
                        tracing::warn!(error = %e, "cannot write to the agent's stdin");
                        break;
                    }
                }
            });
        }
        Ok((
            AgentProcess {
                pid,
                child,
                stdin: in_tx,
            },
            out_rx,
        ))
    }

    /// Queues one line for the agent's stdin. Lines are only queued for requests the agent made
    /// (its task, results of its own tool calls), so the queue is bounded by the agent itself.
    pub fn send_line(&self, line: String) -> bool {
        self.stdin.send(line).is_ok()
    }

    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Sends `signal` to the agent's whole process group.
    pub fn signal(&self, signal: Signal) {
        signal_group(self.pid, signal);
    }
}

/// The script given to `sh -c`. Shells such as dash keep running as the agent's parent instead of
/// exec'ing it, and a SIGTERM to the group would kill that wrapper at once: its exit would be
/// reported while the agent still shuts down, and with the agent's status lost. A trap (not an
/// ignore: exec'd programs get default handlers back) keeps the wrapper alive until the agent
/// exits, and it then exits with the agent's status.
pub fn wrap_command(command: &str) -> String {
    format!("trap : TERM\n{command}")
}

fn signal_group(pid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    match killpg(Pid::from_raw(raw), signal) {
        Ok(()) => tracing::debug!(pgid = pid, ?signal, "signalled the agent's process group"),
        Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pgid = pid, ?signal, error = %e, "cannot signal the agent"),
    }
}

async fn read_lines<R: AsyncRead + Unpin>(
    reader: R,
    stream: LogStream,
    tx: mpsc::Sender<OutputLine>,
) {
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut buf = Vec::new();
    loop {
        match read_line_limited(&mut reader, MAX_AGENT_LINE_BYTES, &mut buf).await {
            Ok(Some(original_len)) => {
                if buf.last() == Some(&b'\r') {
                    buf.pop();
                }
                let line = OutputLine {
                    stream,
                    line: String::from_utf8_lossy(&buf).into_owned(),
                    original_len,
                };
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(?stream, error = %e, "cannot read the agent's output");
                return;
            }
        }
    }
}

/// Reads one `\n`-terminated line, keeping at most `max` bytes of it in `buf` and discarding the
/// rest. Returns the line's full length, or `None` at end of input.
pub async fn read_line_limited<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
    buf: &mut Vec<u8>,
) -> io::Result<Option<usize>> {
    buf.clear();
    let mut total = 0usize;
    let mut any = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(any.then_some(total));
        }
        any = true;
        let newline = available.iter().position(|&b| b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
        total += chunk.len();
        let consumed = chunk.len() + usize::from(newline.is_some());
        reader.consume(consumed);
        if newline.is_some() {
            return Ok(Some(total));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_cut_and_the_rest_discarded() {
        let input = b"short\nthis line is long\n\nlast-no-newline".to_vec();
        let mut reader = BufReader::with_capacity(4, &input[..]);
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        while let Some(len) = read_line_limited(&mut reader, 8, &mut buf).await.unwrap() {
            lines.push((String::from_utf8(buf.clone()).unwrap(), len));
        }
        assert_eq!(
            lines,
            vec![
                ("short".to_owned(), 5),
                ("this lin".to_owned(), 17),
                (String::new(), 0),
                ("last-no-".to_owned(), 15),
            ]
        );
    }
}
