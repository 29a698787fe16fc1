//! Path confinement: turning an agent-supplied path into a path inside the workspace, or a refusal.
//!
//! The path is resolved component by component the way the kernel would, following each symlink
//! on the way (the final component included) with `read_link`, and only the fully resolved path
//! is checked against the root. What comes back contains no symlinks, so opening it cannot leave
//! the workspace, short of a concurrent rename by someone with direct access to the workspace.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

use actors::tools::{codes, ToolFailure};

/// Symlinks followed in one resolution before giving up, as Linux's `MAXSYMLINKS`.
const MAX_SYMLINKS: usize = 40;

/// An agent path resolved against the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// Absolute and free of symlinks; inside the root.
    pub(crate) path: PathBuf,
    /// False when some component (and so everything after it) does not exist.
    pub(crate) exists: bool,
}

enum Step {
    Name(OsString),
    Parent,
}

/// Resolves `raw`, relative to the canonical `root`.
pub(crate) fn resolve(root: &Path, raw: &str) -> Result<Resolved, ToolFailure> {
    if raw.contains('\0') {
        return Err(ToolFailure::new(
            codes::INVALID_ARGS,
            "a path must not contain NUL bytes",
        ));
    }
    let outside = || {
        ToolFailure::new(
            codes::OUTSIDE_WORKSPACE,
            format!("path `{raw}` is outside the workspace"),
        )
    };
    let mut steps = VecDeque::new();
    let mut depth = 0usize;
    for component in Path::new(raw).components() {
        match component {
            Component::Prefix(_) | Component::RootDir => {
                return Err(ToolFailure::new(
                    codes::OUTSIDE_WORKSPACE,
                    format!(
                        "path `{raw}` is outside the workspace: paths are relative to the workspace root"
                    ),
                ))
            }
            Component::CurDir => {}
            Component::ParentDir => {
                depth = depth.checked_sub(1).ok_or_else(outside)?;
                steps.push_back(Step::Parent);
            }
            Component::Normal(name) => {
                depth += 1;
                steps.push_back(Step::Name(name.to_os_string()));
            }
        }
    }

    let mut resolved = root.to_path_buf();
    let mut exists = true;
    let mut links = 0usize;
    while let Some(step) = steps.pop_front() {
        match step {
            Step::Parent if !exists => {
                // The kernel fails on `missing/..`; so do we.
                return Err(not_found(raw));
            }
            Step::Parent => {
                resolved.pop();
            }
            Step::Name(name) if !exists => resolved.push(name),
            Step::Name(name) => {
                let candidate = resolved.join(&name);
                match std::fs::symlink_metadata(&candidate) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        links += 1;
                        if links > MAX_SYMLINKS {
                            return Err(ToolFailure::new(
                                codes::IO_ERROR,
                                format!("path `{raw}`: too many levels of symbolic links"),
                            ));
                        }
                        let target =
                            std::fs::read_link(&candidate).map_err(|err| io_failure(raw, &err))?;
                        let mut expansion = Vec::new();
                        for component in target.components() {
                            match component {
                                Component::Prefix(_) | Component::RootDir => {
                                    resolved = PathBuf::from("/");
                                }
                                Component::CurDir => {}
                                Component::ParentDir => expansion.push(Step::Parent),
                                Component::Normal(part) => {
                                    expansion.push(Step::Name(part.to_os_string()))
                                }
                            }
                        }
                        for step in expansion.into_iter().rev() {
                            steps.push_front(step);
                        }
                    }
                    Ok(_) => resolved = candidate,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {
                        exists = false;
                        resolved = candidate;
                    }
                    Err(err) if err.kind() == io::ErrorKind::NotADirectory => {
                        return Err(not_found(raw));
                    }
                    Err(err) => return Err(io_failure(raw, &err)),
                }
            }
        }
    }
    if !resolved.starts_with(root) {
        return Err(ToolFailure::new(
            codes::OUTSIDE_WORKSPACE,
            format!("path `{raw}` is outside the workspace (it resolves through a symlink that leads out)"),
        ));
    }
    Ok(Resolved {
        path: resolved,
        exists,
    })
}

pub(crate) fn not_found(raw: &str) -> ToolFailure {
    ToolFailure::new(
        codes::NOT_FOUND,
        format!("no such file or directory: `{raw}`"),
    )
}

