//! The pool index: how the acquire script finds the least used pool token that can take
//! a slot, and the earliest instant one can, without reading every token of the pool.
//!
//! # What it holds
//!
//! One index per pool token list (and window, limit and pacing: `RedisCounters` names
//! it by a digest of all four, so a configuration change starts a new one), three keys
//! under the upstream's hash tag:
//! - `ir:<digest>` *ready* (sorted set): the tokens that can take one slot now — room in
//!   their window, their pace allows one, their health admits a lease — scored by
//!   `used × 2^17 + position` as of the token's last grant or refresh, so the first
//!   member is the least used (within the re-scoring delay below), the first listed on a
//!   tie (the order of the old full scan);
//! - `iw:<digest>` *wait* (sorted set): for a token out of *ready*, the instant it can
//!   take one slot (its window frees one, its pace allows one, its quarantine or open
//!   breaker ends, its half-open probe expires: the latest of these); for a token in
//!   *ready*, when to re-score it: the instant its use next drops (its earliest entry
//!   leaves the window), but no sooner than W / 8 after its last refresh. Absent: its
//!   use does not change with time alone. A ready token's pace growing
//!   changes neither its place nor its readiness, only the room counted for waiters;
//!   the caller who counts that room reads every ready token's pace anyway and takes
//!   the first growth from there (`ACQUIRE`), so *wait* holds no pace events: a grant
//!   does not make its token due again one pace step later;
//! - `ih:<digest>` *out* (sorted set): the tokens whose health refuses leases, until
//!   when: when it holds every token, a denial says "no usable token", not "full";
//! - `ip:<digest>` the tokens' positions (hash), and `im:<digest>` its settings (hash:
//!   `w` window, `l` limit, `p` pacing allowance).
//!
//! Three facts about an index are fields of the upstream's fence, which the acquire
//! reads anyway (`scripts::ACQUIRE`), so that a decision that finds nothing to do about
//! them spends no command on them:
//! - `a:<digest>`, the last instant a caller asked the pool (`pi_drain`);
//! - `n:<digest>`, an instant no later than the first instant of *wait*: no token is
//!   due before it, so the choice reads *wait* only from then on (`pi_settle_due`).
//!   Every addition to *wait* lowers it when it comes sooner (`pi_wait`); a removal
//!   leaves it low, which costs one read that finds nothing due and sets it anew;
//! - `r:<digest>`, the instant the index's life is to be renewed: before it, the index
//!   lives at least half its life on, so the acquire does not check that it exists
//!   (`pi_ensure`). An index lost meanwhile (flushed or evicted alone) is noticed by the
//!   choice, which finds no *ready* set, not even its sentinel: the call then has the
//!   caller send the pool's tokens, as for a missing index, and counts nothing.
//!
//! A fence lost with them is a hold (`scripts::ACQUIRE`); a missing field means "read
//! the index": each is only ever a shortcut. The fields of an index that is gone are
//! dropped when another index of the space is built (`pi_forget_gone`), so a fence
//! holds the fields of the live indexes, not of every configuration ever used; so are
//! the wait queues' fields (`q:<queue>`) that no live waiter needs, such as a removed
//! pool's (a live queue's is written again by its next call). The build also drops a
//! gone index's name (`x:<digest>`) from the health records of the tokens it indexes:
//! a token of a pool in use, whose record lives on, does not collect one field per
//! configuration of its pool.
//!
//! The sorted sets keep a sentinel member `''` scored `+inf`, so that they never empty
//! (an empty key would lose its expiry) and their first member is "none" when only it
//! is left. The five keys expire together, 10 windows + 10 minutes after the index was
//! last used, and the pool tokens' windows with them: renewed at half that life (the
//! tokens' a page per call, `pi_sweep`), they outlive any lease granted meanwhile
//! (unless the lease TTL is longer than half the index's life: then each grant renews
//! its token's window, as for a dedicated token),
//! which saves a command per grant. So do the pool tokens' pacing schedules, which are
//! fields of their health records (`set_schedule`). The digest's suffix marks the
//! scheme: `-i2` when windows took the index's life, `-i3` when the schedules moved
//! from one hash per upstream into the health records, `-i4` when the renewal of the
//! tokens went into pages (`pi_sweep`: a replica of an earlier release would set
//! `r:<digest>` mid-renewal and stop it). An index of an earlier scheme is not reused,
//! and building the new one gives every window and schedule the index's life.
//!
//! A token out of *ready* because its window is full or its health refuses a lease has
//! its health record name the index (`x:<digest>` → position), and only such a token:
//! the field goes when the token is back in *ready*, or out for its pace alone. A
//! release reads it with the health record it feeds (one command for both) to know
//! whether what it changed can bring the token back sooner: a full token frees sooner
//! when a lease ends early, a token out for its pace does not (and one in *ready* stays
//! there). An admin's reset (`breaker_scripts::RESET`) puts the token back at once in
//! every index its record names. The first grant that fills a paced token names the
//! index in the same write as the token's schedule (`pi_granted`).
//!
//! # Why it is exact
//!
//! A token's readiness is right as long as nothing but time changes the token, because
//! every condition of "can take one slot" only ever turns true with time (entries leave
//! the window, the pace earns, a quarantine ends) and the instant it does is known. The
//! writes that change a token — a grant, a release (its outcome moves or removes
//! entries, and changes its health), a pace drained — refresh its entry in the same
//! script (`pi_refresh`), and every decision first refreshes the tokens whose *wait*
//! instant has come (a bounded number per call; the choice keeps refreshing while the
//! index is behind). So the first member of *ready* can take a slot, and, when *ready*
//! is empty, the first instant of *wait* is the exact earliest instant one can. The
//! choice is then checked against the token's own window before anything is granted: a
//! wrong index could only cost a retry, never a slot over the limit (invariant 1 rests
//! on that check, as before).
//!
//! What is not exact is the order among ready tokens: a ready token's score is its use
//! when it was last granted or refreshed, and entries leaving its window re-score it at
//! most once per W / 8. Re-scoring at every entry that leaves cost a refresh (about six
//! commands) per granted pair once the windows were full. The choice is the least used
//! as of those scores — a token whose use dropped waits at most W / 8 for its place —
//! and everything that counts room reads the windows themselves: the room for the
//! waiters ahead of a caller is each walked token's own count, and the instant it grows
//! includes each walked token's exact next drop (`ACQUIRE`). A re-scoring instant is
//! never before its token's exact next drop, so the earlier of the first instant of
//! *wait* and those drops is still the exact instant room grows.
//!
//! Costs: a decision reads O(log n) per token it refreshes, and refreshes the chosen
//! token, the due ones (at most eight per token per window) and, for a caller behind
//! waiters, reads as many ready tokens as it takes to count the room for the waiters
//! ahead. Requests of cost > 1 walk the ready tokens in order and, when none fits, read
//! every token for the earliest instant (rare, and bounded by the pool).
//!
//! The one write to a token outside the lease scripts, an admin's health reset, refreshes
//! the token in the indexes its health record names.

