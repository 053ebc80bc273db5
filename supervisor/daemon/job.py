"""One supervised job: its state machine, its current worker life, escalation and restarts.

The daemon feeds a Job messages, samples and ticks; the Job answers with commands to its worker, signals to
the worker's process group and state changes. Decisions come from ``supervisor.core.policy``; OS effects go
through ``supervisor.daemon.system``; every decision is one structured log event that explains itself.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import secrets
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from protocol import CheckpointSaved, Command, Goodbye, Hello, Message, Step, encode
from protocol.checkpoints import latest_step
from protocol.messages import EXIT_CHECKPOINTED
from supervisor.config import JobConfig, worker_argv
from supervisor.core.policy import (
    Action,
    Decision,
    Diagnosis,
    Estimator,
    Limits,
    PolicyConfig,
    backoff_delay,
    on_sample,
    on_step,
)
from supervisor.core.sizes import parse_bytes, parse_fraction_of
from supervisor.core.states import PROCESS_STATES, JobState, check_transition
from supervisor.daemon.history import History
from supervisor.daemon.recorder import Recorder
from supervisor.daemon.system import System, WorkerProcess

Publish = Callable[[str, str, dict[str, Any]], None]  # (job, kind, data)
SendToWorker = Callable[[bytes, bytes], None]  # (identity, frame)
log = structlog.get_logger("mlxsupd")
CLEAR_CACHE_EVERY = 1.0  # seconds between clear-cache requests in the warn band


def policy_config(job: JobConfig) -> PolicyConfig:
    """The policy tunables of a job's config."""
    return PolicyConfig(
        leak_threshold=float(parse_bytes(job.leak_threshold)), shrink_factor=job.shrink_factor,
        min_batch=job.min_batch, max_batch=job.batch, keep_effective_batch=job.keep_effective_batch,
        min_steps_per_life=job.min_steps_per_life, regrow_after_steps=job.regrow_after_steps,
        adaptive=job.policy == "adaptive",
    )


@dataclasses.dataclass
class Life:
    """One worker process, from spawn to reap."""

    proc: WorkerProcess
    token: str
    spawned_at: float
    start_checkpoint: int  # newest checkpoint step when spawned: progress is a newer one
    batch: int
    accum: int
    estimator: Estimator
    identity: bytes | None = None
    last_heard: float = 0.0
    last_step: int = 0
    healthy_steps: int = 0
    over_count: int = 0
    pending: Decision | None = None  # why we asked it to exit, applied when it has
    deadline: float = float("inf")  # checkpoint deadline, then the SIGKILL time
    term_sent: bool = False
    last_cache_clear: float = float("-inf")
    goodbye: str = ""


@dataclasses.dataclass
class JobStats:
    """Counters for status, summaries and benchmarks."""

    target_steps: int = 0
    steps_completed: int = 0
    restarts: int = 0
    restart_reasons: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    first_breach_step: int | None = None
    max_sampled: int = 0
    samples: int = 0
    samples_over_budget: int = 0
    samples_over_kill: int = 0
    batch_history: list[list[int]] = dataclasses.field(default_factory=list)
    final_loss: float | None = None
    recoveries: list[float] = dataclasses.field(default_factory=list)
    last_decision_at: float | None = None
    steps_per_second: float = 0.0


@dataclasses.dataclass(frozen=True)
class JobPaths:
    checkpoints: Path
    logs: Path
    history: Path | None
    telemetry: Path | None = None