/// An I/O failure on `raw`; never names the absolute path on the server.
pub(crate) fn io_failure(raw: &str, err: &io::Error) -> ToolFailure {
    match err.kind() {
        io::ErrorKind::NotFound => not_found(raw),
        _ => ToolFailure::new(codes::IO_ERROR, format!("`{raw}`: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    /// `<tmp>/ws` is the workspace, `<tmp>/outside` a sibling with a secret.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let root = base.join("ws");
        let outside = base.join("outside");
        std::fs::create_dir_all(root.join("src/nested")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("src/lib.rs"), "lib").unwrap();
        std::fs::write(outside.join("secret.txt"), "secret").unwrap();
        Fixture {
            _dir: dir,
            root,
            outside,
        }
    }

    fn code(result: Result<Resolved, ToolFailure>) -> &'static str {
        match result {
            Ok(resolved) => panic!("expected a refusal, got {resolved:?}"),
            Err(failure) => failure.code,
        }
    }

    #[test]
    fn plain_relative_paths_resolve_inside() {
        let f = fixture();
        for raw in [
            "src/lib.rs",
            "./src/lib.rs",
            "src/./nested/../lib.rs",
            "src//lib.rs",
        ] {
            let resolved = resolve(&f.root, raw).unwrap();
            assert_eq!(resolved.path, f.root.join("src/lib.rs"), "{raw}");
            assert!(resolved.exists);
        }
        let resolved = resolve(&f.root, "").unwrap();
        assert_eq!(resolved.path, f.root);
        let resolved = resolve(&f.root, ".").unwrap();
        assert_eq!(resolved.path, f.root);
        let resolved = resolve(&f.root, "new/dir/file.txt").unwrap();
        assert_eq!(resolved.path, f.root.join("new/dir/file.txt"));
        assert!(!resolved.exists);
    }

    #[test]
    fn absolute_and_escaping_paths_are_refused() {
        let f = fixture();
        let secret = f.outside.join("secret.txt");
        let absolute_inside = f.root.join("src/lib.rs");
        for raw in [
            "/etc/passwd",
            secret.to_str().unwrap(),
            absolute_inside.to_str().unwrap(),
            "..",
            "../outside/secret.txt",
            "src/../../outside/secret.txt",
            "src/nested/../../../outside",
            "../ws/src/lib.rs",
        ] {
            assert_eq!(
                code(resolve(&f.root, raw)),
                codes::OUTSIDE_WORKSPACE,
                "{raw}"
            );
        }
        let failure = resolve(&f.root, "../outside/secret.txt").unwrap_err();
        assert!(
            failure.message.contains("`../outside/secret.txt`"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn symlinks_leading_out_are_refused_anywhere_on_the_path() {
        let f = fixture();
        symlink(f.outside.join("secret.txt"), f.root.join("file-link")).unwrap();
        symlink(&f.outside, f.root.join("dir-link")).unwrap();
        symlink("../../outside", f.root.join("src/relative-link")).unwrap();
        symlink(f.outside.join("missing.txt"), f.root.join("dangling-out")).unwrap();
        symlink("dir-link", f.root.join("chain")).unwrap();
        for raw in [
            "file-link",
            "dir-link",
            "dir-link/secret.txt",
            "dir-link/new.txt",
            "dir-link/new/deeper.txt",
            "src/relative-link/secret.txt",
            "dangling-out",
            "chain/secret.txt",
        ] {
            assert_eq!(
                code(resolve(&f.root, raw)),
                codes::OUTSIDE_WORKSPACE,
                "{raw}"
            );
        }
    }

    #[test]
    fn symlinks_staying_inside_are_followed() {
        let f = fixture();
        symlink("src/lib.rs", f.root.join("lib-link")).unwrap();
        symlink(f.root.join("src"), f.root.join("src-abs")).unwrap();
        symlink("nested/new.txt", f.root.join("src/dangling-in")).unwrap();
        // Out and back in again is inside.
        symlink("../ws/src", f.root.join("round-trip")).unwrap();
        assert_eq!(
            resolve(&f.root, "lib-link").unwrap().path,
            f.root.join("src/lib.rs")
        );
        assert_eq!(
            resolve(&f.root, "src-abs/lib.rs").unwrap().path,
            f.root.join("src/lib.rs")
        );
        let dangling = resolve(&f.root, "src/dangling-in").unwrap();
        assert_eq!(dangling.path, f.root.join("src/nested/new.txt"));
        assert!(!dangling.exists);
        assert_eq!(
            resolve(&f.root, "round-trip/lib.rs").unwrap().path,
            f.root.join("src/lib.rs")
        );
    }

    #[test]
    fn dotdot_after_a_symlink_follows_the_target_like_the_kernel() {
        let f = fixture();
        std::fs::create_dir_all(f.outside.join("sub")).unwrap();
        symlink(f.outside.join("sub"), f.root.join("sub-link")).unwrap();
        // The kernel resolves `sub-link/..` to `outside`, not to the workspace root.
        assert_eq!(
            code(resolve(&f.root, "sub-link/../secret.txt")),
            codes::OUTSIDE_WORKSPACE
        );
    }

    #[test]
    fn symlink_loops_end_in_an_error() {
        let f = fixture();
        symlink("loop-b", f.root.join("loop-a")).unwrap();
        symlink("loop-a", f.root.join("loop-b")).unwrap();
        assert_eq!(code(resolve(&f.root, "loop-a")), codes::IO_ERROR);
    }

    #[test]
    fn components_below_a_file_or_after_a_missing_dir_are_not_found() {
        let f = fixture();
        assert_eq!(code(resolve(&f.root, "src/lib.rs/x")), codes::NOT_FOUND);
        symlink("missing/../src", f.root.join("odd")).unwrap();
        assert_eq!(code(resolve(&f.root, "odd/lib.rs")), codes::NOT_FOUND);
        assert_eq!(code(resolve(&f.root, "a\0b")), codes::INVALID_ARGS);
    }
}
