"""training.run_control: one run per output folder, signals that stop every process at one step, and one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ipu_trainer.training.run_control import RunLock


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
