"""Runs that stop cleanly and never collide: signals, the output-folder lock, and how a run ends early.

- `StopOnSignal`: SIGTERM (pre-emption) or SIGINT (Ctrl-C) during training asks the run to finish its step,
  save a checkpoint and stop; the script then exits non-zero with one line saying where to resume from. A
  second signal stops at once (the checkpoint being written, if any, is then incomplete and skipped on resume).
  Its log line says how long the step may still take (`StepTimer`).
- `StepTimer`: times the training steps; after a first step longer than a minute it logs how long the rest of
  the run takes at that pace.
- `RunLock`: one run per output folder. A lock file holds the owner's process id and host and a heartbeat the
  owner refreshes every minute; a lock left by a process that no longer runs on this host, or whose heartbeat
  is older than 10 minutes (its machine died, say), is taken over, with a line saying so.
- `ShutdownTimeoutCheck`: under torchrun, warns when a step plus the checkpoint saved after it takes longer than
  torchrun waits between forwarding a SIGTERM and killing the processes (`torchrun_shutdown_timeout`).
- `RunFinished`, `TrainingInterrupted`, `CheckpointWriteError`: how a run ends other than by finishing;
  `cli.startup.run_cli` turns each into one line and an exit code; `one_line` folds an error's message into
  that line.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import signal
import socket
import statistics
import sys
import threading
import time
from typing import Any, Callable, Optional, TypeVar

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# The owner of a lock rewrites its heartbeat this often; a lock whose heartbeat is older than STALE_LOCK_SECONDS
# belongs to a run that is gone (or frozen that long), whatever machine it ran on. Ten missed beats: a busy
# process whose heartbeat thread waits a while for the interpreter does not lose its lock.
HEARTBEAT_SECONDS = 60.0
STALE_LOCK_SECONDS = 600.0

T = TypeVar("T")


def one_line(error: BaseException) -> str:
    """An exception's message with its line breaks folded, for the one `error:` line."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def decided_by_process_zero(decide: Callable[[], T], process_index: int) -> T:
    """Run `decide` on process 0 only and give its result to every process, or raise its error (as a `ValueError`)
    on every process. Decisions that read files (which checkpoint to resume, what to do with the output folder)
    could differ between processes, e.g. with a local output folder on each machine; processes acting on different
    answers train from different weights and then wait forever for each other."""
    outcome: Any = None
    failure: Optional[BaseException] = None
    if process_index == 0:
        try:
            outcome = ("value", decide())
        except (ValueError, OSError) as error:
            outcome = ("error", str(error))
        except Exception as error:  # a bug: the other processes must not wait for an answer that never comes
            outcome, failure = ("failed", one_line(error)), error
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [outcome]
        torch.distributed.broadcast_object_list(shared, src=0)
        outcome = shared[0]
    kind, value = outcome
    if failure is not None:
        raise failure
    if kind == "failed":
        raise RuntimeError(f"process 0 failed while deciding for every process: {value}")
    if kind == "error":
        raise ValueError(value)
    return value


