//! Pacing of a token's grants, in process: the twin of `paced`, `drain_pace` and the
//! schedule updates in `scripts::ACQUIRE` / `scripts::RELEASE`. A token's *schedule*
//! (GCRA's theoretical arrival time, in ms) is the instant up to which its pace is
//! spent; it may grant `burst` slots back to back, then one per `step` ms.

/// The pacing a request asks for; `None` when pacing is off.
#[derive(Clone, Copy)]
pub(super) struct Pacing {
    /// Slots a token may grant back to back.
    burst: u32,
    /// Milliseconds per slot: window / token limit.
    step: f64,
}

/// A token's pacing as a scan sees it.
#[derive(Clone, Copy)]
pub(super) struct Paced {
    /// Slots the pace allows now.
    pub room: u32,
    /// When it allows the call's cost.
    pub fits: i64,
    /// When it allows one slot more than now (`never` when it is at its burst).
    pub grows: i64,
}

impl Pacing {
    pub fn new(burst: u32, window_ms: i64, token_limit: u32) -> Option<Self> {
        (burst > 0).then(|| Pacing {
            burst,
            step: window_ms as f64 / token_limit.max(1) as f64,
        })
    }

    pub fn step(&self) -> f64 {
        self.step
    }

    /// What `schedule` allows at `now` for a call of `cost` slots.
    pub fn view(&self, schedule: Option<f64>, now: i64, cost: u32, never: i64) -> Paced {
        let (burst, step, now_f) = (self.burst, self.step, now as f64);
        let tat = schedule.unwrap_or(now_f);
        let ahead = tat.max(now_f) - now_f;
        let room = ((burst as f64 * step - ahead) / step).floor().max(0.0) as u32;
        let fits = (tat - burst.saturating_sub(cost) as f64 * step).ceil() as i64;
        let grows = if room >= burst {
            never
        } else {
            (tat - (burst - room - 1) as f64 * step).ceil() as i64
        };
        Paced {
            room,
            fits: fits.max(now),
            grows,
        }
    }

    /// Spends `cost` slots of pace on a grant at `now`.
    pub fn spend(&self, schedule: &mut f64, now: i64, cost: u32) {
        *schedule = schedule.max(now as f64) + cost as f64 * self.step;
    }

    /// A full window with callers asking is not idleness: keep no more than a quarter
    /// of the back-to-back allowance (see `drain_pace` in `scripts::ACQUIRE`).
    pub fn drain(&self, schedule: &mut f64, now: i64) {
        let (burst, now_f) = (self.burst as f64, now as f64);
        let keep = (burst / 4.0).ceil();
        if *schedule < now_f + (burst - keep - 1.0) * self.step {
            *schedule = now_f + (burst - keep) * self.step;
        }
    }
}

/// Gives back the pace a grant of `cost` slots spent at `step` ms each, as far as it is
/// still ahead of `now` (a lease released "not used").
pub(super) fn refund(schedule: &mut f64, now: i64, cost: u32, step: f64) {
    let now_f = now as f64;
    if *schedule > now_f {
        *schedule = (*schedule - cost as f64 * step).max(now_f);
    }
}
