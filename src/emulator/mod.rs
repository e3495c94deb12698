//! A BaseLinker API emulator, so that violations of the upstream limit are counted by
//! the upstream — not by the service under test. Usable in-process from tests
//! ([`Emulator::start`]) and as `tokenlease emulator` for people.
//!
//! What it does (see `shared/BASELINKER.md` for the sources):
//! - `POST /connector.php` with form fields `method` and `parameters` (JSON); the token
//!   in the `X-BLToken` header or the deprecated `token` field. Always HTTP 200 JSON,
//!   except injected faults (`http` module docs give the order of checks).
//! - Per token, a strict sliding window (default 100 per 60 s) or fixed windows; the
//!   first request over the limit and every request until the block ends (default
//!   10 min) get `ERROR_BLOCKED_TOKEN` "Query limit exceeded, token blocked until
//!   YYYY-MM-DD HH:MM:SS". Boundaries and block rules are in the `limiter` module docs.
//! - The "blocked until" time is written in a time zone, by default Europe/Warsaw
//!   (+01:00 in winter, +02:00 in summer), BaseLinker's most likely zone; a fixed
//!   offset can be set instead (`EmulatorConfig::zone`, `--time-zone +01:00`).
//! - Faults per token, settable at runtime ([`EmulatorHandle::set_fault`] or
//!   `POST /_emulator/faults`): HTTP 502 with HTML for a fraction of requests, latency.
//! - Observations per token ([`EmulatorHandle::stats`] or `GET /_emulator/stats`).
//!
//! # Layout
//! - `limiter`: the window and block rules, pure (time passed in).
//! - `state`: per-token limiter, stats and faults behind one lock; the admission gate.
//! - `methods`: `getOrders`, `setOrderStatus`, `getOrderStatusList`, `getJournalList`.
//! - `http`: the hyper server and its routes.

mod http;
mod limiter;
mod methods;
mod state;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::baselinker::{BaseLinkerClient, BlockZone};
use crate::clock::Clock;
use limiter::LimitRules;
pub use limiter::WindowKind;
use methods::OrderBook;
pub use methods::{ORDERS_PAGE_SIZE, ORDERS_START_UNIX};
use state::Shared;
pub use state::{Fault, TokenStats};

/// How an emulator behaves. `Default` is BaseLinker as documented, on a random port,
/// accepting any token.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// Where to listen (default `127.0.0.1:0`: a free port).
    pub listen: SocketAddr,
    /// Accepted requests per window per token (default 100).
    pub limit: u32,
    /// Window length (default 60 s; whole milliseconds count).
    pub window: Duration,
    /// Sliding (default) or fixed, epoch-aligned windows.
    pub window_kind: WindowKind,
    /// How long a token stays blocked after a violation (default 10 min).
    pub block: Duration,
    /// Whether requests during a block push its end out (default false).
    pub extend_block: bool,
    /// The zone "blocked until" times are written in (default Europe/Warsaw).
    pub zone: BlockZone,
    /// The accepted tokens; `None` accepts any non-empty token (the default).
    pub tokens: Option<Vec<String>>,
    /// How many orders the account holds (default 250).
    pub order_count: usize,
    /// Where time comes from (default the system clock; tests may pass a manual one).
    pub clock: Clock,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            limit: 100,
            window: Duration::from_secs(60),
            window_kind: WindowKind::Sliding,
            block: Duration::from_secs(600),
            extend_block: false,
            zone: BlockZone::default(),
            tokens: None,
            order_count: 250,
            clock: Clock::System,
        }
    }
}

impl EmulatorConfig {
    /// This configuration accepting only `tokens`.
    pub fn with_tokens<I, S>(mut self, tokens: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tokens = Some(tokens.into_iter().map(Into::into).collect());
        self
    }

    fn rules(&self) -> Result<LimitRules, EmulatorError> {
        let window_ms = i64::try_from(self.window.as_millis()).unwrap_or(i64::MAX);
        if self.limit == 0 {
            return Err(EmulatorError::InvalidConfig(
                "limit must be at least 1".into(),
            ));
        }
        if window_ms < 1 {
            return Err(EmulatorError::InvalidConfig(
                "window must be at least 1 ms".into(),
            ));
        }
        Ok(LimitRules {
            limit: self.limit,
            window_ms,
            kind: self.window_kind,
            block_ms: i64::try_from(self.block.as_millis()).unwrap_or(i64::MAX / 2),
            extend_block: self.extend_block,
        })
    }
}

/// Why an emulator did not start.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("invalid emulator configuration: {0}")]
    InvalidConfig(String),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Starts emulators.
pub struct Emulator;

impl Emulator {
    /// Binds `config.listen` and serves in a background task until the handle is
    /// stopped or dropped.
    pub async fn start(config: EmulatorConfig) -> Result<EmulatorHandle, EmulatorError> {
        let rules = config.rules()?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| EmulatorError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EmulatorError::Bind {
                addr: config.listen,
                source,
            })?;
        let shared = Arc::new(Shared::new(
            rules,
            config.zone.clone(),
            config.clock.clone(),
            config.tokens.as_deref(),
            OrderBook::generate(config.order_count),
        ));
        let (stop, stopped) = oneshot::channel();
        let server = tokio::spawn(http::serve(listener, shared.clone(), stopped));
        tracing::info!(%addr, limit = config.limit, window_ms = rules.window_ms, "baselinker emulator listening");
        Ok(EmulatorHandle {
            addr,
            shared,
            stop: Some(stop),
            server: Some(server),
        })
    }
}

/// A running emulator. Stops when dropped (or by [`EmulatorHandle::stop`], which also
/// waits for the server task to end).
pub struct EmulatorHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl EmulatorHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server root, e.g. `http://127.0.0.1:41234` (the API is at `/connector.php`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The zone of "blocked until" times.
    pub fn zone(&self) -> &BlockZone {
        &self.shared.zone
    }

    /// A client for this emulator, reading "blocked until" times in its zone.
    pub fn client(&self) -> BaseLinkerClient {
        BaseLinkerClient::new(&self.url(), self.shared.zone.clone())
            .expect("the emulator's own URL is a valid http URL")
    }

    /// What was observed for `token` (all zero if nothing).
    pub fn stats(&self, token: &str) -> TokenStats {
        self.shared.stats(token)
    }

    /// What was observed for every token seen, by token.
    pub fn all_stats(&self) -> BTreeMap<String, TokenStats> {
        self.shared.all_stats()
    }

    /// Replaces `token`'s faults (fraction clamped to 0..=1); `Fault::none()` clears.
    pub fn set_fault(&self, token: &str, fault: Fault) {
        self.shared.set_fault(token, fault);
    }

    /// Accepts `token` from now on (matters only when the config lists tokens).
    pub fn add_token(&self, token: &str) {
        self.shared.add_token(token);
    }

    /// Gives `token` its own limit per window (a custom account limit).
    pub fn set_limit(&self, token: &str, limit: u32) {
        self.shared.set_limit(token, limit);
    }

    /// Stops serving and waits for the server task to end.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
