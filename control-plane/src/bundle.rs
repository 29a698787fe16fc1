//! Agent bundles: the agent directory packed as a gzip-compressed tar.
//!
//! The archive is deterministic (entries sorted by name, owners and times zeroed), so the same
//! directory always gives the same bytes and SHA-256, and bundles can be stored by their hash.
//! Permission bits are kept, so scripts stay executable. Symlinks are kept as relative links when
//! they resolve inside the agent directory, and refused when they lead out of it.

use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};
use walkdir::WalkDir;

/// Largest total size of the files in a bundle, before compression.
pub const MAX_BUNDLE_BYTES: u64 = 64 * 1024 * 1024;

/// Why an agent directory could not be packed. Entry paths are relative to the agent directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("agent directory {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("symlink {} points outside the agent directory (to {})", path.display(), target.display())]
    SymlinkOutside { path: PathBuf, target: PathBuf },
    #[error("symlink {} points to {}, which does not exist", path.display(), target.display())]
    DanglingSymlink { path: PathBuf, target: PathBuf },
    #[error("{} is not a regular file, directory or symlink", path.display())]
    UnsupportedFileType { path: PathBuf },
    #[error("agent directory {} holds more than {limit_bytes} bytes, the bundle limit", path.display())]
    TooLarge { path: PathBuf, limit_bytes: u64 },
    #[error("cannot write the bundle archive: {source}")]
    Archive {
        #[source]
        source: io::Error,
    },
}

/// A packed agent directory.
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The gzip-compressed tar.
    pub bytes: Bytes,
    /// Hex SHA-256 of `bytes`.
    pub sha256: String,
}

impl Bundle {
    /// Packs `agent_dir` with the default size limit. Blocking: call it off the async runtime.
    pub fn build(agent_dir: &Path) -> Result<Bundle, BundleError> {
        Bundle::build_with_limit(agent_dir, MAX_BUNDLE_BYTES)
    }

    /// Packs `agent_dir`, refusing directories whose files add up to more than `limit_bytes`.
    pub fn build_with_limit(agent_dir: &Path, limit_bytes: u64) -> Result<Bundle, BundleError> {
        let root = agent_dir
            .canonicalize()
            .map_err(|source| BundleError::Read {
                path: agent_dir.to_path_buf(),
                source,
            })?;
        if !root.is_dir() {
            return Err(BundleError::NotADirectory {
                path: agent_dir.to_path_buf(),
            });
        }
        let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
        let mut total = 0u64;
        let walk = WalkDir::new(&root)
            .follow_links(false)
            .sort_by_file_name()
            .min_depth(1);
        for entry in walk {
            let entry = entry.map_err(|err| {
                let path = err
                    .path()
                    .map(|p| relative(&root, p))
                    .unwrap_or_else(|| agent_dir.to_path_buf());
                BundleError::Read {
                    path,
                    source: err.into(),
                }
            })?;
            let rel = relative(&root, entry.path());
            let read_err = |source| BundleError::Read {
                path: rel.clone(),
                source,
            };
            let file_type = entry.file_type();
            if file_type.is_dir() {
                let mode = entry
                    .metadata()
                    .map_err(|e| read_err(e.into()))?
                    .permissions()
                    .mode();
                let mut header = header(EntryType::Directory, mode, 0);
                builder
                    .append_data(&mut header, &rel, io::empty())
                    .map_err(archive)?;
            } else if file_type.is_file() {
                let mode = entry
                    .metadata()
                    .map_err(|e| read_err(e.into()))?
                    .permissions()
                    .mode();
                let data = std::fs::read(entry.path()).map_err(read_err)?;
                total = total.saturating_add(data.len() as u64);
                if total > limit_bytes {
                    return Err(BundleError::TooLarge {
                        path: agent_dir.to_path_buf(),
                        limit_bytes,
                    });
                }
                let mut header = header(EntryType::Regular, mode, data.len() as u64);
                builder
                    .append_data(&mut header, &rel, data.as_slice())
                    .map_err(archive)?;
            } else if file_type.is_symlink() {
                let link = link_target(&root, entry.path(), &rel)?;
                let mut header = header(EntryType::Symlink, 0o777, 0);
                builder
                    .append_link(&mut header, &rel, &link)
                    .map_err(archive)?;
            } else {
                return Err(BundleError::UnsupportedFileType { path: rel });
            }
        }
        let encoder = builder.into_inner().map_err(archive)?;
        let bytes = encoder.finish().map_err(archive)?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        Ok(Bundle {
            bytes: Bytes::from(bytes),
            sha256,
        })
    }

    /// Size of the archive in bytes.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("sha256", &self.sha256)
            .field("size", &self.size())
            .finish()
    }
}

