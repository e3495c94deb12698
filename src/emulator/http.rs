//! The emulator's HTTP/1.1 server, on hyper directly (three routes do not need a
//! router, and hyper is already in the build):
//!
//! - `POST /connector.php` — the BaseLinker API: form fields `method`, `parameters`
//!   (JSON) and the deprecated `token`; the `X-BLToken` header wins over the field.
//!   Always HTTP 200 JSON, except an injected 502.
//! - `GET /_emulator/stats[?token=T]` — every token's [`TokenStats`] as a JSON object
//!   keyed by token, or one token's.
//! - `POST /_emulator/faults` — JSON `{"token": T, "bad_gateway_fraction": 0.5,
//!   "latency_ms": 100, "bad_gateway_counts_toward_limit": true}` (all but `token`
//!   optional) replaces that token's faults.
//!
//! Order of checks on `connector.php`: token present → token known → injected latency →
//! limiter (and injected 502) → method → parameters JSON. So a request with an unknown
//! method or bad JSON still counts toward the limit, as it would upstream.
//!
//! Shutdown: the accept loop stops and open connections are dropped without draining;
//! an emulator has nothing worth finishing.
//!
//! [`TokenStats`]: super::TokenStats

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::methods::{dispatch, error_body};
use super::state::{Admission, Fault, Shared};
use crate::baselinker::{ERROR_BLOCKED_TOKEN, format_local_datetime};

/// Largest request body read, bytes.
const MAX_BODY_BYTES: usize = 1 << 20;

/// What a gateway in front of BaseLinker sends when the API behind it fails.
const BAD_GATEWAY_HTML: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n\
<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n\
</body>\r\n</html>\r\n";

/// Serves `listener` until `stop` fires (or its sender is dropped).
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "emulator cannot accept a connection");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| route(shared.clone(), request));
                    // A client hanging up mid-request is not the emulator's problem.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
}

async fn route(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (request.method(), request.uri().path()) {
        (&Method::POST, "/connector.php") => connector(&shared, request).await,
        (&Method::GET, "/_emulator/stats") => stats(&shared, &request),
        (&Method::POST, "/_emulator/faults") => set_fault(&shared, request).await,
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

/// `POST /connector.php`.
async fn connector(shared: &Shared, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let header_token = request
        .headers()
        .get("x-bltoken")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let Some(body) = read_body(request).await else {
        return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
    };
    let mut form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let token = header_token
        .filter(|t| !t.is_empty())
        .or_else(|| form.remove("token").filter(|t| !t.is_empty()));
    let Some(token) = token else {
        return json(&error_body("ERROR_EMPTY_TOKEN", "No user token provided."));
    };
    if !shared.is_known(&token) {
        return json(&error_body("ERROR_BAD_TOKEN", "Invalid user token"));
    }
    let latency = shared.latency(&token);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match shared.admit(&token) {
        Admission::Blocked { until_ms } => {
            let until = format_local_datetime(until_ms, &shared.zone);
            let message = format!("Query limit exceeded, token blocked until {until}");
            json(&error_body(ERROR_BLOCKED_TOKEN, &message))
        }
        Admission::BadGateway => Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .header(header::CONTENT_TYPE, "text/html")
            .body(Full::new(Bytes::from_static(BAD_GATEWAY_HTML.as_bytes())))
            .expect("a static response is valid"),
        Admission::Accepted => {
            let method = form.get("method").map(String::as_str).unwrap_or_default();
            let parameters = form
                .get("parameters")
                .map(String::as_str)
                .unwrap_or_default();
            json(&dispatch(&shared.orders, method, parameters))
        }
    }
}

/// `GET /_emulator/stats[?token=T]`.
fn stats(shared: &Shared, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let query = request.uri().query().unwrap_or_default();
    let token = form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "token")
        .map(|(_, value)| value.into_owned());
    match token {
        Some(token) => json(&shared.stats(&token)),
        None => json(&shared.all_stats()),
    }
}

/// The body of `POST /_emulator/faults`.
#[derive(Deserialize)]
struct FaultRequest {
    token: String,
    #[serde(flatten)]
    fault: Fault,
}

/// `POST /_emulator/faults`.
async fn set_fault(shared: &Shared, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(body) = read_body(request).await else {
        return plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
    };
    let parsed: FaultRequest = match serde_json::from_slice(&body) {
        Ok(parsed) => parsed,
        Err(error) => return plain(StatusCode::BAD_REQUEST, &format!("{error}\n")),
    };
    if !parsed.fault.is_valid() {
        return plain(
            StatusCode::BAD_REQUEST,
            "bad_gateway_fraction must be between 0 and 1\n",
        );
    }
    shared.set_fault(&parsed.token, parsed.fault);
    json(&serde_json::json!({ "status": "OK" }))
}

async fn read_body(request: Request<Incoming>) -> Option<Bytes> {
    let limited = Limited::new(request.into_body(), MAX_BODY_BYTES);
    limited.collect().await.ok().map(|body| body.to_bytes())
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).expect("emulator answers serialise");
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a JSON response is valid")
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(text.to_owned())))
        .expect("a text response is valid")
}
