//! The `fs.*` tools as blocking functions over a canonical workspace root.

use std::io::Read;
use std::path::Path;

use regex::{Regex, RegexBuilder};
use serde_json::{json, Value};
use walkdir::WalkDir;

use actors::tools::{codes, ToolFailure};

use super::confine::{io_failure, not_found, resolve};
use super::ToolLimits;

/// Bytes inspected for a NUL to decide a file is binary, as git and grep do.
const BINARY_SNIFF_BYTES: usize = 8000;

pub(crate) fn read_file(root: &Path, limits: &ToolLimits, raw: &str) -> Result<Value, ToolFailure> {
    let target = resolve(root, raw)?;
    if !target.exists {
        return Err(not_found(raw));
    }
    let meta = std::fs::metadata(&target.path).map_err(|err| io_failure(raw, &err))?;
    if meta.is_dir() {
        return Err(ToolFailure::new(
            codes::INVALID_ARGS,
            format!("`{raw}` is a directory (use fs.list_dir)"),
        ));
    }
    if !meta.is_file() {
        // Opening a FIFO or a device could block or never end.
        return Err(ToolFailure::new(
            codes::INVALID_ARGS,
            format!("`{raw}` is not a regular file"),
        ));
    }
    let too_large = || {
        ToolFailure::new(
            codes::TOO_LARGE,
            format!(
                "`{raw}` is larger than the {} bytes fs.read_file returns",
                limits.max_read_bytes
            ),
        )
    };
    if meta.len() > limits.max_read_bytes {
        return Err(too_large());
    }
    let file = std::fs::File::open(&target.path).map_err(|err| io_failure(raw, &err))?;
    let mut bytes = Vec::new();
    file.take(limits.max_read_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|err| io_failure(raw, &err))?;
    if bytes.len() as u64 > limits.max_read_bytes {
        return Err(too_large());
    }
    file_content(bytes)
        .map_err(|_| ToolFailure::new(codes::IO_ERROR, format!("`{raw}` is not utf-8 text")))
}

/// `fs.read_file`'s result for a file's bytes; `Err` when they are not UTF-8.
pub(crate) fn file_content(bytes: Vec<u8>) -> Result<Value, std::string::FromUtf8Error> {
    let content = String::from_utf8(bytes)?;
    Ok(json!({ "content": content }))
}

pub(crate) fn write_file(
    root: &Path,
    limits: &ToolLimits,
    raw: &str,
    content: &str,
) -> Result<Value, ToolFailure> {
    if content.len() > limits.max_write_bytes {
        return Err(ToolFailure::new(
            codes::TOO_LARGE,
            format!(
                "content for `{raw}` is larger than the {} bytes fs.write_file accepts",
                limits.max_write_bytes
            ),
        ));
    }
    let target = resolve(root, raw)?;
    if target.exists {
        let meta = std::fs::metadata(&target.path).map_err(|err| io_failure(raw, &err))?;
        if meta.is_dir() {
            return Err(ToolFailure::new(
                codes::INVALID_ARGS,
                format!("`{raw}` is a directory"),
            ));
        }
        if !meta.is_file() {
            return Err(ToolFailure::new(
                codes::INVALID_ARGS,
                format!("`{raw}` is not a regular file"),
            ));
        }
    }
    if let Some(parent) = target.path.parent() {
        if !target.exists {
            std::fs::create_dir_all(parent).map_err(|err| io_failure(raw, &err))?;
        }
        // The parent was resolved free of symlinks; check again in case it changed meanwhile.
        let parent = parent.canonicalize().map_err(|err| io_failure(raw, &err))?;
        if !parent.starts_with(root) {
            return Err(ToolFailure::new(
                codes::OUTSIDE_WORKSPACE,
                format!("path `{raw}` is outside the workspace"),
            ));
        }
    }
    std::fs::write(&target.path, content).map_err(|err| io_failure(raw, &err))?;
    Ok(json!({ "bytes_written": content.len() }))
}

