//! How AdminService reaches the configuration database when it may be away.
//!
//! Every call is bounded by `database_timeout_ms` (default 1 s), so an admin call never
//! waits for the pool's connection timeout:
//! - a **write** that cannot finish in time fails UNAVAILABLE, saying what still works;
//! - a **read** that cannot is answered from the configuration this replica loaded
//!   last (the one leasing uses), and the response says so in its metadata:
//!   `tokenlease-served-from: loaded-configuration` and `tokenlease-config-version: N`.
//!
//! Other errors (NOT_FOUND, ALREADY_EXISTS, …) pass through unchanged.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Response;

use crate::error::{BACKEND_RETRY_AFTER, ServiceError};
use crate::lease::{LiveConfig, Snapshot};
use crate::store::{Kind, StoreError};

/// Response metadata set on a read answered from the loaded configuration.
pub const SERVED_FROM: &str = "tokenlease-served-from";
/// Its value.
pub const LOADED_CONFIGURATION: &str = "loaded-configuration";
/// The version of the configuration such a read was answered from.
pub const CONFIG_VERSION: &str = "tokenlease-config-version";

/// A read's value, and where it came from.
pub struct Read<T> {
    pub value: T,
    /// `Some(version)` when answered from the loaded configuration.
    pub loaded_version: Option<i64>,
}

impl<T> Read<T> {
    /// The response to send, marked when it came from the loaded configuration.
    pub fn respond<R>(self, reply: impl FnOnce(T) -> R) -> Response<R> {
        mark(Response::new(reply(self.value)), self.loaded_version)
    }
}

impl<T> Read<Vec<T>> {
    /// The response to a page of a list read with one row more than `limit` (to know
    /// whether another page follows): `reply` gets the page's rows and the next page
    /// token (the last row's id, or empty on the last page).
    pub fn respond_page<R>(
        self,
        limit: u32,
        id_of: impl Fn(&T) -> String,
        reply: impl FnOnce(&[T], String) -> R,
    ) -> Response<R> {
        let mut rows = self.value;
        let next_page_token = if rows.len() > limit as usize {
            rows.truncate(limit as usize);
            rows.last().map(id_of).unwrap_or_default()
        } else {
            String::new()
        };
        mark(
            Response::new(reply(&rows, next_page_token)),
            self.loaded_version,
        )
    }
}

/// Marks `response` as answered from the loaded configuration of `loaded_version`.
fn mark<R>(mut response: Response<R>, loaded_version: Option<i64>) -> Response<R> {
    if let Some(version) = loaded_version {
        let metadata = response.metadata_mut();
        metadata.insert(SERVED_FROM, LOADED_CONFIGURATION.parse().expect("ASCII"));
        metadata.insert(CONFIG_VERSION, version.into());
    }
    response
}

/// Runs one admin write (or the reads it needs first) before `deadline`.
pub async fn write_by<T>(
    deadline: Instant,
    write: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, ServiceError> {
    match tokio::time::timeout_at(deadline, write).await {
        Ok(result) => result.map_err(ServiceError::from),
        Err(_) => Err(ServiceError::Unavailable {
            message: "the configuration database did not answer in time, so the write may or \
                      may not have been made (read it back once the database is back); leasing \
                      goes on with the configuration loaded last, and admin reads are answered \
                      from it"
                .into(),
            retry_after: BACKEND_RETRY_AFTER,
        }),
    }
}

/// Runs one admin read within `timeout`; when the database is away, answers it with
/// `loaded` from the configuration in force instead.
pub async fn read<T>(
    timeout: Duration,
    live: &LiveConfig,
    stored: impl Future<Output = Result<T, StoreError>>,
    loaded: impl FnOnce(&Snapshot) -> Result<T, StoreError>,
) -> Result<Read<T>, ServiceError> {
    match tokio::time::timeout(timeout, stored).await {
        Ok(Ok(value)) => {
            return Ok(Read {
                value,
                loaded_version: None,
            });
        }
        Ok(Err(StoreError::Unavailable(error))) => {
            tracing::debug!(%error, "admin read answered from the loaded configuration");
        }
        Ok(Err(other)) => return Err(other.into()),
        Err(_) => tracing::debug!("admin read answered from the loaded configuration (timeout)"),
    }
    let snapshot = live.current();
    Ok(Read {
        value: loaded(&snapshot)?,
        loaded_version: Some(snapshot.version),
    })
}

/// One object of the loaded configuration, or NOT_FOUND as the store says it.
pub fn loaded_one<T: Clone>(found: Option<&T>, kind: Kind, id: &str) -> Result<T, StoreError> {
    found.cloned().ok_or_else(|| StoreError::NotFound {
        kind,
        id: id.to_owned(),
        field: format!("{}.id", kind.field_prefix()),
    })
}

/// A page of the loaded configuration as the store pages: ids after `after`, in byte
/// order, at most `limit`.
pub fn loaded_page<K: AsRef<str>, T: Clone>(
    items: &HashMap<K, T>,
    after: Option<&str>,
    limit: u32,
) -> Vec<T> {
    loaded_page_of(items, after, limit, T::clone)
}

/// [`loaded_page`] of the objects a map shares (`Arc`), copied out.
pub fn loaded_shared_page<K: AsRef<str>, T: Clone>(
    items: &HashMap<K, std::sync::Arc<T>>,
    after: Option<&str>,
    limit: u32,
) -> Vec<T> {
    loaded_page_of(items, after, limit, |item| T::clone(item))
}

fn loaded_page_of<K: AsRef<str>, V, T>(
    items: &HashMap<K, V>,
    after: Option<&str>,
    limit: u32,
    copy: impl Fn(&V) -> T,
) -> Vec<T> {
    let mut page: Vec<(&str, &V)> = items
        .iter()
        .map(|(id, item)| (id.as_ref(), item))
        .filter(|(id, _)| after.is_none_or(|after| *id > after))
        .collect();
    page.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    page.into_iter()
        .take(limit as usize)
        .map(|(_, item)| copy(item))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_like_the_store_in_byte_order() {
        let items: HashMap<String, u32> = [("b", 2), ("a-b", 1), ("ab", 3), ("c", 4)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(loaded_page(&items, None, 10), vec![1, 3, 2, 4]);
        assert_eq!(loaded_page(&items, Some("ab"), 2), vec![2, 4]);
        assert_eq!(loaded_page(&items, Some("c"), 2), Vec::<u32>::new());
    }

    #[test]
    fn a_missing_object_is_not_found_naming_the_field() {
        let err = loaded_one::<u32>(None, Kind::ApiKey, "k1").unwrap_err();
        assert_eq!(err.to_string(), "api_key.id: api key 'k1' does not exist");
    }
}