class Job:
    """A configured job and whatever worker it has now."""

    def __init__(
        self, name: str, config: JobConfig, limits: Limits, paths: JobPaths, system: System, endpoint: str,
        send: SendToWorker, publish: Publish, orphan_timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.config = config
        self.limits = limits
        self.paths = paths
        self.system = system
        self.endpoint = endpoint
        self.send_frame = send
        self.publish = publish
        self.orphan_timeout = orphan_timeout
        self.policy = policy_config(config)
        self.state = JobState.STOPPED
        self.life: Life | None = None
        self.batch, self.accum = config.batch, config.accum
        self.failures = 0  # consecutive exits without a newer checkpoint
        self.crashes = 0  # consecutive crashes, for the backoff delay
        self.retry_at = float("inf")
        self.stop_requested = False
        self.stop_reason = ""
        self.restart_reason = ""
        self.stats = JobStats()
        self.last_sampled = 0
        self.departing: list[tuple[WorkerProcess, float]] = []  # said goodbye, not yet reaped: (process, kill at)
        self.regrown_to = 0  # the batch the last regrowth went to, until it proves itself or breaches
        self.next_config: tuple[JobConfig, Limits] | None = None
        self.history = History(paths.history)
        self.recorder = Recorder(paths.telemetry)
        self.log = log.bind(job=name)

    # -- state --------------------------------------------------------------------------------------

    def change_state(self, new: JobState, reason: str, **fields: Any) -> None:
        """The one way to change state: validated against the table, logged, recorded and published."""
        old = self.state
        if old == new:
            return
        check_transition(old, new)
        self.state = new
        self.log.info("job_state", old=old.name, new=new.name, reason=reason, **fields)
        self.history.record("state", old=old.name, new=new.name, reason=reason, **fields)
        self.publish(self.name, "state", {"old": old.name, "new": new.name, "reason": reason, **fields})

    def decide(self, decision: Decision, now: float, **numbers: Any) -> None:
        """Log, record and publish one decision with the numbers behind it."""
        fields = {"action": decision.action.value, "reason": decision.reason, **numbers}
        if decision.diagnosis is not None:
            fields["diagnosis"] = decision.diagnosis.value
            if decision.next_batch:
                fields.update(next_batch=decision.next_batch, next_accum=decision.next_accum)
        self.log.warning("decision", **fields)
        if decision.action is not Action.CLEAR_CACHE:
            self.history.record("decision", **fields)
        self.publish(self.name, "decision", fields)

    # -- operator requests --------------------------------------------------------------------------

    def reconfigure(self, config: JobConfig, limits: Limits) -> None:
        """New settings from a reread config; they apply at the job's next start."""
        self.next_config = (config, limits)
        self.history.record("config_changed", applies="next start")

    def start(self, now: float, reason: str = "start") -> None:
        """Spawn a worker now (from any startable state)."""
        if self.next_config is not None:
            self.config, self.limits = self.next_config
            self.policy = policy_config(self.config)
            self.batch, self.accum = self.config.batch, self.config.accum
            self.next_config = None
        self.stop_requested = False
        self.retry_at = float("inf")
        token = secrets.token_hex(16)
        env = self._worker_env(token)
        start_checkpoint = latest_step(self.paths.checkpoints) or 0
        self.change_state(JobState.STARTING, reason, batch=self.batch, accum=self.accum)
        try:
            proc = self.system.spawn(worker_argv(self.config), env, self._cwd(), self.paths.logs)
        except OSError as exc:
            self.log.error("spawn_failed", error=str(exc))
            self.history.record("spawn_failed", error=str(exc))
            self._after_failure(now, f"spawn failed: {exc}")
            return
        self.life = Life(proc, token, now, start_checkpoint, self.batch, self.accum, Estimator(self.policy),
                         last_heard=now)
        self.history.record("spawn", pid=proc.pid, batch=self.batch, accum=self.accum,
                            from_checkpoint=start_checkpoint)

    def stop(self, now: float, reason: str = "stop") -> None:
        """Checkpoint and stop (or just stop when no worker is running)."""
        self.stop_requested = True
        self.stop_reason = reason
        life = self.life
        if life is None:
            if self.state not in (JobState.STOPPED, JobState.FINISHED, JobState.FATAL):
                self.change_state(JobState.STOPPED, reason)
            return
        if life.identity is None or self.state == JobState.STARTING:
            self._terminate(now, reason)
        elif not life.term_sent:
            self._ask_exit(now, Decision(Action.CHECKPOINT_EXIT, None, reason), JobState.STOPPING)

    def checkpoint(self) -> bool:
        """Ask the worker for a checkpoint at its next step boundary."""
        return self._command(Command.CHECKPOINT, "requested")

    def set_limits(self, limits: Limits) -> None:
        self.log.info("budget_changed", old=self.limits.budget, new=limits.budget, kill=limits.kill)
        self.history.record("budget", budget=limits.budget, warn=limits.warn, kill=limits.kill)
        self.limits = limits

    def signal(self, signum: int) -> bool:
        return self.life is not None and self.life.proc.signal_group(signum)

    # -- inputs from the daemon ----------------------------------------------------------------------

    def accepts(self, hello: Hello) -> bool:
        """True when ``hello`` carries this job's current spawn token."""
        return self.life is not None and secrets.compare_digest(hello.token, self.life.token)

    def on_hello(self, hello: Hello, identity: bytes, now: float) -> None:
        life = self.life
        assert life is not None  # accepts() was checked by the caller
        life.identity = identity
        life.last_heard = now
        # The worker knows where it really resumed (a damaged newest checkpoint was skipped): progress is
        # measured from there, not from the newest name on disk.
        life.start_checkpoint = hello.start_step
        self.history.record("hello", pid=hello.pid, start_step=hello.start_step, batch=hello.batch,
                            accum=hello.accum)
        self.stats.target_steps = hello.target_steps
        self.stats.steps_completed = max(self.stats.steps_completed, hello.start_step)
        life.last_step = hello.start_step
        self._note_batch(hello.start_step, hello.batch, hello.accum)
        self.log.info("worker_hello", pid=hello.pid, start_step=hello.start_step, batch=hello.batch,
                      accum=hello.accum)
        if self.state == JobState.STARTING:
            self.change_state(JobState.RUNNING, "hello", pid=hello.pid, step=hello.start_step)

    def on_message(self, message: Message, now: float) -> None:
        life = self.life
        if life is None:
            return
        life.last_heard = now
        if isinstance(message, Step):
            self._on_step(life, message, now)
        elif isinstance(message, CheckpointSaved):
            self.history.record("checkpoint", step=message.step, seconds=round(message.seconds, 4),
                                bytes=message.nbytes)
            self.publish(self.name, "log", {"event": "checkpoint", "step": message.step})
        elif isinstance(message, Goodbye):
            life.goodbye = message.reason
            self.log.info("worker_goodbye", reason=message.reason, step=message.step)
            pending = life.pending
            requested = pending is not None and pending.action is Action.CHECKPOINT_EXIT
            if requested and message.reason != "finished" and not self.stop_requested:
                self._depart(life, now)

    def _depart(self, life: Life, now: float) -> None:
        """The worker checkpointed on our request and said goodbye: start its successor now, while the kernel
        still tears the old process down (freeing gigabytes takes a good part of a restart's cost)."""
        self.departing.append((life.proc, now + self.config.kill_grace + 5.0))
        self._on_exit(life, EXIT_CHECKPOINTED, now)

    def _on_step(self, life: Life, message: Step, now: float) -> None:
        stats = self.stats
        if stats.last_decision_at is not None and life.spawned_at >= stats.last_decision_at:
            # The first productive step of the life after a breach decision (the old worker's in-flight
            # step, reported after the decision, does not count).
            stats.recoveries.append(now - stats.last_decision_at)
            stats.last_decision_at = None
        life.last_step = message.step
        stats.steps_completed = max(stats.steps_completed, message.step)
        stats.final_loss = message.loss
        if message.step_seconds > 0:
            stats.steps_per_second = 0.9 * stats.steps_per_second + 0.1 / message.step_seconds
        self._note_batch(message.step, message.batch, message.accum)
        life.estimator.observe_step(message.step, message.footprint, message.mlx_peak - message.mlx_active)
        life.healthy_steps += 1
        telemetry = {
            "step": message.step, "loss": message.loss, "batch": message.batch, "accum": message.accum,
            "step_seconds": message.step_seconds, "mlx_active": message.mlx_active, "mlx_cache": message.mlx_cache,
            "mlx_peak": message.mlx_peak, "footprint": message.footprint,
            "leak_bytes_per_step": round(life.estimator.slope), "transient": life.estimator.transient,
        }
        self.recorder.record("step", **telemetry)
        self.publish(self.name, "telemetry", telemetry)
        if self.state != JobState.RUNNING:
            return
        decision = on_step(life.estimator, self.limits, life.batch, life.accum, life.healthy_steps, self.policy)
        if decision.acts:
            self._act(life, decision, now, step=message.step, level=message.footprint)

    def on_sample(self, now: float, available: int, floor: int) -> None:
        """Take one footprint sample of the worker's group and act on it."""
        life = self.life
        if life is None or self.state not in PROCESS_STATES:
            return
        sample = life.proc.sample(now)
        if not sample.complete:
            return
        stats = self.stats
        stats.samples += 1
        self.last_sampled = sample.bytes
        stats.max_sampled = max(stats.max_sampled, sample.bytes)
        stats.samples_over_budget += sample.bytes > self.limits.budget
        stats.samples_over_kill += sample.bytes > self.limits.kill
        self.recorder.record("sample", bytes=sample.bytes, pids=sample.pids)
        life.estimator.observe_sample(sample.bytes)
        if sample.bytes >= self.limits.warn:
            life.healthy_steps = 0
        decision, life.over_count = on_sample(sample.bytes, True, life.over_count, self.limits, life.estimator,
                                              life.batch, life.accum, self.policy)
        if not decision.acts and floor and available < floor and self.state == JobState.RUNNING:
            reason = f"available {available} < floor {floor}"
            decision = Decision(Action.CHECKPOINT_EXIT, Diagnosis.SYSTEM_FLOOR, reason, life.batch, life.accum)
        if decision.acts:
            self._act(life, decision, now, step=life.last_step, sampled=sample.bytes, budget=self.limits.budget,
                      available=available)

    def tick(self, now: float, available: int, resume_above: int) -> None:
        """Reap, enforce deadlines, and leave BACKOFF or WAITING_FOR_MEMORY when due."""
        if self.departing:
            self._reap_departing(now)
        life = self.life
        if life is not None:
            code = life.proc.poll()
            if code is not None:
                self._on_exit(life, code, now)
            elif life.term_sent and now >= life.deadline:
                self.log.warning("kill", signal="SIGKILL", reason="grace expired", pid=life.proc.pid)
                life.proc.signal_group(signal.SIGKILL)
                life.deadline = float("inf")
            elif not life.term_sent:
                self._check_liveness(life, now)
        elif self.state == JobState.BACKOFF and now >= self.retry_at:
            self._restart(now, self.restart_reason)
        elif self.state == JobState.WAITING_FOR_MEMORY and available >= resume_above:
            self.log.info("memory_back", available=available, resume_above=resume_above)
            self._restart(now, Diagnosis.SYSTEM_FLOOR.value)

    @property
    def busy(self) -> bool:
        """A worker process of this job exists (current or departing)."""
        return self.life is not None or bool(self.departing)

    def _reap_departing(self, now: float) -> None:
        still = []
        for proc, kill_at in self.departing:
            code = proc.poll()
            if code is None and now >= kill_at:
                self.log.warning("kill", signal="SIGKILL", reason="departing worker did not exit", pid=proc.pid)
                proc.signal_group(signal.SIGKILL)
                kill_at = float("inf")
            if code is None:
                still.append((proc, kill_at))
            elif code != EXIT_CHECKPOINTED:
                self.log.warning("departed_worker_exit", pid=proc.pid, code=code)
        self.departing = still

    def next_deadline(self) -> float:
        if self.departing:
            return min(min(k for _, k in self.departing), self._life_deadline())
        return self._life_deadline()

    def _life_deadline(self) -> float:
        life = self.life
        if life is None:
            return self.retry_at if self.state == JobState.BACKOFF else float("inf")
        if life.term_sent or self.state in (JobState.CHECKPOINTING, JobState.STOPPING):
            return life.deadline
        timeout = self.config.startup_timeout if life.identity is None else self.config.hang_timeout
        return life.last_heard + timeout

    # -- internals ----------------------------------------------------------------------------------

    def _check_liveness(self, life: Life, now: float) -> None:
        if self.state in (JobState.CHECKPOINTING, JobState.STOPPING):
            if now >= life.deadline:
                self._terminate(now, f"checkpoint took longer than {self.config.checkpoint_timeout}s")
            return
        starting = life.identity is None
        timeout = self.config.startup_timeout if starting else self.config.hang_timeout
        if now - life.last_heard > timeout:
            what = "no hello" if starting else "no telemetry"
            self._terminate(now, f"hung: {what} for {now - life.last_heard:.1f}s (timeout {timeout}s)")

    def _act(self, life: Life, decision: Decision, now: float, **numbers: Any) -> None:
        if decision.action is Action.CLEAR_CACHE:
            if now - life.last_cache_clear >= CLEAR_CACHE_EVERY:
                life.last_cache_clear = now
                self.decide(decision, now, **numbers)
                self._command(Command.CLEAR_CACHE, decision.reason)
            return
        if self.stats.first_breach_step is None and decision.diagnosis is not Diagnosis.REGROW:
            self.stats.first_breach_step = life.last_step
        self._regrow_feedback(life, decision)
        if decision.action is Action.KILL:
            if not life.term_sent:
                self.decide(decision, now, **numbers)
                life.pending = decision
                self.stats.last_decision_at = now
                self._terminate(now, decision.reason)
            return
        if self.state == JobState.RUNNING:
            self.decide(decision, now, **numbers)
            self.stats.last_decision_at = now
            self._ask_exit(now, decision, JobState.CHECKPOINTING)

    def _regrow_feedback(self, life: Life, decision: Decision) -> None:
        """Additive increase, multiplicative decrease: a regrown batch that breaches doubles the wait."""
        if decision.diagnosis is Diagnosis.REGROW:
            self.regrown_to = decision.next_batch
        elif decision.next_batch and decision.next_batch < life.batch and life.batch == self.regrown_to:
            wait = self.policy.regrow_after_steps * 2
            self.policy = dataclasses.replace(self.policy, regrow_after_steps=wait)
            self.regrown_to = 0
            self.log.info("regrow_backoff", batch=life.batch, regrow_after_steps=wait)
            self.history.record("regrow_backoff", batch=life.batch, regrow_after_steps=wait)

    def _ask_exit(self, now: float, decision: Decision, state: JobState) -> None:
        life = self.life
        assert life is not None
        life.pending = decision
        life.deadline = now + self.config.checkpoint_timeout
        self._command(Command.CHECKPOINT_EXIT, decision.reason or "asked")
        self.change_state(state, decision.reason)

    def _terminate(self, now: float, reason: str) -> None:
        life = self.life
        if life is None or life.term_sent:
            return
        self.log.warning("kill", signal="SIGTERM", reason=reason, pid=life.proc.pid, grace=self.config.kill_grace)
        self.history.record("kill", reason=reason, step=life.last_step)
        life.term_sent = True
        life.deadline = now + self.config.kill_grace
        life.proc.signal_group(signal.SIGTERM)
        self.restart_reason = reason
        if self.state != JobState.STOPPING:
            self.change_state(JobState.STOPPING, reason)

    def _command(self, action: str, reason: str) -> bool:
        life = self.life
        if life is None or life.identity is None:
            return False
        self.send_frame(life.identity, encode(Command(action, reason)))
        return True

    def _on_exit(self, life: Life, code: int, now: float) -> None:
        self.life = None
        newest = latest_step(self.paths.checkpoints) or 0
        progress = newest > life.start_checkpoint
        pending = life.pending
        # A smaller batch next time is a new attempt, not a repeat of the failed one.
        new_attempt = pending is not None and pending.next_batch != 0 and (
            (pending.next_batch, pending.next_accum) != (self.batch, self.accum))
        if progress:
            self.failures = self.crashes = 0  # the backoff grows only over crashes without progress
        elif not new_attempt:
            self.failures += 1
        self.log.info("worker_exit", code=code, goodbye=life.goodbye, step=life.last_step, checkpoint=newest,
                      progress=progress)
        self.history.record("exit", code=code, goodbye=life.goodbye, step=life.last_step, checkpoint=newest)
        if pending is not None and pending.next_batch:
            self.batch, self.accum = pending.next_batch, pending.next_accum
        if code == 0 and not self.stop_requested:
            self.change_state(JobState.FINISHED, "worker finished", step=life.last_step)
        elif self.stop_requested:
            self.change_state(JobState.STOPPED, self.stop_reason or "stopped", step=life.last_step, checkpoint=newest)
        elif self.failures >= self.config.max_attempts_without_progress:
            self.change_state(JobState.FATAL, f"{self.failures} attempts without progress (last exit {code})")
        elif pending is not None and self.config.policy == "stop" and pending.diagnosis is not Diagnosis.SYSTEM_FLOOR:
            self.change_state(JobState.STOPPED, f"policy 'stop': {pending.reason}", step=life.last_step)
        elif pending is not None and pending.diagnosis is Diagnosis.SYSTEM_FLOOR:
            self.change_state(JobState.WAITING_FOR_MEMORY, pending.reason)
        elif pending is not None or code == EXIT_CHECKPOINTED:
            reason = pending.diagnosis.value if pending and pending.diagnosis else (life.goodbye or "checkpointed")
            self._restart(now, reason)
        elif life.term_sent:
            self._after_failure(now, self.restart_reason)  # we killed it: hung or past a deadline
        else:
            self._after_failure(now, f"exit {code}" if code >= 0 else f"killed by signal {-code}")

    def _after_failure(self, now: float, reason: str) -> None:
        self.crashes += 1
        if self.failures >= self.config.max_attempts_without_progress:
            self.change_state(JobState.FATAL, f"{self.failures} attempts without progress: {reason}")
            return
        delay = backoff_delay(self.crashes, self.config.backoff_initial, self.config.backoff_max)
        self.retry_at = now + delay
        self.restart_reason = reason
        self.change_state(JobState.BACKOFF, reason, delay=round(delay, 3))

    def _restart(self, now: float, reason: str) -> None:
        """Start the next life of this job; every start after the first counts as a restart."""
        self.stats.restarts += 1
        self.stats.restart_reasons[reason] += 1
        self.history.record("restart", reason=reason, batch=self.batch, accum=self.accum)
        self.start(now, f"restart: {reason}")

    def _note_batch(self, step: int, batch: int, accum: int) -> None:
        history = self.stats.batch_history
        if not history or history[-1][1:] != [batch, accum]:
            history.append([step, batch, accum])
            if len(history) > 1:
                self.history.record("batch_change", step=step, batch=batch, accum=accum)

    def _worker_env(self, token: str) -> dict[str, str]:
        config = self.config
        env = {**os.environ, **config.env, "PYTHONUNBUFFERED": "1"}
        env.update({
            "MLXSUP_ENDPOINT": self.endpoint, "MLXSUP_TOKEN": token, "MLXSUP_JOB": self.name,
            "MLXSUP_CHECKPOINT_DIR": str(self.paths.checkpoints), "MLXSUP_BATCH": str(self.batch),
            "MLXSUP_ACCUM": str(self.accum), "MLXSUP_CHECKPOINT_EVERY": str(config.checkpoint_every),
            "MLXSUP_KEEP_CHECKPOINTS": str(config.keep_checkpoints),
            "MLXSUP_ORPHAN_TIMEOUT": str(self.orphan_timeout),
            "MLXSUP_CACHE_LIMIT": str(parse_fraction_of(config.cache_limit, self.limits.budget)),
            "MLXSUP_CACHE_CLEAR_BYTES": str(parse_bytes(config.cache_clear)),
        })
        return env

    def _cwd(self) -> Path | None:
        return Path(self.config.working_dir) if self.config.working_dir else None
