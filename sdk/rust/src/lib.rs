//! Worker SDK for [mlx-supervisor](../../../README.md): make a Rust training loop (e.g. one written with
//! mlx-rs) supervisable by `mlxsupd`.
//!
//! The daemon runs the loop in a child process under an outside memory budget, receives per-step telemetry
//! and, before the budget is crossed, asks for a checkpoint-and-exit and restarts the process from that
//! checkpoint. The wire protocol is specified in `docs/PROTOCOL.md`; this crate implements it:
//!
//! - [`Session`]: `Session::from_env` (the `MLXSUP_*` environment), [`Session::resume`] (newest verified
//!   checkpoint, step, batch, accum), [`Session::end_step`] once per optimizer step (telemetry, then the
//!   daemon's commands at the step boundary), [`Session::keepalive`] / [`Session::busy`] while busy between
//!   steps, [`Session::finish`]; a background thread ends an orphaned worker (its daemon gone) mid-step.
//! - [`Checkpoints`]: durable checkpoint directories; the trainer writes its arrays into the directory it is
//!   handed, the helper writes `meta.json` with SHA-256 hashes, syncs, renames atomically and keeps the last K.
//! - [`protocol`]: the messages and their msgpack encoding.
//! - [`hold`]: which steps' telemetry waits while memory is far from the daemon's bands, and the `steps` frames
//!   held steps go out as (the session does this by itself when the daemon's heartbeats allow it).
//! - [`Steering`]: the conformance kit's requests for a slow load or slow steps (`MLXSUP_CONFORMANCE_*`).
//!
//! ```no_run
//! use mlxsup_worker::{Next, Session};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut session = Session::from_env(1000, 8, 1)?;
//! let mut step = session.resume(|dir| { /* load weights from dir */ Ok(()) }).step;
//! let mut save = |dir: &std::path::Path| std::fs::write(dir.join("weights.bin"), b"...");
//! while step < session.target_steps {
//!     let loss = 0.5; // one optimizer step with session.batch() x session.accum()
//!     step += 1;
//!     if let Next::Exit(code) = session.end_step(step, loss, &mut save)? {
//!         std::process::exit(code);
//!     }
//! }
//! session.finish(step, &mut save)?;
//! # Ok(()) }
//! ```

pub mod checkpoint;
pub mod checksum;
pub mod hold;
pub mod protocol;
mod pulse;
pub mod session;
pub mod settings;
pub mod steering;
pub mod sys;

pub use checkpoint::{CheckpointError, Checkpoints, Found, Saved};
pub use pulse::{BusyGuard, Sent};
pub use session::{Error, Next, Resumed, Session, Settings, StepStats, TrainState};
pub use steering::Steering;
