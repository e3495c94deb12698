//! End-to-end tests over real gRPC: admin, auth, leasing, faults, reflection.
//! One binary (faster to link); each module says what it proves.

mod admin;
mod auth;
mod faults;
mod fixtures;
mod helpers;
mod lease;
mod observe;
mod reflection;
