"""How long steps take, told to a person: the estimate after a slow first step, and the time the step under way may
still take when a signal asks the run to stop. Fake clocks stand in for minute-long steps."""

import logging
import signal
from types import SimpleNamespace

import pytest

from ipu_trainer.training.run_control import StepTimer, StopOnSignal, rough_duration

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
