//! [`Client::watch`]: the WatchEvents stream, resubscribed when it breaks.
//!
//! One task per watch reads the server stream and feeds a channel of 64 items; the
//! [`Watch`] is that channel's receiving end, and the task ends when the `Watch` is
//! dropped. When the stream breaks (a replica stops or dies, a transport error, the
//! server ends it), the task subscribes again — failing over between replicas, with a
//! backoff from 100 ms doubling to 5 s while none answers — and, once subscribed,
//! yields [`WatchItem::Resync`]: events may have been missed in between, so whatever
//! the caller derived from them may be stale. The server's own `Resync` (a watcher that
//! fell behind) comes out as the same item. Authentication and permission errors and
//! bad filters end the stream with the error: subscribing again would not change them.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Code, Status};

use crate::Client;
use crate::error::Error;
use crate::pb;

/// Which events to watch; empty lists mean everything the API key may see.
///
/// ```
/// use tokenlease_client::WatchFilter;
///
/// let filter = WatchFilter::default().tenant("acme").token("bl-1");
/// assert_eq!(filter.tenant_ids, ["acme"]);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchFilter {
    /// Only events about these tenants (and events about no particular tenant).
    pub tenant_ids: Vec<String>,
    /// Only events about these tokens (and events about no particular token).
    pub token_ids: Vec<String>,
}

impl WatchFilter {
    /// The same filter, also matching `tenant_id`.
    ///
    /// ```
    /// let filter = tokenlease_client::WatchFilter::default().tenant("acme");
    /// # drop(filter);
    /// ```
    pub fn tenant(mut self, tenant_id: impl Into<String>) -> Self {
        self.tenant_ids.push(tenant_id.into());
        self
    }

    /// The same filter, also matching `token_id`.
    ///
    /// ```
    /// let filter = tokenlease_client::WatchFilter::default().token("bl-1");
    /// # drop(filter);
    /// ```
    pub fn token(mut self, token_id: impl Into<String>) -> Self {
        self.token_ids.push(token_id.into());
        self
    }
}

/// One item of a [`Watch`].
///
/// ```no_run
/// use tokenlease_client::WatchItem;
///
/// # fn handle(item: WatchItem) {
/// match item {
///     WatchItem::Event(event) => println!("{:?}", event.kind),
///     WatchItem::Resync { missed } => println!("re-read state ({missed:?} events missed)"),
/// }
/// # }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum WatchItem {
    /// An event (never a `Resync` one: those come as [`WatchItem::Resync`]).
    Event(pb::Event),
    /// Events were missed: re-read whatever state you keep. `missed` is the server's
    /// count when it dropped events for a slow watcher; `None` after the client
    /// subscribed again (a stream broke, the count is unknown).
    Resync {
        /// How many events were dropped, when known.
        missed: Option<u64>,
    },
}

/// A stream of [`WatchItem`]s that subscribes again by itself; see [`Client::watch`].
///
/// ```no_run
/// use tokenlease_client::{WatchFilter, WatchItem};
///
/// # async fn run(client: tokenlease_client::Client) {
/// let mut watch = client.watch(WatchFilter::default());
/// while let Some(item) = watch.next().await {
///     match item {
///         Ok(WatchItem::Event(event)) => println!("{event:?}"),
///         Ok(WatchItem::Resync { .. }) => println!("re-read the state"),
///         Err(error) => { eprintln!("{error}"); break }
///     }
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Watch {
    items: mpsc::Receiver<Result<WatchItem, Error>>,
}

impl Watch {
    /// The next item; `None` after an error that ended the stream.
    ///
    /// ```no_run
    /// # async fn run(mut watch: tokenlease_client::Watch) {
    /// if let Some(Ok(item)) = watch.next().await {
    ///     println!("{item:?}");
    /// }
    /// # }
    /// ```
    pub async fn next(&mut self) -> Option<Result<WatchItem, Error>> {
        self.items.recv().await
    }
}

impl Stream for Watch {
    type Item = Result<WatchItem, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.items.poll_recv(cx)
    }
}

impl Client {
    /// Watches events matching `filter`, subscribing again whenever the stream breaks
    /// and yielding [`WatchItem::Resync`] then. Must be called inside a Tokio runtime
    /// (the stream is fed by a task).
    ///
    /// ```no_run
    /// use tokio_stream::StreamExt;
    /// use tokenlease_client::WatchFilter;
    ///
    /// # async fn run(client: tokenlease_client::Client) {
    /// let mut watch = client.watch(WatchFilter::default().tenant("acme"));
    /// while let Some(item) = watch.next().await {
    ///     println!("{item:?}");
    /// }
    /// # }
    /// ```
    pub fn watch(&self, filter: WatchFilter) -> Watch {
        let (sender, items) = mpsc::channel(64);
        tokio::spawn(feed(self.clone(), filter, sender));
        Watch { items }
    }
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Subscribes, forwards, subscribes again; ends when the receiver is gone or on an
/// error that subscribing again would not change.
async fn feed(client: Client, filter: WatchFilter, sender: mpsc::Sender<Result<WatchItem, Error>>) {
    let mut backoff = FIRST_BACKOFF;
    let mut first = true;
    loop {
        let subscribed = tokio::select! {
            () = sender.closed() => return,
            subscribed = subscribe(&client, &filter) => subscribed,
        };
        let mut stream = match subscribed {
            Ok(stream) => stream,
            Err(Error::Unavailable { .. }) => {
                tokio::select! {
                    () = sender.closed() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            Err(error) => {
                let _ = sender.send(Err(error)).await;
                return;
            }
        };
        backoff = FIRST_BACKOFF;
        if !first
            && sender
                .send(Ok(WatchItem::Resync { missed: None }))
                .await
                .is_err()
        {
            return;
        }
        first = false;
        loop {
            let message = tokio::select! {
                () = sender.closed() => return,
                message = stream.message() => message,
            };
            match message {
                Ok(Some(message)) => {
                    let Some(event) = message.event else { continue };
                    let item = match event.kind {
                        Some(pb::event::Kind::Resync(resync)) => WatchItem::Resync {
                            missed: Some(resync.missed),
                        },
                        _ => WatchItem::Event(event),
                    };
                    if sender.send(Ok(item)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(status) if ends_the_watch(&status) => {
                    let _ = sender.send(Err(Error::Status(status))).await;
                    return;
                }
                Err(status) => {
                    tracing::debug!(code = ?status.code(), message = status.message(), "event stream broke, subscribing again");
                    break;
                }
            }
        }
    }
}

async fn subscribe(
    client: &Client,
    filter: &WatchFilter,
) -> Result<tonic::Streaming<pb::WatchEventsResponse>, Error> {
    let answer = client
        .with_failover(|mut stub| {
            let request = client.request(pb::WatchEventsRequest {
                tenant_ids: filter.tenant_ids.clone(),
                token_ids: filter.token_ids.clone(),
            });
            async move { stub.watch_events(request).await }
        })
        .await;
    match answer {
        Ok(response) => Ok(response.into_inner()),
        // Too many streams on a replica for now: wait and try again, like unavailable.
        Err(Error::Status(status)) if status.code() == Code::ResourceExhausted => {
            Err(Error::Unavailable {
                message: status.message().to_owned(),
                retry_after: crate::client::retry_info(&status),
            })
        }
        Err(other) => Err(other),
    }
}

/// Errors that subscribing again would not change.
fn ends_the_watch(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument | Code::NotFound
    )
}
