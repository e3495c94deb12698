//! The Lua scripts of the Redis backend, as documented constants.
//!
//! Why Lua rather than MULTI/EXEC: the decision reads the windows (count, oldest entry)
//! and writes depending on what it read; a transaction cannot branch on its own reads,
//! and WATCH-retry loops degrade under exactly the contention this service exists for.
//! A script runs atomically on the server, so replicas never interleave inside one
//! decision. Every key a script touches is passed in KEYS and carries the upstream's hash
//! tag `{<upstream>}`, so the scripts run unchanged on Redis Cluster.
//!
//! Time is `redis.call('TIME')`: the server's clock, the same for every replica. Redis 7
//! replicates scripts by effects, so reading the clock in a script is allowed.

/// Decides one lease and records it when granted.
///
/// - `KEYS[1]`: the tenant's window (sorted set: member `<nonce>#<i>`, score = occupancy end, ms)
/// - `KEYS[2]`: the lease hash to create (`tenant`, `token`, `cost`, `expires`)
/// - `KEYS[3..]`: the candidate tokens' windows, dedicated tokens first
/// - `ARGV[1]` window ms, `ARGV[2]` lease TTL ms, `ARGV[3]` cost, `ARGV[4]` tenant
///   limit, `ARGV[5]` token limit, `ARGV[6]` how many of the tokens are dedicated,
///   `ARGV[7]` tenant id, `ARGV[8]` lease nonce, `ARGV[9..]` token ids (as KEYS[3..])
///
/// Returns `{1, token_index (1-based), now, expires, tenant_used, token_used}` when
/// granted, `{0, reason (1 tenant quota, 2 no token capacity), retry_after_ms, now}` when
/// denied. A denial writes nothing but the trimming of entries that had left the window.
/// A request no waiting can satisfy (cost above the token or tenant limit, no candidate
/// token) is denied with a retry of one window. A cost of 0 counts as 1.
pub const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
-- Every lease allows at least one call, so it takes at least one slot.
local cost = math.max(1, tonumber(ARGV[3]))
local tenant_limit = tonumber(ARGV[4])
local token_limit = tonumber(ARGV[5])
local n_dedicated = tonumber(ARGV[6])
local horizon = now - window
-- The retry instant of a request no waiting can satisfy (its cost exceeds a limit, or
-- it has no candidate token): one window on, when the configuration may have changed.
local never = now + window

-- An entry whose occupancy ended before now - W cannot share a window with a use made
-- from now on: drop it, then count what is left.
local function trim(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. horizon)
  return redis.call('ZCARD', key)
end

-- The instant a window holding `used` entries has room for `cost` more under `limit`:
-- when its (used + cost - limit)-th earliest end has left the window.
local function free_at(key, used, limit)
  local k = used + cost - limit
  if k <= 0 then return now end
  -- More entries would have to leave than there are: cost exceeds limit.
  if k > used then return never end
  local e = redis.call('ZRANGE', key, k - 1, k - 1, 'WITHSCORES')
  return tonumber(e[2]) + window + 1
end

local tenant_used = trim(KEYS[1])

local best, best_used, earliest = nil, nil, nil
for i = 3, #KEYS do
  local idx = i - 2
  -- A dedicated token with room wins over every pool token.
  if best ~= nil and best <= n_dedicated and idx > n_dedicated then break end
  local used = trim(KEYS[i])
  if used + cost <= token_limit then
    if best == nil or used < best_used then best, best_used = idx, used end
  else
    local f = free_at(KEYS[i], used, token_limit)
    if earliest == nil or f < earliest then earliest = f end
  end
end

if earliest == nil then earliest = never end

if tenant_used + cost > tenant_limit then
  local retry = free_at(KEYS[1], tenant_used, tenant_limit)
  if best == nil and earliest > retry then retry = earliest end
  return {0, 1, retry - now, now}
end
if best == nil then
  return {0, 2, earliest - now, now}
end

local expires = now + ttl
local token_key = KEYS[best + 2]
for i = 1, cost do
  local member = ARGV[8] .. '#' .. i
  redis.call('ZADD', KEYS[1], expires, member)
  redis.call('ZADD', token_key, expires, member)
end
-- Keep a window at least until its newest entry has left it.
local keep = ttl + window + 1000
for _, key in ipairs({KEYS[1], token_key}) do
  if redis.call('PTTL', key) < keep then redis.call('PEXPIRE', key, keep) end
end
redis.call('HSET', KEYS[2], 'tenant', ARGV[7], 'token', ARGV[8 + best], 'cost', cost, 'expires', expires)
redis.call('PEXPIRE', KEYS[2], ttl)
return {1, best, now, expires, tenant_used + cost, best_used + cost}
"#;

/// Records a lease's outcome.
///
/// - `KEYS[1]` the lease hash, `KEYS[2]` the tenant's window, `KEYS[3]` the token's window
/// - `ARGV[1]` outcome, `ARGV[2]` tenant id, `ARGV[3]` token id, `ARGV[4]` nonce
///
/// "not_used" removes the lease's entries (the slots come back); any other outcome
/// moves their end to now (the call is over, so its occupancy ends now). Returns
/// `{'released'}`, `{'already'}`, `{'conflict', previous}` or `{'not_found'}`.
/// The lease hash expires with the lease, so expired leases need no cleanup pass.
pub const RELEASE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = redis.call('HMGET', KEYS[1], 'tenant', 'token', 'cost', 'expires', 'outcome')
if not lease[1] or lease[1] ~= ARGV[2] or lease[2] ~= ARGV[3] or tonumber(lease[4]) < now then
  return {'not_found'}
end
if lease[5] then
  if lease[5] == ARGV[1] then return {'already'} end
  return {'conflict', lease[5]}
end
for i = 1, tonumber(lease[3]) do
  local member = ARGV[4] .. '#' .. i
  if ARGV[1] == 'not_used' then
    redis.call('ZREM', KEYS[2], member)
    redis.call('ZREM', KEYS[3], member)
  else
    redis.call('ZADD', KEYS[2], 'XX', now, member)
    redis.call('ZADD', KEYS[3], 'XX', now, member)
  end
end
redis.call('HSET', KEYS[1], 'outcome', ARGV[1])
return {'released'}
"#;

/// Counts the entries still in the window of each key, without writing.
///
/// - `KEYS[..]` windows; `ARGV[1]` window ms. Returns one count per key.
pub const USAGE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local horizon = now - tonumber(ARGV[1])
local counts = {}
for i = 1, #KEYS do
  counts[i] = redis.call('ZCOUNT', KEYS[i], horizon, '+inf')
end
return counts
"#;
