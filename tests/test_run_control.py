"""training.run_control: one run per output folder, signals that stop every process at one step, one-line errors, and
how long steps take, told to a person (fake clocks stand in for minute-long steps)."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from ipu_trainer.training.run_control import (
    decided_by_process_zero,
    RunLock,
    StepTimer,
    StopOnSignal,
    StopOnSignalCallback,
    TrainingInterrupted,
    one_line,
    rough_duration,
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


NOW = 1_000_000_000.0  # a fake clock: no test waits for a heartbeat to age


def foreign_lock(folder, minutes_since_heartbeat, host="elsewhere", pid=4242):
    (folder / "run.lock").write_text(json.dumps({"pid": pid, "host": host, "started": "2030-01-01T00:00:00",
                                                 "command": "run_mlm.py", "heartbeat": NOW - 60 * minutes_since_heartbeat}))


def test_a_lock_whose_heartbeat_stopped_is_taken_over_from_any_host(tmp_path, caplog):
    # Another machine's run with a recent heartbeat: refused, naming the file to delete if that run is gone.
    foreign_lock(tmp_path, minutes_since_heartbeat=9)
    with pytest.raises(ValueError, match=rf"process 4242 on elsewhere.*last heartbeat was 9.0 minutes ago.*if that "
                                         rf"run is no longer running, delete {tmp_path / 'run.lock'}"):
        RunLock(str(tmp_path), clock=lambda: NOW).acquire()
    # Its machine died (a requeued job starts elsewhere): taken over, naming the old owner.
    foreign_lock(tmp_path, minutes_since_heartbeat=11)
    lock = RunLock(str(tmp_path), clock=lambda: NOW)
    lock.acquire()
    owner = json.loads((tmp_path / "run.lock").read_text())
    assert (owner["pid"], owner["heartbeat"]) == (os.getpid(), NOW)
    assert any("from process 4242 on elsewhere" in r.getMessage() and "11 minutes ago" in r.getMessage()
               for r in caplog.records)
    lock.release()
    # On this host, a live process id with a stopped heartbeat (the id reused by another process): taken over too.
    foreign_lock(tmp_path, minutes_since_heartbeat=11, host=socket.gethostname(), pid=os.getppid())
    lock.acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    # A lock written before heartbeats existed, from another host: refused as before.
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 4242, "host": "elsewhere", "started": "then"}))
    with pytest.raises(ValueError, match="in use by another run"):
        RunLock(str(tmp_path), clock=lambda: NOW + 1e6).acquire()


def test_the_lock_owner_refreshes_its_heartbeat_until_it_releases_the_lock(tmp_path, caplog):
    ticks = iter(range(10**6))
    lock = RunLock(str(tmp_path / "out"), clock=lambda: float(next(ticks)), heartbeat_seconds=0.001)
    lock.acquire()
    beats, deadline = set(), time.monotonic() + 30
    while len(beats) < 3 and time.monotonic() < deadline:  # the daemon thread rewrites it (each read: a whole lock)
        beats.add(json.loads((tmp_path / "out" / "run.lock").read_text())["heartbeat"])
    assert len(beats) == 3
    thread = lock._heartbeat
    assert thread.daemon  # never keeps the process alive
    lock.release()
    assert not thread.is_alive() and not (tmp_path / "out").exists()  # stopped, lock and created folder removed
    # A lock taken over meanwhile (after a long freeze) is left to its new owner.
    lock = RunLock(str(tmp_path), clock=lambda: NOW)
    lock.acquire()
    lock.release()
    lock.acquire()
    foreign_lock(tmp_path, minutes_since_heartbeat=0)
    assert lock.refresh() is False
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == 4242
    assert any("no longer held by this run" in r.getMessage() for r in caplog.records)
    lock.release()
    assert (tmp_path / "run.lock").exists()


# ---- torchrun's time between SIGTERM and SIGKILL -----------------------------------------------------------


def test_a_step_and_save_slower_than_torchruns_shutdown_timeout_is_warned_once(caplog):
    from ipu_trainer.training.run_control import ShutdownTimeoutCheck

    now = [0.0]
    state = SimpleNamespace(is_local_process_zero=True)

    def step_and_save(step_seconds, save_seconds, check):
        check.on_step_begin(None, state, None)
        now[0] += step_seconds
        check.on_step_end(None, state, None)
        check.save_started()
        now[0] += save_seconds
        check.on_save(None, state, None)

    def warnings():
        return [r.getMessage() for r in caplog.records if "torchrun waits" in r.getMessage()]

    check = ShutdownTimeoutCheck((30.0, "torchrun's default"), clock=lambda: now[0])
    step_and_save(10, 15, check)  # 25 s: killed only after the checkpoint is complete
    assert not warnings()
    step_and_save(20, 25, check)
    [line] = warnings()
    assert "took 45 s (step 20 s, save 25 s), longer than the 30 s" in line and "torchrun's default" in line
    assert "--shutdown-timeout 120" in line and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120" in line
    step_and_save(20, 25, check)
    assert len(warnings()) == 1  # once per run
    step_and_save(60, 60, ShutdownTimeoutCheck(None, clock=lambda: now[0]))  # not under torchrun
    step_and_save(60, 60, ShutdownTimeoutCheck((600.0, "torchrun --shutdown-timeout 600"), clock=lambda: now[0]))
    assert len(warnings()) == 1


def test_torchruns_shutdown_timeout_is_read_where_torchrun_reads_it(monkeypatch):
    from ipu_trainer.training import run_control

    for name in ("TORCHELASTIC_RUN_ID", "PET_SHUTDOWN_TIMEOUT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    assert run_control.torchrun_shutdown_timeout() is None  # not under torchrun
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    launcher = ["python", "-m", "torch.distributed.run", "--nproc_per_node", "8", "run_mlm.py", "--do_train"]
    monkeypatch.setattr(run_control, "_launcher_arguments", lambda: launcher)
    assert run_control.torchrun_shutdown_timeout() == (30.0, "torchrun's default")
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    assert run_control.torchrun_shutdown_timeout()[0] == 300.0
    launcher[3:3] = ["--shutdown-timeout=900"]
    assert run_control.torchrun_shutdown_timeout() == (900.0, "torchrun --shutdown-timeout 900")


# ---- step times ----------------------------------------------------------------------------------------------

LOGGER = "ipu_trainer.training.run_control"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def run_steps(timer, clock, seconds, max_steps=162, first_step=0):
    """The loop's events for steps of `seconds` each (a list), from step `first_step` + 1 on."""
    state = SimpleNamespace(global_step=first_step, max_steps=max_steps)
    timer.on_train_begin(None, state, None)
    for duration in seconds:
        timer.on_step_begin(None, state, None)
        clock.now += duration
        state.global_step += 1
        timer.on_step_end(None, state, None)
        clock.now += 30  # an evaluation or a save between steps: not part of a step
    return state


