//! The pieces of the `lease_pairs` bench: the command line, the server process, its
//! setup through the admin API, the load, the cost probes and the table.

pub mod cli;
pub mod load;
pub mod probe;
pub mod report;
pub mod server;
pub mod setup;

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
