//! Admin use cases that run outside gRPC too (CLI, bootstrap, tests): issuing API keys
//! and re-sealing tokens under the newest master key.

use secrecy::SecretString;

use crate::auth::generate_api_key;
use crate::domain::{ApiKeyRecord, ApiKeyRole, Id};
use crate::error::ServiceError;
use crate::lease::LiveConfig;

/// How often a running replica records which master keys it holds.
pub const KEYS_ANNOUNCE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// A replica heard of within this long counts as running for `rotate-keys`.
const KEYS_LIVE_WITHIN: std::time::Duration = std::time::Duration::from_secs(35);

/// Records that replica `replica_id` holds the master keys in force in `config`.
pub async fn announce_keys(config: &LiveConfig, replica_id: &str) -> Result<(), ServiceError> {
    let ring = config.ring();
    let forget_before = crate::clock::system_now_ms() - 10 * KEYS_LIVE_WITHIN.as_millis() as i64;
    config
        .store()
        .announce_keys(replica_id, &ring.key_ids(), forget_before)
        .await?;
    Ok(())
}

/// Removes the record of a replica that stops (errors are ignored: the record goes stale).
pub async fn forget_replica_keys(config: &LiveConfig, replica_id: &str) {
    let _ = config.store().forget_replica_keys(replica_id).await;
}

/// Makes sure an admin key exists; returns a new one when none did (bootstrap).
pub async fn ensure_admin_key(
    config: &LiveConfig,
    name: &str,
) -> Result<Option<SecretString>, ServiceError> {
    if config.store().count_admin_keys().await? > 0 {
        return Ok(None);
    }
    let key = issue_api_key(config, name, ApiKeyRole::Admin, vec![]).await?;
    Ok(Some(key))
}

/// Creates an API key directly in the store (CLI, bootstrap, tests).
pub async fn issue_api_key(
    config: &LiveConfig,
    name: &str,
    role: ApiKeyRole,
    tenants: Vec<Id>,
) -> Result<SecretString, ServiceError> {
    let new = generate_api_key();
    let record = ApiKeyRecord {
        id: new.id,
        display_name: name.to_owned(),
        role,
        tenant_ids: tenants,
        secret_hash: new.secret_hash,
        create_time_ms: crate::clock::system_now_ms(),
    };
    record.validate()?;
    config.store().create_api_key(record).await?;
    config.refresh().await?;
    Ok(new.full_key)
}

/// Re-seals every token not sealed under the active key; returns how many changed.
/// All or nothing: a token that does not open aborts the whole rotation.
pub async fn rotate_token_keys(config: &LiveConfig) -> Result<usize, ServiceError> {
    let ring = config.ring();
    let active = ring.active_key_id().to_owned();
    let since = crate::clock::system_now_ms() - KEYS_LIVE_WITHIN.as_millis() as i64;
    let lacking: Vec<String> = config
        .store()
        .key_holders(since)
        .await?
        .into_iter()
        .filter(|(_, keys)| !keys.contains(&active))
        .map(|(replica, _)| replica)
        .collect();
    if !lacking.is_empty() {
        return Err(ServiceError::FailedPrecondition(format!(
            "running replica(s) {} do not hold master key '{active}', so they could not open \
             tokens sealed with it: give them the key (in their key file, then SIGHUP, or in \
             their settings and restart) and run rotate-keys again",
            lacking.join(", ")
        )));
    }
    let changed = config
        .store()
        .reseal_tokens(&|record| {
            if record.key_id == active {
                return Ok(None);
            }
            let secret = ring.open(record.id.as_str(), &record.key_id, &record.sealed_secret)?;
            Ok(Some(ring.seal(record.id.as_str(), &secret)))
        })
        .await?;
    config.refresh().await?;
    Ok(changed)
}
