//! A small BaseLinker API client, for sync workers and tests: one `call` that posts
//! `method` + `parameters` to `connector.php` and sorts the answer into an [`Outcome`]
//! a caller can act on (success, token blocked until when, API error, gateway failure).
//!
//! Plain HTTP only: it talks to the emulator (`crate::emulator`). Talking to the real
//! `https://api.baselinker.com` would need a TLS connector in [`BaseLinkerClient`].
//! The token is sent in the `X-BLToken` header and never logged or put in an error.

mod local_time;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub use local_time::{BlockZone, InvalidZone, format_local_datetime, parse_local_datetime};

/// The error code BaseLinker answers when a token is over its limit.
pub const ERROR_BLOCKED_TOKEN: &str = "ERROR_BLOCKED_TOKEN";
/// What older accounts answered instead of [`ERROR_BLOCKED_TOKEN`]; treated the same.
pub const ERROR_USER_ACCOUNT_BLOCKED: &str = "ERROR_USER_ACCOUNT_BLOCKED";

/// What BaseLinker said to one call.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// `"status": "SUCCESS"`: the whole JSON answer.
    Success(serde_json::Value),
    /// The token is blocked (`ERROR_BLOCKED_TOKEN` or `ERROR_USER_ACCOUNT_BLOCKED`).
    Blocked {
        /// When the block ends, Unix ms, if the message carried a readable time.
        until_unix_ms: Option<i64>,
        /// The message as received.
        message: String,
    },
    /// Any other `"status": "ERROR"` answer.
    Error { code: String, message: String },
    /// An HTTP status other than 200 (a gateway's 502, say): nothing was answered.
    UpstreamFailure(u16),
}

/// Why a call got no answer to sort into an [`Outcome`].
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("invalid BaseLinker URL '{0}'")]
    InvalidUrl(String),
    #[error("cannot reach BaseLinker: {0}")]
    Transport(String),
    #[error("BaseLinker did not answer within {0:?}")]
    Timeout(Duration),
    #[error("BaseLinker answered HTTP 200 with a body that is not its JSON envelope: {0}")]
    InvalidBody(String),
}

/// The time in a "blocked until" message: its last 19 characters, `YYYY-MM-DD HH:MM:SS`
/// read in `zone`, as Unix ms. `None` when they are not such a time.
pub fn parse_blocked_until(message: &str, zone: &BlockZone) -> Option<i64> {
    let start = message.len().checked_sub(19)?;
    let tail = message.get(start..)?;
    parse_local_datetime(tail, zone)
}

/// A client for one BaseLinker endpoint. Cheap to clone (the connection pool is shared),
/// but bound to the tokio runtime it was first used on, like every hyper client.
#[derive(Clone, Debug)]
pub struct BaseLinkerClient {
    http: Client<HttpConnector, Full<Bytes>>,
    /// The full `…/connector.php` URL.
    endpoint: http::Uri,
    /// The zone "blocked until" times are read in.
    zone: BlockZone,
    /// How long one call may take, latency included.
    timeout: Duration,
}

impl BaseLinkerClient {
    /// A client for `base_url` (the server root, or the full `…/connector.php` URL),
    /// reading "blocked until" times in `zone`; 30 s timeout.
    pub fn new(base_url: &str, zone: BlockZone) -> Result<Self, CallError> {
        let trimmed = base_url.trim_end_matches('/');
        let full = if trimmed.ends_with(".php") {
            trimmed.to_owned()
        } else {
            format!("{trimmed}/connector.php")
        };
        let endpoint: http::Uri = full
            .parse()
            .map_err(|_| CallError::InvalidUrl(base_url.to_owned()))?;
        if endpoint.scheme_str() != Some("http") {
            return Err(CallError::InvalidUrl(base_url.to_owned()));
        }
        Ok(Self {
            http: Client::builder(TokioExecutor::new()).build_http(),
            endpoint,
            zone,
            timeout: Duration::from_secs(30),
        })
    }

    /// The same client with another per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Calls `method` with `params` (a JSON object) as `token`.
    pub async fn call(
        &self,
        token: &str,
        method: &str,
        params: &serde_json::Value,
    ) -> Result<Outcome, CallError> {
        let (status, body) = self.post(token, method, params).await?;
        if status != 200 {
            return Ok(Outcome::UpstreamFailure(status));
        }
        classify(&body, &self.zone)
    }

