//! Tokens and request errors: where the token may travel, and BaseLinker's error codes.

use serde_json::Value;

use super::{error_code, manual_config, raw_post, start};
use crate::baselinker::{CallError, Outcome};

/// The token works in the `X-BLToken` header and in the deprecated `token` form field,
/// and the header wins when both are given.
#[tokio::test]
async fn header_and_form_token_both_work() {
    let (config, _clock) = manual_config(100, 60_000);
    let emulator = start(config.with_tokens(["1-23-ABC"])).await;
    let method = ("method", "getOrderStatusList");
    let by_header = raw_post(&emulator, Some("1-23-ABC"), &[method]).await;
    let by_field = raw_post(&emulator, None, &[method, ("token", "1-23-ABC")]).await;
    for (status, body) in [by_header, by_field] {
        assert_eq!(status, 200);
        let value: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["status"], "SUCCESS", "{value}");
    }
    let both = raw_post(&emulator, Some("wrong"), &[method, ("token", "1-23-ABC")]).await;
    assert_eq!(error_code(&both), "ERROR_BAD_TOKEN");
    assert_eq!(emulator.stats("1-23-ABC").accepted, 2);
}

/// A missing or empty token gets ERROR_EMPTY_TOKEN, an unknown one ERROR_BAD_TOKEN
/// (until `add_token` accepts it); neither is counted against any token.
#[tokio::test]
async fn empty_and_unknown_tokens_are_refused() {
    let (config, _clock) = manual_config(100, 60_000);
    let emulator = start(config.with_tokens(["known"])).await;
    let method = ("method", "getJournalList");
    let missing = raw_post(&emulator, None, &[method]).await;
    assert_eq!(error_code(&missing), "ERROR_EMPTY_TOKEN");
    assert!(missing.1.contains("No user token provided."));
    let empty = raw_post(&emulator, Some(""), &[method, ("token", "")]).await;
    assert_eq!(error_code(&empty), "ERROR_EMPTY_TOKEN");
    let unknown = emulator
        .client()
        .call("stranger", "getJournalList", &Value::Null)
        .await;
    assert_eq!(
        unknown.unwrap(),
        Outcome::Error {
            code: "ERROR_BAD_TOKEN".into(),
            message: "Invalid user token".into()
        }
    );
    emulator.add_token("stranger");
    let welcome = emulator
        .client()
        .call("stranger", "getJournalList", &Value::Null)
        .await;
    assert!(matches!(welcome.unwrap(), Outcome::Success(_)));
    let stats = emulator.all_stats();
    assert_eq!(stats.keys().collect::<Vec<_>>(), ["stranger"]);
}

/// An unknown method gets ERROR_UNKNOWN_METHOD and unparseable `parameters` get
/// ERROR_PARSE_JSON_PARAMETERS, both HTTP 200 and both counted toward the limit.
#[tokio::test]
async fn unknown_method_and_bad_json_get_their_codes() {
    let (config, _clock) = manual_config(100, 60_000);
    let emulator = start(config).await;
    let unknown = raw_post(&emulator, Some("t"), &[("method", "getEverything")]).await;
    assert_eq!(error_code(&unknown), "ERROR_UNKNOWN_METHOD");
    let bad_json = raw_post(
        &emulator,
        Some("t"),
        &[
            ("method", "getOrders"),
            ("parameters", "{\"date_confirmed_from\":"),
        ],
    )
    .await;
    assert_eq!(error_code(&bad_json), "ERROR_PARSE_JSON_PARAMETERS");
    let not_object = raw_post(
        &emulator,
        Some("t"),
        &[("method", "getOrders"), ("parameters", "42")],
    )
    .await;
    assert_eq!(error_code(&not_object), "ERROR_PARSE_JSON_PARAMETERS");
    assert_eq!(emulator.stats("t").accepted, 3);
}

/// After `stop`, the port no longer answers: the client reports a transport error.
#[tokio::test]
async fn stop_closes_the_port() {
    let (config, _clock) = manual_config(100, 60_000);
    let emulator = start(config).await;
    let client = emulator.client();
    emulator.stop().await;
    let after = client.call("t", "getJournalList", &Value::Null).await;
    assert!(matches!(after, Err(CallError::Transport(_))), "{after:?}");
}
