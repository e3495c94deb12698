//! The pool index: how a decision finds the least used pool token that can take a slot,
//! and the earliest instant one can, without reading every token of the pool. The Lua
//! of `store::counters::index_scripts` is its transliteration, function for function
//! (`pi_refresh`, `pi_granted`, `pi_settle_due`, `pi_choose`, `pi_earliest`, …); its
//! module doc says what the index holds and why it is exact.
//!
//! Sorted sets are `BTreeSet<(score, token)>`, ordered as Redis orders a sorted set
//! (score, then member bytes); the sentinel members of the Redis keys are not needed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::pace::{Paced, Pacing};
use super::window::never;
use super::{AcquireRequest, Ledger, list_digest, token_key};
use crate::domain::Id;

/// A ready token's score: `used × M + position` (see `index_scripts.rs`).
const M: i64 = 131_072;

/// The name of a pool's index: the digest of its token list, with the window, the
/// limit and the pacing (a configuration change starts a new index), and `i3`, the
/// scheme of the Redis index's keys (`index_scripts.rs`); empty without pool
/// tokens.
pub fn pool_digest(req: &AcquireRequest) -> String {
    if req.pooled.is_empty() {
        return String::new();
    }
    let list = match &req.pooled_digest {
        Some(digest) => digest.to_string(),
        None => list_digest(&req.pooled),
    };
    format!(
        "{list}-{}-{}-{}-i4",
        req.window.as_millis(),
        req.token_limit,
        req.pace_burst
    )
}

/// A sorted set of tokens by score.
#[derive(Default)]
struct Scored {
    by_score: BTreeSet<(i64, Id)>,
    score_of: HashMap<Id, i64>,
}

impl Scored {
    fn add(&mut self, token: &Id, score: i64) {
        if let Some(old) = self.score_of.insert(token.clone(), score) {
            self.by_score.remove(&(old, token.clone()));
        }
        self.by_score.insert((score, token.clone()));
    }

    fn remove(&mut self, token: &Id) {
        if let Some(old) = self.score_of.remove(token) {
            self.by_score.remove(&(old, token.clone()));
        }
    }

    fn score(&self, token: &Id) -> Option<i64> {
        self.score_of.get(token).copied()
    }

    fn first(&self) -> Option<(i64, Id)> {
        self.by_score.first().cloned()
    }
}

/// The room counted among a pool's ready tokens (`PoolIndex::pool_room`).
#[derive(Clone, Copy, Default)]
pub(super) struct PoolRoom {
    /// Slots the walked tokens can take now.
    pub slots: u32,
    /// Ready tokens walked, least used first.
    pub walked: usize,
    /// The first instant a walked token's binding pace grows its room.
    pub grows: Option<i64>,
    /// The first instant a walked token's use drops (its earliest entry in the window
    /// leaves it).
    pub drops: Option<i64>,
}

/// One pool's index (the keys `ir`, `iw`, `ih`, `ip`, `im` of the Redis backend).
pub(super) struct PoolIndex {
    /// Shared with the leases granted through the index.
    pub digest: Arc<str>,
    w: i64,
    l: u32,
    pacing: Option<Pacing>,
    ready: Scored,
    wait: Scored,
    out: Scored,
    /// The tokens held out of *ready* for their window or their health, and their
    /// positions: the `x:<digest>` fields of their Redis health records. A release
    /// refreshes only these (and a token given back); an admin's reset refreshes them.
    named: HashMap<Id, i64>,
    pos: HashMap<Id, i64>,
    /// The pool's tokens in order (`HKEYS` of the positions).
    tokens: Vec<Id>,
    /// The last instant a caller asked (the fence's `a:<digest>` in Redis).
    pub asked: i64,
    /// When the index is forgotten, unless used (10 windows + 10 minutes).
    pub expires: i64,
}

impl PoolIndex {
    /// Its three sets as `(score, token)`, earliest first: the differential test
    /// compares them with the keys `ir`, `iw` and `ih`.
    #[cfg(test)]
    pub(super) fn sets(&self) -> [Vec<(i64, String)>; 3] {
        let set = |s: &Scored| {
            s.by_score
                .iter()
                .map(|(score, token)| (*score, token.to_string()))
                .collect()
        };
        [set(&self.ready), set(&self.wait), set(&self.out)]
    }

    /// Where the index names `token` (the `x:<digest>` field of its health record in
    /// Redis), if it does.
    #[cfg(test)]
    pub(super) fn named_at(&self, token: &Id) -> Option<i64> {
        self.named.get(token).copied()
    }

