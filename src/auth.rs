//! API keys and the identity of a caller.
//!
//! A key looks like `tl_<id>_<secret>`: `id` (16 hex digits) is stored in clear and finds
//! the row; `secret` (64 hex digits, 256 random bits) is stored only as its SHA-256. A
//! fast hash is enough because the secret is random and long: there is nothing to
//! brute-force that a slow hash would protect. Keys are checked against the in-memory
//! configuration snapshot, so authentication needs no database call per request.

use std::collections::HashSet;
use std::sync::Arc;

use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::domain::{ApiKeyRecord, ApiKeyRole, Id, InvalidField};
use crate::error::ServiceError;

/// A freshly generated key: the record to store and the secret to show once.
pub struct NewApiKey {
    pub id: String,
    pub secret_hash: Vec<u8>,
    /// The whole `tl_<id>_<secret>` string.
    pub full_key: SecretString,
}

/// Generates a random key.
pub fn generate_api_key() -> NewApiKey {
    let mut rng = rand::rng();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let id = hex::encode(id);
    let secret = hex::encode(secret);
    NewApiKey {
        secret_hash: hash_secret(&secret),
        full_key: SecretString::from(format!("tl_{id}_{secret}")),
        id,
    }
}

fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Checks an API key id from a request (`field`): 16 hex digits, as CreateApiKey
/// returned. The value is never echoed, and a whole key passed by mistake is named as
/// such: ids reach messages, logs and traces, secrets must not.
pub fn parse_api_key_id(field: &str, value: &str) -> Result<String, InvalidField> {
    if value.len() == 16 && value.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(value.to_ascii_lowercase());
    }
    let why = if value.starts_with("tl_") {
        "looks like a whole API key: pass only its id (the 16 hex digits after \"tl_\"), \
         never the secret"
    } else if value.is_empty() {
        "is required"
    } else {
        "is not an API key id (16 hex digits, as CreateApiKey returned)"
    };
    Err(InvalidField::new(field, why))
}

/// Splits `tl_<id>_<secret>` into its parts; `None` when the shape is wrong.
fn split_key(key: &str) -> Option<(&str, &str)> {
    let (id, secret) = key.strip_prefix("tl_")?.split_once('_')?;
    let hex_of = |s: &str, len| s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit());
    (hex_of(id, 16) && hex_of(secret, 64)).then_some((id, secret))
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: String,
    pub role: ApiKeyRole,
    /// The key's tenant scope, shared with the snapshot (not copied per call).
    tenants: Arc<HashSet<Id>>,
}

/// A key's tenant scope as a set; the snapshot builds it once per key
/// (`Snapshot::scope`), so a call only clones the `Arc`.
pub fn scope_of(record: &ApiKeyRecord) -> Arc<HashSet<Id>> {
    Arc::new(record.tenant_ids.iter().cloned().collect())
}