/// The index's Lua: `pace_math`, `set_schedule`, `pi_open`, `pi_refresh`, `pi_ensure`,
/// `pi_settle_due`, `pi_choose`, `pi_all_out`, `pi_refresh_refs`, `pi_earliest`. Needs
/// `now` (the breaker prelude).
macro_rules! pool_index {
    () => {
        r#"
-- GCRA (see ACQUIRE): for schedule `tat`, how many slots the pace allows now, the
-- instant it allows `c` more, and the instant it allows one more than now (nil when it
-- is at its full allowance, so time earns it nothing).
local function pace_math(tat, c, pace, step)
  local ahead = math.max(tat, now) - now
  local room = math.max(0, math.floor((pace * step - ahead) / step))
  local fits = math.max(now, math.ceil(tat - math.max(0, pace - c) * step))
  local grows = nil
  if room < pace then grows = math.ceil(tat - (pace - room - 1) * step) end
  return room, fits, grows
end

local M = 131072
local PI = nil

-- Records a token's pacing schedule (at most a window ahead): the field `t` of its
-- health record `key` (`breaker_scripts.rs`), so that the acquire reads it with the
-- token's health. The record lives while the schedule is ahead. A pool token's (`life`
-- nil) is checked only when it adds the field: otherwise the record already had a
-- life, a day or more (a health record's) or the index's, which the pool's index
-- renews at half while in use (`pi_ensure`). A dedicated token's extends the record's
-- life as far as the schedule needs. A record without a life gets `life` ms, the
-- index's for a pool token.
-- `field`, `value`: one more field to write in the same command (`pi_granted`), new
-- to the record.
local function set_schedule(key, tat, life, field, value)
  local added
  if field then
    added = redis.call('HSET', key, 't', tostring(tat), field, value) == 2
  else
    added = redis.call('HSET', key, 't', tostring(tat)) == 1
  end
  if life == nil then
    if not added then return end
    life = PI.keep
  end
  local left = redis.call('PTTL', key)
  local keep = math.ceil(tat - now) + 1000
  if left == -1 then
    redis.call('PEXPIRE', key, math.max(keep, life))
  elseif left < keep then
    redis.call('PEXPIRE', key, keep)
  end
end

local function pi_open(base, digest, w, l, pace)
  local step = 0
  if pace > 0 then step = w / l end
  PI = {base = base, ready = base .. 'ir:' .. digest, wait = base .. 'iw:' .. digest,
    pos = base .. 'ip:' .. digest, meta = base .. 'im:' .. digest, out = base .. 'ih:' .. digest,
    digest = digest, fence = base .. 'fence:epoch', next_field = 'n:' .. digest,
    renew_field = 'r:' .. digest, x_field = 'x:' .. digest,
    w = w, l = l, pace = pace, step = step, keep = 10 * w + 600000,
    rescore = math.floor(w / 8)}
end

-- The token's health record (`breaker_scripts.rs`), which holds its pacing schedule.
local function pi_health(token)
  return PI.base .. 'health:' .. token
end

-- The token's record as `health_row` reads it, and its field `x:<digest>` (the 9th):
-- set while the token is out of *ready* for its window or its health (module doc).
local function pi_row(token)
  return redis.call('HMGET', pi_health(token), 'b', 'f', 'ou', 'pn', 'pe', 'ps', 'qu', 't', PI.x_field)
end

-- When a token's health admits a lease (now, or the instant it may), from its record
-- as `health_row` reads it: read only; the admission at the grant settles and reports
-- what time made due.
local function health_at(v)
  local b, ou, pe, qu = tonumber(v[1]) or 1, tonumber(v[3]) or 0, tonumber(v[5]) or 0, tonumber(v[7]) or 0
  local at = now
  if qu > now then at = qu end
  if b == 2 then at = math.max(at, ou) end
  if b == 3 and (v[4] or '') ~= '' and pe >= now then at = math.max(at, pe + 1) end
  return at
end

-- A token whose window had no room and has now: if callers asked meanwhile, its pace
-- keeps only a quarter of its allowance, as of the last ask (see ACQUIRE's pacing).
local function pi_drain(token, tat)
  local asked = PI.asked
  if asked == nil then
    asked = tonumber(redis.call('HGET', PI.fence, 'a:' .. PI.digest)) or 0
  end
  local keep = math.ceil(PI.pace / 4)
  if tat < asked + (PI.pace - keep - 1) * PI.step then
    tat = asked + (PI.pace - keep) * PI.step
    set_schedule(pi_health(token), tat)
  end
  return tat
end

-- `n:<digest>` (see the module doc): read where the caller has not (`nil`).
local function pi_next()
  if PI.next == nil then PI.next = tonumber(redis.call('HGET', PI.fence, PI.next_field)) or 0 end
  return PI.next
end

-- Adds the token to *wait* at `at`, lowering `n:<digest>` when it comes sooner.
local function pi_wait(token, at)
  redis.call('ZADD', PI.wait, at, token)
  if at < pi_next() then
    PI.next = at
    redis.call('HSET', PI.fence, PI.next_field, at)
  end
end

-- Puts the token at position `p` where it belongs (see the module doc); returns its
-- slots in use and its pacing schedule. `was_ready`: the token is in *ready* and only
-- time has passed since (its health cannot have worsened, its pace not drained).
-- `row`: its health record, when the caller read it in this call (`pi_row`).
local function pi_refresh(token, p, was_ready, row)
  local key = PI.base .. 'kw:' .. token
  redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. (now - PI.w))
  local used = redis.call('ZCARD', key)
  local window_at = now
  if used >= PI.l then
    window_at = tonumber(redis.call('ZRANGE', key, used - PI.l, used - PI.l, 'WITHSCORES')[2]) + PI.w + 1
  end
  -- A token in *ready* could take a slot and only time has passed: its pace still
  -- allows one (pace only grows with time), so it is not read.
  local tat, pace_fits, health_from = now, now, now
  if not was_ready then
    row = row or pi_row(token)
    health_from = health_at(row)
    if PI.pace > 0 then
      tat = tonumber(row[8]) or now
      if window_at <= now and not redis.call('ZSCORE', PI.ready, token) then
        tat = pi_drain(token, tat)
      end
      pace_fits = select(2, pace_math(tat, 1, PI.pace, PI.step))
    end
  end
  if was_ready then
    -- still healthy: nothing to write about its health
  elseif health_from > now then
    -- Out of service: counted (all out is "no usable token").
    redis.call('ZADD', PI.out, health_from, token)
  else
    redis.call('ZREM', PI.out, token)
  end
  -- A token out of *ready* because its window is full or its health refuses has its
  -- health record name this index (`x:<digest>`, see the module doc); a token in
  -- *ready* has no such field (`was_ready`: none to read).
  local named = not was_ready and row[9] ~= false
  local at = math.max(window_at, pace_fits, health_from)
  if at > now then
    redis.call('ZREM', PI.ready, token)
    pi_wait(token, at)
    local key = pi_health(token)
    if window_at <= now and health_from <= now then
      -- Out for its pace only: what a release changes cannot bring it back sooner.
      if named then redis.call('HDEL', key, PI.x_field) end
    elseif not named then
      redis.call('HSET', key, PI.x_field, p)
      -- A record just created lives as long as the index (`pi_ensure` renews it).
      if was_ready or not (row[1] or row[2] or row[3] or row[4] or row[5] or row[6] or row[7] or row[8]) then
        if redis.call('PTTL', key) == -1 then redis.call('PEXPIRE', key, PI.keep) end
      end
    end
    return used, tat
  end
  if named then redis.call('HDEL', pi_health(token), PI.x_field) end
  redis.call('ZADD', PI.ready, used * M + p, token)
  if used > 0 then
    -- Re-scored when its use drops, but at most once per W / 8 (see the module doc).
    local change = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]) + PI.w + 1
    pi_wait(token, math.max(change, now + PI.rescore))
  else
    redis.call('ZREM', PI.wait, token)
  end
  return used, tat
end

-- After a grant of the token at position `p` (checked just before, so it had room and
-- is healthy, and was in *ready*), which now holds `used` slots and whose pacing
-- schedule is now `tat`: records the schedule (`set_schedule`), and puts the token in
-- its new place, known without reading its window again, unless it became full or
-- the grant is the probe of a half-open token (which keeps it out until the probe
-- ends): then its record names the index (`x:<digest>`), in the same write as its
-- schedule.
local function pi_granted(token, p, used, was_empty, expires, probe, tat)
  if used >= PI.l or probe then
    if PI.pace > 0 then set_schedule(pi_health(token), tat, nil, PI.x_field, p) end
    pi_refresh(token, p)
    return
  end
  local fits = now
  if PI.pace > 0 then fits = select(2, pace_math(tat, 1, PI.pace, PI.step)) end
  if PI.pace > 0 then set_schedule(pi_health(token), tat) end
  if fits > now then
    redis.call('ZREM', PI.ready, token)
    pi_wait(token, fits)
    return
  end
  redis.call('ZADD', PI.ready, used * M + p, token)
  -- Its use next drops when its first entry leaves the window: this grant's, if it was
  -- empty; otherwise the instant already in *wait* stands.
  if was_empty then pi_wait(token, expires + PI.w + 1) end
end

-- Forgets the fence fields (`a:`, `n:`, `r:`) of this space's indexes that are gone
-- (expired, or lost): a gone index is built afresh, without them, on its next use.
-- Called when an index is built, which is rare (a first call, a configuration change,
-- an index unused for its life), as the ledger forgets its expired indexes then: the
-- fence keeps the fields of the indexes that live, not of every configuration used.
-- A wait queue's field (`q:<queue>`, see `scripts::ACQUIRE`) past its instant says
-- only that the queue is empty: it goes too (a removed pool's would stay forever), and
-- the queue's next call reads the queue once and writes it again. The ledger keeps no
-- such field: it only spares Redis reading an empty queue.
-- Returns the health-record fields (`x:<digest>`) of the gone indexes, which the build
-- drops from its tokens' records (the ledger names a token only in a live index).
local function pi_forget_gone()
  local checked, gone = {[PI.digest] = true}, {}
  local fence = redis.call('HGETALL', PI.fence)
  for i = 1, #fence, 2 do
    local field = fence[i]
    local digest = string.match(field, '^[anr]:(.+)$')
    if digest and not checked[digest] then
      checked[digest] = true
      if redis.call('EXISTS', PI.base .. 'im:' .. digest) == 0 then
        redis.call('HDEL', PI.fence, 'a:' .. digest, 'n:' .. digest, 'r:' .. digest)
        gone[#gone + 1] = 'x:' .. digest
      end
    elseif string.sub(field, 1, 2) == 'q:' and (tonumber(fence[i + 1]) or 0) < now then
      redis.call('HDEL', PI.fence, field)
    end
  end
  return gone
end

-- Renews the pool tokens' windows and health records (`pi_ensure`) from HSCAN's
-- `cursor` on, a page at a time: one page, and the cursor to go on from, or every page
-- left (nil) when a lease granted now could outlive a window not renewed yet. Those
-- are known to live until `floor` (the index's end when the renewal began), and a grant
-- needs its window for its TTL + W (`ACQUIRE`). A page is about 64 tokens, or every
-- token of a pool no larger than the server's `hash-max-listpack-entries` (128 by
-- default, 512 in the shipped redis.conf: a hash that small is scanned whole), so the
-- call that renews costs no more with a larger pool.
local function pi_sweep(cursor, floor)
  local all = now + (PI.ttl or PI.keep) + PI.w + 1000 >= floor
  repeat
    local page = redis.call('HSCAN', PI.pos, cursor, 'COUNT', 64)
    cursor = page[1]
    for i = 1, #page[2], 2 do
      redis.call('PEXPIRE', PI.base .. 'kw:' .. page[2][i], PI.keep, 'GT')
      redis.call('PEXPIRE', pi_health(page[2][i]), PI.keep, 'GT')
    end
  until cursor == '0' or not all
  if cursor ~= '0' then return cursor end
end

-- Gives the index's keys its whole life again.
local function pi_renew_keys()
  for _, k in ipairs({PI.ready, PI.wait, PI.pos, PI.meta, PI.out}) do
    redis.call('PEXPIRE', k, PI.keep)
  end
end

-- Sets the fence's `r:<digest>`: until `at`, the index is known to live.
local function pi_renew_at(at)
  PI.renew = at
  redis.call('HSET', PI.fence, PI.renew_field, at)
end

-- The renewal of a live index with `left` ms of life (see `pi_ensure`): its keys when
-- less than half is left, then the next page of its tokens' (`pi_sweep`), resumed from
-- the index's `s` field; `r:<digest>` once the last page is done.
local function pi_renew(left)
  local cursor, floor = nil, nil
  local sweep = redis.call('HGET', PI.meta, 's')
  if sweep then
    local server
    cursor, floor, server = string.match(sweep, '^(%d+):(%-?%d+):(%x*)$')
    floor = tonumber(floor)
    -- An unreadable place: every token now.
    if not cursor then cursor, floor = '0', now end
    if server ~= PI.server then cursor = '0' end
  end
  if left < PI.keep / 2 then
    pi_renew_keys()
    cursor, floor = '0', math.min(floor or math.huge, now + left)
    left = PI.keep
  end
  if cursor then cursor = pi_sweep(cursor, floor) end
  if cursor then
    redis.call('HSET', PI.meta, 's', cursor .. ':' .. floor .. ':' .. (PI.server or ''))
  else
    if sweep then redis.call('HDEL', PI.meta, 's') end
    pi_renew_at(now + left - PI.keep / 2)
  end
end

-- Makes sure the index exists: builds it from argv[first..] (the pool's token ids, in
-- order) when it does not; false when it does not and the ids were not sent. Before
-- `PI.renew` (the fence's `r:<digest>`, read by the caller) the index is known to live.
--
-- The pool tokens' pacing schedules live as long as the index (see `set_schedule`): a
-- schedule is never more than a window ahead, and the index's life, renewed at half,
-- is ten. So do the pool tokens' windows (`ACQUIRE` sets a window's life only when it
-- held no entry): never shortened, so a lease granted meanwhile is always covered. The
-- renewal of the index's keys is one call; its tokens' follows in pages (`pi_sweep`),
-- one per call, its place kept in the index's `s` field (`<cursor>:<floor>:<server>`: a
-- cursor is only good on the Redis process that gave it, so a sweep that finds itself
-- on another one, the index having moved with its slot, starts over); until the
-- last page the fence's `r:<digest>` is not set, so every call comes back here.
local function pi_ensure(argv, first)
  if PI.renew and PI.renew > now then return true end
  local left = redis.call('PTTL', PI.meta)
  if left >= 0 then
    pi_renew(left)
    return true
  end
  if #argv < first then return false end
  redis.call('DEL', PI.ready, PI.wait, PI.pos, PI.out)
  for _, k in ipairs({PI.ready, PI.wait, PI.out}) do redis.call('ZADD', k, 'inf', '') end
  redis.call('HSET', PI.meta, 'w', PI.w, 'l', PI.l, 'p', PI.pace)
  -- A new index starts with no ask (the ledger's `PoolIndex::asked`), and its first
  -- choice reads *wait*.
  redis.call('HDEL', PI.fence, 'a:' .. PI.digest, PI.next_field)
  local gone = pi_forget_gone()
  PI.asked, PI.next = 0, 0
  for i = first, #argv do
    redis.call('HSET', PI.pos, argv[i], i - first + 1)
    -- A token a gone index named keeps no such name (its record would carry one more
    -- field with every configuration of its pool while the pool is in use).
    if #gone > 0 then redis.call('HDEL', pi_health(argv[i]), unpack(gone)) end
    pi_refresh(argv[i], i - first + 1)
  end
  pi_renew_keys()
  pi_sweep('0', now)
  pi_renew_at(now + PI.keep / 2)
  return true
end

-- The index is gone though the fence says it lives (flushed or evicted alone, see the
-- module doc): the next call checks, and builds it from the tokens the caller sends.
local function pi_lost()
  redis.call('DEL', PI.meta)
  redis.call('HDEL', PI.fence, PI.renew_field, PI.next_field)
end

-- Refreshes up to 16 tokens whose wait instant has come; returns how many. Nothing is
-- due before `n:<digest>`, which it sets to the first instant left in *wait* when it
-- has caught up.
local function pi_settle_due()
  if pi_next() > now then return 0 end
  local due = redis.call('ZRANGEBYSCORE', PI.wait, '-inf', now, 'LIMIT', 0, 16)
  for _, token in ipairs(due) do
    local ready = redis.call('ZSCORE', PI.ready, token)
    local p = ready and (tonumber(ready) % M) or tonumber(redis.call('HGET', PI.pos, token))
    if p then
      pi_refresh(token, p, ready ~= false)
    else
      redis.call('ZREM', PI.wait, token)
      redis.call('ZREM', PI.ready, token)
    end
  end
  if #due < 16 then
    local first = redis.call('ZRANGE', PI.wait, 0, 0, 'WITHSCORES')
    -- Only the sentinel left: nothing is due until a token is added (2^53: never).
    local at = 9007199254740992
    if first[1] ~= '' and first[2] then at = tonumber(first[2]) end
    if at ~= PI.next then
      PI.next = at
      redis.call('HSET', PI.fence, PI.next_field, at)
    end
  end
  return #due
end

-- The least used pool token that can take `c` slots now (first listed on a tie), its
-- position, its slots in use, its pacing schedule (nil without pacing) and its health
-- record when read (`health_row`); nil when none can; false when the index is gone
-- (`pi_lost`).
local function pi_choose(c)
  -- Tokens whose wait instant has come first: they may be the least used now.
  pi_settle_due()
  if c == 1 then
    for _ = 1, 64 do
      local top = redis.call('ZRANGE', PI.ready, 0, 0, 'WITHSCORES')
      if top[1] == nil then return false end
      if top[1] == '' then
        if pi_settle_due() == 0 then return nil end
      else
        -- Check the first against its own window (and pace): if it has room, it is the
        -- choice (its place is re-scored by the grant, `pi_granted`); otherwise put it
        -- right and look again.
        -- Counted, not trimmed: the entries that left stay until the token's due
        -- refresh trims them.
        -- Its health record is read here, with its pacing schedule, for the admission
        -- of the grant too (`admit`).
        local token, p = top[1], tonumber(top[2]) % M
        local key = PI.base .. 'kw:' .. token
        local used = redis.call('ZCOUNT', key, now - PI.w, '+inf')
        local row = nil
        if used < PI.l then
          row = pi_row(token)
          local fits, tat = now, nil
          if PI.pace > 0 then
            tat = tonumber(row[8]) or now
            local _, f = pace_math(tat, 1, PI.pace, PI.step)
            fits = f
          end
          if fits <= now then return token, p, used, tat, row end
        end
        pi_refresh(token, p, false, row)
      end
    end
    return nil
  end
  while pi_settle_due() == 16 do end
  local ready = redis.call('ZRANGE', PI.ready, 0, -1)
  if #ready == 0 then return false end
  for _, token in ipairs(ready) do
    if token ~= '' then
      local p = tonumber(redis.call('HGET', PI.pos, token))
      local used, tat = pi_refresh(token, p)
      local fits = now
      if PI.pace > 0 then
        local _, f = pace_math(tat, c, PI.pace, PI.step)
        fits = f
      end
      if used + c <= PI.l and fits <= now and redis.call('ZSCORE', PI.ready, token) then
        return token, p, used, tat
      end
    end
  end
  return nil
end

-- Whether every token of the pool is out of service (its health refuses leases).
local function pi_all_out()
  return redis.call('ZCARD', PI.out) - 1 >= redis.call('HLEN', PI.pos)
end

-- Puts a token back in its place in every index its health record names (an admin
-- reset its health): `refs` the record's fields before the reset.
local function pi_refresh_refs(base, token, refs)
  for i = 1, #refs, 2 do
    local digest = string.match(refs[i], '^x:(.+)$')
    local cfg = digest and redis.call('HMGET', base .. 'im:' .. digest, 'w', 'l', 'p')
    if cfg and cfg[1] then
      pi_open(base, digest, tonumber(cfg[1]), tonumber(cfg[2]), tonumber(cfg[3]))
      pi_refresh(token, tonumber(refs[i + 1]))
    end
  end
end

-- The earliest instant a pool token can take `c` slots (`never` if none ever can:
-- `c` above the limit).
local function pi_earliest(c, never)
  if c == 1 then
    local first = redis.call('ZRANGE', PI.wait, 0, 0, 'WITHSCORES')
    if first[1] == '' or first[1] == nil then return never end
    return math.max(now + 1, tonumber(first[2]))
  end
  if c > PI.l then return never end
  local earliest = nil
  for _, token in ipairs(redis.call('HKEYS', PI.pos)) do
    local key = PI.base .. 'kw:' .. token
    redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. (now - PI.w))
    local used = redis.call('ZCARD', key)
    local at = now
    local k = used + c - PI.l
    if k > 0 then at = tonumber(redis.call('ZRANGE', key, k - 1, k - 1, 'WITHSCORES')[2]) + PI.w + 1 end
    local row = health_row(pi_health(token))
    if PI.pace > 0 then
      local _, fits = pace_math(tonumber(row[8]) or now, c, PI.pace, PI.step)
      at = math.max(at, fits)
    end
    at = math.max(at, health_at(row))
    if earliest == nil or at < earliest then earliest = at end
  end
  return earliest or never
end
"#
    };
}
pub(super) use pool_index;
