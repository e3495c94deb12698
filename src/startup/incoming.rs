//! The gRPC listener's connections, with some hygiene before tonic sees them:
//! - Nagle's algorithm off: gRPC messages here are small, and Nagle meeting the peer's
//!   delayed ACK adds about 40 ms to an answer;
//! - a connection that sends nothing within `handshake_timeout` is closed: nothing is
//!   authenticated before the first request, so sockets opened and left silent (by a
//!   careless client or on purpose) would otherwise hold file descriptors for ever and,
//!   at the process's limit, lock every caller out;
//! - at most `MAX_SILENT` new connections wait for their first bytes at once; more wait
//!   in the kernel's accept queue.

use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::net::{TcpListener, TcpStream};

/// New connections that may wait for their first bytes at once.
const MAX_SILENT: usize = 1024;

/// The accepted connections of `listener` that spoke within `handshake_timeout`.
pub fn incoming<'a>(
    listener: &'a TcpListener,
    handshake_timeout: Duration,
) -> impl Stream<Item = std::io::Result<TcpStream>> + 'a {
    let accepted = futures::stream::unfold(listener, |listener| async move {
        Some((listener.accept().await.map(|(stream, _)| stream), listener))
    });
    accepted
        .map(move |accepted| async move {
            let stream = match accepted {
                Ok(stream) => stream,
                Err(error) => return Some(Err(error)),
            };
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot turn Nagle's algorithm off on a connection");
            }
            // `peek`, not `readable`: a fresh socket may report itself readable before
            // any byte arrived; peeking leaves the bytes for the handshake.
            let mut first = [0u8; 1];
            match tokio::time::timeout(handshake_timeout, stream.peek(&mut first)).await {
                Ok(Ok(_)) => Some(Ok(stream)),
                Ok(Err(_)) => None,
                Err(_) => {
                    let peer = stream.peer_addr().ok();
                    tracing::info!(
                        ?peer,
                        ?handshake_timeout,
                        "closed a connection that sent nothing"
                    );
                    None
                }
            }
        })
        .buffer_unordered(MAX_SILENT)
        .filter_map(std::future::ready)
}
