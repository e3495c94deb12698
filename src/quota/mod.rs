//! Quota algorithms, pure: no I/O, no clocks. `fair_share` divides a pool's capacity.

pub mod fair_share;

pub use fair_share::{Claim, allocate};