class RunFinished(Exception):
    """The output folder already holds this run, trained to its last step: nothing to do (exit code 0)."""


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, most often); the previous complete one stays resumable."""


def rough_duration(seconds: float) -> str:
    """A duration as a person says it: under a second, ~40 s, ~9 min, ~2.5 h, ~3 days."""
    if seconds < 1:
        return "under a second"
    for size, unit in ((86400, "days"), (3600, "h"), (60, "min")):
        if seconds >= size * 1.5 or (size == 60 and seconds >= 60):
            value = seconds / size
            return f"~{value:.1f}".removesuffix(".0") + f" {unit}" if value < 10 else f"~{value:.0f} {unit}"
    return f"~{seconds:.0f} s"


# A first step at least this long gets a log line estimating the rest of the run.
SLOW_STEP_SECONDS = 60.0


class StepTimer(TrainerCallback):
    """Times each training step, from the loop's `on_step_begin` to its `on_step_end` (evaluations and checkpoint
    saves come after `on_step_end`, so they are not counted). A first step of `SLOW_STEP_SECONDS` or more is
    followed by a line estimating the rest of the run; `StopOnSignal` asks `time_left_in_step` how long the step
    under way may still take. `clock` is the time source, in seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.step_seconds: list[float] = []
        self._step_start: Optional[float] = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_seconds, self._step_start = [], None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_start = self.clock()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._step_start is None:
            return
        seconds = self.clock() - self._step_start
        self._step_start = None
        self.step_seconds.append(seconds)
        steps_left = state.max_steps - state.global_step
        if len(self.step_seconds) == 1 and seconds >= SLOW_STEP_SECONDS and steps_left > 0:
            logger.info(
                "One step took %s: the %d steps left take %s at this pace (evaluations and checkpoint saves not "
                "included; the first step also carries the start-up, so later ones may be faster).",
                rough_duration(seconds), steps_left, rough_duration(seconds * steps_left),
            )

    def typical_step_seconds(self) -> Optional[float]:
        """The median step so far, leaving out the first (start-up costs) once there are others; None before the
        first step ends."""
        measured = self.step_seconds[1:] or self.step_seconds
        return statistics.median(measured) if measured else None

    def time_left_in_step(self) -> Optional[str]:
        """How long the step under way may still take, in words; None between steps."""
        if self._step_start is None:
            return None
        elapsed = self.clock() - self._step_start
        typical = self.typical_step_seconds()
        if typical is None:
            return f"the first step has run for {rough_duration(elapsed)}, and its length is not known yet"
        if elapsed >= typical:
            return f"this step has run for {rough_duration(elapsed)}, longer than the {rough_duration(typical)} of " \
                   "the steps before it"
        return f"this step may take {rough_duration(typical - elapsed)} more, from the step times so far"


class StopOnSignal:
    """Context manager: while active, the first SIGTERM / SIGINT is recorded in `signal_number` instead of
    stopping the process; a second one restores the default handling and delivers itself. With a `timer`, the
    line logged for the first one says how long the step under way may still take."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, timer: Optional[StepTimer] = None) -> None:
        self.signal_number: Optional[int] = None
        self.timer = timer
        self._previous: dict[int, Any] = {}

    def _handle(self, number: int, frame: Any) -> None:
        if self.signal_number is not None:
            self._restore()
            signal.raise_signal(number)
            return
        self.signal_number = number
        time_left = self.timer.time_left_in_step() if self.timer is not None else None
        logger.warning(
            "%s received: finishing this step%s, saving a checkpoint and stopping (send it again to stop at once).",
            signal.Signals(number).name, f" ({time_left})" if time_left else "",
        )

    def __enter__(self) -> StopOnSignal:
        # Handlers can only be installed from the main thread; elsewhere (a notebook's worker thread, say) the
        # process keeps its default handling.
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def __exit__(self, *exc_info: Any) -> None:
        self._restore()

    def requested(self, device: torch.device) -> bool:
        """Whether any process received a signal. Processes may receive it at different steps, and they must stop
        at the same one (the checkpoint save is collective), so the flag is all-reduced every step: one tiny
        collective per step, beside the step's own gradient all-reduce."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([1 if self.signal_number is not None else 0], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            return bool(flag.item())
        return self.signal_number is not None


