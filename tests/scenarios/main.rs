//! Scenario tests against the BaseLinker emulator. They measure shares, waits and
//! utilisation in real time, so `.ci/run` runs this binary on its own, one test at a
//! time (`--test-threads 1`), after the other suites: on a 2-core machine, tests running
//! beside them would change what they measure.

#[path = "../api/helpers.rs"]
#[allow(dead_code)]
mod helpers;

#[path = "../api/fixtures.rs"]
#[allow(dead_code)]
mod fixtures;

#[path = "../api/throwaway.rs"]
#[allow(dead_code)]
mod throwaway;

mod classes;
mod emulator;
mod faults;
mod guarantees;
mod health;
mod rebalance;
mod workers;
