//! `fs.read_file` without leaving the calling thread, for files the kernel already holds in
//! memory.
//!
//! A tool call normally runs on the blocking pool, because a file read may wait on a disk.
//! Handing the call to that pool and back costs two thread wake-ups, most of a small read's
//! round trip. So a read is first tried with calls that cannot wait: `openat2` with
//! `RESOLVE_CACHED` (fails instead of reading directory blocks) and `RESOLVE_BENEATH` (fails on
//! any path leading out of the workspace: `..` above it, absolute paths and symlinks), then
//! `fstat`, then `preadv2` with `RWF_NOWAIT` (fails instead of reading from the disk). When any
//! step would wait, or fails for any reason, the answer is `None` and the call takes the
//! blocking path, which also words every error; this path only ever answers successes.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{fstat, openat2, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::{preadv2, ReadWriteFlags};
use serde_json::Value;

use super::fs::file_content;
use super::ToolLimits;

/// The workspace root, held open for resolving paths beneath it.
#[derive(Debug)]
pub(crate) struct RootDir(OwnedFd);

impl RootDir {
    /// `None` when the directory cannot be opened (the fast path is then never taken).
    pub(crate) fn open(root: &Path) -> Option<RootDir> {
        rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()
        .map(RootDir)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// The result of `fs.read_file` for `raw`, if it can be had without waiting.
pub(crate) fn read_file(root: &RootDir, limits: &ToolLimits, raw: &str) -> Option<Value> {
    let file = openat2(
        root.fd(),
        raw,
        // Non-blocking: opening a FIFO must not wait for a writer (it is refused below anyway).
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::CACHED | ResolveFlags::NO_MAGICLINKS,
    )
    .ok()?;
    let stat = fstat(&file).ok()?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return None;
    }
    let size = u64::try_from(stat.st_size).ok()?;
    if size > limits.max_read_bytes {
        return None;
    }
    // One byte more than the size: a file that grew since `fstat` reads long and goes the slow way.
    let mut bytes = vec![0u8; usize::try_from(size).ok()? + 1];
    let read = preadv2(
        &file,
        &mut [std::io::IoSliceMut::new(&mut bytes)],
        0,
        ReadWriteFlags::NOWAIT,
    )
    .ok()?;
    if read as u64 != size {
        return None;
    }
    bytes.truncate(read);
    file_content(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Fixture {
        _dir: tempfile::TempDir,
        root: std::path::PathBuf,
        fd: RootDir,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap().join("ws");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.txt"), "hello").unwrap();
        std::fs::write(root.join("../secret.txt"), "outside").unwrap();
        std::fs::write(root.join("bin"), [0xff, 0xfe]).unwrap();
        std::fs::write(root.join("big"), vec![b'x'; 64]).unwrap();
        std::os::unix::fs::symlink("sub/a.txt", root.join("inside")).unwrap();
        std::os::unix::fs::symlink("../secret.txt", root.join("out")).unwrap();
        std::os::unix::fs::symlink(root.join("sub/a.txt"), root.join("absolute")).unwrap();
        let fd = RootDir::open(&root).unwrap();
        Fixture {
            _dir: dir,
            root,
            fd,
        }
    }

    #[test]
    fn a_cached_file_beneath_the_root_is_read_as_the_blocking_path_reads_it() {
        let f = fixture();
        let limits = ToolLimits::default();
        for path in ["sub/a.txt", "./sub/a.txt", "sub/../sub/a.txt", "inside"] {
            // First the blocking path: following a symlink for the first time updates its
            // access time, which `RESOLVE_CACHED` leaves to a path that may wait.
            let slow = super::super::fs::read_file(&f.root, &limits, path).unwrap();
            let fast = read_file(&f.fd, &limits, path);
            assert_eq!(fast, Some(json!({ "content": "hello" })), "{path}");
            assert_eq!(fast, Some(slow), "{path}");
        }
    }

    #[test]
    fn everything_else_is_left_to_the_blocking_path() {
        let f = fixture();
        let limits = ToolLimits {
            max_read_bytes: 32,
            ..ToolLimits::default()
        };
        for path in [
            // Leading out: `..` above the root, a symlink out, an absolute path or symlink.
            "../secret.txt",
            "sub/../../secret.txt",
            "out",
            "absolute",
            "/etc/hostname",
            // Missing, a directory, not UTF-8, larger than the limit, not a path.
            "missing.txt",
            "sub",
            "bin",
            "big",
            "",
            "a\0b",
        ] {
            assert_eq!(read_file(&f.fd, &limits, path), None, "{path}");
        }
    }
}
