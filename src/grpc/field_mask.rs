//! Partial updates with `google.protobuf.FieldMask` (AIP-134) for every Update RPC.
//!
//! An Update request carries the object and an optional `update_mask`:
//! - absent, empty, or `["*"]`: the object replaces the stored one, as before masks;
//! - otherwise: the stored object is read, each named field is copied from the
//!   request's object onto it (a named field left unset in the request is cleared, as
//!   AIP-134 says), and the merged object is then parsed and validated exactly like a
//!   full update — one path into the store, so a masked write can break no rule a full
//!   one cannot.
//!
//! Paths are the resource's top-level field names in snake_case. A path that is not a
//! field, names an immutable field (`id`, an API key's `role`) or an output-only one
//! is INVALID_ARGUMENT with a BadRequest violation on `update_mask.paths[i]`. A path
//! that does not look like a field name is not echoed (a pasted secret must not come
//! back in an error).
//!
//! The read and the write are two steps: a concurrent full update of the same object
//! between them is overwritten by the merge (last writer wins, as with two full
//! updates).

use prost_types::FieldMask;

use super::pb;
use crate::domain::InvalidField;

/// What an update may do with a field of a resource.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Field {
    /// May be named in a mask.
    Mutable,
    /// Names the object or is fixed at creation: refused in a mask.
    Immutable,
    /// Computed by the service: refused in a mask.
    OutputOnly,
}

/// The fields of one resource, and how to copy one of them.
pub struct Resource<P> {
    /// The resource's field in the request (`tier`), used in error messages.
    pub name: &'static str,
    /// Every top-level field, by its proto name.
    pub fields: &'static [(&'static str, Field)],
    /// Copies the mutable field `path` from the request's object (`from`) onto the
    /// stored one (`onto`). Only called with paths of `fields` marked `Mutable`.
    pub copy: fn(onto: &mut P, from: &P, path: &str),
}

/// What an Update request asks for.
pub enum Update {
    /// Replace the whole object (no mask, an empty one, or `*`).
    Replace,
    /// Copy these fields (checked: each a mutable field, no duplicates) onto the
    /// stored object.
    Merge(Vec<String>),
}

/// The longest path echoed back in an error.
const MAX_ECHOED_PATH: usize = 64;

fn looks_like_a_field_name(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= MAX_ECHOED_PATH
        && path
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
}

impl<P> Resource<P> {
    /// Checks `mask` against the resource's fields.
    pub fn update(&self, mask: Option<FieldMask>) -> Result<Update, InvalidField> {
        let paths = mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            return Ok(Update::Replace);
        }
        if paths.iter().any(|p| p == "*") {
            if paths.len() > 1 {
                return Err(InvalidField::new(
                    "update_mask.paths",
                    "\"*\" replaces the whole object: send it alone",
                ));
            }
            return Ok(Update::Replace);
        }
        let mut checked: Vec<String> = Vec::with_capacity(paths.len());
        for (i, path) in paths.into_iter().enumerate() {
            let at = format!("update_mask.paths[{i}]");
            if !looks_like_a_field_name(&path) {
                return Err(InvalidField::new(
                    at,
                    "is not a field name (lowercase snake_case, as in the .proto file)",
                ));
            }
            match self.fields.iter().find(|(name, _)| *name == path) {
                None => return Err(InvalidField::new(at, self.unknown(&path))),
                Some((_, Field::Immutable)) => {
                    return Err(InvalidField::new(
                        at,
                        format!(
                            "'{path}' cannot be changed by an update of a {}",
                            self.name.replace('_', " ")
                        ),
                    ));
                }
                Some((_, Field::OutputOnly)) => {
                    return Err(InvalidField::new(
                        at,
                        format!("'{path}' is output only: the service computes it"),
                    ));
                }
                Some((_, Field::Mutable)) => {}
            }
            if !checked.contains(&path) {
                checked.push(path);
            }
        }
        Ok(Update::Merge(checked))
    }

    fn unknown(&self, path: &str) -> String {
        let updatable: Vec<&str> = (self.fields.iter())
            .filter(|(_, field)| *field == Field::Mutable)
            .map(|(name, _)| *name)
            .collect();
        let nested = match path.split_once('.') {
            Some(_) => " (only top-level fields can be named)",
            None => "",
        };
        format!(
            "'{path}' is not a field of {}{nested}; fields an update may name: {}",
            self.name,
            updatable.join(", ")
        )
    }

    /// The stored object with the request's `paths` copied onto it.
    pub fn merge(&self, mut stored: P, request: &P, paths: &[String]) -> P {
        for path in paths {
            (self.copy)(&mut stored, request, path);
        }
        stored
    }
}

