//! The session: what a training loop calls to be supervised (the Rust twin of the Python `Session`).
//!
//! Everything the daemon asks for happens inside [`Session::end_step`], at a step boundary, so a checkpoint
//! never holds a half-updated model. Without a supervisor (no `MLXSUP_ENDPOINT`) the same calls still
//! checkpoint and resume; telemetry and commands are skipped.

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::checkpoint::{CheckpointError, Checkpoints, Saved};
use crate::protocol::{self, Action, Command, Message, EXIT_CHECKPOINTED, FINISHED, PROTOCOL_VERSION};
use crate::pulse::{BusyGuard, Pulse, Sent, Shared};
pub use crate::settings::Settings;
use crate::steering::Steering;
use crate::sys;

const KEEPALIVE_EVERY: f64 = 1.0;

/// What can go wrong in a session.
#[derive(Debug)]
pub enum Error {
    /// A bad `MLXSUP_*` value.
    Env(String),
    /// The socket could not be set up.
    Zmq(zmq::Error),
    /// A checkpoint could not be written.
    Checkpoint(CheckpointError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Env(problem) => f.write_str(problem),
            Error::Zmq(error) => write!(f, "worker socket: {error}"),
            Error::Checkpoint(error) => write!(f, "checkpoint: {error}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<CheckpointError> for Error {
    fn from(error: CheckpointError) -> Self {
        Error::Checkpoint(error)
    }
}

impl From<zmq::Error> for Error {
    fn from(error: zmq::Error) -> Self {
        Error::Zmq(error)
    }
}

/// The training state a session checkpoints. Closures `FnMut(&Path) -> io::Result<()>` are one.
pub trait TrainState {
    /// Write the weights, the optimizer state and whatever resuming needs as files into `dir` (a fresh
    /// directory). With mlx-rs: save the model's and the optimizer's arrays as safetensors there.
    fn save(&mut self, dir: &Path) -> io::Result<()>;

    /// Free the framework's buffer cache (the daemon asks when memory nears the budget). Default: nothing.
    fn clear_cache(&mut self) {}
}

impl<F: FnMut(&Path) -> io::Result<()>> TrainState for F {
    fn save(&mut self, dir: &Path) -> io::Result<()> {
        self(dir)
    }
}

/// Where a run starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Resumed {
    /// 0 on a fresh run, else the step of the checkpoint loaded.
    pub step: u64,
    /// The checkpoint directory loaded from, if any.
    pub checkpoint: Option<PathBuf>,
    /// That checkpoint's `meta.json` record (empty on a fresh run).
    pub meta: Map<String, Value>,
    /// Micro-batch and accumulation to train with (the daemon's choice wins over the script's).
    pub batch: u64,
    pub accum: u64,
}

/// Telemetry of one step beyond its number and loss (memory in bytes).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepStats {
    /// MLX active memory (mlx-rs `memory::active_memory()`); `None`: not measured (the default), which the
    /// daemon never reads as 0.
    pub mlx_active: Option<u64>,
    /// MLX buffer cache (mlx-rs `memory::cache_memory()`); `None`: not measured.
    pub mlx_cache: Option<u64>,
    pub mlx_peak: u64,
    pub tokens_per_second: Option<f64>,
    pub val_loss: Option<f64>,
}

/// What the loop does after [`Session::end_step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// Checkpointed and said goodbye: exit with this status (only when `fast_exit` is off).
    Exit(i32),
}

/// The connection: the socket (inside `shared`, with the pulse thread) and its context.
struct Link {
    shared: Arc<Shared>,
    pulse: Pulse,
    context: zmq::Context, // dropped last: terminating it waits (up to the linger) for queued frames
}

/// Connection of one training process to its supervisor (or a standalone stand-in).
pub struct Session {
    pub settings: Settings,
    pub target_steps: u64,
    batch: u64,
    accum: u64,
    checkpoints: Option<Checkpoints>,
    link: Option<Link>,
    stop_reason: String,
    hello_sent: bool,
    last_boundary: Instant,
    fast_exit: bool,
    /// What the conformance kit asks of this worker (`MLXSUP_CONFORMANCE_*`; [`Session::from_env`] reads it).
    pub steering: Steering,
}

