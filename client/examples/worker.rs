//! A sync worker: every few seconds it fetches a tenant's order status list from
//! BaseLinker under a tokenlease lease, and serves its last answer when no lease can be
//! had and that answer is fresh enough for the call's priority.
//!
//! ```sh
//! cargo run -- serve &                                   # tokenlease, embedded mode
//! cargo run -- emulator --listen 127.0.0.1:8089 &        # a BaseLinker emulator
//! # configure a pool, a token, tenant "acme" and a worker key (see the README), then:
//! TOKENLEASE_ENDPOINTS=http://127.0.0.1:50051 TOKENLEASE_API_KEY=tl_… TENANT=acme \
//!   BASELINKER_URL=http://127.0.0.1:8089/connector.php \
//!   cargo run -p tokenlease-client --example worker
//! ```
//!
//! Copy what you need: the client is built once and cloned into tasks; `call` releases
//! the lease with the outcome BaseLinker's answer reports (a blocked token quarantines
//! it until BaseLinker's "blocked until", read in Europe/Warsaw); the fallback decides
//! by the denial's freshness bound.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use secrecy::ExposeSecret;
use tokenlease_client::baselinker::{BlockZone, Reply};
use tokenlease_client::{Client, Error, Outcome, ReportOutcome, RequestKind};

/// BaseLinker over plain HTTP (use an HTTPS connector for api.baselinker.com).
#[derive(Clone)]
struct BaseLinker {
    http: HttpClient<HttpConnector, Full<Bytes>>,
    url: String,
    zone: BlockZone,
}

impl BaseLinker {
    /// Posts `method` with `parameters` as `token`; the answer sorted for the lease.
    async fn call(&self, token: &str, method: &str, parameters: &str) -> Reply {
        let body = format!("method={method}&parameters={}", urlencode(parameters));
        let request = http::Request::post(&self.url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("X-BLToken", token)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        let answer = async {
            let response = self.http.request(request).await.ok()?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.ok()?.to_bytes();
            Some((status, body))
        };
        match tokio::time::timeout(Duration::from_secs(30), answer).await {
            Ok(Some((status, body))) => Reply::from_http(status, &body, &self.zone),
            // No answer at all: an upstream error for the token's breaker.
            _ => Reply::Failure { http_status: 0 },
        }
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What one round got: BaseLinker's answer, the cached one, or nothing.
enum Fetched {
    Live(Reply),
    Cached(serde_json::Value),
    Nothing,
}

/// How a round's lease is released: only a live answer used one (a fallback runs
/// without a lease, so its value is never reported).
impl ReportOutcome for Fetched {
    fn outcome(&self) -> Outcome {
        match self {
            Fetched::Live(reply) => reply.outcome(),
            Fetched::Cached(_) | Fetched::Nothing => Outcome::NotUsed,
        }
    }
}

/// The last good answer and when it came.
type Cache = std::sync::Arc<std::sync::Mutex<Option<(Instant, serde_json::Value)>>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = |name: &str| std::env::var(name).map_err(|_| format!("set {name}"));
    let client = Client::builder()
        .endpoints(env("TOKENLEASE_ENDPOINTS")?.split(','))
        .api_key(env("TOKENLEASE_API_KEY")?)
        .connect()?;
    let tenant = env("TENANT")?;
    let baselinker = BaseLinker {
        http: HttpClient::builder(TokioExecutor::new()).build_http(),
        url: env("BASELINKER_URL")?,
        zone: BlockZone::default(),
    };
    let cache = Cache::default();

    for _ in 0..10 {
        let (upstream, fresh) = (baselinker.clone(), cache.clone());
        let answer = client
            .call(&tenant, RequestKind::OrderSync, move |token| async move {
                let reply = upstream.call(token.expose_secret(), "getOrderStatusList", "{}");
                Fetched::Live(reply.await)
            })
            .max_wait(Duration::from_secs(2))
            .with_fallback(move |denial| async move {
                let cached = fresh.lock().unwrap().clone();
                match cached {
                    Some((at, value)) if denial.accepts_age(at.elapsed()) => {
                        println!("no lease ({:?}): serving the cached answer", denial.reason);
                        Fetched::Cached(value)
                    }
                    _ => {
                        println!(
                            "no lease, nothing fresh enough: retry in {:?}",
                            denial.retry_after
                        );
                        Fetched::Nothing
                    }
                }
            })
            .await;
        match answer {
            Ok(Fetched::Live(Reply::Success(value))) => {
                let statuses = value["statuses"].as_array().map_or(0, Vec::len);
                println!("{statuses} order statuses, live");
                *cache.lock().unwrap() = Some((Instant::now(), value));
            }
            Ok(Fetched::Live(Reply::Blocked { until, .. })) => {
                println!("token blocked until {until:?}: tokenlease quarantines it")
            }
            Ok(Fetched::Live(other)) => println!("BaseLinker: {other:?}"),
            Ok(Fetched::Cached(value)) => {
                let statuses = value["statuses"].as_array().map_or(0, Vec::len);
                println!("{statuses} order statuses, cached");
            }
            Ok(Fetched::Nothing) => {}
            Err(Error::Status(status)) => return Err(status.into()),
            Err(error) => println!("tokenlease: {error}"),
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    Ok(())
}
