//! Token encryption: AES-256-GCM with a random 96-bit nonce per seal, the token's id as
//! associated data (a sealed secret copied onto another row does not open), and a key
//! ring so that secrets sealed under an older master key still open after rotation.
//!
//! Sealed layout: `nonce (12 bytes) || ciphertext || tag (16 bytes)`; the key id is
//! stored beside it in the row.

use std::collections::BTreeMap;
use std::fmt;

use aes_gcm::aead::{Aead, Generate, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use secrecy::{ExposeSecret, SecretString};

const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error(
        "master key '{key_id}' is not in the key ring; configure it (encryption.keys) to open tokens sealed with it"
    )]
    UnknownKey { key_id: String },
    #[error(
        "token '{token_id}' did not decrypt with master key '{key_id}': the configured key is not the one it was sealed with, or the row was altered"
    )]
    WrongKey { token_id: String, key_id: String },
    #[error("master key '{key_id}' is invalid: {reason}")]
    BadKey { key_id: String, reason: String },
    #[error("the key ring is empty; configure at least one master key")]
    EmptyRing,
}

/// One master key: 32 random bytes.
struct MasterKey {
    cipher: Aes256Gcm,
}

/// The master keys by id; `active` seals, all of them open.
pub struct KeyRing {
    keys: BTreeMap<String, MasterKey>,
    active: String,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish()
    }
}