def test_a_first_step_over_a_minute_is_followed_by_an_estimate_of_the_run(caplog):
    clock = FakeClock()
    timer = StepTimer(clock)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        run_steps(timer, clock, [540, 500, 500])
    estimates = [r.getMessage() for r in caplog.records if "One step took" in r.getMessage()]
    assert len(estimates) == 1  # after the first step only
    assert estimates[0].startswith("One step took ~9 min: the 161 steps left take ~24 h at this pace")
    assert timer.step_seconds == [540, 500, 500]


def test_a_resumed_run_estimates_the_steps_it_has_left(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        run_steps(StepTimer(clock), clock, [120], max_steps=100, first_step=40)
    assert "the 59 steps left take ~2 h" in caplog.text


@pytest.mark.parametrize("seconds", [[59], [2, 3]])
def test_short_steps_get_no_estimate(seconds, caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        run_steps(StepTimer(clock), clock, seconds)
    assert "One step took" not in caplog.text


def signal_line(timer, caplog):
    stop = StopOnSignal(timer)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        stop._handle(signal.SIGINT, None)  # what the handler does, without a real signal
    assert stop.signal_number == signal.SIGINT
    (record,) = [r for r in caplog.records if "SIGINT received" in r.getMessage()]
    return record.getMessage()


def test_the_signal_line_says_how_long_the_step_may_still_take(caplog):
    clock = FakeClock()
    timer = StepTimer(clock)
    state = run_steps(timer, clock, [900, 540, 560, 550])  # the first step's start-up is left out of the typical step
    timer.on_step_begin(None, state, None)
    clock.now += 150
    assert signal_line(timer, caplog) == (
        "SIGINT received: finishing this step (this step may take ~6.7 min more, from the step times so far), "
        "saving a checkpoint and stopping (send it again to stop at once).")


def test_the_signal_line_in_a_step_longer_than_the_others_or_in_the_first_one(caplog):
    clock = FakeClock()
    timer = StepTimer(clock)
    timer.on_step_begin(None, SimpleNamespace(global_step=0, max_steps=10), None)
    clock.now += 200
    assert "(the first step has run for ~3.3 min, and its length is not known yet)" in signal_line(timer, caplog)
    caplog.clear()
    timer.on_step_end(None, SimpleNamespace(global_step=1, max_steps=10), None)
    timer.on_step_begin(None, SimpleNamespace(global_step=1, max_steps=10), None)
    clock.now += 400
    assert "(this step has run for ~6.7 min, longer than the ~3.3 min of the steps before it)" in signal_line(timer, caplog)


def test_between_steps_or_without_a_timer_the_signal_line_is_the_plain_one(caplog):
    clock = FakeClock()
    timer = StepTimer(clock)
    run_steps(timer, clock, [90])
    plain = ("SIGINT received: finishing this step, saving a checkpoint and stopping (send it again to stop at once).")
    assert signal_line(timer, caplog) == plain
    caplog.clear()
    assert signal_line(None, caplog) == plain


def test_durations_read_as_a_person_says_them():
    assert [rough_duration(s) for s in (0.3, 40, 60, 89, 540, 5400, 86400, 3 * 86400)] == [
        "under a second", "~40 s", "~1 min", "~1.5 min", "~9 min", "~1.5 h", "~24 h", "~3 days"]


def test_a_lock_removes_the_output_folder_it_created_when_nothing_else_was_written(tmp_path):
    new = RunLock(str(tmp_path / "new" / "out"))
    new.acquire()
    new.release()
    assert not (tmp_path / "new" / "out").exists()  # a refused run leaves no empty output folder
    used = RunLock(str(tmp_path / "used"))
    used.acquire()
    (tmp_path / "used" / "checkpoint-1").mkdir()
    used.release()
    assert (tmp_path / "used" / "checkpoint-1").is_dir()
    existing = RunLock(str(tmp_path))
    existing.acquire()
    existing.release()
    assert tmp_path.is_dir() and not (tmp_path / "run.lock").exists()  # a folder it did not create stays


def test_a_decision_reaches_every_process_also_when_process_zero_fails(monkeypatch):
    """Process 0 decides; a wrong input is a ValueError everywhere (one error: line), and a bug there still answers
    the others (a RuntimeError naming it) before process 0 raises it, instead of leaving them waiting forever."""
    assert decided_by_process_zero(lambda: "checkpoint-2", 0) == "checkpoint-2"
    with pytest.raises(ValueError, match="bad folder"):
        decided_by_process_zero(lambda: (_ for _ in ()).throw(ValueError("bad folder")), 0)
    with pytest.raises(KeyError):
        decided_by_process_zero(lambda: {}["missing"], 0)

    # Process 1 of a run whose process 0 hit that KeyError: the broadcast brings it the failure.
    sent = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda shared, src: sent.append(shared[0]))
    with pytest.raises(KeyError):  # process 0: what it broadcast, then its own error
        decided_by_process_zero(lambda: {}["missing"], 0)
    assert sent == [("failed", "'missing'")]
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda shared, src: shared.__setitem__(0, sent[0]))
    with pytest.raises(RuntimeError, match="process 0 failed while deciding for every process: 'missing'"):
        decided_by_process_zero(lambda: pytest.fail("only process 0 decides"), 1)