    /// Posts `method` with `params` as `token` and returns the HTTP status and body as
    /// they came, unsorted (for adapters that sort answers themselves).
    pub async fn post(
        &self,
        token: &str,
        method: &str,
        params: &serde_json::Value,
    ) -> Result<(u16, Bytes), CallError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("method", method)
            .append_pair("parameters", &params.to_string())
            .finish();
        let request = http::Request::post(self.endpoint.clone())
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header("X-BLToken", token)
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| CallError::Transport("the token is not a valid header value".into()))?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| CallError::Transport(e.to_string()))?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError::Transport(e.to_string()))?
                .to_bytes();
            Ok::<_, CallError>((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| CallError::Timeout(self.timeout))?
    }
}

/// Sorts an HTTP 200 body into an [`Outcome`].
fn classify(body: &[u8], zone: &BlockZone) -> Result<Outcome, CallError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| CallError::InvalidBody(e.to_string()))?;
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).unwrap_or_default();
    match text("status") {
        "SUCCESS" => Ok(Outcome::Success(value)),
        "ERROR" => {
            let (code, message) = (
                text("error_code").to_owned(),
                text("error_message").to_owned(),
            );
            if code == ERROR_BLOCKED_TOKEN || code == ERROR_USER_ACCOUNT_BLOCKED {
                let until_unix_ms = parse_blocked_until(&message, zone);
                return Ok(Outcome::Blocked {
                    until_unix_ms,
                    message,
                });
            }
            Ok(Outcome::Error { code, message })
        }
        other => Err(CallError::InvalidBody(format!("status '{other}'"))),
    }
}

/// Calls `method` once on the server at `base_url`, reading "blocked until" times in
/// the default zone (Europe/Warsaw). A fresh connection each time: for many calls build a
/// [`BaseLinkerClient`] and reuse it.
pub async fn call(
    base_url: &str,
    token: &str,
    method: &str,
    params: &serde_json::Value,
) -> Result<Outcome, CallError> {
    BaseLinkerClient::new(base_url, BlockZone::default())?
        .call(token, method, params)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `parse_blocked_until` reads the documented example at several offsets, and the
    /// emulator's own message format round-trips through it, in fixed and named zones.
    #[test]
    fn parse_blocked_until_round_trips_with_offsets() {
        let message = "Query limit exceeded, token blocked until 2022-05-03 17:15:34";
        let at_plus_two = parse_blocked_until(message, &"+02:00".parse().unwrap());
        assert_eq!(at_plus_two, Some(1_651_590_934_000));
        let at_utc = parse_blocked_until(message, &local_time::utc());
        assert_eq!(at_utc, Some(1_651_590_934_000 + 2 * 3_600_000));
        for zone in
            ["+01:00", "-03:30", "+05:45", "Europe/Warsaw"].map(|o| o.parse::<BlockZone>().unwrap())
        {
            let until = 1_700_000_123_000;
            let message = format!(
                "Query limit exceeded, token blocked until {}",
                format_local_datetime(until, &zone)
            );
            assert_eq!(parse_blocked_until(&message, &zone), Some(until));
        }
        assert_eq!(parse_blocked_until("too short", &local_time::utc()), None);
        assert_eq!(
            parse_blocked_until("Query limit exceeded", &local_time::utc()),
            None
        );
    }

    /// Answers sort into the right outcome, both block codes included.
    #[test]
    fn classifies_answers() {
        let ok = classify(br#"{"status":"SUCCESS","orders":[]}"#, &local_time::utc()).unwrap();
        assert!(matches!(ok, Outcome::Success(v) if v["orders"].is_array()));
        let old_block = classify(
            br#"{"status":"ERROR","error_code":"ERROR_USER_ACCOUNT_BLOCKED","error_message":"blocked"}"#,
            &local_time::utc(),
        )
        .unwrap();
        assert!(matches!(
            old_block,
            Outcome::Blocked {
                until_unix_ms: None,
                ..
            }
        ));
        let error = classify(
            br#"{"status":"ERROR","error_code":"ERROR_BAD_TOKEN","error_message":"Invalid user token"}"#,
            &local_time::utc(),
        )
        .unwrap();
        assert_eq!(
            error,
            Outcome::Error {
                code: "ERROR_BAD_TOKEN".into(),
                message: "Invalid user token".into()
            }
        );
        assert!(classify(b"<html>", &local_time::utc()).is_err());
        assert!(classify(br#"{"status":"MAYBE"}"#, &local_time::utc()).is_err());
    }
}
