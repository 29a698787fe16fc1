//! Run-scoped tokens (SPEC §6): 256 random bits, stored only as a SHA-256 hash, valid for one run,
//! refused once the run ends or the token's lifetime passes.

use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::model::RunId;
use crate::store::{RunStore, StoreError, TokenRecord};

/// A freshly minted token. `Debug` does not show the secret.
pub struct MintedToken {
    pub secret: String,
    pub hash: String,
}

impl std::fmt::Debug for MintedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedToken")
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

pub fn mint() -> MintedToken {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash(&secret);
    MintedToken { secret, hash }
}

pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum TokenError {
    #[error("no run token given")]
    Missing,
    #[error("run token is not valid")]
    Unknown,
    #[error("run token is not valid for run {requested}")]
    WrongRun { requested: RunId },
    #[error("run token has expired")]
    Expired,
    #[error("run {run_id} has ended; its token is no longer valid")]
    RunEnded { run_id: RunId },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Pure check of a stored token against the run it is presented for.
pub fn check(
    record: Option<&TokenRecord>,
    run_id: RunId,
    now: DateTime<Utc>,
) -> Result<(), TokenError> {
    let record = record.ok_or(TokenError::Unknown)?;
    if record.run_id != run_id {
        return Err(TokenError::WrongRun { requested: run_id });
    }
    if record.revoked {
        return Err(TokenError::RunEnded { run_id });
    }
    if record.expires_at <= now {
        return Err(TokenError::Expired);
    }
    Ok(())
}

/// Looks the token up and checks it; returns nothing on success.
pub async fn verify(store: &dyn RunStore, secret: &str, run_id: RunId) -> Result<(), TokenError> {
    if secret.is_empty() {
        return Err(TokenError::Missing);
    }
    let record = store.get_token(&hash(secret)).await?;
    check(record.as_ref(), run_id, Utc::now())
}

/// Looks up which run a token belongs to, refusing ended or expired ones.
pub async fn run_of(store: &dyn RunStore, secret: &str) -> Result<RunId, TokenError> {
    if secret.is_empty() {
        return Err(TokenError::Missing);
    }
    let record = store
        .get_token(&hash(secret))
        .await?
        .ok_or(TokenError::Unknown)?;
    check(Some(&record), record.run_id, Utc::now())?;
    Ok(record.run_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use uuid::Uuid;

    #[test]
    fn minted_tokens_are_long_unique_and_hashed() {
        let a = mint();
        let b = mint();
        assert_ne!(a.secret, b.secret);
        assert!(a.secret.len() >= 43, "256 bits in base64url");
        assert_eq!(a.hash, hash(&a.secret));
        assert!(!format!("{a:?}").contains(&a.secret));
    }

    #[test]
    fn check_refuses_other_runs_ended_and_expired() {
        let run = Uuid::new_v4();
        let now = Utc::now();
        let good = TokenRecord {
            run_id: run,
            expires_at: now + Duration::hours(1),
            revoked: false,
        };
        assert_eq!(check(Some(&good), run, now), Ok(()));
        let other = Uuid::new_v4();
        assert_eq!(
            check(Some(&good), other, now),
            Err(TokenError::WrongRun { requested: other })
        );
        let ended = TokenRecord {
            revoked: true,
            ..good.clone()
        };
        assert_eq!(
            check(Some(&ended), run, now),
            Err(TokenError::RunEnded { run_id: run })
        );
        let expired = TokenRecord {
            expires_at: now - Duration::seconds(1),
            ..good
        };
        assert_eq!(check(Some(&expired), run, now), Err(TokenError::Expired));
        assert_eq!(check(None, run, now), Err(TokenError::Unknown));
    }
}
