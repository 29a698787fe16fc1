//! The agent process: started in its own process group, its stdout/stderr read line by line
//! and its stdin written by whoever holds it, with no task or channel in between: a tool call's
//! line goes from the agent's pipe to the socket, and its answer from the socket to the pipe, in
//! one turn of the shim's event loop. This is the seam for other agent-facing protocols.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::task::{Context, Poll, Waker};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

use crate::protocol::{env, LogStream, MAX_AGENT_LINE_BYTES};

/// File in the work dir holding the agent's pid (= its process group id) for the local provider.
pub const PID_FILE: &str = "agent.pid";

/// Bytes read from an output pipe at a time.
const READ_BUFFER: usize = 64 * 1024;

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

/// What a running agent did next.
#[derive(Debug)]
pub enum Progress {
    Exited(io::Result<ExitStatus>),
    /// What waited for room in its stdin was written (or the pipe closed).
    InputWritten,
}

/// A running agent.
#[derive(Debug)]
pub struct AgentProcess {
    pub pid: u32,
    child: Child,
    stdin: AgentInput,
}

impl AgentProcess {
    /// Starts `sh -c <command>` in its own process group and returns it with its output.
    pub fn spawn(spec: &AgentSpec<'_>) -> Result<(AgentProcess, AgentOutput), AgentError> {
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
        let output = AgentOutput {
            stdout: child
                .stdout
                .take()
                .map(|pipe| LineReader::new(pipe, LogStream::Stdout)),
            stderr: child
                .stderr
                .take()
                .map(|pipe| LineReader::new(pipe, LogStream::Stderr)),
            stderr_first: false,
        };
        let stdin = AgentInput {
            pipe: child.stdin.take(),
            queue: VecDeque::new(),
            written: 0,
        };
        Ok((AgentProcess { pid, child, stdin }, output))
    }

    /// Writes one line to the agent's stdin, as far as the pipe takes it now; the rest waits
    /// for [`AgentProcess::progress`]. Lines are only written for requests the agent made
    /// (its task, results of its own tool calls), so what waits is bounded by the agent itself.
    /// False once the agent's stdin is closed.
    pub fn send_line(&mut self, line: String) -> bool {
        self.stdin.send(line)
    }

    /// The agent's exit, or, while a line waits for room in its stdin, that line written.
    pub async fn progress(&mut self) -> Progress {
        let input_pending = self.stdin.pending();
        tokio::select! {
            status = self.child.wait() => Progress::Exited(status),
            () = poll_fn(|cx| self.stdin.poll_write_queued(cx)), if input_pending => {
                Progress::InputWritten
            }
        }
    }

    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Sends `signal` to the agent's whole process group.
    pub fn signal(&self, signal: Signal) {
        signal_group(self.pid, signal);
    }
}

/// The agent's stdin: lines written straight away, and what the pipe had no room for.
#[derive(Debug)]
struct AgentInput {
    /// `None` once writing failed (the agent closed its stdin).
    pipe: Option<ChildStdin>,
    queue: VecDeque<Vec<u8>>,
    /// Bytes of the queue's first line already written.
    written: usize,
}

impl AgentInput {
    fn send(&mut self, line: String) -> bool {
        if self.pipe.is_none() {
            return false;
        }
        let mut bytes = line.into_bytes();
        bytes.push(b'\n');
        self.queue.push_back(bytes);
        // A pipe with room takes the line at once; one without is written to once it has room
        // (the event loop polls `AgentProcess::progress` while a line waits).
        let _ready = self.poll_write_queued(&mut Context::from_waker(Waker::noop()));
        self.pipe.is_some()
    }

    fn pending(&self) -> bool {
        self.pipe.is_some() && !self.queue.is_empty()
    }