impl Session {
    /// A session from the `MLXSUP_*` environment; standalone when there is no endpoint. SIGTERM is caught
    /// when supervised (it leads to a checkpoint and exit 75 at the next step boundary).
    pub fn from_env(target_steps: u64, batch: u64, accum: u64) -> Result<Session, Error> {
        let mut session = Session::new(Settings::from_env()?, target_steps, batch, accum)?;
        session.steering = Steering::from_env()?;
        if session.supervised() {
            sys::install_sigterm_handler();
        }
        Ok(session)
    }

    /// A session with explicit settings (connects when `settings.endpoint` is set).
    pub fn new(settings: Settings, target_steps: u64, batch: u64, accum: u64) -> Result<Session, Error> {
        let link = if settings.endpoint.is_empty() { None } else { Some(connect(&settings)?) };
        let checkpoints = settings.checkpoint_dir.as_ref().map(|d| Checkpoints::new(d, settings.keep_checkpoints));
        Ok(Session {
            batch: if settings.batch > 0 { settings.batch } else { batch.max(1) },
            accum: if settings.accum > 0 { settings.accum } else { accum.max(1) },
            settings, target_steps, checkpoints, link, stop_reason: String::new(), hello_sent: false,
            last_boundary: Instant::now(), fast_exit: true, steering: Steering::default(),
        })
    }

    /// True when a daemon spawned this process.
    pub fn supervised(&self) -> bool {
        self.link.is_some()
    }

    pub fn batch(&self) -> u64 {
        self.batch
    }

    pub fn accum(&self) -> u64 {
        self.accum
    }

    pub fn checkpoint_dir(&self) -> Option<&Path> {
        self.checkpoints.as_ref().map(Checkpoints::dir)
    }

    /// `true` (the default): on checkpoint-and-exit, [`Session::end_step`] exits the process with status 75
    /// once the goodbye is sent, without running destructors (freeing leaked memory costs more than a
    /// restart). `false`: it returns [`Next::Exit`] and the loop must exit with that status.
    pub fn set_fast_exit(&mut self, fast_exit: bool) {
        self.fast_exit = fast_exit;
    }

    /// Find the newest good checkpoint and hand it to `load` (which reads the state's files from it); a
    /// checkpoint that fails to verify or to load is skipped for the previous one. Then say hello.
    pub fn resume<L>(&mut self, mut load: L) -> Resumed
    where
        L: FnMut(&Path) -> io::Result<()>,
    {
        let mut resumed = Resumed { step: 0, checkpoint: None, meta: Map::new(), batch: self.batch, accum: self.accum };
        let busy = self.busy(); // heartbeats with the token while a large checkpoint loads (before the hello)
        std::thread::sleep(Duration::from_secs_f64(self.steering.load_seconds));
        if let Some(checkpoints) = &self.checkpoints {
            for found in checkpoints.verified() {
                match load(&found.path) {
                    Ok(()) => {
                        resumed = Resumed { step: found.step, checkpoint: Some(found.path), meta: found.meta, ..resumed };
                        break;
                    }
                    Err(error) => self.log("checkpoint_unloadable", &format!("path={} error={error}", found.path.display())),
                }
            }
        }
        drop(busy);
        self.say_hello(resumed.step);
        self.last_boundary = Instant::now();
        resumed
    }

    /// Report optimizer step `step` (1-based count of steps done) and act on pending commands.
    pub fn end_step(&mut self, step: u64, loss: f64, state: &mut impl TrainState) -> Result<Next, Error> {
        self.end_step_with(step, loss, StepStats::default(), state)
    }

