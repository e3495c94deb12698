//! Quota algorithms, pure: no I/O, no clocks. `fair_share` divides a pool's capacity;
//! `rebalance` plans tenant moves between pools that run hot and cold, from the averages
//! `load_history` keeps.

pub mod fair_share;
pub mod load_history;
pub mod rebalance;

pub use fair_share::{Claim, allocate};
