//! The few BaseLinker methods the emulator answers, with bodies shaped like the real
//! ones, over one deterministic order set shared by every token (one account).
//!
//! Error codes the public sources name are used as is; `ERROR_ORDER_NOT_FOUND`,
//! `ERROR_BAD_STATUS_ID` and `ERROR_BAD_PARAMETERS` are the emulator's own guesses.

use std::sync::{Mutex, MutexGuard};

use serde_json::{Value, json};

/// `date_confirmed` of the first generated order: 2025-01-01 00:00:00 UTC.
pub const ORDERS_START_UNIX: i64 = 1_735_689_600;
/// Most orders one `getOrders` call returns.
pub const ORDERS_PAGE_SIZE: usize = 100;

/// The order statuses of the emulated account: (id, name, name for customer, colour).
const STATUSES: [(u32, &str, &str, &str); 5] = [
    (10_001, "New orders", "Order received", "#5CB85C"),
    (10_002, "Awaiting payment", "Awaiting payment", "#F0AD4E"),
    (10_003, "To be shipped", "In progress", "#5BC0DE"),
    (10_004, "Shipped", "Shipped", "#337AB7"),
    (10_005, "Cancelled", "Cancelled", "#D9534F"),
];

/// (name, sku, gross price) of the products orders are made of.
const CATALOGUE: [(&str, &str, f64); 4] = [
    ("Ceramic mug 330 ml", "MUG-330", 29.99),
    ("Cotton T-shirt M", "TS-M", 59.0),
    ("Notebook A5 dotted", "NB-A5", 12.5),
    ("Black tea 100 g", "TEA-100", 18.9),
];

/// The account's orders, sorted by `date_confirmed` (strictly increasing, so paging by
/// "last `date_confirmed` + 1 s" neither skips nor repeats an order).
pub(crate) struct OrderBook {
    orders: Mutex<Vec<Value>>,
}

impl OrderBook {
    /// `count` orders generated from their index alone: the same set on every run.
    pub fn generate(count: usize) -> Self {
        Self {
            orders: Mutex::new((0..count).map(generated_order).collect()),
        }
    }

    fn orders(&self) -> MutexGuard<'_, Vec<Value>> {
        self.orders.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn generated_order(index: usize) -> Value {
    let i = index as i64;
    let date_confirmed = ORDERS_START_UNIX + i * 600 + (i * 7919) % 300;
    let date_add = date_confirmed - 60 - (i * 31) % 3600;
    let products: Vec<Value> = (0..=index % 3)
        .map(|line| {
            let (name, sku, price) = CATALOGUE[(index + line) % CATALOGUE.len()];
            json!({
                "storage": "db", "storage_id": 0, "order_product_id": index * 10 + line + 1,
                "product_id": format!("{}", 1000 + (index + line) % CATALOGUE.len()),
                "variant_id": 0, "name": name, "sku": sku, "ean": "", "location": "",
                "warehouse_id": 0, "attributes": "", "price_brutto": price, "tax_rate": 23,
                "quantity": 1 + (index + line) % 2, "weight": 0.4, "bundle_id": 0,
            })
        })
        .collect();
    json!({
        "order_id": 5_000_001 + i,
        "shop_order_id": 0,
        "external_order_id": format!("EXT-{:06}", index + 1),
        "order_source": "personal",
        "order_source_id": 0,
        "order_source_info": "-",
        "order_status_id": STATUSES[index % 4].0,
        "confirmed": true,
        "date_confirmed": date_confirmed,
        "date_add": date_add,
        "date_in_status": date_confirmed,
        "user_login": format!("customer{}", index + 1),
        "phone": format!("+48 600 {:03} {:03}", index % 1000, (index * 7) % 1000),
        "email": format!("customer{}@example.com", index + 1),
        "user_comments": "",
        "admin_comments": "",
        "currency": "PLN",
        "payment_method": "Bank transfer",
        "payment_method_cod": "0",
        "payment_done": if index % 4 == 1 { 0.0 } else { 49.99 },
        "delivery_method": "Courier",
        "delivery_price": 14.99,
        "delivery_package_module": "",
        "delivery_package_nr": "",
        "delivery_fullname": format!("Customer {}", index + 1),
        "delivery_company": "",
        "delivery_address": format!("ul. Prosta {}", index % 120 + 1),
        "delivery_city": "Warszawa",
        "delivery_postcode": "00-850",
        "delivery_country_code": "PL",
        "invoice_fullname": "",
        "want_invoice": "0",
        "extra_field_1": "",
        "extra_field_2": "",
        "products": products,
    })
}

/// The `{"status":"ERROR",…}` envelope.
pub(crate) fn error_body(code: &str, message: &str) -> Value {
    json!({ "status": "ERROR", "error_code": code, "error_message": message })
}

/// Answers `method` with the raw `parameters` form field (a JSON object; empty or
/// `null` means `{}`).
pub(crate) fn dispatch(book: &OrderBook, method: &str, raw_parameters: &str) -> Value {
    let handler: fn(&OrderBook, &Value) -> Value = match method {
        "getOrders" => get_orders,
        "setOrderStatus" => set_order_status,
        "getOrderStatusList" => |_, _| get_order_status_list(),
        "getJournalList" => |_, _| json!({ "status": "SUCCESS", "logs": [] }),
        _ => {
            return error_body("ERROR_UNKNOWN_METHOD", "An unknown method has been used");
        }
    };
    let params = if raw_parameters.trim().is_empty() {
        json!({})
    } else {
        match serde_json::from_str::<Value>(raw_parameters) {
            Ok(object @ Value::Object(_)) => object,
            Ok(Value::Null) => json!({}),
            _ => {
                return error_body(
                    "ERROR_PARSE_JSON_PARAMETERS",
                    "Error parsing JSON parameters",
                );
            }
        }
    };
    handler(book, &params)
}

/// An integer parameter, sent as a number or a numeric string (clients do both).
fn int_param(params: &Value, name: &str) -> Result<Option<i64>, Value> {
    match params.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64()),
        Some(Value::String(s)) if s.parse::<i64>().is_ok() => Ok(s.parse().ok()),
        Some(_) => Err(error_body(
            "ERROR_BAD_PARAMETERS",
            &format!("Parameter '{name}' must be an integer"),
        )),
    }
}