    /// [`Session::end_step`] with MLX memory counters, throughput and a validation loss.
    pub fn end_step_with(&mut self, step: u64, loss: f64, stats: StepStats, state: &mut impl TrainState)
        -> Result<Next, Error> {
        if self.steering.slow(step) {
            let _busy = self.busy(); // the kit's long step: keepalives, and the watchdog, meanwhile
            std::thread::sleep(Duration::from_secs_f64(self.steering.slow_seconds));
        }
        let now = Instant::now();
        self.report(step, loss, stats, now.duration_since(self.last_boundary).as_secs_f64());
        sys::mark_stepped(); // a step boundary: from now on SIGTERM waits for the next one
        self.last_boundary = now;
        let commands = self.boundary_commands();
        if commands.iter().any(|c| c.action == Action::ClearCache) {
            state.clear_cache();
        }
        let mut exit = commands.iter().find(|c| c.action == Action::CheckpointExit).cloned();
        if step >= self.target_steps {
            exit = None; // the loop is about to finish (and checkpoint) anyway
        }
        if let (Some(link), true) = (&self.link, exit.is_some()) {
            link.shared.leaving.store(true, Ordering::SeqCst); // the watchdog gives this checkpoint time
        }
        let every = self.settings.checkpoint_every;
        let periodic = every > 0 && step % every == 0;
        if exit.is_some() || periodic || commands.iter().any(|c| c.action == Action::Checkpoint) {
            self.save(step, state)?;
        }
        match exit {
            Some(command) => {
                let reason = if command.reason.is_empty() { "asked".to_string() } else { command.reason };
                Ok(self.leave(&reason, step, EXIT_CHECKPOINTED))
            }
            None => Ok(Next::Continue),
        }
    }

    /// Send step `step`'s telemetry (through the hold); says hello first if the loop never called `resume`.
    fn report(&mut self, step: u64, loss: f64, stats: StepStats, seconds: f64) {
        if !self.supervised() {
            return;
        }
        if !self.hello_sent {
            self.say_hello(step.saturating_sub(1));
        }
        // A version 1 daemon has no "not measured": it gets 0, as before.
        let v1 = self.link.as_ref().map_or(true, |l| l.shared.version.load(Ordering::SeqCst) < 2);
        let known = |n: Option<u64>| if v1 { Some(n.unwrap_or(0)) } else { n };
        let report = protocol::Step {
            step, batch: self.batch, accum: self.accum, loss, step_seconds: seconds, mlx_active: known(stats.mlx_active),
            mlx_cache: known(stats.mlx_cache), mlx_peak: stats.mlx_peak, footprint: sys::footprint(),
            tokens_per_second: stats.tokens_per_second, val_loss: stats.val_loss,
        };
        if let Some(link) = &self.link {
            link.shared.send_step(report); // held while the daemon allows it and memory is calm
        }
    }

    /// The daemon's commands read at this boundary, then a `checkpoint_exit` of this process's own reason (if
    /// any) last: PROTOCOL.md 8, a command's reason first, then `sigterm`, `daemon_lost`, `daemon_silent`.
    fn boundary_commands(&mut self) -> Vec<Command> {
        let mut commands = Vec::new();
        if sys::sigterm_received() && self.stop_reason.is_empty() {
            self.stop_reason = "sigterm".into();
        }
        if let Some(link) = &self.link {
            commands = link.shared.take_commands();
            if self.stop_reason.is_empty() {
                self.stop_reason = link.shared.orphan_reason().unwrap_or_default().to_string();
            }
        }
        if !self.stop_reason.is_empty() {
            commands.push(Command { action: Action::CheckpointExit, reason: self.stop_reason.clone(), steps: None });
        }
        commands
    }

    /// The step-telemetry frames sent so far: `step` frames, `steps` frames and the rows these carried (all
    /// zero standalone). With holding granted, many steps go as one `steps` frame.
    pub fn sent(&self) -> Sent {
        self.link.as_ref().map_or_else(Sent::default, |link| link.shared.sent())
    }

    /// Tell the daemon this worker is alive while it is busy between step boundaries (loading data,
    /// evaluating): sends a heartbeat unless one went out in the last second. Commands still wait for the
    /// next boundary.
    pub fn keepalive(&self) {
        if let Some(link) = &self.link {
            if link.shared.seconds_since_sent() >= KEEPALIVE_EVERY {
                link.shared.keepalive();
            }
        }
    }

