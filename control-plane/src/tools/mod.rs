//! Tools executed against the project workspace (SPEC §7a): `fs.read_file`, `fs.write_file`,
//! `fs.list_dir` and `fs.search`.
//!
//! Every path an agent gives is relative to the workspace root and confined to it: absolute
//! paths, `..` above the root and symlinks that lead out (anywhere along the path) are refused
//! with `outside_workspace`. See [`confine`] for how.

mod args;
mod cached;
mod confine;
mod fs;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use actors::model::RunId;
use actors::tools::{codes, ReadyResult, ToolFailure, ToolHost};

use self::args::Args;
use self::fs::Matcher;

pub const READ_FILE: &str = "fs.read_file";
pub const WRITE_FILE: &str = "fs.write_file";
pub const LIST_DIR: &str = "fs.list_dir";
pub const SEARCH: &str = "fs.search";

/// Names of every tool [`WorkspaceTools`] serves.
pub const TOOLS: [&str; 4] = [READ_FILE, WRITE_FILE, LIST_DIR, SEARCH];

/// Why the tools could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ToolsError {
    #[error("cannot open workspace {}: {source}", path.display())]
    Workspace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workspace {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
}

/// Size limits of tool results, chosen so a result fits one protocol frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolLimits {
    /// Largest file `fs.read_file` returns (`too_large` above).
    pub max_read_bytes: u64,
    /// Largest `content` `fs.write_file` accepts (`too_large` above).
    pub max_write_bytes: usize,
    /// Entries `fs.list_dir` returns before it answers `truncated: true`.
    pub max_list_entries: usize,
    /// Matches `fs.search` returns before it answers `truncated: true`.
    pub max_search_matches: usize,
    /// Files larger than this are skipped by `fs.search`.
    pub max_search_file_bytes: u64,
    /// A matching line's `text` is cut after this many characters.
    pub max_match_text_chars: usize,
}

impl Default for ToolLimits {
    fn default() -> Self {
        let frame = agent_shim::protocol::MAX_FRAME_BYTES;
        ToolLimits {
            // JSON escaping can grow text; half a frame leaves room for it.
            max_read_bytes: (frame / 2) as u64,
            max_write_bytes: frame,
            max_list_entries: 5_000,
            max_search_matches: 1_000,
            max_search_file_bytes: 8 * 1024 * 1024,
            max_match_text_chars: 500,
        }
    }
}

/// The [`ToolHost`] of the control plane: file tools confined to one workspace directory.
#[derive(Debug, Clone)]
pub struct WorkspaceTools {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// `root` held open for reads that need not wait (see [`cached`]).
    root_dir: Option<cached::RootDir>,
    limits: ToolLimits,
}

impl WorkspaceTools {
    /// Tools over the directory `root` (canonicalized), with default limits.
    pub fn new(root: PathBuf) -> Result<Self, ToolsError> {
        WorkspaceTools::with_limits(root, ToolLimits::default())
    }

    pub fn with_limits(root: PathBuf, limits: ToolLimits) -> Result<Self, ToolsError> {
        let canonical = root
            .canonicalize()
            .map_err(|source| ToolsError::Workspace {
                path: root.clone(),
                source,
            })?;
        if !canonical.is_dir() {
            return Err(ToolsError::NotADirectory { path: root });
        }
        Ok(WorkspaceTools {
            inner: Arc::new(Inner {
                root_dir: cached::RootDir::open(&canonical),
                root: canonical,
                limits,
            }),
        })
    }

    /// The canonical workspace root.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    pub fn limits(&self) -> &ToolLimits {
        &self.inner.limits
    }

    /// Runs `op` on a blocking thread.
    async fn blocking<F>(&self, op: F) -> Result<Value, ToolFailure>
    where
        F: FnOnce(&Path, &ToolLimits) -> Result<Value, ToolFailure> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || op(&inner.root, &inner.limits))
            .await
            .map_err(|err| ToolFailure::new(codes::IO_ERROR, format!("tool task failed: {err}")))?
    }
}

#[async_trait]
impl ToolHost for WorkspaceTools {
    async fn call(&self, run_id: RunId, tool: &str, args: Value) -> Result<Value, ToolFailure> {
        tracing::debug!(run_id = %run_id, tool, "tool call");
        match tool {
            READ_FILE => {
                // The kept text read back; should that fail, the read below words why.
                let ready = self.call_now(run_id, READ_FILE, &args);
                if let Some(value) = ready.and_then(|ready| serde_json::from_str(&ready.json).ok())
                {
                    return Ok(value);
                }
                let mut args = Args::new(READ_FILE, args, &["path"])?;
                let path = non_empty_path(&mut args)?;
                self.blocking(move |root, limits| fs::read_file(root, limits, &path))
                    .await
            }
            WRITE_FILE => {
                let mut args = Args::new(WRITE_FILE, args, &["path", "content"])?;
                let path = non_empty_path(&mut args)?;
                let content = args.required_str("content")?;
                self.blocking(move |root, limits| fs::write_file(root, limits, &path, &content))
                    .await
            }
            LIST_DIR => {
                let mut args = Args::new(LIST_DIR, args, &["path"])?;
                let path = args
                    .optional_str("path")?
                    .unwrap_or_else(|| ".".to_string());
                self.blocking(move |root, limits| fs::list_dir(root, limits, &path))
                    .await
            }
            SEARCH => {
                let mut args = Args::new(SEARCH, args, &["pattern", "path", "regex"])?;
                let pattern = args.required_str("pattern")?;
                let path = args
                    .optional_str("path")?
                    .unwrap_or_else(|| ".".to_string());
                let regex = args.optional_bool("regex")?.unwrap_or(false);
                let matcher = Matcher::new(pattern, regex)
                    .map_err(|problem| args.invalid("pattern", &problem))?;
                self.blocking(move |root, limits| fs::search(root, limits, &path, &matcher))
                    .await
            }
            other => Err(ToolFailure::new(
                codes::UNKNOWN_TOOL,
                format!("unknown tool `{other}` (available: {})", TOOLS.join(", ")),
            )),
        }
    }

    fn call_now(&self, _run_id: RunId, tool: &str, args: &Value) -> Option<ReadyResult> {
        // Only a well-formed `fs.read_file` (one non-empty string `path`); anything else, errors
        // included, takes `call`, which words them.
        if tool != READ_FILE {
            return None;
        }
        let fields = args.as_object().filter(|fields| fields.len() == 1)?;
        let path = fields
            .get("path")?
            .as_str()
            .filter(|path| !path.is_empty())?;
        cached::read_file(self.inner.root_dir.as_ref()?, &self.inner.limits, path)
    }

    fn tools(&self) -> Vec<&'static str> {
        TOOLS.to_vec()
    }
}

fn non_empty_path(args: &mut Args) -> Result<String, ToolFailure> {
    let path = args.required_str("path")?;
    if path.is_empty() {
        return Err(args.invalid("path", "must not be empty"));
    }
    Ok(path)
}

#[cfg(test)]
mod tests;
