//! The session's background thread: heartbeats while the trainer is busy, and the orphan watchdog.
//!
//! The loop talks to the daemon only at step boundaries. A thread closes the two gaps that leaves (the same
//! design as the Python SDK's `worker/pulse.py`): inside [`Session::busy`](crate::Session::busy) it sends a
//! heartbeat every second so a long evaluation is not taken for a hang; and when the daemon died
//! (re-parented) or went silent it gives the loop half the orphan timeout to reach a boundary and checkpoint
//! there, then ends the process with status 75 (nobody enforces an orphan's budget; the last durable
//! checkpoint stands). The socket is shared with the loop under one mutex; the thread also drains it, so
//! heartbeats are seen mid-step and commands wait in an inbox for the next boundary. Step telemetry goes
//! through the [`StepHold`] the daemon's heartbeats configure: the thread sends held steps whose time is up
//! when the loop is slow to reach its next step, and held steps go out before any other frame but a heartbeat.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::hold::StepHold;
use crate::protocol::{self, Command, Heartbeat, Message, Step, EXIT_CHECKPOINTED, PROTOCOL_VERSION};
use crate::sys;

const INTERVAL: Duration = Duration::from_millis(250);
const KEEPALIVE_EVERY: f64 = 1.0;
const MAX_DRAIN: usize = 10_000; // frames read at one look; the rest wait for the next

/// What the loop and the thread share.
pub(crate) struct Shared {
    socket: Mutex<Option<zmq::Socket>>,
    state: Mutex<State>,
    busy: AtomicUsize,
    pub(crate) leaving: AtomicBool,
    /// The protocol version our frames are written in: 1 until the daemon's welcome agrees on more.
    pub(crate) version: AtomicU64,
    stop: AtomicBool,
    orphan_timeout: f64,
    parent: u32,
    job: String,
    token: String,
    started: Instant, // the clock of holding (monotonic)
}

#[derive(Default)]
struct State {
    last_heard: f64,
    last_sent: f64,
    inbox: Vec<Command>,
    orphaned_at: Option<f64>,
    hold: StepHold,
    /// Frames sent by kind, for the tests and the README's numbers: (`step`, `steps`, rows in `steps`).
    sent: Sent,
}

/// How many step-telemetry frames went out, and how many rows the `steps` frames among them carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    pub step_frames: u64,
    pub steps_frames: u64,
    pub steps_rows: u64,
}

impl std::fmt::Display for Sent {
    /// `step_frames=N steps_frames=M steps_rows=R`, as the worker's exit line logs it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step_frames={} steps_frames={} steps_rows={}", self.step_frames, self.steps_frames, self.steps_rows)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) // a panicked holder left plain data behind
}

impl Shared {
    pub(crate) fn new(socket: zmq::Socket, orphan_timeout: f64, job: String, token: String) -> Arc<Shared> {
        let now = sys::now_unix();
        Arc::new(Shared {
            socket: Mutex::new(Some(socket)),
            // The daemon says nothing before our hello: its silence counts from then (heard_from_now).
            state: Mutex::new(State { last_heard: f64::INFINITY, last_sent: now, ..State::default() }),
            busy: AtomicUsize::new(0), leaving: AtomicBool::new(false), version: AtomicU64::new(1), stop: AtomicBool::new(false),
            orphan_timeout, parent: std::os::unix::process::parent_id(), job, token, started: Instant::now(),
        })
    }