use Field::{Immutable, Mutable, OutputOnly};

pub const UPSTREAM: Resource<pb::Upstream> = Resource {
    name: "upstream",
    fields: &[
        ("id", Immutable),
        ("display_name", Mutable),
        ("limit_per_window", Mutable),
        ("window", Mutable),
        ("safety_margin", Mutable),
        ("block_duration", Mutable),
        ("rate_limit_error_codes", Mutable),
        ("usable_per_window", OutputOnly),
        ("create_time", OutputOnly),
        ("update_time", OutputOnly),
        ("max_block", Mutable),
    ],
    copy: |onto, from, path| match path {
        "display_name" => onto.display_name.clone_from(&from.display_name),
        "limit_per_window" => onto.limit_per_window = from.limit_per_window,
        "window" => onto.window = from.window,
        "safety_margin" => onto.safety_margin = from.safety_margin,
        "block_duration" => onto.block_duration = from.block_duration,
        "rate_limit_error_codes" => {
            onto.rate_limit_error_codes
                .clone_from(&from.rate_limit_error_codes);
        }
        "max_block" => onto.max_block = from.max_block,
        other => unreachable!("not a mutable upstream field: {other}"),
    },
};

pub const TOKEN: Resource<pb::Token> = Resource {
    name: "token",
    fields: &[
        ("id", Immutable),
        ("upstream_id", Mutable),
        ("display_name", Mutable),
        ("secret", Mutable),
        ("pool_id", Mutable),
        ("dedicated_tenant_id", Mutable),
        ("disabled", Mutable),
        ("key_id", OutputOnly),
        ("monthly_cost_minor", Mutable),
        ("create_time", OutputOnly),
        ("update_time", OutputOnly),
    ],
    copy: |onto, from, path| {
        use pb::token::Owner;
        match path {
            "upstream_id" => onto.upstream_id.clone_from(&from.upstream_id),
            "display_name" => onto.display_name.clone_from(&from.display_name),
            // The stored object never carries the secret: the merged one has it only
            // when the mask names it (and an empty one is refused by the handler).
            "secret" => onto.secret.clone_from(&from.secret),
            "disabled" => onto.disabled = from.disabled,
            "monthly_cost_minor" => onto.monthly_cost_minor = from.monthly_cost_minor,
            // The owner is a oneof: naming one of its fields sets it from the request
            // when the request sets that field, and clears it otherwise (then parsing
            // says "set either pool_id or dedicated_tenant_id").
            "pool_id" => match &from.owner {
                Some(Owner::PoolId(p)) => onto.owner = Some(Owner::PoolId(p.clone())),
                _ if matches!(onto.owner, Some(Owner::PoolId(_))) => onto.owner = None,
                _ => {}
            },
            "dedicated_tenant_id" => match &from.owner {
                Some(Owner::DedicatedTenantId(t)) => {
                    onto.owner = Some(Owner::DedicatedTenantId(t.clone()));
                }
                _ if matches!(onto.owner, Some(Owner::DedicatedTenantId(_))) => onto.owner = None,
                _ => {}
            },
            other => unreachable!("not a mutable token field: {other}"),
        }
    },
};

