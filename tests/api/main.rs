//! End-to-end tests over real gRPC: admin, auth, leasing, faults (Redis, Postgres, a
//! dying replica), Redis Cluster, reflection.
//! One binary (faster to link); each module says what it proves.

mod access_classes;
mod admin;
mod auth;
mod breaker;
mod capacity;
mod client;
mod cluster;
mod cost_report;
mod data_dir;
mod faults;
mod field_masks;
mod fixtures;
mod forecast_gauge;
mod fuzz;
mod helpers;
mod hostile;
mod late_release;
mod lease;
mod lifecycle;
mod observe;
mod otlp_export;
mod pg_faults;
mod pool_spaces;
mod rebalance;
mod reflection;
mod replicas;
mod signals;
mod throwaway;
mod tls;
mod usage;
mod usage_history;
