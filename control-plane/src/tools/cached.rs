//! `fs.read_file` without leaving the calling thread, for files the kernel already holds in
//! memory.
//!
//! A tool call normally runs on the blocking pool, because a file read may wait on a disk.
//! Handing the call to that pool and back costs two thread wake-ups, most of a small read's
//! round trip. So a read is first tried with calls that cannot wait: `openat2` with
//! `RESOLVE_CACHED` (fails instead of reading directory blocks) and `RESOLVE_BENEATH` (fails on
//! any path leading out of the workspace: `..` above it, absolute paths and symlinks), then
//! `statx`, then `preadv2` with `RWF_NOWAIT` (fails instead of reading from the disk). When any
//! step would wait, or fails for any reason, the answer is `None` and the call takes the
//! blocking path, which also words every error; this path only ever answers successes.
//!
//! A file read this way is kept ([`ReadCache`]) and read again from memory while `statx` of
//! its path (one call) finds the very same file unchanged; see [`FileId`] for what that means.
//! It is kept as the result's JSON text, so the answer to a kept file is not encoded again.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{
    openat2, statx, AtFlags, FileType, Mode, OFlags, ResolveFlags, Statx, StatxFlags,
};
use rustix::io::{preadv2, ReadWriteFlags};

use actors::tools::ReadyResult;

use super::fs::file_content;
use super::ToolLimits;

/// The workspace root, held open for resolving paths beneath it, with the files read beneath it.
#[derive(Debug)]
pub(crate) struct RootDir {
    fd: OwnedFd,
    /// The root's filesystem: only files on it are kept.
    dev: (u32, u32),
    cache: ReadCache,
}

impl RootDir {
    /// `None` when the directory cannot be opened (the fast path is then never taken).
    pub(crate) fn open(root: &Path) -> Option<RootDir> {
        let fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let stat = statx(&fd, "", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS).ok()?;
        Some(RootDir {
            fd,
            dev: FileId::of(&stat).dev,
            cache: ReadCache::new(CACHE_BYTES),
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// How many reads were answered from memory.
    #[cfg(test)]
    fn cache_hits(&self) -> u64 {
        self.cache.hits.load(Ordering::Relaxed)
    }
}

/// The result of `fs.read_file` for `raw`, if it can be had without waiting.
pub(crate) fn read_file(root: &RootDir, limits: &ToolLimits, raw: &str) -> Option<ReadyResult> {
    if let Some(ready) = root.cache.get(root.fd(), raw) {
        return Some(ready);
    }
    let file = openat2(
        root.fd(),
        raw,
        // Non-blocking: opening a FIFO must not wait for a writer (it is refused below anyway).
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::CACHED | ResolveFlags::NO_MAGICLINKS,
    )
    .ok()?;
    let stat = statx(&file, "", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS).ok()?;
    if FileType::from_raw_mode(u32::from(stat.stx_mode)) != FileType::RegularFile {
        return None;
    }
    let size = stat.stx_size;
    if size > limits.max_read_bytes {
        return None;
    }
    // One byte more than the size: a file that grew since `statx` reads long and goes the slow way.
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
    let ready = ReadyResult::new(&file_content(bytes).ok()?).ok()?;
    let id = FileId::of(&stat);
    if id.dev == root.dev && id.settled(SystemTime::now()) {
        root.cache.put(raw, id, &ready);
    }
    Some(ready)
}

/// What tells a file's content unchanged: the same inode on the same device, of the same type,
/// permissions, size and modification time, and above all the same change time, which every
/// write, truncation, rename onto it, link, chmod or `utimes` moves to the current time and
/// nothing can set back.
///
/// A change time can only be trusted once the clock has moved past it by more than the
/// filesystem's timestamp granularity: a write in the same clock tick as the read would leave it
/// as it was. So only a file whose change time is [`settled`](FileId::settled) is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: (u32, u32),
    ino: u64,
    mode: u16,
    size: u64,
    mtime: (i64, u32),
    ctime: (i64, u32),
}

/// How far the clock must be past a file's change time before it is kept: a few kernel ticks
/// (timestamps come from the coarse clock, one tick of at most 10 ms)...
const SETTLED_AFTER: Duration = Duration::from_millis(50);
/// ...or, on a filesystem that keeps whole seconds only (its timestamps have no nanoseconds),
/// longer than its granularity of up to two seconds.
const SETTLED_AFTER_WHOLE_SECONDS: Duration = Duration::from_secs(3);

impl FileId {
    fn of(stat: &Statx) -> FileId {
        FileId {
            dev: (stat.stx_dev_major, stat.stx_dev_minor),
            ino: stat.stx_ino,
            mode: stat.stx_mode,
            size: stat.stx_size,
            mtime: (stat.stx_mtime.tv_sec, stat.stx_mtime.tv_nsec),
            ctime: (stat.stx_ctime.tv_sec, stat.stx_ctime.tv_nsec),
        }
    }

    /// Whether the change time is far enough behind `now` for a later change to move it.
    fn settled(&self, now: SystemTime) -> bool {
        let (secs, nanos) = self.ctime;
        let Ok(secs) = u64::try_from(secs) else {
            return false;
        };
        let changed = UNIX_EPOCH + Duration::new(secs, nanos);
        let margin = if nanos == 0 && self.mtime.1 == 0 {
            SETTLED_AFTER_WHOLE_SECONDS
        } else {
            SETTLED_AFTER
        };
        now.duration_since(changed)
            .is_ok_and(|since| since > margin)
    }
}

/// Files read beneath the root, by the path they were read by, up to a budget of bytes
/// ([`CACHE_BYTES`] per workspace). A kept file is answered again only while `statx` of the
/// same path (following symlinks, as the read did beneath the root) finds the same [`FileId`]:
/// the content served is then the content of a file that was read beneath the root and has not
/// changed since.
#[derive(Debug)]
struct ReadCache {
    files: Mutex<Files>,
    /// Most bytes of JSON text kept.
    budget: usize,
    hits: AtomicU64,
}

#[derive(Debug, Default)]
struct Files {
    by_path: HashMap<String, Kept>,
    bytes: usize,
}

#[derive(Debug)]
struct Kept {
    id: FileId,
    ready: ReadyResult,
}

/// Bytes of results' JSON text kept per workspace.
const CACHE_BYTES: usize = 8 * 1024 * 1024;

impl ReadCache {
    fn new(budget: usize) -> ReadCache {
        ReadCache {
            files: Mutex::default(),
            budget,
            hits: AtomicU64::new(0),
        }
    }

    fn files(&self) -> std::sync::MutexGuard<'_, Files> {
        // Nothing in here can be left half-changed by a panic.
        self.files
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, root: BorrowedFd<'_>, raw: &str) -> Option<ReadyResult> {
        if !self.files().by_path.contains_key(raw) {
            return None;
        }
        let now = statx(root, raw, AtFlags::STATX_DONT_SYNC, StatxFlags::BASIC_STATS)
            .ok()
            .map(|stat| FileId::of(&stat));
        let mut files = self.files();
        let kept = files.by_path.get(raw)?;
        if now == Some(kept.id) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Some(kept.ready.clone());
        }
        files.remove(raw);
        None
    }