    /// Its sets, as the differential test prints them beside Redis's keys.
    #[cfg(test)]
    pub(super) fn dump(&self) -> String {
        let set = |s: &Scored| format!("{:?}", s.by_score);
        format!(
            "ready {} wait {} out {} named {:?}",
            set(&self.ready),
            set(&self.wait),
            set(&self.out),
            self.named
        )
    }

    fn keep(&self) -> i64 {
        10 * self.w + 600_000
    }

    /// How long a ready token's score may lag its use: W / 8 (`index_scripts.rs`).
    fn rescore(&self) -> i64 {
        self.w / 8
    }

    /// Whether the index holds the token out for its window or its health (what a
    /// release can change), not for its pace alone.
    pub fn names(&self, token: &Id) -> bool {
        self.named.contains_key(token)
    }

    /// Whether every token of the pool is out of service (`pi_all_out`).
    pub fn all_out(&self) -> bool {
        self.out.score_of.len() >= self.pos.len()
    }
}

/// What `pi_choose` found: the token, its position, its slots in use.
pub(super) struct Chosen {
    pub token: Id,
    pub pos: i64,
    pub used: u32,
}

impl Ledger {
    /// The request's pool index, built when missing (`pi_open` + `pi_ensure`); the
    /// caller puts it back with `put_index`.
    pub(super) fn take_index(&mut self, req: &AcquireRequest, now: i64) -> PoolIndex {
        let digest = pool_digest(req);
        let key = format!("{}/{digest}", req.upstream_id);
        if let Some(mut index) = self.indexes.remove(&key).filter(|i| i.expires > now) {
            if index.expires - now < index.keep() / 2 {
                index.expires = now + index.keep();
            }
            return index;
        }
        // A new index is rare (a first call, a configuration change, an index unused for
        // its keep time): the moment to forget the expired ones, as Redis does by TTL.
        self.indexes.retain(|_, index| index.expires > now);
        let w = req.window.as_millis() as i64;
        let mut index = PoolIndex {
            digest: digest.into(),
            w,
            l: req.token_limit,
            pacing: Pacing::new(req.pace_burst, w, req.token_limit),
            ready: Scored::default(),
            wait: Scored::default(),
            out: Scored::default(),
            named: HashMap::new(),
            pos: HashMap::new(),
            tokens: req.pooled.to_vec(),
            asked: 0,
            expires: 0,
        };
        for (i, token) in req.pooled.iter().enumerate() {
            index.pos.insert(token.clone(), i as i64 + 1);
            self.pi_refresh(
                &req.upstream_id,
                &mut index,
                token,
                i as i64 + 1,
                false,
                now,
            );
        }
        index.expires = now + index.keep();
        index
    }

    pub(super) fn put_index(&mut self, upstream: &Id, index: PoolIndex) {
        let key = format!("{upstream}/{}", index.digest);
        self.indexes.insert(key, index);
    }

    /// A token's window trimmed at `now`: its slots in use, and when it can take one
    /// more (`now` when it has room).
    fn window_view(
        &mut self,
        upstream: &Id,
        index: &PoolIndex,
        token: &Id,
        now: i64,
    ) -> (u32, i64) {
        let window = self.windows.entry(token_key(upstream, token)).or_default();
        let used = window.trim(now - index.w);
        let at = if used >= index.l {
            window.free_at(now, index.w, used, 1, index.l)
        } else {
            now
        };
        (used, at)
    }

    fn schedule(&self, upstream: &Id, token: &Id) -> Option<f64> {
        self.paces.get(&token_key(upstream, token)).copied()
    }

    /// What the token's pace allows for `c` slots (`pace_math`).
    fn paced(
        &self,
        upstream: &Id,
        index: &PoolIndex,
        token: &Id,
        c: u32,
        now: i64,
    ) -> Option<Paced> {
        let pacing = index.pacing?;
        Some(pacing.view(self.schedule(upstream, token), now, c, i64::MAX))
    }

    /// `pi_drain`: a token whose window had no room and has now keeps a quarter of its
    /// pace allowance, as of the pool's last ask.
    fn pi_drain(&mut self, upstream: &Id, index: &PoolIndex, token: &Id, now: i64) {
        let Some(pacing) = index.pacing else { return };
        let tat = self.schedule(upstream, token).unwrap_or(now as f64);
        let mut drained = tat;
        pacing.drain(&mut drained, index.asked);
        if drained != tat {
            self.set_schedule(upstream, token, drained);
        }
    }