/// `getOrders`: orders with `date_confirmed >= date_confirmed_from`, oldest first, at
/// most [`ORDERS_PAGE_SIZE`]; `order_id` and `status_id` filter further.
fn get_orders(book: &OrderBook, params: &Value) -> Value {
    let filters = (|| {
        Ok::<_, Value>((
            int_param(params, "date_confirmed_from")?.unwrap_or(0),
            int_param(params, "order_id")?,
            int_param(params, "status_id")?,
        ))
    })();
    let (from, order_id, status_id) = match filters {
        Ok(filters) => filters,
        Err(error) => return error,
    };
    let orders = book.orders();
    let first = orders.partition_point(|o| o["date_confirmed"].as_i64().unwrap_or(0) < from);
    let page: Vec<Value> = orders[first..]
        .iter()
        .filter(|o| order_id.is_none_or(|id| o["order_id"].as_i64() == Some(id)))
        .filter(|o| status_id.is_none_or(|id| o["order_status_id"].as_i64() == Some(id)))
        .take(ORDERS_PAGE_SIZE)
        .cloned()
        .collect();
    json!({ "status": "SUCCESS", "orders": page })
}

/// `setOrderStatus {order_id, status_id}`.
fn set_order_status(book: &OrderBook, params: &Value) -> Value {
    let ids = int_param(params, "order_id").and_then(|order| {
        let status = int_param(params, "status_id")?;
        Ok((order, status))
    });
    let (Some(order_id), Some(status_id)) = (match ids {
        Ok(ids) => ids,
        Err(error) => return error,
    }) else {
        return error_body(
            "ERROR_BAD_PARAMETERS",
            "Parameters 'order_id' and 'status_id' are required",
        );
    };
    if !STATUSES.iter().any(|s| i64::from(s.0) == status_id) {
        return error_body("ERROR_BAD_STATUS_ID", "Invalid status_id");
    }
    let mut orders = book.orders();
    let Some(order) = orders
        .iter_mut()
        .find(|o| o["order_id"].as_i64() == Some(order_id))
    else {
        return error_body("ERROR_ORDER_NOT_FOUND", "Order not found");
    };
    order["order_status_id"] = json!(status_id);
    json!({ "status": "SUCCESS" })
}

fn get_order_status_list() -> Value {
    let statuses: Vec<Value> = STATUSES
        .iter()
        .map(|(id, name, for_customer, color)| {
            json!({ "id": id, "name": name, "name_for_customer": for_customer, "color": color })
        })
        .collect();
    json!({ "status": "SUCCESS", "statuses": statuses })
}
