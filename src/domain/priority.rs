//! Request priority and the request kinds it is derived from (seed §5 `calculatePriority`).

/// Waiting requests are served in this order; `Critical` first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    Critical,
    High,
    Normal,
    Low,
}

/// What an upstream call is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    Unspecified,
    OrderStatus,
    Payment,
    Shipment,
    CustomerFacing,
    OrderSync,
    Inventory,
    Analytics,
    Background,
}

impl RequestKind {
    /// The seed's mapping: order status and payment are critical; shipment and
    /// customer-facing are high; analytics and background are low; the rest normal.
    pub fn default_priority(self) -> Priority {
        match self {
            Self::OrderStatus | Self::Payment => Priority::Critical,
            Self::Shipment | Self::CustomerFacing => Priority::High,
            Self::Analytics | Self::Background => Priority::Low,
            Self::Unspecified | Self::OrderSync | Self::Inventory => Priority::Normal,
        }
    }
}

impl Priority {
    /// An explicit priority wins; otherwise the request kind decides.
    pub fn resolve(explicit: Option<Priority>, kind: RequestKind) -> Priority {
        explicit.unwrap_or_else(|| kind.default_priority())
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Priority::resolve(Some(Priority::Low), RequestKind::Payment),
            Priority::Low
        );
    }
}