    /// `pi_refresh`: puts the token where it belongs; returns its slots in use.
    pub(super) fn pi_refresh(
        &mut self,
        upstream: &Id,
        index: &mut PoolIndex,
        token: &Id,
        p: i64,
        was_ready: bool,
        now: i64,
    ) -> u32 {
        let (used, window_at) = self.window_view(upstream, index, token, now);
        if index.pacing.is_some()
            && !was_ready
            && window_at <= now
            && index.ready.score(token).is_none()
        {
            self.pi_drain(upstream, index, token, now);
        }
        // A ready token's pace still allows a slot (pace only grows with time).
        let pace = match was_ready {
            true => None,
            false => self.paced(upstream, index, token, 1, now),
        };
        let health_at = if was_ready {
            now
        } else {
            self.health.usable_from(upstream, token, now)
        };
        if !was_ready {
            if health_at > now {
                index.out.add(token, health_at);
            } else {
                index.out.remove(token);
            }
        }
        let named = !was_ready && index.names(token);
        let pace_fits = pace.map_or(now, |p| p.fits);
        let at = window_at.max(pace_fits).max(health_at);
        if at > now {
            index.ready.remove(token);
            index.wait.add(token, at);
            if window_at <= now && health_at <= now {
                // Out for its pace only: what a release changes cannot bring it back
                // sooner.
                index.named.remove(token);
            } else if !named {
                index.named.insert(token.clone(), p);
            }
            return used;
        }
        if named {
            index.named.remove(token);
        }
        index.ready.add(token, used as i64 * M + p);
        let window = &self.windows[&token_key(upstream, token)];
        let change = window
            .first_end()
            .filter(|_| used > 0)
            .map(|e| e + index.w + 1);
        // Re-scored when its use drops, but at most once per W / 8 (`index_scripts.rs`).
        match change {
            Some(at) => index.wait.add(token, at.max(now + index.rescore())),
            None => index.wait.remove(token),
        }
        used
    }

    /// `pi_granted`: the token at position `p` was just granted (checked just before:
    /// it had room and is healthy) and now holds `used` slots.
    pub(super) fn pi_granted(
        &mut self,
        upstream: &Id,
        index: &mut PoolIndex,
        chosen: &Chosen,
        used: u32,
        (expires, probe): (i64, bool),
        now: i64,
    ) {
        let token = &chosen.token;
        if used >= index.l || probe {
            self.pi_refresh(upstream, index, token, chosen.pos, false, now);
            return;
        }
        let pace = self.paced(upstream, index, token, 1, now);
        if let Some(fits) = pace.map(|p| p.fits).filter(|&fits| fits > now) {
            index.ready.remove(token);
            index.wait.add(token, fits);
            return;
        }
        index.ready.add(token, used as i64 * M + chosen.pos);
        // Its use next drops when its first entry leaves the window: this grant's, if
        // it was empty; otherwise the instant already in *wait* stands.
        if chosen.used == 0 {
            index.wait.add(token, expires + index.w + 1);
        }
    }

    /// `pi_settle_due`: refreshes up to 16 tokens whose wait instant has come; returns
    /// how many.
    fn pi_settle_due(&mut self, upstream: &Id, index: &mut PoolIndex, now: i64) -> usize {
        let due: Vec<Id> = index
            .wait
            .by_score
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(16)
            .map(|(_, token)| token.clone())
            .collect();
        for token in &due {
            let ready = index.ready.score(token);
            let p = ready
                .map(|score| score % M)
                .or(index.pos.get(token).copied());
            match p {
                Some(p) => {
                    self.pi_refresh(upstream, index, token, p, ready.is_some(), now);
                }
                None => {
                    index.wait.remove(token);
                    index.ready.remove(token);
                }
            }
        }
        due.len()
    }