class StopOnSignalCallback(TrainerCallback):
    """Turns a recorded signal into "save a checkpoint now and stop" at the end of the current step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stop: Optional[StopOnSignal] = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.stop is not None and self.stop.requested(self.device):
            control.should_save = True
            control.should_training_stop = True
        return control


TORCHRUN_DEFAULT_SHUTDOWN_SECONDS = 30.0


def _launcher_arguments() -> list[str]:
    """The command line of the process that started this one (torchrun's agent, under torchrun); [] when it
    cannot be read (no /proc)."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
            return [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return []


def torchrun_has_shutdown_timeout() -> bool:
    """Whether this torch's torchrun takes --shutdown-timeout (older ones wait a fixed 30 s)."""
    from torch.distributed.launcher.api import LaunchConfig

    return "shutdown_timeout" in getattr(LaunchConfig, "__dataclass_fields__", {})


def torchrun_shutdown_timeout() -> Optional[tuple[float, str]]:
    """Under torchrun (or another launcher built on its agent, e.g. accelerate launch): how many seconds the agent
    waits after forwarding SIGTERM before it sends SIGKILL, and where that number comes from; None otherwise.

    The agent's own arguments are not passed to its processes, so its command line is read; then the variables
    it reads, in its order (PET_SHUTDOWN_TIMEOUT stands for the flag, TORCH_ELASTIC_SHUTDOWN_TIMEOUT for its
    default)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    if torchrun_has_shutdown_timeout():
        arguments = _launcher_arguments()
        for index, argument in enumerate(arguments):
            for flag in ("--shutdown-timeout", "--shutdown_timeout"):
                value = None
                if argument == flag and index + 1 < len(arguments):
                    value = arguments[index + 1]
                elif argument.startswith(flag + "="):
                    value = argument.split("=", 1)[1]
                if value is not None:
                    try:
                        return float(value), f"torchrun {flag} {value}"
                    except ValueError:
                        pass
        for name in ("PET_SHUTDOWN_TIMEOUT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
            try:
                return float(os.environ[name]), f"{name}={os.environ[name]}"
            except (KeyError, ValueError):
                pass
    return TORCHRUN_DEFAULT_SHUTDOWN_SECONDS, "torchrun's default"


class ShutdownTimeoutCheck(TrainerCallback):
    """Warns once when the last step plus the checkpoint saved after it took longer than `timeout` (seconds, and
    where that number comes from; None: not under torchrun, nothing to check).

    A SIGTERM lets the step under way finish, then saves a checkpoint (`StopOnSignal`); torchrun kills its
    processes `timeout` seconds after forwarding the signal, so a slower step and save loses the checkpoint and
    every step since the previous one. Checked at each save because only then are both durations known. The
    trainer calls `save_started()` when a checkpoint save begins; `clock` is replaceable for tests.
    """

    def __init__(self, timeout: Optional[tuple[float, str]], clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.clock = clock
        self.warned = False
        self._step_began: Optional[float] = None
        self._step_seconds = 0.0
        self._save_began: Optional[float] = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_began = self.clock()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._step_began is not None:
            self._step_seconds = self.clock() - self._step_began

    def save_started(self) -> None:
        self._save_began = self.clock()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._save_began is None:
            return
        save_seconds, self._save_began = self.clock() - self._save_began, None
        if self.timeout is None or self.warned:
            return
        seconds, source = self.timeout
        needed = self._step_seconds + save_seconds
        # Each machine's torchrun has its own timeout: one line per machine.
        if needed <= seconds or not state.is_local_process_zero:
            return
        self.warned = True
        advice = 60 * math.ceil(2 * needed / 60)  # twice the measured time, for slower saves to come
        how = (f"start torchrun with --shutdown-timeout {advice} (or set TORCH_ELASTIC_SHUTDOWN_TIMEOUT={advice})"
               if torchrun_has_shutdown_timeout() else
               "this torch's torchrun always waits 30 s: a newer torch's torchrun takes --shutdown-timeout")
        logger.warning(
            "The last step and the checkpoint saved after it took %.0f s (step %.0f s, save %.0f s), longer than the "
            "%.0f s torchrun waits after forwarding a SIGTERM before it kills the processes (%s): a pre-emption "
            "would kill this run before its checkpoint is complete. To give it time, %s, and let whatever sends the "
            "SIGTERM (the job scheduler) wait as long before it kills the job.",
            needed, self._step_seconds, save_seconds, seconds, source, how,
        )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _same_owner(first: Optional[dict], second: dict) -> bool:
    return first is not None and all(first.get(key) == second.get(key) for key in ("pid", "host", "started"))


class RunLock:
    """One run per output folder: `acquire()` creates `<output_dir>/run.lock` exclusively, `release()` removes it,
    and the folder too when `acquire()` created it and nothing else was written there (a refused run leaves no
    empty output folder behind).

    While held, a daemon thread rewrites the lock's `heartbeat` (seconds since the epoch, by `clock`) every
    `heartbeat_seconds`, so that another machine can tell a live run from one whose machine died: the process id
    of a lock written on another host cannot be checked. The thread only waits on an event between beats, so it
    neither keeps a process alive nor delays its exit; `release()` stops it first.
    """

    def __init__(self, output_dir: str, clock: Callable[[], float] = time.time,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.held = False
        self.created_folder = False
        self.clock = clock
        self.heartbeat_seconds = heartbeat_seconds
        self._me: dict = {}
        self._stop_heartbeat = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None

    def _owner(self) -> Optional[dict]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                owner = json.load(handle)
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def _age_seconds(self) -> float:
        try:
            return datetime.datetime.now().timestamp() - os.path.getmtime(self.path)
        except OSError:
            return float("inf")

    def _heartbeat_age(self, owner: dict) -> Optional[float]:
        """Seconds since the owner's last heartbeat; None for a lock without one (written before heartbeats)."""
        beat = owner.get("heartbeat")
        return self.clock() - beat if isinstance(beat, (int, float)) else None

    def acquire(self) -> None:
        folder = os.path.dirname(self.path) or "."
        self.created_folder = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "heartbeat": self.clock()}
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse(me)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(me, handle)
            self.held = True
            self._me = me
            self._start_heartbeat()
            return
        raise ValueError(f"could not take the lock {self.path}: another run keeps taking it")

    def _take_over_or_refuse(self, me: dict) -> None:
        """Return when the existing lock may be removed (saying why, unless it is this process's own), raise
        the one-line refusal otherwise."""
        owner = self._owner()
        if owner is None and self._age_seconds() < 10:
            owner = {"pid": "?", "host": "?", "started": "just now"}  # being written by its owner right now
        if owner is None:
            # Left by a process that died between creating and filling it: nobody holds it.
            logger.warning("Taking over %s: it is empty or unreadable.", self.path)
            return
        same_host = owner.get("host") == me["host"]
        if same_host and owner.get("pid") == me["pid"]:
            return
        if same_host and isinstance(owner.get("pid"), int) and not _process_alive(owner["pid"]):
            logger.warning("Taking over %s from process %s, which is no longer running.", self.path, owner["pid"])
            return
        name = f"process {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
        age = self._heartbeat_age(owner)
        if age is not None and age > STALE_LOCK_SECONDS:
            # Another machine's process cannot be checked, and on this one the id may belong to another process
            # by now: a run that stopped refreshing its heartbeat that long ago is gone (or frozen).
            logger.warning("Taking over %s from %s: its last heartbeat was %.0f minutes ago (more than %.0f), so "
                           "that run is no longer running.", self.path, name, age / 60, STALE_LOCK_SECONDS / 60)
            return
        beat = f"; its last heartbeat was {age / 60:.1f} minutes ago" if age is not None else ""
        raise ValueError(
            f"--output_dir {os.path.dirname(self.path)} is in use by another run ({name}{beat}): wait for it to end "
            f"or choose another --output_dir; if that run is no longer running, delete {self.path} (a lock whose "
            f"heartbeat is more than {STALE_LOCK_SECONDS / 60:.0f} minutes old is taken over by itself)"
        )

    def _start_heartbeat(self) -> None:
        self._stop_heartbeat.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop_heartbeat.wait(self.heartbeat_seconds):
            try:
                if not self.refresh():
                    return
            except OSError as error:  # a full disk or a network folder gone for a moment: try again next beat
                logger.warning("Could not refresh the heartbeat of %s: %s", self.path, one_line(error))

    def refresh(self) -> bool:
        """Rewrite the heartbeat of the held lock; False (and nothing written) once the lock is no longer this
        run's. Written to a temporary file then renamed over the lock, so that a reader never sees half a lock."""
        if not _same_owner(self._owner(), self._me):
            logger.error("%s is no longer held by this run (removed, or taken over after a missed heartbeat): "
                         "another run may now write to %s.", self.path, os.path.dirname(self.path))
            return False
        self._me = {**self._me, "heartbeat": self.clock()}
        # The name ends in .lock: the output folder's checks ignore lock files.
        temporary = os.path.join(os.path.dirname(self.path) or ".", f".heartbeat-{os.getpid()}.lock")
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(self._me, handle)
        os.replace(temporary, self.path)
        return True

    def release(self) -> None:
        self._stop_heartbeat.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10)
            self._heartbeat = None
        if self.held and (self._owner() or {}).get("pid") == os.getpid():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            if self.created_folder:
                try:
                    os.rmdir(os.path.dirname(self.path) or ".")  # only succeeds when it is empty
                except OSError:
                    pass
        self.held = False