    fn put(&self, raw: &str, id: FileId, ready: &ReadyResult) {
        let bytes = ready.json.len();
        // One file takes a quarter of the budget at most.
        if bytes > self.budget / 4 {
            return;
        }
        let mut files = self.files();
        files.remove(raw);
        while files.bytes + bytes > self.budget {
            let Some(some) = files.by_path.keys().next().cloned() else {
                break;
            };
            files.remove(&some);
        }
        files.bytes += bytes;
        files.by_path.insert(
            raw.to_owned(),
            Kept {
                id,
                ready: ready.clone(),
            },
        );
    }
}

impl Files {
    fn remove(&mut self, raw: &str) {
        if let Some(kept) = self.by_path.remove(raw) {
            self.bytes -= kept.ready.json.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

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
            let fast = read_file(&f.fd, &limits, path).map(|ready| parsed(&ready));
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

    /// Lets the clock move past the change time of a file just written.
    fn settle() {
        std::thread::sleep(SETTLED_AFTER + Duration::from_millis(20));
    }

    fn parsed(ready: &ReadyResult) -> Value {
        serde_json::from_str(&ready.json).unwrap()
    }

    fn read(f: &Fixture, path: &str) -> Option<Value> {
        read_file(&f.fd, &ToolLimits::default(), path).map(|ready| parsed(&ready))
    }

    #[test]
    fn a_settled_file_is_read_again_from_memory_until_it_changes() {
        let f = fixture();
        settle();
        assert_eq!(read(&f, "sub/a.txt"), Some(json!({ "content": "hello" })));
        assert_eq!(f.fd.cache_hits(), 0);
        assert_eq!(read(&f, "sub/a.txt"), Some(json!({ "content": "hello" })));
        assert_eq!(f.fd.cache_hits(), 1);
        // Rewritten in place with content of the same size: its change time moved.
        std::fs::write(f.root.join("sub/a.txt"), "jello").unwrap();
        assert_eq!(read(&f, "sub/a.txt"), Some(json!({ "content": "jello" })));
        assert_eq!(f.fd.cache_hits(), 1);
        // Just written: not kept until the clock has moved on.
        assert_eq!(read(&f, "sub/a.txt"), Some(json!({ "content": "jello" })));
        assert_eq!(f.fd.cache_hits(), 1);
        settle();
        assert_eq!(read(&f, "sub/a.txt"), Some(json!({ "content": "jello" })));
        assert_eq!(read(&f, "sub/a.txt"), Some(json!({ "content": "jello" })));
        assert_eq!(f.fd.cache_hits(), 2);
    }

    #[test]
    fn a_kept_file_replaced_by_another_or_by_a_way_out_is_not_answered_from_memory() {
        let f = fixture();
        settle();
        std::fs::write(f.root.join("twin"), "hello").unwrap();
        settle();
        for _ in 0..2 {
            assert_eq!(read(&f, "sub/a.txt"), Some(json!({ "content": "hello" })));
        }
        assert_eq!(f.fd.cache_hits(), 1);
        // Another file of the same content and size renamed over it.
        std::fs::rename(f.root.join("twin"), f.root.join("sub/a.txt")).unwrap();
        assert_eq!(read(&f, "sub/a.txt"), Some(json!({ "content": "hello" })));
        assert_eq!(f.fd.cache_hits(), 1);
        settle();
        for _ in 0..2 {
            assert_eq!(read(&f, "sub/a.txt"), Some(json!({ "content": "hello" })));
        }
        assert_eq!(f.fd.cache_hits(), 2);
        // Its directory replaced by a symlink leading out of the workspace to a file of the
        // same name and content: refused, as a first read would be.
        let outside = f.root.join("../elsewhere");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("a.txt"), "hello").unwrap();
        std::fs::rename(f.root.join("sub"), f.root.join("sub.old")).unwrap();
        std::os::unix::fs::symlink("../elsewhere", f.root.join("sub")).unwrap();
        settle();
        assert_eq!(read(&f, "sub/a.txt"), None);
        assert_eq!(f.fd.cache_hits(), 2);
        // Removed: nothing from memory either.
        std::fs::remove_file(f.root.join("sub")).unwrap();
        assert_eq!(read(&f, "sub/a.txt"), None);
        assert_eq!(f.fd.cache_hits(), 2);
    }

    #[test]
    fn the_content_kept_stays_within_its_budget() {
        let mut f = fixture();
        let budget = 4096;
        f.fd.cache = ReadCache::new(budget);
        let limits = ToolLimits::default();
        let size = budget / 5;
        for n in 0..8 {
            std::fs::write(f.root.join(format!("f{n}")), vec![b'a' + n; size]).unwrap();
        }
        std::fs::write(f.root.join("huge"), vec![b'h'; budget / 4 + 1]).unwrap();
        settle();
        for n in 0..8u8 {
            let value = parsed(&read_file(&f.fd, &limits, &format!("f{n}")).unwrap());
            assert_eq!(value["content"].as_str().unwrap().len(), size);
            let files = f.fd.cache.files();
            assert!(files.bytes <= budget, "{}", files.bytes);
            assert_eq!(
                files.bytes,
                files
                    .by_path
                    .values()
                    .map(|k| k.ready.json.len())
                    .sum::<usize>()
            );
            assert!(files.by_path.contains_key(&format!("f{n}")));
        }
        assert!(read_file(&f.fd, &limits, "huge").is_some());
        assert!(!f.fd.cache.files().by_path.contains_key("huge"));
    }

    #[test]
    fn only_a_change_time_the_clock_has_moved_past_counts_as_settled() {
        let changed = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let id = FileId {
            dev: (8, 1),
            ino: 7,
            mode: 0o100644,
            size: 5,
            mtime: (1_700_000_000, 5),
            ctime: (1_700_000_000, 5),
        };
        assert!(!id.settled(changed));
        assert!(!id.settled(changed + SETTLED_AFTER));
        assert!(id.settled(changed + SETTLED_AFTER + Duration::from_millis(1)));
        // In the future (the clock was set back): not settled.
        assert!(!id.settled(changed - Duration::from_secs(60)));
        // Whole seconds only: the filesystem's granularity may be two seconds.
        let coarse = FileId {
            mtime: (1_700_000_000, 0),
            ctime: (1_700_000_000, 0),
            ..id
        };
        let changed = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert!(!coarse.settled(changed + Duration::from_secs(2)));
        assert!(coarse.settled(changed + SETTLED_AFTER_WHOLE_SECONDS + Duration::from_millis(1)));
    }
}
