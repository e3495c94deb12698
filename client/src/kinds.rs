//! What a call is for and how urgent it is: the proto's `RequestKind` and `Priority`,
//! as Rust enums.

use crate::pb;

/// What the upstream call is for. The service derives the call's priority from it when
/// none is given (order status and payment are critical; shipment and customer-facing
/// high; analytics and background low; the rest normal).
///
/// ```
/// use tokenlease_client::{Priority, RequestKind};
///
/// assert_eq!(RequestKind::Payment.default_priority(), Priority::Critical);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// Not given: normal priority unless one is set.
    Unspecified,
    /// An order status update (critical).
    OrderStatus,
    /// A payment confirmation (critical).
    Payment,
    /// Shipment tracking or package creation (high).
    Shipment,
    /// Data a customer is waiting for (high).
    CustomerFacing,
    /// Ordinary order synchronisation (normal).
    OrderSync,
    /// Stock and product synchronisation (normal).
    Inventory,
    /// Reporting and analytics (low).
    Analytics,
    /// Any background job (low).
    Background,
}

impl RequestKind {
    /// The priority the service gives this kind by default (its `priorities.<kind>`
    /// setting may differ; the client uses this only to choose a fallback's freshness).
    ///
    /// ```
    /// use tokenlease_client::{Priority, RequestKind};
    ///
    /// assert_eq!(RequestKind::Analytics.default_priority(), Priority::Low);
    /// assert_eq!(RequestKind::OrderSync.default_priority(), Priority::Normal);
    /// ```
    pub fn default_priority(self) -> Priority {
        match self {
            Self::OrderStatus | Self::Payment => Priority::Critical,
            Self::Shipment | Self::CustomerFacing => Priority::High,
            Self::Analytics | Self::Background => Priority::Low,
            Self::Unspecified | Self::OrderSync | Self::Inventory => Priority::Normal,
        }
    }

    /// Every kind, with its name in the service's settings (`priorities.<name>`).
    ///
    /// ```
    /// use tokenlease_client::RequestKind;
    ///
    /// assert!(RequestKind::ALL.contains(&(RequestKind::OrderSync, "order_sync")));
    /// ```
    pub const ALL: [(RequestKind, &'static str); 9] = [
        (Self::Unspecified, "unspecified"),
        (Self::OrderStatus, "order_status"),
        (Self::Payment, "payment"),
        (Self::Shipment, "shipment"),
        (Self::CustomerFacing, "customer_facing"),
        (Self::OrderSync, "order_sync"),
        (Self::Inventory, "inventory"),
        (Self::Analytics, "analytics"),
        (Self::Background, "background"),
    ];

    pub(crate) fn to_proto(self) -> pb::RequestKind {
        match self {
            Self::Unspecified => pb::RequestKind::Unspecified,
            Self::OrderStatus => pb::RequestKind::OrderStatus,
            Self::Payment => pb::RequestKind::Payment,
            Self::Shipment => pb::RequestKind::Shipment,
            Self::CustomerFacing => pb::RequestKind::CustomerFacing,
            Self::OrderSync => pb::RequestKind::OrderSync,
            Self::Inventory => pb::RequestKind::Inventory,
            Self::Analytics => pb::RequestKind::Analytics,
            Self::Background => pb::RequestKind::Background,
        }
    }
}

/// How urgent a call is: waiting calls are served critical first, low last.
///
/// ```
/// use tokenlease_client::Priority;
///
/// assert!(Priority::Critical < Priority::Low);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Order status changes and payment confirmations.
    Critical,
    /// Shipment tracking and customer-facing reads.
    High,
    /// Ordinary synchronisation.
    Normal,
    /// Analytics and background jobs.
    Low,
}

impl Priority {
    /// Reads a priority's name (`critical`, `high`, `normal`, `low`).
    ///
    /// ```
    /// use tokenlease_client::Priority;
    ///
    /// assert_eq!(Priority::parse("high"), Some(Priority::High));
    /// assert_eq!(Priority::parse("urgent"), None);
    /// ```
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Critical, Self::High, Self::Normal, Self::Low]
            .into_iter()
            .find(|p| p.as_str() == name)
    }

    /// The priority's name, as in the service's settings and metrics.
    ///
    /// ```
    /// use tokenlease_client::Priority;
    ///
    /// assert_eq!(Priority::Critical.as_str(), "critical");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }

    pub(crate) fn to_proto(self) -> pb::Priority {
        match self {
            Self::Critical => pb::Priority::Critical,
            Self::High => pb::Priority::High,
            Self::Normal => pb::Priority::Normal,
            Self::Low => pb::Priority::Low,
        }
    }
}