    /// Heartbeats every second from the pulse thread for as long as the guard lives:
    /// `let _busy = session.busy();` around a long model load, compile or evaluation (`None` standalone).
    pub fn busy(&self) -> Option<BusyGuard> {
        self.link.as_ref().map(|link| link.pulse.busy())
    }

    /// Write a durable checkpoint of `state` and announce it; `None` when no checkpoint directory is set.
    pub fn save(&mut self, step: u64, state: &mut impl TrainState) -> Result<Option<Saved>, Error> {
        let checkpoints = match &self.checkpoints {
            Some(checkpoints) => checkpoints,
            None => return Ok(None),
        };
        let mut extra = Map::new();
        extra.insert("batch".into(), json!(self.batch));
        extra.insert("accum".into(), json!(self.accum));
        extra.insert("job".into(), json!(self.settings.job));
        let saved = checkpoints.save(step, extra, |dir| state.save(dir))?;
        self.send(Message::CheckpointSaved(protocol::CheckpointSaved {
            step, path: saved.path.to_string_lossy().into_owned(), seconds: saved.seconds, nbytes: saved.nbytes,
        }));
        Ok(Some(saved))
    }

    /// Training is done: save a final checkpoint and tell the daemon (the process may then exit 0).
    pub fn finish(&mut self, step: u64, state: &mut impl TrainState) -> Result<(), Error> {
        self.save(step, state)?;
        self.send(Message::Goodbye(protocol::Goodbye { reason: FINISHED.into(), step }));
        if self.supervised() {
            self.log("worker_exit", &format!("reason={FINISHED} step={step} {}", self.sent()));
        }
        self.close(1000);
        Ok(())
    }

    /// Flush pending telemetry (bounded by `linger_ms`) and release the socket.
    pub fn close(&mut self, linger_ms: i32) {
        if let Some(link) = self.link.take() {
            link.shared.close(linger_ms);
            drop(link.pulse); // joins the thread
            drop(link.context); // waits for the queued frames, at most the linger
        }
    }

    fn say_hello(&mut self, start_step: u64) {
        if !self.supervised() || self.hello_sent {
            return;
        }
        self.hello_sent = true;
        if let Some(link) = &self.link {
            link.shared.heard_from_now(); // the orphan timer starts (PROTOCOL.md 8): a long load is not silence
        }
        self.send(Message::Hello(protocol::Hello {
            token: self.settings.token.clone(), pid: u64::from(std::process::id()), job: self.settings.job.clone(),
            start_step, target_steps: self.target_steps, batch: self.batch, accum: self.accum,
            protocol: PROTOCOL_VERSION, features: None,
        }));
    }

    fn send(&self, message: Message) {
        if let Some(link) = &self.link {
            link.shared.send(&message); // best effort: the daemon samples our memory itself
        }
    }

    fn leave(&mut self, reason: &str, step: u64, code: i32) -> Next {
        self.send(Message::Goodbye(protocol::Goodbye { reason: reason.into(), step }));
        self.log("worker_exit", &format!("reason={reason} step={step} {}", self.sent()));
        let orphaned = reason == "daemon_lost" || reason == "daemon_silent";
        self.close(if orphaned { 0 } else { 1000 }); // lingers until the goodbye is delivered, unless alone
        if self.fast_exit {
            let _ = io::stdout().flush();
            let _ = io::stderr().flush();
            std::process::exit(code);
        }
        Next::Exit(code)
    }

    fn log(&self, event: &str, details: &str) {
        eprintln!("[worker {}] {event} {details}", self.settings.job);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close(1000);
    }
}

fn connect(settings: &Settings) -> Result<Link, zmq::Error> {
    let context = zmq::Context::new();
    let socket = context.socket(zmq::DEALER)?;
    socket.set_sndhwm(10_000)?;
    socket.set_rcvhwm(1_000)?;
    socket.set_maxmsgsize(protocol::MAX_MESSAGE_BYTES as i64)?;
    socket.set_linger(1000)?;
    socket.connect(&settings.endpoint)?;
    let shared = Shared::new(socket, settings.orphan_timeout, settings.job.clone(), settings.token.clone());
    let pulse = Pulse::start(Arc::clone(&shared));
    Ok(Link { shared, pulse, context })
}
