"""Runs that stop cleanly and never collide: signals, the output-folder lock, and how a run ends early.

- `StopOnSignal`: SIGTERM (pre-emption) or SIGINT (Ctrl-C) during training asks the run to finish its step,
  save a checkpoint and stop; the script then exits non-zero with one line saying where to resume from. A
  second signal stops at once (the checkpoint being written, if any, is then incomplete and skipped on resume).
- `RunLock`: one run per output folder. A lock file holds the owner's process id and host; a lock left by a
  process that no longer runs on this host is taken over, with a line saying so.
- `RunFinished`, `TrainingInterrupted`, `CheckpointWriteError`: how a run ends other than by finishing;
  `cli.startup.run_cli` turns each into one line and an exit code; `one_line` folds an error's message into
  that line.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any, Callable, Optional, TypeVar

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"

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
    if process_index == 0:
        try:
            outcome = ("value", decide())
        except (ValueError, OSError) as error:
            outcome = ("error", str(error))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [outcome]
        torch.distributed.broadcast_object_list(shared, src=0)
        outcome = shared[0]
    kind, value = outcome
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


class StopOnSignal:
    """Context manager: while active, the first SIGTERM / SIGINT is recorded in `signal_number` instead of
    stopping the process; a second one restores the default handling and delivers itself."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_number: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, number: int, frame: Any) -> None:
        if self.signal_number is not None:
            self._restore()
            signal.raise_signal(number)
            return
        self.signal_number = number
        logger.warning(
            "%s received: finishing this step, saving a checkpoint and stopping (send it again to stop at once).",
            signal.Signals(number).name,
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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


class RunLock:
    """One run per output folder: `acquire()` creates `<output_dir>/run.lock` exclusively, `release()` removes it,
    and the folder too when `acquire()` created it and nothing else was written there (a refused run leaves no
    empty output folder behind)."""

    def __init__(self, output_dir: str) -> None:
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.held = False
        self.created_folder = False

    def _owner(self) -> Optional[dict]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def _age_seconds(self) -> float:
        try:
            return datetime.datetime.now().timestamp() - os.path.getmtime(self.path)
        except OSError:
            return float("inf")

    def acquire(self) -> None:
        folder = os.path.dirname(self.path) or "."
        self.created_folder = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None and self._age_seconds() < 10:
                    owner = {"pid": "?", "host": "?", "started": "just now"}  # being written by its owner right now
                if owner is None:
                    # Left by a process that died between creating and filling it: nobody holds it.
                    logger.warning("Taking over %s: it is empty or unreadable.", self.path)
                elif owner.get("host") != me["host"] or (owner.get("pid") != me["pid"] and _process_alive(owner["pid"])):
                    raise ValueError(
                        f"--output_dir {os.path.dirname(self.path)} is in use by another run (process {owner.get('pid')} "
                        f"on {owner.get('host')}, started {owner.get('started')}): wait for it to end or choose another "
                        f"--output_dir; if that run is no longer running, delete {self.path}"
                    )
                elif owner.get("pid") != me["pid"]:
                    logger.warning("Taking over %s from process %s, which is no longer running.", self.path, owner["pid"])
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(me, handle)
            self.held = True
            return
        raise ValueError(f"could not take the lock {self.path}: another run keeps taking it")

    def release(self) -> None:
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
