//! Holding step telemetry while memory is far from the daemon's bands (the Rust twin of `worker/hold.py`,
//! following docs/PROTOCOL.md section 3, "Holding, exactly").
//!
//! Every `step` frame wakes the daemon. While its latest heartbeat allows it (`hold` > 0 with `hold_below` and
//! `hold_horizon`), a *calm* step is held instead of sent: its footprint plus its transient (`mlx_peak` −
//! `mlx_active`, 0 when `mlx_active` is not measured) is under `hold_below`, and so is its footprint plus
//! `hold_horizon` steps of its growth per step (the last difference, clamped at 0). The held steps go out
//! together when the oldest has waited `hold` seconds, before a step that is not calm, before any other frame
//! but a heartbeat, when a command arrives, and when a heartbeat withdraws or narrows the permission. With
//! `hold_rows` they go as `steps` frames of at most that many rows; a command withdraws that too.
//!
//! [`StepHold`] is pure bookkeeping: no socket, and the caller passes the time (`now`, monotonic seconds). It
//! returns the messages to send now, in order.

use crate::protocol::{Heartbeat, Message, Step, Steps, MAX_STEPS_ROWS};

/// Steps held at most (about 100 kB as frames): a very fast loop sends a burst before the timer.
pub const MAX_HELD: usize = 1000;

/// What a daemon heartbeat allows: hold calm steps up to `hold` seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grant {
    /// Seconds a calm step may wait.
    pub hold: f64,
    /// Bytes the footprint (plus transient, plus growth ahead) must stay under.
    pub below: u64,
    /// Steps of footprint growth looked ahead.
    pub horizon: u64,
}

impl Grant {
    /// The permission in `beat`: `None` unless `hold` > 0, `hold_below` and `hold_horizon` all come together.
    pub fn of(beat: &Heartbeat) -> Option<Grant> {
        match (beat.hold, beat.hold_below, beat.hold_horizon) {
            (Some(hold), Some(below), Some(horizon)) if hold > 0.0 => Some(Grant { hold, below, horizon }),
            _ => None,
        }
    }
}

/// The transient of a step: `mlx_peak` − `mlx_active` (0 when below it, or when `mlx_active` is not measured).
pub fn transient(step: &Step) -> u64 {
    step.mlx_active.map_or(0, |active| step.mlx_peak.saturating_sub(active))
}

/// Which steps to send now and which to hold (see the module's documentation).
#[derive(Debug, Clone)]
pub struct StepHold {
    grant: Option<Grant>,
    rows: usize,
    held: Vec<Step>,
    held_since: f64,
    last: Option<(u64, u64)>, // (step, footprint) of the previous step
    sent_a_step: bool,
    max_held: usize,
}

impl Default for StepHold {
    fn default() -> Self {
        StepHold::new(MAX_HELD)
    }
}

impl StepHold {
    /// Nothing allowed yet (every step at once until a heartbeat grants holding); at most `max_held` held.
    pub fn new(max_held: usize) -> StepHold {
        StepHold { grant: None, rows: 0, held: Vec::new(), held_since: 0.0, last: None, sent_a_step: false,
                   max_held: max_held.max(1) }
    }

    /// The permission in force (`None`: send every step at once).
    pub fn grant(&self) -> Option<Grant> {
        self.grant
    }

    /// The most rows a `steps` frame may carry now (0 or 1: one `step` frame per step).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// How many steps are held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// A daemon heartbeat: it replaces the previous permission. Returns what to send now: the held steps when
    /// it withdraws the permission or lowers `hold_below`, written as the new heartbeat allows.
    pub fn configure(&mut self, beat: &Heartbeat) -> Vec<Message> {
        let grant = Grant::of(beat);
        let narrowed = match (self.grant, grant) {
            (Some(_), None) => true,
            (Some(old), Some(new)) => new.below < old.below,
            (None, _) => false,
        };
        self.grant = grant;
        // hold_rows comes "with hold": without a permission no steps frame may be sent.
        self.rows = match grant {
            Some(_) => beat.hold_rows.map_or(0, |rows| usize::try_from(rows).unwrap_or(usize::MAX).min(MAX_STEPS_ROWS)),
            None => 0,
        };
        if narrowed { self.release() } else { Vec::new() }
    }

    /// A daemon command arrived: the held steps go now (as `steps` frames within the `hold_rows` that allowed
    /// them), then every step goes as its own `step` frame until the next heartbeat grants holding again.
    pub fn command(&mut self) -> Vec<Message> {
        let out = self.release();
        self.grant = None;
        self.rows = 0;
        out
    }

    /// Whether `step` is calm: far enough from `hold_below` to wait. Updates the growth per step.
    fn calm(&mut self, step: &Step) -> bool {
        let last = self.last.replace((step.step, step.footprint));
        let grant = match self.grant {
            Some(grant) if self.sent_a_step => grant, // the first step of a process always goes at once
            _ => return false,
        };
        let (footprint, below) = (u128::from(step.footprint), u128::from(grant.below));
        if footprint + u128::from(transient(step)) >= below {
            return false;
        }
        // footprint + horizon × growth < below, with growth = Δfootprint ÷ Δstep clamped at 0, exactly:
        // footprint × Δstep + horizon × Δfootprint < below × Δstep.
        match last {
            Some((last_step, last_footprint)) if step.step > last_step => {
                let steps = u128::from(step.step - last_step);
                let growth = u128::from(step.footprint.saturating_sub(last_footprint));
                footprint * steps + u128::from(grant.horizon) * growth < below * steps
            }
            _ => true, // no previous step (or no step between): growth 0
        }
    }

    /// A step at `now`: nothing when it is held, else the held steps and it, to send now.
    pub fn step(&mut self, step: Step, now: f64) -> Vec<Message> {
        if self.calm(&step) && self.held.len() < self.max_held && !self.due(now) {
            if self.held.is_empty() {
                self.held_since = now;
            }
            self.held.push(step);
            return Vec::new();
        }
        self.sent_a_step = true;
        self.held.push(step);
        self.release()
    }

    /// Any other frame but a heartbeat: the held steps go first (order is kept), then `message`.
    pub fn before(&mut self, message: Message) -> Vec<Message> {
        let mut out = self.release();
        out.push(message);
        out
    }

    /// Whether the oldest held step has waited `hold` seconds at `now` (or holding was withdrawn).
    pub fn due(&self, now: f64) -> bool {
        !self.held.is_empty() && self.grant.map_or(true, |grant| now - self.held_since >= grant.hold)
    }

    /// Seconds from `now` until the oldest held step falls due (0 when it is due); `None` when nothing is held.
    pub fn due_in(&self, now: f64) -> Option<f64> {
        if self.held.is_empty() {
            return None;
        }
        Some(self.grant.map_or(0.0, |grant| (self.held_since + grant.hold - now).max(0.0)))
    }

    /// The held steps, to send now, as the current `hold_rows` allows.
    pub fn release(&mut self) -> Vec<Message> {
        batch(std::mem::take(&mut self.held), self.rows)
    }
}

/// `steps` in order as frames' messages: runs of at most `rows` rows as [`Steps`] when `rows` > 1 (a run of
/// one stays a [`Step`]), else one [`Step`] each.
pub fn batch(steps: Vec<Step>, rows: usize) -> Vec<Message> {
    if rows < 2 || steps.len() < 2 {
        return steps.into_iter().map(Message::Step).collect();
    }
    steps.chunks(rows.min(MAX_STEPS_ROWS)).map(|chunk| match chunk {
        [one] => Message::Step(one.clone()),
        rows => Message::Steps(Steps::of(rows)),
    }).collect()
}
