//! Request priority and the request kinds it is derived from (seed §5 `calculatePriority`).
//!
//! The two enums, the seed's mapping (`RequestKind::default_priority`) and their names
//! are the client crate's (`tokenlease-client`), so a worker and the service agree on
//! them by construction; the service adds the configurable mapping.

pub use tokenlease_client::{Priority, RequestKind};

/// Which priority each request kind gets when a call names none: the seed's mapping,
/// with overrides from the configuration (`priorities.<kind> = "<priority>"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorityMap {
    by_kind: std::collections::HashMap<RequestKind, Priority>,
}

impl Default for PriorityMap {
    fn default() -> Self {
        Self {
            by_kind: RequestKind::ALL
                .iter()
                .map(|(k, _)| (*k, k.default_priority()))
                .collect(),
        }
    }
}

impl PriorityMap {
    /// The seed's mapping with `overrides` (kind name → priority name) applied; an
    /// unknown name is an error naming it and what would be accepted.
    pub fn with_overrides<'a>(
        overrides: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, String> {
        let mut map = Self::default();
        for (kind_name, priority_name) in overrides {
            let kind = RequestKind::ALL
                .iter()
                .find(|(_, n)| *n == kind_name)
                .map(|(k, _)| *k)
                .ok_or_else(|| {
                    let names: Vec<&str> = RequestKind::ALL.iter().map(|(_, n)| *n).collect();
                    format!(
                        "priorities.{kind_name}: unknown request kind; use one of {}",
                        names.join(", ")
                    )
                })?;
            let priority = Priority::parse(priority_name).ok_or_else(|| {
                format!(
                    "priorities.{kind_name} = {priority_name:?}: use critical, high, normal or low"
                )
            })?;
            map.by_kind.insert(kind, priority);
        }
        Ok(map)
    }

    /// An explicit priority wins; otherwise the request kind decides.
    pub fn resolve(&self, explicit: Option<Priority>, kind: RequestKind) -> Priority {
        explicit.unwrap_or_else(|| self.by_kind.get(&kind).copied().unwrap_or(Priority::Normal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Overrides change the mapping for the kinds named only; bad names are refused.
    #[test]
    fn configurable_mapping() {
        let map = PriorityMap::with_overrides([("analytics", "normal")]).unwrap();
        assert_eq!(map.resolve(None, RequestKind::Analytics), Priority::Normal);
        assert_eq!(map.resolve(None, RequestKind::Payment), Priority::Critical);
        assert_eq!(
            map.resolve(Some(Priority::Low), RequestKind::Payment),
            Priority::Low
        );
        assert!(
            PriorityMap::with_overrides([("refunds", "high")])
                .unwrap_err()
                .contains("refunds")
        );
        assert!(
            PriorityMap::with_overrides([("payment", "urgent")])
                .unwrap_err()
                .contains("urgent")
        );
    }

    /// The seed's calculatePriority mapping, and an explicit priority overriding it.
    #[test]
    fn seed_mapping() {
        assert_eq!(RequestKind::Payment.default_priority(), Priority::Critical);
        assert_eq!(
            RequestKind::OrderStatus.default_priority(),
            Priority::Critical
        );
        assert_eq!(RequestKind::Shipment.default_priority(), Priority::High);
        assert_eq!(
            RequestKind::CustomerFacing.default_priority(),
            Priority::High
        );
        assert_eq!(RequestKind::OrderSync.default_priority(), Priority::Normal);
        assert_eq!(RequestKind::Analytics.default_priority(), Priority::Low);
        assert_eq!(RequestKind::Background.default_priority(), Priority::Low);
        assert_eq!(
            PriorityMap::default().resolve(Some(Priority::Low), RequestKind::Payment),
            Priority::Low
        );
    }
}