    /// `pi_choose`: the least used pool token that can take `c` slots now (first
    /// listed on a tie); `None` when none can.
    pub(super) fn pi_choose(
        &mut self,
        upstream: &Id,
        index: &mut PoolIndex,
        c: u32,
        now: i64,
    ) -> Option<Chosen> {
        self.pi_settle_due(upstream, index, now);
        if c == 1 {
            for _ in 0..64 {
                let Some((score, token)) = index.ready.first() else {
                    if self.pi_settle_due(upstream, index, now) == 0 {
                        return None;
                    }
                    continue;
                };
                let p = score % M;
                let window = self.windows.entry(token_key(upstream, &token)).or_default();
                let used = window.trim(now - index.w);
                let fits = self
                    .paced(upstream, index, &token, 1, now)
                    .map_or(now, |p| p.fits);
                // With room, it is the choice: the grant re-scores it (`pi_granted`).
                if used < index.l && fits <= now {
                    return Some(Chosen {
                        token,
                        pos: p,
                        used,
                    });
                }
                self.pi_refresh(upstream, index, &token, p, false, now);
            }
            return None;
        }
        while self.pi_settle_due(upstream, index, now) == 16 {}
        let ready: Vec<Id> = index
            .ready
            .by_score
            .iter()
            .map(|(_, t)| t.clone())
            .collect();
        for token in ready {
            let p = index.pos[&token];
            let used = self.pi_refresh(upstream, index, &token, p, false, now);
            let fits = self
                .paced(upstream, index, &token, c, now)
                .map_or(now, |p| p.fits);
            if used + c <= index.l && fits <= now && index.ready.score(&token).is_some() {
                return Some(Chosen {
                    token,
                    pos: p,
                    used,
                });
            }
        }
        None
    }

    /// `pi_earliest`: the earliest instant a pool token can take `c` slots (`never` if
    /// none ever can: `c` above the limit).
    pub(super) fn pi_earliest(
        &mut self,
        upstream: &Id,
        index: &PoolIndex,
        c: u32,
        now: i64,
    ) -> i64 {
        let never = never(now, index.w);
        if c == 1 {
            return index.wait.first().map_or(never, |(at, _)| at.max(now + 1));
        }
        if c > index.l {
            return never;
        }
        let mut earliest: Option<i64> = None;
        for token in &index.tokens {
            let window = self.windows.entry(token_key(upstream, token)).or_default();
            let used = window.trim(now - index.w);
            let mut at = window.free_at(now, index.w, used, c, index.l);
            if let Some(pace) = self.paced(upstream, index, token, c, now) {
                at = at.max(pace.fits);
            }
            at = at.max(self.health.usable_from(upstream, token, now));
            earliest = Some(earliest.map_or(at, |e| e.min(at)));
        }
        earliest.unwrap_or(never)
    }

    /// The room of the ready tokens, least used first, until it reaches `need` (the
    /// `grow` of `scripts::ACQUIRE`'s queue check), counted from their windows (a score
    /// may lag), and the first instants a walked token's binding pace grows it (its
    /// pace allows fewer slots than its window) and its use drops.
    pub(super) fn pool_room(
        &self,
        upstream: &Id,
        index: &PoolIndex,
        mut room: PoolRoom,
        need: u32,
        now: i64,
    ) -> PoolRoom {
        let horizon = now - index.w;
        for (_, token) in index.ready.by_score.iter().skip(room.walked) {
            if room.slots >= need {
                break;
            }
            room.walked += 1;
            let window = self.windows.get(&token_key(upstream, token));
            let used = window.map_or(0, |w| w.count_from(horizon));
            if let Some(end) = window.and_then(|w| w.first_end_from(horizon)) {
                let drop = end + index.w + 1;
                room.drops = Some(room.drops.map_or(drop, |d| d.min(drop)));
            }
            let mut slots = index.l as i64 - i64::from(used);
            if let Some(pace) = self.paced(upstream, index, token, 1, now) {
                if pace.grows != i64::MAX && i64::from(pace.room) < slots {
                    room.grows = Some(room.grows.map_or(pace.grows, |g| g.min(pace.grows)));
                }
                slots = slots.min(pace.room as i64);
            }
            room.slots += slots.max(0) as u32;
        }
        room
    }

    /// Puts a token back in its place in every index of the upstream that holds it out
    /// for its window or its health (an admin reset its health): `pi_refresh_refs`,
    /// after `RESET` forgot every `x:<digest>` field of the record.
    pub(super) fn refresh_named(&mut self, upstream: &Id, token: &Id, now: i64) {
        let prefix = format!("{upstream}/");
        let naming: Vec<String> = self
            .indexes
            .iter()
            .filter(|(key, index)| key.starts_with(&prefix) && index.names(token))
            .map(|(key, _)| key.clone())
            .collect();
        for key in naming {
            let mut index = self.indexes.remove(&key).expect("listed just above");
            let p = index.named.remove(token).expect("it names the token");
            if index.expires > now {
                self.pi_refresh(upstream, &mut index, token, p, false, now);
                self.indexes.insert(key, index);
            }
        }
    }

