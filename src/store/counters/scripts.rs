//! The Lua scripts of the Redis backend, as documented constants.
//!
//! Why Lua rather than MULTI/EXEC: the decision reads the windows (count, oldest entry)
//! and writes depending on what it read; a transaction cannot branch on its own reads,
//! and WATCH-retry loops degrade under exactly the contention this service exists for.
//! A script runs atomically on the server, so replicas never interleave inside one
//! decision. Every key a script touches carries the upstream's hash tag `{<upstream>}`,
//! so the scripts run unchanged on Redis Cluster. Keys are passed in KEYS, except the
//! ones a script only knows once it has decided (the chosen token's health record):
//! those it names from the upstream's key prefix, in the same hash slot.
//!
//! The lease scripts also carry the token-health decisions (`breaker_scripts.rs`): the
//! admission of a grant and the record of a release's outcome run inside them, so that
//! a granted pair is two round trips to Redis, not four.
//!
//! `ACQUIRE` and `RELEASE`, the hot path, are the bodies of two Redis Functions of one
//! library (`Library`), which defines their helpers once per load; the other scripts
//! are plain `EVALSHA` scripts.
//!
//! Time is `redis.call('TIME')`: the server's clock, the same for every replica. Redis 7
//! replicates scripts by effects, so reading the clock in a script is allowed.

use super::breaker_scripts::helpers;
use super::index_scripts::pool_index;

/// What the lease functions share, defined once when the library loads: the breaker's
/// helpers, the pool index's, and the id of the Redis process, read by the first
/// acquire that runs in this process (`INFO server`, the costliest call of a pair) and
/// kept: a restarted Redis, or another one after a failover, runs a library loaded
/// afresh, whose first acquire reads its own id.
const SHARED: &str = concat!(helpers!(), pool_index!(), "local server_id = nil\n");

/// The library of the lease path (Redis Functions, Redis 7): `ACQUIRE` and `RELEASE` as
/// functions `<name>_acquire` and `<name>_release`, named after a digest of the code,
/// so that replicas of different releases each call their own. The helpers are defined
/// once per load, not on every call as a script's are (~6 µs per call measured).
pub struct Library {
    /// The library's name, `tokenlease_<digest>`.
    pub name: String,
    /// `FUNCTION LOAD`'s argument.
    pub code: String,
}

impl Library {
    pub fn new() -> Self {
        use sha2::{Digest, Sha256};
        let mut body = String::from(SHARED);
        for (function, code) in [("acquire", ACQUIRE), ("release", RELEASE)] {
            body.push_str(&format!(
                "redis.register_function('$LIB_{function}', function(KEYS, ARGV)\nbegin()\n{code}\nend)\n"
            ));
        }
        let digest = hex::encode(&Sha256::digest(body.as_bytes())[..8]);
        let name = format!("tokenlease_{digest}");
        let code = format!("#!lua name={name}\n{}", body.replace("$LIB", &name));
        Self { name, code }
    }

    /// The name `FCALL` takes for `function` (`acquire`, `release`).
    pub fn function(&self, function: &str) -> String {
        format!("{}_{function}", self.name)
    }
}