    fn poll_write_queued(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(pipe) = self.pipe.as_mut() else {
            return Poll::Ready(());
        };
        while let Some(line) = self.queue.front() {
            match Pin::new(&mut *pipe).poll_write(cx, &line[self.written..]) {
                Poll::Ready(Ok(0)) => {
                    return self.closed(io::ErrorKind::WriteZero.into());
                }
                Poll::Ready(Ok(n)) => {
                    self.written += n;
                    if self.written == line.len() {
                        self.queue.pop_front();
                        self.written = 0;
                    }
                }
                Poll::Ready(Err(e)) => return self.closed(e),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(())
    }

    fn closed(&mut self, error: io::Error) -> Poll<()> {
        tracing::warn!(%error, dropped = self.queue.len(), "cannot write to the agent's stdin");
        self.pipe = None;
        self.queue.clear();
        self.written = 0;
        Poll::Ready(())
    }
}

/// The agent's stdout and stderr, read line by line.
#[derive(Debug)]
pub struct AgentOutput {
    /// `None` once ended (or unreadable).
    stdout: Option<LineReader<ChildStdout>>,
    stderr: Option<LineReader<ChildStderr>>,
    /// The streams take turns at being read first.
    stderr_first: bool,
}

impl AgentOutput {
    /// The next complete line of either stream; `None` once both have ended.
    pub async fn next_line(&mut self) -> Option<OutputLine> {
        poll_fn(|cx| self.poll_line(cx)).await
    }

    /// A line that can be had without waiting: `Some(None)` once both streams have ended,
    /// `None` when a stream is open with no complete line in it.
    pub fn try_line(&mut self) -> Option<Option<OutputLine>> {
        match self.poll_line(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(line) => Some(line),
            Poll::Pending => None,
        }
    }

    fn poll_line(&mut self, cx: &mut Context<'_>) -> Poll<Option<OutputLine>> {
        self.stderr_first = !self.stderr_first;
        for stderr in [self.stderr_first, !self.stderr_first] {
            let line = if stderr {
                poll_stream(&mut self.stderr, cx)
            } else {
                poll_stream(&mut self.stdout, cx)
            };
            if let Poll::Ready(Some(line)) = line {
                return Poll::Ready(Some(line));
            }
        }
        if self.stdout.is_none() && self.stderr.is_none() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

/// A line of one stream; a stream that ended is dropped (`Ready(None)`).
fn poll_stream<R: AsyncRead + Unpin>(
    reader: &mut Option<LineReader<R>>,
    cx: &mut Context<'_>,
) -> Poll<Option<OutputLine>> {
    let Some(open) = reader else {
        return Poll::Ready(None);
    };
    let line = open.poll_line(cx);
    if let Poll::Ready(None) = line {
        *reader = None;
    }
    line
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

/// One output stream cut into `\n`-terminated lines (a trailing `\r` dropped). A line longer
/// than [`MAX_AGENT_LINE_BYTES`] keeps its first bytes and the rest is discarded; its full
/// length is reported. What was read of a line stays here between polls.
#[derive(Debug)]
struct LineReader<R> {
    reader: BufReader<R>,
    stream: LogStream,
    max: usize,
    line: Vec<u8>,
    /// The line's full length so far.
    total: usize,
    /// Whether any byte of the line was read (an empty last line without `\n` is no line).
    started: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    fn new(reader: R, stream: LogStream) -> LineReader<R> {
        LineReader::with_limits(reader, stream, READ_BUFFER, MAX_AGENT_LINE_BYTES)
    }

    fn with_limits(reader: R, stream: LogStream, buffer: usize, max: usize) -> LineReader<R> {
        LineReader {
            reader: BufReader::with_capacity(buffer, reader),
            stream,
            max,
            line: Vec::new(),
            total: 0,
            started: false,
        }
    }

    /// The next line; `None` at the end of the stream (or when it cannot be read).
    fn poll_line(&mut self, cx: &mut Context<'_>) -> Poll<Option<OutputLine>> {
        loop {
            let available = match Pin::new(&mut self.reader).poll_fill_buf(cx) {
                Poll::Ready(Ok(available)) => available,
                Poll::Ready(Err(e)) => {
                    tracing::warn!(stream = ?self.stream, error = %e, "cannot read the agent's output");
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            };
            if available.is_empty() {
                return Poll::Ready(self.started.then(|| self.take()));
            }
            self.started = true;
            let newline = available.iter().position(|&b| b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            let room = self.max.saturating_sub(self.line.len());
            self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            self.total += chunk.len();
            let consumed = chunk.len() + usize::from(newline.is_some());
            Pin::new(&mut self.reader).consume(consumed);
            if newline.is_some() {
                return Poll::Ready(Some(self.take()));
            }
        }
    }

    fn take(&mut self) -> OutputLine {
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        let line = OutputLine {
            stream: self.stream,
            line: String::from_utf8_lossy(&self.line).into_owned(),
            original_len: self.total,
        };
        self.line.clear();
        self.total = 0;
        self.started = false;
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines_of(input: &[u8], buffer: usize, max: usize) -> Vec<(String, usize)> {
        let mut reader = LineReader::with_limits(input, LogStream::Stdout, buffer, max);
        let mut lines = Vec::new();
        while let Some(line) = poll_fn(|cx| reader.poll_line(cx)).await {
            lines.push((line.line, line.original_len));
        }
        lines
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_the_rest_discarded() {
        let input = b"short\nthis line is long\n\nlast-no-newline";
        assert_eq!(
            lines_of(input, 4, 8).await,
            vec![
                ("short".to_owned(), 5),
                ("this lin".to_owned(), 17),
                (String::new(), 0),
                ("last-no-".to_owned(), 15),
            ]
        );
        // A carriage return before the newline is dropped; an input ending in a newline has
        // no empty line after it.
        assert_eq!(
            lines_of(b"a\r\nb\n", 64, 8).await,
            vec![("a".to_owned(), 2), ("b".to_owned(), 1)]
        );
    }

    #[tokio::test]
    async fn a_line_read_in_pieces_across_polls_is_one_line() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut reader = LineReader::with_limits(rx, LogStream::Stderr, 4, 100);
        let noop = &mut Context::from_waker(Waker::noop());
        assert!(reader.poll_line(noop).is_pending());
        tokio::io::AsyncWriteExt::write_all(&mut tx, b"hello ")
            .await
            .unwrap();
        assert!(reader.poll_line(noop).is_pending());
        tokio::io::AsyncWriteExt::write_all(&mut tx, b"world\nnext")
            .await
            .unwrap();
        let line = poll_fn(|cx| reader.poll_line(cx)).await.unwrap();
        assert_eq!(
            (line.stream, line.line.as_str()),
            (LogStream::Stderr, "hello world")
        );
        drop(tx);
        let last = poll_fn(|cx| reader.poll_line(cx)).await.unwrap();
        assert_eq!(last.line, "next");
        assert!(poll_fn(|cx| reader.poll_line(cx)).await.is_none());
    }
}