    fn clock(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Send `messages` in order, each as one frame, without blocking (telemetry is best effort: a full queue
    /// drops it). The caller holds the socket's lock and the state's.
    fn send_locked(&self, socket: &zmq::Socket, state: &mut State, messages: &[Message]) {
        for message in messages {
            let version = match message {
                Message::Hello(_) => 1, // every daemon reads a version 1 hello
                _ => self.version.load(Ordering::SeqCst),
            };
            let frame = protocol::encode_version(message, version);
            if frame.len() > protocol::MAX_MESSAGE_BYTES {
                continue; // PROTOCOL.md 2: the daemon would drop the connection; drop the frame instead
            }
            if socket.send(frame, zmq::DONTWAIT).is_err() {
                continue; // a full queue: dropped, and not counted as sent
            }
            match message {
                Message::Step(_) => state.sent.step_frames += 1,
                Message::Steps(steps) => {
                    state.sent.steps_frames += 1;
                    state.sent.steps_rows += steps.len() as u64;
                }
                _ => {}
            }
        }
        if !messages.is_empty() {
            state.last_sent = sys::now_unix();
        }
    }

    /// Send one message; held steps go before it, except before a heartbeat (a sign of life only).
    pub(crate) fn send(&self, message: &Message) {
        if let Some(socket) = lock(&self.socket).as_ref() {
            let mut state = lock(&self.state);
            let messages = match message {
                Message::Heartbeat(_) => vec![message.clone()],
                _ => state.hold.before(message.clone()),
            };
            self.send_locked(socket, &mut state, &messages);
        }
    }

    /// Report a step: held while the daemon allows it and memory is calm, else sent with the held ones.
    pub(crate) fn send_step(&self, step: Step) {
        if let Some(socket) = lock(&self.socket).as_ref() {
            let mut state = lock(&self.state);
            let messages = state.hold.step(step, self.clock());
            self.send_locked(socket, &mut state, &messages);
        }
    }

    /// The step-telemetry frames sent so far.
    pub(crate) fn sent(&self) -> Sent {
        lock(&self.state).sent
    }

    pub(crate) fn keepalive(&self) {
        // The token makes it a sign of life even before the hello (a long model load inside busy()).
        self.send(&Message::Heartbeat(Heartbeat { sent_at: sys::now_unix(), token: Some(self.token.clone()), ..Default::default() }));
    }

    /// Start the orphan timer now (at the hello): before it only a parent change makes an orphan.
    pub(crate) fn heard_from_now(&self) {
        lock(&self.state).last_heard = sys::now_unix();
    }

    pub(crate) fn seconds_since_sent(&self) -> f64 {
        sys::now_unix() - lock(&self.state).last_sent
    }

    /// Read every pending frame: heartbeats refresh `last_heard`, commands go to the inbox.
    fn drain(&self) {
        let socket = lock(&self.socket);
        let socket = match socket.as_ref() {
            Some(socket) => socket,
            None => return,
        };
        for _ in 0..MAX_DRAIN {
            let parts = match socket.recv_multipart(zmq::DONTWAIT) {
                Ok(parts) => parts,
                Err(_) => break,
            };
            let mut state = lock(&self.state);
            match protocol::decode_parts(&parts) { // a multi-part message is refused whole
                Ok(Message::Heartbeat(beat)) => {
                    state.last_heard = state.last_heard.max(beat.sent_at);
                    let flushed = state.hold.configure(&beat); // withdrawn or narrowed: held steps go now
                    self.send_locked(socket, &mut state, &flushed);
                }
                Ok(Message::Command(command)) => {
                    state.last_heard = sys::now_unix();
                    state.inbox.push(command);
                    let flushed = state.hold.command(); // held steps go now; no holding until a heartbeat
                    self.send_locked(socket, &mut state, &flushed);
                }
                Ok(Message::Welcome(welcome)) => {
                    state.last_heard = sys::now_unix();
                    self.version.store(welcome.protocol.clamp(1, PROTOCOL_VERSION), Ordering::SeqCst);
                }
                Ok(_) => {} // a worker-to-daemon type: valid, not for us
                Err(error) => eprintln!("[worker {}] bad_frame_from_daemon problem={error}", self.job),
            }
        }
        let mut state = lock(&self.state);
        if state.hold.due(self.clock()) { // the loop is slow to reach its next step: send them from here
            let due = state.hold.release();
            self.send_locked(socket, &mut state, &due);
        }
    }

    /// The commands received since the last boundary.
    pub(crate) fn take_commands(&self) -> Vec<Command> {
        self.drain();
        std::mem::take(&mut lock(&self.state).inbox)
    }

    /// `daemon_lost` (re-parented), `daemon_silent` (nothing heard for the orphan timeout), or `None`.
    pub(crate) fn orphan_reason(&self) -> Option<&'static str> {
        if std::os::unix::process::parent_id() != self.parent {
            Some("daemon_lost")
        } else if sys::now_unix() - lock(&self.state).last_heard > self.orphan_timeout {
            Some("daemon_silent")
        } else {
            None
        }
    }

    /// How long the thread may sleep: its period, or less when a held step falls due sooner (so a held step
    /// waits `hold` seconds, not up to a period more, when the loop is slow to reach its next boundary).
    fn next_look(&self) -> Duration {
        let due_in = lock(&self.state).hold.due_in(self.clock());
        due_in.map_or(INTERVAL, |seconds| INTERVAL.min(Duration::from_secs_f64(seconds.max(0.001))))
    }

    /// One look of the thread: drain, keep alive while busy, and end an orphan that did not leave in time.
    fn check(&self) {
        self.drain();
        if self.busy.load(Ordering::SeqCst) > 0 && self.seconds_since_sent() >= KEEPALIVE_EVERY {
            self.keepalive();
        }
        let reason = match self.orphan_reason() {
            Some(reason) => reason,
            None => {
                lock(&self.state).orphaned_at = None;
                return;
            }
        };
        let now = sys::now_unix();
        let since = now - *lock(&self.state).orphaned_at.get_or_insert(now);
        let leaving = if self.leaving.load(Ordering::SeqCst) { self.orphan_timeout } else { 0.0 };
        if since >= self.orphan_timeout / 2.0 + leaving {
            eprintln!("[worker {}] watchdog: {reason}; leaving mid-step, the last durable checkpoint stands", self.job);
            std::process::exit(EXIT_CHECKPOINTED);
        }
    }

    /// Close the socket, waiting at most `linger_ms` for queued frames (the goodbye) to go out.
    pub(crate) fn close(&self, linger_ms: i32) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(socket) = lock(&self.socket).take() {
            let mut state = lock(&self.state);
            let held = state.hold.release(); // pending telemetry goes out first
            self.send_locked(&socket, &mut state, &held);
            let _ = socket.set_linger(linger_ms);
        }
    }
}

/// The thread, stopped and joined when dropped.
pub(crate) struct Pulse {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Pulse {
    pub(crate) fn start(shared: Arc<Shared>) -> Pulse {
        let inner = Arc::clone(&shared);
        let thread = thread::Builder::new().name("mlxsup-pulse".into()).spawn(move || {
            loop {
                thread::park_timeout(inner.next_look()); // unparked early by Drop, so closing never waits a period
                if inner.stop.load(Ordering::SeqCst) {
                    break;
                }
                inner.check();
            }
        });
        Pulse { shared, thread: thread.ok() } // without a thread the loop still checks at every boundary
    }

    /// Count a busy stretch (heartbeats every second) until the guard is dropped.
    pub(crate) fn busy(&self) -> BusyGuard {
        self.shared.busy.fetch_add(1, Ordering::SeqCst);
        self.shared.keepalive();
        BusyGuard { shared: Arc::clone(&self.shared) }
    }
}

impl Drop for Pulse {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// Keeps heartbeats going while it lives: `let _busy = session.busy();` around a long evaluation.
pub struct BusyGuard {
    shared: Arc<Shared>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.shared.busy.fetch_sub(1, Ordering::SeqCst);
    }
}
