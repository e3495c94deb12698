//! The Lua scripts of token health (breaker and quarantine) in Redis, as documented
//! constants. The state machine is the one in `breaker.rs` (`HealthRecord`), step by
//! step; read that first.
//!
//! Why Lua (see also `scripts.rs`): every operation reads the record, settles the
//! transitions time made due, decides, and writes — branching on what it read. As one
//! script it is atomic across replicas, so exactly one caller sees each transition.
//! Time is Redis `TIME`, like the windows.
//!
//! One hash per token, `<prefix>:{<upstream>}:health:<token>` (the upstream's hash tag,
//! like the windows, so it runs on Redis Cluster). Fields, all optional (an absent
//! hash is a closed breaker, no quarantine):
//! - `b` breaker: 1 closed, 2 open, 3 half-open (the `TokenState` codes)
//! - `f` consecutive failures while closed; `ou` open until (ms)
//! - `pn` / `pe` the half-open probe lease's nonce / expiry (ms); `ps` probe successes
//! - `qu` quarantine until (ms), 0 = none
//!
//! The same hash holds two things that are not health, so that the acquire reads them
//! in the one command that reads the token's health: `t`, the token's pacing schedule
//! (`set_schedule` in `index_scripts.rs`), and `x:<digest>`, the pool indexes that hold
//! the token out because its window is full or its health refuses (`index_scripts.rs`).
//!
//! A record back to "closed, no failures, no quarantine" loses its fields (the hash
//! goes with them unless it holds a pacing schedule or index references). Others
//! expire a day after their last pending instant, so a token deleted from the
//! configuration leaves nothing behind; a breaker forgotten that way is simply closed
//! again.
//!
//! Transitions are returned flat, six integers each: `token_index (1-based), at,
//! previous state, new state, until (0 = none), cause` (`C_*` below, as
//! `TransitionCause` in `breaker.rs`).