    /// Records a token's pacing schedule as Redis stores it (`tostring`: 14
    /// significant digits), so both read back the same number.
    pub(super) fn set_schedule(&mut self, upstream: &Id, token: &Id, tat: f64) {
        let stored: f64 = format!("{tat:.13e}").parse().expect("a formatted float");
        self.paces.insert(token_key(upstream, token), stored);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ledger::{AcquireOutcome, ReleaseOutcome};

    fn id(value: &str) -> Id {
        Id::parse("test", value).expect("valid test id")
    }

    fn request(pool: &[&str]) -> AcquireRequest {
        AcquireRequest {
            upstream_id: id("up"),
            pool_id: None,
            config_version: 0,
            nonce: crate::ledger::LeaseKey::new_nonce(),
            tenant_id: id("t"),
            tenant_limit: 10,
            token_limit: 10,
            window: Duration::from_secs(60),
            lease_ttl: Duration::from_secs(5),
            cost: 1,
            dedicated: Vec::new(),
            pooled: pool.iter().map(|t| id(t)).collect::<Vec<_>>().into(),
            pooled_digest: None,
            count_demand: true,
            queue: None,
            pace_burst: 0,
        }
    }

    /// An index no call used for its keep time (10 W + 10 min) is forgotten once
    /// another index is built, as Redis forgets it by TTL: a long-lived embedded
    /// process does not keep one per configuration it ever had.
    #[test]
    fn expired_indexes_are_forgotten_when_a_new_one_is_built() {
        let mut ledger = Ledger::default();
        ledger.mark_fresh(&id("up"));
        let now = 1_750_000_000_000;
        ledger.acquire(&request(&["a"]), now);
        ledger.acquire(&request(&["a", "b"]), now + 1);
        assert_eq!(ledger.indexes.len(), 2);
        let keep = 10 * 60_000 + 600_000;
        ledger.acquire(&request(&["a", "b"]), now + keep / 2 + 10);
        ledger.acquire(&request(&["c"]), now + keep + 10);
        let mut left: Vec<&String> = ledger.indexes.keys().collect();
        left.sort();
        assert_eq!(left.len(), 2, "the index of [a] expired: {left:?}");
        assert!(ledger.indexes.values().all(|i| i.expires > now + keep));
    }

    /// What a release changes (a lease's end, the token's health) cannot bring back
    /// sooner a token out for its pace alone, so the release leaves it where it is, as
    /// `scripts::RELEASE` does (the token's record names no index): refreshed at the
    /// release instead of at the next decision, its re-scoring instant differed from
    /// Redis's (the differential test with pacing, about one run in 25).
    #[test]
    fn a_release_leaves_a_token_out_for_its_pace_alone_in_place() {
        let mut ledger = Ledger::default();
        let up = id("up");
        ledger.mark_fresh(&up);
        let now = 1_750_000_000_000;
        let mut req = request(&["a"]);
        req.pace_burst = 2;
        // Released before it expires, or the release changes no slot.
        req.lease_ttl = Duration::from_secs(10);
        let mut keys = Vec::new();
        for _ in 0..2 {
            req.nonce = crate::ledger::LeaseKey::new_nonce();
            let outcome = ledger.acquire(&req, now);
            assert!(matches!(outcome, AcquireOutcome::Granted(_)), "{outcome:?}");
            keys.push(crate::ledger::LeaseKey {
                upstream_id: up.clone(),
                pool_id: None,
                tenant_id: id("t"),
                token_id: id("a"),
                nonce: req.nonce.clone(),
            });
        }
        // Its burst spent: out for its pace until one step (6 s) on.
        let fits = now + 6_000;
        let index = ledger.indexes.values().next().expect("the pool's index");
        assert!(index.ready.score(&id("a")).is_none());
        assert_eq!(index.wait.score(&id("a")), Some(fits));
        assert!(!index.names(&id("a")), "out for its pace alone");
        let result = ledger.release(&keys[0], ReleaseOutcome::Success, fits + 1_000);
        assert_eq!(result, crate::ledger::ReleaseResult::Released);
        let index = ledger.indexes.values().next().expect("the pool's index");
        assert!(
            index.ready.score(&id("a")).is_none(),
            "left for the next decision"
        );
        assert_eq!(index.wait.score(&id("a")), Some(fits));
    }
}