/// Decides one lease and records it when granted.
///
/// - `KEYS[1]`: the tenant's window (sorted set: member `<nonce>#<i>`, score = occupancy end, ms)
/// - `KEYS[2]`: the lease record to create, one string (a `SET`, not a hash: one
///   command to write, one to read): `tenant|token|cost|expires|step|window|ix|ip`,
///   where `step` is the pace each slot spent (for a "not used" release to give back)
///   and `ix`, `ip` a pool token's index and position (empty otherwise); its release
///   replaces it with a released record (`…|<outcome>` appended), reading it in the
///   same command (see `RELEASE`). Ids never hold `|` (`domain::Id`). It lives until expiry + W, as long
///   as a release is accepted.
/// - `KEYS[3]`: the tenant's demand (hash: bucket index → requests asked for, and
///   `u<bucket>` → requests that found the tenant at its quota on their first attempt:
///   unmet demand)
/// - `KEYS[4]`, `KEYS[5]`, `KEYS[6]`: the pool's wait queue — waiters by virtual deadline
///   (sorted set), by expiry (sorted set), and when each may use a slot (hash)
/// - `KEYS[7..6+n]`: the candidate tokens' windows, dedicated tokens first
/// - `KEYS[7+n]`: the upstream's fence (hash: `until`, the instant grants may resume
///   from, and `server`, the run id of the Redis process that last confirmed it; see
///   `Counters::mark_fresh`). Missing means the counters were lost; written by another
///   Redis process (a restart that reloaded a snapshot or an AOF, a failover to a
///   replica) means some of the last writes may be lost, unless another process is to
///   be trusted (`ARGV[#ARGV-1]` = 1: Redis declared durable, or a Redis Cluster, whose
///   resharding moves keys between nodes). Either way the hold is set to now + W + TTL
///   and the call denied. It also holds `moved` (see `MOVE_OUT`); per wait queue,
///   `q:<queue>`: the latest instant a waiter queued there expires, past which the
///   queue is known empty without reading it; and per pool index, `a:<digest>`: the
///   last instant a caller asked the pool (`pi_drain` in `index_scripts.rs`), written
///   only when it changes (several calls share a millisecond under load), `n:<digest>`
///   no later than its first token due and `r:<digest>` when it is to be renewed (see
///   `index_scripts.rs`).
/// - `ARGV[1]` window ms, `ARGV[2]` lease TTL ms, `ARGV[3]` cost, `ARGV[4]` tenant
///   limit, `ARGV[5]` token limit, `ARGV[6]` how many of the tokens are dedicated,
///   `ARGV[7]` tenant id, `ARGV[8]` call nonce (also the lease's), `ARGV[9]` demand
///   bucket ms, `ARGV[10]` 1 to count this call's demand, `ARGV[11]` the call's virtual
///   deadline ('' on its first attempt), `ARGV[12]` its priority offset ms, `ARGV[13]`
///   how long to stay queued when denied (0: answer now; -1: ignore the queue),
///   `ARGV[14]` pacing: how many slots a token may grant back to back (0: no pacing),
///   `ARGV[15]` 1 to trust a fence another Redis process confirmed (see the fence),
///   `ARGV[16]` the instant (Unix ms, the replica's clock) after which the caller no
///   longer waits for this answer (0: none), `ARGV[17]` the prefix of the upstream's
///   keys (`<prefix>:{<upstream>}:`, to name the chosen token's health record),
///   `ARGV[18]` the tenant's guaranteed requests per window (a caller within it is
///   queued ahead of tenants beyond theirs: `queue::GUARANTEED_AHEAD_MS`), `ARGV[19]`
///   the configuration version the caller planned from (see `MOVE_OUT`), and
///   `ARGV[20..19+n]` the dedicated token ids (as the windows), then the pool's digest
///   ('' without a pool) and, when the index must be built, the pool's token ids
///
/// Pacing spreads a token's grants over its window: beyond the back-to-back allowance
/// a token grants one slot per W / token limit (GCRA). The allowance is earned only
/// while the token is not full: a full window with callers asking drains it to a
/// quarter. The window stays the hard limit; pacing only keeps a saturated token from
/// granting slots in bursts, so that slots keep freeing one by one and the queue's
/// order decides who gets each. A token's schedule — the instant, in ms, up to which its
/// pace is spent: the "theoretical arrival time" of GCRA — is the field `t` of its
/// health record (`set_schedule` in `index_scripts.rs`), so that the token chosen has
/// its pace and its health read in one command. A schedule is read only where it can
/// matter (a token that could be chosen, a full token, pool tokens while callers
/// wait): the scan stays cheap.
///
/// A call that reaches Redis after its caller's deadline (Redis was frozen or slow and
/// the caller has been told no lease was granted) writes nothing and returns
/// `{-1, now}`: otherwise it would take a slot nobody hands out, for TTL + grace + W.
///
/// The chosen token's health decides last (`admit` in `breaker_scripts.rs`, in this
/// same script, so a grant is one round trip): a token quarantined, open or half-open
/// with its probe out is not granted; the call gets `{2, token_index, now, state,
/// until, transitions…}` and nothing is recorded, so that it routes around the token.
///
/// Returns `{1, token_index (1-based), now, expires, tenant_used, token_used, verdict
/// (1 leasable, 2 the half-open token's probe), transitions…}` when granted, `{0, reason (1 tenant quota, 2 no token capacity, 3 counters lost: held
/// until the fence, 4 the same, noticed by this call, which set the fence, 5 no usable
/// token, 6 the chosen token moved out of this space after the caller's configuration),
/// retry_after_ms, now, virtual deadline or -1}` when denied. A denial writes only the
/// trimming of entries that had left a window (and the tenant window's life, once a
/// bucket), the demand count, the caller's queue entry (and the queue's latest expiry in
/// the fence) and drained pacing allowances. A request no waiting can satisfy (cost above the token or tenant limit, no candidate token) is
/// denied with a retry of one window. A cost of 0 counts as 1. When the tenant's quota
/// and every token are full, the reason is the limit that frees last.
pub const ACQUIRE: &str = r#"
local give_up_at = tonumber(ARGV[16])
if give_up_at > 0 and now > give_up_at then return {-1, now} end
local window = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
-- The Redis process's id, read once per process (`Library`).
if not server_id then server_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') end
local server = server_id
-- `q:<queue>`: until when the queue may hold a waiter (see `deny`), read with the fence.
local waits_field = 'q:' .. string.sub(KEYS[4], #ARGV[17] + 4)
-- The pool index's fields, read with it too (`index_scripts.rs`): the last instant a
-- caller asked the pool, when a token is next due, when the index is to be renewed.
local digest = ARGV[20 + tonumber(ARGV[6])]
local asked_field = 'a:' .. digest
local fence = redis.call('HMGET', KEYS[#KEYS], 'until', 'server', 'moved', waits_field, asked_field,
  'n:' .. digest, 'r:' .. digest)
local hold_until = tonumber(fence[1])
if fence[2] ~= server then
  if not hold_until or ARGV[15] ~= '1' then
    hold_until = now + window + ttl
    redis.call('HSET', KEYS[#KEYS], 'until', hold_until, 'server', server)
    return {0, 4, hold_until - now, now, -1}
  end
  redis.call('HSET', KEYS[#KEYS], 'server', server)
end
if hold_until > now then return {0, 3, hold_until - now, now, -1} end
-- Every lease allows at least one call, so it takes at least one slot.
local cost = math.max(1, tonumber(ARGV[3]))
local tenant_limit = tonumber(ARGV[4])
local token_limit = tonumber(ARGV[5])
local n_dedicated = tonumber(ARGV[6])
local nonce = ARGV[8]
local horizon = now - window
local wait_ms = tonumber(ARGV[13])
local queued = wait_ms >= 0
-- The retry instant of a request no waiting can satisfy (its cost exceeds a limit, or
-- it has no candidate token): one window on, when the configuration may have changed.
local never = now + window
local base = ARGV[17]
local pace = tonumber(ARGV[14])
local step = 0
if pace > 0 then step = window / token_limit end
-- How long a health record holding only a pacing schedule is given (`set_schedule`): the pool index's life.
local pace_life = 10 * window + 600000

-- The pool's tokens are found through its index (`index_scripts.rs`); a missing index
-- is built from the pool's token ids, which the caller sends only when told to.
if digest ~= '' then
  pi_open(base, digest, window, token_limit, pace)
  PI.asked, PI.next, PI.renew = tonumber(fence[5]) or 0, tonumber(fence[6]) or 0, tonumber(fence[7])
  PI.ttl, PI.server = ttl, server
  if not pi_ensure(ARGV, 21 + n_dedicated) then return {-2, now} end
end

local bucket_ms = tonumber(ARGV[9])
local bucket = math.floor(now / bucket_ms)
local first_attempt = ARGV[10] == '1'
-- `tends`: this call keeps the tenant's window (see below): it is the tenant's first
-- counted in this demand bucket, or one not counted at all.
local tends = not first_attempt
-- A bucket's first count renews the hash's life and drops buckets long past.
if first_attempt and redis.call('HINCRBY', KEYS[3], bucket, cost) == cost then
  tends = true
  redis.call('PEXPIRE', KEYS[3], 3 * window)
  if redis.call('HLEN', KEYS[3]) > 60 then
    for _, field in ipairs(redis.call('HKEYS', KEYS[3])) do
      local b = tonumber(field) or tonumber(string.sub(field, 2))
      if b < bucket - 20 then redis.call('HDEL', KEYS[3], field) end
    end
  end
end

local score, rank = nil, nil
local has_waiters = false
if queued then
  if ARGV[11] == '' then score = now + tonumber(ARGV[12]) else score = tonumber(ARGV[11]) end
  -- With nobody waiting, the queue cannot hold anyone ahead: skip counting pool room.
  -- Past the latest expiry of a waiter ever queued (the fence's `q:<queue>`), every
  -- waiter has expired, so the queue is not even read. A queue without that field
  -- (queued by a release before it was kept) is read, and the field set once empty.
  local waits_until = tonumber(fence[4])
  if waits_until == nil or waits_until >= now then
    has_waiters = redis.call('ZCARD', KEYS[4]) > 0
    if has_waiters then
      for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', '(' .. now)) do
        redis.call('ZREM', KEYS[4], gone)
        redis.call('ZREM', KEYS[5], gone)
        redis.call('HDEL', KEYS[6], gone)
      end
      has_waiters = redis.call('ZCARD', KEYS[4]) > 0
    end
    if waits_until == nil and not has_waiters then
      redis.call('HSET', KEYS[#KEYS], waits_field, 0)
    end
  end
end

-- An entry whose occupancy ended before now - W cannot share a window with a use made
-- from now on: drop it, then count what is left.
local function trim(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. horizon)
  return redis.call('ZCARD', key)
end

-- The instant a window holding `used` entries has room for `cost` more under `limit`:
-- when its (used + cost - limit)-th earliest end still in the window has left it
-- (entries that left may still be there: the tenant's window is trimmed once a bucket).
local function free_at(key, used, limit)
  local k = used + cost - limit
  if k <= 0 then return now end
  -- More entries would have to leave than there are: cost exceeds limit.
  if k > used then return never end
  local e = redis.call('ZRANGE', key, horizon, '+inf', 'BYSCORE', 'LIMIT', k - 1, 1, 'WITHSCORES')
  return tonumber(e[2]) + window + 1
end

-- Denies, queueing the caller when it waits; `eligible` is when it could use a slot.
local function deny(reason, at, eligible, over_quota)
  -- A call that found its tenant at quota on its first attempt is demand the quota did
  -- not meet (a full pool is not: every tenant may be within its quota then).
  if first_attempt and over_quota then redis.call('HINCRBY', KEYS[3], 'u' .. bucket, cost) end
  if not queued then return {0, reason, at - now, now, -1} end
  if wait_ms > 0 then
    redis.call('ZADD', KEYS[4], rank, nonce)
    redis.call('ZADD', KEYS[5], now + wait_ms, nonce)
    redis.call('HSET', KEYS[6], nonce, eligible)
    -- The three end together, on the scripts' clock (an expiry relative to the
    -- command's own instant could end them a millisecond apart).
    for i = 4, 6 do redis.call('PEXPIREAT', KEYS[i], now + wait_ms + window) end
    if now + wait_ms > (tonumber(fence[4]) or 0) then
      redis.call('HSET', KEYS[#KEYS], waits_field, now + wait_ms)
    end
  end
  return {0, reason, at - now, now, score}
end

-- Pacing of a dedicated token (see the doc comment; pool tokens: `pi_refresh`): how
-- many slots its pace allows now, when it allows `cost` more, and when one more. The
-- schedule is a field of the token's health record (`set_schedule`): `rows` keeps the
-- records read, for the admission of the token chosen.
local pace_at, rows = {}, {}
local function health_key(token)
  return base .. 'health:' .. token
end
local function paced(token)
  if pace == 0 then return token_limit, now, never end
  rows[token] = health_row(health_key(token))
  local tat = tonumber(rows[token][8]) or now
  pace_at[token] = tat
  local room, fits, grows = pace_math(tat, cost, pace, step)
  return room, fits, grows or never
end

-- A full window with callers asking is not idleness: the pace earns no more than a
-- quarter of its back-to-back allowance meanwhile (rewritten at most once per step), so
-- slots a window frees at once are mostly granted one per step, not in a burst that
-- would repeat every window. The quarter absorbs the jitter of frees (each slot frees
-- W after its call's release, and calls take varying time) without losing capacity.
-- (A pool token is drained when its window frees, as of the pool's last ask.)
local function drain_pace(token)
  if pace == 0 then return end
  local keep = math.ceil(pace / 4)
  if pace_at[token] < now + (pace - keep - 1) * step then
    set_schedule(health_key(token), now + (pace - keep) * step, pace_life)
  end
end

-- The tenant's window is counted, not trimmed, on every call. Its upkeep — dropping the
-- entries that left it, and renewing its life to cover every grant until the bucket
-- ends (`tenant_keep`) — is done once per demand bucket, by the call that `tends` it;
-- a grant to an empty window sets its life itself. So a grant always finds the window
-- living at least TTL + W + 1 s beyond it, and the entries that left a busy window are
-- at most a bucket's worth.
local tenant_used = redis.call('ZCOUNT', KEYS[1], horizon, '+inf')
local tenant_keep = ttl + window + 1000 + bucket_ms
if tends and tenant_used > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. horizon)
  redis.call('PEXPIRE', KEYS[1], tenant_keep, 'GT')
end
-- A caller whose tenant is within its guarantee, this call included, goes ahead of
-- every waiter of a tenant beyond its own (`queue::GUARANTEED_AHEAD_MS`): `rank` is its
-- place in the queue; `score`, its deadline, is what it carries to its next attempt.
rank = score
if queued and tenant_used + cost <= tonumber(ARGV[18]) then rank = score - 1000000000000 end

-- Dedicated tokens first, least used first; one with room wins over every pool token.
local n = n_dedicated
-- `earliest`: when the first full candidate has room (nil: none; `never` if none ever).
local best, best_used, best_token, earliest = nil, nil, nil, nil
local function sooner(at)
  if earliest == nil or at < earliest then earliest = at end
end
for idx = 1, n do
  local key = KEYS[6 + idx]
  local token = ARGV[19 + idx]
  local used = trim(key)
  local room = used + cost <= token_limit
  -- A token with room that would not beat the best so far needs no pacing read.
  local pace_fits = now
  if not room or best == nil or used < best_used then
    local _, fits = paced(token)
    pace_fits = fits
  end
  if room and pace_fits <= now then
    if best == nil or used < best_used then best, best_used, best_token = idx, used, token end
  else
    sooner(math.max(free_at(key, used, token_limit), pace_fits))
    if not room then drain_pace(token) end
  end
end

-- Then the pool's least used token that can take the call. This call is an ask: a
-- token whose window frees later drains its pace as of now (`pi_drain`).
local pool_pos = nil
if digest ~= '' then
  if best == nil then
    local token, p, used, tat, row = pi_choose(cost)
    if token == false then
      -- The index was lost though the fence said it lived: this call counts nothing,
      -- and its caller sends the pool's tokens to rebuild it (`pi_lost`).
      pi_lost()
      if first_attempt then redis.call('HINCRBY', KEYS[3], bucket, -cost) end
      return {-2, now}
    end
    if token then
      best, best_used, best_token, pool_pos = n + p, used, token, p
      pace_at[token], rows[token] = tat, row
    else
      sooner(pi_earliest(cost, never))
    end
  end
  if pace > 0 and PI.asked ~= now then redis.call('HSET', KEYS[#KEYS], asked_field, now) end
end

if earliest == nil then earliest = never end

if tenant_used + cost > tenant_limit then
  local free = free_at(KEYS[1], tenant_used, tenant_limit)
  -- Both limits bind: name the one that frees last (the upstream's on a tie).
  if best == nil and earliest >= free then return deny(2, earliest, free, true) end
  return deny(1, free, free, true)
end
if best == nil then
  -- No dedicated token passed (all out of service, or none) and every pool token out
  -- of service: that is the reason, not a full pool.
  if n == 0 and digest ~= '' and pi_all_out() then return deny(5, earliest, now, false) end
  return deny(2, earliest, now, false)
end

-- A pool slot goes to the waiters ahead first: count those that could use one now,
-- and the pool's room now (ready tokens, least used first) as far as it takes.
if has_waiters and pool_pos then
  -- `growth`: the first instant a walked token's binding pace (it allows fewer slots
  -- than the window) grows its room; when the waiters fill the room, every ready token
  -- was walked, so it is the first for the whole pool (the index keeps no pace events).
  -- A walked token's room is counted from its window, not its score (which may lag by
  -- up to W / 8: `index_scripts.rs`).
  local room, walked, ahead, growth = 0, 0, 0, math.huge
  local walked_keys = {}
  local function grow(need)
    while room < need do
      local e = redis.call('ZRANGE', PI.ready, walked, walked)
      if e[1] == '' or not e[1] then return end
      walked = walked + 1
      local key = base .. 'kw:' .. e[1]
      walked_keys[walked] = key
      local slots = PI.l - redis.call('ZCOUNT', key, horizon, '+inf')
      if pace > 0 then
        local tat = tonumber(redis.call('HGET', health_key(e[1]), 't')) or now
        local pace_room, _, grows = pace_math(tat, 1, pace, step)
        if grows and pace_room < slots then growth = math.min(growth, grows) end
        slots = math.min(slots, pace_room)
      end
      room = room + math.max(0, slots)
    end
  end
  grow(cost)
  for _, other in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. rank)) do
    if other ~= nonce and tonumber(redis.call('HGET', KEYS[6], other) or now) <= now then
      ahead = ahead + 1
      grow(ahead + cost)
      if ahead + cost > room then break end
    end
  end
  if ahead + cost > room then
    -- Room grows when a token can take a slot again (*wait*), a walked token's pace
    -- grows, or a walked token's use drops: its earliest entry leaves the window.
    for _, key in ipairs(walked_keys) do
      local e = redis.call('ZRANGE', key, horizon, '+inf', 'BYSCORE', 'LIMIT', 0, 1, 'WITHSCORES')
      if e[2] then growth = math.min(growth, tonumber(e[2]) + window + 1) end
    end
    return deny(2, math.min(pi_earliest(1, never), growth), now, false)
  end
end

-- A token that moved out of this space after the caller's configuration (`MOVE_OUT`) is
-- not granted here: the caller reloads its configuration. A mark older than the
-- caller's configuration, on a token the caller still finds here, is stale (the token
-- came back, or its move was never committed) and goes.
if tonumber(fence[3] or 0) > 0 then
  local moved_key = base .. 'moved:tokens'
  local mark = redis.call('HGET', moved_key, best_token)
  if mark then
    if tonumber(mark) > tonumber(ARGV[19]) then return {0, 6, 0, now, -1} end
    redis.call('HDEL', moved_key, best_token)
    redis.call('HSET', KEYS[#KEYS], 'moved', redis.call('HLEN', moved_key))
  end
end

-- The token's health has the last word (`breaker_scripts.rs`): a refused token is
-- reported, with until when, and nothing is recorded; the caller routes around it.
local expires = now + ttl
local verdict, state, untl = admit(best, health_key(best_token), nonce, expires, rows[best_token])
if verdict == 0 then
  if pool_pos then pi_refresh(best_token, pool_pos) end
  return reply({2, best, now, state, untl})
end

-- A call is in the queue only from its second attempt on.
if queued and ARGV[11] ~= '' then
  redis.call('ZREM', KEYS[4], nonce)
  redis.call('ZREM', KEYS[5], nonce)
  redis.call('HDEL', KEYS[6], nonce)
end

local token_key = base .. 'kw:' .. best_token
for i = 1, cost do
  local member = nonce .. '#' .. i
  redis.call('ZADD', KEYS[1], expires, member)
  redis.call('ZADD', token_key, expires, member)
end
-- Keep a window at least until its newest entry has left it: never shortened (GT) on a
-- window that held entries (every writer sets an expiry), and set on one that held
-- none in the window (just created, or holding only entries that left), which GT would
-- leave alone. The tenant's is kept once a bucket (above), unless it held none.
if tenant_used == 0 then redis.call('PEXPIRE', KEYS[1], tenant_keep) end
-- A pool token's window lives as long as its pool's index, which renews both
-- (`pi_ensure`), so only a window that held no entry needs its life set here; never
-- below the index's, which a later grant with a shorter TTL relies on.
local keep = ttl + window + 1000
if pool_pos and keep <= PI.keep / 2 then
  if best_used == 0 then redis.call('PEXPIRE', token_key, PI.keep) end
elseif best_used > 0 then
  redis.call('PEXPIRE', token_key, keep, 'GT')
elseif pool_pos then
  redis.call('PEXPIRE', token_key, math.max(keep, PI.keep))
else
  redis.call('PEXPIRE', token_key, keep)
end
local tat = now
if pace > 0 then
  tat = pace_at[best_token] or tonumber(redis.call('HGET', health_key(best_token), 't')) or now
  tat = math.max(tat, now) + cost * step
  -- A pool token's is written with its place in the index (`pi_granted`).
  if not pool_pos then set_schedule(health_key(best_token), tat, pace_life) end
end
-- A release is accepted as long as the lease's slots are counted (see RELEASE): the
-- record ends then, on the scripts' clock (a released one is judged by its end).
local ix, ip = '', ''
if pool_pos then ix, ip = digest, pool_pos end
redis.call('SET', KEYS[2], table.concat({ARGV[7], best_token, cost, expires, step, window, ix, ip}, '|'),
  'PXAT', expires + window)
if pool_pos then
  pi_granted(best_token, pool_pos, best_used + cost, best_used == 0, expires, verdict == 2, tat)
end
return reply({1, best, now, expires, tenant_used + cost, best_used + cost, verdict})
"#;

/// Demand of each tenant over the last `ARGV[2]` completed buckets.
///
/// - `KEYS[..]` the tenants' demand hashes; `ARGV[1]` bucket ms, `ARGV[2]` buckets per window.
///   Returns `{current bucket, asked₁, unmet₁, asked₂, unmet₂, …}`.
pub const DEMAND: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local bucket = math.floor(now / tonumber(ARGV[1]))
local n = tonumber(ARGV[2])
-- One HMGET per tenant: the asked counts of the last n completed buckets, then the
-- unmet ones.
local fields = {}
for b = bucket - n, bucket - 1 do
  fields[#fields + 1] = b
end
for b = bucket - n, bucket - 1 do
  fields[#fields + 1] = 'u' .. b
end
local out = {bucket}
for i = 1, #KEYS do
  local asked, unmet = 0, 0
  for j, v in ipairs(redis.call('HMGET', KEYS[i], unpack(fields))) do
    if v then
      if j <= n then asked = asked + tonumber(v) else unmet = unmet + tonumber(v) end
    end
  end
  out[#out + 1] = asked
  out[#out + 1] = unmet
end
return out
"#;

/// Marks an upstream's counters complete (`Counters::mark_fresh`): `KEYS[1]` its fence,
/// set to "no hold, confirmed by this Redis process" unless one is already there, a
/// hold included.
pub const MARK_FRESH: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  local server = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  redis.call('HSET', KEYS[1], 'until', 0, 'server', server)
end
return 1
"#;

/// Takes a waiter out of a queue: `KEYS[1..3]` the queue keys, `ARGV[1]` the nonce.
pub const LEAVE_QUEUE: &str = r#"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"#;

/// Records a lease's outcome, and feeds it to its token's health in the same script
/// (one round trip per release).
///
/// - `KEYS[1]` the lease record (see `ACQUIRE`), `KEYS[2]` the tenant's window,
///   `KEYS[3]` the token's window, `KEYS[4]` the token's health hash (which holds its
///   pacing schedule, see `ACQUIRE`), `KEYS[5]` the lease's once-only health marker
///   (`breaker_scripts::RECORD`)
/// - `ARGV[1]` outcome, `ARGV[2]` tenant id, `ARGV[3]` token id, `ARGV[4]` nonce,
///   `ARGV[5]` 1 to feed the outcome to the token's health (0: a lease given back),
///   `ARGV[6]` the prefix of the upstream's keys (to refresh a pool token in its pool's
///   index, `index_scripts.rs`), `ARGV[7..14]` the breaker policy, as `RECORD`'s
///   `ARGV[3..10]` (absent when not fed)
///
/// "not_used" removes the lease's entries (the slots come back, and so does the pace
/// the grant spent, as far as it is still ahead of now); any other outcome
/// moves their end to now (the call is over, so its occupancy ends now). A release
/// after the lease's expiry (a slow call that started at the last instant) is accepted
/// while its slots are counted, until expiry + W: it records the outcome but changes no
/// slot, whatever the outcome, since the call may have run until the expiry. A first
/// or a repeated release with the same outcome then goes to the token's health, which
/// applies each lease once. Returns `{result, previous, now, applied, transitions…}`:
/// result 1 released, 2 already released with this outcome, 3 released before with
/// another (`previous`: 1 success, 2 upstream error, 3 rate-limited, 4 not used), 4
/// unknown or past expiry + W; `applied` 1 when the health record changed.
/// The lease record expires when releases stop being accepted, so expired leases need
/// no cleanup pass.
pub const RELEASE: &str = r#"
-- The lease record (see ACQUIRE's `KEYS[2]`), as tenant, token, cost, expires,
-- outcome, step, index, position, window; absent fields nil.
--
-- A release replaces the record with a released one and reads the one it replaced, in
-- one command (`SET … XX GET KEEPTTL`: a missing record stays missing, and the record
-- keeps its expiry). A released record is the granted one's fields with the outcome
-- appended, as the previous release wrote it, but with only the ids known: no cost,
-- and an expiry never reached, since the key's own expiry (the lease's + W, when
-- releases stop being accepted) is what ends it. A repeated release only compares
-- with it. A release that changes nothing puts back what it replaced (`restore`): a
-- record that was not this lease's, or one released with another outcome.
--
-- During a rolling upgrade a record may still be the previous releases' (a hash, same
-- fields by name: `hashed`; or a string with `|<outcome>` appended once released):
-- read and written as such, so a lease an old replica granted is released here, and
-- a lease released here is released again through an old replica.
local outcome = ARGV[1]
local lease = {}
local released_record = table.concat({ARGV[2], ARGV[3], '', '9007199254740992', '', '0', '', '', outcome}, '|')
local raw = redis.pcall('SET', KEYS[1], released_record, 'XX', 'GET', 'KEEPTTL')
local hashed = type(raw) == 'table' and raw.err ~= nil
if hashed then
  local h = redis.call('HMGET', KEYS[1], 'tenant', 'token', 'cost', 'expires', 'outcome',
    'step', 'ix', 'ip', 'w')
  for i = 1, 9 do lease[i] = h[i] or nil end
elseif raw then
  local f = {}
  for field in string.gmatch(raw .. '|', '([^|]*)|') do
    if field == '' then f[#f + 1] = false else f[#f + 1] = field end
  end
  lease = {f[1], f[2], f[3], f[4], f[9] or nil, f[5], f[7] or nil, f[8] or nil, f[6]}
end
local function restore()
  if raw and not hashed then redis.call('SET', KEYS[1], raw, 'KEEPTTL') end
end
local function note_outcome(outcome)
  if hashed then redis.call('HSET', KEYS[1], 'outcome', outcome) end
end
-- A release is accepted while the lease's slots are counted (expiry + W); one after
-- the expiry (`late`) records the outcome only: its call may have run until then.
local late = lease[4] and tonumber(lease[4]) < now
-- A released record keeps no expiry of its own: its key's is the lease's + W (set by
-- ACQUIRE on the scripts' clock), read here since Redis may keep a key a millisecond
-- past it.
local function past_end()
  if tonumber(lease[4]) + tonumber(lease[9] or 0) < now then return true end
  if not lease[5] then return false end
  local ends = redis.call('PEXPIRETIME', KEYS[1])
  return ends >= 0 and ends < now
end
local function released()
  if not lease[1] or lease[1] ~= ARGV[2] or lease[2] ~= ARGV[3] or past_end() then
    restore()
    return 4
  end
  if lease[5] then
    if lease[5] == outcome then return 2 end
    restore()
    return 3
  end
  -- A release not fed to the token's health (a lease given back) may be repeated fed,
  -- and then apply to the health and move the token in its pool's index: its record
  -- keeps the lease's place (the granted record with the outcome appended).
  if raw and not hashed and ARGV[5] ~= '1' and lease[7] then
    redis.call('SET', KEYS[1], raw .. '|' .. outcome, 'KEEPTTL')
  end
  if late then
    note_outcome(outcome)
    return 1
  end
  for i = 1, tonumber(lease[3]) do
    local member = ARGV[4] .. '#' .. i
    if outcome == 'not_used' then
      redis.call('ZREM', KEYS[2], member)
      redis.call('ZREM', KEYS[3], member)
    else
      redis.call('ZADD', KEYS[2], 'XX', now, member)
      redis.call('ZADD', KEYS[3], 'XX', now, member)
    end
  end
  local step = tonumber(lease[6] or 0)
  if outcome == 'not_used' and step > 0 then
    local tat = tonumber(redis.call('HGET', KEYS[4], 't')) or 0
    if tat > now then
      tat = math.max(now, tat - tonumber(lease[3]) * step)
      redis.call('HSET', KEYS[4], 't', tostring(tat))
    end
  end
  note_outcome(outcome)
  return 1
end
local result = released()
local previous = 0
if result == 3 then
  previous = ({success = 1, upstream_error = 2, upstream_rate_limited = 3, not_used = 4})[lease[5]] or 0
end
-- A pool token's place in its pool's index follows what the release changed: its use
-- (not used), its health, or the instant a full token frees. On a token with room,
-- another outcome changes neither its use nor its room, only the instant its use next
-- drops (its entries now leave the window W after now), which the index does not keep
-- exactly for a ready token (`index_scripts.rs`); nor does it change when a token out
-- for its pace alone may take a slot. Whether the token is out for its window or its
-- health is the field `x:<digest>` of its health record, read with the record the
-- outcome is fed to: one command for both.
local fed = ARGV[5] == '1' and result <= 2
local placed = result == 1 and lease[7] and not late
local row = nil
if fed or (placed and outcome ~= 'not_used') then
  row = redis.call('HMGET', KEYS[4], 'b', 'f', 'ou', 'pn', 'pe', 'ps', 'qu', 't', 'x:' .. (lease[7] or ''))
end
local applied = 0
if fed then
  applied = record(1, KEYS[4], KEYS[5], ARGV[4], outcome, {unpack(ARGV, 7, 14)}, row)
end
local moved = false
if placed then
  moved = outcome == 'not_used' or row[9] ~= false
end
if (moved or applied == 1) and lease[7] then
  local cfg = redis.call('HMGET', ARGV[6] .. 'im:' .. lease[7], 'w', 'l', 'p')
  if cfg[1] then
    pi_open(ARGV[6], lease[7], tonumber(cfg[1]), tonumber(cfg[2]), tonumber(cfg[3]))
    pi_refresh(ARGV[3], tonumber(lease[8]))
  end
end
return reply({result, previous, now, applied})
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

/// A token moves out of this counters space (`Counters::prepare_moves`), before the
/// configuration that moves it commits as version `ARGV[2]`: it is marked moved at that
/// version (`KEYS[2]`, the space's marks: token → version), and the space's fence
/// (`KEYS[1]`) counts the marks, so that `ACQUIRE` reads a mark only while there is one.
/// A caller planning from an older configuration is then not granted the token here.
/// `KEYS[3]` is unused (the token's health record, read by `PEEK_HEALTH`).
pub const MOVE_OUT: &str = r#"
local mark = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or 0)
if tonumber(ARGV[2]) > mark then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
redis.call('HSET', KEYS[1], 'moved', redis.call('HLEN', KEYS[2]))
return 1
"#;

/// A token's health record (`KEYS[1]`) to carry over to its new space: its PTTL, then
/// its fields and values (`MOVE_IN`).
pub const PEEK_HEALTH: &str = r#"
local out = {redis.call('PTTL', KEYS[1])}
for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do out[#out + 1] = v end
return out
"#;

/// A token moves into this counters space (`Counters::prepare_moves`): its window here
/// (`KEYS[1]`) is filled up to its limit (`ARGV[3]`) with entries that end `ARGV[2]` ms
/// from now, the longest a lease granted in its old space may still be used, so the
/// slots it held there are not granted again here until they have left every window
/// (W, `ARGV[4]` ms, later). A mark from an earlier move out of this space goes (`KEYS[2]`,
/// counted in the fence `KEYS[3]`), and its health record (`KEYS[4]`) is replaced by the
/// one carried over: PTTL `ARGV[5]` (< 0: none), then fields and values.
pub const MOVE_IN: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local till = now + tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local i = 1
while i <= limit do
  local args = {}
  for j = i, math.min(limit, i + 499) do
    args[#args + 1] = till
    args[#args + 1] = 'handover#' .. j
  end
  redis.call('ZADD', KEYS[1], 'GT', unpack(args))
  i = i + 500
end
local keep = tonumber(ARGV[2]) + tonumber(ARGV[4]) + 1000
if redis.call('PEXPIRE', KEYS[1], keep, 'GT') == 0 and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], keep)
end
if redis.call('HDEL', KEYS[2], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[3], 'moved', redis.call('HLEN', KEYS[2]))
end
redis.call('DEL', KEYS[4])
if #ARGV > 5 then
  redis.call('HSET', KEYS[4], unpack(ARGV, 6))
  local pttl = tonumber(ARGV[5])
  if pttl > 0 then redis.call('PEXPIRE', KEYS[4], pttl) end
end
return 1
"#;
