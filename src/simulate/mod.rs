//! `tokenlease simulate`: capacity planning by running a scenario — tokens, pools,
//! tiers, tenants and their demand over time — through real leases of an in-process
//! service against the in-process BaseLinker emulator, at a compressed time scale.
//!
//! - `scenario`: the TOML model and its validation.
//! - `setup`: configuring the run's service through the admin gRPC API.
//! - `run`: one run (emulator + service + paced workers) and what it observed.
//! - `report`: the per-tenant table and the guarantee / share verdict.
//! - `svg`: the chart (granted rate per tenant, utilization per token), written by hand.
//! - `plan`: the fewest shared-pool tokens that meet every guarantee and the target share.
//!
//! Replicas: a scenario with `replicas = 1` (the default) runs the service on an
//! embedded SQLite store in a temporary folder with in-process counters. Several
//! replicas must share state: they need `DATABASE_URL` (Postgres) and `REDIS_URL` in
//! the environment. Each run then uses a fresh id prefix (`sim1a2b3c4d-`) for everything
//! it creates and its own Redis key prefix, so runs never collide; the configuration
//! rows it creates stay in that database — point it at a scratch database.

pub mod plan;
pub mod report;
pub mod run;
pub mod scenario;
mod setup;
pub mod svg;

pub use plan::{PlanAnswer, plan};
pub use report::{Verdict, table, verdict};
pub use run::{RunResult, SharedStore, TenantResult, TokenResult, run, run_on};
pub use scenario::Scenario;