fn header(entry_type: EntryType, mode: u32, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(entry_type);
    header.set_mode(mode & 0o777);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

fn archive(source: io::Error) -> BundleError {
    BundleError::Archive { source }
}

fn relative(root: &Path, path: &Path) -> PathBuf {
    path.strip_prefix(root).unwrap_or(path).to_path_buf()
}

/// The target to store for the symlink at `path`: relative, and inside the agent directory.
fn link_target(root: &Path, path: &Path, rel: &Path) -> Result<PathBuf, BundleError> {
    let target = std::fs::read_link(path).map_err(|source| BundleError::Read {
        path: rel.to_path_buf(),
        source,
    })?;
    let resolved = match path.canonicalize() {
        Ok(resolved) => resolved,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let lexical = normalize(&path.parent().unwrap_or(root).join(&target));
            return Err(if lexical.starts_with(root) {
                BundleError::DanglingSymlink {
                    path: rel.to_path_buf(),
                    target,
                }
            } else {
                BundleError::SymlinkOutside {
                    path: rel.to_path_buf(),
                    target,
                }
            });
        }
        Err(source) => {
            return Err(BundleError::Read {
                path: rel.to_path_buf(),
                source,
            })
        }
    };
    if !resolved.starts_with(root) {
        return Err(BundleError::SymlinkOutside {
            path: rel.to_path_buf(),
            target,
        });
    }
    // The walk does not follow symlinks, so the link's parent is a real directory under `root`.
    let parent = path.parent().unwrap_or(root);
    Ok(relative_path(parent, &resolved))
}