pub(crate) fn list_dir(root: &Path, limits: &ToolLimits, raw: &str) -> Result<Value, ToolFailure> {
    let target = resolve(root, raw)?;
    if !target.exists {
        return Err(not_found(raw));
    }
    if !target.path.is_dir() {
        return Err(ToolFailure::new(
            codes::INVALID_ARGS,
            format!("`{raw}` is not a directory"),
        ));
    }
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(&target.path).map_err(|err| io_failure(raw, &err))? {
        let entry = entry.map_err(|err| io_failure(raw, &err))?;
        let file_type = entry.file_type().map_err(|err| io_failure(raw, &err))?;
        // A symlink shows as what it points to; a dangling one as a file.
        let is_dir = if file_type.is_symlink() {
            std::fs::metadata(entry.path()).is_ok_and(|meta| meta.is_dir())
        } else {
            file_type.is_dir()
        };
        entries.push((
            entry.file_name().to_string_lossy().into_owned(),
            if is_dir { "dir" } else { "file" },
        ));
    }
    entries.sort();
    let truncated = entries.len() > limits.max_list_entries;
    entries.truncate(limits.max_list_entries);
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|(name, kind)| json!({ "name": name, "kind": kind }))
        .collect();
    Ok(json!({ "entries": entries, "truncated": truncated }))
}

/// What a search looks for in each line.
pub(crate) enum Matcher {
    Substring(String),
    Regex(Regex),
}

impl Matcher {
    pub(crate) fn new(pattern: String, regex: bool) -> Result<Matcher, String> {
        if pattern.is_empty() {
            return Err("must not be empty".to_string());
        }
        if !regex {
            return Ok(Matcher::Substring(pattern));
        }
        RegexBuilder::new(&pattern)
            .size_limit(1 << 20)
            .build()
            .map(Matcher::Regex)
            .map_err(|err| format!("is not a valid regex: {err}"))
    }

    fn is_match(&self, line: &str) -> bool {
        match self {
            Matcher::Substring(needle) => line.contains(needle.as_str()),
            Matcher::Regex(regex) => regex.is_match(line),
        }
    }
}

pub(crate) fn search(
    root: &Path,
    limits: &ToolLimits,
    raw: &str,
    matcher: &Matcher,
) -> Result<Value, ToolFailure> {
    let target = resolve(root, raw)?;
    if !target.exists {
        return Err(not_found(raw));
    }
    let mut matches = Vec::new();
    let mut truncated = false;
    // Symlinks are not followed: the walk stays on real files and directories under the target.
    let walk = WalkDir::new(&target.path)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|entry| !(entry.file_type().is_dir() && entry.file_name() == ".git"));
    'files: for entry in walk {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                tracing::debug!(error = %err, "fs.search skipped an unreadable entry");
                continue;
            }
        };
        if !entry.file_type().is_file() {
            continue;
        }
        let Some(text) = read_text(entry.path(), limits.max_search_file_bytes) else {
            continue;
        };
        let rel = relative_display(root, entry.path());
        for (index, line) in text.split('\n').enumerate() {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if !matcher.is_match(line) {
                continue;
            }
            if matches.len() == limits.max_search_matches {
                truncated = true;
                break 'files;
            }
            matches.push(json!({
                "path": rel,
                "line": index + 1,
                "text": clip(line, limits.max_match_text_chars),
            }));
        }
    }
    Ok(json!({ "matches": matches, "truncated": truncated }))
}

/// The file as text, or `None` for files that are too large, binary, not utf-8 or unreadable.
fn read_text(path: &Path, max_bytes: u64) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.len() > max_bytes {
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    let sniff = &bytes[..bytes.len().min(BINARY_SNIFF_BYTES)];
    if sniff.contains(&0) {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// `path` relative to `root`, with `/` separators.
fn relative_display(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.is_empty() {
        ".".to_string()
    } else {
        parts.join("/")
    }
}

/// At most `max_chars` characters of `line`, with `…` when cut.
fn clip(line: &str, max_chars: usize) -> String {
    match line.char_indices().nth(max_chars) {
        None => line.to_string(),
        Some((cut, _)) => format!("{}…", &line[..cut]),
    }
}
