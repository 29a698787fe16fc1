//! Fetching, verifying and unpacking the agent bundle (a gzip-compressed tar).

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::config::RunToken;
use crate::protocol::BundleInfo;

/// Name of the downloaded archive inside the work dir, removed after unpacking.
const ARCHIVE_NAME: &str = ".codebolt-bundle.tar.gz";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("bundle download refused with http {status}: the run token was not accepted")]
    Unauthorized { status: u16 },
    #[error("bundle download failed with http {status}")]
    Status { status: u16 },
    #[error("bundle download failed: {source}")]
    Download {
        #[source]
        source: reqwest::Error,
    },
    #[error("bundle size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("bundle sha256 mismatch: expected {expected}, got {actual}")]
    ShaMismatch { expected: String, actual: String },
    #[error("bundle entry {path:?} is unsafe (absolute or contains '..'); refusing to unpack")]
    UnsafeEntry { path: PathBuf },
    #[error("bundle io error at {path:?}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bundle unpacking was interrupted")]
    Interrupted,
}

impl BundleError {
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, BundleError::Unauthorized { .. })
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Downloads the bundle with the run token, checks its size and digest, and unpacks it into `dir`.
pub async fn fetch_and_unpack(
    bundle: &BundleInfo,
    token: &RunToken,
    dir: &Path,
) -> Result<(), BundleError> {
    tokio::fs::create_dir_all(dir).await.map_err(io_at(dir))?;
    let archive = dir.join(ARCHIVE_NAME);
    let result = download(bundle, token, &archive).await;
    let result = match result {
        Ok(()) => {
            let (archive2, dir2) = (archive.clone(), dir.to_owned());
            tokio::task::spawn_blocking(move || unpack(&archive2, &dir2))
                .await
                .unwrap_or(Err(BundleError::Interrupted))
        }
        Err(e) => Err(e),
    };
    if let Err(e) = tokio::fs::remove_file(&archive).await {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %archive.display(), error = %e, "could not remove the bundle archive");
        }
    }
    result
}

async fn download(bundle: &BundleInfo, token: &RunToken, to: &Path) -> Result<(), BundleError> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|source| BundleError::Download { source })?;
    let response = client
        .get(&bundle.url)
        .bearer_auth(token.expose())
        .send()
        .await
        .map_err(|source| BundleError::Download { source })?;
    let status = response.status();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Err(BundleError::Unauthorized {
            status: status.as_u16(),
        });
    }
    if !status.is_success() {
        return Err(BundleError::Status {
            status: status.as_u16(),
        });
    }
    let mut file = tokio::fs::File::create(to).await.map_err(io_at(to))?;
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|source| BundleError::Download { source })?;
        received += chunk.len() as u64;
        if received > bundle.size {
            return Err(BundleError::SizeMismatch {
                expected: bundle.size,
                actual: received,
            });
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(io_at(to))?;
    }
    file.flush().await.map_err(io_at(to))?;
    if received != bundle.size {
        return Err(BundleError::SizeMismatch {
            expected: bundle.size,
            actual: received,
        });
    }
    let actual = hex::encode(hasher.finalize());
    if !actual.eq_ignore_ascii_case(bundle.sha256.trim()) {
        return Err(BundleError::ShaMismatch {
            expected: bundle.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

/// True if the path stays inside the destination: relative and without `..`.
pub fn is_safe_entry_path(path: &Path) -> bool {
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Unpacks a `.tar.gz` into `dir`, refusing entries that would land outside it.
pub fn unpack(archive: &Path, dir: &Path) -> Result<(), BundleError> {
    let file = std::fs::File::open(archive).map_err(io_at(archive))?;
    let decoder = flate2::read::GzDecoder::new(io::BufReader::new(file));
    let mut tar = tar::Archive::new(decoder);
    tar.set_preserve_permissions(true);
    let entries = tar.entries().map_err(io_at(archive))?;
    for entry in entries {
        let mut entry = entry.map_err(io_at(archive))?;
        let path = entry.path().map_err(io_at(archive))?.into_owned();
        if !is_safe_entry_path(&path) {
            return Err(BundleError::UnsafeEntry { path });
        }
        let unpacked = entry.unpack_in(dir).map_err(io_at(&dir.join(&path)))?;
        if !unpacked {
            return Err(BundleError::UnsafeEntry { path });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_are_checked() {
        assert!(is_safe_entry_path(Path::new("agent.sh")));
        assert!(is_safe_entry_path(Path::new("./lib/x.js")));
        assert!(!is_safe_entry_path(Path::new("/etc/passwd")));
        assert!(!is_safe_entry_path(Path::new("lib/../../x")));
        assert!(!is_safe_entry_path(Path::new("..")));
    }

    fn archive_with(path: &str, data: &[u8]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o755);
        // set_path refuses `..`, so write the raw name as a malicious archive would.
        let name = &mut header.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_cksum();
        builder.append(&header, data).unwrap();
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn unpack_writes_files_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.tar.gz");
        std::fs::write(&archive, archive_with("run.sh", b"echo hi\n")).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        unpack(&archive, &out).unwrap();
        assert_eq!(std::fs::read(out.join("run.sh")).unwrap(), b"echo hi\n");

        std::fs::write(&archive, archive_with("../evil.sh", b"x")).unwrap();
        let err = unpack(&archive, &out).unwrap_err();
        assert!(matches!(err, BundleError::UnsafeEntry { .. }), "{err}");
        assert!(!dir.path().join("evil.sh").exists());
    }
}
