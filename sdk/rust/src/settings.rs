//! The `MLXSUP_*` environment a daemon spawns a worker with (docs/PROTOCOL.md 5): an *integer* variable is
//! decimal digits only, a *seconds* variable a decimal number that may have a fraction; unset or empty takes the
//! default (what a standalone run uses); a value that does not parse is an error naming the variable.

use std::path::PathBuf;

use crate::session::Error;

/// Per-spawn settings the daemon passes in the `MLXSUP_*` environment (all optional).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub endpoint: String,
    pub token: String,
    pub job: String,
    pub checkpoint_dir: Option<PathBuf>,
    pub batch: u64,
    pub accum: u64,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    pub orphan_timeout: f64,
    pub cache_limit: u64,
    pub cache_clear_bytes: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { endpoint: String::new(), token: String::new(), job: "standalone".into(), checkpoint_dir: None,
                   batch: 0, accum: 0, checkpoint_every: 0, keep_checkpoints: 3, orphan_timeout: 5.0,
                   cache_limit: 0, cache_clear_bytes: 0 }
    }
}

/// An integer variable: decimal digits only (`"8"`, never `"8.0"` or `"+8"`; PROTOCOL.md 5).
pub(crate) fn integer<T: std::str::FromStr>(name: &str, raw: &str) -> Result<T, Error> {
    let problem = || Error::Env(format!("MLXSUP_{name}={raw:?} is not a valid integer (decimal digits only)"));
    if !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(problem());
    }
    raw.parse().map_err(|_| problem())
}

/// A seconds variable: a decimal number that may have a fraction (`"5"`, `"5.0"`, `"1.5"`; PROTOCOL.md 5).
pub(crate) fn seconds(name: &str, raw: &str) -> Result<f64, Error> {
    let (whole, fraction) = raw.split_once('.').unwrap_or((raw, ""));
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if whole.len() + fraction.len() == 0 || !digits(whole) || !digits(fraction) {
        return Err(Error::Env(format!("MLXSUP_{name}={raw:?} is not a valid number of seconds (e.g. 5 or 1.5)")));
    }
    raw.parse().map_err(|_| Error::Env(format!("MLXSUP_{name}={raw:?} is not a valid number of seconds")))
}

impl Settings {
    /// Read the `MLXSUP_*` variables from the process environment.
    pub fn from_env() -> Result<Settings, Error> {
        Settings::from_lookup(|name| std::env::var(name).ok())
    }

    /// Read the settings through `lookup` (a variable's value by full name; empty counts as unset).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, Error> {
        let mut s = Settings::default();
        let get = |name: &str| lookup(&format!("MLXSUP_{name}")).filter(|v| !v.is_empty());
        if let Some(v) = get("ENDPOINT") { s.endpoint = v; }
        if let Some(v) = get("TOKEN") { s.token = v; }
        if let Some(v) = get("JOB") { s.job = v; }
        if let Some(v) = get("CHECKPOINT_DIR") { s.checkpoint_dir = Some(PathBuf::from(v)); }
        if let Some(v) = get("BATCH") { s.batch = integer("BATCH", &v)?; }
        if let Some(v) = get("ACCUM") { s.accum = integer("ACCUM", &v)?; }
        if let Some(v) = get("CHECKPOINT_EVERY") { s.checkpoint_every = integer("CHECKPOINT_EVERY", &v)?; }
        if let Some(v) = get("KEEP_CHECKPOINTS") { s.keep_checkpoints = integer("KEEP_CHECKPOINTS", &v)?; }
        if let Some(v) = get("ORPHAN_TIMEOUT") { s.orphan_timeout = seconds("ORPHAN_TIMEOUT", &v)?; }
        if let Some(v) = get("CACHE_LIMIT") { s.cache_limit = integer("CACHE_LIMIT", &v)?; }
        if let Some(v) = get("CACHE_CLEAR_BYTES") { s.cache_clear_bytes = integer("CACHE_CLEAR_BYTES", &v)?; }
        Ok(s)
    }
}