impl Caller {
    /// Finds and checks the key in `authorization: Bearer <key>`.
    /// `scope` gives the key's tenant set (the snapshot's, built once per key).
    pub fn authenticate<'a>(
        header: Option<&str>,
        lookup: impl FnOnce(&str) -> Option<&'a ApiKeyRecord>,
        scope: impl FnOnce(&ApiKeyRecord) -> Arc<HashSet<Id>>,
    ) -> Result<Caller, ServiceError> {
        let unauthenticated = |why: &str| ServiceError::Unauthenticated(why.to_owned());
        let header = header.ok_or_else(|| {
            unauthenticated("missing API key: send metadata 'authorization: Bearer <api key>'")
        })?;
        let key = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                unauthenticated("the authorization metadata must be 'Bearer <api key>'")
            })?;
        let (id, secret) = split_key(key.trim())
            .ok_or_else(|| unauthenticated("malformed API key: expected tl_<16 hex>_<64 hex>"))?;
        let record = lookup(id).ok_or_else(|| unauthenticated("unknown or revoked API key"))?;
        // Comparing digests, not secrets: timing reveals nothing usable about the secret.
        if record.secret_hash != hash_secret(secret) {
            return Err(unauthenticated("unknown or revoked API key"));
        }
        Ok(Caller {
            key_id: record.id.clone(),
            role: record.role,
            tenants: scope(record),
        })
    }

    /// The same key as it stands in `snapshot` now (an open stream re-checks its caller
    /// when the configuration changes): UNAUTHENTICATED once revoked.
    pub fn as_it_stands(&self, snapshot: &crate::lease::Snapshot) -> Result<Caller, ServiceError> {
        let record = snapshot.api_keys.get(&self.key_id).ok_or_else(|| {
            ServiceError::Unauthenticated(format!("API key '{}' was revoked", self.key_id))
        })?;
        Ok(Caller {
            key_id: record.id.clone(),
            role: record.role,
            tenants: snapshot.scope(record),
        })
    }

    /// An admin, for tests and the CLI.
    pub fn admin(key_id: &str) -> Self {
        Self {
            key_id: key_id.to_owned(),
            role: ApiKeyRole::Admin,
            tenants: Arc::default(),
        }
    }

    pub fn require_admin(&self) -> Result<(), ServiceError> {
        match self.role {
            ApiKeyRole::Admin => Ok(()),
            ApiKeyRole::Worker => Err(ServiceError::PermissionDenied(format!(
                "API key '{}' is a worker key; the admin API needs an admin key",
                self.key_id
            ))),
        }
    }

    /// Admins may act for any tenant; workers only for the tenants in their scope.
    pub fn require_tenant(&self, tenant: &Id) -> Result<(), ServiceError> {
        if self.role == ApiKeyRole::Admin || self.tenants.contains(tenant) {
            return Ok(());
        }
        Err(ServiceError::PermissionDenied(format!(
            "API key '{}' may not act for tenant '{tenant}'",
            self.key_id
        )))
    }

    /// The tenants a worker key may act for, sorted; `None` for an admin (any tenant).
    pub fn tenant_scope(&self) -> Option<Vec<Id>> {
        if self.role == ApiKeyRole::Admin {
            return None;
        }
        let mut tenants: Vec<Id> = self.tenants.iter().cloned().collect();
        tenants.sort();
        Some(tenants)
    }

    /// Whether events about `tenant` may be shown to this caller.
    pub fn may_see_tenant(&self, tenant: &Id) -> bool {
        self.role == ApiKeyRole::Admin || self.tenants.contains(tenant)
    }
}

/// Exposes the secret of a new key for the one place that shows it.
pub fn reveal(key: &SecretString) -> &str {
    key.expose_secret()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(new: &NewApiKey, role: ApiKeyRole, tenants: &[&str]) -> ApiKeyRecord {
        ApiKeyRecord {
            id: new.id.clone(),
            display_name: "t".into(),
            role,
            tenant_ids: tenants.iter().map(|t| Id::parse("t", t).unwrap()).collect(),
            secret_hash: new.secret_hash.clone(),
            create_time_ms: 0,
        }
    }

    /// A generated key authenticates; a missing, malformed, wrong or unknown key does not.
    #[test]
    fn authenticate_keys() {
        let new = generate_api_key();
        let rec = record(&new, ApiKeyRole::Worker, &["acme"]);
        let bearer = format!("Bearer {}", reveal(&new.full_key));
        let lookup = |id: &str| (id == rec.id).then_some(&rec);
        let caller = Caller::authenticate(Some(&bearer), lookup, scope_of).unwrap();
        assert_eq!(caller.role, ApiKeyRole::Worker);

        let mut wrong = bearer.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        for header in [
            None,
            Some("Basic abc"),
            Some("Bearer tl_x_y"),
            Some(wrong.as_str()),
        ] {
            let err =
                Caller::authenticate(header, |id: &str| (id == rec.id).then_some(&rec), scope_of);
            assert!(
                matches!(err, Err(ServiceError::Unauthenticated(_))),
                "{header:?}"
            );
        }
        let unknown = Caller::authenticate(Some(&bearer), |_: &str| None, scope_of);
        assert!(matches!(unknown, Err(ServiceError::Unauthenticated(_))));
        // The stored hash is not the secret.
        assert!(!reveal(&new.full_key).contains(&hex::encode(&rec.secret_hash)));
    }

    /// Worker keys are limited to their tenants and to the lease API.
    #[test]
    fn scopes() {
        let new = generate_api_key();
        let rec = record(&new, ApiKeyRole::Worker, &["acme"]);
        let bearer = format!("Bearer {}", reveal(&new.full_key));
        let caller = Caller::authenticate(Some(&bearer), |_: &str| Some(&rec), scope_of).unwrap();
        assert!(
            caller
                .require_tenant(&Id::parse("t", "acme").unwrap())
                .is_ok()
        );
        assert!(matches!(
            caller.require_tenant(&Id::parse("t", "other").unwrap()),
            Err(ServiceError::PermissionDenied(_))
        ));
        assert!(matches!(
            caller.require_admin(),
            Err(ServiceError::PermissionDenied(_))
        ));
        assert!(
            Caller::admin("a")
                .require_tenant(&Id::parse("t", "x").unwrap())
                .is_ok()
        );
    }
}
