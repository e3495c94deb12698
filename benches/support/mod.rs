//! The pieces of the `lease_pairs` bench: the command line, where the counters live
//! (one Redis, a throwaway cluster or the server's memory), the server process, its
//! setup through the admin API, the load, the cost probes and the table.

pub mod backend;
pub mod cli;
pub mod load;
pub mod probe;
pub mod report;
pub mod server;
pub mod setup;

// The tests' throwaway three-master cluster, shared rather than copied (the counters'
// unit tests and the API tests use the same file); the bench only starts one, reads
// its slot map and drops it.
#[allow(dead_code)]
#[path = "../../src/store/counters/tests/throwaway_cluster.rs"]
pub mod throwaway_cluster;

use tonic::Request;
use tonic::metadata::{Ascii, MetadataValue};

/// `Bearer <key>` as gRPC metadata, parsed once and cloned into every call.
pub fn bearer(key: &str) -> MetadataValue<Ascii> {
    format!("Bearer {key}")
        .parse()
        .expect("an API key is ASCII")
}

/// `message` with the authorization metadata.
pub fn authed<T>(message: T, auth: &MetadataValue<Ascii>) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", auth.clone());
    request
}
