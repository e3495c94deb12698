//! The gRPC adapter: the only place that sees generated proto types.
//!
//! - `convert`: proto ⇄ domain, with errors naming the field path;
//! - `status`: `ServiceError` → `tonic::Status` (with RetryInfo where a retry helps);
//! - `codec`: prost's codec, with unparseable requests answered INVALID_ARGUMENT;
//! - `auth`: the interceptor that turns `authorization` metadata into a `Caller`;
//! - `admin_api`, `lease_api`: the two services (`history_api`: GetUsageHistory;
//!   `cost_api`: GetCostReport; `watch`: the WatchEvents streams); `admin_store`: how admin calls reach the
//!   configuration database when it may be away;
//! - `field_mask`, `admin_update`: partial updates (`update_mask`, AIP-134) on every
//!   Update RPC.

pub mod admin_api;
pub mod admin_store;
mod admin_update;
pub mod auth;
pub mod codec;
pub mod convert;
mod cost_api;
pub mod field_mask;
mod history_api;
pub mod lease_api;
mod rebalance_api;
pub mod status;
pub mod watch;

/// Generated code for `proto/tokenlease/v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tokenlease.v1");

    /// Encoded descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tokenlease_descriptor");
}
