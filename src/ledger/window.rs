//! One sliding window: the entries (`<nonce>#<i>`) of the slots a tenant or a token
//! holds, ordered by the end of their occupancy. The twin of a window's sorted set in
//! Redis (`ZREMRANGEBYSCORE`, `ZCARD`, `ZRANGE k k`, `ZADD XX`, `ZREM`).

use std::collections::{BTreeSet, HashMap};

#[derive(Default)]
pub(super) struct Window {
    by_end: BTreeSet<(i64, String)>,
    end_of: HashMap<String, i64>,
}

/// The retry instant of a request no waiting can satisfy (see `scripts::ACQUIRE`).
pub(super) fn never(now: i64, window_ms: i64) -> i64 {
    now + window_ms
}

impl Window {
    /// Drops entries that ended before `horizon`; returns how many are left.
    pub fn trim(&mut self, horizon: i64) -> u32 {
        while let Some(first) = self.by_end.first() {
            if first.0 >= horizon {
                break;
            }
            let (_, member) = self.by_end.pop_first().expect("checked non-empty");
            self.end_of.remove(&member);
        }
        self.by_end.len() as u32
    }

    /// When a window holding `used` entries has room for `cost` more under `limit`:
    /// when its (used + cost − limit)-th earliest end has left the window (`free_at` in
    /// `scripts::ACQUIRE`).
    pub fn free_at(&self, now: i64, window_ms: i64, used: u32, cost: u32, limit: u32) -> i64 {
        let k = (used + cost).saturating_sub(limit);
        if k == 0 {
            return now;
        }
        match self.by_end.iter().nth(k as usize - 1) {
            Some((end, _)) => end + window_ms + 1,
            // `cost` exceeds `limit`: no waiting makes room.
            None => never(now, window_ms),
        }
    }

    pub fn len(&self) -> u32 {
        self.by_end.len() as u32
    }

    /// The earliest end in the window, if any.
    pub fn first_end(&self) -> Option<i64> {
        self.by_end.first().map(|(end, _)| *end)
    }

    pub fn insert(&mut self, member: String, end: i64) {
        if let Some(old) = self.end_of.insert(member.clone(), end) {
            self.by_end.remove(&(old, member.clone()));
        }
        self.by_end.insert((end, member));
    }

    /// Moves an existing entry's end (XX semantics: absent entries stay absent).
    pub fn move_end(&mut self, member: &str, end: i64) {
        if self.end_of.contains_key(member) {
            self.insert(member.to_owned(), end);
        }
    }

    pub fn remove(&mut self, member: &str) {
        if let Some(end) = self.end_of.remove(member) {
            self.by_end.remove(&(end, member.to_owned()));
        }
    }
}
