//! Identifiers chosen by admins: short, printable, safe inside Redis keys and lease ids.

use std::fmt;

use super::InvalidField;

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// An id of an upstream, token, pool, tier or tenant: 1 to 64 characters of `a-z`, `0-9`,
/// `-` and `_`, starting with a letter or digit. The restricted alphabet lets ids be
/// embedded in Redis keys and lease ids without escaping (no `{`, `}`, `.` or `:`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(String);

impl Id {
    /// Checks `value` for the field named `field` (used in the error message).
    pub fn parse(field: &str, value: &str) -> Result<Self, InvalidField> {
        if value.is_empty() {
            return Err(InvalidField::new(field, "is required"));
        }
        if value.len() > MAX_ID_LEN {
            return Err(InvalidField::new(
                field,
                format!(
                    "is {} characters long; at most {MAX_ID_LEN} are allowed",
                    value.len()
                ),
            ));
        }
        let allowed =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
        if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
            return Err(InvalidField::new(
                field,
                format!("contains {bad:?}; use lowercase letters, digits, '-' and '_'"),
            ));
        }
        if !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(InvalidField::new(
                field,
                "must start with a letter or digit",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// Parses an optional reference: empty means none.
    pub fn parse_optional(field: &str, value: &str) -> Result<Option<Self>, InvalidField> {
        if value.is_empty() {
            Ok(None)
        } else {
            Self::parse(field, value).map(Some)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For values read back from our own store, which only ever holds parsed ids.
    pub(crate) fn from_trusted(value: String) -> Self {
        Self(value)
    }
}

impl AsRef<str> for Id {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids accept the documented alphabet and reject everything else with the field named.
    #[test]
    fn id_rules() {
        assert!(Id::parse("x", "acme-1_b").is_ok());
        for bad in ["", "Acme", "a.b", "a{b}", "-a", "a b", &"a".repeat(65)] {
            let err = Id::parse("tenant.id", bad).unwrap_err();
            assert_eq!(err.field, "tenant.id", "{bad:?}");
        }
        assert!(Id::parse("x", &"a".repeat(64)).is_ok());
    }
}
