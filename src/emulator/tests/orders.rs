//! The methods: `getOrders` paging, `setOrderStatus`, the status list and the journal.

use std::collections::HashSet;

use serde_json::{Value, json};

use super::{manual_config, start};
use crate::baselinker::Outcome;
use crate::emulator::{EmulatorHandle, ORDERS_PAGE_SIZE, ORDERS_START_UNIX};

async fn success(emulator: &EmulatorHandle, method: &str, params: Value) -> Value {
    match emulator.client().call("t", method, &params).await.unwrap() {
        Outcome::Success(value) => value,
        other => panic!("{method} failed: {other:?}"),
    }
}

/// `getOrders` returns at most 100 orders a call, and paging by "last date_confirmed
/// + 1 s" until a short page walks the whole generated set once, oldest first.
#[tokio::test]
async fn get_orders_pages_through_the_whole_set() {
    let (mut config, _clock) = manual_config(100, 60_000);
    config.order_count = 250;
    let emulator = start(config).await;
    let mut from = ORDERS_START_UNIX;
    let mut seen = Vec::new();
    let mut page_sizes = Vec::new();
    loop {
        let answer = success(&emulator, "getOrders", json!({"date_confirmed_from": from})).await;
        let orders = answer["orders"].as_array().unwrap().clone();
        page_sizes.push(orders.len());
        for order in &orders {
            seen.push((
                order["order_id"].as_i64().unwrap(),
                order["date_confirmed"].as_i64().unwrap(),
            ));
            assert!(order["products"].as_array().is_some_and(|p| !p.is_empty()));
        }
        if orders.len() < ORDERS_PAGE_SIZE {
            break;
        }
        from = seen.last().unwrap().1 + 1;
    }
    assert_eq!(page_sizes, [100, 100, 50]);
    let ids: HashSet<i64> = seen.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), 250);
    assert!(
        seen.windows(2).all(|w| w[0].1 < w[1].1),
        "sorted by date_confirmed"
    );
    let later = success(
        &emulator,
        "getOrders",
        json!({"date_confirmed_from": "4102444800"}),
    )
    .await;
    assert_eq!(later["orders"], json!([]));
}

/// `setOrderStatus` changes the status `getOrders` reports; unknown orders and statuses
/// are refused; the status list and the (empty) journal answer like BaseLinker.
#[tokio::test]
async fn order_status_methods_answer_like_baselinker() {
    let (config, _clock) = manual_config(100, 60_000);
    let emulator = start(config).await;
    let statuses = success(&emulator, "getOrderStatusList", json!({})).await;
    let status_ids: Vec<i64> = statuses["statuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_i64().unwrap())
        .collect();
    assert!(status_ids.len() >= 4);
    let order = &success(&emulator, "getOrders", json!({})).await["orders"][0];
    let order_id = order["order_id"].as_i64().unwrap();
    let new_status = *status_ids.last().unwrap();
    assert_ne!(order["order_status_id"].as_i64(), Some(new_status));
    success(
        &emulator,
        "setOrderStatus",
        json!({"order_id": order_id, "status_id": new_status}),
    )
    .await;
    let reread = success(&emulator, "getOrders", json!({"order_id": order_id})).await;
    assert_eq!(
        reread["orders"][0]["order_status_id"].as_i64(),
        Some(new_status)
    );
    let filtered = success(&emulator, "getOrders", json!({"status_id": new_status})).await;
    assert!(
        filtered["orders"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["order_id"] == order_id)
    );

    let client = emulator.client();
    for (params, code) in [
        (
            json!({"order_id": 1, "status_id": new_status}),
            "ERROR_ORDER_NOT_FOUND",
        ),
        (
            json!({"order_id": order_id, "status_id": 1}),
            "ERROR_BAD_STATUS_ID",
        ),
        (json!({"order_id": order_id}), "ERROR_BAD_PARAMETERS"),
    ] {
        let answer = client.call("t", "setOrderStatus", &params).await.unwrap();
        assert!(
            matches!(&answer, Outcome::Error { code: c, .. } if c == code),
            "{answer:?}"
        );
    }
    let journal = success(&emulator, "getJournalList", json!({"last_log_id": 0})).await;
    assert_eq!(journal["logs"], json!([]));
}