pub const POOL: Resource<pb::Pool> = Resource {
    name: "pool",
    fields: &[
        ("id", Immutable),
        ("upstream_id", Mutable),
        ("display_name", Mutable),
        ("capacity_per_window", OutputOnly),
        ("guaranteed_per_window", OutputOnly),
        ("create_time", OutputOnly),
        ("update_time", OutputOnly),
    ],
    copy: |onto, from, path| match path {
        "upstream_id" => onto.upstream_id.clone_from(&from.upstream_id),
        "display_name" => onto.display_name.clone_from(&from.display_name),
        other => unreachable!("not a mutable pool field: {other}"),
    },
};

pub const TIER: Resource<pb::Tier> = Resource {
    name: "tier",
    fields: &[
        ("id", Immutable),
        ("display_name", Mutable),
        ("guaranteed_per_window", Mutable),
        ("burst_per_window", Mutable),
        ("shared_access", Mutable),
        ("weight", Mutable),
        ("create_time", OutputOnly),
        ("update_time", OutputOnly),
    ],
    copy: |onto, from, path| match path {
        "display_name" => onto.display_name.clone_from(&from.display_name),
        "guaranteed_per_window" => onto.guaranteed_per_window = from.guaranteed_per_window,
        "burst_per_window" => onto.burst_per_window = from.burst_per_window,
        "shared_access" => onto.shared_access = from.shared_access,
        "weight" => onto.weight = from.weight,
        other => unreachable!("not a mutable tier field: {other}"),
    },
};

pub const TENANT: Resource<pb::Tenant> = Resource {
    name: "tenant",
    fields: &[
        ("id", Immutable),
        ("display_name", Mutable),
        ("tier_id", Mutable),
        ("pool_id", Mutable),
        ("weight_override", Mutable),
        ("guaranteed_override", Mutable),
        ("burst_override", Mutable),
        ("dedicated_token_ids", OutputOnly),
        ("create_time", OutputOnly),
        ("update_time", OutputOnly),
    ],
    copy: |onto, from, path| match path {
        "display_name" => onto.display_name.clone_from(&from.display_name),
        "tier_id" => onto.tier_id.clone_from(&from.tier_id),
        "pool_id" => onto.pool_id.clone_from(&from.pool_id),
        "weight_override" => onto.weight_override = from.weight_override,
        "guaranteed_override" => onto.guaranteed_override = from.guaranteed_override,
        "burst_override" => onto.burst_override = from.burst_override,
        other => unreachable!("not a mutable tenant field: {other}"),
    },
};

