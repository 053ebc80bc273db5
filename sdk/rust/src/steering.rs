//! What the conformance kit asks of a worker under test (docs/PROTOCOL.md section 9; the daemon never sets it):
//! a slow load before the hello (`MLXSUP_CONFORMANCE_LOAD_SECONDS`), and every N-th step slow
//! (`MLXSUP_CONFORMANCE_SLOW_EVERY`, `MLXSUP_CONFORMANCE_SLOW_SECONDS`). The session spends that time where a real
//! long load or evaluation would be, inside [`Session::busy`](crate::Session::busy), so the kit sees the
//! heartbeats, keepalives and watchdog of a real one (the twin of the Python SDK's `worker/steering.py`).

use crate::session::Error;
use crate::settings::{integer, seconds};

const PREFIX: &str = "CONFORMANCE_";

/// The kit's requests; all 0 (nothing slow) when unset.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Steering {
    /// Seconds to spend loading, before the hello.
    pub load_seconds: f64,
    /// Every step whose number is divisible by this is a long one (0: none).
    pub slow_every: u64,
    /// Seconds a long step takes longer, before its `step` frame.
    pub slow_seconds: f64,
}

impl Steering {
    /// Read the `MLXSUP_CONFORMANCE_*` variables from the process environment.
    pub fn from_env() -> Result<Steering, Error> {
        Steering::from_lookup(|name| std::env::var(name).ok())
    }

    /// Read them through `lookup` (a variable's value by full name; empty counts as unset).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Steering, Error> {
        let get = |name: &str| lookup(&format!("MLXSUP_{PREFIX}{name}")).filter(|v| !v.is_empty());
        let mut steering = Steering::default();
        if let Some(v) = get("LOAD_SECONDS") { steering.load_seconds = seconds(&format!("{PREFIX}LOAD_SECONDS"), &v)?; }
        if let Some(v) = get("SLOW_EVERY") { steering.slow_every = integer(&format!("{PREFIX}SLOW_EVERY"), &v)?; }
        if let Some(v) = get("SLOW_SECONDS") { steering.slow_seconds = seconds(&format!("{PREFIX}SLOW_SECONDS"), &v)?; }
        Ok(steering)
    }

    /// Whether step `step` is one of the long ones.
    pub fn slow(&self, step: u64) -> bool {
        self.slow_every > 0 && step % self.slow_every == 0
    }
}