/// `path` with `.` and `..` applied lexically.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The relative path that leads from directory `from` to `to`; both absolute and symlink-free.
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component<'_>> = from.components().collect();
    let to: Vec<Component<'_>> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for component in &to[common..] {
        out.push(component);
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::symlink;

    use flate2::read::GzDecoder;

    use super::*;

    fn agent_dir() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::create_dir_all(agent.join("lib/deep")).unwrap();
        std::fs::create_dir_all(agent.join("empty")).unwrap();
        std::fs::write(agent.join("agent.yaml"), "command: ./run.sh\n").unwrap();
        std::fs::write(agent.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(agent.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::write(agent.join("lib/util.py"), "print('util')\n").unwrap();
        std::fs::write(agent.join("lib/deep/data.bin"), [0u8, 1, 2, 255]).unwrap();
        (dir, agent)
    }

    fn unpack(bundle: &Bundle) -> tempfile::TempDir {
        let out = tempfile::tempdir().unwrap();
        let mut archive = tar::Archive::new(GzDecoder::new(bundle.bytes.as_ref()));
        archive.set_preserve_permissions(true);
        archive.unpack(out.path()).unwrap();
        out
    }

    /// Relative path → (kind, mode, content or link target) for everything under `root`.
    fn snapshot(root: &Path) -> BTreeMap<String, (char, u32, Vec<u8>)> {
        WalkDir::new(root)
            .min_depth(1)
            .into_iter()
            .map(|entry| {
                let entry = entry.unwrap();
                let meta = entry.path().symlink_metadata().unwrap();
                let rel = relative(root, entry.path()).to_string_lossy().into_owned();
                let value = if meta.is_symlink() {
                    let link = std::fs::read_link(entry.path()).unwrap();
                    ('l', 0, link.to_string_lossy().as_bytes().to_vec())
                } else if meta.is_dir() {
                    ('d', meta.permissions().mode() & 0o777, Vec::new())
                } else {
                    let content = std::fs::read(entry.path()).unwrap();
                    ('f', meta.permissions().mode() & 0o777, content)
                };
                (rel, value)
            })
            .collect()
    }

    #[test]
    fn round_trip_keeps_contents_and_modes() {
        let (_dir, agent) = agent_dir();
        let bundle = Bundle::build(&agent).unwrap();
        assert_eq!(bundle.sha256, hex::encode(Sha256::digest(&bundle.bytes)));
        assert_eq!(bundle.sha256.len(), 64);
        assert_eq!(bundle.size(), bundle.bytes.len() as u64);
        let out = unpack(&bundle);
        assert_eq!(snapshot(out.path()), snapshot(&agent));
        let mode = std::fs::metadata(out.path().join("run.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o111,
            0o111,
            "run.sh lost its executable bits: {mode:o}"
        );
        let mode = std::fs::metadata(out.path().join("agent.yaml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0, "agent.yaml became executable: {mode:o}");
        assert!(out.path().join("empty").is_dir());
    }

    #[test]
    fn entries_are_relative_sorted_and_owner_free() {
        let (_dir, agent) = agent_dir();
        let bundle = Bundle::build(&agent).unwrap();
        let mut archive = tar::Archive::new(GzDecoder::new(bundle.bytes.as_ref()));
        let mut names = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let header = entry.header();
            assert_eq!(header.mtime().unwrap(), 0);
            assert_eq!((header.uid().unwrap(), header.gid().unwrap()), (0, 0));
            names.push(entry.path().unwrap().to_string_lossy().into_owned());
        }
        assert_eq!(
            names,
            [
                "agent.yaml",
                "empty",
                "lib",
                "lib/deep",
                "lib/deep/data.bin",
                "lib/util.py",
                "run.sh",
            ]
        );
    }

    #[test]
    fn same_directory_gives_same_bytes() {
        let (_dir, agent) = agent_dir();
        let first = Bundle::build(&agent).unwrap();
        // Touching a file changes its mtime but not the bundle.
        std::fs::write(agent.join("lib/util.py"), "print('util')\n").unwrap();
        let second = Bundle::build(&agent).unwrap();
        assert_eq!(first, second);
        std::fs::write(agent.join("lib/util.py"), "print('changed')\n").unwrap();
        assert_ne!(Bundle::build(&agent).unwrap().sha256, first.sha256);
    }

    #[test]
    fn symlinks_inside_are_kept_relative() {
        let (_dir, agent) = agent_dir();
        symlink("run.sh", agent.join("start")).unwrap();
        symlink(agent.join("lib"), agent.join("lib-abs")).unwrap();
        symlink("../util.py", agent.join("lib/deep/up")).unwrap();
        let out = unpack(&Bundle::build(&agent).unwrap());
        assert_eq!(
            std::fs::read_link(out.path().join("start")).unwrap(),
            Path::new("run.sh")
        );
        assert_eq!(
            std::fs::read_link(out.path().join("lib-abs")).unwrap(),
            Path::new("lib")
        );
        assert_eq!(
            std::fs::read_link(out.path().join("lib/deep/up")).unwrap(),
            Path::new("../util.py")
        );
        assert_eq!(
            std::fs::read_to_string(out.path().join("lib-abs/util.py")).unwrap(),
            "print('util')\n"
        );
    }

    #[test]
    fn symlinks_leading_out_are_refused() {
        let cases = [
            ("secret", "../../secret.txt"),
            ("etc", "/etc"),
            ("up", "../.."),
            ("gone", "../../missing-outside.txt"),
        ];
        for (name, target) in cases {
            let (dir, agent) = agent_dir();
            std::fs::write(dir.path().join("secret.txt"), "secret").unwrap();
            symlink(target, agent.join("lib").join(name)).unwrap();
            match Bundle::build(&agent) {
                Err(BundleError::SymlinkOutside { path, target: t }) => {
                    assert_eq!(path, Path::new("lib").join(name));
                    assert_eq!(t, Path::new(target));
                }
                other => panic!("{name} -> {target}: expected SymlinkOutside, got {other:?}"),
            }
        }
    }

    #[test]
    fn dangling_symlinks_are_refused() {
        let (_dir, agent) = agent_dir();
        symlink("missing.txt", agent.join("ghost")).unwrap();
        let err = Bundle::build(&agent).unwrap_err();
        assert!(
            matches!(err, BundleError::DanglingSymlink { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "symlink ghost points to missing.txt, which does not exist"
        );
    }

    #[test]
    fn size_limit_is_enforced() {
        let (_dir, agent) = agent_dir();
        // agent.yaml 17 + run.sh 19 + util.py 14 + data.bin 4 = 54 bytes.
        assert!(Bundle::build_with_limit(&agent, 54).is_ok());
        let err = Bundle::build_with_limit(&agent, 53).unwrap_err();
        assert!(
            matches!(
                err,
                BundleError::TooLarge {
                    limit_bytes: 53,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn missing_or_non_directory_agent_dirs_are_errors() {
        let (dir, agent) = agent_dir();
        let err = Bundle::build(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(err, BundleError::Read { .. }), "{err:?}");
        let err = Bundle::build(&agent.join("run.sh")).unwrap_err();
        assert!(matches!(err, BundleError::NotADirectory { .. }), "{err:?}");
    }

    #[test]
    fn special_files_are_refused() {
        let (_dir, agent) = agent_dir();
        let fifo = agent.join("pipe");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|status| status.success()) {
            eprintln!("mkfifo unavailable; skipping");
            return;
        }
        let err = Bundle::build(&agent).unwrap_err();
        assert!(
            matches!(err, BundleError::UnsupportedFileType { ref path } if path == Path::new("pipe")),
            "{err:?}"
        );
    }

    #[test]
    fn empty_directory_gives_an_empty_archive() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = Bundle::build(dir.path()).unwrap();
        let mut archive = tar::Archive::new(GzDecoder::new(bundle.bytes.as_ref()));
        assert_eq!(archive.entries().unwrap().count(), 0);
    }
}
