//! Whether the Redis that holds the lease counters may evict them.
//!
//! Every window, lease record, health record and pool index is a key with an expiry.
//! A Redis with `maxmemory` set and any policy but `noeviction` evicts keys when it is
//! full (the `volatile-*` policies pick among keys with an expiry: exactly these). An
//! evicted window forgets the grants it counted, so the next decisions can exceed an
//! upstream's limit, which is what this service exists to prevent. Redis cannot be
//! told to spare some keys, so the service reads the policy of every master (`INFO
//! memory`, a command the lease functions already use) and says while it is unsafe:
//! an error in the log when it becomes so, and the gauge `tokenlease_redis_may_evict`.

use std::time::Duration;

use redis::Value;
use tokio::sync::watch;

use super::CounterError;
use super::redis_backend::RedisCounters;

/// How often the policy is read: an operator's `CONFIG SET` shows within this.
pub const CHECK_EVERY: Duration = Duration::from_secs(60);

/// What one node's `INFO memory` says about eviction: its `maxmemory` (bytes) and
/// `maxmemory-policy` when it may evict (a limit is set and the policy is not
/// `noeviction`); `None` when it never evicts, or does not say.
pub fn eviction_of(info: &str) -> Option<(u64, String)> {
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
    };
    let maxmemory: u64 = field("maxmemory")?.parse().ok()?;
    let policy = field("maxmemory_policy")?;
    (maxmemory > 0 && policy != "noeviction").then(|| (maxmemory, policy.to_owned()))
}

/// The message for the nodes that may evict (`node`, `maxmemory`, policy).
fn describe(evicting: &[(String, u64, String)]) -> String {
    let nodes: Vec<String> = evicting
        .iter()
        .map(|(node, bytes, policy)| {
            format!("{node} (maxmemory {bytes} bytes, maxmemory-policy {policy})")
        })
        .collect();
    format!(
        "Redis may evict the lease counters: {}. An evicted window forgets its grants, and \
         leasing can then exceed an upstream's limit. Set `maxmemory-policy noeviction` \
         (CONFIG SET on every master, and in redis.conf), or give Redis no maxmemory",
        nodes.join(", ")
    )
}

fn text(value: Value) -> Result<String, CounterError> {
    redis::from_redis_value(value)
        .map_err(|e| CounterError::Internal(format!("unexpected INFO reply: {e}")))
}

impl RedisCounters {
    /// Whether some master may evict keys: `Some(what to do)` if so. A single server
    /// answers `INFO` with its text; a cluster connection asks every master and
    /// answers with a map of node → text.
    pub async fn eviction_risk(&self) -> Result<Option<String>, CounterError> {
        let reply = self.info("memory").await?;
        let nodes = match reply {
            Value::Map(nodes) => nodes
                .into_iter()
                .map(|(node, info)| Ok((text(node)?, text(info)?)))
                .collect::<Result<Vec<_>, CounterError>>()?,
            single => vec![("the server".to_owned(), text(single)?)],
        };
        let mut evicting: Vec<(String, u64, String)> = nodes
            .into_iter()
            .filter_map(|(node, info)| {
                eviction_of(&info).map(|(bytes, policy)| (node, bytes, policy))
            })
            .collect();
        evicting.sort();
        Ok((!evicting.is_empty()).then(|| describe(&evicting)))
    }
}

/// Reads the eviction policy every `every` until `stop`, the first time at once: logs
/// an error when Redis becomes able to evict the counters (and again only after it was
/// fixed), and passes every answer to `report` (the service: the gauge,
/// `metrics::redis_may_evict`). A read that fails (Redis down) reports nothing.
pub fn spawn_eviction_watch(
    counters: RedisCounters,
    every: Duration,
    report: impl Fn(bool) + Send + 'static,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match counters.eviction_risk().await {
                Ok(Some(problem)) => {
                    report(true);
                    if !warned {
                        tracing::error!(problem, "the lease counters are not safe in Redis");
                    }
                    warned = true;
                }
                Ok(None) => {
                    report(false);
                    if warned {
                        tracing::info!("Redis no longer evicts keys (maxmemory-policy)");
                    }
                    warned = false;
                }
                Err(error) => tracing::debug!(%error, "cannot read Redis's eviction policy"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_may_evict_only_with_a_limit_and_an_evicting_policy() {
        let info = |bytes: &str, policy: &str| {
            format!(
                "# Memory\r\nused_memory:1033472\r\nmaxmemory:{bytes}\r\nmaxmemory_human:0B\r\n\
                 maxmemory_policy:{policy}\r\nallocator_frag_ratio:1.00\r\n"
            )
        };
        assert_eq!(eviction_of(&info("0", "allkeys-lru")), None);
        assert_eq!(eviction_of(&info("104857600", "noeviction")), None);
        assert_eq!(
            eviction_of(&info("104857600", "volatile-lru")),
            Some((104_857_600, "volatile-lru".to_owned()))
        );
        // `maxmemory_human` or `maxmemory_policy` are not `maxmemory`; a reply without
        // the fields (an INFO section cut by a proxy) says nothing.
        assert_eq!(eviction_of("maxmemory_policy:allkeys-lru\r\n"), None);
        assert_eq!(eviction_of(""), None);
    }

    #[test]
    fn the_message_names_every_node_and_the_fix() {
        let message = describe(&[
            ("127.0.0.1:7001".into(), 1024, "allkeys-lru".into()),
            ("127.0.0.1:7002".into(), 2048, "volatile-ttl".into()),
        ]);
        assert!(
            message.contains("127.0.0.1:7001 (maxmemory 1024 bytes, maxmemory-policy allkeys-lru)")
        );
        assert!(
            message
                .contains("127.0.0.1:7002 (maxmemory 2048 bytes, maxmemory-policy volatile-ttl)")
        );
        assert!(message.contains("maxmemory-policy noeviction"), "{message}");
    }
}
