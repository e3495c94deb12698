//! One sliding window: the entries (`<nonce>#<i>`) of the slots a tenant or a token
//! holds, ordered by the end of their occupancy. The twin of a window's sorted set in
//! Redis (`ZREMRANGEBYSCORE`, `ZCARD`, `ZRANGE k k`, `ZADD XX`, `ZREM`).
//!
//! A window holds every slot taken in the last W (+ TTL): at 20,000 grants a second and
//! W = 60 s, over a million entries across the windows of an embedded server. So an
//! entry is kept small and off the heap: the service's nonces (32 hex digits, 128 bits)
//! as a number; any other nonce (tests build their own) as its text.

use std::collections::BTreeSet;

/// A grant's nonce, as a window (and the lease table) keeps it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Nonce {
    Hex(u128),
    Text(Box<str>),
}

impl Nonce {
    pub(super) fn of(nonce: &str) -> Nonce {
        // Only the canonical form (32 lower-case digits) maps to a number, so that two
        // different strings are never one entry.
        let canonical = nonce.len() == 32
            && nonce
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        match canonical.then(|| u128::from_str_radix(nonce, 16)) {
            Some(Ok(n)) => Nonce::Hex(n),
            _ => Nonce::Text(nonce.into()),
        }
    }
}

/// One slot of a grant: its end, the grant's nonce and the slot's number (1-based):
/// the member `<nonce>#<i>` with score `end` in Redis.
type Entry = (i64, Nonce, u32);

/// The entries by end. A grant's slots are found by their end, which the lease record
/// knows (its expiry, until its one release moves or removes them), so no map from
/// member to end is kept beside them: half the memory of a window.
#[derive(Default)]
pub(super) struct Window {
    by_end: BTreeSet<Entry>,
}

/// The retry instant of a request no waiting can satisfy (see `scripts::ACQUIRE`).
pub(super) fn never(now: i64, window_ms: i64) -> i64 {
    now + window_ms
}

impl Window {
    /// Drops entries that ended before `horizon`; returns how many are left.
    pub fn trim(&mut self, horizon: i64) -> u32 {
        while self.by_end.first().is_some_and(|first| first.0 < horizon) {
            self.by_end.pop_first();
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
            Some((end, ..)) => end + window_ms + 1,
            // `cost` exceeds `limit`: no waiting makes room.
            None => never(now, window_ms),
        }
    }

    /// The ends of the entries at or after `horizon`, earliest first.
    #[cfg(test)]
    pub fn ends_from(&self, horizon: i64) -> Vec<i64> {
        self.by_end
            .iter()
            .map(|e| e.0)
            .filter(|end| *end >= horizon)
            .collect()
    }

    /// The entries' ends, earliest first (the differential test's failure report).
    #[cfg(test)]
    pub fn dump(&self) -> String {
        format!("{:?}", self.by_end.iter().map(|e| e.0).collect::<Vec<_>>())
    }

    pub fn len(&self) -> u32 {
        self.by_end.len() as u32
    }

    /// Entries that end at or after `horizon` (`ZCOUNT`), without trimming: costs the
    /// entries that left, which a trim bounds.
    pub fn count_from(&self, horizon: i64) -> u32 {
        let left = self.by_end.iter().take_while(|e| e.0 < horizon).count();
        self.len() - left as u32
    }

    /// The earliest end at or after `horizon`, if any.
    pub fn first_end_from(&self, horizon: i64) -> Option<i64> {
        self.by_end.iter().map(|e| e.0).find(|&end| end >= horizon)
    }

    /// The earliest end in the window, if any.
    pub fn first_end(&self) -> Option<i64> {
        self.by_end.first().map(|(end, ..)| *end)
    }

    /// Adds slots `1..=cost` of the grant `nonce`, ending at `end`. A nonce is granted
    /// once (the service draws a new one per call), so its slots are new members.
    pub fn insert(&mut self, nonce: &Nonce, cost: u32, end: i64) {
        for i in 1..=cost {
            self.by_end.insert((end, nonce.clone(), i));
        }
    }

    /// Moves slots `1..=cost` of the grant `nonce` from `end` to `to` (XX semantics:
    /// slots no longer in the window, trimmed, stay out).
    pub fn move_end(&mut self, nonce: &Nonce, cost: u32, end: i64, to: i64) {
        for i in 1..=cost {
            if self.by_end.remove(&(end, nonce.clone(), i)) {
                self.by_end.insert((to, nonce.clone(), i));
            }
        }
    }

    /// Removes slots `1..=cost` of the grant `nonce`, which end at `end`.
    pub fn remove(&mut self, nonce: &Nonce, cost: u32, end: i64) {
        for i in 1..=cost {
            self.by_end.remove(&(end, nonce.clone(), i));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_canonical_hex_form_is_a_number() {
        let nonce = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            Nonce::of(nonce),
            Nonce::Hex(0x0123456789abcdef0123456789abcdef)
        );
        // Upper case, a sign or fewer digits parse to the same number but are other
        // members in Redis: they stay text.
        for other in [
            "0123456789ABCDEF0123456789abcdef",
            "+123456789abcdef0123456789abcdef",
            "123456789abcdef0123456789abcdef",
            "n1",
        ] {
            assert_eq!(Nonce::of(other), Nonce::Text(other.into()), "{other}");
        }
    }

    #[test]
    fn entries_of_two_grants_are_apart_and_move_or_go_by_slot() {
        let (a, b) = (
            Nonce::of("0123456789abcdef0123456789abcdef"),
            Nonce::of("n1"),
        );
        let (a, b) = (&a, &b);
        let mut window = Window::default();
        window.insert(a, 2, 100);
        window.insert(b, 1, 50);
        assert_eq!((window.len(), window.first_end()), (3, Some(50)));
        window.move_end(a, 2, 100, 10);
        // XX: a slot the grant never took is not added.
        window.move_end(b, 3, 50, 60);
        assert_eq!((window.len(), window.first_end()), (3, Some(10)));
        assert_eq!(window.free_at(0, 1_000, 3, 1, 3), 1_011);
        window.remove(a, 2, 10);
        assert_eq!((window.len(), window.first_end()), (1, Some(60)));
        // Trimmed slots stay out: a later move finds nothing.
        assert_eq!(window.trim(61), 0);
        window.move_end(b, 1, 60, 70);
        assert_eq!(window.len(), 0);
    }
}
