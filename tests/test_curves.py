"""Training curves: the panels drawn from a log history and the picture written."""

import json
import os

import pytest
from matplotlib.image import imread

from ipu_trainer.training.curves import (
    CURVES_NAME, DPI, PANEL_INCHES, draw_curves, save_figure, series_of, trainer_state_of, write_training_curves,
)

PANEL_PIXELS = (round(PANEL_INCHES[1] * DPI), round(PANEL_INCHES[0] * DPI))  # (height, width)


def pretraining_history(steps: int = 20, every: int = 5) -> list[dict]:
    """What run_pretraining.py logs: training lines (the first without throughput), evaluations with the two
    losses and accuracies apart, and the end-of-training summary."""
    history = []
    for step in range(every, steps + 1, every):
        line = {"loss": 10.0 / step, "grad_norm": 1.0, "learning_rate": 1e-3 * (1 - step / steps), "epoch": 0.1,
                "step": step}
        if step > every:
            line.update(samples_per_second=100.0 + step, tokens_per_second=12800.0 + step)
        history.append(line)
        if step % 10 == 0:
            history.append({"eval_loss": 5.0 / step, "eval_mlm_loss": 4.0 / step, "eval_nsp_loss": 1.0 / step,
                            "eval_mlm_accuracy": step / 40, "eval_nsp_accuracy": 0.5, "eval_runtime": 1.5,
                            "eval_samples_per_second": 30.0, "epoch": 0.1, "step": step})
    history.append({"train_runtime": 9.0, "train_samples_per_second": 99.0, "train_loss": 1.0, "total_flos": 1e12,
                    "epoch": 0.1, "step": steps})
    return history


def panels_of(figure) -> dict[str, list[str]]:
    """Panel title -> the labels of its lines."""
    return {axes.get_title(): [line.get_label() for line in axes.get_lines()] for axes in figure.axes}


def test_a_pretraining_history_draws_its_five_panels(tmp_path):
    path = write_training_curves(pretraining_history(), str(tmp_path))

    assert path == str(tmp_path / CURVES_NAME)
    assert sorted(os.listdir(tmp_path)) == [CURVES_NAME]  # the temporary file is gone
    image = imread(path)
    # five panels: two wide, three high
    assert image.shape[:2] == (3 * PANEL_PIXELS[0], 2 * PANEL_PIXELS[1])
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas

    panels = panels_of(draw_curves({"run": pretraining_history()}))
    assert panels == {
        "loss": ["loss", "eval_loss", "eval_mlm_loss", "eval_nsp_loss"],  # not train_loss, the run's mean
        "accuracy": ["eval_mlm_accuracy", "eval_nsp_accuracy"],
        "learning rate": ["learning_rate"],
        "samples/s": ["samples_per_second"],
        "tokens/s": ["tokens_per_second"],
    }


def test_the_lines_hold_the_history_against_the_step():
    figure = draw_curves({"run": pretraining_history()})
    loss_axes = next(axes for axes in figure.axes if axes.get_title() == "loss")
    lines = {line.get_label(): line for line in loss_axes.get_lines()}
    assert list(lines["loss"].get_xdata()) == [5, 10, 15, 20]
    assert list(lines["loss"].get_ydata()) == [2.0, 1.0, 10 / 15, 0.5]
    assert list(lines["eval_loss"].get_xdata()) == [10, 20] and lines["eval_loss"].get_marker() == "o"
    throughput = next(axes for axes in figure.axes if axes.get_title() == "samples/s").get_lines()[0]
    assert list(throughput.get_xdata()) == [10, 15, 20]  # the first window is not reported


def test_only_a_training_loss_draws_one_panel(tmp_path):
    history = [{"loss": 3.0 - step / 10, "step": step} for step in range(1, 11)]
    image = imread(write_training_curves(history, str(tmp_path)))

    assert image.shape[:2] == PANEL_PIXELS
    figure = draw_curves({"run": history})
    assert panels_of(figure) == {"loss": ["loss"]}
    assert figure.axes[0].get_legend() is None  # the title says what the one line is


def test_a_history_with_nothing_to_draw_writes_nothing(tmp_path):
    history = [{"train_runtime": 1.0, "train_loss": 2.0, "step": 2}]
    assert draw_curves({"run": history}) is None
    assert write_training_curves(history, str(tmp_path)) is None
    assert os.listdir(tmp_path) == []


def test_points_that_cannot_be_drawn_are_left_out():
    history = [{"loss": float("nan"), "step": 1}, {"loss": 2.0, "step": 2}, {"loss": 1.0},
               {"loss": float("inf"), "step": 3}, {"loss": True, "step": 4}, {"loss": "1.0", "step": 5},
               {"loss": 1.5, "step": 6}]
    assert series_of(history) == {"loss": ([2, 6], [2.0, 1.5])}


def test_a_failed_write_leaves_the_old_picture_and_no_temporary_file(tmp_path):
    figure = draw_curves({"run": pretraining_history()})
    path = tmp_path / "curves.notaformat"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="not supported"):
        save_figure(figure, str(path))
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["curves.notaformat"]