/// Shared by every script: the clock, the codes, load / settle / save, and the two
/// decisions also folded into the lease functions (`scripts.rs`): `admit` and `record`.
/// Definitions only, so that the lease functions' library can hold them once: a script
/// or a function starts with `begin()`, which reads the clock (`prelude!` adds that
/// call for a script).
macro_rules! helpers {
    () => {
        r#"
local now, transitions = 0, {}
local function begin()
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  transitions = {}
end
local ACTIVE, OPEN, HALF_OPEN, QUARANTINED = 1, 2, 3, 4
local C_ERRORS, C_OPEN_ELAPSED, C_PROBES_OK, C_PROBE_FAILED, C_RATE_LIMITED, C_QUARANTINE_OVER = 1, 2, 3, 4, 5, 6
local KEEP_MS = 86400000

local function emit(index, at, previous, new, untl, cause)
  for _, v in ipairs({index, at, previous, new, untl, cause}) do
    transitions[#transitions + 1] = v
  end
end

-- A token's record as `load` reads it, and its pacing schedule (`t`, the 8th).
local function health_row(key)
  return redis.call('HMGET', key, 'b', 'f', 'ou', 'pn', 'pe', 'ps', 'qu', 't')
end

-- The record of `key`, from `v` when the caller has read it (`health_row`).
local function load(key, v)
  v = v or health_row(key)
  return {
    b = tonumber(v[1]) or ACTIVE, f = tonumber(v[2]) or 0, ou = tonumber(v[3]) or 0,
    pn = v[4] or '', pe = tonumber(v[5]) or 0, ps = tonumber(v[6]) or 0,
    qu = tonumber(v[7]) or 0,
  }
end

local function save(key, s)
  if s.b == ACTIVE and s.f == 0 and s.qu == 0 then
    redis.call('HDEL', key, 'b', 'f', 'ou', 'pn', 'pe', 'ps', 'qu')
    return
  end
  redis.call('HSET', key, 'b', s.b, 'f', s.f, 'ou', s.ou, 'pn', s.pn, 'pe', s.pe,
    'ps', s.ps, 'qu', s.qu)
  redis.call('PEXPIRE', key, KEEP_MS + math.max(0, s.qu - now, s.ou - now))
end

local function end_quarantine(index, s)
  local untl = 0
  if s.b == OPEN then untl = s.ou end
  emit(index, s.qu, QUARANTINED, s.b, untl, C_QUARANTINE_OVER)
  s.qu = 0
end

-- Applies the transitions time made due by now, in the order they happened; returns
-- whether the record changed.
local function settle(index, s)
  local open_due = s.b == OPEN and s.ou <= now
  local q_due = s.qu > 0 and s.qu <= now
  local q_first = q_due and ((not open_due) or s.qu < s.ou)
  local changed = open_due or q_due
  if q_first then end_quarantine(index, s) end
  if open_due then
    emit(index, s.ou, OPEN, HALF_OPEN, 0, C_OPEN_ELAPSED)
    s.b, s.ou, s.pn, s.pe, s.ps = HALF_OPEN, 0, '', 0, 0
  end
  if q_due and not q_first then end_quarantine(index, s) end
  -- A probe lease that expired unreleased frees the probe slot (a lease may be
  -- released up to and including its expiry instant).
  if s.pn ~= '' and s.pe < now then
    s.pn, s.pe = '', 0
    changed = true
  end
  return changed
end

local function reply(head)
  for _, v in ipairs(transitions) do head[#head + 1] = v end
  return head
end

-- May a lease granted now on the token of `key` (index `index` in the reply's
-- transitions) be handed out? Claims a half-open token's probe slot for `nonce` until
-- `expires`. Returns verdict (1 leasable, 2 leasable as the probe, 0 refused), the
-- state that refused (4 quarantined, 2 open, 3 half-open with a probe out) and until
-- when it may. `row`: the record, when the caller read it in this call.
local function admit(index, key, nonce, expires, row)
  local s = load(key, row)
  local dirty = settle(index, s)
  local verdict, state, untl = 1, ACTIVE, 0
  if s.qu > now then
    verdict, state, untl = 0, QUARANTINED, s.qu
    if s.b == OPEN and s.ou > untl then untl = s.ou end
  elseif s.b == OPEN then
    verdict, state, untl = 0, OPEN, s.ou
  elseif s.b == HALF_OPEN then
    if s.pn ~= '' and s.pn ~= nonce then
      verdict, state, untl = 0, HALF_OPEN, s.pe + 1
    else
      s.pn, s.pe = nonce, expires
      verdict, state, dirty = 2, HALF_OPEN, true
    end
  end
  if dirty then save(key, s) end
  return verdict, state, untl
end

-- Applies a released lease's outcome to the token of `key`, once per lease (`marker`).
-- `p` is the policy: failures to open, open ms, successes to close, the reported
-- blocked-until ms ('' when absent), the profile's block ms, the shortest and longest
-- quarantine ms, how long to keep the marker (ms). `row`: the record, when the caller
-- read it in this call. Returns 1 if it changed the record.
local function record(index, key, marker, nonce, outcome, p, row)
  local s = load(key, row)
  local dirty = settle(index, s)
  local is_probe = s.b == HALF_OPEN and s.pn == nonce
  local relevant = outcome == 'upstream_rate_limited' or is_probe
    or (s.b == ACTIVE and (outcome == 'upstream_error' or (outcome == 'success' and s.f > 0)))
  local applied = 0
  if relevant and redis.call('SET', marker, '1', 'NX', 'PXAT', now + tonumber(p[8])) then
    applied, dirty = 1, true
    local open_until = now + tonumber(p[2])
    if is_probe then s.pn, s.pe = '', 0 end
    if outcome == 'upstream_rate_limited' then
      local q = now + tonumber(p[5])
      if p[4] ~= '' then q = tonumber(p[4]) end
      q = math.min(math.max(q, now + tonumber(p[6])), now + tonumber(p[7]))
      if s.qu == 0 then
        emit(index, now, s.b, QUARANTINED, q, C_RATE_LIMITED)
        s.qu = q
      elseif q > s.qu then
        s.qu = q
      end
    elseif outcome == 'success' then
      if s.b == ACTIVE then
        s.f = 0
      elseif is_probe then
        s.ps = s.ps + 1
        if s.ps >= tonumber(p[3]) then
          s.b, s.f, s.ps = ACTIVE, 0, 0
          emit(index, now, HALF_OPEN, ACTIVE, 0, C_PROBES_OK)
        end
      end
    elseif outcome == 'upstream_error' then
      if s.b == ACTIVE then
        s.f = s.f + 1
        if s.f >= tonumber(p[1]) then
          s.b, s.f, s.ou = OPEN, 0, open_until
          emit(index, now, ACTIVE, OPEN, open_until, C_ERRORS)
        end
      elseif is_probe then
        s.b, s.ou, s.ps = OPEN, open_until, 0
        emit(index, now, HALF_OPEN, OPEN, open_until, C_PROBE_FAILED)
      end
    end
  end
  if dirty then save(key, s) end
  return applied
end
"#
    };
}
pub(super) use helpers;

/// `helpers!` and its `begin()`: what every script starts with.
macro_rules! prelude {
    () => {
        concat!(
            $crate::store::counters::breaker_scripts::helpers!(),
            "begin()\n"
        )
    };
}

use super::index_scripts::pool_index;

/// Decides whether a lease the counters just granted may be handed out, claiming the
/// probe slot of a half-open token.
///
/// - `KEYS[1]` the token's health hash
/// - `ARGV[1]` the lease nonce, `ARGV[2]` the lease's expiry (ms)
///
/// Returns `{now, verdict, state, until, transitions…}`: verdict 1 leasable, 2 leasable
/// as the probe, 0 refused (then `state` says why — 4 quarantined, 2 open, 3 half-open
/// with a probe out — and `until` when that may end).
pub const ADMIT: &str = concat!(
    prelude!(),
    r#"
local verdict, state, untl = admit(1, KEYS[1], ARGV[1], tonumber(ARGV[2]))
return reply({now, verdict, state, untl})
"#
);

/// Applies a released lease's outcome.
///
/// - `KEYS[1]` the token's health hash, `KEYS[2]` the lease's once-only marker
///   (`<prefix>:{<upstream>}:health-done:<nonce>`)
/// - `ARGV[1]` nonce, `ARGV[2]` outcome (`ReleaseOutcome::as_str`), `ARGV[3]` failures
///   to open, `ARGV[4]` open ms, `ARGV[5]` successes to close, `ARGV[6]` the reported
///   blocked-until ms or '' when absent, `ARGV[7]` the profile's block ms, `ARGV[8]` /
///   `ARGV[9]` the shortest / longest quarantine ms, `ARGV[10]` how long to keep the
///   marker (ms: beyond the lease's life, so a repeated release finds it)
///
/// An outcome that changes nothing (a success on a healthy token) writes nothing, not
/// even the marker. Returns `{now, applied (0/1), transitions…}`.
pub const RECORD: &str = concat!(
    prelude!(),
    r#"
local policy = {unpack(ARGV, 3, 10)}
return reply({now, record(1, KEYS[1], KEYS[2], ARGV[1], ARGV[2], policy)})
"#
);

/// `STATUS`'s body: appends to `out` the health of the token of `KEYS[i]`, settling
/// what became due.
macro_rules! status_of {
    () => {
        r#"
local function status_of(i, out)
  local s = load(KEYS[i])
  if settle(i, s) then save(KEYS[i], s) end
  local state, untl, failures = s.b, 0, 0
  if s.b == OPEN then untl = s.ou end
  if s.b == ACTIVE then failures = s.f end
  if s.qu > 0 then
    state = QUARANTINED
    untl = math.max(s.qu, untl)
  end
  out[#out + 1] = state
  out[#out + 1] = s.b
  out[#out + 1] = untl
  out[#out + 1] = failures
end
"#
    };
}

/// Reads the health of several tokens (settling what became due).
///
/// - `KEYS[..]` the tokens' health hashes; no ARGV.
///
/// Returns `{now, n, then n × (state, breaker, until (0 = none), consecutive failures),
/// transitions…}` where state is 4 while quarantined, else the breaker's.
pub const STATUS: &str = concat!(
    prelude!(),
    status_of!(),
    r#"
local out = {now, #KEYS}
for i = 1, #KEYS do status_of(i, out) end
return reply(out)
"#
);

/// Forgets a token's health record (`Counters::reset_health`) and puts the token back
/// in the pool indexes the record names (`index_scripts.rs`): `KEYS[1]` the record;
/// `ARGV[1]` the prefix of the upstream's keys, `ARGV[2]` the token id. The token's
/// pacing schedule, in the same hash, stays. Returns its health just before, as
/// `STATUS` does for one token: read in the same script, at the same instant, so no
/// other call comes between the health reported and the reset.
pub const RESET: &str = concat!(
    prelude!(),
    status_of!(),
    pool_index!(),
    r#"
local out = {now, 1}
status_of(1, out)
local refs = redis.call('HGETALL', KEYS[1])
local gone = {}
for i = 1, #refs, 2 do
  if refs[i] ~= 't' then gone[#gone + 1] = refs[i] end
end
if #gone > 0 then redis.call('HDEL', KEYS[1], unpack(gone)) end
pi_refresh_refs(ARGV[1], ARGV[2], refs)
return reply(out)
"#
);