pub const API_KEY: Resource<pb::ApiKey> = Resource {
    name: "api_key",
    fields: &[
        ("id", Immutable),
        ("display_name", Mutable),
        ("role", Immutable),
        ("tenant_ids", Mutable),
        ("create_time", OutputOnly),
    ],
    copy: |onto, from, path| match path {
        "display_name" => onto.display_name.clone_from(&from.display_name),
        "tenant_ids" => onto.tenant_ids.clone_from(&from.tenant_ids),
        other => unreachable!("not a mutable API key field: {other}"),
    },
};

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(paths: &[&str]) -> Option<FieldMask> {
        Some(FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        })
    }

    /// The tables list every field of the generated messages, so a field added to the
    /// proto without a line here fails (a mask naming it would be refused as unknown).
    #[test]
    fn tables_cover_every_proto_field() {
        use prost::Message;
        let descriptors = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let message = |name: &str| -> Vec<String> {
            let file = (descriptors.file.iter())
                .find(|f| f.name() == "tokenlease/v1/admin.proto")
                .expect("admin.proto");
            let m = (file.message_type.iter())
                .find(|m| m.name() == name)
                .unwrap_or_else(|| panic!("message {name}"));
            let mut fields: Vec<String> = m.field.iter().map(|f| f.name().to_owned()).collect();
            fields.sort();
            fields
        };
        let names = |fields: &[(&str, Field)]| {
            let mut names: Vec<String> = fields.iter().map(|(n, _)| n.to_string()).collect();
            names.sort();
            names
        };
        assert_eq!(names(UPSTREAM.fields), message("Upstream"));
        assert_eq!(names(TOKEN.fields), message("Token"));
        assert_eq!(names(POOL.fields), message("Pool"));
        assert_eq!(names(TIER.fields), message("Tier"));
        assert_eq!(names(TENANT.fields), message("Tenant"));
        assert_eq!(names(API_KEY.fields), message("ApiKey"));
    }

    /// No mask, an empty one and `*` keep the old full replacement.
    #[test]
    fn absent_empty_and_star_replace() {
        for m in [None, mask(&[]), mask(&["*"])] {
            assert!(matches!(TIER.update(m), Ok(Update::Replace)));
        }
        let err = TIER.update(mask(&["*", "weight"])).err().unwrap();
        assert_eq!(err.field, "update_mask.paths");
    }

    /// Unknown, immutable and output-only paths are refused, naming the path and its
    /// index; a path that is not a field name is not echoed.
    #[test]
    fn bad_paths_are_refused_with_the_path() {
        let err = TIER.update(mask(&["weight", "wieght"])).err().unwrap();
        assert_eq!(err.field, "update_mask.paths[1]");
        assert!(
            err.reason.contains("'wieght' is not a field of tier"),
            "{err:?}"
        );
        assert!(err.reason.contains("guaranteed_per_window"), "{err:?}");
        let err = TIER.update(mask(&["id"])).err().unwrap();
        assert!(err.reason.contains("'id' cannot be changed"), "{err:?}");
        let err = API_KEY.update(mask(&["role"])).err().unwrap();
        assert!(err.reason.contains("'role' cannot be changed"), "{err:?}");
        let err = TENANT.update(mask(&["create_time"])).err().unwrap();
        assert!(err.reason.contains("output only"), "{err:?}");
        let err = UPSTREAM.update(mask(&["window.seconds"])).err().unwrap();
        assert!(err.reason.contains("only top-level"), "{err:?}");
        let pasted = "1-23-ABCDEF-SECRET";
        let err = TOKEN.update(mask(&[pasted])).err().unwrap();
        assert!(!err.reason.contains(pasted) && !err.field.contains(pasted));
    }

    /// Merging copies exactly the named fields; a named field unset in the request is
    /// cleared; duplicates are harmless.
    #[test]
    fn merge_copies_only_named_fields() {
        let stored = pb::Tenant {
            id: "acme".into(),
            display_name: "Acme".into(),
            tier_id: "basic".into(),
            pool_id: "shared".into(),
            weight_override: Some(2.0),
            ..Default::default()
        };
        let request = pb::Tenant {
            id: "acme".into(),
            tier_id: "premium".into(),
            ..Default::default()
        };
        let Ok(Update::Merge(paths)) =
            TENANT.update(mask(&["tier_id", "weight_override", "tier_id"]))
        else {
            panic!("a merge")
        };
        assert_eq!(paths, ["tier_id", "weight_override"]);
        let merged = TENANT.merge(stored, &request, &paths);
        assert_eq!(merged.tier_id, "premium");
        assert_eq!(merged.weight_override, None);
        assert_eq!(
            (merged.display_name.as_str(), merged.pool_id.as_str()),
            ("Acme", "shared")
        );
    }

    /// Naming one member of the token's owner oneof moves the token when the request
    /// sets it, and clears the owner (refused later) when it does not.
    #[test]
    fn token_owner_follows_the_named_member() {
        use pb::token::Owner;
        let stored = pb::Token {
            id: "t".into(),
            owner: Some(Owner::PoolId("shared".into())),
            ..Default::default()
        };
        let to_tenant = pb::Token {
            owner: Some(Owner::DedicatedTenantId("acme".into())),
            ..Default::default()
        };
        let paths = vec!["dedicated_tenant_id".to_owned()];
        let merged = TOKEN.merge(stored.clone(), &to_tenant, &paths);
        assert_eq!(merged.owner, Some(Owner::DedicatedTenantId("acme".into())));
        let paths = vec!["pool_id".to_owned()];
        let merged = TOKEN.merge(stored, &to_tenant, &paths);
        assert_eq!(merged.owner, None);
    }
}
