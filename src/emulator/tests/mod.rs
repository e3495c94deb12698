//! The emulator over real HTTP on 127.0.0.1, driven by the `baselinker` client or raw
//! form posts. Most tests move a manual clock, so 60 s windows and 10 min blocks cost
//! nothing and every boundary is exact; a few use the system clock with short windows.

mod errors;
mod faults;
mod limits;
mod orders;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use super::{Emulator, EmulatorConfig, EmulatorHandle};
use crate::baselinker::Outcome;
use crate::clock::Clock;

/// 2023-11-14 22:13:20.000 UTC, a whole minute plus 20 s.
const T0_MS: i64 = 1_700_000_000_000;

/// A config on a manual clock starting at `T0_MS`, with `limit` per `window_ms`.
fn manual_config(limit: u32, window_ms: u64) -> (EmulatorConfig, Clock) {
    let clock = Clock::manual(T0_MS);
    let config = EmulatorConfig {
        limit,
        window: std::time::Duration::from_millis(window_ms),
        clock: clock.clone(),
        ..EmulatorConfig::default()
    };
    (config, clock)
}

async fn start(config: EmulatorConfig) -> EmulatorHandle {
    Emulator::start(config).await.expect("emulator starts")
}

/// Calls `getJournalList` (cheap, always succeeds when admitted) as `token`.
async fn ping(emulator: &EmulatorHandle, token: &str) -> Outcome {
    emulator
        .client()
        .call(token, "getJournalList", &json!({}))
        .await
        .expect("the emulator answers")
}

/// Posts raw form `fields` to `connector.php`, with `X-BLToken` if given: (status, body).
async fn raw_post(
    emulator: &EmulatorHandle,
    header_token: Option<&str>,
    fields: &[(&str, &str)],
) -> (u16, String) {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    let mut request = http::Request::post(format!("{}/connector.php", emulator.url()))
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(token) = header_token {
        request = request.header("X-BLToken", token);
    }
    send(request.body(Full::new(Bytes::from(body))).unwrap()).await
}

async fn send(request: http::Request<Full<Bytes>>) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(request).await.expect("the emulator answers");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// GETs `path` on the emulator and parses the JSON body.
async fn get_json(emulator: &EmulatorHandle, path: &str) -> Value {
    let request = http::Request::get(format!("{}{path}", emulator.url()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, body) = send(request).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The error code of a raw `connector.php` answer (asserting HTTP 200 JSON).
fn error_code(answer: &(u16, String)) -> String {
    assert_eq!(answer.0, 200, "{}", answer.1);
    let value: Value = serde_json::from_str(&answer.1).unwrap();
    assert_eq!(value["status"], "ERROR", "{value}");
    value["error_code"].as_str().unwrap().to_owned()
}