impl KeyRing {
    /// Builds a ring from `(id, base64 of 32 bytes)` pairs; `active` names the sealing key.
    pub fn from_base64(
        keys: &BTreeMap<String, SecretString>,
        active: &str,
    ) -> Result<Self, CryptoError> {
        if keys.is_empty() {
            return Err(CryptoError::EmptyRing);
        }
        let mut ring = BTreeMap::new();
        for (key_id, encoded) in keys {
            let bad = |reason: &str| CryptoError::BadKey {
                key_id: key_id.clone(),
                reason: reason.to_owned(),
            };
            if key_id.is_empty()
                || key_id.len() > 64
                || !key_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(bad("its id must be 1 to 64 letters, digits, '-' or '_'"));
            }
            let bytes = BASE64
                .decode(encoded.expose_secret().trim())
                .map_err(|_| bad("it is not valid base64"))?;
            if bytes.len() != 32 {
                return Err(bad(
                    "it must decode to exactly 32 bytes (generate one with `tokenlease gen-master-key`)",
                ));
            }
            let key =
                Key::<Aes256Gcm>::try_from(bytes.as_slice()).map_err(|_| bad("wrong length"))?;
            ring.insert(
                key_id.clone(),
                MasterKey {
                    cipher: Aes256Gcm::new(&key),
                },
            );
        }
        if !ring.contains_key(active) {
            return Err(CryptoError::UnknownKey {
                key_id: active.to_owned(),
            });
        }
        Ok(Self {
            keys: ring,
            active: active.to_owned(),
        })
    }

    /// A new random master key, base64-encoded, for `tokenlease gen-master-key`.
    pub fn generate_key_base64() -> SecretString {
        let key = Key::<Aes256Gcm>::generate();
        SecretString::from(BASE64.encode(key.as_slice()))
    }

    /// The id of the key new seals use.
    /// The ids of every key in the ring.
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.keys().map(String::as_str).collect()
    }

    pub fn active_key_id(&self) -> &str {
        &self.active
    }

    /// Seals `secret` for the token `token_id` under the active key.
    pub fn seal(&self, token_id: &str, secret: &SecretString) -> (String, Vec<u8>) {
        let key = &self.keys[&self.active];
        let nonce = Nonce::generate();
        let payload = Payload {
            msg: secret.expose_secret().as_bytes(),
            aad: token_id.as_bytes(),
        };
        let ciphertext = key
            .cipher
            .encrypt(&nonce, payload)
            .expect("AES-GCM encryption cannot fail for inputs under 64 GiB");
        let mut sealed = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        sealed.extend_from_slice(nonce.as_slice());
        sealed.extend_from_slice(&ciphertext);
        (self.active.clone(), sealed)
    }

    /// Opens a secret sealed for `token_id` under `key_id`.
    pub fn open(
        &self,
        token_id: &str,
        key_id: &str,
        sealed: &[u8],
    ) -> Result<SecretString, CryptoError> {
        let key = self
            .keys
            .get(key_id)
            .ok_or_else(|| CryptoError::UnknownKey {
                key_id: key_id.to_owned(),
            })?;
        let wrong = || CryptoError::WrongKey {
            token_id: token_id.to_owned(),
            key_id: key_id.to_owned(),
        };
        if sealed.len() < NONCE_LEN {
            return Err(wrong());
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_from(nonce).map_err(|_| wrong())?;
        let plain = key
            .cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: ciphertext,
                    aad: token_id.as_bytes(),
                },
            )
            .map_err(|_| wrong())?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| wrong())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(keys: &[(&str, &SecretString)], active: &str) -> KeyRing {
        let map = keys
            .iter()
            .map(|(id, k)| (id.to_string(), (*k).clone()))
            .collect();
        KeyRing::from_base64(&map, active).unwrap()
    }

    /// A sealed secret opens to the same plaintext and does not contain it.
    #[test]
    fn seal_open_roundtrip() {
        let k1 = KeyRing::generate_key_base64();
        let r = ring(&[("k1", &k1)], "k1");
        let secret = SecretString::from("1-23-ABCDEF-secret");
        let (key_id, sealed) = r.seal("tok-a", &secret);
        assert_eq!(key_id, "k1");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            r.open("tok-a", "k1", &sealed).unwrap().expose_secret(),
            "1-23-ABCDEF-secret"
        );
        // Two seals of one secret differ (random nonce).
        assert_ne!(r.seal("tok-a", &secret).1, sealed);
    }

    /// The wrong master key, another row's id, or a flipped bit give WrongKey, not garbage.
    #[test]
    fn wrong_key_or_row_is_an_error() {
        let k1 = KeyRing::generate_key_base64();
        let other = KeyRing::generate_key_base64();
        let (_, sealed) = ring(&[("k1", &k1)], "k1").seal("tok-a", &SecretString::from("s3cret"));
        let impostor = ring(&[("k1", &other)], "k1");
        assert!(matches!(
            impostor.open("tok-a", "k1", &sealed),
            Err(CryptoError::WrongKey { .. })
        ));
        let r = ring(&[("k1", &k1)], "k1");
        assert!(matches!(
            r.open("tok-b", "k1", &sealed),
            Err(CryptoError::WrongKey { .. })
        ));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            r.open("tok-a", "k1", &flipped),
            Err(CryptoError::WrongKey { .. })
        ));
        assert!(matches!(
            r.open("tok-a", "k9", &sealed),
            Err(CryptoError::UnknownKey { .. })
        ));
    }

    /// After adding a new active key, old seals still open and new seals use the new key.
    #[test]
    fn rotation_keeps_old_seals_open() {
        let k1 = KeyRing::generate_key_base64();
        let k2 = KeyRing::generate_key_base64();
        let (_, old) = ring(&[("k1", &k1)], "k1").seal("t", &SecretString::from("old"));
        let rotated = ring(&[("k1", &k1), ("k2", &k2)], "k2");
        assert_eq!(
            rotated.open("t", "k1", &old).unwrap().expose_secret(),
            "old"
        );
        assert_eq!(rotated.seal("t", &SecretString::from("x")).0, "k2");
    }

    /// Bad key material is refused with the key named; Debug shows no key bytes.
    #[test]
    fn bad_keys_are_refused() {
        let mut map = BTreeMap::new();
        map.insert("k1".to_string(), SecretString::from("not base64!"));
        let err = KeyRing::from_base64(&map, "k1").unwrap_err().to_string();
        assert!(err.contains("k1") && err.contains("base64"), "{err}");
        map.insert("k1".to_string(), SecretString::from("c2hvcnQ="));
        assert!(
            KeyRing::from_base64(&map, "k1")
                .unwrap_err()
                .to_string()
                .contains("32 bytes")
        );
        let k = KeyRing::generate_key_base64();
        let r = ring(&[("k1", &k)], "k1");
        assert!(!format!("{r:?}").contains(k.expose_secret()));
        assert!(KeyRing::from_base64(&BTreeMap::new(), "k1").is_err());
    }
}
