"""training.run_control: one run per output folder, signals that stop every process at one step, and one-line errors."""

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ipu_trainer.training.run_control import (
    RunLock,
    StopOnSignal,
    StopOnSignalCallback,
    TrainingInterrupted,
    one_line,
)


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_one_run_per_output_folder(tmp_path, caplog):
    first = RunLock(str(tmp_path))
    first.acquire()
    owner = json.loads((tmp_path / "run.lock").read_text())
    assert owner["pid"] == os.getpid()
    # Another live process holds it: refused with its pid.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "run.lock").write_text(json.dumps({**owner, "pid": sleeper.pid}))
        with pytest.raises(ValueError, match=rf"in use by another run \(process {sleeper.pid} on"):
            RunLock(str(tmp_path)).acquire()
    finally:
        sleeper.kill()
    # A dead owner on this host: taken over, with a line saying so.
    stale = dead_pid()
    (tmp_path / "run.lock").write_text(json.dumps({**owner, "pid": stale}))
    second = RunLock(str(tmp_path))
    second.acquire()
    assert any(f"from process {stale}, which is no longer running" in r.getMessage() for r in caplog.records)
    second.release()
    assert not (tmp_path / "run.lock").exists()
    # Another host cannot be checked: refused.
    (tmp_path / "run.lock").write_text(json.dumps({**owner, "host": "elsewhere"}))
    with pytest.raises(ValueError, match="on elsewhere"):
        RunLock(str(tmp_path)).acquire()


def test_a_signal_seen_by_any_process_stops_every_process(monkeypatch):
    """Processes receive a signal at different moments; the flag is all-reduced so all stop at the same step
    (simulated: this process got no signal, another one did)."""
    from ipu_trainer.training.run_control import StopOnSignal

    stop = StopOnSignal()
    assert not stop.requested(torch.device("cpu"))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda flag, op=None: flag.fill_(1))
    assert stop.requested(torch.device("cpu"))


def test_a_lock_nobody_holds_is_taken_over_and_release_leaves_anothers_lock(tmp_path, caplog):
    lock_file = tmp_path / "run.lock"
    lock_file.write_text("")  # left by a process that died before writing its owner
    old = lock_file.stat().st_mtime - 60
    os.utime(lock_file, (old, old))
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert lock.held and json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert any("it is empty or unreadable" in record.getMessage() for record in caplog.records)
    # A lock being written right now (empty, but fresh) is someone's: refused.
    lock.release()
    lock_file.write_text("")
    with pytest.raises(ValueError, match=r"in use by another run \(process \? on \?, started just now\)"):
        RunLock(str(tmp_path)).acquire()
    # release() removes only the lock this process holds.
    lock_file.write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere"}))
    lock.held = True
    lock.release()
    assert lock_file.exists() and not lock.held


def test_one_line_folds_a_message_and_names_an_empty_one():
    assert one_line(ValueError("first line\n\n   second line  \n")) == "first line second line"
    assert one_line(KeyError()) == "KeyError"


def test_an_interrupted_run_exits_with_the_signals_code():
    assert TrainingInterrupted("stopped", signal.SIGTERM).exit_code == 128 + 15
    assert TrainingInterrupted("stopped", signal.SIGINT).exit_code == 130


def test_the_first_signal_is_recorded_and_the_step_ends_with_a_save_and_a_stop():
    callback = StopOnSignalCallback(torch.device("cpu"))
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        callback.stop = stop
        callback.on_step_end(None, None, control)
        assert not (control.should_save or control.should_training_stop)
        signal.raise_signal(signal.SIGTERM)  # recorded, not delivered: the process goes on
        assert stop.signal_number == signal.SIGTERM and stop.requested(torch.device("cpu"))
        callback.on_step_end(None, None, control)
        assert control.should_save and control.should_training_stop
    assert signal.getsignal(signal.SIGTERM) is before  # the handling before the run is back
